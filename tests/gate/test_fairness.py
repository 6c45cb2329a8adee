"""One customer cannot deny service to another: B's mail goes through while A floods the gate's socket."""

from __future__ import annotations

import statistics
import subprocess
import time

from tests.gate.conftest import needs_users
from tests.gate.deployment import Deployment, message
from tests.support.upstream import SmtpUpstream

pytestmark = needs_users

FLOOD_SECONDS = 15
# A's two flooding processes: connect as fast as the kernel lets them, keep the last 200
# connections open (so A is always over its cap) and let the older ones go.
FLOOD = """
import collections, socket, sys, time
path, until = sys.argv[1], time.monotonic() + float(sys.argv[2])
held, made = collections.deque(), 0
while time.monotonic() < until:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
        made += 1
    except OSError:
        pass
    held.append(sock)
    if len(held) > 200:
        held.popleft().close()
print(made, flush=True)
"""


def _timed_sends(dep: Deployment, count: int) -> list[tuple[int, float, str]]:
    results = []
    for number in range(count):
        started = time.monotonic()
        result = dep.sendmail("-t", "-i", input=message("post@b.example", subject=f"b{number}"), user=dep.users.b)
        results.append((result.code, time.monotonic() - started, result.line))
    return results


def test_a_connect_flood_from_one_customer_does_not_stop_another(deployment: Deployment,
                                                                  relay: SmtpUpstream) -> None:
    deployment.configure("limits", account=["100 messages / 5m"], customer=["100 messages / 5m"])
    gate = deployment
    gate.start_gate()
    quiet = _timed_sends(gate, 20)
    assert [code for code, _, _ in quiet] == [0] * 20, quiet
    median = statistics.median(seconds for _, seconds, _ in quiet)
    flooders = [subprocess.Popen([gate.python.executable, "-c", FLOOD, str(gate.socket_path), str(FLOOD_SECONDS)],
                                 stdout=subprocess.PIPE, env=gate.client_env(), cwd="/",
                                 **gate.users.a.run_options()) for _ in range(2)]
    try:
        time.sleep(1.0)  # the flood is in full swing
        flooded = _timed_sends(gate, 20)
        still_flooding = all(flooder.poll() is None for flooder in flooders)
    finally:
        made = [int(flooder.communicate(timeout=FLOOD_SECONDS + 30)[0] or 0) for flooder in flooders]
    assert still_flooding, "the flood ended before B's sends did: the test proves nothing"
    assert sum(made) > 1000, made  # A really did flood the socket
    assert [(code, line) for code, _, line in flooded] == [(0, "")] * 20
    slowest = max(seconds for _, seconds, _ in flooded)
    assert slowest < 10 * median, (slowest, median, made)
    assert len(relay.wait_for(40)) == 40
    print(f"B without the flood: median {median * 1000:.0f} ms; during A's flood of {sum(made)} connects: "
          f"median {statistics.median(s for _, s, _ in flooded) * 1000:.0f} ms, slowest {slowest * 1000:.0f} ms")
