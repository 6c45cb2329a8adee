"""The gate's log under a flood stays small, and a log file it cannot write stops it at start."""

from __future__ import annotations

import json
import re
import sqlite3
import subprocess
import time
from pathlib import Path

from tests.gate.conftest import needs_users
from tests.gate.deployment import Deployment, Result, User, message, run_process
from tests.support.upstream import SmtpUpstream

pytestmark = needs_users

FLOOD_SECONDS = 10
WINDOW, LIMIT = 3, 5  # [log] repeat_window and repeat_limit, short so that a short flood spans windows
# One site sending, as fast as the gate answers, mail from an account that is not its own: each
# is refused (77) for the same reason. Prints how many of each exit code it got.
FLOOD = """
import collections, json, socket, sys, time
from sendmail_shim import gate_protocol as protocol
path, until = sys.argv[1], time.monotonic() + float(sys.argv[2])
request = (protocol.frame(protocol.ARG, b"sendmail") + protocol.frame(protocol.ARG, b"-t")
           + protocol.frame(protocol.DATA, sys.stdin.buffer.read()) + protocol.frame(protocol.END))
codes = collections.Counter()
while time.monotonic() < until:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.connect(path)
        protocol.read_frame(sock, time.monotonic() + 10, protocol.GREETING)
        sock.sendall(request)
        _, payload = protocol.read_frame(sock, time.monotonic() + 10, protocol.VERDICT)
        codes[protocol.WireVerdict.decode(payload).code] += 1
print(json.dumps(codes), flush=True)
"""
SUMMARY = re.compile(r"event=log-suppressed uid=(\d+) similar=(\S+) suppressed=(\d+) seconds=(\d+) "
                     r'reason="suppressed (\d+) similar lines from uid (\d+) in the last (\d+) s"')


def _flood(dep: Deployment, user: User, seconds: float) -> dict[int, int]:
    proc = subprocess.run([dep.python.executable, "-c", FLOOD, str(dep.socket_path), str(seconds)],
                          input=message("post@b.example"), capture_output=True, env=dep.client_env(),
                          cwd="/", timeout=seconds + 60, check=True, **user.run_options())
    return {int(code): count for code, count in json.loads(proc.stdout).items()}


def _decision_rows(dep: Deployment, uid: int) -> dict[str, int]:
    with sqlite3.connect(dep.ledger_path) as db:
        rows = db.execute("SELECT verdict, count(*) FROM decisions WHERE uid = ? GROUP BY verdict", (uid,))
        return dict(rows.fetchall())


def test_a_flood_of_refusals_from_one_user_writes_a_bounded_log_and_every_ledger_row(
        deployment: Deployment, relay: SmtpUpstream) -> None:
    deployment.configure("log", repeat_limit=LIMIT, repeat_window=WINDOW)
    deployment.start_gate()
    a = deployment.users.a
    codes = _flood(deployment, a, FLOOD_SECONDS)
    refused = codes.get(77, 0)
    assert set(codes) == {77} and refused > 20 * LIMIT * (FLOOD_SECONDS / WINDOW), codes  # a real flood
    # The window that was open when the flood stopped ends, and its summary follows, gate running.
    time.sleep(WINDOW + 2)
    summaries = [SUMMARY.search(line) for line in deployment.log_lines() if "event=log-suppressed" in line]
    assert summaries and all(summaries), deployment.log_lines()[-5:]
    for sent in range(2 * LIMIT):  # the same user's accepted mail is never suppressed
        assert deployment.sendmail("-t", "-i", input=message(subject=f"ok {sent}"), user=a).code == 0
    assert deployment.stop_gate() == 0
    lines = deployment.log_lines()
    refusals = [line for line in lines if "verdict=refused" in line and f"uid={a.uid} " in line]
    summaries = [SUMMARY.search(line) for line in lines if "event=log-suppressed" in line]
    windows = FLOOD_SECONDS // WINDOW + 2
    assert len(refusals) <= LIMIT * windows and len(summaries) <= windows, (len(refusals), len(summaries))
    assert len(lines) < LIMIT * windows + windows + 2 * LIMIT + 10  # the gate's own lines, the sends
    suppressed = 0
    for found in summaries:
        assert found is not None
        uid, similar, count, seconds, count_again, uid_again, seconds_again = found.groups()
        assert (uid, uid_again, count, seconds) == (str(a.uid), str(a.uid), count_again, seconds_again)
        assert similar == re.search(r" stage=(\S+)", refusals[0])[1]  # type: ignore[index]
        suppressed += int(count)
    assert len(refusals) + suppressed == refused  # each refusal is either a line or counted in one
    assert len([line for line in lines if "verdict=sent" in line]) == 2 * LIMIT
    assert _decision_rows(deployment, a.uid) == {"refused": refused, "sent": 2 * LIMIT}
    print(f"{refused} refusals in {FLOOD_SECONDS} s: {len(refusals)} lines and {len(summaries)} summaries "
          f"({len(lines)} log lines in all); the ledger holds every decision")


# ------------------------------------------------------------------ a log file the gate cannot write


def _unwritable_log(dep: Deployment) -> Path:
    """A log file under a directory only root may write: the gate's user can neither create nor open it."""
    directory = dep.base / "root-log"
    directory.mkdir(mode=0o755)
    path = directory / "decisions.log"
    dep.configure("log", file=str(path))
    return path


def _config_check(dep: Deployment, user: User | None = None) -> Result:
    """``sendmail-shim config check`` as root (default) or as ``user``."""
    return run_process([dep.python.executable, "-c", "from sendmail_shim.cli import main; main()",
                        "config", "check"], env=dep.gate_env(), cwd="/",
                       options=user.run_options() if user else None)


def test_the_gate_refuses_to_start_with_a_log_file_its_user_cannot_write(deployment: Deployment,
                                                                       relay: SmtpUpstream) -> None:
    path = _unwritable_log(deployment)
    gate = deployment.start_gate(as_root=True, wait=False)  # root could write it; the gate's user cannot
    assert gate.wait(30) == 78
    assert deployment.gate_errors() == (
        f"sendmail-shim: {deployment.config_path}: log.file: {deployment.users.gate.name} cannot write "
        f"{path}: Permission denied; choose a file in a directory that {deployment.users.gate.name} owns "
        f"(the packages make /var/log/sendmail-shim for it)\n")
    assert not path.exists()


def test_config_check_refuses_a_log_file_the_gates_user_cannot_write(deployment: Deployment) -> None:
    assert _config_check(deployment).code == 0  # the deployment's own log directory is the gate's
    assert _config_check(deployment, deployment.users.gate).code == 0
    path = _unwritable_log(deployment)
    gate_user = deployment.users.gate.name
    expected = (f"sendmail-shim: log.file: {gate_user} cannot write {path}: it cannot create files in "
                f"{path.parent} (mode 0755); choose a file in a directory that {gate_user} owns "
                f"(the packages make /var/log/sendmail-shim for it)")
    for user in (None, deployment.users.gate):  # root checks on the gate's user's behalf
        result = _config_check(deployment, user)
        assert (result.code, result.stderr.splitlines()) == (78, [expected]), result.stderr
        assert "problems found" in result.stdout.decode()
    path.touch(mode=0o644)  # now it exists, root's, and the gate's user still may not write it
    result = _config_check(deployment, deployment.users.gate)
    assert result.code == 78 and f"{path} is not writable by it (mode 0644)" in result.stderr
