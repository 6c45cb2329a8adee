"""The gate's log under a flood stays small; a log file it cannot write stops it at start, and
one that fails later is reported to syslog (a socket of the test's own) once a minute."""

from __future__ import annotations

import json
import os
import re
import shutil
import socket
import sqlite3
import subprocess
import threading
import time
from pathlib import Path

from tests.gate.conftest import needs_users
from tests.gate.deployment import Deployment, Result, User, message, run_process
from tests.gate.test_reload import reload
from tests.support.upstream import SmtpUpstream

pytestmark = needs_users

FLOOD_SECONDS = 15  # as long as the flood the issue measured (38,500 lines, 4 MB, before)
FLOODERS = 4  # connections at once, as a site's parallel PHP workers make them
LIMIT, WINDOW = 10, 60  # the defaults of [log] repeat_limit and repeat_window
# One site sending, as fast as the gate answers, mail from an account that is not its own: each
# is refused (77) for the same reason. Prints how many of each exit code it got.
FLOOD = """
import collections, json, socket, sys, threading, time
from sendmail_shim import gate_protocol as protocol
path, until, flooders = sys.argv[1], time.monotonic() + float(sys.argv[2]), int(sys.argv[3])
request = (protocol.frame(protocol.ARG, b"sendmail") + protocol.frame(protocol.ARG, b"-t")
           + protocol.frame(protocol.DATA, sys.stdin.buffer.read()) + protocol.frame(protocol.END))
codes = collections.Counter()
def flood():
    while time.monotonic() < until:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.connect(path)
            protocol.read_frame(sock, time.monotonic() + 10, protocol.GREETING)
            sock.sendall(request)
            _, payload = protocol.read_frame(sock, time.monotonic() + 10, protocol.VERDICT)
            codes[protocol.WireVerdict.decode(payload).code] += 1
threads = [threading.Thread(target=flood) for _ in range(flooders)]
for thread in threads:
    thread.start()
for thread in threads:
    thread.join()
print(json.dumps(codes), flush=True)
"""
SUMMARY = re.compile(r"event=log-suppressed uid=(\d+) similar=(\S+) suppressed=(\d+) seconds=(\d+) "
                     r'reason="suppressed (\d+) similar lines from uid (\d+) in the last (\d+) s"')


def _flood(dep: Deployment, user: User, seconds: float) -> dict[int, int]:
    proc = subprocess.run([dep.python.executable, "-c", FLOOD, str(dep.socket_path), str(seconds), str(FLOODERS)],
                          input=message("post@b.example"), capture_output=True, env=dep.client_env(),
                          cwd="/", timeout=seconds + 60, check=True, **user.run_options())
    return {int(code): count for code, count in json.loads(proc.stdout).items()}


def _decision_rows(dep: Deployment, uid: int) -> dict[str, int]:
    with sqlite3.connect(dep.ledger_path) as db:
        rows = db.execute("SELECT verdict, count(*) FROM decisions WHERE uid = ? GROUP BY verdict", (uid,))
        return dict(rows.fetchall())


def test_a_15_s_flood_of_refusals_from_one_user_writes_under_200_lines_and_every_ledger_row(
        deployment: Deployment, relay: SmtpUpstream) -> None:
    deployment.start_gate()  # the shipped defaults: 10 similar lines a minute
    a = deployment.users.a
    started = time.monotonic()
    codes = _flood(deployment, a, FLOOD_SECONDS)
    refused = codes.get(77, 0)
    assert set(codes) == {77} and refused > 1000, codes  # a real flood, every one refused alike
    # The window ends a minute after the first refusal; the running gate sums it up then.
    summary_line = deployment.wait_for_log("event=log-suppressed", timeout=WINDOW + 15 - (time.monotonic() - started))
    for sent in range(2 * LIMIT):  # the same user's accepted mail is never suppressed
        assert deployment.sendmail("-t", "-i", input=message(subject=f"ok {sent}"), user=a).code == 0
    assert deployment.stop_gate() == 0
    lines = deployment.log_lines()
    refusals = [line for line in lines if "verdict=refused" in line and f"uid={a.uid} " in line]
    summaries = [line for line in lines if "event=log-suppressed" in line]
    assert len(lines) < 200, len(lines)
    assert (len(refusals), summaries) == (LIMIT, [summary_line])
    found = SUMMARY.search(summary_line)
    assert found is not None, summary_line
    uid, similar, count, seconds, count_again, uid_again, seconds_again = found.groups()
    assert (uid, uid_again, seconds, seconds_again) == (str(a.uid), str(a.uid), str(WINDOW), str(WINDOW))
    assert similar == re.search(r" stage=(\S+)", refusals[0])[1] == "NotCallersAccount"  # type: ignore[index]
    assert int(count) == int(count_again) == refused - LIMIT  # each refusal is either a line or counted
    assert len([line for line in lines if "verdict=sent" in line]) == 2 * LIMIT
    assert _decision_rows(deployment, a.uid) == {"refused": refused, "sent": 2 * LIMIT}
    print(f"{refused} refusals in {FLOOD_SECONDS} s: {len(refusals)} refusal lines and one summary, "
          f"{len(lines)} log lines ({deployment.log_path.stat().st_size} bytes) in all; "
          f"the ledger holds {refused} refused rows")


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


def test_a_reload_to_a_log_file_the_gates_user_cannot_write_keeps_the_running_one(deployment: Deployment,
                                                                                 relay: SmtpUpstream) -> None:
    deployment.start_gate()
    path = _unwritable_log(deployment)
    gate_user = deployment.users.gate.name
    line = reload(deployment, "event=gate-reload-failed")  # logged in the running config's file
    assert (f'reason="{deployment.config_path}: log.file: {gate_user} cannot write {path}: Permission denied; '
            f'choose a file in a directory that {gate_user} owns') in line, line
    assert deployment.sendmail("-t", "-i", input=message(subject="after")).code == 0
    assert "verdict=sent" in deployment.wait_for_log("verdict=sent")  # still in the file it ran with
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
    # The example path docs gave before: /var/log belongs to root, so the gate's user never could.
    deployment.configure("log", file="/var/log/sendmail-shim.log")
    result = _config_check(deployment)
    assert result.code == 78 and result.stderr.splitlines() == [
        f"sendmail-shim: log.file: {gate_user} cannot write /var/log/sendmail-shim.log: it cannot create "
        f"files in /var/log (mode 0755); choose a file in a directory that {gate_user} owns "
        f"(the packages make /var/log/sendmail-shim for it)"], result.stderr
    deployment.configure("log", file=str(path))
    path.touch(mode=0o644)  # now it exists, root's, and the gate's user still may not write it
    result = _config_check(deployment, deployment.users.gate)
    assert result.code == 78 and f"{path} is not writable by it (mode 0644)" in result.stderr


# ------------------------------------------------------------------ a log file that fails after the start

# The gate in a mount namespace of its own whose /dev holds the usual character devices and a
# /dev/log that leads to the test's socket: the syslog(3) the gate calls writes there.
PRIVATE_DEV = """
set -e
log=$1; shift
mount -t tmpfs -o mode=0755 tmpfs /dev
mknod -m 666 /dev/null c 1 3; mknod -m 666 /dev/zero c 1 5
mknod -m 666 /dev/random c 1 8; mknod -m 666 /dev/urandom c 1 9
ln -s "$log" /dev/log
exec "$@"
"""
REPORT_INTERVAL = 60  # at most one report of a failing log file a minute
MAIL_LOG_ERR = "<19>"  # syslog facility mail (2) and priority err (3)


class SyslogSocket:
    """A datagram socket where /dev/log would be: each message with the time it arrived."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        os.chmod(path, 0o666)  # the gate writes it as its own user
        self.sock.settimeout(0.2)
        self.heard: list[tuple[float, str]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._listen, daemon=True)
        self._thread.start()

    def _listen(self) -> None:
        while not self._stop.is_set():
            try:
                self.heard.append((time.monotonic(), self.sock.recv(65536).decode(errors="replace")))
            except TimeoutError:
                continue

    def close(self) -> None:
        self._stop.set()
        self._thread.join()
        self.sock.close()


def test_a_log_file_that_fails_after_the_start_is_reported_to_syslog_at_most_once_a_minute(
        deployment: Deployment, relay: SmtpUpstream) -> None:
    syslog = SyslogSocket(deployment.base / "dev-log")
    try:
        deployment.configure("log", syslog=True)
        deployment.configure("limits", account=["1000 messages / 5m"], customer=["1000 messages / 1h"])
        deployment.start_gate(as_root=True, wrap=["unshare", "-m", "--propagation", "private", "sh", "-c",
                                                  PRIVATE_DEV, "sh", str(deployment.base / "dev-log")])
        a = deployment.users.a
        assert deployment.sendmail("-t", "-i", input=message(subject="before"), user=a).code == 0
        deployment.wait_for_log("verdict=sent")
        # Root takes the file (a rotation gone wrong): the gate's user may no longer append to it.
        os.chown(deployment.log_path, 0, 0)
        os.chmod(deployment.log_path, 0o600)
        broken, sent = time.monotonic(), 0
        while time.monotonic() - broken < REPORT_INTERVAL + 8:
            assert deployment.sendmail("-t", "-i", input=message(subject=f"after {sent}"), user=a).code == 0
            sent += 1
            time.sleep(0.5)
        assert deployment.stop_gate() == 0
    finally:
        syslog.close()
    reports = [(at, text) for at, text in syslog.heard if "event=log-file-failed" in text]
    assert len(reports) == 2, reports
    (first_at, first), (second_at, second) = reports
    path = deployment.log_path
    assert first.startswith(MAIL_LOG_ERR)
    assert re.search(r"sendmail-shim\[\d+\]: event=log-file-failed", first), first
    assert first.endswith(f'event=log-file-failed file={path} failed_writes=1 reason="cannot write {path} '
                          '(Permission denied); the decisions are in the ledger (sendmail-shim log) and in syslog"')
    assert first_at - broken < 5  # at the first line after the failure
    assert second_at - first_at >= REPORT_INTERVAL - 0.5
    failed_since = int(re.search(r" failed_writes=(\d+) ", second)[1])  # type: ignore[index]
    sent_between = len([text for at, text in syslog.heard if first_at < at <= second_at and "verdict=sent" in text])
    assert failed_since >= sent_between > 20  # every line the file missed since the first report is counted
    # The decisions went on: each is in syslog and in the ledger, and none is in the file.
    assert len([text for _, text in syslog.heard if "verdict=sent" in text]) == sent + 1
    assert _decision_rows(deployment, a.uid) == {"sent": sent + 1}
    assert len([line for line in deployment.log_lines() if "verdict=sent" in line]) == 1
    print(f"{sent} messages over {second_at - broken:.0f} s with the log file failing: 2 syslog reports, "
          f"{second_at - first_at:.1f} s apart, the second counting {failed_since} failed writes")


# ------------------------------------------------------------------ the packaged rotation

LOGROTATE_RULE = Path(__file__).resolve().parents[2] / "packaging/debian/sendmail-shim.logrotate"


def _logrotate() -> str:
    found = shutil.which("logrotate") or str(LOGROTATE_RULE.parents[2] / "build/tools/usr/sbin/logrotate")
    assert Path(found).exists(), "logrotate is required: run make setup"
    return found


def test_the_packaged_logrotate_rule_rotates_the_gates_log_while_it_runs(deployment: Deployment,
                                                                        relay: SmtpUpstream) -> None:
    gate_user = deployment.users.gate
    rule = LOGROTATE_RULE.read_text().replace("/var/log/sendmail-shim/", f"{deployment.logs}/")
    rule = rule.replace("su sendmail-shim sendmail-shim", f"su {gate_user.name} {gate_user.name}")
    rule = rule.replace("create 0640 sendmail-shim sendmail-shim", f"create 0640 {gate_user.name} {gate_user.name}")
    assert str(deployment.logs) in rule and "sendmail-shim sendmail-shim" not in rule
    config = deployment.base / "logrotate.conf"
    config.write_text(rule)
    deployment.start_gate()
    a = deployment.users.a
    assert deployment.sendmail("-t", "-i", input=message(subject="week 1"), user=a).code == 0
    deployment.wait_for_log("verdict=sent")
    rotated = subprocess.run([_logrotate(), "--force", "--state", str(deployment.base / "logrotate.state"),
                              str(config)], capture_output=True, text=True, timeout=60)
    assert rotated.returncode == 0 and not rotated.stderr, rotated.stderr
    fresh = deployment.log_path.stat()
    assert (fresh.st_uid, fresh.st_mode & 0o777, fresh.st_size) == (gate_user.uid, 0o640, 0)
    assert deployment.sendmail("-t", "-i", input=message(subject="week 2"), user=a).code == 0
    deployment.wait_for_log("verdict=sent")  # the running gate writes the new file
    assert deployment.stop_gate() == 0
    old = (deployment.logs / "decisions.log.1").read_text()
    assert old.count("verdict=sent") == 1 and deployment.log_lines()[0].count("verdict=sent") == 1
