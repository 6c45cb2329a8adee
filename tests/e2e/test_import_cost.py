"""In-process ``sendmail`` imports the notices and the abuse rules only where they are configured.

Each module costs a PHP ``mail()`` call its import time (a few milliseconds together), so a
server without ``[notify]`` or ``[abuse]`` must not pay for them.
"""

from __future__ import annotations

import re
import subprocess

from tests.support.shim import SENDMAIL, Shim
from tests.support.upstream import SmtpUpstream

MESSAGE = b"From: post@kunde.example\nTo: ola@x.example\nSubject: s\n\nhei\n"
OPTIONAL = {"sendmail_shim.notify", "sendmail_shim.notice_templates", "sendmail_shim.abuse"}


def imported(shim: Shim) -> tuple[int, set[str]]:
    """One in-process call: its exit code, and the modules it imported (from Python's import log)."""
    done = subprocess.run([SENDMAIL, "-t", "-i"], input=MESSAGE, capture_output=True, timeout=60,
                          env={**shim.env, "PYTHONPROFILEIMPORTTIME": "1"}, cwd=shim.dir)
    return done.returncode, set(re.findall(r"^import time:.*\|\s*(\S+)$", done.stderr.decode(), flags=re.M))


def test_without_notify_and_abuse_their_modules_are_not_imported(shim: Shim, upstream: SmtpUpstream) -> None:
    code, found = imported(shim)
    assert code == 0 and "sendmail_shim.pipeline" in found  # sent, and the log is read right
    assert found & OPTIONAL == set()
    shim.configure("notify", **{"from": "varsel@provider.example"})
    shim.configure("abuse", failed_min=10)
    upstream.script.replies["RCPT:ola@x.example"] = "550 5.1.1 no such user"  # a signal for the rules
    code, found = imported(shim)
    assert code == 69 and found >= OPTIONAL
