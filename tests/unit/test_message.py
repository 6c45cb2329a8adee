"""Reading the message: line endings, dots, headers, and what gets added or removed."""

from __future__ import annotations

import io
import re

import pytest

from sendmail_shim.addresses import Mailbox, parse_mailbox
from sendmail_shim.message import (
    EmptyMessage,
    MalformedMessage,
    MessageTooLarge,
    complete,
    header_recipients,
    parse,
    read_input,
    split_lines,
)


@pytest.mark.parametrize("raw", [
    b"a\nb\n", b"a\r\nb\r\n", b"a\rb\r", b"a\r\nb\n", b"a\nb",
])
def test_every_line_ending_becomes_one_line_break(raw):
    assert split_lines(raw, ignore_dots=True) == [b"a", b"b"]


def test_mixed_endings_never_leave_bare_cr_or_lf():
    message = parse(b"To: a@x.example\r\nSubject: s\nX: y\r\r\n\r\nbody\rmore\n\r\nend", ignore_dots=True)
    data = message.as_bytes()
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", data) is None


def test_dot_alone_ends_input_without_i():
    assert split_lines(b"one\n.\nhidden\n", ignore_dots=False) == [b"one"]
    assert split_lines(b"one\n.\nkept\n", ignore_dots=True) == [b"one", b".", b"kept"]


def test_leading_double_dot_loses_one_dot_without_i():
    assert split_lines(b"..x\n...\n.y\n", ignore_dots=False) == [b".x", b"..", b".y"]
    assert split_lines(b"..x\n", ignore_dots=True) == [b"..x"]


def test_nul_is_refused():
    with pytest.raises(MalformedMessage, match="NUL"):
        parse(b"To: a@x.example\n\nbo\0dy\n", ignore_dots=True)


def test_empty_input():
    with pytest.raises(EmptyMessage):
        read_input(io.BytesIO(b""), 1000)
    with pytest.raises(EmptyMessage):
        parse(b".\n", ignore_dots=False)


def test_size_cap_stops_reading_early():
    class Endless(io.RawIOBase):
        reads = 0

        def readable(self) -> bool:
            return True

        def readinto(self, buffer):  # type: ignore[override]
            self.reads += 1
            buffer[:] = b"x" * len(buffer)
            return len(buffer)

    stream = Endless()
    with pytest.raises(MessageTooLarge):
        read_input(io.BufferedReader(stream), 1024 * 1024)
    assert stream.reads < 100  # stopped soon after the cap, memory bounded


@pytest.mark.parametrize(("raw", "needle"), [
    (b"From: a@x.example\nFrom: b@x.example\n\nx\n", "several From"),
    (b"From: a@x.example, b@x.example\n\nx\n", "From header"),
    (b"From: attacker@evil.example <bob@victim.example>\n\nx\n", "From header"),
    (b"From: alice@example.org(<bob@example.org>\n\nx\n", "From header"),
    (b"From: a@malicious.example@important.example\n\nx\n", "From header"),
    (b" folded-first: x\n\nbody\n", "white space"),
    (b"Fr\xc3\xb6m: a@x.example\n\nx\n", "malformed header"),
    (b"Subject: " + b"x" * (256 * 1024) + b"\n\nx\n", "headers are larger than 262144 bytes"),
    (b"Subject: \x81\x8d\n\nx\n", "neither UTF-8 nor windows-1252"),
    (b"Subject: a\x01b\n\nx\n", "control character"),
    (b"Reply-To: a@b@c.example\n\nx\n", "Reply-To"),
])
def test_header_defects_are_refused(raw, needle):
    with pytest.raises(MalformedMessage, match=needle):
        parse(raw, ignore_dots=True)


def test_obsolete_space_before_colon_is_still_a_from():
    with pytest.raises(MalformedMessage, match="several From"):
        parse(b"From : bob@victim.example\nFROM: eve@x.example\n\nx\n", ignore_dots=True)
    assert parse(b"From : bob@victim.example\n\nx\n", True).from_mailbox.key == "bob@victim.example"


def test_body_without_headers_and_without_blank_line():
    message = parse(b"hello world\nsecond line\n", ignore_dots=True)
    assert message.headers == [] and message.body == [b"hello world", b"second line"]


def test_header_block_ends_at_first_non_header_line():
    message = parse(b"Subject: s\nThis is body text\nFrom: not-a-header@x.example\n", ignore_dots=True)
    assert [h.name for h in message.headers] == ["Subject"]
    assert message.from_mailbox is None
    assert message.as_bytes().startswith(b"Subject: s\r\n\r\nThis is body text\r\n")


def test_mbox_separator_is_dropped():
    message = parse(b"From someone Thu Nov 26 12:00:00 2026\nSubject: s\n\nx\n", ignore_dots=True)
    assert [h.name for h in message.headers] == ["Subject"]


def test_recipients_from_to_cc_bcc_and_a_second_to():
    message = parse(b"To: a@x.example\r\nCc: B <b@x.example>\nBcc: c@x.example\nTo: d@x.example\n\nx\n", True)
    assert [m.key for m in header_recipients(message, None)] == [
        "a@x.example", "b@x.example", "c@x.example", "d@x.example"]


def test_resent_headers_replace_the_originals():
    message = parse(b"To: a@x.example\nResent-To: r@x.example\nResent-Bcc: s@x.example\n\nx\n", True)
    assert [m.key for m in header_recipients(message, None)] == ["r@x.example", "s@x.example"]


def test_complete_removes_bcc_and_adds_what_is_missing():
    message = parse(b"To: a@x.example\nBcc: hidden@x.example\nReturn-Path: <forged@x.example>\n\nx\n", True)
    complete(message, Mailbox("post", "kunde.example", "Kunde AS"), "by host (test)")
    names = [h.lname for h in message.headers]
    assert "bcc" not in names and "return-path" not in names
    assert message.first("From") == '"Kunde AS" <post@kunde.example>' or message.first("From") == \
        "Kunde AS <post@kunde.example>"
    assert re.fullmatch(r"\w{3}, \d\d \w{3} \d{4} \d\d:\d\d:\d\d [+-]\d{4}", message.first("Date") or "")
    assert re.fullmatch(r"<[0-9a-f]+\.[0-9a-f]+@kunde\.example>", message.message_id or "")
    assert names[0] == "received"


def test_complete_keeps_an_existing_message_id_and_date():
    message = parse(b"From: a@x.example\nDate: Mon, 1 Jan 2024 00:00:00 +0000\nMessage-ID: <keep@x>\n\nx\n", True)
    complete(message, parse_mailbox("a@x.example"), "by host (test)")
    assert message.message_id == "<keep@x>"
    assert message.get_all("Date")[0].value == "Mon, 1 Jan 2024 00:00:00 +0000"
