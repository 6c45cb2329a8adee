"""The native ``sendmail`` client: the same contract as the Python fast path, byte for byte.

Most tests here face a fake gate in the test process (it accepts the client as root or
as the socket's owner) that records every frame and answers as told, so that the two
clients can be compared on the same input: exit code, stderr and the frames the gate
receives. The "probe" builds hand what they do not handle to a probe front end that
reports the argv and stdin it was given, which shows when the native client passes a
call on and that it passes it on untouched.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st

from sendmail_shim import gate_client
from sendmail_shim import gate_protocol as protocol
from tests.gate.conftest import needs_users
from tests.gate.deployment import IS_ROOT, Client, Interpreter, Users
from tests.gate.fakegate import GREETING, FakeGate, Recorded, Script, request_of, verdict
from tests.gate.test_client import PLAIN_CONFIGS, TRICKY_CONFIGS
from tests.support import native
from tests.support.shim import SENDMAIL

TIMEOUT = 1  # [gate] request_timeout in these configs: the shortest the config allows
NO_HANG = 2 * TIMEOUT + 1.5  # greeting and verdict may each take the whole timeout; the rest is slack
PROBE_EXIT = 42
PROBE = """\
import hashlib, json, os, sys
data = sys.stdin.buffer.read()
json.dump({"args": [os.fsencode(a).hex() for a in sys.argv[1:]], "stdin": hashlib.sha256(data).hexdigest()},
          sys.stdout)
sys.exit(PROBE_EXIT)
""".replace("PROBE_EXIT", str(PROBE_EXIT))
NATIVE_NAMES = ["native", "native-asan"]


@dataclass(frozen=True)
class Run:
    code: int
    stdout: bytes
    stderr: bytes
    elapsed: float

    @property
    def went_to_front_end(self) -> bool:
        return self.code == PROBE_EXIT and self.stdout.startswith(b"{")

    def probe(self) -> dict[str, object]:
        reported: dict[str, object] = json.loads(self.stdout)
        return reported


@dataclass(frozen=True)
class Builds:
    clients: dict[str, Path]  # name -> program: python, native, native-asan, probe, probe-asan, lost


@pytest.fixture(scope="module")
def builds(native_clients: dict[str, Client], interpreter: Interpreter) -> Iterator[Builds]:
    base = Path(tempfile.mkdtemp(prefix="shim-native-probe-"))
    os.chmod(base, 0o755)
    try:
        probe = base / "probe-front-end"
        probe.write_text(f"#!{interpreter.executable} -I\n{PROBE}")  # as the package's launcher: -I
        os.chmod(probe, 0o755)
        programs = {"python": Path(SENDMAIL)}
        programs.update({name: client.binary for name, client in native_clients.items() if client.binary})
        programs["probe"] = native.build(base / "probe", probe)
        programs["probe-asan"] = native.build(base / "probe-asan", probe, sanitize=True)
        programs["lost"] = native.build(base / "lost", base / "no-such-front-end")
        yield Builds(programs)
    finally:
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture
def place() -> Iterator[Path]:
    """A directory for one test's config and socket, short enough for sun_path."""
    directory = Path(tempfile.mkdtemp(prefix="shimn-"))
    os.chmod(directory, 0o755)
    try:
        yield directory
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def write_config(place: Path, gate: dict[str, object] | None = None, *, text: str | None = None) -> Path:
    path = place / "config.toml"
    if text is None:
        table = {"socket": str(place / "gate.sock"), "request_timeout": TIMEOUT, **(gate or {})}
        text = "[upstream]\nhost = \"smtp.example.net\"\n\n[gate]\n" + "".join(
            f"{key} = {json.dumps(value)}\n" for key, value in table.items() if value is not None)
    path.write_text(text)
    return path


def run(program: Path, args: list[bytes], stdin: bytes, config: Path, *, sanitized: bool = False,
        env: dict[str, str] | None = None, timeout: float = 30) -> Run:
    environment = {"PATH": "/usr/bin:/bin", "LANG": "C.UTF-8", "SENDMAIL_SHIM_CONFIG": str(config)}
    if sanitized:
        environment.update(native.SANITIZER_ENV)
    environment.update(env or {})
    started = time.monotonic()
    proc = subprocess.run([os.fsencode(program), *args], input=stdin, capture_output=True, env=environment,
                          timeout=timeout)
    result = Run(proc.returncode, proc.stdout, proc.stderr, time.monotonic() - started)
    if sanitized:
        assert result.code != native.SANITIZER_EXIT, result.stderr.decode(errors="replace")
        assert not any(report.encode() in result.stderr for report in native.SANITIZER_REPORTS), result.stderr
    return result


def run_each(builds: Builds, names: list[str], args: list[bytes], stdin: bytes, config: Path) -> dict[str, Run]:
    """The clients side by side, at the same time, on the same input."""
    with ThreadPoolExecutor(len(names)) as pool:
        futures = {name: pool.submit(run, builds.clients[name], args, stdin, config, sanitized=name.endswith("asan"))
                   for name in names}
        return {name: future.result() for name, future in futures.items()}


def line(result: Run) -> str:
    return result.stderr.decode("utf-8", "replace").strip()


# ------------------------------------------------------------------ the same request, the same answer


MESSAGE = b"From: post@a.example\nTo: ola@x.example\nSubject: Hei\n\nHello.\n"


@pytest.mark.parametrize(("args", "stdin"), [
    ([b"-t", b"-i"], MESSAGE),
    ([b"-oi", b"-fpost@a.example", b"-F", b"Kunde \xc3\x98st", b"--", b"ola@x.example, Per <per@x.example>"], MESSAGE),
    ([b"-i", b"\xff\xfe-not-utf8@x.example", b""], MESSAGE.replace(b"\n", b"\r\n")),
    ([b"-t"], b""),
    ([b"-t", b"-i"], MESSAGE + b"x" * (protocol.DATA_CHUNK - len(MESSAGE))),  # exactly one frame's worth
    ([b"-t", b"-i"], MESSAGE + b"y" * protocol.DATA_CHUNK * 3 + b"z"),  # four frames, the last of one byte
], ids=["plain", "options", "bytes", "empty", "one-frame", "four-frames"])
def test_both_clients_send_the_same_frames_and_print_the_same_line(builds: Builds, place: Path,
                                                                   args: list[bytes], stdin: bytes) -> None:
    answer = verdict(77, "not sent: post@a.example is not yours (\u00f8 \u2603)", 550, "5.7.1 no")
    config = write_config(place)
    with FakeGate(place, Script(answer=answer)) as gate:
        results = run_each(builds, ["python", "native", "native-asan"], args, stdin, config)
    assert {name: (r.code, r.stderr) for name, r in results.items()} == dict.fromkeys(
        results, (77, "sendmail: not sent: post@a.example is not yours (\u00f8 \u2603)\n".encode()))
    requests = [record.frames for record in gate.connections]
    assert len(requests) == 3 and requests[0] == requests[1] == requests[2]
    sent_args, data, ended = request_of(gate.connections[0])
    assert sent_args == [b"sendmail", *args] and data == stdin and ended
    sizes = [len(payload) for kind, payload in requests[0] if kind == protocol.DATA]
    assert all(size == protocol.DATA_CHUNK for size in sizes[:-1])  # full frames but the last


def test_a_verdict_without_a_line_prints_nothing(builds: Builds, place: Path) -> None:
    config = write_config(place)
    with FakeGate(place, Script(answer=verdict(0, None))):
        results = run_each(builds, ["python", "native", "native-asan"], [b"-t"], MESSAGE, config)
    assert {(r.code, r.stderr, r.stdout) for r in results.values()} == {(0, b"", b"")}


# ------------------------------------------------------------------ hostile gate answers


def _frame_header(kind: bytes, length: int) -> bytes:
    return kind + length.to_bytes(4, "big")


def _verdict_payloads() -> st.SearchStrategy[bytes]:
    wire = st.builds(lambda code, text, smtp, reply: protocol.WireVerdict(code, text, smtp, reply).encode(),
                     st.integers(0, 255), st.one_of(st.none(), st.text(max_size=40)), st.integers(100, 599),
                     st.text(max_size=20))
    raw = st.builds(lambda code, smtp, body: bytes([code]) + smtp.to_bytes(2, "big") + body,
                    st.integers(0, 255), st.integers(0, 65535),
                    st.binary(max_size=60) | st.sampled_from([b"\n", b"line\n", b"\xe2\x82\n\xff", b"no newline"]))
    return wire | raw | st.binary(max_size=6)


def _answers() -> st.SearchStrategy[bytes]:
    good = _verdict_payloads().map(lambda payload: _frame_header(protocol.VERDICT, len(payload)) + payload)
    oversize = st.builds(lambda n, tail: _frame_header(protocol.VERDICT, n) + tail,
                         st.integers(protocol.MAX_PAYLOAD[protocol.VERDICT] + 1, 2**32 - 1), st.binary(max_size=20))
    other_kind = st.builds(lambda kind, n: bytes([kind]) + n.to_bytes(4, "big"),
                           st.integers(0, 255).filter(lambda k: k != protocol.VERDICT[0]), st.integers(0, 10))
    truncated = st.builds(lambda whole, cut: whole[:cut], good, st.integers(0, 12))
    hostile = st.one_of(oversize, other_kind, truncated, st.binary(max_size=12))
    return st.sampled_from([True, False]).flatmap(lambda proper: good if proper else hostile)


def _whole_verdict(answer: bytes) -> bool:
    return (answer[:1] == protocol.VERDICT and len(answer) >= protocol.HEADER_SIZE
            and int.from_bytes(answer[1:5], "big") == len(answer) - protocol.HEADER_SIZE)


def _greetings() -> st.SearchStrategy[bytes]:
    wrong = st.binary(max_size=50).map(lambda text: protocol.frame(protocol.GREETING, text))
    oversize = st.integers(65, 2**32 - 1).map(lambda n: _frame_header(protocol.GREETING, n))
    odd = st.one_of(wrong, oversize, _answers(), st.just(GREETING[:7]), st.binary(max_size=8))
    return st.sampled_from([True, True, True, False]).flatmap(lambda proper: st.just(GREETING) if proper else odd)


_ARG_PIECES = [b"-", b"t", b"i", b"o", b"f", b"F", b"r", b"x", b"@", b".", b" ", b"\xc3\xb8", b"\xff", b"=", b"-b"]
ARGS = st.lists(st.lists(st.sampled_from(_ARG_PIECES), max_size=6).map(b"".join) |
                st.sampled_from([b"--", b"-t", b"-i", b"-oi", b"--help", b"-bs", b"-f", b"post@a.example"]),
                max_size=6)
STDIN = st.binary(max_size=300) | st.builds(lambda n, piece: (piece * n)[:n], st.integers(60_000, 100_000),
                                            st.binary(min_size=1, max_size=3))


@pytest.mark.parametrize("name", NATIVE_NAMES)
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                 HealthCheck.too_slow])
@given(greeting=_greetings(), answer=_answers(), mode=st.sampled_from(["normal", "normal", "at_once", "close"]),
       hold=st.sampled_from([False, False, False, True]),
       args=ARGS, stdin=STDIN)
@example(greeting=GREETING, answer=b"\x00", mode="at_once", hold=False, args=[], stdin=b"")  # a cut frame at once
@example(greeting=GREETING, answer=verdict(75, "odd"), mode="at_once", hold=True, args=[b"-t"], stdin=b"x" * 70_000)
def test_hostile_gate_answers_get_the_python_clients_exit_and_line_and_never_hang(
        builds: Builds, name: str, greeting: bytes, answer: bytes, mode: str, hold: bool,
        args: list[bytes], stdin: bytes) -> None:
    if gate_client.needs_full_front_end([os.fsdecode(a) for a in args]):
        args = [b"--", *args]  # the front end's own work is not this test's
    if mode == "at_once" and not _whole_verdict(answer):
        # Once the gate has spoken a client may stop uploading at any point, so what it makes
        # of a cut frame depends on timing; a cut frame after the whole request is compared.
        mode = "normal"
    with tempfile.TemporaryDirectory(prefix="shimh-") as directory:
        place = Path(directory)
        config = write_config(place)
        with FakeGate(place, Script(greeting=greeting, answer=answer, mode=mode, hold=hold)) as gate:
            try:
                results = run_each(builds, ["python", name], args, stdin, config)
            finally:
                gate.released.set()
    python, native_run = results["python"], results[name]
    event(f"exit {native_run.code}: {line(native_run)[10:60]}")
    assert (native_run.code, native_run.stderr) == (python.code, python.stderr)
    assert native_run.elapsed < NO_HANG
    assert native_run.stderr.count(b"\n") <= 1 and native_run.stdout == b""
    if native_run.code not in range(256) or not native_run.stderr:
        return
    assert native_run.stderr.startswith(b"sendmail: ")


def test_a_peer_that_never_greets_is_cut_off_at_the_timeout(builds: Builds, place: Path) -> None:
    config = write_config(place)
    with FakeGate(place, Script(greeting=b"", mode="deaf")) as gate:
        try:
            results = run_each(builds, ["python", "native", "native-asan"], [b"-t"], MESSAGE, config)
        finally:
            gate.released.set()
    expected = (69, b"sendmail: the mail gate did not answer within 1 seconds; the message may or may not have "
                    b"been sent: check with the administrator before sending it again\n")
    assert {name: (r.code, r.stderr) for name, r in results.items()} == dict.fromkeys(results, expected)
    assert all(TIMEOUT <= r.elapsed < TIMEOUT + 1.5 for r in results.values())


def test_a_gate_that_stops_reading_is_cut_off_not_waited_for(builds: Builds, place: Path) -> None:
    config = write_config(place)
    big = MESSAGE + b"z" * 4_000_000
    with FakeGate(place, Script(mode="deaf")) as gate:
        try:
            results = run_each(builds, ["python", "native", "native-asan"], [b"-t"], big, config)
        finally:
            gate.released.set()
    expected = (69, b"sendmail: not sent: talking to the mail gate failed (timed out); try again later\n")
    assert {name: (r.code, r.stderr) for name, r in results.items()} == dict.fromkeys(results, expected)
    assert all(r.elapsed < NO_HANG for r in results.values())


def test_a_gate_that_hangs_up_gives_a_line_not_a_silent_death(builds: Builds, place: Path) -> None:
    config = write_config(place)
    big = MESSAGE + b"z" * 2_000_000  # the client is still writing when the gate goes (SIGPIPE ignored)
    with FakeGate(place, Script(mode="close")):
        results = run_each(builds, ["python", "native", "native-asan"], [b"-t"], big, config)
    expected = (69, b"sendmail: not sent: the mail gate closed the connection before answering; try again, "
                    b"and tell the administrator if it keeps happening\n")
    assert {name: (r.code, r.stderr) for name, r in results.items()} == dict.fromkeys(results, expected)


def test_a_gate_that_hangs_up_after_the_whole_message_leaves_the_outcome_unknown(builds: Builds,
                                                                                place: Path) -> None:
    config = write_config(place)
    with FakeGate(place, Script(mode="silent")) as gate:
        results = run_each(builds, ["python", "native", "native-asan"], [b"-t"], MESSAGE, config)
    expected = (69, f"sendmail: {gate_client.OUTCOME_UNKNOWN}\n".encode())
    assert {name: (r.code, r.stderr) for name, r in results.items()} == dict.fromkeys(results, expected)
    assert b"not sent" not in expected[1]
    assert all(request_of(record)[1:] == (MESSAGE, True) for record in gate.connections)  # each handed over all


def test_an_early_refusal_stops_the_upload(builds: Builds, place: Path) -> None:
    refusal = verdict(65, "not sent: the message is larger than the limit of 1000 bytes; send large files as links",
                      552, "5.3.4 too big")
    config = write_config(place)
    huge = MESSAGE + b"z" * 20_000_000
    with FakeGate(place, Script(answer=refusal, mode="at_once")) as gate:
        results = run_each(builds, ["python", "native", "native-asan"], [b"-t"], huge, config)
    assert {(r.code, line(r)) for r in results.values()} == {
        (65, "sendmail: not sent: the message is larger than the limit of 1000 bytes; send large files as links")}
    assert all(request_of(record)[1] != huge for record in gate.connections)  # not one sent it all


# ------------------------------------------------------------------ rules of the client contract


@pytest.mark.parametrize("name", ["python", *NATIVE_NAMES])
@pytest.mark.parametrize(("args", "expected"), [
    ([b"x" * 8000] * 33, "argument list too long (264008 bytes; at most 262144)"),
    ([b"-i"] * 4096, "argument list too long (4097 arguments; at most 4096)"),
    ([b"-t", b"y" * 8193], "argument list too long (one argument of 8193 bytes; at most 8192)"),
], ids=["bytes", "count", "one-argument"])
def test_an_argument_list_over_the_bounds_is_64_and_nothing_is_connected(
        builds: Builds, place: Path, name: str, args: list[bytes], expected: str) -> None:
    config = write_config(place)
    with FakeGate(place) as gate:
        result = run(builds.clients[name], args, MESSAGE, config, sanitized=name.endswith("asan"))
        time.sleep(0.1)
    assert (result.code, line(result)) == (64, f"sendmail: {expected}")
    assert gate.connections == []


@pytest.mark.parametrize("name", ["python", *NATIVE_NAMES])
def test_an_argument_list_at_the_bounds_is_sent_whole(builds: Builds, place: Path, name: str) -> None:
    config = write_config(place)
    at_bytes = [b"x" * 8192] * 31 + [b"y" * (protocol.MAX_ARGV_BYTES - 8192 * 31 - len(b"sendmail"))]
    at_count = [b"-i"] * (protocol.MAX_ARGS - 1)
    with FakeGate(place) as gate:
        for args in (at_bytes, at_count):
            result = run(builds.clients[name], args, MESSAGE, config, sanitized=name.endswith("asan"))
            assert (result.code, result.stderr) == (0, b"")
    assert [request_of(record)[0] for record in gate.connections] == [[b"sendmail", *at_bytes],
                                                                     [b"sendmail", *at_count]]


def _fill_backlog(path: Path) -> socket.socket:
    """One connection waiting in a backlog of zero: the next connect gets EAGAIN."""
    filler = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    filler.connect(str(path))
    return filler


@pytest.mark.parametrize("name", ["python", *NATIVE_NAMES])
def test_a_full_backlog_is_retried_until_a_slot_frees(builds: Builds, place: Path, name: str) -> None:
    config = write_config(place, {"request_timeout": 10})
    with FakeGate(place, backlog=0, accepting=False) as gate:
        filler = _fill_backlog(gate.path)
        threading.Timer(0.5, gate.accepting.set).start()
        result = run(builds.clients[name], [b"-t"], MESSAGE, config, sanitized=name.endswith("asan"))
        filler.close()
    assert (result.code, result.stderr) == (0, b"")
    assert 0.45 < result.elapsed < 5
    assert [request_of(record)[1] for record in gate.connections if record.frames] == [MESSAGE]


@pytest.mark.parametrize("name", ["python", *NATIVE_NAMES])
def test_a_backlog_full_until_the_timeout_is_69_busy(builds: Builds, place: Path, name: str) -> None:
    config = write_config(place)
    with FakeGate(place, backlog=0, accepting=False) as gate:
        filler = _fill_backlog(gate.path)
        result = run(builds.clients[name], [b"-t"], MESSAGE, config, sanitized=name.endswith("asan"))
        filler.close()
    assert (result.code, line(result)) == (69, f"sendmail: not sent: the mail gate at {gate.path} is busy "
                                               f"(no connection slot for 1 s); try again in a moment")
    assert TIMEOUT <= result.elapsed < TIMEOUT + 1.5


@pytest.mark.parametrize("name", ["python", *NATIVE_NAMES])
def test_a_gate_user_that_does_not_exist_is_78_and_nothing_is_sent(builds: Builds, place: Path, name: str) -> None:
    config = write_config(place, {"user": "no-such-gate-user"})
    with FakeGate(place, Script(mode="deaf")) as gate:
        try:
            result = run(builds.clients[name], [b"-t"], MESSAGE, config, sanitized=name.endswith("asan"))
        finally:
            gate.released.set()
    assert (result.code, line(result)) == (78, "sendmail: not sent: configuration error: [gate] user: no Unix "
                                               "user named no-such-gate-user; the administrator must fix it")
    assert [record.received for record in gate.connections] == [0]


@pytest.mark.parametrize("name", ["python", *NATIVE_NAMES])
def test_root_answering_for_the_gate_user_is_accepted(builds: Builds, place: Path, name: str) -> None:
    if not IS_ROOT:
        pytest.skip("the fake gate must run as root")
    config = write_config(place, {"user": "nobody"})
    with FakeGate(place, Script(answer=verdict(0, None))) as gate:
        result = run(builds.clients[name], [b"-t"], MESSAGE, config, sanitized=name.endswith("asan"))
    assert (result.code, result.stderr) == (0, b"") and request_of(gate.connections[0])[1] == MESSAGE


IMPOSTOR = """
import socket, sys
if sys.argv[1] == "bind":  # a socket of its own, in a directory it may write
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(sys.argv[2])
else:  # the socket file root bound, handed over
    listener = socket.socket(fileno=int(sys.argv[2]))
listener.listen(4)  # the kernel reports the uid of whoever listens
print("ready", flush=True)
conn, _ = listener.accept()
conn.settimeout(10)
got = 0
try:
    while chunk := conn.recv(65536):
        got += len(chunk)
except OSError:
    pass
print(got, flush=True)
"""


@needs_users
@pytest.mark.parametrize("name", ["python", *NATIVE_NAMES])
@pytest.mark.parametrize("setup", ["own-socket", "root-bound-socket"])
def test_an_impostor_on_the_socket_receives_nothing(builds: Builds, place: Path, users: Users,
                                                    interpreter: Interpreter, name: str, setup: str) -> None:
    """Another user answers on the socket: not one byte reaches it, and the site is told.

    With its own socket (the directory swapped) only ``[gate] user`` can tell; a socket
    root bound and another user serves is told by its owner, root.
    """
    listener = None
    if setup == "own-socket":
        directory = place / "swapped"
        directory.mkdir()
        os.chown(directory, users.c.uid, users.c.gid)
        path = directory / "gate.sock"
        config = write_config(place, {"socket": str(path), "user": users.gate.name})
        command, pass_fds, gate_uid = ["bind", str(path)], (), users.gate.uid
    else:
        path = place / "gate.sock"
        config = write_config(place)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        listener.bind(str(path))
        os.chmod(path, 0o666)
        command, pass_fds, gate_uid = ["fd", str(listener.fileno())], (listener.fileno(),), 0
    impostor = subprocess.Popen([interpreter.executable, "-c", IMPOSTOR, *command], pass_fds=pass_fds,
                                stdout=subprocess.PIPE, text=True, env=interpreter.env(), cwd="/",
                                **users.c.run_options())
    try:
        assert impostor.stdout is not None and impostor.stdout.readline().strip() == "ready"
        result = run(builds.clients[name], [b"-t"], MESSAGE, config, sanitized=name.endswith("asan"))
        received = impostor.communicate(timeout=15)[0].strip()
    finally:
        impostor.kill()
        if listener is not None:
            listener.close()
    assert (result.code, line(result)) == (69, f"sendmail: not sent: the process answering on {path} runs as uid "
                                               f"{users.c.uid}, not as the mail gate's user (uid {gate_uid}); "
                                               f"nothing was sent; tell the administrator")
    assert received == "0"


# ------------------------------------------------------------------ what goes to the front end


def _decision(result: Run) -> str:
    return "front end" if result.went_to_front_end else "gate"


def _via_gate() -> Script:
    return Script(answer=verdict(0, "via the gate"))


@pytest.mark.parametrize("name", ["probe", "probe-asan"])
@pytest.mark.parametrize("args", [[b"-bs"], [b"-bp"], [b"-i", b"-bm", b"x@y"], [b"--help"], [b"-t", b"--version"],
                                  [b"-ibs"], [b"-f", b"a@b", b"-bv"]])
def test_modes_for_the_front_end_reach_it_with_argv_and_stdin_untouched(builds: Builds, place: Path, name: str,
                                                                       args: list[bytes]) -> None:
    stdin = b"EHLO x\r\n" + os.urandom(300_000)  # more than one frame: nothing of it was read
    config = write_config(place)
    with FakeGate(place, _via_gate()) as gate:
        result = run(builds.clients[name], args, stdin, config, sanitized=name.endswith("asan"))
    assert result.went_to_front_end, result
    assert result.probe() == {"args": [a.hex() for a in args], "stdin": hashlib.sha256(stdin).hexdigest()}
    assert gate.connections == []


@pytest.mark.parametrize("name", ["probe", "probe-asan"])
@pytest.mark.parametrize("case", ["no config", "no gate table", "no socket file", "a directory", "too large",
                                  "not UTF-8", "tricky"])
def test_what_it_cannot_read_plainly_goes_to_the_front_end(builds: Builds, place: Path, name: str, case: str) -> None:
    config = write_config(place)
    socket_line = f'socket = "{place / "gate.sock"}"\n'
    texts = {"no gate table": '[upstream]\nhost = "x"\n', "no socket file": '[gate]\nsocket = "/nonexistent/g.sock"\n',
             "too large": "#" * 70_000 + "\n[gate]\n" + socket_line,
             "not UTF-8": "# \xff\n[gate]\n" + socket_line, "tricky": f"gate = {{ {socket_line.strip()} }}\n"}
    if case == "no config":
        config = place / "missing.toml"
    elif case == "a directory":
        config = place
    else:
        config.write_bytes(texts[case].encode("latin-1" if case == "not UTF-8" else "utf-8"))
    with FakeGate(place, _via_gate()) as gate:
        result = run(builds.clients[name], [b"-t"], MESSAGE, config, sanitized=name.endswith("asan"))
    assert result.went_to_front_end and result.probe()["stdin"] == hashlib.sha256(MESSAGE).hexdigest()
    assert gate.connections == []


def test_the_environment_cannot_choose_what_runs(builds: Builds, place: Path) -> None:
    """PATH, PYTHON* and friends change nothing: the front end's path was fixed at build time."""
    decoy = place / "bin"
    decoy.mkdir()
    for program in ("python3", "sendmail", "sendmail-shim", "sh"):
        (decoy / program).write_text("#!/bin/sh\necho decoy; exit 13\n")
        os.chmod(decoy / program, 0o755)
    env = {"PATH": str(decoy), "PYTHONPATH": str(decoy), "PYTHONHOME": str(decoy), "PYTHONSTARTUP": str(decoy),
           "SHELL": str(decoy / "sh")}
    result = run(builds.clients["probe"], [b"-bs"], b"QUIT\r\n", write_config(place), env=env)
    assert result.went_to_front_end and b"decoy" not in result.stdout


def test_a_missing_front_end_is_a_clear_69(builds: Builds, place: Path) -> None:
    result = run(builds.clients["lost"], [b"--version"], b"", write_config(place))
    front_end = builds.clients["lost"].parent.parent / "no-such-front-end"
    assert (result.code, line(result)) == (69, f"sendmail: not sent: the sendmail-shim front end {front_end} cannot "
                                               f"be run (No such file or directory); tell the administrator")


@pytest.mark.parametrize("name", ["probe", "probe-asan"])
@settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(args=ARGS)
def test_the_native_client_passes_on_exactly_the_calls_the_python_one_does(builds: Builds, place: Path, name: str,
                                                                           args: list[bytes]) -> None:
    config = write_config(place)
    with FakeGate(place, _via_gate()) as gate:
        result = run(builds.clients[name], args, MESSAGE, config, sanitized=name.endswith("asan"))
    expected = gate_client.needs_full_front_end([os.fsdecode(a) for a in args])
    assert _decision(result) == ("front end" if expected else "gate")
    event(_decision(result))
    if expected:
        assert result.probe()["args"] == [a.hex() for a in args]
    else:
        assert (result.code, line(result)) == (0, "sendmail: via the gate")
        assert request_of(gate.connections[0]) == ([b"sendmail", *args], MESSAGE, True)


# ------------------------------------------------------------------ the config, read as the Python client reads it


def _python_decision(path: Path) -> tuple[str, str | None]:
    target = gate_client.target_from_config_file(str(path))
    if target is None or not os.path.exists(target.socket_path):
        return "front end", None
    return "gate", target.gate_user


# What the native client leaves to the front end even where Python's own reading would do.
_UNICODE_SPACES = {"\x85", "\xa0", "\u1680", *map(chr, range(0x2000, 0x200B)), "\u2028", "\u2029", "\u202f",
                   "\u205f", "\u3000"}


def _native_is_stricter(raw: bytes) -> bool:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        return False  # Python cannot read it either
    controls = {chr(c) for c in range(32)} - {"\t", "\n", "\r"}
    return len(raw) > 64 * 1024 or any(c in controls or c in _UNICODE_SPACES for c in text)


def _check_config(builds: Builds, place: Path, raw: bytes, name: str = "probe") -> str:
    """The native client decides as the Python client would; returns the decision."""
    config = place / "config.toml"
    config.write_bytes(raw)
    with FakeGate(place, _via_gate()) as gate:
        expected, user = _python_decision(config)  # while the socket is there
        if _native_is_stricter(raw):
            expected = "front end"
        result = run(builds.clients[name], [b"-t"], MESSAGE, config, sanitized=name.endswith("asan"))
    assert _decision(result) == expected, (raw, result)
    if expected == "gate" and user == "no-such-gate-user":
        assert result.code == 78
    elif expected == "gate" and user and not IS_ROOT:
        assert result.code == 69  # the fake gate is not root here, nor the user named
    elif expected == "gate":
        assert (result.code, line(result)) == (0, "sendmail: via the gate")
        assert len(gate.connections) == 1
    return f"{expected}{' (stricter)' if _native_is_stricter(raw) else ''}"


@pytest.mark.parametrize("text", PLAIN_CONFIGS + TRICKY_CONFIGS)
def test_the_documented_config_forms_are_read_as_the_python_client_reads_them(builds: Builds, place: Path,
                                                                              text: str) -> None:
    text = text.replace("/run/sendmail-shim/gate.sock", str(place / "gate.sock")).replace(
        "/run/g.sock", str(place / "gate.sock"))
    _check_config(builds, place, text.encode())


def _config_texts(sock: str) -> st.SearchStrategy[bytes]:
    """Configs near the documented form: a [gate] table most of the time, mutated line by line."""
    strings = [f'"{sock}"', f"'{sock}'", f'"{sock}" # the gate', f'"{sock}" trailing', f'"{sock}\\u0067"', f'"{sock}',
               '"/nonexistent/gate.sock"', '"relative.sock"', '""', "42", "true"]
    numbers = ["1", "2.5", "3600", "0.5", "3601", ".5", "5.", "1_000", "1e3", "-1", '"10"', "true", "10 # s", "010", ""]
    users = ['"root"', '"nobody"', '"no-such-gate-user"', '""', "1", "true", "'root'", '"root" # x']
    keys = {"socket": strings, "request_timeout": numbers, "user": users, "allow_unbound": ["true", "false", "yes"],
            "max_connections_per_uid": ["16", "x"], '"socket"': strings, "socket ": strings}
    good_socket = st.sampled_from([f'socket = "{sock}"', f"socket='{sock}'", f'socket = "{sock}"  # here'])
    key_lines = st.sampled_from(sorted(keys)).flatmap(
        lambda key: st.sampled_from(keys[key]).map(lambda value: f"{key} = {value}"))
    gate_headers = ["[gate]", "[ gate ]", "[gate] # the gate", "[\tgate]"]
    headers = [*gate_headers, "[gate.extra]", "[[gate]]", "[upstream]", "[spf]", "[gatex]", "[#]", "[ gate . x ]",
               "[gate]x", "[ [gate] ]"]
    top = [f'gate = {{ socket = "{sock}" }}', f'gate.socket = "{sock}"', f'"gate".socket = "{sock}"', "'gate' = 1",
           'host = "x"', "bare", "x = '''", 'y = """']
    plain = ["# comment", "", "   ", "\t# tab", 'host = "smtp.example.net"', 'hint = "see [gate] below"',
             'note = "Hei p\u00e5 deg"']
    array = ["relay_ips = [", '  "192.0.2.25",', "]"]  # a table's value over several lines
    odd = ['x = "\u00a0"', "# \u2028", "# \x0c", "\ufeff", "# \u0085", "a = \"\x00\""]
    other = [*plain, *plain, *plain, *odd]
    good_keys = st.sampled_from(["request_timeout = 30", "request_timeout = 2.5", 'user = "root"',
                                 "allow_unbound = true", "max_connections_per_uid = 16", "# a comment", ""])
    gate_body = st.tuples(st.lists(good_keys | good_keys | key_lines, max_size=3), good_socket,
                          st.lists(good_keys | key_lines | st.sampled_from(other), max_size=3))
    gate_table = st.tuples(st.sampled_from(gate_headers) | st.sampled_from(headers), gate_body).map(
        lambda t: [t[0], *t[1][0], t[1][1], *t[1][2]])
    stray = st.lists(st.sampled_from(headers) | key_lines | st.sampled_from(top) | st.sampled_from(other + array),
                     max_size=4)
    after = st.tuples(st.sampled_from(["[upstream]", "[spf]", "[log]"]), st.sampled_from([[], array]), stray).map(
        lambda t: [t[0], *t[1], *t[2]])
    sections = st.tuples(st.lists(st.sampled_from(other), max_size=2), gate_table | gate_table | stray,
                         st.lists(st.sampled_from(plain), max_size=2) | stray | after).map(
        lambda t: [*t[0], *t[1], *t[2]])
    pad = st.sampled_from(["", "", " ", "\t"])
    ending = st.sampled_from(["\n", "\n", "\r\n", "\r"])
    lines = sections.flatmap(lambda found: st.tuples(*[st.tuples(pad, st.just(text), pad, ending).map("".join)
                                                       for text in found]))
    broken = st.sampled_from([b""] * 8 + [b"\xff", b"\xc3"])  # a byte Python's UTF-8 decoder refuses, or none
    return st.tuples(lines.map("".join), broken).map(lambda parts: parts[0].encode() + parts[1])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_config_is_read_as_the_python_client_reads_it_or_left_to_the_front_end(builds: Builds, place: Path,
                                                                                   data: st.DataObject) -> None:
    raw = data.draw(_config_texts(str(place / "gate.sock")))
    event(_check_config(builds, place, raw, data.draw(st.sampled_from(["probe", "probe", "probe-asan"]))))


# ------------------------------------------------------------------ the program itself


def test_the_native_client_needs_nothing_but_libc(builds: Builds) -> None:
    dynamic = subprocess.run(["readelf", "-d", str(builds.clients["native"])], capture_output=True, text=True,
                             check=True).stdout
    needed = [part.split("[", 1)[1].rstrip("]") for part in dynamic.splitlines() if "(NEEDED)" in part]
    assert needed == ["libc.so.6"]


def test_closed_standard_descriptors_never_carry_the_message(builds: Builds, place: Path) -> None:
    """With 0, 1 and 2 closed the socket must not take their numbers: stdin is empty, no line leaks."""
    config = write_config(place)
    with FakeGate(place, Script(answer=verdict(66, "not sent: no message on stdin"), hold=True)) as gate:
        command = f'exec 0<&- 1>&- 2>&- "{builds.clients["native-asan"]}" -t'
        proc = subprocess.run(["sh", "-c", command], env={"SENDMAIL_SHIM_CONFIG": str(config),
                                                          **native.SANITIZER_ENV}, timeout=30)
        time.sleep(0.2)
        gate.released.set()
    assert proc.returncode == 66
    record: Recorded = gate.connections[0]
    assert request_of(record) == ([b"sendmail", b"-t"], b"", True)
    framed = sum(protocol.HEADER_SIZE + len(payload) for _, payload in record.frames)
    assert record.received == framed  # nothing written into the socket after the request
