"""`sendmail -bs`: SMTP on stdin/stdout, answered at once and never blocking."""

from __future__ import annotations

import os
import select
import subprocess

from tests.support.shim import SENDMAIL, Shim
from tests.support.upstream import SmtpUpstream


class Dialogue:
    def __init__(self, shim: Shim) -> None:
        self.proc = subprocess.Popen([SENDMAIL, "-bs"], stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                     stderr=subprocess.PIPE, env=shim.env, bufsize=0)
        self.buffer = b""

    def read_reply(self, timeout: float = 10.0) -> list[str]:
        """Read one (possibly multi-line) reply straight from the pipe, never blocking forever."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while True:
            lines = self.buffer.split(b"\r\n")
            for index, line in enumerate(lines[:-1]):
                if line[3:4] == b" ":
                    self.buffer = b"\r\n".join(lines[index + 1:])
                    return [x.decode() for x in lines[:index + 1]]
            ready, _, _ = select.select([fd], [], [], timeout)
            assert ready, f"no reply within {timeout} s (got {self.buffer!r})"
            chunk = os.read(fd, 65536)
            assert chunk, f"stdout closed (got {self.buffer!r})"
            self.buffer += chunk

    def send(self, text: str) -> list[str]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(text.encode() + b"\r\n")
        self.proc.stdin.flush()
        return self.read_reply()

    def close(self) -> int:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        return self.proc.wait(10)


def test_greeting_comes_at_once_while_stdin_stays_open(shim: Shim, upstream: SmtpUpstream):
    talk = Dialogue(shim)
    greeting = talk.read_reply(timeout=5)
    assert greeting[0].startswith("220 ")
    assert talk.send("HELO client.example")[0].startswith("250 ")
    assert talk.send("QUIT")[0].startswith("221")
    assert talk.close() == 0


def test_two_transactions_with_dot_unstuffing(shim: Shim, upstream: SmtpUpstream):
    talk = Dialogue(shim)
    talk.read_reply()
    ehlo = talk.send("EHLO client.example")
    assert any("8BITMIME" in line for line in ehlo)
    for n in (1, 2):
        assert talk.send("MAIL FROM:<post@kunde.example>")[0].startswith("250")
        assert talk.send(f"RCPT TO:<ola{n}@x.example>")[0].startswith("250")
        assert talk.send("RCPT TO:<kari@x.example>")[0].startswith("250")
        assert talk.send("DATA")[0].startswith("354")
        reply = talk.send(f"From: post@kunde.example\r\nSubject: {n}\r\n\r\n..leading dot\r\n...\r\n.")
        assert reply[0].startswith("250 "), reply
    assert talk.send("QUIT")[0].startswith("221")
    assert talk.close() == 0
    assert [r.rcpt_tos for r in upstream.received] == [["ola1@x.example", "kari@x.example"],
                                                       ["ola2@x.example", "kari@x.example"]]
    assert upstream.received[0].body == b".leading dot\r\n..\r\n"


def test_refusals_are_smtp_replies(shim: Shim, upstream: SmtpUpstream):
    talk = Dialogue(shim)
    talk.read_reply()
    talk.send("HELO c")
    assert talk.send("RCPT TO:<a@x.example>")[0].startswith("503")
    assert talk.send("MAIL FROM:<>")[0].startswith("550")
    assert talk.send("MAIL FROM:<post@kunde.example>")[0].startswith("250")
    assert talk.send("RCPT TO:<not an address>")[0].startswith("553")
    assert talk.send("RCPT TO:<ola@x.example>")[0].startswith("250")
    assert talk.send("DATA")[0].startswith("354")
    reply = talk.send("From: a@x.example\r\nFrom: b@x.example\r\n\r\nx\r\n.")
    assert reply[0].startswith("554 5.6.0") and "several From" in reply[0]
    assert talk.send("STARTTLS")[0].startswith("502")
    assert talk.send("XYZZY")[0].startswith("500")
    assert talk.send("RSET")[0].startswith("250")
    talk.send("QUIT")
    talk.close()
    assert upstream.received == []


def test_upstream_refusal_reaches_the_client(shim: Shim, upstream: SmtpUpstream):
    upstream.script.replies["DATA"] = "554 5.7.1 content rejected"
    talk = Dialogue(shim)
    talk.read_reply()
    talk.send("HELO c")
    talk.send("MAIL FROM:<post@kunde.example>")
    talk.send("RCPT TO:<ola@x.example>")
    talk.send("DATA")
    reply = talk.send("From: post@kunde.example\r\n\r\nx\r\n.")
    assert reply[0].startswith("554") and "content rejected" in reply[0]
    talk.send("QUIT")
    talk.close()


def test_eof_mid_dialogue_ends_cleanly_and_sends_nothing(shim: Shim, upstream: SmtpUpstream):
    talk = Dialogue(shim)
    talk.read_reply()
    talk.send("HELO c")
    talk.send("MAIL FROM:<post@kunde.example>")
    talk.send("RCPT TO:<ola@x.example>")
    talk.send("DATA")
    assert talk.proc.stdin is not None
    talk.proc.stdin.write(b"From: post@kunde.example\r\n\r\nhalf a message")
    assert talk.close() == 0
    assert upstream.received == []


def test_overlong_command_line(shim: Shim, upstream: SmtpUpstream):
    talk = Dialogue(shim)
    talk.read_reply()
    assert talk.send("HELO " + "x" * 5000)[0].startswith("500")
    assert talk.send("NOOP")[0].startswith("250")
    talk.send("QUIT")
    talk.close()
