"""The gate: the local service that ``sendmail`` submits through on shared servers.

It runs under its own system user, owns the ledger, the queue and the relay
credentials, and listens on the UNIX socket ``[gate] socket`` (mode 0666 in a
directory only root or the gate can write, like OpenSMTPD's control socket).
Each connection is one message framed as ``gate_protocol`` describes. The
caller's identity comes from the kernel (``SO_PEERCRED``), never from argv,
the environment or headers; the gate re-parses the arguments itself and runs
the same pipeline as ``sendmail`` in-process, with one warm ``Runtime``.

Bounds: a connection gets ``[gate] request_timeout`` to deliver its request,
at most ``[gate] max_connections_per_uid`` run at once per Unix user and
``MAX_CONNECTIONS`` in all, frames have fixed maximum sizes and the message
``[message] max_size``. A refused or broken connection never touches the
ledger or the upstream, and costs other callers nothing.

SIGTERM or SIGINT stop accepting, let the requests in progress finish (for at
most ``SHUTDOWN_GRACE`` seconds) and exit 0. Under systemd the listening
socket may be handed over (``LISTEN_FDS``, see packaging/systemd), so
connections made during a restart wait in the socket instead of failing.
"""

from __future__ import annotations

import contextlib
import os
import queue
import re
import selectors
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import BinaryIO, cast

from . import exitcodes, maillog
from . import gate_protocol as protocol
from .config import Config, ConfigError, GateConfig
from .invocation import UsageError, parse_argv
from .message import MessageError, read_input
from .pipeline import Caller, Record, Runtime, Verdict, decide, record_together, refuse

MAX_CONNECTIONS = 256  # in all, whoever the callers are; each holds at most one message
MAX_RECORDS_PER_COMMIT = 64  # messages whose bookkeeping shares one ledger commit, at most
SHUTDOWN_GRACE = 30.0
SEND_TIMEOUT = 10.0  # for writing a verdict to a caller that does not read it
SD_LISTEN_FDS_START = 3
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_PASSWORD_IN_URL = re.compile(r"^[^:/]+://[^/@:]*:[^/@]+@|[?&]password=", re.IGNORECASE)


class GateError(Exception):
    """The gate cannot start. ``str(exc)`` is the one line the admin sees."""

    exit_code = os.EX_CONFIG


class SocketInUse(GateError):
    """Another gate already answers on the socket."""

    exit_code = os.EX_UNAVAILABLE


class UnsafeSocketPlace(GateError):
    """The socket cannot be created, or could be replaced by other users."""


class ExposedSecret(GateError):
    """A file the gate protects can be read or changed by other users."""


class ActivationError(GateError):
    """systemd handed over something that is not a UNIX stream socket."""


class LedgerNotReady(GateError):
    """The ledger is missing, not upgraded, or unusable."""

    def __init__(self, line: str, exit_code: int) -> None:
        super().__init__(line)
        self.exit_code = exit_code


# ------------------------------------------------------------------ entry points


def serve(config: Config, *, ready: Callable[[], None] | None = None) -> int:
    """Run the gate until SIGTERM or SIGINT; 0 after a graceful stop.

    ``ready`` is called once the socket accepts connections (default: tell
    systemd, when it asks with ``NOTIFY_SOCKET``). Raises GateError or
    ConfigError when the gate cannot start.
    """
    check_private_files(config)
    runtime = Runtime(config, in_gate=True)
    warm_up(runtime)
    runtime.upstream.keep_ready()
    listener = open_listener(config.gate)
    recorder = Recorder(config)
    gate = Gate(listener, runtime, recorder)
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: gate.stop())
    _log(config, "info", event="gate-start", socket=listener.where, pid=os.getpid(),
         uid=os.geteuid(), activated=listener.inherited)
    if os.geteuid() == 0:
        _log(config, "warning", event="gate-runs-as-root",
             reason="run the gate as its own system user (User= in the systemd unit)")
    (ready or _notify_systemd_ready)()
    try:
        gate.run()
    finally:
        listener.close()
        recorder.close()  # what was answered is recorded before the gate goes
        runtime.upstream.close()
        runtime.ledger.close()
        _log(config, "info", event="gate-stop", socket=listener.where, pid=os.getpid())
    return os.EX_OK


def main() -> None:
    """``python -m sendmail_shim.gate``: the gate with the usual config file."""
    from .config import load

    try:
        code = serve(load())
    except (ConfigError, GateError) as exc:
        sys.stderr.write(f"sendmail-shim: {exc}\n")
        code = exc.exit_code if isinstance(exc, GateError) else os.EX_CONFIG
    sys.exit(code)


def warm_up(runtime: Runtime) -> None:
    """Load what every message needs now, so that a broken file stops the start, not a customer."""
    _ = runtime.upstream.tls_context
    runtime.upstream.password()
    _warm_ledger(runtime)


def _warm_ledger(runtime: Runtime) -> None:
    """Open the ledger connection; a missing or outdated schema stops the start.

    A database that is merely down does not: each message then fails closed
    (exit 69) until it is back, and the gate need not be restarted.
    """
    from .ledger import LedgerError, LedgerUnavailable

    try:
        status = runtime.ledger.schema_status()
    except LedgerUnavailable as exc:
        _log(runtime.config, "warning", event="gate-ledger-unavailable", reason=str(exc))
        return
    except LedgerError as exc:
        raise LedgerNotReady(str(exc), exc.exit_code) from None
    if status.pending or status.unknown:
        raise LedgerNotReady(f"the ledger {runtime.ledger.where} is not at this version's schema; "
                             f"run: sendmail-shim db upgrade", os.EX_CONFIG)


# ------------------------------------------------------------------ files the gate guards


def check_private_files(config: Config) -> None:
    """Refuse to start when customers could read or change what the gate protects."""
    _check_ledger_file(config)
    if config.upstream.password_file:
        _check_private(config.upstream.password_file, "upstream.password_file")
    if _PASSWORD_IN_URL.search(config.ledger.url) and _mode(config.path) & stat.S_IROTH:
        raise ExposedSecret(
            f"{config.path} holds the ledger password in [ledger] url and every user can read it; "
            f"run: chmod 640 {config.path} (sendmail reads only [gate] from a file of its own), "
            f"or let PostgreSQL authenticate the gate's user without a password"
        )


def _check_ledger_file(config: Config) -> None:
    from .ledger import Ledger

    ledger = Ledger(config.ledger.url)
    if ledger.dialect != "sqlite" or not os.path.exists(ledger.where):
        return
    _check_private(ledger.where, "ledger.url")
    directory = os.path.dirname(os.path.abspath(ledger.where))
    if _mode(directory) & (stat.S_IWGRP | stat.S_IWOTH):
        raise ExposedSecret(f"{directory}, the ledger's directory, is writable by other users; "
                            f"run: chmod 750 {directory}")


def _check_private(path: str, key: str) -> None:
    mode = _mode(path)
    if mode & (stat.S_IRWXG | stat.S_IRWXO):
        raise ExposedSecret(f"{path} ({key}) is open to other users (mode {stat.S_IMODE(mode):04o}); "
                            f"run: chmod 600 {path}")


def _mode(path: str) -> int:
    try:
        return os.stat(path).st_mode
    except OSError:
        return 0


# ------------------------------------------------------------------ the listening socket


class Listener:
    """The listening socket, bound here or handed over by systemd."""

    def __init__(self, sock: socket.socket, where: str, *, inherited: bool) -> None:
        self.sock, self.where, self.inherited = sock, where, inherited
        self._inode = None if inherited else os.stat(where).st_ino

    def close(self) -> None:
        self.sock.close()
        inode, self._inode = self._inode, None
        if inode is not None:
            # Only our own socket file: a successor may already have bound a new one.
            with contextlib.suppress(OSError):
                if os.stat(self.where).st_ino == inode:
                    os.unlink(self.where)


def open_listener(config: GateConfig) -> Listener:
    inherited = _inherited_socket()
    if inherited is not None:
        return Listener(inherited, config.socket or "(systemd socket)", inherited=True)
    if not config.socket:
        raise UnsafeSocketPlace("[gate] socket is not set; set it (e.g. /run/sendmail-shim/gate.sock)")
    return Listener(_bind(config.socket), config.socket, inherited=False)


def _inherited_socket() -> socket.socket | None:
    """The socket systemd passed (sd_listen_fds protocol), if it is meant for us."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = int(os.environ.get("LISTEN_FDS", "0") or "0")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count < 1:
        return None
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ActivationError("the socket systemd passed is not a UNIX stream socket; "
                              "use ListenStream=/run/sendmail-shim/gate.sock in the .socket unit")
    sock.set_inheritable(False)
    return sock


def _bind(path: str) -> socket.socket:
    _check_socket_directory(os.path.dirname(path))
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o666)  # every local user may submit; the kernel tells us who they are
        sock.listen(128)
    except OSError as exc:
        sock.close()
        raise UnsafeSocketPlace(f"cannot listen on {path} ({exc.strerror}); check the directory") from None
    return sock


def _check_socket_directory(directory: str) -> None:
    if not os.path.isdir(directory):
        try:
            os.mkdir(directory, 0o755)
        except OSError as exc:
            raise UnsafeSocketPlace(
                f"cannot create {directory} ({exc.strerror}); create it owned by root, mode 0755, "
                f"or use the systemd units, which do"
            ) from None
    info = os.stat(directory)
    if info.st_uid not in (0, os.geteuid()) or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        raise UnsafeSocketPlace(
            f"{directory} can be written by users other than root and the gate, so they could "
            f"replace the socket; run: chown root {directory} && chmod 755 {directory}"
        )


def _remove_stale_socket(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise UnsafeSocketPlace(f"{path} exists and is not a socket; remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2)
        probe.connect(path)
    except OSError:
        os.unlink(path)  # left behind by a gate that died
        return
    finally:
        probe.close()
    raise SocketInUse(f"another gate is already listening on {path}; stop it first")


def _notify_systemd_ready() -> None:
    _notify_systemd(b"READY=1")


def _notify_systemd(state: bytes) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.sendto(state, target)
    except OSError:
        pass  # systemd's readiness is a courtesy; the socket is already listening


# ------------------------------------------------------------------ connections


class Gate:
    """Accepts connections, admits them per Unix user, and serves each in a thread."""

    def __init__(self, listener: Listener, runtime: Runtime, recorder: Recorder | None = None) -> None:
        self.listener, self.runtime, self.recorder = listener, runtime, recorder
        self.config = runtime.config
        self.per_uid: dict[int, int] = {}
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)
        self.stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()

    def stop(self) -> None:
        """Stop accepting; ``run`` returns once the requests in progress are done."""
        self.stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def run(self) -> None:
        with selectors.DefaultSelector() as selector:
            self.listener.sock.setblocking(False)
            selector.register(self.listener.sock, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self.stopping.is_set():
                selector.select()
                self._accept_all()
        _notify_systemd(b"STOPPING=1")
        self.listener.close()  # new callers now see a stopped gate (or wait in systemd's socket)
        self._wait_for_requests(SHUTDOWN_GRACE)

    def _accept_all(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: keep serving the others
                _log(self.config, "err", event="gate-accept-failed", reason=exc.strerror)
                time.sleep(0.05)
                return
            self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        pid, uid = peer_credentials(conn)
        limit = self.config.gate.max_connections_per_uid
        with self.lock:
            mine, total = self.per_uid.get(uid, 0), sum(self.per_uid.values())
            busy = mine >= limit or total >= MAX_CONNECTIONS
            if not busy:
                self.per_uid[uid] = mine + 1
        if busy:
            self._refuse_busy(conn, uid, mine >= limit)
            return
        try:
            threading.Thread(target=self._serve, args=(conn, pid, uid), daemon=True,
                             name=f"gate-uid-{uid}").start()
        except RuntimeError:  # no more threads: this caller must try again later
            self._release(uid)
            self._refuse_busy(conn, uid, False)

    def _refuse_busy(self, conn: socket.socket, uid: int, over_own_limit: bool) -> None:
        user = _user_name(uid)
        if over_own_limit:
            line = (f"not sent: the Unix user {user or f'uid {uid}'} already has "
                    f"{self.config.gate.max_connections_per_uid} messages in progress at the mail gate, "
                    f"the most allowed at once; try again in a moment")
        else:
            line = "not sent: the mail gate is busy with as many messages as it takes at once; try again in a moment"
        _log(self.config, "notice", event="gate-busy", uid=uid, user=user, code=69,
             reason="per-user limit" if over_own_limit else "gate full")
        with contextlib.suppress(OSError):
            conn.setblocking(False)  # a fresh socket's buffer takes one small frame
            conn.send(protocol.frame(protocol.VERDICT, _wire(os.EX_UNAVAILABLE, line).encode()))
        conn.close()

    def _release(self, uid: int) -> None:
        with self.lock:
            self.per_uid[uid] -= 1
            if not self.per_uid[uid]:
                del self.per_uid[uid]
            self.idle.notify_all()

    def _wait_for_requests(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        with self.lock:
            while self.per_uid and time.monotonic() < deadline:
                self.idle.wait(max(0.0, deadline - time.monotonic()))

    def _serve(self, conn: socket.socket, pid: int, uid: int) -> None:
        caller = Caller(uid=uid, user=_user_name(uid), pid=pid)  # the name lookup may be slow (NSS)
        try:
            Connection(conn, caller, self.runtime, self.recorder).serve()
        except Exception as exc:  # noqa: BLE001 - one connection's bug must not stop the gate
            _log(self.config, "err", event="gate-internal-error", uid=caller.uid,
                 reason=f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()
            self._release(uid)


def peer_credentials(conn: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process on the other end, as the kernel saw it at connect time."""
    pid, uid, _gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      _PEERCRED.size))
    return pid, uid


def _user_name(uid: int) -> str | None:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


class Recorder:
    """The bookkeeping that follows the answers, several messages to one ledger commit.

    Each connection hands over its Record once it has answered; this thread
    logs and settles whatever is waiting in one transaction, so under load
    the settle-and-record commit (and its fsync) is shared, and a message
    costs about one commit, its reservation's.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self._waiting: queue.SimpleQueue[Record | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="gate-recorder", daemon=True)
        self._thread.start()

    def put(self, record: Record) -> None:
        self._waiting.put(record)

    def close(self) -> None:
        """Record what is still waiting, then stop."""
        self._waiting.put(None)
        self._thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch, stopping = self._take()
            if not batch:
                continue
            try:
                record_together(batch)
            except Exception as exc:  # noqa: BLE001 - a bug in one batch must not stop the bookkeeping
                _log(self.config, "err", event="gate-internal-error", records=len(batch),
                     reason=f"{type(exc).__name__}: {exc}")

    def _take(self) -> tuple[list[Record], bool]:
        """What is waiting now (waiting for the first), and whether the gate is stopping."""
        first = self._waiting.get()
        if first is None:
            return [], True
        batch = [first]
        while len(batch) < MAX_RECORDS_PER_COMMIT:
            try:
                more = self._waiting.get_nowait()
            except queue.Empty:
                break
            if more is None:
                return batch, True
            batch.append(more)
        return batch, False


class Connection:
    """One caller, one message: greeting, arguments, message, verdict."""

    def __init__(self, conn: socket.socket, caller: Caller, runtime: Runtime,
                 recorder: Recorder | None = None) -> None:
        self.conn, self.caller, self.runtime, self.recorder = conn, caller, runtime, recorder
        self.config = runtime.config
        self.deadline = time.monotonic() + self.config.gate.request_timeout

    def serve(self) -> None:
        try:
            self._send(protocol.frame(protocol.GREETING, protocol.GREETING_TEXT))
            argv, upload = self._read_argv()
            verdict, record = self._decide(argv, upload)
        except protocol.PeerClosed:
            self._log_broken("closed before the end of the request", "notice")
            return
        except protocol.PeerTooSlow:
            self._log_broken("not complete in time", "notice")
            self._answer_broken(os.EX_UNAVAILABLE, "not sent: the request was not complete within "
                                f"{self.config.gate.request_timeout:g} seconds")
            return
        except protocol.BadFrame as exc:
            self._log_broken(f"protocol error: {exc}", "warning")
            self._answer_broken(os.EX_PROTOCOL, f"not sent: the request broke the gate protocol ({exc})")
            return
        except OSError as exc:
            self._log_broken(f"connection error: {exc.strerror or exc}", "notice")
            return
        try:
            self._answer(verdict)
        except OSError as exc:  # the caller left; the log has the verdict
            self._log_broken(f"verdict not delivered: {exc.strerror or exc}", "notice")
        finally:
            # The caller is not kept waiting for the log line, the settle and the decision record.
            if record is not None and self.recorder is not None:
                self.recorder.put(record)
            elif record is not None:
                record()
        with contextlib.suppress(protocol.ProtocolError, OSError):
            upload.drain()  # a refusal may come early; the rest of the request goes unread

    def _read_argv(self) -> tuple[list[str], Upload]:
        argv: list[str] = []
        size = 0
        while True:
            kind, payload = protocol.read_frame(self.conn, self.deadline,
                                                protocol.ARG if not argv else
                                                protocol.ARG + protocol.DATA + protocol.END)
            if kind != protocol.ARG:
                return argv, Upload(self.conn, self.deadline, kind, payload)
            size += len(payload)
            if len(argv) >= protocol.MAX_ARGS or size > protocol.MAX_ARGV_BYTES:
                raise protocol.BadFrame(f"more than {protocol.MAX_ARGS} arguments or "
                                        f"{protocol.MAX_ARGV_BYTES} bytes of them")
            argv.append(os.fsdecode(payload))

    def _decide(self, argv: list[str], upload: Upload) -> tuple[Verdict, Record | None]:
        """The verdict and what to record after answering; reading the message stops at its first refusal."""
        try:
            invocation = parse_argv(argv[1:], argv[0])
            if invocation.mode != "deliver":
                raise UsageError(f"{' '.join(argv[1:])[:60]}: -bs, --help and --version are "
                                 f"answered by sendmail itself, not by the mail gate")
            # Returns only after END: a request cut short is never sent.
            raw = read_input(cast(BinaryIO, upload), self.config.message.max_size)
        except (UsageError, MessageError) as exc:
            return refuse(exc, self.caller, self.runtime), None  # recorded at once
        return decide(invocation, raw, self.caller, self.runtime)

    def _answer(self, verdict: Verdict) -> None:
        self._send(protocol.frame(protocol.VERDICT, _wire(verdict.code, verdict.line,
                                                           verdict.smtp_code, verdict.smtp_text).encode()))

    def _answer_broken(self, code: int, line: str) -> None:
        with contextlib.suppress(OSError):
            self._send(protocol.frame(protocol.VERDICT, _wire(code, line).encode()))

    def _send(self, data: bytes) -> None:
        self.conn.settimeout(SEND_TIMEOUT)
        self.conn.sendall(data)

    def _log_broken(self, reason: str, priority: str) -> None:
        _log(self.config, priority, event="gate-request-dropped", uid=self.caller.uid,
             user=self.caller.user, pid=self.caller.pid, reason=reason)


class Upload:
    """The message as it arrives in DATA frames; reading stops at END."""

    def __init__(self, conn: socket.socket, deadline: float, kind: bytes, payload: bytes) -> None:
        self.conn, self.deadline = conn, deadline
        self.ended = kind == protocol.END
        self._pending = b"" if self.ended else payload

    def read(self, size: int = -1) -> bytes:
        while not self._pending and not self.ended:  # an empty DATA frame is not the end
            kind, payload = protocol.read_frame(self.conn, self.deadline, protocol.DATA + protocol.END)
            self.ended = kind == protocol.END
            self._pending = payload
        if size < 0:
            size = len(self._pending)
        piece, self._pending = self._pending[:size], self._pending[size:]
        return piece

    def drain(self) -> None:
        """Read and drop the rest of the message, up to END."""
        while not self.ended:
            self._pending = b""
            self.read()


def _wire(code: int, line: str | None, smtp_code: int | None = None,
          smtp_text: str | None = None) -> protocol.WireVerdict:
    if smtp_code is None or smtp_text is None:
        smtp_code, status = exitcodes.SMTP_REPLIES.get(code, (451, "4.3.0"))
        smtp_text = f"{status} {line or ''}".strip()
    return protocol.WireVerdict(code, line, smtp_code, smtp_text)


def _log(config: Config, priority: str, **fields: object) -> None:
    maillog.write(config.log, fields, priority)


if __name__ == "__main__":
    main()
