"""The gate protocol: how ``sendmail`` hands one message to the gate.

The gate listens on a UNIX stream socket (``[gate] socket``). Everything on
the connection is a frame::

    +---------+---------------------------+-----------------+
    | type    | length                    | payload         |
    | 1 byte  | 4 bytes, unsigned, big-   | length bytes    |
    |         | endian (network order)    |                 |
    +---------+---------------------------+-----------------+

Frame types (ASCII letters) and the largest payload each may carry:

    G  GREETING  gate -> client   ``sendmail-shim-gate 1``          64 bytes
    A  ARG       client -> gate   one argv element                8 KiB
    D  DATA      client -> gate   the next piece of the message  64 KiB
    E  END       client -> gate   empty: the message is complete      0
    V  VERDICT   gate -> client   the outcome (below)              4 KiB
    Q  QUERY     client -> gate   a question instead of a message    64 bytes
    S  STATUS    gate -> client   the answer to a QUERY, JSON      4 KiB

One connection carries one message, in this order::

    gate   -> GREETING            (or a VERDICT refusing the connection)
    client -> ARG                 the program name, as sendmail saw it
    client -> ARG ...             each command-line argument, in order
    client -> DATA ...            the message bytes as read from stdin
    client -> END
    gate   -> VERDICT             then the gate closes the connection

The gate speaks first, so a refused connection (too many at once from one
Unix user, the gate stopping) is answered before the client sends anything.
A request has at most 4096 ARG frames holding at most 256 KiB together
(``MAX_ARGS``, ``MAX_ARGV_BYTES``); ``sendmail`` checks this before it
connects, and the gate answers a request past either bound with exit 64 and
the same line (``argv_too_long``). The message may not exceed the gate's
``[message] max_size``.

A connect refused for a full listen backlog (EAGAIN) is retried with jittered
backoff (5 ms doubling to 200 ms, each wait times a factor in [0.5, 1.5])
until ``[gate] request_timeout``, each wait spent inside ``connect()``; then
``sendmail`` says the gate is busy (69), not that it is not running.

Before one byte is sent, ``sendmail`` checks who listens: the peer's uid
(``SO_PEERCRED``) must be 0 or the gate's (``[gate] user``, else the owner of
the socket file). A process of any other user is never sent a message.

Instead of ARG frames a client may send one QUERY frame naming a question;
the gate answers one STATUS frame and closes the connection. Only root and
the gate's own user are answered; anyone else gets a VERDICT refusing. The
answer is a JSON object of non-secret facts, never a key, a password or a
customer's data. Questions:

    status    {"version", "pid", "uid", "config": {"path", "sha256",
              "loaded_at", "restart_needed"}, "started_at", "trust", "socket", "backlog"}
              (times ISO 8601 UTC): which config the running gate loaded,
              to compare with the file on disk.

Unknown questions are answered with ``{"error": "unknown question"}``.

VERDICT payload: the exit code (1 byte), the SMTP reply code for ``-bs``
(2 bytes, big-endian), then UTF-8 text: the stderr line (empty when there is
none), a line feed, and the SMTP reply text.

Two clients speak it: ``gate_client`` (Python) and ``native/sendmail.c``,
which follow the same rules on the client's side too, line for line: the
argument list is checked against MAX_ARGS, MAX_ARGV_BYTES and ARG's maximum
before connecting (exit 64); a connect refused for a full listen backlog is
retried with jittered backoff until ``request_timeout``; and before one byte
is exchanged the peer (``SO_PEERCRED``) must be root or the gate's user
(``[gate] user``, else the socket file's owner).

The client's identity is never in the protocol: the gate asks the kernel
(``SO_PEERCRED``). Anything else -- an unknown type, a frame out of order, a
length over its type's maximum, the connection closing before END, or a
request not complete within ``[gate] request_timeout`` -- ends the connection
and nothing is sent.

Standard library only: the ``sendmail`` client imports this on every call.
"""

from __future__ import annotations

import time

TYPE_CHECKING = False
if TYPE_CHECKING:
    from _socket import socket

VERSION = 1
GREETING_TEXT = b"sendmail-shim-gate %d" % VERSION

GREETING = b"G"
ARG = b"A"
DATA = b"D"
END = b"E"
VERDICT = b"V"
QUERY = b"Q"
STATUS = b"S"

MAX_PAYLOAD = {GREETING: 64, ARG: 8192, DATA: 64 * 1024, END: 0, VERDICT: 4096, QUERY: 64, STATUS: 4096}
MAX_ARGS = 4096
MAX_ARGV_BYTES = 256 * 1024
DATA_CHUNK = MAX_PAYLOAD[DATA]
HEADER_SIZE = 5
_VERDICT_PART = 2000


def argv_too_long(sizes: list[int]) -> str | None:
    """The line for an argument list past the bounds (``sizes``: each ARG payload's bytes), else None.

    ``sendmail`` prints it (after ``sendmail: ``) and exits 64 without
    connecting; the gate answers it to a client that did not check.
    """
    return argv_counts_too_long(len(sizes), sum(sizes), max(sizes, default=0))


def argv_counts_too_long(count: int, total: int, longest: int) -> str | None:
    """``argv_too_long`` from running counts (the gate keeps no list of a hostile client's frames)."""
    if total > MAX_ARGV_BYTES:
        return f"argument list too long ({total} bytes; at most {MAX_ARGV_BYTES})"
    if count > MAX_ARGS:
        return f"argument list too long ({count} arguments; at most {MAX_ARGS})"
    if longest > MAX_PAYLOAD[ARG]:
        return f"argument list too long (one argument of {longest} bytes; at most {MAX_PAYLOAD[ARG]})"
    return None


def iso_utc(at: float) -> str:
    """Epoch seconds as ISO 8601 UTC with microseconds, as every time in a STATUS answer."""
    from datetime import UTC, datetime

    return datetime.fromtimestamp(at, UTC).isoformat(timespec="microseconds").replace("+00:00", "Z")


class ProtocolError(Exception):
    """The peer broke the protocol or went away; ``str(exc)`` says how."""


class PeerClosed(ProtocolError):
    """The connection ended before the expected frame."""


class PeerTooSlow(ProtocolError):
    """The deadline passed while waiting for the peer."""


class BadFrame(ProtocolError):
    """A frame of an unknown type, out of order, or too long for its type."""


def frame(kind: bytes, payload: bytes = b"") -> bytes:
    """One frame, ready to send; refuses a payload over its type's maximum."""
    limit = MAX_PAYLOAD.get(kind)
    if limit is None:
        raise BadFrame(f"unknown frame type {kind!r}")
    if len(payload) > limit:
        raise BadFrame(f"a {kind.decode()} frame may carry at most {limit} bytes, not {len(payload)}")
    return kind + len(payload).to_bytes(4, "big") + payload


def read_frame(sock: socket, deadline: float, expected: bytes) -> tuple[bytes, bytes]:
    """The next frame as (type, payload); its type must be one of ``expected``.

    The length is checked against the type's maximum before any payload is
    read, so an absurd length costs nothing but the five header bytes.
    """
    header = _read_exactly(sock, HEADER_SIZE, deadline)
    kind, length = header[:1], int.from_bytes(header[1:], "big")
    if kind not in MAX_PAYLOAD or kind not in expected:
        raise BadFrame(f"unexpected frame type {kind!r} (expected one of {expected!r})")
    if length > MAX_PAYLOAD[kind]:
        raise BadFrame(f"a {kind.decode()} frame of {length} bytes is over the limit of {MAX_PAYLOAD[kind]}")
    return kind, _read_exactly(sock, length, deadline) if length else b""


def _read_exactly(sock: socket, size: int, deadline: float) -> bytes:
    buffer = bytearray(size)
    view = memoryview(buffer)
    got = 0
    while got < size:
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise PeerTooSlow("the peer did not finish in time")
        sock.settimeout(remaining)
        try:
            count = sock.recv_into(view[got:])
        except TimeoutError:
            raise PeerTooSlow("the peer did not finish in time") from None
        if count == 0:
            raise PeerClosed("the connection closed in the middle of the request")
        got += count
    return bytes(buffer)


class WireVerdict:
    """The outcome as it crosses the socket: what ``sendmail`` prints and exits with."""

    __slots__ = ("code", "line", "smtp_code", "smtp_text")

    def __init__(self, code: int, line: str | None, smtp_code: int, smtp_text: str) -> None:
        self.code, self.line, self.smtp_code, self.smtp_text = code, line, smtp_code, smtp_text

    def encode(self) -> bytes:
        # Each part is cut to fit on its own, so the separator always survives.
        line = _one_line(self.line or "").encode("utf-8", "replace")[:_VERDICT_PART]
        text = _one_line(self.smtp_text).encode("utf-8", "replace")[:_VERDICT_PART]
        return self.code.to_bytes(1, "big") + self.smtp_code.to_bytes(2, "big") + line + b"\n" + text

    @classmethod
    def decode(cls, payload: bytes) -> WireVerdict:
        if len(payload) < 4:
            raise BadFrame("the verdict is too short")
        code, smtp_code = payload[0], int.from_bytes(payload[1:3], "big")
        line, newline, text = payload[3:].decode("utf-8", "replace").partition("\n")
        if not newline or not 100 <= smtp_code <= 599:
            raise BadFrame("the verdict is malformed")
        return cls(code, line or None, smtp_code, text)


def _one_line(text: str) -> str:
    """No line break may reach the caller's stderr or SMTP dialogue from here."""
    return "".join(c if c.isprintable() else " " for c in text)
