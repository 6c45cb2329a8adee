"""The client checks who answers on the socket, bounds its arguments, and waits out a full backlog."""

from __future__ import annotations

import hashlib
import json
import os
import socket
import subprocess
import time

import pytest

from sendmail_shim import gate_protocol as protocol
from tests.gate.conftest import needs_users
from tests.gate.deployment import Deployment, message
from tests.support.upstream import SmtpUpstream

# A fake gate as a site's user would run it: the real greeting, then it records every byte it hears.
FAKE_GATE = """
import os, socket, sys, time
from sendmail_shim import gate_protocol as protocol
path = sys.argv[1]
server = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
server.bind(path)
os.chmod(path, 0o666)
server.listen(16)
print("listening", flush=True)
heard, connections = 0, 0
server.settimeout(float(sys.argv[2]))
try:
    while True:
        conn, _ = server.accept()
        connections += 1
        conn.settimeout(2)
        try:
            conn.sendall(protocol.frame(protocol.GREETING, protocol.GREETING_TEXT))
            while chunk := conn.recv(65536):
                heard += len(chunk)
        except OSError:
            pass
        conn.close()
except TimeoutError:
    pass
print(connections, heard, flush=True)
"""


@needs_users
def test_a_fake_gate_of_another_user_receives_nothing(deployment: Deployment, relay: SmtpUpstream) -> None:
    # The site has got the socket's place (say, by swapping a directory it could write): its own gate listens.
    site = deployment.users.c
    deployment.run_dir.rmdir()
    deployment.run_dir.mkdir(mode=0o755)
    os.chown(deployment.run_dir, site.uid, site.gid)
    fake = subprocess.Popen([deployment.python.executable, "-c", FAKE_GATE, str(deployment.socket_path), "3"],
                            stdout=subprocess.PIPE, env=deployment.client_env(), cwd="/", **site.run_options())
    assert fake.stdout is not None and fake.stdout.readline() == b"listening\n"
    secret = message("post@b.example", subject="the victim's secret")
    result = deployment.sendmail("-t", "-i", input=secret, user=deployment.users.b)
    full = deployment.sendmail("-t", "-i", input=secret, user=deployment.users.b, full=True)
    counts = fake.communicate(timeout=30)[0].split()
    assert result.code == full.code == 69
    assert result.line == full.line == (
        f"sendmail: not sent: the process answering on {deployment.socket_path} runs as uid {site.uid}, not as the "
        f"mail gate's user (uid {deployment.users.gate.uid}); nothing was sent; tell the administrator")
    assert counts == [b"2", b"0"]  # connected to, but not one byte of argv or the message
    assert relay.received == []


def test_gate_user_naming_nobody_is_a_configuration_error(gate: Deployment) -> None:
    gate.configure("gate", user="no-such-gate-user")
    result = gate.sendmail("-t", "-i", input=message())
    assert result.code == 78
    assert result.line == ("sendmail: not sent: configuration error: [gate] user: no Unix user named "
                           "no-such-gate-user; the administrator must fix it")


def _argv_line(byte_count: int | None = None, count: int | None = None) -> str:
    if byte_count is not None:
        return f"sendmail: argument list too long ({byte_count} bytes; at most {protocol.MAX_ARGV_BYTES})"
    return f"sendmail: argument list too long ({count} arguments; at most {protocol.MAX_ARGS})"


@pytest.mark.parametrize("full", [False, True], ids=["sendmail", "full front end"])
def test_an_oversize_argument_list_is_64_and_nothing_is_connected(gate: Deployment, relay: SmtpUpstream,
                                                                  full: bool) -> None:
    many = [f"r{n}@x.example" for n in range(4096)]  # with argv[0]: 4097 frames
    long = ["-t", *("x" * 8000 for _ in range(40))]
    launcher = "sendmail-full" if full else "sendmail"
    by_count = gate.sendmail(*many, input=message(), full=full)
    assert (by_count.code, by_count.line) == (64, _argv_line(count=4097))
    by_bytes = gate.sendmail(*long, input=message(), full=full)
    total = len(launcher) + 2 + 40 * 8000
    assert (by_bytes.code, by_bytes.line) == (64, _argv_line(byte_count=total))
    assert relay.received == [] and not [line for line in gate.log_lines() if "uid=" in line and "verdict" in line]


def _greeted(dep: Deployment) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(dep.socket_path))
    protocol.read_frame(sock, time.monotonic() + 10, protocol.GREETING)
    return sock


@pytest.mark.parametrize(("frames", "line"), [
    ([b"sendmail"] * 4097, _argv_line(count=4097)),
    ([b"sendmail"] + [b"y" * 8192] * 32, _argv_line(byte_count=8 + 32 * 8192)),
])
def test_the_gate_answers_an_oversize_argument_list_with_64(gate: Deployment, relay: SmtpUpstream,
                                                            frames: list[bytes], line: str) -> None:
    with _greeted(gate) as sock:
        sock.sendall(b"".join(protocol.frame(protocol.ARG, f) for f in frames)
                     + protocol.frame(protocol.DATA, message()) + protocol.frame(protocol.END))
        _, payload = protocol.read_frame(sock, time.monotonic() + 10, protocol.VERDICT)
    verdict = protocol.WireVerdict.decode(payload)
    assert (verdict.code, f"sendmail: {verdict.line}") == (64, line)
    assert relay.received == []


def test_status_is_answered_to_root_and_refused_to_a_site(gate: Deployment) -> None:
    with _greeted(gate) as sock:
        sock.sendall(protocol.frame(protocol.QUERY, b"status"))
        _, payload = protocol.read_frame(sock, time.monotonic() + 10, protocol.STATUS)
    status = json.loads(payload)
    assert status["config"]["path"] == str(gate.config_path)
    assert status["config"]["sha256"] == hashlib.sha256(gate.config_path.read_bytes()).hexdigest()
    assert status["config"]["loaded_at"].endswith("Z") and status["started_at"].endswith("Z")
    assert status["pid"] == gate.gate.pid if gate.gate else False
    assert status["trust"] == {"state": "verified", "mode": "auth"}
    assert "password" not in payload.decode() and "relay-user" not in payload.decode()
    asked = gate.run_as(gate.users.a, f"""
import socket, time
from sendmail_shim import gate_protocol as protocol
sock = socket.socket(socket.AF_UNIX)
sock.connect({str(gate.socket_path)!r})
protocol.read_frame(sock, time.monotonic() + 10, protocol.GREETING)
sock.sendall(protocol.frame(protocol.QUERY, b"status"))
kind, payload = protocol.read_frame(sock, time.monotonic() + 10, protocol.STATUS + protocol.VERDICT)
print(kind.decode(), protocol.WireVerdict.decode(payload).line if kind == protocol.VERDICT else payload)
""")
    if gate.users.a.uid != gate.users.gate.uid:
        assert asked.stdout.decode().strip() == "V not answered: only root and the gate's user may ask the gate"


def _fill_backlog(path: str) -> list[socket.socket]:
    """Connect without being accepted until the kernel says the backlog is full."""
    held = []
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.setblocking(False)
        try:
            sock.connect(path)
        except BlockingIOError:
            sock.close()
            return held
        held.append(sock)


def test_a_backlog_full_for_the_whole_timeout_is_busy_not_down(deployment: Deployment) -> None:
    deployment.configure("gate", request_timeout=1)
    listener = deployment.hold_socket()  # nobody accepts: as a gate too busy to take new callers
    held = _fill_backlog(str(deployment.socket_path))
    try:
        started = time.monotonic()
        result = deployment.sendmail("-t", "-i", input=message())
        waited = time.monotonic() - started
    finally:
        for sock in held:
            sock.close()
    assert result.code == 69
    assert result.line == (f"sendmail: not sent: the mail gate at {deployment.socket_path} is busy (no connection "
                           f"slot for 1 s); try again in a moment")
    assert 1.0 <= waited < 5
    assert listener.fileno() >= 0


def test_a_caller_waits_out_a_full_backlog_and_is_served(deployment: Deployment, relay: SmtpUpstream) -> None:
    held = _fill_backlog(str(deployment.hold_socket().getsockname()))
    waiting = subprocess.Popen([str(deployment.bin / "sendmail"), "-t", "-i"], stdin=subprocess.PIPE,
                               stderr=subprocess.PIPE, env=deployment.client_env(), cwd=str(deployment.base),
                               **deployment.users.a.run_options())
    assert waiting.stdin is not None
    waiting.stdin.write(message(subject="patient"))
    waiting.stdin.close()
    time.sleep(1.0)
    assert waiting.poll() is None  # retrying, not refused
    deployment.start_gate()  # takes the backlog: the held connections, then the caller's
    for sock in held:
        sock.close()
    assert waiting.wait(30) == 0, waiting.stderr.read() if waiting.stderr else ""
    assert [r.headers["subject"] for r in relay.wait_for(1)] == [["patient"]]
