"""Bounded memory: big uploads wait for a share of [gate] upload_memory, small mail never waits behind them."""

from __future__ import annotations

import base64
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.gate.conftest import needs_users
from tests.gate.deployment import Deployment, Result, message, proc_status
from tests.support.upstream import SmtpUpstream

pytestmark = needs_users

BIG = 10_000_000  # "16 x 10 MB uploads in parallel plus 50 small callers" (PRODUCT.md, Performance)
GOAL_VMHWM_KB = 150 * 1000 * 1000 // 1024
GENEROUS = ["1000 messages / 5m", "1000 recipients / 5m"]


def big_message(number: int, size: int = BIG) -> tuple[bytes, bytes]:
    """A site's upload form with an attachment: (what sendmail gets, the body the upstream must get)."""
    head = (f"From: post@a.example\nTo: ola@x.example\nSubject: upload {number}\nMIME-Version: 1.0\n"
            f"Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\n").encode()
    body = base64.encodebytes(os.urandom((size - len(head)) * 3 // 4 - 1024))
    return head + body, body.replace(b"\n", b"\r\n")


def _timed(dep: Deployment, data: bytes, user: object, program: str = "sendmail") -> tuple[Result, float]:
    started = time.monotonic()
    result = dep.sendmail("-t", "-i", input=data, user=user, timeout=300, program=program)  # type: ignore[arg-type]
    return result, time.monotonic() - started


def test_sixteen_big_uploads_and_fifty_small_callers_stay_within_150_mb(deployment: Deployment,
                                                                        relay: SmtpUpstream) -> None:
    deployment.configure("limits", account=GENEROUS, customer=GENEROUS)
    deployment.configure("gate", request_timeout=120, max_connections_per_uid=64)  # 120: the default
    deployment.start_gate()
    assert deployment.gate is not None
    big = [big_message(number) for number in range(16)]
    small = [message("post@b.example", subject=f"small {number}") for number in range(50)]
    with ThreadPoolExecutor(len(big) + len(small)) as pool:
        uploads = [pool.submit(_timed, deployment, data, deployment.users.a) for data, _ in big]
        time.sleep(1.0)  # the big ones are arriving; the small ones must not queue behind them
        smalls = [pool.submit(_timed, deployment, data, deployment.users.b) for data in small]
        small_results = [future.result() for future in smalls]
        big_results = [future.result() for future in uploads]
    peak_kb = int(proc_status(deployment.gate.pid)["VmHWM"].split()[0])
    assert [(r.code, r.line) for r, _ in big_results] == [(0, "")] * 16
    assert [(r.code, r.line) for r, _ in small_results] == [(0, "")] * 50
    received = relay.wait_for(66, timeout=60)
    by_subject: dict[str, list[bytes]] = {}
    for item in received:
        by_subject.setdefault(item.headers["subject"][0], []).append(item.body)
    assert sorted(by_subject) == sorted([f"upload {n}" for n in range(16)] + [f"small {n}" for n in range(50)])
    for number, (_, body) in enumerate(big):  # exactly once, byte for byte
        assert by_subject[f"upload {number}"] == [body], number
    slowest_small = max(seconds for _, seconds in small_results)
    assert slowest_small < 15, slowest_small  # not behind 16 x 10 MB processed one after another
    assert peak_kb <= GOAL_VMHWM_KB, f"the gate's VmHWM was {peak_kb} kB, over 150 MB"
    print(f"gate VmHWM {peak_kb / 1000:.1f} MB; slowest small caller {slowest_small:.1f} s; "
          f"slowest upload {max(s for _, s in big_results):.1f} s")


HOLDER = """
import socket, struct, sys, time
def frame(kind, payload=b""):
    return kind + struct.pack(">I", len(payload)) + payload
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
sock.recv(5 + 64)
sock.sendall(frame(b"A", b"sendmail") + frame(b"A", b"-t") + frame(b"A", b"-i"))
sock.sendall(frame(b"D", b"From: post@a.example\\nTo: ola@x.example\\nSubject: held\\n\\n"))
for _ in range(30):  # 1.9 MB: large, so it takes the user's share, then it stalls
    sock.sendall(frame(b"D", b"x" * 1000 + b"\\n") * 64)
# All but what the socket buffers hold (well under 0.8 MB) has been read: the share is taken.
open(sys.argv[3], "w").close()
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
sock.settimeout(30)
print(sock.recv(4096)[8:].decode(errors="replace"), flush=True)
"""


@pytest.mark.parametrize("program", ["sendmail", "sendmail-python"])  # the native client, and the Python one
def test_a_user_over_its_upload_cap_waits_then_gets_a_busy_line_and_nothing_is_half_sent(
        deployment: Deployment, relay: SmtpUpstream, program: str) -> None:
    deployment.configure("limits", account=GENEROUS, customer=GENEROUS)
    deployment.configure("gate", request_timeout=8, max_uploads_per_uid=1)
    deployment.start_gate()
    held: list[Result] = []
    marks = deployment.base / "marks"
    marks.mkdir(mode=0o777)
    marks.chmod(0o777)
    holding = marks / "holding"
    code = (HOLDER.replace("sys.argv[1]", repr(str(deployment.socket_path))).replace("sys.argv[2]", "12")
            .replace("sys.argv[3]", repr(str(holding))))
    holder = threading.Thread(target=lambda: held.append(deployment.run_as(deployment.users.a, code, timeout=60)))
    holder.start()
    deadline = time.monotonic() + 20
    while not holding.exists() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert holding.exists(), "the holder never got its message in"
    with ThreadPoolExecutor(2) as pool:
        waiting = pool.submit(_timed, deployment, big_message(1, 2_000_000)[0], deployment.users.a, program)
        other, other_seconds = pool.submit(_timed, deployment, big_message(2, 2_000_000)[0].replace(
            b"post@a.example", b"post@b.example"), deployment.users.b).result()
        refused, waited = waiting.result()
    holder.join(60)
    # The cap is per user: B's large message went through while A's share was held.
    assert (other.code, other.line) == (0, ""), other.stderr
    assert refused.code == 69, (held, deployment.log_lines())
    assert refused.line == (f"sendmail: not sent: the Unix user {deployment.users.a.name} already has 1 large "
                            f"message(s) in progress at the mail gate, the most allowed at once, and this one "
                            f"found no turn in time; try again in a moment")
    assert 4 < waited < 8 + 2, waited  # it waited its turn, and was answered within request_timeout
    assert held and "holding" in held[0].stdout.decode(), held
    assert "not complete within 8 seconds" in held[0].stdout.decode(), held[0].stdout
    time.sleep(1.0)
    subjects = [item.headers["subject"][0] for item in relay.received]
    assert subjects == ["upload 2"], subjects  # neither of A's messages reached the upstream, not a byte
    assert any("verdict=refused" in line and "UploadsBusy" in line for line in deployment.log_lines())
