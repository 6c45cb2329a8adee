"""The SPF stage sits on the sendmail hot path: a cached verdict must not import dnspython."""

from __future__ import annotations

import subprocess
import sys

CACHED_CALL = """
import sys
from sendmail_shim import spf

cache = spf.MemoryVerdictCache()
for ip in ("192.0.2.25", "2001:db8::25"):
    cache.put("kunde.example", ip, "pass", expires_at=2e9)

def no_resolver():
    raise AssertionError("a cached verdict needs no resolver")

spf.require_authorised(["kunde.example"], ["192.0.2.25", "2001:db8::25"], accept=["pass"],
                       resolver=no_resolver, hint=None, sender="post@kunde.example",
                       budget=5, cache=cache, now=lambda: 1e9)
print(sorted(name for name in sys.modules if name == "dns" or name.startswith("dns.")))
"""


def run(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=60, check=True)
    return done.stdout.strip()


def test_importing_the_stage_does_not_import_dnspython() -> None:
    assert run("import sys, sendmail_shim.spf, sendmail_shim.dnsclient; "
               "print('dns' in sys.modules)") == "False"


def test_a_cached_verdict_does_not_import_dnspython() -> None:
    assert run(CACHED_CALL) == "[]"
