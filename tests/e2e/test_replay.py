"""The replay of every recorded client invocation: what each client needed, it got."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.e2e.recorded_clients import HOSTILE, RECORDED, refuse_hostile, replay_all, replay_shim
from tests.support.upstream import SmtpUpstream

# PHPMailer's isQmail() passes no recipient and no -t: no recipient is a usage error (64) here,
# as with msmtp, Postfix and dma. It only reaches sendmail when pointed at it by hand: on a host
# without qmail, PHPMailer runs /var/qmail/bin/qmail-inject.
KNOWN_MISSES = {"phpmailer_qmail": "exit 64: sendmail: no recipients: give them as arguments, or use -t to read "
                                   "them from the headers"}


def test_every_recorded_invocation_is_replayed_once_and_gets_what_its_client_needs(
        tmp_path: Path, upstream: SmtpUpstream, ca_file: Path) -> None:
    outcomes = replay_all(tmp_path, upstream, ca_file)
    assert [o.case for o in outcomes] == [case.case for case in RECORDED]
    missed = {o.case: o.why for o in outcomes if not o.ok}
    assert missed == KNOWN_MISSES
    assert len(outcomes) - len(missed) == len(RECORDED) - 1


@pytest.mark.parametrize("case", HOSTILE, ids=lambda c: c.case)
def test_hostile_recorded_invocations_are_refused_whole(case, tmp_path: Path, upstream: SmtpUpstream,
                                                        ca_file: Path) -> None:
    outcome = refuse_hostile(replay_shim(tmp_path, upstream.port, ca_file), upstream, case)
    assert outcome.ok, outcome.why
