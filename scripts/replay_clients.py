"""Replay every recorded client invocation against `sendmail` and say how many got what they needed.

Each recorded invocation (PHP mail(), PHPMailer, Symfony Mailer, bsd-mailx, git send-email,
cron and the system tools that call /usr/sbin/sendmail; see tests/e2e/recorded_clients.py)
is run as its client ran it, with every sender registered and the caller bound to a customer
with a default sender, against a loopback STARTTLS upstream. "What the client needed": exit 0
(or only 2xx/3xx replies in -bs mode), delivered once, the right envelope sender and
recipients, Bcc stripped, a From present. The hostile recorded invocations must be refused
whole instead.

    .venv/bin/python scripts/replay_clients.py
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import trustme  # noqa: E402

from tests.e2e.recorded_clients import HOSTILE, refuse_hostile, replay_all, replay_shim  # noqa: E402
from tests.support.upstream import SmtpUpstream, write_ca  # noqa: E402


def main() -> int:
    ca = trustme.CA()
    with tempfile.TemporaryDirectory(prefix="replay-") as scratch, SmtpUpstream(ca) as upstream:
        base = Path(scratch)
        ca_file = write_ca(ca, base)
        (base / "clients").mkdir()
        outcomes = replay_all(base / "clients", upstream, ca_file)
        (base / "hostile").mkdir()
        shim = replay_shim(base / "hostile", upstream.port, ca_file)
        hostile = [refuse_hostile(shim, upstream, case) for case in HOSTILE]
    for outcome in outcomes:
        mark = "ok  " if outcome.ok else "MISS"
        print(f"{mark} {outcome.client:<24} {outcome.case:<42} {outcome.why}")
    for outcome in hostile:
        print(f"{'ok  ' if outcome.ok else 'FAIL'} {'refused whole':<24} {outcome.case:<42} {outcome.why}")
    good = sum(o.ok for o in outcomes)
    print(f"\n{good} of {len(outcomes)} recorded invocations gave the client what it needed")
    print(f"{sum(o.ok for o in hostile)} of {len(hostile)} hostile recorded invocations were refused whole")
    return 0 if all(o.ok for o in hostile) else 1


if __name__ == "__main__":
    sys.exit(main())
