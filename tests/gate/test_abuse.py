"""Hand-written hostile clients on the gate's socket: cut off, nothing sent, others still served."""

from __future__ import annotations

import socket
import subprocess
import threading
import time

import pytest

from sendmail_shim import gate_protocol as protocol
from tests.gate.conftest import needs_users
from tests.gate.deployment import IS_ROOT, Deployment, message, proc_status
from tests.support.upstream import SmtpUpstream

MESSAGE_FRAMES = (protocol.frame(protocol.ARG, b"sendmail") + protocol.frame(protocol.ARG, b"-t")
                  + protocol.frame(protocol.DATA, message()))


def _greeted(dep: Deployment) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(dep.socket_path))
    kind, payload = protocol.read_frame(sock, time.monotonic() + 10, protocol.GREETING)
    assert payload == protocol.GREETING_TEXT
    return sock


def _answer(sock: socket.socket, timeout: float = 10) -> tuple[protocol.WireVerdict | None, float]:
    """The verdict the gate sent before closing (None if it just closed), and when it closed."""
    started, verdict = time.monotonic(), None
    try:
        _, payload = protocol.read_frame(sock, started + timeout, protocol.VERDICT)
        verdict = protocol.WireVerdict.decode(payload)
        sock.settimeout(timeout)
        assert sock.recv(1) == b""  # and then the connection is closed
    except (protocol.PeerClosed, ConnectionResetError):  # reset: it closed with our bytes unread
        pass
    return verdict, time.monotonic() - started


def _other_site_is_served(dep: Deployment, relay: SmtpUpstream) -> None:
    before = len(relay.received)
    started = time.monotonic()
    result = dep.sendmail("-t", "-i", input=message("post@b.example"), user=dep.users.b)
    assert (result.code, result.line) == (0, "")
    assert len(relay.received) == before + 1 and time.monotonic() - started < 5


HOSTILE_OPENINGS = {
    "length of 2**32-1": protocol.ARG + b"\xff\xff\xff\xff",
    "length of 2**63 (first four bytes)": protocol.ARG + (2**63).to_bytes(8, "big"),
    "unknown frame type": b"Z\x00\x00\x00\x01x",
    "message before the program name": protocol.frame(protocol.DATA, message()),
    "END before anything": protocol.frame(protocol.END),
    "a verdict from the client": protocol.VERDICT + b"\x00\x00\x00\x04\x00\x00\xfa\n",
    "argument over 8 KiB": protocol.ARG + (8193).to_bytes(4, "big") + b"x" * 8193,
    "END carrying data": MESSAGE_FRAMES + protocol.END + b"\x00\x00\x00\x03abc",
}


@pytest.mark.parametrize("opening", list(HOSTILE_OPENINGS), ids=list(HOSTILE_OPENINGS))
def test_malformed_request_is_cut_off_at_once_and_nothing_is_sent(gate: Deployment, relay: SmtpUpstream,
                                                                  opening: str) -> None:
    with _greeted(gate) as sock:
        sock.sendall(HOSTILE_OPENINGS[opening])
        verdict, waited = _answer(sock)
    assert verdict is not None and verdict.code == 76 and "gate protocol" in (verdict.line or "")
    assert waited < 2
    assert relay.received == []
    assert "protocol error" in gate.wait_for_log("gate-request-dropped")
    _other_site_is_served(gate, relay) if IS_ROOT else None


@pytest.mark.parametrize("ending", ["close", "half-close"])
def test_request_without_end_frame_sends_nothing(gate: Deployment, relay: SmtpUpstream, ending: str) -> None:
    with _greeted(gate) as sock:
        sock.sendall(MESSAGE_FRAMES)  # a complete-looking message, but no END
        if ending == "half-close":
            sock.shutdown(socket.SHUT_WR)
            verdict, _ = _answer(sock)
            assert verdict is None
    assert "closed before the end of the request" in gate.wait_for_log("gate-request-dropped")
    time.sleep(0.2)
    assert relay.received == []
    assert "verdict=" not in "".join(gate.log_lines())


@needs_users
def test_slow_client_is_cut_off_while_others_are_served(deployment: Deployment, relay: SmtpUpstream) -> None:
    deployment.configure("gate", request_timeout=2)
    deployment.start_gate()
    outcome: dict[str, object] = {}

    def trickle() -> None:
        with _greeted(deployment) as sock:
            try:
                for byte in MESSAGE_FRAMES:
                    sock.send(bytes([byte]))
                    time.sleep(0.25)
            except OSError:
                pass
            outcome["verdict"], _ = _answer(sock)
            outcome["at"] = time.monotonic()

    started = time.monotonic()
    slow = threading.Thread(target=trickle)
    slow.start()
    time.sleep(0.3)
    _other_site_is_served(deployment, relay)  # while the slow one holds its connection
    slow.join(20)
    verdict = outcome["verdict"]
    assert isinstance(verdict, protocol.WireVerdict) and verdict.code == 69
    assert "not complete within 2 seconds" in (verdict.line or "")
    assert 1.8 < float(outcome["at"]) - started < 6  # type: ignore[arg-type]
    assert len(relay.received) == 1


HOLD_CONNECTIONS = """
import socket, sys, time
from sendmail_shim import gate_protocol as protocol
held, busy, other = [], 0, 0
for _ in range(%(count)d):
    sock = socket.socket(socket.AF_UNIX)
    sock.connect(%(path)r)
    kind, payload = protocol.read_frame(sock, time.monotonic() + 10, protocol.GREETING + protocol.VERDICT)
    if kind == protocol.GREETING:
        held.append(sock)
    elif "the most allowed at once" in protocol.WireVerdict.decode(payload).line:
        busy += 1
    else:
        other += 1
print(len(held), busy, other, flush=True)
sys.stdin.read()
"""


@needs_users
def test_one_user_flooding_connections_is_capped_and_others_are_served(deployment: Deployment,
                                                                       relay: SmtpUpstream) -> None:
    deployment.configure("gate", max_connections_per_uid=3)
    gate_process = deployment.start_gate()
    a = deployment.users.a
    flood = subprocess.Popen(
        [deployment.python.executable, "-c", HOLD_CONNECTIONS % {"count": 300, "path": str(deployment.socket_path)}],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=deployment.client_env(), cwd=str(deployment.base),
        **a.run_options())
    try:
        assert flood.stdout is not None
        assert flood.stdout.readline().split() == [b"3", b"297", b"0"]
        threads = int(proc_status(gate_process.pid)["Threads"])
        # The gate's own five (main, housekeeping, the recorder, the upstream keeper, the reloader)
        # and the held three: none for the 297 refused.
        assert threads <= 5 + 3
        refused = deployment.sendmail("-t", "-i", input=message(), user=a)
        assert refused.code == 69
        assert refused.line == (f"sendmail: not sent: the Unix user {a.name} already has 3 messages in "
                                f"progress at the mail gate, the most allowed at once; try again in a moment")
        _other_site_is_served(deployment, relay)
    finally:
        flood.communicate(b"", timeout=10)
    time.sleep(0.2)  # the gate notices the closed connections
    assert deployment.sendmail("-t", "-i", input=message(), user=a).code == 0


def test_message_over_the_size_limit_is_refused_early(deployment: Deployment, relay: SmtpUpstream) -> None:
    deployment.configure("message", max_size=100_000)
    deployment.start_gate()
    huge = message() + b"x" * 76 + b"\n" * 1  # one line, then a lot more
    huge += (b"y" * 76 + b"\n") * 60_000  # about 4.6 MB
    started = time.monotonic()
    result = deployment.sendmail("-t", "-i", input=huge, measure_rss=True)
    assert result.code == 65
    assert result.line == ("sendmail: not sent: the message is larger than the limit of 100000 bytes; "
                           "send large files as links")
    assert time.monotonic() - started < 5
    assert relay.received == []
    assert result.max_rss_kb < 20 * 1024
