"""Fitting the message to the upstream: SMTPUTF8, 8BITMIME, RFC 2047 and quoted-printable."""

from __future__ import annotations

import email
import email.policy
import re

import pytest

from sendmail_shim.addresses import parse_mailbox
from sendmail_shim.encoding import CannotEncode, for_upstream
from sendmail_shim.envelope import Envelope
from sendmail_shim.message import parse

ENVELOPE = Envelope(parse_mailbox("post@kunde.example"), (parse_mailbox("ola@x.example"),))
UTF8_MESSAGE = "From: Bjørn Ærlig <post@kunde.example>\nTo: Åse <ola@x.example>\nSubject: Hei på deg, Bjørn\n\nBlåbær\n"


def wire(raw: bytes | str, *, smtputf8: bool, eightbit: bool, envelope: Envelope = ENVELOPE):
    data = raw.encode() if isinstance(raw, str) else raw
    return for_upstream(parse(data, True), envelope, smtputf8=smtputf8, eightbit=eightbit)


def decoded(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)  # type: ignore[return-value]


def test_utf8_goes_as_it_is_with_smtputf8():
    result = wire(UTF8_MESSAGE, smtputf8=True, eightbit=True)
    assert result.smtputf8 and result.eightbit
    assert "Subject: Hei på deg, Bjørn".encode() in result.data


def test_utf8_headers_are_rfc2047_encoded_without_smtputf8():
    result = wire(UTF8_MESSAGE, smtputf8=False, eightbit=True)
    header_block = result.data.split(b"\r\n\r\n")[0]
    assert header_block.isascii()
    parsed = decoded(result.data)
    assert parsed["Subject"] == "Hei på deg, Bjørn"
    assert parsed["From"].addresses[0].display_name == "Bjørn Ærlig"
    assert parsed["From"].addresses[0].addr_spec == "post@kunde.example"
    assert parsed["To"].addresses[0].display_name == "Åse"
    assert not result.smtputf8 and result.eightbit  # the body stays 8-bit under 8BITMIME


def test_8bit_body_becomes_quoted_printable_without_8bitmime():
    result = wire(UTF8_MESSAGE, smtputf8=False, eightbit=False)
    assert result.data.isascii() and not result.eightbit
    parsed = decoded(result.data)
    assert parsed["Content-Transfer-Encoding"] == "quoted-printable"
    assert parsed.get_content().replace("\r\n", "\n") == "Blåbær\n"


def test_long_body_lines_are_encoded_not_split():
    line = "word " * 400
    result = wire(f"From: post@kunde.example\n\n{line}\nshort\n", smtputf8=True, eightbit=True)
    assert max(len(x) for x in result.data.split(b"\r\n")) <= 998
    assert decoded(result.data).get_content().replace("\r\n", "\n") == f"{line}\nshort\n"


def test_multipart_8bit_text_parts_are_reencoded():
    raw = (
        "From: post@kunde.example\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"b1\"\n\n"
        "preamble\n--b1\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: 8bit\n\nHei på deg\n"
        "--b1\nContent-Type: application/octet-stream\nContent-Transfer-Encoding: base64\n\naGVp\n--b1--\n"
    )
    result = wire(raw, smtputf8=False, eightbit=False)
    assert result.data.isascii()
    parts = list(decoded(result.data).iter_parts())
    assert parts[0].get_content() == "Hei på deg"  # the last line break belongs to the boundary
    assert parts[1].get_content() == b"hei"


def test_8bit_inside_a_base64_part_is_refused():
    raw = ("From: post@kunde.example\nContent-Type: text/plain\nContent-Transfer-Encoding: base64\n\n"
           "blåbær\n")
    with pytest.raises(CannotEncode, match="base64"):
        wire(raw, smtputf8=False, eightbit=False)


def test_non_ascii_local_part_needs_smtputf8():
    envelope = Envelope(parse_mailbox("post@kunde.example"), (parse_mailbox("bjørn@x.example"),))
    with pytest.raises(CannotEncode, match="SMTPUTF8"):
        wire("From: post@kunde.example\n\nx\n", smtputf8=False, eightbit=True, envelope=envelope)
    assert wire("From: post@kunde.example\n\nx\n", smtputf8=True, eightbit=True, envelope=envelope).smtputf8


def test_encoded_header_lines_stay_short():
    subject = "Ærlig talt " * 30
    result = wire(f"From: post@kunde.example\nSubject: {subject}\n\nx\n", smtputf8=False, eightbit=True)
    lines = result.data.split(b"\r\n\r\n")[0].split(b"\r\n")
    assert all(len(line) <= 998 for line in lines)
    assert all(len(w) <= 75 for w in re.findall(rb"=\?[^ ]*\?=", result.data))
    assert decoded(result.data)["Subject"] == subject.strip()


def test_ascii_message_is_passed_through_untouched():
    raw = b"From: post@kunde.example\r\nSubject: plain\r\n\r\nbody\r\n"
    assert wire(raw, smtputf8=False, eightbit=False).data == raw
