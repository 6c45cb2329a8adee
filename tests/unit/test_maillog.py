"""The mail log: similar lines from one caller are capped per window, and a log file that
cannot be written is reported to syslog at most once a minute (a fake clock stands in for
the minutes)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from sendmail_shim import maillog
from sendmail_shim.config import LogConfig


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def refusal(uid: int = 1001, stage: str = "LimitReached", **more: object) -> dict[str, object]:
    return {"uid": uid, "verdict": "refused", "code": 69, "stage": stage,
            "reason": "post@kunde.example reached 25 messages per 5 minutes", **more}


def test_after_the_burst_similar_lines_are_counted_and_summed_up_when_the_next_is_allowed() -> None:
    clock = Clock()
    repeats = maillog.Repeats(clock)
    decisions = [repeats.admit(refusal(), 3, 60) for _ in range(10)]
    assert [allowed for allowed, _ in decisions] == [True] * 3 + [False] * 7
    assert all(summaries == [] for _, summaries in decisions)
    clock.now += 60
    allowed, summaries = repeats.admit(refusal(), 3, 60)
    assert allowed
    assert [maillog.format_fields(s) for s in summaries] == [
        'event=log-suppressed uid=1001 similar=LimitReached suppressed=7 seconds=60 '
        'reason="suppressed 7 similar lines from uid 1001 in the last 60 s"']


def test_a_window_that_ends_in_silence_is_summed_up_by_due() -> None:
    clock = Clock()
    repeats = maillog.Repeats(clock)
    for _ in range(5):
        repeats.admit(refusal(), 2, 60)
    clock.now += 59
    assert repeats.due(60) == []
    clock.now += 1
    (summary,) = repeats.due(60)
    assert (summary["suppressed"], summary["seconds"]) == (3, 60)
    assert repeats.due(60) == []  # once


def test_everything_sums_up_open_windows_with_the_time_they_ran() -> None:
    clock = Clock()
    repeats = maillog.Repeats(clock)
    for _ in range(4):
        repeats.admit(refusal(), 1, 60)
    clock.now += 12.4
    (summary,) = repeats.due(60, everything=True)
    assert (summary["suppressed"], summary["seconds"]) == (3, 12)


def test_each_uid_and_reason_has_its_own_burst() -> None:
    repeats = maillog.Repeats(Clock())
    for _ in range(5):
        repeats.admit(refusal(), 2, 60)
    assert repeats.admit(refusal(uid=1002), 2, 60)[0]
    assert repeats.admit(refusal(stage="NotAuthenticated"), 2, 60)[0]
    gate_line = {"event": "gate-request-dropped", "uid": 1001, "reason": "protocol error"}
    assert [repeats.admit(gate_line, 2, 60)[0] for _ in range(3)] == [True, True, False]


@pytest.mark.parametrize("fields", [
    {"uid": 1001, "verdict": "sent", "code": 0},
    {"uid": 1001, "verdict": "queued", "code": 0},
    refusal(stage="RuntimeError", ref="0a1b2c3d"),  # the caller was told to quote the reference
    {"event": "gate-start", "pid": 12},  # no caller
])
def test_mail_that_went_out_and_lines_an_admin_must_find_are_never_suppressed(fields: dict[str, object]) -> None:
    repeats = maillog.Repeats(Clock())
    assert all(repeats.admit(fields, 1, 60) == (True, []) for _ in range(50))


def test_a_limit_of_zero_suppresses_nothing() -> None:
    repeats = maillog.Repeats(Clock())
    assert all(repeats.admit(refusal(), 0, 60)[0] for _ in range(50))


def test_the_table_of_callers_stays_bounded_and_loses_no_count() -> None:
    clock = Clock()
    repeats = maillog.Repeats(clock, max_keys=100)
    summed = 0
    for uid in range(1000):
        for _ in range(3):
            allowed, summaries = repeats.admit(refusal(uid=uid), 1, 60)
            summed += sum(int(s["suppressed"]) for s in summaries)  # type: ignore[call-overload]
        assert len(repeats._windows) <= 100
    summed += sum(int(s["suppressed"]) for s in repeats.due(60, everything=True))  # type: ignore[call-overload]
    assert summed == 1000 * 2


def test_write_caps_the_lines_in_the_log_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    clock = Clock()
    monkeypatch.setattr(maillog, "_repeats", maillog.Repeats(clock))
    config = LogConfig(syslog=False, file=str(tmp_path / "mail.log"), repeat_limit=2, repeat_window=60)
    for _ in range(100):
        maillog.write(config, refusal(), "notice")
    clock.now += 61
    maillog.flush(config)
    lines = (tmp_path / "mail.log").read_text().splitlines()
    assert len(lines) == 3 and "verdict=refused" in lines[0] and "verdict=refused" in lines[1]
    assert lines[2].split(" ", 1)[1] == ('notice event=log-suppressed uid=1001 similar=LimitReached suppressed=98 '
                                         'seconds=60 reason="suppressed 98 similar lines from uid 1001 '
                                         'in the last 60 s"')


# ------------------------------------------------------------------ a log file that cannot be written


def test_a_failing_log_file_is_reported_at_once_then_at_most_once_a_minute() -> None:
    clock = Clock()
    reports: list[tuple[str, int]] = []
    failures = maillog.FileFailures(clock, lambda line, priority: reports.append((line, priority)))
    error = PermissionError(13, "Permission denied")
    for _ in range(30):  # half a minute of failed writes
        failures.failed("/var/log/sendmail-shim/decisions.log", error, in_syslog=True)
        clock.now += 1
    assert reports == [(
        'event=log-file-failed file=/var/log/sendmail-shim/decisions.log failed_writes=1 '
        'reason="cannot write /var/log/sendmail-shim/decisions.log (Permission denied); the decisions '
        'are in the ledger (sendmail-shim log) and in syslog"', 3)]
    for _ in range(31):  # to the 60th second
        failures.failed("/var/log/sendmail-shim/decisions.log", error, in_syslog=True)
        clock.now += 1
    assert len(reports) == 2 and "failed_writes=60 " in reports[1][0]  # with every failure since the first


def test_writing_to_a_log_file_that_cannot_be_written_is_not_an_error(tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    reports: list[str] = []
    monkeypatch.setattr(maillog, "_file_failures", maillog.FileFailures(report=lambda line, _: reports.append(line)))
    config = LogConfig(syslog=False, file=str(tmp_path / "missing-directory" / "mail.log"))
    for _ in range(3):
        maillog.write(config, {"uid": 1001, "verdict": "sent", "code": 0})
    assert len(reports) == 1 and "No such file or directory" in reports[0]
    assert reports[0].endswith('the decisions are in the ledger (sendmail-shim log)"')  # and not in syslog


@pytest.mark.skipif(os.geteuid() != 0, reason="only root's files are given away")
def test_a_log_file_root_creates_belongs_to_the_owner_of_its_directory(public_dir: Path) -> None:
    gate_uid, gate_gid = 54321, 54322  # the gate's user, who owns the log directory
    os.chown(public_dir, gate_uid, gate_gid)
    path = public_dir / "decisions.log"
    maillog.write(LogConfig(syslog=False, file=str(path)), {"uid": 0, "verdict": "sent", "code": 0})
    info = path.stat()
    assert (info.st_uid, info.st_gid, oct(info.st_mode & 0o777)) == (gate_uid, gate_gid, "0o640")
    assert "verdict=sent" in path.read_text()


# ------------------------------------------------------------------ may a user write it


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A directory every user can reach (pytest's own are private to their owner)."""
    path = Path(tempfile.mkdtemp(prefix="shim-maillog-"))
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def test_file_problem_reads_the_modes_for_another_user(public_dir: Path) -> None:
    tmp_path = public_dir
    other = 54321  # owns nothing here and is in no group that does
    os.chmod(tmp_path, 0o755)
    assert maillog.file_problem(str(tmp_path / "new.log"), other, [other]) == (
        f"it cannot create files in {tmp_path} (mode 0755)")
    assert maillog.file_problem(str(tmp_path / "new.log"), os.geteuid(), [os.getegid()]) is None
    (tmp_path / "old.log").touch(0o600)
    os.chmod(tmp_path / "old.log", 0o600)
    assert maillog.file_problem(str(tmp_path / "old.log"), other, [other]) == (
        f"{tmp_path / 'old.log'} is not writable by it (mode 0600)")
    os.chmod(tmp_path / "old.log", 0o622)
    assert maillog.file_problem(str(tmp_path / "old.log"), other, [other]) is None
    os.chmod(tmp_path, 0o700)
    assert maillog.file_problem(str(tmp_path / "old.log"), other, [other]) == (
        f"{tmp_path} cannot be entered by it (mode 0700)")
    assert maillog.file_problem(str(tmp_path / "nowhere" / "x.log"), os.geteuid(), []) == (
        f"{tmp_path / 'nowhere'}: No such file or directory")
