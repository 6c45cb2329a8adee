"""Prometheus metrics from a running gate: scraped over HTTP as Prometheus does, checked by promtool,
and read back after a known set of sends; the UNIX socket variant, and what the gate refuses."""

from __future__ import annotations

import grp
import socket
import stat
import time
import urllib.error
import urllib.request

import pytest

from tests.gate.conftest import needs_users
from tests.gate.deployment import Deployment, message, run_process
from tests.support.prometheus import Samples, check_metrics, label_values, parse, value


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def scrape(port: int, path: str = "/metrics") -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as answer:
            return answer.status, answer.headers["Content-Type"], answer.read().decode()
    except urllib.error.HTTPError as refused:
        return refused.code, refused.headers["Content-Type"], refused.read().decode()


def scrape_until(port: int, name: str, total: float, timeout: float = 10) -> tuple[str, Samples]:
    """The counters are updated just after each caller has its answer: scrape until they add up."""
    deadline = time.monotonic() + timeout
    while True:
        text = scrape(port)[2]
        samples = parse(text)
        found = sum(v for (n, _), v in samples.items() if n == name)
        if found >= total or time.monotonic() > deadline:
            return text, samples
        time.sleep(0.05)


def to_two(subject: str, sender: str = "post@a.example") -> bytes:
    return (f"From: {sender}\nTo: ola@x.example, kari@y.example\nSubject: {subject}\n\nHei.\n").encode()


@needs_users
def test_the_scraped_counters_match_a_known_set_of_sends(deployment: Deployment) -> None:
    port = free_port()
    deployment.configure("metrics", listen=f"127.0.0.1:{port}", top_customers=5)
    deployment.configure("limits", account=["3 messages / 5m"])
    deployment.start_gate()
    for n in range(3):
        assert deployment.sendmail("-t", "-i", input=to_two(f"ok {n}")).code == 0
    unknown = deployment.sendmail("-t", "-i", input=to_two("who", sender="nobody@a.example"))
    assert unknown.code == 67
    over = deployment.sendmail("-t", "-i", input=to_two("one too many"))
    assert over.code == 69 and "3 messages per 5 minutes" in over.line

    text, samples = scrape_until(port, "sendmail_shim_messages_total", 5)
    checked = check_metrics(text)
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")
    assert value(samples, "sendmail_shim_messages_total", verdict="sent") == 3
    assert value(samples, "sendmail_shim_messages_total", verdict="refused", stage="UnknownAccount") == 1
    assert value(samples, "sendmail_shim_messages_total", verdict="refused", stage="LimitReached") == 1
    assert sum(v for (n, _), v in samples.items() if n == "sendmail_shim_messages_total") == 5
    assert value(samples, "sendmail_shim_recipients_total", verdict="sent") == 6
    assert value(samples, "sendmail_shim_recipients_total", verdict="refused") == 4
    assert value(samples, "sendmail_shim_gate_connections_total", outcome="accepted") == 5
    # Every message reached a verdict; the three sent and the one over the limit met the ledger.
    assert value(samples, "sendmail_shim_decision_duration_seconds_count") == 5
    assert value(samples, "sendmail_shim_upstream_duration_seconds_count") == 3
    assert value(samples, "sendmail_shim_ledger_reservation_duration_seconds_count") == 4
    assert value(samples, "sendmail_shim_upstream_duration_seconds_bucket", le="+Inf") == 3
    assert value(samples, "sendmail_shim_gate_connections_active") == 0
    assert value(samples, "sendmail_shim_build_info", version=__import__("sendmail_shim").__version__) == 1
    assert abs(value(samples, "sendmail_shim_gate_start_time_seconds") - time.time()) < 120
    # What the ledger holds now: customer ka's three messages of 250 per hour, six recipients.
    assert value(samples, "sendmail_shim_ledger_up") == 1
    assert value(samples, "sendmail_shim_customer_usage", customer="ka", rule="250 messages / 1h") == 3
    assert value(samples, "sendmail_shim_customer_usage", customer="ka", rule="1500 recipients / 1h") == 6
    assert value(samples, "sendmail_shim_customer_usage_ratio", customer="ka",
                 rule="250 messages / 1h") == pytest.approx(3 / 250)
    assert value(samples, "sendmail_shim_queue_messages", state="queued") == 0


@needs_users
def test_the_endpoint_answers_only_metrics_and_says_its_format(deployment: Deployment) -> None:
    port = free_port()
    deployment.configure("metrics", listen=f"127.0.0.1:{port}")
    deployment.start_gate()
    status, content_type, text = scrape(port)
    assert (status, content_type) == (200, "text/plain; version=0.0.4; charset=utf-8")
    assert check_metrics(text).returncode == 0
    assert scrape(port, "/")[0] == 404
    assert scrape(port, "/metrics/../etc/passwd")[0] == 404
    assert deployment.wait_for_log("event=gate-start") and f"metrics=127.0.0.1:{port}" in \
        deployment.wait_for_log("event=gate-start")


@needs_users
def test_a_scraper_that_never_finishes_its_request_does_not_hold_the_gate(deployment: Deployment) -> None:
    port = free_port()
    deployment.configure("metrics", listen=f"127.0.0.1:{port}")
    deployment.start_gate()
    stalled = [socket.create_connection(("127.0.0.1", port)) for _ in range(6)]
    try:
        for sock in stalled:
            sock.sendall(b"GET /metrics HTTP/1.1\r\n")  # and never the blank line
        started = time.monotonic()
        assert deployment.sendmail("-t", "-i", input=message()).code == 0  # the gate serves its callers
        assert time.monotonic() - started < 5
        # Four slots are held; the rest were answered 503 at once, and the stalled ones time out.
        stalled[-1].settimeout(10)
        assert stalled[-1].recv(100).startswith(b"HTTP/1.0 503")
        stalled[0].settimeout(10)
        assert stalled[0].recv(100).startswith(b"HTTP/1.0 408")
    finally:
        for sock in stalled:
            sock.close()
    assert scrape(port)[0] == 200


@needs_users
def test_metrics_on_a_unix_socket_are_for_the_gates_group_not_the_sites(deployment: Deployment) -> None:
    directory = deployment.base / "metrics"
    directory.mkdir(mode=0o755)
    deployment.give_to_gate(directory)
    path = directory / "metrics.sock"
    deployment.configure("metrics", listen=str(path))
    deployment.start_gate()
    info = path.stat()
    assert stat.S_ISSOCK(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o660
    assert (info.st_uid, info.st_gid) == (deployment.users.gate.uid, deployment.users.gate.gid)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as scraper:
        scraper.settimeout(10)
        scraper.connect(str(path))
        scraper.sendall(b"GET /metrics HTTP/1.0\r\nHost: localhost\r\n\r\n")
        answer = b""
        while chunk := scraper.recv(65536):
            answer += chunk
    head, _, body = answer.decode().partition("\r\n\r\n")
    assert head.startswith("HTTP/1.0 200 OK")
    assert check_metrics(body).returncode == 0
    assert "sendmail_shim_messages_total" in body or "sendmail_shim_gate_connections_total" in body
    site = deployment.run_as(deployment.users.a, (
        "import socket, sys\n"
        "s = socket.socket(socket.AF_UNIX)\n"
        f"try:\n    s.connect({str(path)!r})\nexcept PermissionError:\n    sys.exit(13)\n"))
    assert site.code == 13, site.stderr  # a site's user is not in the gate's group
    assert grp.getgrgid(info.st_gid).gr_name == grp.getgrgid(deployment.users.gate.gid).gr_name
    deployment.stop_gate()
    assert not path.exists()  # the gate removes its own socket when it stops


@needs_users
def test_a_non_loopback_address_is_refused_by_config_check_and_by_the_gate(deployment: Deployment) -> None:
    deployment.configure("metrics", listen="0.0.0.0:9525")
    check = deployment.admin("config", "check")
    assert check.code == 78
    assert f"{deployment.config_path}: metrics.listen: 0.0.0.0 is not a loopback address" in check.stderr
    with pytest.raises(RuntimeError, match="exited with 78"):
        deployment.start_gate()
    assert "metrics.listen: 0.0.0.0 is not a loopback address" in deployment.gate_errors()


@needs_users
def test_a_port_in_use_stops_the_start_with_a_clear_line(deployment: Deployment) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        deployment.configure("metrics", listen=f"127.0.0.1:{port}")
        with pytest.raises(RuntimeError, match="exited with 78"):
            deployment.start_gate()
    assert f"[metrics] listen: cannot listen on 127.0.0.1:{port} (Address already in use)" in deployment.gate_errors()


@needs_users
def test_a_reload_keeps_the_listen_address_and_counts_itself(deployment: Deployment) -> None:
    import signal

    port = free_port()
    deployment.configure("metrics", listen=f"127.0.0.1:{port}")
    deployment.start_gate()
    deployment.configure("metrics", listen=f"127.0.0.1:{free_port()}", top_customers=1)
    assert deployment.gate is not None
    deployment.gate.send_signal(signal.SIGHUP)
    line = deployment.wait_for_log("event=gate-reload-needs-restart", timeout=20)
    assert "metrics.listen" in line
    _, samples = scrape_until(port, "sendmail_shim_gate_reloads_total", 1)
    assert value(samples, "sendmail_shim_gate_reloads_total", result="applied") == 1
    # top_customers took effect at once: one customer named, the other as (other).
    time.sleep(10.5)  # the ledger's figures are read at most every 10 s
    named = label_values(parse(scrape(port)[2]), "sendmail_shim_customer_usage", "customer")
    assert named == {"ka", "(other)"} or named == {"kb", "(other)"}


@needs_users
def test_started_as_root_the_gate_makes_its_metrics_socket_in_roots_run_directory(deployment: Deployment) -> None:
    """As the packaged unit starts it: /run/sendmail-shim is root's, the socket the gate user's."""
    path = deployment.run_dir / "metrics.sock"  # run/ is root's, mode 0755, as systemd makes it
    deployment.configure("metrics", listen=str(path))
    deployment.start_gate(as_root=True)
    info = path.stat()
    assert (info.st_uid, info.st_gid, stat.S_IMODE(info.st_mode)) == (
        deployment.users.gate.uid, deployment.users.gate.gid, 0o660)
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as scraper:
        scraper.settimeout(10)
        scraper.connect(str(path))
        scraper.sendall(b"GET /metrics HTTP/1.0\r\n\r\n")
        answer = scraper.makefile("rb").read().decode()
    assert answer.startswith("HTTP/1.0 200 OK") and "sendmail_shim_gate_start_time_seconds" in answer


def test_spf_cache_lookups_are_counted_as_hits_and_misses() -> None:
    from sendmail_shim.gate.instruments import CountingSpfCache, GateMetrics
    from sendmail_shim.spf import MemoryVerdictCache

    metrics = GateMetrics(lambda: None)  # type: ignore[arg-type,return-value] - the ledger is not read here
    cache = CountingSpfCache(MemoryVerdictCache(), metrics)
    now = time.time()
    assert cache.get("kunde.example", "192.0.2.25", now) is None
    cache.put("kunde.example", "192.0.2.25", "pass", now + 60)
    assert cache.get("kunde.example", "192.0.2.25", now) == "pass"
    assert cache.get("kunde.example", "192.0.2.25", now + 61) is None  # expired: a miss
    assert (metrics.spf_lookups.value("hit"), metrics.spf_lookups.value("miss")) == (1, 2)


HOLD_AND_KNOCK = """
import socket, sys
first = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
first.connect(sys.argv[1])
first.recv(100)  # the greeting: this connection is the Unix user's one slot now
second = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
second.connect(sys.argv[1])
second.settimeout(10)
print(second.recv(4096)[:200])
"""


@needs_users
def test_callers_turned_away_and_requests_cut_short_are_counted(deployment: Deployment) -> None:
    port = free_port()
    deployment.configure("metrics", listen=f"127.0.0.1:{port}")
    deployment.configure("gate", max_connections_per_uid=1)
    deployment.start_gate()
    site = run_process([deployment.python.executable, "-c", HOLD_AND_KNOCK, str(deployment.socket_path)],
                       env=deployment.client_env(), cwd="/", options=deployment.users.a.run_options())
    assert site.code == 0 and b"already has 1 messages in progress" in site.stdout, (site.stdout, site.stderr)
    _, samples = scrape_until(port, "sendmail_shim_gate_requests_dropped_total", 1)
    assert value(samples, "sendmail_shim_gate_connections_total", outcome="busy") == 1
    assert value(samples, "sendmail_shim_gate_connections_total", outcome="accepted") == 1
    assert value(samples, "sendmail_shim_gate_requests_dropped_total", reason="closed") == 1
    assert value(samples, "sendmail_shim_messages_total", verdict="sent") == 0
