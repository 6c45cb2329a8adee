"""The gate as a service: start, socket activation, graceful stop, concurrency, unit files."""

from __future__ import annotations

import configparser
import os
import shutil
import signal
import subprocess
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from tests.gate.conftest import needs_users
from tests.gate.deployment import IS_ROOT, ROOT, Deployment, message, proc_status
from tests.support.shim import ADMIN
from tests.support.upstream import SmtpUpstream

UNITS = ROOT / "packaging" / "systemd"


def _own_socket_directory(dep: Deployment) -> Path:
    """Without socket activation the gate binds the socket itself, in a directory it owns."""
    directory = dep.run_dir / "own"
    directory.mkdir(mode=0o755)
    dep.give_to_gate(directory)
    dep.socket_path = directory / "gate.sock"
    dep.configure("gate", socket=str(dep.socket_path))
    return directory


def test_gate_binds_its_own_socket_and_removes_it_on_stop(deployment: Deployment, relay: SmtpUpstream) -> None:
    _own_socket_directory(deployment)
    deployment.start_gate(activated=False)
    mode = os.stat(deployment.socket_path).st_mode & 0o777
    assert mode == 0o666
    assert deployment.sendmail("-t", "-i", input=message()).code == 0
    assert deployment.stop_gate() == 0
    assert not deployment.socket_path.exists()
    assert "event=gate-stop" in deployment.log_lines()[-1]


def test_sigterm_lets_the_message_in_progress_finish(deployment: Deployment, relay: SmtpUpstream) -> None:
    _own_socket_directory(deployment)
    gate = deployment.start_gate(activated=False)
    client = subprocess.Popen([str(deployment.bin / "sendmail"), "-t", "-i"], stdin=subprocess.PIPE,
                              stderr=subprocess.PIPE, env=deployment.client_env(), cwd=str(deployment.base),
                              **deployment.users.a.run_options())
    assert client.stdin is not None
    client.stdin.write(message()[:40])
    client.stdin.flush()
    time.sleep(0.5)  # connected and part-way through
    gate.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + 10
    while deployment.socket_path.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    late = deployment.sendmail("-t", "-i", input=message(subject="late"))
    assert late.code == 69 and "mail gate is not running" in late.line  # no new work is taken
    _, err = client.communicate(message()[40:], timeout=20)
    assert (client.returncode, err) == (0, b""), (deployment.log_lines(), deployment.gate_errors())
    assert gate.wait(20) == 0
    assert [r.headers["subject"] for r in relay.received] == [["Hei"]]


def test_socket_activation_keeps_callers_waiting_across_a_restart(deployment: Deployment,
                                                                   relay: SmtpUpstream) -> None:
    deployment.start_gate()
    assert deployment.stop_gate() == 0
    assert deployment.socket_path.exists()  # systemd's socket outlives the service
    with ThreadPoolExecutor(1) as pool:
        waiting = pool.submit(deployment.sendmail, "-t", "-i", input=message())
        time.sleep(0.5)
        assert not waiting.done()  # queued in the socket, not refused
        deployment.start_gate()
        result = waiting.result(timeout=30)
    assert (result.code, result.line) == (0, "")
    assert len(relay.received) == 1


def test_a_second_gate_on_the_same_socket_refuses_to_start(deployment: Deployment) -> None:
    _own_socket_directory(deployment)
    deployment.start_gate(activated=False)
    second = subprocess.run([deployment.python.executable, "-m", "sendmail_shim.gate"],
                            env=deployment.gate_env(), capture_output=True, text=True, timeout=60,
                            cwd="/", **deployment.users.gate.run_options())
    assert second.returncode == 69
    assert second.stderr == (f"sendmail-shim: another gate is already listening on "
                             f"{deployment.socket_path}; stop it first\n")


def test_a_socket_left_by_a_dead_gate_is_replaced(deployment: Deployment, relay: SmtpUpstream) -> None:
    _own_socket_directory(deployment)
    deployment.start_gate(activated=False)
    deployment.stop_gate(signal.SIGKILL)
    assert deployment.socket_path.exists()
    deployment.start_gate(activated=False)
    assert deployment.sendmail("-t", "-i", input=message()).code == 0


@pytest.mark.skipif(not IS_ROOT, reason="the directory's owner matters only with several users")
def test_gate_will_not_listen_where_others_could_replace_the_socket(deployment: Deployment) -> None:
    directory = _own_socket_directory(deployment)
    os.chmod(directory, 0o777)
    with pytest.raises(RuntimeError, match="exited with 78"):
        deployment.start_gate(activated=False)
    assert deployment.gate_errors() == (
        f"sendmail-shim: {directory} can be written by users other than root and the gate, so they could "
        f"replace the socket; run: chown {deployment.users.gate.name} {directory} && chmod 755 {directory}\n")


def test_gate_will_not_start_on_a_ledger_that_is_not_upgraded(deployment: Deployment) -> None:
    deployment.ledger_path.unlink()
    with pytest.raises(RuntimeError, match="exited with 78"):
        deployment.start_gate()
    assert "run: sendmail-shim db upgrade" in deployment.gate_errors()


@needs_users
def test_fifty_callers_at_once_each_message_sent_once(deployment: Deployment, relay: SmtpUpstream) -> None:
    deployment.configure("gate", max_connections_per_uid=50)
    deployment.start_gate()
    gate = deployment
    users = [gate.users.a, gate.users.b]
    accounts = ["post@a.example", "post@b.example"]

    def send(number: int) -> int:
        which = number % 2
        return gate.sendmail("-t", "-i", input=message(accounts[which], subject=f"n{number}"),
                             user=users[which]).code

    with ThreadPoolExecutor(50) as pool:
        codes = list(pool.map(send, range(50)))
    assert codes == [0] * 50
    subjects = sorted(r.headers["subject"][0] for r in relay.wait_for(50))
    assert subjects == sorted(f"n{n}" for n in range(50))
    assert gate.gate is not None
    peak_kb = int(proc_status(gate.gate.pid)["VmHWM"].split()[0])
    assert peak_kb <= 100 * 1024


ADMIN_CLI = "from sendmail_shim.cli import main; main()"


def test_serve_as_root_refuses_to_run_without_a_user_to_become(deployment: Deployment) -> None:
    if not IS_ROOT:
        pytest.skip("needs root")
    env = dict(os.environ, SENDMAIL_SHIM_CONFIG=str(deployment.config_path))
    refused = subprocess.run([ADMIN, "serve"], env=env, capture_output=True, text=True, cwd="/", timeout=60)
    assert refused.returncode == 78
    assert refused.stderr == ("sendmail-shim: the gate will not run as root: start it with --user USER to become "
                              "the gate's own user once the start checks are done (sendmail-shim serve --user "
                              "sendmail-shim, as the packaged unit does), or start it as that user\n")
    assert not deployment.socket_path.exists()


@needs_users
def test_admin_cli_serve_as_root_drops_to_the_gates_user(deployment: Deployment, relay: SmtpUpstream) -> None:
    _own_socket_directory(deployment)
    serve = subprocess.Popen([deployment.python.executable, "-c", ADMIN_CLI, "serve", "--user",
                              deployment.users.gate.name],
                             env=deployment.gate_env(), stderr=subprocess.PIPE, cwd="/")
    try:
        deadline = time.monotonic() + 30
        while not deployment.socket_path.exists() and serve.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert serve.poll() is None, serve.communicate()[1]
        fields = proc_status(serve.pid)
        assert fields["Uid"].split() == [str(deployment.users.gate.uid)] * 4
        assert fields["Gid"].split() == [str(deployment.users.gate.gid)] * 4
        assert fields["Groups"].split() == [] and fields["CapEff"] == "0" * 16
        assert os.stat(deployment.socket_path).st_uid == deployment.users.gate.uid
        assert deployment.sendmail("-t", "-i", input=message()).code == 0
    finally:
        serve.send_signal(signal.SIGTERM)
        _, err = serve.communicate(timeout=30)
    assert serve.returncode == 0, err


# ------------------------------------------------------------------ the unit files


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read(UNITS / name)
    return parser


def test_socket_unit_makes_the_socket_every_site_can_reach_and_none_can_replace() -> None:
    socket_unit = _unit("sendmail-shim-gate.socket")["Socket"]
    assert socket_unit["ListenStream"] == "/run/sendmail-shim/gate.sock"
    assert socket_unit["SocketMode"] == "0666"
    assert socket_unit["DirectoryMode"] == "0755"
    assert socket_unit.get("SocketUser", "root") == "root"


def test_service_unit_runs_the_gate_as_its_own_user_with_the_usual_config() -> None:
    service = _unit("sendmail-shim-gate.service")["Service"]
    # Started as root for the egress probe only; the gate becomes sendmail-shim before it serves
    # (test_admin_cli_serve_as_root_drops_to_the_gates_user shows the process it becomes).
    assert service["ExecStart"].split()[-3:] == ["serve", "--user", "sendmail-shim"]
    assert service["ExecStart"].split()[0].endswith("sendmail-shim")
    assert service.get("User", "root") == "root" and service["Type"] == "notify"
    assert service["CapabilityBoundingSet"].split() == ["CAP_SETUID", "CAP_SETGID"]
    assert service["NoNewPrivileges"] == "yes" and service["RestartPreventExitStatus"] == "78"
    assert service["UMask"] == "0077"
    assert _unit("sendmail-shim-gate.service")["Unit"]["Requires"] == "sendmail-shim-gate.socket"


def test_unit_files_pass_systemd_analyze_verify(tmp_path: Path) -> None:
    analyze, true = shutil.which("systemd-analyze"), shutil.which("true")
    if not analyze or not true:
        pytest.skip("systemd-analyze is not installed")
    names = ["sendmail-shim-gate.socket", "sendmail-shim-gate.service"]
    for name in names:  # the program itself is not installed here; everything else is checked
        text = (UNITS / name).read_text().replace("/usr/bin/sendmail-shim", true)
        (tmp_path / name).write_text(text)
    result = subprocess.run([analyze, "verify", "--man=no", *(str(tmp_path / n) for n in names)],
                            capture_output=True, text=True, timeout=120, cwd=tmp_path,
                            env={**os.environ, "SYSTEMD_LOG_LEVEL": "notice"})
    assert (result.returncode, result.stderr) == (0, "")


@needs_users
def test_a_missing_socket_directory_says_which_ownership_works(deployment: Deployment) -> None:
    directory = deployment.run_dir / "missing"  # in root's 0755 directory: the gate cannot make it
    deployment.configure("gate", socket=str(directory / "gate.sock"))
    with pytest.raises(RuntimeError, match="exited with 78"):
        deployment.start_gate(activated=False)
    gate_user = deployment.users.gate.name
    assert deployment.gate_errors() == (
        f"sendmail-shim: cannot create {directory} (Permission denied); create it owned by the gate's user, "
        f"mode 0755 (run: install -d -o {gate_user} -m 0755 {directory}), or use the packaged systemd units: "
        f"sendmail-shim-gate.socket creates it\n")
    subprocess.run(["install", "-d", "-o", gate_user, "-m", "0755", str(directory)], check=True)
    deployment.socket_path = directory / "gate.sock"
    deployment.start_gate(activated=False)  # the fix it gave works
    assert deployment.sendmail("-t", "-i", input=message()).code == 0


@needs_users
@pytest.mark.parametrize(("mode", "starts"), [(0o777, False), (0o775, False), (0o1777, True)],
                         ids=["world-writable", "group-writable", "sticky like /tmp"])
def test_gate_refuses_a_socket_under_a_parent_others_can_change(deployment: Deployment, mode: int,
                                                                starts: bool) -> None:
    parent = deployment.run_dir / "shared"
    parent.mkdir()
    os.chmod(parent, mode)
    directory = parent / "gate"
    directory.mkdir(mode=0o755)
    deployment.give_to_gate(directory)
    deployment.socket_path = directory / "gate.sock"
    deployment.configure("gate", socket=str(deployment.socket_path))
    if starts:
        deployment.start_gate(activated=False)
        assert deployment.sendmail("-t", "-i", input=message()).code == 0
        return
    with pytest.raises(RuntimeError, match="exited with 78"):
        deployment.start_gate(activated=False)
    assert deployment.gate_errors() == (
        f"sendmail-shim: {parent}, above the socket's directory {directory}, can be changed by other users "
        f"(owner uid 0, mode {mode:04o}), so they could replace the socket's directory; choose a socket under "
        f"a directory only root can change, such as /run/sendmail-shim\n")


def test_the_backlog_is_the_configured_one_capped_by_somaxconn(deployment: Deployment) -> None:
    somaxconn = int(Path("/proc/sys/net/core/somaxconn").read_text())
    directory = _own_socket_directory(deployment)
    for wanted, used in ((64, 64), (65535, min(65535, somaxconn))):
        deployment.configure("gate", backlog=wanted)
        deployment.start_gate(activated=False)
        assert f"backlog={used}" in deployment.wait_for_log(f"backlog={used}")
        deployment.stop_gate()
    assert directory.exists()
