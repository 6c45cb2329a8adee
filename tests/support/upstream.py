"""A real SMTP upstream on loopback: aiosmtpd with STARTTLS and trustme certificates.

It records every transaction as it arrived (envelope, MAIL/RCPT parameters,
the DATA bytes) and can be scripted to refuse at any stage.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import ssl
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import trustme
from aiosmtpd.controller import Controller
from aiosmtpd.smtp import SMTP, AuthResult, LoginPassword


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@dataclass
class Received:
    mail_from: str
    rcpt_tos: list[str]
    mail_options: list[str]
    rcpt_options: list[str]
    data: bytes
    tls: bool
    authenticated: bool

    @property
    def headers(self) -> dict[str, list[str]]:
        from email.parser import BytesHeaderParser

        parsed = BytesHeaderParser().parsebytes(self.data)
        out: dict[str, list[str]] = {}
        for name, value in parsed.items():
            out.setdefault(name.lower(), []).append(str(value))
        return out

    @property
    def body(self) -> bytes:
        return self.data.split(b"\r\n\r\n", 1)[1] if b"\r\n\r\n" in self.data else b""


@dataclass
class Script:
    """Replies to give instead of accepting, keyed by stage: 'MAIL', 'RCPT', 'RCPT:<addr>',
    'DATA-COMMAND' (the reply to DATA itself, instead of 354) and 'DATA' (after the final dot)."""

    replies: dict[str, str] = field(default_factory=dict)
    drop_ehlo: tuple[str, ...] = ()
    drop_after_data: bool = False  # store the message, then cut the connection before the reply
    on_data: Callable[[], None] | None = None  # called once the message is stored, before the reply
    # Seconds to wait before answering, by stage: 'MAIL', 'RCPT', and 'DATA' (after the final dot;
    # the message is stored first). The server serves other connections meanwhile.
    delays: dict[str, float] = field(default_factory=dict)


class _Handler:
    def __init__(self, upstream: SmtpUpstream) -> None:
        self.upstream = upstream

    async def handle_EHLO(self, server: SMTP, session: Any, envelope: Any, hostname: str,
                          responses: list[str]) -> list[str]:
        session.host_name = hostname
        if session.ssl is not None:
            self.upstream.secured_sessions += 1
        drop = tuple(d.upper() for d in self.upstream.script.drop_ehlo)
        return [r for r in responses if not r[4:].upper().startswith(drop)]

    async def handle_MAIL(self, server: SMTP, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        await self.upstream.delay("MAIL")
        reply = self.upstream.script.replies.get("MAIL")
        if reply:
            return reply
        envelope.mail_from = address
        envelope.mail_options.extend(options)
        return "250 OK"

    async def handle_RCPT(self, server: SMTP, session: Any, envelope: Any, address: str,
                          options: list[str]) -> str:
        await self.upstream.delay("RCPT")
        replies = self.upstream.script.replies
        reply = replies.get(f"RCPT:{address}") or replies.get("RCPT")
        if reply:
            return reply
        envelope.rcpt_tos.append(address)
        envelope.rcpt_options.extend(options)
        return "250 OK"

    async def handle_DATA(self, server: SMTP, session: Any, envelope: Any) -> str:
        reply = self.upstream.script.replies.get("DATA")
        if reply:
            await self.upstream.delay("DATA")
            return reply
        self.upstream.received.append(Received(
            mail_from=envelope.mail_from,
            rcpt_tos=list(envelope.rcpt_tos),
            mail_options=list(envelope.mail_options),
            rcpt_options=list(envelope.rcpt_options),
            data=bytes(envelope.original_content or envelope.content),
            tls=session.ssl is not None,
            authenticated=bool(session.authenticated),
        ))
        if self.upstream.script.on_data is not None:
            self.upstream.script.on_data()
        await self.upstream.delay("DATA")
        if self.upstream.script.drop_after_data:
            server.transport.abort()  # the reply to the final dot is lost
        return "250 2.0.0 queued as TEST"


class _ScriptedSMTP(SMTP):
    """aiosmtpd's server, with a scripted answer to the DATA command itself."""

    def __init__(self, upstream: SmtpUpstream, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.upstream = upstream

    async def smtp_DATA(self, arg: str) -> None:
        reply = self.upstream.script.replies.get("DATA-COMMAND")
        if reply and self.envelope is not None and self.envelope.rcpt_tos:
            await self.push(reply)
            return
        await super().smtp_DATA(arg)


class _Controller(Controller):
    def __init__(self, upstream: SmtpUpstream, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.upstream = upstream

    def factory(self) -> SMTP:
        return _ScriptedSMTP(self.upstream, self.handler, **self.SMTP_kwargs)


class SmtpUpstream:
    """``with SmtpUpstream(ca) as up:`` … ``up.received``.

    With ``credentials`` the relay requires AUTH before MAIL, as a provider's
    relay must; ``trust_addresses`` makes it take mail without AUTH too, as a
    relay that trusts the web server's address does.
    """

    def __init__(self, ca: trustme.CA | None, *, cert_ca: trustme.CA | None = None,
                 smtputf8: bool = True, credentials: tuple[str, str] | None = None,
                 script: Script | None = None, hostname: str = "127.0.0.1", port: int | None = None,
                 trust_addresses: bool = False, idle_timeout: float | None = None) -> None:
        self.port = port or free_port()
        self.host = hostname
        self.received: list[Received] = []
        self.secured_sessions = 0  # EHLO inside TLS: one per secured connection
        self.script = script or Script()
        self.auth_attempts: list[tuple[str, str]] = []
        tls = None
        if ca is not None:
            tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
            (cert_ca or ca).issue_cert("127.0.0.1", "localhost").configure_cert(tls)
        kwargs: dict[str, Any] = {
            "tls_context": tls, "require_starttls": tls is not None,
            "enable_SMTPUTF8": smtputf8, "decode_data": False,
        }
        if idle_timeout is not None:  # close a connection that says nothing for this long
            kwargs["timeout"] = idle_timeout
        if credentials is not None:
            # As the provider's relay must be: no MAIL without AUTH (unless told to trust addresses).
            kwargs.update(authenticator=self._authenticator(credentials), auth_require_tls=True,
                          auth_required=not trust_addresses)
        self.controller = _Controller(self, _Handler(self), hostname="127.0.0.1", port=self.port, **kwargs)

    def _authenticator(self, credentials: tuple[str, str]) -> Any:
        def check(server: Any, session: Any, envelope: Any, mechanism: str, data: Any) -> AuthResult:
            if isinstance(data, LoginPassword):
                user, password = data.login.decode(), data.password.decode()
                self.auth_attempts.append((user, password))
                return AuthResult(success=(user, password) == credentials, handled=False)
            return AuthResult(success=False, handled=False)
        return check

    def __enter__(self) -> SmtpUpstream:
        self.controller.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.controller.stop()

    async def delay(self, stage: str) -> None:
        seconds = self.script.delays.get(stage, 0.0)
        if seconds:
            await asyncio.sleep(seconds)

    def wait_for(self, count: int, timeout: float = 10.0) -> list[Received]:
        deadline = time.monotonic() + timeout
        while len(self.received) < count and time.monotonic() < deadline:
            time.sleep(0.02)
        return self.received


class RawServer:
    """A scripted SMTP peer that records every byte the client sends.

    Without ``tls`` it proves that nothing but EHLO/STARTTLS crosses the wire
    before TLS. With ``tls`` it answers STARTTLS with 220 followed, in the same
    segment, by ``inject`` (the STARTTLS response-injection attack), then
    speaks SMTP inside TLS and records what it hears there in ``seen_in_tls``;
    ``tls_replies`` answers chosen commands there (by verb, such as ``b"MAIL"``)
    with given bytes. ``closed_by_client`` counts TLS sessions the client ended.
    """

    def __init__(self, *, greeting: bytes = b"220 raw.test ESMTP\r\n",
                 ehlo: bytes = b"250-raw.test\r\n250 8BITMIME\r\n",
                 starttls: bytes = b"454 4.7.0 TLS not available\r\n",
                 tls: ssl.SSLContext | None = None, inject: bytes = b"",
                 tls_replies: dict[bytes, bytes] | None = None) -> None:
        self.greeting, self.ehlo, self.starttls = greeting, ehlo, starttls
        self.tls, self.inject = tls, inject
        self.tls_replies = tls_replies or {}
        self.closed_by_client = 0
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(5)
        self.port = int(self.sock.getsockname()[1])
        self.seen = bytearray()
        self.seen_in_tls = bytearray()
        self.messages: list[bytes] = []
        self._stop = False
        self.thread = threading.Thread(target=self._serve, daemon=True)

    def __enter__(self) -> RawServer:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop = True
        self.sock.close()

    def _serve(self) -> None:
        while not self._stop:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            with conn, contextlib.suppress(OSError, ssl.SSLError):
                self._talk(conn)

    def _talk(self, conn: socket.socket) -> None:
        conn.settimeout(5)
        conn.sendall(self.greeting)
        reader = conn.makefile("rb")
        for line in reader:
            self.seen += line
            verb = line.split(b" ", 1)[0].strip().upper()
            if verb in (b"EHLO", b"HELO"):
                conn.sendall(self.ehlo)
            elif verb == b"STARTTLS" and self.tls is not None:
                conn.sendall(b"220 2.0.0 go ahead\r\n" + self.inject)
                with self.tls.wrap_socket(conn, server_side=True) as secure:
                    self._talk_in_tls(secure)
                return
            elif verb == b"STARTTLS":
                conn.sendall(self.starttls)
            elif verb == b"QUIT":
                conn.sendall(b"221 bye\r\n")
                return
            else:
                conn.sendall(b"250 ok\r\n")

    def _talk_in_tls(self, conn: ssl.SSLSocket) -> None:
        reader = conn.makefile("rb")
        with contextlib.suppress(ssl.SSLEOFError):  # a close without TLS close_notify is still an end
            for line in reader:
                self.seen_in_tls += line
                verb = line.split(b" ", 1)[0].strip().upper()
                if verb in self.tls_replies:
                    conn.sendall(self.tls_replies[verb])
                elif verb in (b"EHLO", b"HELO"):
                    conn.sendall(b"250-raw.test\r\n250 8BITMIME\r\n")
                elif verb == b"DATA":
                    conn.sendall(b"354 go on\r\n")
                    data = bytearray()
                    for data_line in reader:
                        if data_line == b".\r\n":
                            break
                        data += data_line
                    self.messages.append(bytes(data))
                    conn.sendall(b"250 2.0.0 stored\r\n")
                elif verb == b"QUIT":
                    conn.sendall(b"221 bye\r\n")
                    return
                else:
                    conn.sendall(b"250 ok\r\n")
        self.closed_by_client += 1  # the stream ended without QUIT: the client closed it


def write_ca(ca: trustme.CA, directory: Path) -> Path:
    path = directory / "ca.pem"
    ca.cert_pem.write_to_path(str(path))
    return path
