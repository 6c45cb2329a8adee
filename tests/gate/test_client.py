"""The thin ``sendmail`` client: what the site sees, what the client loads, and gate faults.

Every test here runs against each client a site may meet: the Python fast path, the
native client, and the native client built with AddressSanitizer and UBSan.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from sendmail_shim import config as config_module
from sendmail_shim import gate_client, invocation
from sendmail_shim.invocation import parse_argv
from tests.gate.conftest import CLIENT_NAMES, pick_client
from tests.gate.deployment import IS_ROOT, Client, Deployment, message
from tests.support.shim import dump_toml
from tests.support.upstream import SmtpUpstream, free_port

GATE_DOWN = ("sendmail: not sent: the mail gate is not running (cannot connect to {path}: {reason}); "
             "try again later, and tell the administrator if it persists")
HEAVY_MODULES = ("sqlalchemy", "click", "dns", "psycopg", "smtplib", "ssl", "email", "sqlite3",
                 "sendmail_shim.pipeline", "sendmail_shim.ledger", "sendmail_shim.relay",
                 "sendmail_shim.spf", "sendmail_shim.message")


@pytest.fixture(params=CLIENT_NAMES)
def client(request: pytest.FixtureRequest, native_clients: dict[str, Client]) -> Client:
    return pick_client(request.param, native_clients)


def _decisions(dep: Deployment) -> list[str]:
    return [line for line in dep.log_lines() if "verdict=" in line]


# ------------------------------------------------------------------ gate down


def test_gate_not_running_is_69_and_nothing_is_sent_in_process(deployment: Deployment,
                                                               relay: SmtpUpstream) -> None:
    ledger_before = deployment.ledger_path.stat().st_mtime_ns
    result = deployment.sendmail("-t", "-i", input=message())
    assert result.code == 69
    assert result.line == GATE_DOWN.format(path=deployment.socket_path, reason="No such file or directory")
    assert relay.received == [] and _decisions(deployment) == []
    assert deployment.ledger_path.stat().st_mtime_ns == ledger_before


def test_socket_left_by_a_dead_gate_is_69(deployment: Deployment, relay: SmtpUpstream) -> None:
    deployment.hold_socket().close()  # the file stays; nobody listens
    result = deployment.sendmail("-t", "-i", input=message())
    assert result.code == 69
    assert result.line == GATE_DOWN.format(path=deployment.socket_path, reason="Connection refused")
    assert relay.received == []


def _start_client(dep: Deployment, *args: str) -> subprocess.Popen[bytes]:
    return subprocess.Popen([str(dep.bin / "sendmail"), *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=dep.client_env(), cwd=str(dep.base),
                            **dep.users.a.run_options())


def _wait_for_connection(dep: Deployment, pid: int) -> None:
    """Until the client has its socket to the gate open."""
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            for fd in os.listdir(f"/proc/{pid}/fd"):
                if os.readlink(f"/proc/{pid}/fd/{fd}").startswith("socket:"):
                    return
        except OSError:
            pass
        time.sleep(0.02)
    raise AssertionError("the client never connected")


def test_gate_killed_while_receiving_is_69_and_nothing_is_sent(gate: Deployment, relay: SmtpUpstream) -> None:
    client = _start_client(gate, "-t", "-i")
    assert client.stdin is not None
    client.stdin.write(message()[:30])
    client.stdin.flush()
    _wait_for_connection(gate, client.pid)
    gate.stop_gate(signal.SIGKILL)
    _, err = client.communicate(message()[30:], timeout=30)
    assert client.returncode == 69
    assert err.decode() == ("sendmail: not sent: the mail gate closed the connection before answering; "
                            "try again, and tell the administrator if it keeps happening\n")
    assert relay.received == []


def test_client_killed_while_sending_sends_and_charges_nothing(gate: Deployment, relay: SmtpUpstream) -> None:
    client = _start_client(gate, "-t", "-i")
    assert client.stdin is not None
    client.stdin.write(message()[:-5])  # all but the end of the body
    client.stdin.flush()
    _wait_for_connection(gate, client.pid)
    time.sleep(0.3)  # the part written has reached the gate
    client.kill()
    client.communicate(timeout=10)
    assert "closed before the end of the request" in gate.wait_for_log("gate-request-dropped")
    assert relay.received == [] and _decisions(gate) == []
    usage = gate.admin("usage", "--account", "post@a.example", "--json")
    assert '"used": 0' in usage.stdout.decode() and '"used": 1' not in usage.stdout.decode()


# ------------------------------------------------------------------ what the client is


@pytest.mark.parametrize("client", ["python"], indirect=True)
@pytest.mark.parametrize("full", [False, True], ids=["sendmail", "full front end"])
def test_client_loads_only_the_standard_library_and_no_secrets(gate: Deployment, relay: SmtpUpstream,
                                                                full: bool) -> None:
    env = gate.client_env(PYTHONPROFILEIMPORTTIME="1")
    result = gate.sendmail("-t", "-i", input=message(), env=env, full=full)
    assert result.code == 0
    imported = {line.split("|")[-1].strip() for line in result.stderr.splitlines()
                if line.startswith("import time:")}
    assert "sendmail_shim.gate_client" in imported
    loaded_heavy = {name for name in imported for heavy in HEAVY_MODULES
                    if name == heavy or name.startswith(heavy + ".")}
    assert loaded_heavy == set()
    assert len(relay.received) == 1


@pytest.mark.parametrize("client", ["native", "native-asan"], indirect=True)
def test_native_client_starts_no_python_on_the_gate_path(gate: Deployment, relay: SmtpUpstream) -> None:
    result = gate.sendmail("-t", "-i", input=message(), env=gate.client_env(PYTHONPROFILEIMPORTTIME="1"))
    assert (result.code, result.stderr) == (0, "")  # not one "import time:" line: no interpreter ran
    assert len(relay.received) == 1


# The Python fast path's bound, and the native client's goal (docs/performance.md). The sanitizers'
# shadow memory is theirs, not the client's: that build is held to no bound.
PEAK_RSS_KB = {"python": 20 * 1024, "native": 2 * 1024}


def test_client_peak_memory_stays_small_for_a_large_message(gate: Deployment, relay: SmtpUpstream,
                                                            client: Client) -> None:
    big = message() + (b"z" * 76 + b"\n") * 65_000  # about 5 MB, streamed in pieces
    result = gate.sendmail("-t", "-i", input=big, measure_rss=True)
    assert (result.code, result.line) == (0, "")
    assert len(relay.received[0].data) > 5_000_000
    if client.name in PEAK_RSS_KB:
        assert 0 < result.max_rss_kb <= PEAK_RSS_KB[client.name]


def test_smtp_dialogue_through_the_gate(gate: Deployment, relay: SmtpUpstream) -> None:
    dialogue = (b"HELO site.example\r\n"
                b"MAIL FROM:<post@a.example>\r\nRCPT TO:<ola@x.example>\r\nDATA\r\n"
                b"From: post@a.example\r\nSubject: one\r\n\r\nfirst\r\n.\r\n"
                b"MAIL FROM:<post@b.example>\r\nRCPT TO:<ola@x.example>\r\nDATA\r\n"
                b"From: post@b.example\r\nSubject: two\r\n\r\nsecond\r\n.\r\n"
                b"QUIT\r\n")
    result = gate.sendmail("-bs", input=dialogue)
    replies = result.stdout.decode().splitlines()
    assert result.code == 0 and replies[0].startswith("220 ")
    after_data = [replies[i + 1] for i, line in enumerate(replies) if line.startswith("354 ")]
    assert after_data[0].startswith("250 2.0.0 sent")
    assert after_data[1].startswith("550 5.7.1 ") and "post@b.example" in after_data[1]
    assert [r.mail_from for r in relay.received] == ["post@a.example"]  # B's account is not A's
    assert str(gate.users.a.uid) in relay.received[0].headers["received"][0]


def test_smtp_dialogue_with_the_gate_down_answers_451_and_goes_on(deployment: Deployment) -> None:
    dialogue = (b"EHLO site.example\r\nMAIL FROM:<post@a.example>\r\nRCPT TO:<ola@x.example>\r\n"
                b"DATA\r\nFrom: post@a.example\r\n\r\nbody\r\n.\r\nNOOP\r\nQUIT\r\n")
    result = deployment.sendmail("-bs", input=dialogue)
    replies = result.stdout.decode().splitlines()
    assert replies[0].startswith("220 ")
    assert any(line.startswith("451 4.3.0 not sent: the mail gate is not running") for line in replies)
    assert replies[-2:] == ["250 2.0.0 ok", replies[-1]] and replies[-1].startswith("221 ")


# ------------------------------------------------------------------ the gate ignores the caller's config


@pytest.mark.skipif(not IS_ROOT, reason="a site's own config file needs a site user")
def test_gate_ignores_the_config_the_caller_points_sendmail_at(gate: Deployment, relay: SmtpUpstream,
                                                               tmp_path: Path) -> None:
    own = Path(gate.base / "site-config.toml")
    sections = dict(gate.sections, upstream={"host": "127.0.0.1", "port": free_port()},
                    gate={"socket": str(gate.socket_path), "user": gate.users.gate.name, "allow_unbound": True},
                    message={"max_size": 1024 * 1024 * 1024})
    own.write_text(dump_toml(sections))
    os.chmod(own, 0o644)
    env = gate.client_env(SENDMAIL_SHIM_CONFIG=str(own))
    result = gate.sendmail("-t", "-i", input=message(), env=env, user=gate.users.c)
    assert result.code == 77  # allow_unbound in the caller's file changes nothing
    sent = gate.sendmail("-t", "-i", input=message(), env=env)
    assert sent.code == 0 and len(relay.received) == 1  # the gate's upstream, not the caller's


# ------------------------------------------------------------------ both clients, one gate


@pytest.mark.parametrize("client", ["native"], indirect=True)
@pytest.mark.parametrize(("args", "stdin"), [
    (["-t", "-i"], message()),
    (["-t", "-i"], message("post@b.example")),  # not A's account: 77
    (["-t", "-i"], b""),  # 66
    (["-t", "-i"], b"Subject: no sender\n\nbody\n"),
    (["-oi", "-f", "post@a.example", "ola@x.example"], message()),
    (["-X", "/tmp/log", "ola@x.example"], message()),  # refused options: 64
    (["-be", "${run{/bin/true}}"], message()),
    (["-q"], b""),
    (["-t", "-i"], message() + b"\x00"),  # a NUL byte: 65
    (["-i", "-f", "", "ola@x.example"], message()),
])
def test_both_clients_get_the_same_answer_from_the_gate(gate: Deployment, relay: SmtpUpstream,
                                                         args: list[str], stdin: bytes) -> None:
    results = {program: gate.sendmail(*args, input=stdin, program=program)
               for program in ("sendmail-python", "sendmail-native", "sendmail-native-asan")}
    assert len({(r.code, r.stderr, r.stdout) for r in results.values()}) == 1, results
    sent = [r for r in relay.received]
    assert len(sent) in (0, 3) and len({(m.mail_from, tuple(m.rcpt_tos)) for m in sent}) <= 1


# ------------------------------------------------------------------ fast path and argv round trip


@pytest.mark.parametrize("args", [
    ["-X", "/tmp/log", "ola@x.example"],
    ["-C/etc/passwd", "ola@x.example"],
    ["-be", "${run{/bin/true}}"],
    ["-q"],
    ["--bogus"],
])
def test_fast_path_refusals_match_the_full_front_end(gate: Deployment, relay: SmtpUpstream, args: list[str]) -> None:
    full = gate.sendmail(*args, input=message(), full=True)
    fast = gate.sendmail(*args, input=message())  # the client under test
    assert full.code == fast.code == 64
    assert fast.line == full.line
    assert relay.received == []


def test_fast_path_leaves_smtp_mode_help_and_version_to_the_full_front_end(gate: Deployment) -> None:
    version = gate.sendmail("--version")
    assert version.code == 0 and version.stdout.startswith(b"sendmail-shim ")
    session = gate.sendmail("-bs", input=b"QUIT\r\n")
    assert session.stdout.startswith(b"220 ") and b"221 " in session.stdout


@pytest.mark.parametrize("argv", [
    ["-t", "-i"],
    ["-oi", "-t", "extra@x.example"],
    ["-fpost@a.example", "-FKunde AS", "ola@x.example, Per <per@x.example>"],
    ["-r", "post@a.example", "-B8BITMIME", "-N", "success,failure", "-R", "hdrs", "-V", "env-1", "-t"],
    ["-f", "-not-an-option@a.example", "--", "-oQ/tmp@x.example"],
    ["-F", "", "-f", "", "ola@x.example"],
    ["-odb", "-oem", "-v", "-L", "tag", "-h", "3", "-Am", "-G", "-U", "ola@x.example"],
])
def test_arguments_sent_to_the_gate_parse_to_the_same_request(argv: list[str]) -> None:
    original = parse_argv(argv)
    rebuilt = parse_argv(gate_client.invocation_argv(original))
    assert rebuilt == original.__class__(**{**original.__dict__, "ignored": ()})


@pytest.mark.parametrize(("argv", "full"), [
    (["-t", "-i"], False),
    (["-fbob@b.example", "-t"], False),
    (["-f", "-bs", "ola@x.example"], False),
    (["ola@x.example", "-bs"], False),
    (["-bs"], True),
    (["-ibs"], True),
    (["-t", "-bm"], True),
    (["--help"], True),
    (["-i", "--version"], True),
])
def test_fast_path_knows_when_the_full_front_end_is_needed(argv: list[str], full: bool) -> None:
    assert gate_client.needs_full_front_end(argv) is full


def test_fast_path_agrees_with_the_full_parser_and_config_names() -> None:
    assert gate_client.VALUE_OPTION_LETTERS == invocation._VALUE_OPTIONS
    assert gate_client.CONFIG_ENV_VAR == config_module.ENV_VAR
    assert gate_client.DEFAULT_CONFIG_PATH == config_module.DEFAULT_PATH
    assert config_module.GateConfig().request_timeout == gate_client.DEFAULT_TIMEOUT


PLAIN_CONFIGS = [
    '[upstream]\nhost = "smtp.example.net"\n\n[gate]\nsocket = "/run/sendmail-shim/gate.sock"\n',
    '[gate] # the gate\nsocket = \'/run/g.sock\'  # literal\nrequest_timeout = 30\nallow_unbound = true\n',
    '[ gate ]\nsocket="/run/g.sock"\nrequest_timeout = 2.5\n[spf]\nrelay_ips = [\n  "192.0.2.25",\n]\n',
    '[spf]\nhint = "see [gate] below"\n[gate]\nsocket = "/run/a#b.sock"\n',
    '[upstream]\nhost = "x"\n',
]
TRICKY_CONFIGS = [
    'gate = { socket = "/run/inline.sock" }\n',
    'gate.socket = "/run/dotted.sock"\n',
    '[gate]\nsocket = "/run/\\u0067.sock"\n',
    '[spf]\nhint = """\n[gate]\nsocket = "/run/fake.sock"\n"""\n',
    '[gate]\nsocket = "/run/a.sock"\n[gate]\nsocket = "/run/b.sock"\n',
    '[gate.extra]\nx = 1\n',
    '[gate]\nrequest_timeout = 1_000\nsocket = "/run/g.sock"\n',
    '[gate]\nsocket = "/run/g.sock" trailing\n',
]


@pytest.mark.parametrize("text", PLAIN_CONFIGS)
def test_plain_gate_table_reads_what_tomllib_reads(text: str) -> None:
    import tomllib

    expected = tomllib.loads(text).get("gate")
    assert gate_client.plain_gate_table(text) == expected


@pytest.mark.parametrize("text", TRICKY_CONFIGS)
def test_anything_but_the_plain_form_is_left_to_tomllib(text: str) -> None:
    assert gate_client.plain_gate_table(text) is None
