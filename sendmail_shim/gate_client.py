"""``sendmail`` through the gate: frame argv and the message, print the verdict.

On a shared server ``sendmail`` runs as the customer's Unix user, so it holds
nothing worth stealing: it opens no ledger, reads no credentials and decides
nothing. It sends its arguments and stdin to the gate (see
``gate_protocol``), waits for the verdict, and turns it into the exit code
and one stderr line. The gate learns who is calling from the kernel.

A gate that cannot be reached is exit 69 with a line saying so, never a
fallback to sending in-process (that would need the secrets this process
must not have) and never 75 (PHP 8.5 reads 75 as success). A full backlog is
waited out until the timeout ("busy", not "not running"). Before a byte is
sent, the peer on the socket must be root or the gate's user: a fake gate of
another user learns nothing. An argument list past the protocol's bounds is
64 before anything is connected. ``gate_protocol`` has the exact rules.

Only the standard library, and only what this path needs, is imported: this
runs once per PHP ``mail()`` call.
"""

from __future__ import annotations

# _socket is the C module itself: ``socket`` would build its enums and import selectors.
import _socket
import os
import sys
import time

from . import exitcodes
from . import gate_protocol as protocol

TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator
    from typing import BinaryIO, TextIO

    from .config import Config
    from .invocation import Invocation

PROGRAM = "sendmail"
# The same names as config.py, repeated so that the fast path need not import it.
CONFIG_ENV_VAR = "SENDMAIL_SHIM_CONFIG"
DEFAULT_CONFIG_PATH = "/etc/sendmail-shim/config.toml"
DEFAULT_TIMEOUT = 120.0
# Options whose value is the rest of the word or the next word (as in invocation.py).
VALUE_OPTION_LETTERS = frozenset("frFbBNRVoOLhA")
# Waits between connects while the gate's listen backlog is full, before jitter.


class GateClientError(Exception):
    """The gate could not be asked or did not answer; ``str(exc)`` is the stderr line."""


class GateUnreachable(GateClientError):
    """Nothing accepts connections on the gate's socket."""


class GateBusy(GateUnreachable):
    """The gate's listen backlog stayed full for the whole timeout."""


class GateImpostor(GateClientError):
    """The process on the socket is neither root nor the gate's user: it is never sent a byte."""


class GateUserUnknown(GateClientError):
    """``[gate] user`` names no Unix user."""


class ArgumentsTooLong(GateClientError):
    """More arguments than one request may carry; refused before connecting."""


class GateNoVerdict(GateClientError):
    """The connection broke or timed out before the verdict arrived."""


class GateOutcomeUnknown(GateNoVerdict):
    """The whole message was handed over, then the connection closed before the verdict.

    The gate may have relayed it (it died between the upstream's reply and its answer),
    so "not sent" would invite a duplicate: the caller must check before sending again.
    """


OUTCOME_UNKNOWN = ("outcome unknown: the mail gate closed the connection after receiving the whole message "
                   "and before answering; the message may have been sent: do not send it again before "
                   "checking with the administrator (sendmail-shim log)")


class GateMismatch(GateClientError):
    """The peer on the socket does not speak this version of the protocol."""


class GateTarget:
    """Where the gate listens, whose it is and how long to wait for it."""

    __slots__ = ("socket_path", "timeout", "max_size", "max_recipients", "gate_user")

    def __init__(self, socket_path: str, timeout: float = DEFAULT_TIMEOUT,
                 max_size: int = 10 * 1024 * 1024, max_recipients: int = 1000,
                 gate_user: str | None = None) -> None:
        self.socket_path, self.timeout = socket_path, timeout
        self.max_size, self.max_recipients = max_size, max_recipients
        self.gate_user = gate_user

    @classmethod
    def from_config(cls, config: Config) -> GateTarget:
        assert config.gate.socket is not None
        return cls(config.gate.socket, config.gate.request_timeout,
                   config.message.max_size, config.message.max_recipients, config.gate.user)


# ------------------------------------------------------------------ entry points


def run_via_gate(invocation: Invocation, config: Config, stdin: BinaryIO, stdout: BinaryIO,
                 stderr: TextIO, argv: list[str] | None = None) -> int:
    """Send what ``invocation`` and stdin describe through the gate; return the exit code.

    ``argv`` is the command line as given: its size is checked as the fast path checks it.
    """
    too_long = argv is not None and protocol.argv_too_long(
        [len(os.fsencode(arg)) for arg in [os.path.basename(argv[0]) or PROGRAM, *argv[1:]]])
    if too_long:
        return _say(stderr, too_long, exitcodes.EX_USAGE)
    target = GateTarget.from_config(config)
    if invocation.mode == "smtp":
        return _smtp_session(invocation, target, stdin, stdout)
    return _deliver(target, [PROGRAM, *invocation_argv(invocation)], stdin, stderr)


def run_fast(program: str, args: list[str], stdin: BinaryIO, stdout: BinaryIO,
             stderr: TextIO) -> int | None:
    """The gate path straight from argv, before the config and argv modules are loaded.

    Returns None when this call needs the full front end instead: no gate
    configured or no socket there, a config that cannot be read (the full
    front end explains why), ``-b`` modes (``-bs`` is an SMTP dialogue), ``--help`` or
    ``--version``. The gate parses and checks the arguments itself.
    """
    if needs_full_front_end(args):
        return None
    target = target_from_config_file(os.environ.get(CONFIG_ENV_VAR) or DEFAULT_CONFIG_PATH)
    if target is None or not os.path.exists(target.socket_path):
        # No gate listening: the full front end reads the whole config and says what is wrong
        # (an unconfigured installation is 78, a stopped gate 69).
        return None
    return _deliver(target, [os.path.basename(program) or PROGRAM, *args], stdin, stderr)


def needs_full_front_end(args: list[str]) -> bool:
    """True when argv asks for a ``-b`` mode, ``--help`` or ``--version`` (getopt rules)."""
    index = 0
    while index < len(args):
        word = args[index]
        if word in ("--help", "--version"):
            return True
        if word == "--" or not word.startswith("-") or word == "-":
            return False  # the rest are recipients
        for position in range(1, len(word)):
            letter = word[position]
            if letter == "b":
                return True
            if letter in VALUE_OPTION_LETTERS:
                if position == len(word) - 1:
                    index += 1  # the value is the next word
                break
        index += 1
    return False


def target_from_config_file(path: str) -> GateTarget | None:
    """The ``[gate]`` settings from the config file, or None to take the full path."""
    try:
        with open(path, encoding="utf-8") as handle:
            settings = plain_gate_table(handle.read())
    except (OSError, UnicodeDecodeError):
        return None
    if settings is None:
        return None
    socket_path, timeout = settings.get("socket"), settings.get("request_timeout", DEFAULT_TIMEOUT)
    gate_user = settings.get("user")
    if not isinstance(socket_path, str) or not socket_path.startswith("/"):
        return None
    if isinstance(timeout, bool) or not isinstance(timeout, float) or not 1 <= timeout <= 3600:
        return None
    if gate_user is not None and (not isinstance(gate_user, str) or not gate_user):
        return None
    return GateTarget(socket_path, timeout, gate_user=gate_user)


def plain_gate_table(text: str) -> dict[str, str | float | bool] | None:
    """The ``[gate]`` table when the file writes it plainly, as the docs do; else None.

    ``tomllib`` costs more to import than the rest of this path, so the
    plain form (a ``[gate]`` header, ``key = "string"``, numbers, booleans,
    comments) is read here. Anything else -- multi-line strings, escapes,
    dotted keys or inline tables that could define ``gate``, a repeated
    header -- gives None, and the full front end reads the file with tomllib.
    """
    if '"""' in text or "'''" in text:
        return None
    table: dict[str, str | float | bool] | None = None
    section = ""  # "" before the first header: top-level keys
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.startswith("["):
            section = "".join(line.partition("#")[0].split())
            if section.startswith(("[gate.", "[[gate")) or (section == "[gate]" and table is not None):
                return None
            if section == "[gate]":
                table = {}
            continue
        key, equals, value = (part.strip() for part in line.partition("="))
        if section == "[gate]":
            parsed = _plain_value(value) if equals else None
            if parsed is None or table is None:
                return None
            table[key] = parsed
        elif not section and (not equals or key.split(".")[0].strip("\"' ") == "gate"):
            return None  # a top-level ``gate = {...}`` or ``gate.socket = ...``
    return table


def _plain_value(text: str) -> str | float | bool | None:
    if text[:1] in ("'", '"'):
        end = text.find(text[0], 1)
        rest = text[end + 1:].strip() if end > 0 else "x"
        if end < 0 or "\\" in text[:end] or (rest and not rest.startswith("#")):
            return None
        return text[1:end]
    bare = text.partition("#")[0].strip()
    if bare in ("true", "false"):
        return bare == "true"
    digits = bare.replace(".", "", 1)
    return float(bare) if digits.isdigit() and digits.isascii() and not bare.endswith(".") else None


def invocation_argv(invocation: Invocation) -> list[str]:
    """Arguments that parse back to ``invocation`` (ignored options left out)."""
    args = []
    if invocation.extract_recipients:
        args.append("-t")
    if invocation.ignore_dots:
        args.append("-i")
    for letter, value in (("f", invocation.sender), ("F", invocation.full_name),
                          ("B", invocation.body_type), ("N", invocation.dsn_notify),
                          ("R", invocation.dsn_ret), ("V", invocation.dsn_envid)):
        if value is not None:
            args += ["-" + letter, value]
    return [*args, "--", *invocation.recipients]


# ------------------------------------------------------------------ one message


def _deliver(target: GateTarget, argv: list[str], stdin: BinaryIO, stderr: TextIO) -> int:
    try:
        verdict = submit(target, argv, _chunks_of(stdin))
    except GateClientError as exc:
        return _say(stderr, str(exc), exitcodes.exit_code_for(exc))
    return _say(stderr, verdict.line, verdict.code)


def submit(target: GateTarget, argv: list[str], chunks: Iterable[bytes]) -> protocol.WireVerdict:
    """One request: argv[0] is the program name; ``chunks`` the message, each at most 64 KiB."""
    encoded = [os.fsencode(arg) for arg in argv]
    too_long = protocol.argv_too_long([len(arg) for arg in encoded])
    if too_long:
        raise ArgumentsTooLong(too_long)
    sock = connect(target)
    try:
        return _exchange(sock, target, encoded, chunks)
    except (BrokenPipeError, ConnectionResetError, protocol.PeerClosed):
        raise GateNoVerdict(
            "not sent: the mail gate closed the connection before answering; try again, "
            "and tell the administrator if it keeps happening"
        ) from None
    except protocol.PeerTooSlow:
        raise GateNoVerdict(
            f"the mail gate did not answer within {target.timeout:g} seconds; the message may or "
            f"may not have been sent: check with the administrator before sending it again"
        ) from None
    except protocol.BadFrame as exc:
        raise GateMismatch(f"not sent: the mail gate answered in a way this sendmail does not "
                           f"understand ({exc}); the administrator must restart it") from None
    except OSError as exc:
        raise GateNoVerdict(f"not sent: talking to the mail gate failed ({exc.strerror or exc}); "
                            f"try again later") from None
    finally:
        sock.close()


RELOAD_HINT = "systemctl reload sendmail-shim-gate (or send the gate SIGHUP)"
RESTART_HINT = "systemctl restart sendmail-shim-gate"


def config_drift(status: dict[str, object]) -> tuple[str, str] | None:
    """(what differs, the fix) between the config a running gate holds (its ``status``) and its file now.

    ``doctor`` and ``config check`` both ask this, so they agree on what "the gate runs an older config" means.
    """
    import hashlib

    loaded = status.get("config") if isinstance(status.get("config"), dict) else {}
    assert isinstance(loaded, dict)
    path = str(loaded.get("path"))
    try:
        with open(path, "rb") as handle:
            now = hashlib.sha256(handle.read()).hexdigest()
    except OSError as exc:
        return f"the gate's config {path} cannot be read now ({exc.strerror})", f"check {path}"
    if now != loaded.get("sha256"):
        return (f"{path} changed after the gate loaded it at {loaded.get('loaded_at')}: the gate runs an older "
                f"config", RELOAD_HINT)
    restart = loaded.get("restart_needed")
    if isinstance(restart, list) and restart:
        return (f"the gate runs {path} without the new {', '.join(map(str, restart))}, which only a restart "
                f"applies", RESTART_HINT)
    return None


def ask(target: GateTarget, question: str) -> dict[str, object]:
    """The gate's answer to a QUERY (see gate_protocol), e.g. ``status``; only root and the gate may ask."""
    import json

    sock = connect(target)
    try:
        deadline = time.monotonic() + target.timeout
        protocol.read_frame(sock, deadline, protocol.GREETING)
        sock.sendall(protocol.frame(protocol.QUERY, question.encode()))
        kind, payload = protocol.read_frame(sock, deadline, protocol.STATUS + protocol.VERDICT)
        if kind == protocol.VERDICT:
            raise GateMismatch(protocol.WireVerdict.decode(payload).line or "the gate refused the question")
        answer = json.loads(payload)
    except (protocol.ProtocolError, OSError, ValueError) as exc:
        raise GateNoVerdict(f"the mail gate did not answer the question {question!r} ({exc})") from None
    finally:
        sock.close()
    if not isinstance(answer, dict):
        raise GateMismatch(f"the mail gate answered {question!r} with something other than an object")
    return answer


# A full listen backlog (EAGAIN) is worth waiting for: first 5 ms, doubling up to 200 ms,
# each wait jittered by a factor in [0.5, 1.5] so that waiting callers do not retry in step.
# Each wait is spent inside connect() itself (SO_SNDTIMEO): the kernel queues waiting
# connects and hands each slot that frees to the longest waiter, so a caller that slept
# instead would lose every slot to a flood of blocking connects.
FIRST_RETRY, LONGEST_RETRY = 0.005, 0.2


def connect(target: GateTarget) -> _socket.socket:
    """A connection to the gate, its peer checked before anything is sent on it."""
    started = time.monotonic()
    delay, wait = FIRST_RETRY, 0.0
    while True:
        sock = _socket.socket(_socket.AF_UNIX, _socket.SOCK_STREAM)
        if wait:
            sock.setsockopt(_socket.SOL_SOCKET, _socket.SO_SNDTIMEO, _timeval(wait))
        else:
            sock.settimeout(target.timeout)
        try:
            sock.connect(target.socket_path)
            break
        except BlockingIOError:
            sock.close()
            waited = time.monotonic() - started
            if waited >= target.timeout:
                raise GateBusy(f"not sent: the mail gate at {target.socket_path} is busy (no connection "
                               f"slot for {round(waited, 1):g} s); try again in a moment") from None
            wait = max(min(delay * _jitter(), target.timeout - waited), 0.001)
            delay = min(delay * 2, LONGEST_RETRY)
        except OSError as exc:
            sock.close()
            raise _not_running(target, exc) from None
    sock.settimeout(target.timeout)
    try:
        check_peer(sock, target)
    except BaseException:
        sock.close()
        raise
    return sock


def _timeval(seconds: float) -> bytes:
    import struct  # only a caller that has to wait pays for it

    whole = int(seconds)
    return struct.pack("@ll", whole, int((seconds - whole) * 1_000_000))


def _not_running(target: GateTarget, exc: OSError) -> GateUnreachable:
    reason = exc.strerror or type(exc).__name__
    return GateUnreachable(f"not sent: the mail gate is not running (cannot connect to {target.socket_path}: "
                           f"{reason}); try again later, and tell the administrator if it persists")


def _jitter() -> float:
    import random  # only a caller that has to wait pays for it

    return random.uniform(0.5, 1.5)


def check_peer(sock: _socket.socket, target: GateTarget) -> None:
    """Refuse a peer that is neither root nor the gate's user (another user's fake gate)."""
    raw = sock.getsockopt(_socket.SOL_SOCKET, _socket.SO_PEERCRED, 12)  # struct ucred: pid, uid, gid
    peer_uid = int.from_bytes(raw[4:8], sys.byteorder)
    gate_uid = gate_user_id(target)  # first: a [gate] user naming nobody is an error even under root
    if peer_uid not in (0, gate_uid):
        raise GateImpostor(f"not sent: the process answering on {target.socket_path} runs as uid {peer_uid}, "
                           f"not as the mail gate's user (uid {gate_uid}); nothing was sent; "
                           f"tell the administrator")


def gate_user_id(target: GateTarget) -> int:
    """The uid of ``[gate] user``, else of the socket file's owner."""
    if target.gate_user is None:
        try:
            return os.stat(target.socket_path).st_uid
        except OSError as exc:  # gone since the connect: whoever answered cannot be vouched for
            raise _not_running(target, exc) from None
    import pwd

    try:
        return pwd.getpwnam(target.gate_user).pw_uid
    except KeyError:
        raise GateUserUnknown(f"not sent: configuration error: [gate] user: no Unix user named "
                              f"{target.gate_user}; the administrator must fix it") from None


def _exchange(sock: _socket.socket, target: GateTarget, argv: list[bytes],
              chunks: Iterable[bytes]) -> protocol.WireVerdict:
    deadline = time.monotonic() + target.timeout
    kind, payload = protocol.read_frame(sock, deadline, protocol.GREETING + protocol.VERDICT)
    if kind == protocol.VERDICT:  # refused before we said anything (busy, stopping)
        return protocol.WireVerdict.decode(payload)
    if payload != protocol.GREETING_TEXT:
        raise GateMismatch(f"not sent: the mail gate speaks {payload[:40]!r}, this sendmail "
                           f"{protocol.GREETING_TEXT!r}; the administrator must restart the gate")
    sock.settimeout(target.timeout)
    pending = bytearray(b"".join(protocol.frame(protocol.ARG, arg) for arg in argv))
    for chunk in chunks:
        pending += protocol.frame(protocol.DATA, chunk)
        sock.sendall(pending)
        pending.clear()
        if _verdict_waiting(sock, target.timeout):
            break  # refused mid-way (too large): stop reading stdin
    else:
        sock.sendall(pending + protocol.frame(protocol.END))
        return _final_verdict(sock, target)
    deadline = time.monotonic() + target.timeout
    _, payload = protocol.read_frame(sock, deadline, protocol.VERDICT)
    return protocol.WireVerdict.decode(payload)


def _final_verdict(sock: _socket.socket, target: GateTarget) -> protocol.WireVerdict:
    """The verdict once the whole message is out.

    An orderly close now may follow a relayed message: the outcome is unknown. A reset
    (ConnectionResetError, left to ``submit``) is what AF_UNIX reports when the gate closed
    with part of the request unread: it never had the whole message, so it was not sent.
    """
    try:
        _, payload = protocol.read_frame(sock, time.monotonic() + target.timeout, protocol.VERDICT)
    except protocol.PeerClosed:
        raise GateOutcomeUnknown(OUTCOME_UNKNOWN) from None
    return protocol.WireVerdict.decode(payload)


def _verdict_waiting(sock: _socket.socket, timeout: float) -> bool:
    sock.settimeout(0.0)  # a look, not a wait
    try:
        return bool(sock.recv(1, _socket.MSG_PEEK))
    except (BlockingIOError, InterruptedError):
        return False
    finally:
        sock.settimeout(timeout)


def _chunks_of(stream: BinaryIO) -> Iterator[bytes]:
    while True:
        chunk = stream.read(protocol.DATA_CHUNK)
        if not chunk:
            return
        yield chunk


def _say(stderr: TextIO, line: str | None, code: int) -> int:
    if line:
        stderr.write(f"{PROGRAM}: {line}\n")
    return code


# ------------------------------------------------------------------ -bs


def _smtp_session(invocation: Invocation, target: GateTarget, stdin: BinaryIO,
                  stdout: BinaryIO) -> int:
    """The SMTP dialogue runs here; each message it accepts is one request to the gate."""
    import socket

    from .stdio_session import Session

    def deliver(request: Invocation, raw: bytes) -> tuple[int, str]:
        pieces = (raw[at:at + protocol.DATA_CHUNK] for at in range(0, len(raw), protocol.DATA_CHUNK))
        try:
            verdict = submit(target, [PROGRAM, *invocation_argv(request)], pieces)
        except GateClientError as exc:
            code, status = exitcodes.smtp_reply_for(exc, exitcodes.exit_code_for(exc))
            return code, f"{status} {exc}"
        return verdict.smtp_code, verdict.smtp_text

    return Session(invocation, stdin, stdout, deliver, hostname=socket.gethostname(),
                   max_size=target.max_size, max_recipients=target.max_recipients).run()
