"""``GET /metrics`` on ``[metrics] listen``: a small HTTP/1.0 server on its own thread.

It answers one request per connection and closes it. A request has
``REQUEST_TIMEOUT`` seconds and ``MAX_REQUEST`` bytes to arrive, at most
``MAX_SCRAPERS`` are served at once and any more are answered 503 at once: a
scraper that stalls holds one of those slots for a few seconds, never the gate's
socket or its callers. The TCP address is a loopback one (``config check``
refuses others); a UNIX socket is made mode 0660, group the gate's own, so that a
local Prometheus in that group can read it and the sites cannot. The gate binds it
before it gives up root, so it may live in root's ``/run/sendmail-shim``.
"""

from __future__ import annotations

import contextlib
import errno
import os
import selectors
import socket
import threading
import time
from collections.abc import Callable

from .. import trust
from ..config import MetricsConfig
from ..metrics import CONTENT_TYPE
from .errors import MetricsUnavailable
from .listener import clear_stale_socket, socket_place_problem

MAX_REQUEST = 8192  # bytes of request line and headers: a scrape sends a few hundred
REQUEST_TIMEOUT = 5.0  # seconds for the request to arrive and for the answer to be taken
MAX_SCRAPERS = 4
SOCKET_MODE = 0o660


class MetricsServer:
    """Serves ``render()`` as ``/metrics`` until ``close``."""

    def __init__(self, sock: socket.socket, where: str, render: Callable[[], str], path: str | None = None) -> None:
        self.sock, self.where, self.render, self.path = sock, where, render, path
        self._inode = os.stat(path).st_ino if path else None
        self._slots = threading.BoundedSemaphore(MAX_SCRAPERS)
        self._stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()
        self._thread = threading.Thread(target=self._run, name="gate-metrics", daemon=True)

    def start(self) -> MetricsServer:
        self._thread.start()
        return self

    def close(self) -> None:
        self._stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")
        if self._thread.is_alive():
            self._thread.join(timeout=REQUEST_TIMEOUT)
        self.sock.close()
        self._wake_r.close()
        self._wake_w.close()
        if self.path and self._inode is not None:
            with contextlib.suppress(OSError):  # only our own socket file: a successor may have bound one
                if os.stat(self.path).st_ino == self._inode:
                    os.unlink(self.path)

    def _run(self) -> None:
        with selectors.DefaultSelector() as selector:
            self.sock.setblocking(False)
            selector.register(self.sock, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self._stopping.is_set():
                selector.select()
                self._accept_all()

    def _accept_all(self) -> None:
        while not self._stopping.is_set():
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError:  # out of descriptors, say: the scraper tries again at its next interval
                time.sleep(0.05)
                return
            conn.setblocking(True)
            if not self._slots.acquire(blocking=False):
                _answer(conn, 503, "busy: too many scrapes at once\n")
                conn.close()
                continue
            try:
                threading.Thread(target=self._serve, args=(conn,), name="gate-metrics-scrape", daemon=True).start()
            except RuntimeError:
                self._slots.release()
                conn.close()

    def _serve(self, conn: socket.socket) -> None:
        try:
            status, body = self._respond(_read_request(conn))
            _answer(conn, status, body, head_only=body == "" and status == 200)
        except OSError:
            pass  # the scraper went away, or took too long to read
        finally:
            conn.close()
            self._slots.release()

    def _respond(self, request: tuple[str, str] | int) -> tuple[int, str]:
        if isinstance(request, int):
            return request, _REASONS[request].lower() + "\n"
        method, target = request
        if target.split("?", 1)[0] != "/metrics":
            return 404, "not found: the metrics are at /metrics\n"
        if method not in ("GET", "HEAD"):
            return 405, "only GET and HEAD\n"
        try:
            text = self.render()
        except Exception as exc:  # noqa: BLE001 - a broken figure must not stop the server
            return 500, f"the metrics could not be rendered ({type(exc).__name__})\n"
        return 200, "" if method == "HEAD" else text


_REASONS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed", 408: "Request Timeout",
            431: "Request Header Fields Too Large", 500: "Internal Server Error", 503: "Service Unavailable"}


def _read_request(conn: socket.socket) -> tuple[str, str] | int:
    """(method, target) of the request, or the status that refuses it."""
    deadline = time.monotonic() + REQUEST_TIMEOUT
    data = b""
    while b"\r\n\r\n" not in data and b"\n\n" not in data:
        if len(data) >= MAX_REQUEST:
            return 431
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            return 408
        conn.settimeout(remaining)
        try:
            chunk = conn.recv(MAX_REQUEST - len(data))
        except TimeoutError:
            return 408
        if not chunk:
            break
        data += chunk
    parts = data.split(b"\n", 1)[0].decode("latin-1").strip().split()
    if len(parts) != 3 or not parts[2].startswith("HTTP/"):
        return 400
    return parts[0], parts[1]


def _answer(conn: socket.socket, status: int, body: str, head_only: bool = False) -> None:
    payload = body.encode("utf-8")
    content_type = CONTENT_TYPE if status == 200 else "text/plain; charset=utf-8"
    length = len(payload)
    head = (f"HTTP/1.0 {status} {_REASONS[status]}\r\nContent-Type: {content_type}\r\n"
            f"Content-Length: {length}\r\nConnection: close\r\n\r\n").encode("ascii")
    conn.settimeout(REQUEST_TIMEOUT)
    with contextlib.suppress(OSError):
        conn.sendall(head if head_only else head + payload)


# ------------------------------------------------------------------ listening


def open_metrics_server(config: MetricsConfig, render: Callable[[], str],
                        owner: trust.Identity | None = None) -> MetricsServer:
    """The server on ``[metrics] listen`` (not yet started); MetricsUnavailable when it cannot listen.

    ``owner`` is the gate's user: called as root (before privileges are dropped, so that a
    socket can go in root's /run/sendmail-shim), the socket file is given to that user and group.
    """
    if config.unix_socket is not None:
        sock = _bind_unix(config.unix_socket, owner or trust.Identity.of_uid(os.geteuid()))
        return MetricsServer(sock, config.unix_socket, render, config.unix_socket)
    address = config.address
    assert address is not None, "[metrics] listen is validated by config"
    host, port = address
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # a restart need not wait for TIME_WAIT
        sock.bind((host, port))
        sock.listen(16)
    except OSError as exc:
        sock.close()
        fix = ("another program listens there; choose another port" if exc.errno == errno.EADDRINUSE
               else "ports below 1024 need root, which the gate has given up; choose one above 1023"
               if exc.errno == errno.EACCES else "check the address")
        raise MetricsUnavailable(f"[metrics] listen: cannot listen on {config.listen} ({exc.strerror}); "
                                 f"{fix}") from None
    return MetricsServer(sock, config.listen or f"{host}:{port}", render)


def _bind_unix(path: str, owner: trust.Identity) -> socket.socket:
    directory = os.path.dirname(path)
    if not os.path.isdir(directory):
        raise MetricsUnavailable(f"[metrics] listen: {directory} does not exist; create it owned by root or "
                                 f"{owner.name}, mode 0755 (/run/sendmail-shim, which the packaged socket unit "
                                 f"makes, will do)")
    problem = socket_place_problem(directory, owner.uid, owner.name)
    if problem is not None:
        raise MetricsUnavailable(f"[metrics] listen: {problem}")
    _remove_stale(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, SOCKET_MODE)  # the gate's group (a local Prometheus in it) may scrape; the sites may not
        if os.geteuid() == 0:
            os.chown(path, owner.uid, owner.gid)
        sock.listen(16)
    except OSError as exc:
        sock.close()
        raise MetricsUnavailable(f"[metrics] listen: cannot listen on {path} ({exc.strerror})") from None
    return sock


def _remove_stale(path: str) -> None:
    found = clear_stale_socket(path)
    if found == "not a socket":
        raise MetricsUnavailable(f"[metrics] listen: {path} exists and is not a socket; remove it or choose another")
    if found == "in use":
        raise MetricsUnavailable(f"[metrics] listen: another process already serves {path}; stop it first")
