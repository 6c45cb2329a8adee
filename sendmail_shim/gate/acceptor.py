"""Accepting connections: who the caller is (``SO_PEERCRED``), and how many each Unix user may have."""

from __future__ import annotations

import contextlib
import os
import selectors
import socket
import struct
import threading
import time
from collections.abc import Callable

from .. import __version__, exitcodes
from .. import gate_protocol as protocol
from ..config import Config
from ..ledger import iso_utc
from ..pipeline import Caller, Runtime
from .budget import UploadBudget
from .connection import Connection, wire_verdict
from .events import log_event, user_label, user_name
from .guard import TrustGuard
from .instruments import GateMetrics
from .listener import Listener, notify_systemd
from .recorder import Recorder

MAX_CONNECTIONS = 256  # in all, whoever the callers are; each holds at most one message
BUSY_LOG_INTERVAL = 10.0  # one gate-busy line per uid this often, with a count: a flood must not flood the log
SHUTDOWN_GRACE = 30.0
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid


def gate_status(gate: Gate) -> Callable[[], dict[str, object]]:
    """The answer to the ``status`` question: non-secret facts only (see gate_protocol).

    ``config`` is the config the gate runs now (after its last reload); ``restart_needed``
    lists the keys of that file the running gate could not take without a restart.
    """
    started = time.time()

    def status() -> dict[str, object]:
        config, guard = gate.config, gate.guard
        return {"version": __version__, "pid": os.getpid(), "uid": os.geteuid(), "user": guard.identity.name,
                "config": {"path": os.path.abspath(config.path), "sha256": config.sha256,
                           "loaded_at": iso_utc(gate.loaded_at or started),
                           "restart_needed": list(gate.restart_needed)},
                "started_at": iso_utc(started), "trust": {"state": guard.state, "mode": guard.mode},
                "socket": gate.listener.where, "backlog": gate.listener.backlog}

    return status


# ------------------------------------------------------------------ connections


class Gate:
    """Accepts connections, admits them per Unix user, and serves each in a thread."""

    def __init__(self, listener: Listener, runtime: Runtime, guard: TrustGuard,
                 recorder: Recorder | None = None, budget: UploadBudget | None = None,
                 metrics: GateMetrics | None = None) -> None:
        self.listener, self.runtime, self.guard, self.recorder = listener, runtime, guard, recorder
        self.budget, self.metrics = budget, metrics
        self.exit_code = os.EX_OK
        self.loaded_at: float | None = None  # of the last reload; None: the config of the start
        self.restart_needed: tuple[str, ...] = ()
        self.status = gate_status(self)
        guard.on_refuted = self._refuted
        self.per_uid: dict[int, int] = {}
        self.serving: dict[int, int] = {}  # id(runtime) -> connections admitted with it, still open
        self._busy_logged: dict[int, tuple[float, int]] = {}  # uid -> (last line, refusals since)
        self._busy_frames: dict[tuple[int, bool], bytes] = {}
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)
        self.stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        if metrics is not None:
            metrics.active.source = self.active_connections

    def active_connections(self) -> int:
        with self.lock:
            return sum(self.per_uid.values())

    def _count(self, outcome: str) -> None:
        if self.metrics is not None:
            self.metrics.connections.inc(outcome)

    @property
    def config(self) -> Config:
        """The config new connections get (the last one reloaded)."""
        return self.runtime.config

    def _refuted(self) -> None:
        self.exit_code = exitcodes.EX_CONFIG
        self.stop()

    def switch(self, runtime: Runtime, guard: TrustGuard, restart_needed: tuple[str, ...]) -> Runtime:
        """New connections get ``runtime`` from now on; returns the one they got before."""
        guard.on_refuted = self._refuted
        with self.lock:
            old, self.runtime, self.guard = self.runtime, runtime, guard
            self.loaded_at, self.restart_needed = time.time(), restart_needed
            self._busy_frames = {}  # their line names [gate] max_connections_per_uid
        return old

    def wait_until_unused(self, runtime: Runtime) -> None:
        """Until no connection admitted with ``runtime`` is still open."""
        with self.lock:
            while self.serving.get(id(runtime)):
                self.idle.wait()

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
        notify_systemd(b"STOPPING=1")
        self.listener.close()  # new callers now see a stopped gate (or wait in systemd's socket)
        self._wait_for_requests(SHUTDOWN_GRACE)

    def _accept_all(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: keep serving the others
                log_event(self.config, "err", event="gate-accept-failed", reason=exc.strerror)
                time.sleep(0.05)
                return
            self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        # Everything here runs in the one accepting thread: a flood of connections must cost a
        # few system calls each, never a thread, a name lookup or a log line, or the backlog
        # fills and other users' callers find no slot.
        pid, uid = peer_credentials(conn)
        if _hung_up(conn):  # connected and gone again before saying anything: nothing to serve
            conn.close()
            self._count("closed")
            self._log_busy(uid, "closed before the greeting")
            return
        with self.lock:
            runtime = self.runtime  # the connection keeps this config to its end, whatever reloads meanwhile
            limit = runtime.config.gate.max_connections_per_uid
            mine, total = self.per_uid.get(uid, 0), sum(self.per_uid.values())
            busy = mine >= limit or total >= MAX_CONNECTIONS
            if not busy:
                self.per_uid[uid] = mine + 1
                self.serving[id(runtime)] = self.serving.get(id(runtime), 0) + 1
        if busy:
            self._refuse_busy(conn, uid, mine >= limit)
            return
        self._count("accepted")
        try:
            threading.Thread(target=self._serve, args=(conn, pid, uid, runtime), daemon=True,
                             name=f"gate-uid-{uid}").start()
        except RuntimeError:  # no more threads: this caller must try again later
            self._release(uid, runtime)
            self._refuse_busy(conn, uid, False)

    def _refuse_busy(self, conn: socket.socket, uid: int, over_own_limit: bool) -> None:
        """Answer 69 and close, at once: a prepared frame, one send that never waits."""
        with contextlib.suppress(OSError):  # a fresh socket's buffer takes one small frame
            conn.send(self._busy_frame(uid, over_own_limit), socket.MSG_DONTWAIT)
        conn.close()
        self._count("busy" if over_own_limit else "full")
        self._log_busy(uid, "per-user limit" if over_own_limit else "gate full")

    def _busy_frame(self, uid: int, over_own_limit: bool) -> bytes:
        key = (uid, over_own_limit)
        frame = self._busy_frames.get(key)
        if frame is None:
            if over_own_limit:
                line = (f"not sent: the Unix user {user_label(uid)} already has "
                        f"{self.config.gate.max_connections_per_uid} messages in progress at the mail gate, "
                        f"the most allowed at once; try again in a moment")
            else:
                line = ("not sent: the mail gate is busy with as many messages as it takes at once; "
                        "try again in a moment")
            frame = protocol.frame(protocol.VERDICT, wire_verdict(exitcodes.EX_UNAVAILABLE, line).encode())
            if len(self._busy_frames) < 4096:
                self._busy_frames[key] = frame
        return frame

    def _log_busy(self, uid: int, reason: str) -> None:
        now = time.monotonic()
        last, count = self._busy_logged.get(uid, (-BUSY_LOG_INTERVAL, 0))
        if now - last < BUSY_LOG_INTERVAL:
            self._busy_logged[uid] = (last, count + 1)
            return
        self._busy_logged[uid] = (now, 0)
        log_event(self.config, "notice", event="gate-busy", uid=uid, refused_since_last=count, reason=reason)

    def _release(self, uid: int, runtime: Runtime) -> None:
        with self.lock:
            self.per_uid[uid] -= 1
            if not self.per_uid[uid]:
                del self.per_uid[uid]
            self.serving[id(runtime)] -= 1
            if not self.serving[id(runtime)]:
                del self.serving[id(runtime)]
            self.idle.notify_all()

    def _wait_for_requests(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        with self.lock:
            while self.per_uid and time.monotonic() < deadline:
                self.idle.wait(max(0.0, deadline - time.monotonic()))

    def _serve(self, conn: socket.socket, pid: int, uid: int, runtime: Runtime) -> None:
        caller = Caller(uid=uid, user=user_name(uid), pid=pid)  # the name lookup may be slow (NSS)
        try:
            Connection(conn, caller, runtime, self.status, self.recorder, self.budget, self.metrics).serve()
        except Exception as exc:  # noqa: BLE001 - one connection's bug must not stop the gate
            log_event(runtime.config, "err", event="gate-internal-error", uid=caller.uid,
                 reason=f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()
            self._release(uid, runtime)


def _hung_up(conn: socket.socket) -> bool:
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def peer_credentials(conn: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process on the other end, as the kernel saw it at connect time."""
    pid, uid, _gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      _PEERCRED.size))
    return pid, uid
