"""SMTP to the provider's upstream, with mandatory, verified STARTTLS.

Nothing but EHLO and STARTTLS is sent before TLS: no MAIL FROM, no AUTH, no
data. The certificate is checked against the system store (or
``[upstream] ca_file``) and the host name (or ``tls_server_name``). After the
handshake any bytes the server sent early are discarded and EHLO is sent
again (the STARTTLS command-injection class).

Every failure is classified as temporary (a later attempt may work) or
permanent (the upstream said no with a 5xx reply); a failure after the final
dot, before its reply, is *uncertain*: the upstream may have the message. A
reply line too long to read is a protocol error, not a reply: temporary,
whatever code it began with.

Each stage waits as long as RFC 5321 section 4.5.3.2 says (``[upstream]
greeting_timeout`` ... ``dot_timeout``). The synchronous path, whose caller
(PHP) is blocked, also bounds each command by ``[upstream] timeout`` and the
whole attempt by ``sync_timeout``; when that budget runs out while the end of
data waits for its reply, ``ReplyPending`` hands the open connection on, so
that the reply can still be awaited for the rest of ``dot_timeout``.
"""

from __future__ import annotations

import os
import re
import select
import smtplib
import socket
import ssl
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass

from .config import ConfigError, UpstreamConfig, check_private_file
from .encoding import for_upstream
from .envelope import Envelope
from .message import Message


class RelayError(Exception):
    """The upstream did not take the message."""

    temporary = True
    site_problem = False  # the relay itself is misbehaving: worth a loud log line for the admin
    uncertain = False  # the final dot went unanswered: the upstream may have the message
    rcpt: RelayResult | None = None  # what each recipient got at RCPT, when the refusal came there

    def __init__(self, text: str, *, stage: str = "", code: int | None = None) -> None:
        super().__init__(text)
        self.stage, self.code = stage, code


class UpstreamRefused(RelayError):
    """A permanent (5xx) refusal: retrying the same message will not help."""

    temporary = False


class UpstreamUnavailable(RelayError):
    """Unreachable, timed out, or a temporary (4xx) reply."""


class UpstreamInsecure(UpstreamUnavailable):
    """No STARTTLS offered, or the TLS handshake or certificate check failed."""

    site_problem = True


class UpstreamProtocolError(UpstreamUnavailable):
    """The upstream broke SMTP (a reply line over the limit): the connection was closed unread."""

    site_problem = True


class UpstreamMisconfigured(UpstreamUnavailable):
    """The relay refuses us as a client (greeting, EHLO, AUTH): the admin's problem, not the message's."""

    site_problem = True


class UpstreamUncertain(UpstreamUnavailable):
    """The whole message and the final dot were sent, but no reply came: it may have been delivered.

    ``result`` says what the recipients got at RCPT (its code is 0: no reply to the data).
    """

    uncertain = True

    def __init__(self, text: str, result: RelayResult) -> None:
        super().__init__(text, stage="the end of data")
        self.result = result


class ReplyPending(UpstreamUnavailable):  # noqa: N818 - not yet a failure: the reply may still come
    """The synchronous budget ran out after the final dot; ``pending`` waits on for the reply.

    Whoever catches it owns the open connection: ``pending.finish()`` or ``pending.abandon()``.
    """

    uncertain = True  # to whoever does not wait on: the upstream may have the message

    def __init__(self, pending: PendingReply) -> None:
        super().__init__(f"the upstream {pending.host} has not answered the end of data within "
                         f"{pending.waited:g} s, the most a caller waits ([upstream] sync_timeout)",
                         stage="the end of data")
        self.pending = pending


@dataclass(frozen=True)
class RecipientReply:
    address: str
    code: int
    text: str


@dataclass(frozen=True)
class RelayResult:
    """What the upstream did with each recipient of one transaction."""

    code: int
    text: str
    accepted: tuple[str, ...]
    deferred: tuple[RecipientReply, ...] = ()  # 4xx at RCPT: try again in a new transaction
    refused: tuple[RecipientReply, ...] = ()  # 5xx at RCPT: will never take it


# Reuse of secured connections (the gate): how long one may wait idle, how long one may live
# at all (as Postfix's smtp_connection_reuse_time_limit), and how many may wait at once.
REUSE_IDLE_SECONDS = 30.0
REUSE_MAX_AGE_SECONDS = 300.0
REUSE_MAX_IDLE = 8
# A connection whose last reply came this recently is used without an RSET probe first; if
# it turns out closed after all, MAIL gets no answer and a fresh connection takes the message.
REUSE_TRUSTED_SECONDS = 2.0
# The gate keeps one secured connection ready while messages have flowed this recently.
KEEP_READY_SECONDS = 300.0
KEEPER_INTERVAL = 0.5
KEEPER_MAX_BACKOFF = 60.0


BLOCK_SIZE = 64 * 1024  # the message goes in blocks of this size, each within block_timeout
_LINE_START_DOT = re.compile(rb"(?m)^\.")


@dataclass(frozen=True)
class _Clock:
    """How long one wait may last: its stage's timeout, and in the synchronous path less."""

    deadline: float | None = None  # monotonic: the synchronous attempt's budget ends here
    per_command: float | None = None  # no command waits longer ([upstream] timeout)

    @classmethod
    def synchronous(cls, config: UpstreamConfig) -> _Clock:
        return cls(time.monotonic() + config.sync_budget, config.timeout)

    def wait(self, stage_timeout: float, *, command: bool = True) -> float:
        waits = [stage_timeout]
        if command and self.per_command is not None:
            waits.append(self.per_command)
        if self.deadline is not None:
            waits.append(max(self.deadline - time.monotonic(), 0.01))  # spent: the next wait fails at once
        return min(waits)


class _StaleConnection(smtplib.SMTPServerDisconnected):
    """A reused connection the upstream had closed: MAIL got no answer, so nothing was sent."""


# smtplib's limit for one reply line (RFC 5321 4.5.3.1.5 allows 512 octets).
MAX_REPLY_LINE = getattr(smtplib, "_MAXLINE", 8192)


class _ReplyTooLong(smtplib.SMTPException):
    """A reply line over MAX_REPLY_LINE; smtplib has already closed the connection."""


class _Connection(smtplib.SMTP):
    """smtplib with TCP_NODELAY (no Nagle stalls on small commands)."""

    reused_unprobed = False  # taken from the pool without an RSET: MAIL is the first sign of life
    greeting_wait: float | None = None  # how long the greeting may take, once connected
    stage, stage_wait = "the connection", 0.0  # what the connection waits for now, and how long

    def _get_socket(self, host: str, port: int, timeout: float) -> socket.socket:
        sock: socket.socket = super()._get_socket(host, port, timeout)  # type: ignore[misc]
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        if self.greeting_wait is not None:
            sock.settimeout(self.greeting_wait)
            self.stage, self.stage_wait = "the greeting", self.greeting_wait
        return sock

    def getreply(self) -> tuple[int, bytes]:
        # The only reply smtplib raises SMTPResponseException for itself is a line over its
        # limit, as "500 Line too long" -- which must not pass for the upstream's own 5xx.
        try:
            return super().getreply()
        except smtplib.SMTPResponseException:
            self.close()  # smtplib closed it already; nothing more is read from or sent to this peer
            raise _ReplyTooLong(f"a reply line over {MAX_REPLY_LINE} octets") from None
    def expect(self, stage: str, wait: float) -> None:
        """The next wait is for ``stage``, for at most ``wait`` seconds."""
        self.stage, self.stage_wait = stage, wait
        if self.sock is not None:
            self.sock.settimeout(wait)


class Upstream:
    """The configured upstream; keeps its TLS context and credentials warm."""

    def __init__(self, config: UpstreamConfig, config_path: str = "<config>", *, reuse: bool = False) -> None:
        self.config = config
        self.config_path = config_path
        self._tls: ssl.SSLContext | None = None
        self.reuse = reuse  # keep secured, authenticated connections between messages
        self._idle: list[tuple[_Connection, float, float]] = []  # (connection, opened, last reply)
        self._idle_lock = threading.Lock()
        self._last_message = time.monotonic()
        self._closing = threading.Event()
        self._keeper: threading.Thread | None = None
        self._keeper_failures = 0

    @property
    def tls_context(self) -> ssl.SSLContext:
        if self._tls is None:
            try:
                context = ssl.create_default_context(cafile=self.config.ca_file)
            except (OSError, ssl.SSLError) as exc:
                raise ConfigError(self.config_path, "upstream.ca_file", f"cannot be loaded ({exc})") from None
            context.minimum_version = ssl.TLSVersion.TLSv1_2
            self._tls = context
        return self._tls

    def password(self) -> str | None:
        """The relay password, only from a file nobody else can read."""
        path = self.config.password_file
        if not path:
            return None
        key = "upstream.password_file"
        try:
            with open(path, encoding="utf-8") as handle:
                check_private_file(self.config_path, key, path, os.fstat(handle.fileno()))
                secret = handle.read().strip("\r\n")
        except OSError as exc:
            raise ConfigError(self.config_path, key, f"cannot read {path} ({exc.strerror})") from None
        if not secret:
            raise ConfigError(self.config_path, key, f"{path} is empty")
        return secret

    def send(self, envelope: Envelope, message: Message, *, all_or_nothing: bool = True,
             synchronous: bool = False) -> RelayResult:
        """Relay one message in one transaction.

        With ``all_or_nothing`` any recipient refusal stops the transaction before DATA
        (a RelayError says why); otherwise the accepted recipients get the message and
        the result lists the deferred and refused ones. ``synchronous``: a caller
        waits, so the attempt keeps to ``sync_timeout`` and may end in ReplyPending.
        """
        host = f"{self.config.host}:{self.config.port}"
        clock = _Clock.synchronous(self.config) if synchronous else _Clock()
        try:
            return self._send(envelope, message, all_or_nothing, clock)
        except OSError as exc:  # smtplib's and ssl's errors are OSErrors too
            raise classify(exc, host) from None

    def mail_without_auth(self) -> tuple[int, str]:
        """The relay's reply to ``MAIL FROM:<>`` in a verified TLS session that did not authenticate.

        A relay that other local users could use directly answers 250; one
        that requires AUTH refuses (530). The transaction is reset at once.
        """
        host = f"{self.config.host}:{self.config.port}"
        cfg = self.config
        try:
            smtp = _Connection(cfg.host, cfg.port, local_hostname=cfg.helo, timeout=cfg.timeout)
            try:
                self._starttls(smtp, host)
                code, reply = smtp.mail("")
                if code == 250:
                    smtp.rset()
                return code, _text(reply)
            finally:
                _close(smtp)
        except OSError as exc:
            raise classify(exc, host) from None

    def _send(self, envelope: Envelope, message: Message, all_or_nothing: bool, clock: _Clock) -> RelayResult:
        cfg = self.config
        host = f"{cfg.host}:{cfg.port}"
        self._last_message = time.monotonic()
        reused = self._reused()
        if reused is not None:
            try:
                return self._send_on(reused, host, envelope, message, all_or_nothing, clock)
            except _StaleConnection:
                pass  # closed while it waited; MAIL was not answered, so a fresh connection takes it
        opened = (self._open(host, clock), time.monotonic())
        return self._send_on(opened, host, envelope, message, all_or_nothing, clock)

    def _send_on(self, connection: tuple[_Connection, float], host: str, envelope: Envelope, message: Message,
                 all_or_nothing: bool, clock: _Clock) -> RelayResult:
        smtp, opened = connection
        clean = handed_on = False
        try:
            wire = for_upstream(
                message, envelope, smtputf8=smtp.has_extn("smtputf8"), eightbit=smtp.has_extn("8bitmime")
            )
            options = _mail_options(smtp, envelope, wire)
            result = _transaction(smtp, host, envelope, wire.data, options, all_or_nothing,
                                  _Stages(self.config, clock))
            clean = True  # the transaction ended with a reply we understood: the session is reusable
            return result
        except ReplyPending:
            handed_on = True  # the connection now belongs to the pending reply
            raise
        except UpstreamUncertain:
            smtp.close()  # no QUIT: the server may still be busy with the data
            raise
        except _StaleConnection:
            raise
        except OSError as exc:
            raise classify(exc, host, smtp) from None
        finally:
            if clean:
                self._release(smtp, opened)
            elif not handed_on:
                _close(smtp)

    def _open(self, host: str, clock: _Clock | None = None) -> _Connection:
        cfg = self.config
        clock = clock or _Clock(per_command=cfg.timeout)
        smtp = _Connection(local_hostname=cfg.helo, timeout=clock.wait(cfg.timeout))
        smtp.greeting_wait = clock.wait(cfg.greeting_timeout)
        try:
            code, reply = smtp.connect(cfg.host, cfg.port)
            if code != 220:
                raise smtplib.SMTPConnectError(code, reply)
            smtp.expect("EHLO", clock.wait(cfg.timeout))  # STARTTLS, the handshake and AUTH as well
            self._secure(smtp, host)
        except OSError as exc:
            _close(smtp)
            raise classify(exc, host, smtp) from None
        except BaseException:
            _close(smtp)
            raise
        return smtp

    def _reused(self) -> tuple[_Connection, float] | None:
        """An idle connection that answered a moment ago or still answers RSET with 250, or None."""
        while True:
            with self._idle_lock:
                if not self._idle:
                    return None
                smtp, opened, last_reply = self._idle.pop()
            now = time.monotonic()
            if now - last_reply <= REUSE_IDLE_SECONDS and now - opened <= REUSE_MAX_AGE_SECONDS:
                if now - last_reply <= REUSE_TRUSTED_SECONDS:
                    smtp.reused_unprobed = True
                    return smtp, opened
                try:
                    smtp.expect("RSET", self.config.timeout)
                    if smtp.rset()[0] == 250:
                        return smtp, opened
                except (smtplib.SMTPException, OSError):
                    pass
            _close(smtp)

    def _release(self, smtp: _Connection, opened: float) -> None:
        if self.reuse:
            with self._idle_lock:
                if len(self._idle) < REUSE_MAX_IDLE:
                    self._idle.append((smtp, opened, time.monotonic()))
                    return
        _close(smtp)

    def close(self) -> None:
        """Stop keeping a connection ready and close the connections kept for reuse."""
        self._closing.set()
        if self._keeper is not None:
            self._keeper.join(10)
        with self._idle_lock:
            idle, self._idle = self._idle, []
        for smtp, _, _ in idle:
            _close(smtp)

    def keep_ready(self) -> None:
        """Keep one secured connection open, so that a message need not wait for TCP, TLS and AUTH.

        For the gate: a background thread opens one at once and again whenever
        none is idle, for as long as messages have flowed in the last
        KEEP_READY_SECONDS; idle ones are closed when they expire. A failure to
        connect is retried with backoff; the messages meanwhile connect as usual.
        """
        if self.reuse and self._keeper is None:
            self._keeper = threading.Thread(target=self._keep, name="upstream-keeper", daemon=True)
            self._keeper.start()

    def _keep(self) -> None:
        pause = KEEPER_INTERVAL
        while not self._closing.wait(pause):
            self._close_expired()
            pause = KEEPER_INTERVAL
            with self._idle_lock:
                wanted = not self._idle and time.monotonic() - self._last_message <= KEEP_READY_SECONDS
            if not wanted:
                continue
            try:
                self._release(self._open(f"{self.config.host}:{self.config.port}"), time.monotonic())
            except (RelayError, ConfigError, smtplib.SMTPException, OSError):
                self._keeper_failures += 1  # the messages meanwhile connect (and fail) as usual
                pause = min(KEEPER_MAX_BACKOFF, KEEPER_INTERVAL * 2 ** self._keeper_failures)
            else:
                self._keeper_failures = 0

    def _close_expired(self) -> None:
        now = time.monotonic()
        expired: list[tuple[_Connection, float, float]] = []
        kept: list[tuple[_Connection, float, float]] = []
        with self._idle_lock:
            for entry in self._idle:
                fresh = now - entry[2] <= REUSE_IDLE_SECONDS and now - entry[1] <= REUSE_MAX_AGE_SECONDS
                (kept if fresh else expired).append(entry)
            self._idle = kept
        for smtp, _, _ in expired:
            _close(smtp)

    def _secure(self, smtp: _Connection, host: str) -> None:
        self._starttls(smtp, host)
        self._authenticate(smtp, host)

    def _starttls(self, smtp: _Connection, host: str) -> None:
        code, reply = smtp.ehlo()
        if code != 250:
            raise UpstreamMisconfigured(f"the upstream {host} answered EHLO with {code} {_text(reply)}",
                                        stage="EHLO", code=code)
        if not smtp.has_extn("starttls"):
            raise UpstreamInsecure(f"the upstream {host} does not offer STARTTLS; nothing was sent",
                                   stage="starttls")
        code, reply = smtp.docmd("STARTTLS")
        if code != 220:
            raise UpstreamInsecure(f"the upstream {host} refused STARTTLS ({code} {_text(reply)}); nothing was sent",
                                   stage="starttls", code=code)
        server_name = self.config.tls_server_name or self.config.host  # what the certificate must name
        assert smtp.sock is not None
        smtp.sock = self.tls_context.wrap_socket(smtp.sock, server_hostname=server_name)
        # Whatever the server sent before the handshake is discarded with the old reader.
        smtp.file = None
        smtp.helo_resp = smtp.ehlo_resp = None
        smtp.esmtp_features = {}
        smtp.does_esmtp = False
        code, reply = smtp.ehlo()
        if code != 250:
            raise UpstreamMisconfigured(f"the upstream {host} answered EHLO with {code} {_text(reply)}",
                                        stage="EHLO", code=code)

    def _authenticate(self, smtp: _Connection, host: str) -> None:
        """One AUTH attempt (PLAIN, else LOGIN), and only ever inside TLS."""
        password = self.password()
        if password is None or not self.config.username:
            return
        offered = (smtp.esmtp_features.get("auth") or "").upper().split()
        method = next((m for m in ("PLAIN", "LOGIN") if m in offered), None)
        if method is None:
            raise UpstreamMisconfigured(f"the upstream {host} offers no AUTH PLAIN or LOGIN", stage="AUTH")
        smtp.user, smtp.password = self.config.username, password
        authobject = smtp.auth_plain if method == "PLAIN" else smtp.auth_login
        try:
            smtp.auth(method, authobject, initial_response_ok=True)
        except smtplib.SMTPAuthenticationError as exc:
            raise UpstreamMisconfigured(
                f"the upstream {host} refused the relay credentials ({exc.smtp_code}); the admin must fix them",
                stage="AUTH", code=exc.smtp_code) from None


def classify(exc: OSError, host: str, smtp: _Connection | None = None) -> RelayError:
    """Any failure talking to the upstream as a RelayError: temporary unless the relay said 5xx.

    ``smtp`` tells what the connection was waiting for, so that a timeout names its stage.
    """
    if isinstance(exc, ssl.SSLCertVerificationError):
        return UpstreamInsecure(f"the upstream {host} failed the certificate check ({exc.verify_message})",
                                stage="starttls")
    if _timed_out(exc):  # smtplib reports a timeout as a closed connection; it was not one
        if smtp is None:
            return UpstreamUnavailable(f"the upstream {host} did not answer in time", stage="timeout")
        return UpstreamUnavailable(f"the upstream {host} did not answer {smtp.stage} in {smtp.stage_wait:g} s",
                                   stage="timeout")
    if isinstance(exc, ssl.SSLError):
        return UpstreamInsecure(f"TLS with the upstream {host} failed ({exc})", stage="starttls")
    if isinstance(exc, _ReplyTooLong):
        return UpstreamProtocolError(f"the upstream {host} sent {exc} (an SMTP protocol error); "
                                     "the connection was closed", stage="protocol")
    if isinstance(exc, smtplib.SMTPServerDisconnected):
        during = f" during {smtp.stage}" if smtp is not None else ""
        return UpstreamUnavailable(f"the upstream {host} closed the connection{during}", stage="connection")
    if isinstance(exc, smtplib.SMTPConnectError):
        return UpstreamMisconfigured(f"the upstream {host} greeted with {exc.smtp_code} {_text(exc.smtp_error)}",
                                     stage="greeting", code=exc.smtp_code)
    if isinstance(exc, smtplib.SMTPResponseException):
        return _reply_error(exc.smtp_code, exc.smtp_error, "a command", host)
    reason = exc.strerror or str(exc)
    return UpstreamUnavailable(f"cannot reach the upstream {host} ({reason})", stage="connect")


def _timed_out(exc: BaseException) -> bool:
    return isinstance(exc, TimeoutError) or (isinstance(exc, smtplib.SMTPServerDisconnected)
                                             and isinstance(exc.__context__, TimeoutError))


@dataclass(frozen=True)
class _Stages:
    """The wait for each stage of one transaction."""

    config: UpstreamConfig
    clock: _Clock

    def expect(self, smtp: _Connection, stage: str, timeout: float) -> None:
        smtp.expect(stage, self.clock.wait(timeout))


def _transaction(smtp: _Connection, host: str, envelope: Envelope, data: bytes, options: list[str],
                 all_or_nothing: bool, stages: _Stages) -> RelayResult:
    cfg = stages.config
    stages.expect(smtp, "MAIL FROM", cfg.mail_timeout)
    code, reply = _mail(smtp, envelope, options)
    if code != 250:
        raise _reply_error(code, reply, "MAIL FROM", host)
    accepted: list[str] = []
    declined: list[RecipientReply] = []
    notify = [f"NOTIFY={envelope.dsn_notify}"] if envelope.dsn_notify and smtp.has_extn("dsn") else []
    for recipient in envelope.recipients:
        stages.expect(smtp, "RCPT TO", cfg.rcpt_timeout)
        code, reply = smtp.rcpt(recipient.address, notify)
        if code in (250, 251):
            accepted.append(recipient.address)
        else:
            declined.append(RecipientReply(recipient.address, code, _text(reply)))
    deferred = tuple(r for r in declined if not 500 <= r.code < 600)
    refused = tuple(r for r in declined if 500 <= r.code < 600)
    if (refused and all_or_nothing) or not accepted:
        stages.expect(smtp, "RSET", cfg.timeout)
        smtp.rset()
        if all_or_nothing:
            error = _declined_recipients(declined)
            error.rcpt = RelayResult(0, "", tuple(accepted), deferred, refused)
            raise error
        return RelayResult(0, "no recipient accepted", (), deferred, refused)
    return _data(smtp, host, data, stages, RelayResult(0, "", tuple(accepted), deferred, refused))


def _data(smtp: _Connection, host: str, data: bytes, stages: _Stages, rcpt: RelayResult) -> RelayResult:
    """DATA, the message in blocks, the final dot and its reply; ``rcpt`` is what RCPT gave."""
    cfg = stages.config
    stages.expect(smtp, "DATA", cfg.data_timeout)
    code, reply = smtp.docmd("DATA")
    if code != 354:
        raise _reply_error(code, reply, "DATA", host)
    assert smtp.sock is not None
    for block in dot_stuffed_blocks(data):
        stages.expect(smtp, "a block of the message's data", cfg.block_timeout)
        smtp.sock.sendall(block)
    pending = PendingReply(smtp, host, rcpt, time.monotonic() + cfg.dot_timeout, cfg.dot_timeout)
    wait = stages.clock.wait(cfg.dot_timeout, command=False)
    if wait < cfg.dot_timeout and not pending.readable(wait):
        pending.waited = cfg.sync_budget
        raise ReplyPending(pending)  # the caller may go; the reply is awaited on the side
    return pending.wait()


def dot_stuffed_blocks(data: bytes) -> Iterator[bytes]:
    """The data dot-stuffed and ended with the final dot, in blocks of about ``BLOCK_SIZE``.

    The data is CRLF already (encoding.for_upstream). Each block is cut just
    after a line feed, so every block starts a line and stuffing it alone gives
    the bytes stuffing the whole would; a large message is never copied whole.
    """
    ending = b".\r\n" if data.endswith(b"\r\n") else b"\r\n.\r\n"
    start, size = 0, len(data)
    while True:
        end = size if start + BLOCK_SIZE >= size else data.rfind(b"\n", start, start + BLOCK_SIZE) + 1
        if end <= start:  # a line longer than a block: the block takes the whole line
            end = data.find(b"\n", start + BLOCK_SIZE) + 1 or size
        block = _LINE_START_DOT.sub(b"..", data[start:end])
        start = end
        if start >= size:  # the final dot rides with the last block: a small message is one write
            yield block + ending
            return
        yield block


class PendingReply:
    """The reply to a final dot that was sent: awaited up to ``dot_timeout`` after the dot."""

    def __init__(self, smtp: _Connection, host: str, rcpt: RelayResult, deadline: float,
                 dot_timeout: float) -> None:
        self.smtp, self.host, self.rcpt = smtp, host, rcpt
        self.deadline, self.dot_timeout = deadline, dot_timeout
        self.waited = 0.0

    def readable(self, wait: float) -> bool:
        """Whether the reply (or the end of the connection) arrives within ``wait`` seconds."""
        sock = self.smtp.sock
        if sock is None:
            return True
        if isinstance(sock, ssl.SSLSocket) and sock.pending():
            return True
        ready, _, _ = select.select([sock], [], [], max(wait, 0.0))
        return bool(ready)

    def wait(self) -> RelayResult:
        """The upstream's verdict on the message; UpstreamUncertain when none comes."""
        smtp, host = self.smtp, self.host
        try:
            if not self.readable(self.deadline - time.monotonic()):
                raise self.uncertain(f"the upstream {host} did not answer the end of data in "
                                     f"{self.dot_timeout:g} s")
            smtp.expect("the end of data", max(self.deadline - time.monotonic(), 0.01))
            try:
                code, reply = smtp.getreply()
            except _ReplyTooLong as exc:  # it answered, unreadably: it may have taken the message
                raise self.uncertain(f"the upstream {host} answered the end of data with {exc}") from None
            except (smtplib.SMTPServerDisconnected, OSError) as exc:
                if _timed_out(exc):
                    raise self.uncertain(f"the upstream {host} did not answer the end of data in "
                                         f"{self.dot_timeout:g} s") from None
                raise self.uncertain(f"the upstream {host} closed the connection after the end of data, "
                                     f"without a reply") from None
        except UpstreamUncertain:
            smtp.close()
            raise
        if code != 250:
            raise _reply_error(code, reply, "the end of the data", host)
        return RelayResult(code, _text(reply), self.rcpt.accepted, self.rcpt.deferred, self.rcpt.refused)

    def uncertain(self, text: str) -> UpstreamUncertain:
        return UpstreamUncertain(f"{text}; it may have the message", self.rcpt)

    def finish(self) -> RelayResult:
        """Wait for the reply, then close the connection."""
        try:
            return self.wait()
        finally:
            _close(self.smtp)

    def abandon(self) -> None:
        """Stop waiting: drop the connection without QUIT."""
        self.smtp.close()


def _mail(smtp: _Connection, envelope: Envelope, options: list[str]) -> tuple[int, bytes]:
    """MAIL FROM; on a connection reused unprobed, no answer or 421 (closing) means it was stale."""
    unprobed, smtp.reused_unprobed = smtp.reused_unprobed, False
    try:
        code, reply = smtp.mail(envelope.mail_from, options)
    except _ReplyTooLong:
        raise  # the upstream answered, wrongly: not a stale connection
    except (smtplib.SMTPServerDisconnected, OSError) as exc:
        if unprobed:
            raise _StaleConnection(str(exc)) from None
        raise
    if unprobed and code == 421:
        raise _StaleConnection(_text(reply))
    return code, reply


def _mail_options(smtp: _Connection, envelope: Envelope, wire: object) -> list[str]:
    from .encoding import Wire

    assert isinstance(wire, Wire)
    options: list[str] = []
    if wire.eightbit and smtp.has_extn("8bitmime"):
        options.append("BODY=8BITMIME")
    if wire.smtputf8:
        options.append("SMTPUTF8")
    if smtp.has_extn("size"):
        options.append(f"SIZE={len(wire.data)}")
    if smtp.has_extn("dsn"):
        if envelope.dsn_ret:
            options.append(f"RET={envelope.dsn_ret}")
        if envelope.dsn_envid:
            options.append(f"ENVID={xtext(envelope.dsn_envid)}")
    return options


def xtext(value: str) -> str:
    """RFC 3461 xtext: '+', '=' and anything outside ! .. ~ as +HH."""
    return "".join(c if 33 <= ord(c) <= 126 and c not in "+=" else f"+{ord(c):02X}" for c in value)


def _text(reply: bytes | str) -> str:
    text = reply.decode("utf-8", "replace") if isinstance(reply, bytes) else reply
    text = " ".join(text.split())
    return "".join(c if c.isprintable() else "?" for c in text)[:300]


def _reply_error(code: int, reply: bytes | str, stage: str, host: str) -> RelayError:
    text = f"the upstream {host} answered {stage} with {code} {_text(reply)}"
    if 500 <= code < 600:
        return UpstreamRefused(text, stage=stage, code=code)
    return UpstreamUnavailable(text, stage=stage, code=code)


def _declined_recipients(declined: list[RecipientReply]) -> RelayError:
    """Permanent when any recipient was refused for good: retrying cannot send the whole message."""
    refused = [r for r in declined if 500 <= r.code < 600] or declined
    shown = "; ".join(f"{r.address}: {r.code} {r.text}" for r in refused[:3])
    more = f" (and {len(refused) - 3} more)" if len(refused) > 3 else ""
    text = f"the upstream refused {len(refused)} recipient(s): {shown}{more}; nothing was sent"
    if 500 <= refused[0].code < 600:
        return UpstreamRefused(text, stage="RCPT TO", code=refused[0].code)
    return UpstreamUnavailable(text, stage="RCPT TO", code=refused[0].code)


QUIT_WAIT = 5.0


def rcpt_replies(exc: BaseException) -> RelayResult | None:
    """What the recipients got at RCPT before the upstream failed or refused, if it got that far."""
    if isinstance(exc, ReplyPending):
        return exc.pending.rcpt
    if isinstance(exc, UpstreamUncertain):
        return exc.result
    return exc.rcpt if isinstance(exc, RelayError) else None


def _close(smtp: _Connection) -> None:
    try:
        if smtp.sock is not None:  # a dead server must not hold us for a stage's long timeout
            smtp.sock.settimeout(min(smtp.sock.gettimeout() or QUIT_WAIT, QUIT_WAIT))
        smtp.quit()
    except (smtplib.SMTPException, OSError):
        smtp.close()
