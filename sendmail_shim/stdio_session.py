"""``sendmail -bs``: an SMTP dialogue on stdin and stdout (Symfony Mailer's default).

The greeting goes out at once, each reply is flushed as soon as it is known,
and nothing waits for stdin to close: a client that waits for our reply must
never wait forever. Each DATA runs the whole pipeline, and its verdict is the
reply, because such clients ignore the exit status.
"""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable
from typing import BinaryIO

from .invocation import Invocation

MAX_COMMAND = 2048
_PATH = re.compile(rb"^(MAIL FROM|RCPT TO):\s*<([^<>]*)>(?:\s.*)?$", re.IGNORECASE)

class Session:
    def __init__(
        self,
        invocation: Invocation,
        stdin: BinaryIO,
        stdout: BinaryIO,
        submit: Callable[[Invocation, bytes], tuple[int, str]],
        *,
        hostname: str,
        max_size: int,
        max_recipients: int,
    ) -> None:
        self.invocation = invocation
        self.stdin, self.stdout = stdin, stdout
        self.submit = submit
        self.hostname = hostname
        self.max_size, self.max_recipients = max_size, max_recipients
        self.sender: str | None = None
        self.recipients: list[str] = []

    def reply(self, code: int, text: str, more: tuple[str, ...] = ()) -> None:
        lines = [f"{code}-{line}" for line in (text, *more[:-1])] + [f"{code} {more[-1]}"] if more else [
            f"{code} {text}"
        ]
        clean = ["".join(c if c.isprintable() else " " for c in line)[:510] for line in lines]
        self.stdout.write("".join(line + "\r\n" for line in clean).encode("utf-8"))
        self.stdout.flush()

    def run(self) -> int:
        self.reply(220, f"{self.hostname} ESMTP sendmail-shim ready")
        while True:
            line = self.stdin.readline(MAX_COMMAND + 1)
            if not line:
                return 0
            if len(line) > MAX_COMMAND and not line.endswith(b"\n"):
                self._skip_rest_of_line()
                self.reply(500, "5.5.2 line too long")
                continue
            if not self.command(line.rstrip(b"\r\n")):
                return 0

    def _skip_rest_of_line(self) -> None:
        while True:
            chunk = self.stdin.readline(MAX_COMMAND)
            if not chunk or chunk.endswith(b"\n"):
                return

    def command(self, line: bytes) -> bool:
        verb = line.split(b" ", 1)[0].upper()
        handler = {
            b"HELO": self.helo, b"EHLO": self.ehlo, b"MAIL": self.mail, b"RCPT": self.rcpt,
            b"DATA": self.data, b"RSET": self.rset, b"NOOP": self.noop, b"VRFY": self.vrfy,
        }.get(verb)
        if verb == b"QUIT":
            self.reply(221, f"2.0.0 {self.hostname} closing")
            return False
        if handler is None:
            self.reply(502 if verb in (b"STARTTLS", b"AUTH", b"EXPN", b"TURN", b"ETRN") else 500,
                       "5.5.1 command not recognised")
        else:
            handler(line)
        return True

    def helo(self, line: bytes) -> None:
        self.rset(None)
        self.reply(250, self.hostname)

    def ehlo(self, line: bytes) -> None:
        self.rset(None)
        self.reply(250, self.hostname, ("8BITMIME", "SMTPUTF8", "PIPELINING", "ENHANCEDSTATUSCODES",
                                        f"SIZE {self.max_size}"))

    def noop(self, line: bytes) -> None:
        self.reply(250, "2.0.0 ok")

    def vrfy(self, line: bytes) -> None:
        self.reply(252, "2.5.2 cannot verify, but will try to send")

    def rset(self, line: bytes | None) -> None:
        self.sender, self.recipients = None, []
        if line is not None:
            self.reply(250, "2.0.0 reset")

    def _path(self, line: bytes, verb: str) -> str | None:
        match = _PATH.match(line)
        if not match or match.group(1).upper().decode() != verb:
            self.reply(501, f"5.5.4 syntax: {verb}:<address>")
            return None
        try:
            return match.group(2).decode("utf-8")
        except UnicodeDecodeError:
            self.reply(501, "5.6.7 the address is not valid UTF-8")
            return None

    def mail(self, line: bytes) -> None:
        if self.sender is not None:
            self.reply(503, "5.5.1 sender already given")
            return
        path = self._path(line, "MAIL FROM")
        if path is None:
            return
        if not path:
            self.reply(550, "5.7.1 the null sender cannot send here")
            return
        self.sender = path
        self.reply(250, "2.1.0 sender ok")

    def rcpt(self, line: bytes) -> None:
        if self.sender is None:
            self.reply(503, "5.5.1 MAIL FROM first")
            return
        path = self._path(line, "RCPT TO")
        if path is None:
            return
        if len(self.recipients) >= self.max_recipients:
            self.reply(452, f"4.5.3 at most {self.max_recipients} recipients per message")
            return
        from .addresses import AddressError, parse_mailbox

        try:
            parse_mailbox(path)
        except AddressError as exc:
            self.reply(553, f"5.1.3 {exc}")
            return
        self.recipients.append(path)
        self.reply(250, "2.1.5 recipient ok")

    def data(self, line: bytes) -> None:
        if self.sender is None or not self.recipients:
            self.reply(503, "5.5.1 MAIL FROM and RCPT TO first")
            return
        self.reply(354, "end data with <CR><LF>.<CR><LF>")
        raw, complete = self._read_data()
        if raw is None:
            self.reply(552, f"5.3.4 the message is larger than {self.max_size} bytes")
        elif not complete:
            return
        else:
            request = dataclasses.replace(
                self.invocation, mode="deliver", sender=self.sender, recipients=tuple(self.recipients),
                extract_recipients=False, ignore_dots=True,
            )
            code, text = self.submit(request, raw)
            self.reply(code, text)
        self.rset(None)

    def _read_data(self) -> tuple[bytes | None, bool]:
        """The un-stuffed data, or None when over the size limit; False if input ended first."""
        lines: list[bytes] = []
        size = 0
        while True:
            line = self.stdin.readline(self.max_size + 2)
            if not line:
                return b"", False
            stripped = line.rstrip(b"\r\n")
            if stripped == b".":
                break
            if size <= self.max_size:
                size += len(stripped) + 2
                lines.append(stripped[1:] if stripped.startswith(b".") else stripped)  # RFC 5321 4.5.2
        if size > self.max_size:
            return None, True
        return b"".join(piece + b"\r\n" for piece in lines), True
