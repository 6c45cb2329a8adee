"""A stand-in for the gate on a UNIX socket: it records what a client sends and answers as told.

It runs in the test process (as the test's user, so a client accepts it as root or as the
socket's owner). Its answers may be anything: a proper verdict, a wrong greeting, an
oversize or truncated frame, garbage, or silence.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

from sendmail_shim import gate_protocol as protocol

GREETING = protocol.frame(protocol.GREETING, protocol.GREETING_TEXT)
GIVE_UP = 30.0  # a connection the test forgot ends by itself


def verdict(code: int, line: str | None, smtp_code: int = 250, smtp_text: str = "2.0.0 ok") -> bytes:
    return protocol.frame(protocol.VERDICT, protocol.WireVerdict(code, line, smtp_code, smtp_text).encode())


@dataclass(frozen=True)
class Script:
    """What the fake gate does on each connection.

    ``mode``: "normal" reads the request up to END (or the client's close) and then
    answers; "at_once" answers right after the greeting and then drains the request;
    "deaf" greets and never reads; "close" greets and hangs up; "silent" reads the
    request up to END and hangs up without answering (a gate that died after relaying). With ``hold`` the
    connection stays open after the answer, and what else arrives is counted, until
    the test releases it (a gate that never says more).
    """

    greeting: bytes = GREETING
    answer: bytes = verdict(0, None)
    mode: str = "normal"
    hold: bool = False


@dataclass
class Recorded:
    frames: list[tuple[bytes, bytes]] = field(default_factory=list)
    received: int = 0  # bytes, framed or not


class FakeGate:
    def __init__(self, directory: Path, script: Script | None = None, *, backlog: int = 16,
                 accepting: bool = True) -> None:
        self.path = directory / "gate.sock"
        self.script = script or Script()
        self.connections: list[Recorded] = []
        self.released = threading.Event()  # set: connections held open may close
        self.accepting = threading.Event()  # clear: connections wait in the listen backlog
        if accepting:
            self.accepting.set()
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.listener.bind(str(self.path))
        os.chmod(self.path, 0o666)
        self.listener.listen(backlog)
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._accepting = threading.Thread(target=self._accept_loop, daemon=True)
        self._accepting.start()

    def __enter__(self) -> FakeGate:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        self._stop.set()
        self.released.set()
        with contextlib.suppress(OSError):
            self.listener.shutdown(socket.SHUT_RDWR)
        self.listener.close()
        self._accepting.join(5)
        for thread in self._threads:
            thread.join(5)
        with contextlib.suppress(OSError):
            self.path.unlink()

    def _accept_loop(self) -> None:
        while not self._stop.is_set():
            if not self.accepting.wait(0.1):
                continue
            ready, _, _ = select.select([self.listener], [], [], 0.1)
            if not ready:
                continue
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            record = Recorded()
            self.connections.append(record)
            thread = threading.Thread(target=self._serve, args=(conn, self.script, record), daemon=True)
            self._threads.append(thread)
            thread.start()

    def _serve(self, conn: socket.socket, script: Script, record: Recorded) -> None:
        with conn:
            conn.settimeout(GIVE_UP)
            with contextlib.suppress(OSError):
                conn.sendall(script.greeting)
                if script.mode == "at_once":
                    conn.sendall(script.answer)
                if script.mode in ("normal", "at_once", "silent"):
                    _read_request(conn, record)
                if script.mode == "normal":
                    conn.sendall(script.answer)
                if script.mode == "deaf":
                    self.released.wait(GIVE_UP)
                elif script.hold:
                    self._count_the_rest(conn, record)

    def _count_the_rest(self, conn: socket.socket, record: Recorded) -> None:
        conn.settimeout(0.05)
        while not self.released.is_set():
            try:
                chunk = conn.recv(65536)
            except TimeoutError:
                continue
            if not chunk:
                return
            record.received += len(chunk)


def _read_request(conn: socket.socket, record: Recorded) -> None:
    """Frames up to END or the client's close, whatever they hold."""
    deadline = time.monotonic() + GIVE_UP
    while time.monotonic() < deadline:
        header = _exactly(conn, protocol.HEADER_SIZE, record)
        if header is None:
            return
        length = int.from_bytes(header[1:], "big")
        payload = _exactly(conn, length, record) if length <= 1 << 20 else None
        if payload is None:
            return
        record.frames.append((header[:1], payload))
        if header[:1] == protocol.END:
            return


def _exactly(conn: socket.socket, size: int, record: Recorded) -> bytes | None:
    data = bytearray()
    while len(data) < size:
        chunk = conn.recv(size - len(data))
        if not chunk:
            return None
        record.received += len(chunk)
        data += chunk
    return bytes(data)


def request_of(record: Recorded) -> tuple[list[bytes], bytes, bool]:
    """(ARG payloads, the DATA bytes joined, whether END came), from a recorded connection."""
    args = [payload for kind, payload in record.frames if kind == protocol.ARG]
    data = b"".join(payload for kind, payload in record.frames if kind == protocol.DATA)
    return args, data, any(kind == protocol.END for kind, _ in record.frames)
