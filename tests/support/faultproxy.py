"""A TCP fault proxy on loopback, after the toxics of Toxiproxy: pass bytes through,
or reset or stall the connection after the client has sent a given number of bytes.

TLS passes through it untouched (it counts bytes, it does not read them), so
"after 100 000 bytes" lands in the middle of a large message's DATA.
"""

from __future__ import annotations

import contextlib
import socket
import struct
import threading

from tests.support.upstream import free_port


class FaultProxy:
    def __init__(self, target_port: int, *, mode: str = "pass", after: int = 0) -> None:
        assert mode in ("pass", "reset", "stall")
        self.target_port, self.mode, self.after = target_port, mode, after
        self.port = free_port()
        self.listener = socket.socket()
        self.listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        self.listener.bind(("127.0.0.1", self.port))
        self.listener.listen(16)
        self.faulted = threading.Event()  # set when the fault has happened
        self._open: list[socket.socket] = []
        self._closing = False

    def __enter__(self) -> FaultProxy:
        threading.Thread(target=self._accept, daemon=True).start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._closing = True
        self.listener.close()
        for sock in self._open:
            with contextlib.suppress(OSError):
                sock.close()

    def _accept(self) -> None:
        while not self._closing:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            server = socket.create_connection(("127.0.0.1", self.target_port))
            self._open += [client, server]
            threading.Thread(target=self._pump, args=(client, server, True), daemon=True).start()
            threading.Thread(target=self._pump, args=(server, client, False), daemon=True).start()

    def _pump(self, source: socket.socket, sink: socket.socket, upstream_bound: bool) -> None:
        sent = 0
        try:
            while True:
                data = source.recv(16384)
                if not data:
                    sink.shutdown(socket.SHUT_WR)
                    return
                if upstream_bound and self.mode != "pass" and sent + len(data) > self.after:
                    sink.sendall(data[: self.after - sent])
                    self._fault(source, sink)
                    return
                sent += len(data)
                sink.sendall(data)
        except OSError:
            return

    def _fault(self, client: socket.socket, server: socket.socket) -> None:
        self.faulted.set()
        if self.mode == "reset":
            for sock in (client, server):
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                sock.close()
        # "stall": stop forwarding and keep both connections open until the test ends
