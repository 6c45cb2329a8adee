"""Header lines over 998 octets are folded, never refused, and folding never changes what they say."""

from __future__ import annotations

import email
import email.policy
from email.header import decode_header, make_header
from email.message import EmailMessage

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sendmail_shim.addresses import Mailbox, parse_address_list, quote_phrase
from sendmail_shim.encoding import CannotEncode, fold, for_upstream
from sendmail_shim.envelope import Envelope
from sendmail_shim.message import MAX_LINE, Header, parse

ENVELOPE = Envelope(Mailbox("post", "kunde.example"), (Mailbox("ola", "x.example"),))


def lines_of(header: Header) -> list[bytes]:
    return header.raw.split(b"\r\n")


def assert_well_folded(header: Header) -> None:
    lines = lines_of(header)
    assert all(len(line) <= MAX_LINE for line in lines)
    assert all(line[:1] in (b" ", b"\t") and line.strip(b" \t") for line in lines[1:])


def as_email(data: bytes) -> EmailMessage:
    """What a mail reader makes of it (raw UTF-8 headers, as under SMTPUTF8, read as text)."""
    if data.isascii():
        return email.message_from_bytes(data, policy=email.policy.default)  # type: ignore[return-value]
    return email.message_from_string(data.decode("utf-8"), policy=email.policy.default)  # type: ignore[return-value]


# --------------------------------------------------------------- the property: address lists

_atext = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+/=?^_`{|}~", min_size=1, max_size=12)
_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,10}[a-z0-9])?", fullmatch=True)
_name_pieces = st.sampled_from([*"abcdefgh ABC,.;:@<>()\"'\\øæåéü✓-", "  ", "\t"])
_names = st.one_of(st.none(), st.lists(_name_pieces, min_size=1, max_size=30).map("".join).map(str.strip).filter(bool))


@st.composite
def address(draw: st.DrawFn) -> str:
    local = draw(_atext).lstrip("-") or "x"
    domain = ".".join(draw(st.lists(_label, min_size=1, max_size=3))) + ".example"
    name = draw(_names)
    return f"{quote_phrase(name)} <{local}@{domain}>" if name else f"{local}@{domain}"


@settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(st.lists(address(), min_size=1, max_size=500), st.sampled_from([", ", ",", ",\t", " , "]))
def test_folding_any_address_list_keeps_every_address_and_fits_every_line(found: list[str], comma: str):
    header = Header.build("To", comma.join(found))
    folded = fold(header)
    assert_well_folded(folded)
    assert parse_address_list(folded.value) == parse_address_list(header.value)


def test_folding_keeps_what_a_mail_reader_sees():
    names = [f'"Nordmann, Kari {i}"' if i % 3 else f"Bjørn Ærlig {i}" for i in range(120)]
    value = ", ".join(f"{name} <k{i}@x.example>" for i, name in enumerate(names))
    header = Header.build("Cc", value)
    assert len(header.raw) > 998
    folded = fold(header)
    assert_well_folded(folded)
    before, after = (as_email(h.raw + b"\r\n\r\n")["Cc"].addresses for h in (header, folded))
    assert [(a.display_name, a.addr_spec) for a in after] == [(a.display_name, a.addr_spec) for a in before]
    assert len(after) == 120


def test_groups_are_folded_between_members():
    members = ", ".join(f"m{i}@x.example" for i in range(150))
    header = Header.build("To", f"undisclosed-recipients:;, list: {members};")
    folded = fold(header)
    assert_well_folded(folded)
    assert parse_address_list(folded.value) == parse_address_list(header.value)


def test_a_display_name_too_long_for_any_line_becomes_encoded_words():
    name = "N" * 1500  # one word: no white space to fold at
    header = Header.build("To", f'"{name}" <a@x.example>, b@x.example')
    folded = fold(header)
    assert_well_folded(folded)
    assert [m.address for m in parse_address_list(folded.value)] == ["a@x.example", "b@x.example"]
    # RFC 2047 joins adjacent encoded-words; Python's address parser keeps the space between
    # them in a display name, so the words are decoded as RFC 2047 says.
    display = folded.value.split(" <a@x.example>")[0]
    assert str(make_header(decode_header(display))) == name


# --------------------------------------------------------------- unstructured and structured text


@given(st.lists(st.text(st.sampled_from(list("abcøé✓=?")), min_size=5, max_size=30), min_size=200, max_size=400),
       st.sampled_from([" ", "  ", "\t"]))
def test_text_is_folded_at_white_space_and_unfolds_to_the_same(words: list[str], space: str):
    header = Header.build("Subject", space.join(words))
    assert len(header.raw) > 998
    folded = fold(header)
    assert_well_folded(folded)
    assert folded.value == header.value


def test_a_word_no_line_can_hold_becomes_encoded_words_that_decode_to_it():
    word = "Ø" + "x" * 2500
    subject = f"=?utf-8?q?before?= {word} =?utf-8?q?after?= end"
    folded = fold(Header.build("Subject", subject))
    assert_well_folded(folded)
    assert as_email(folded.raw + b"\r\n\r\n")["Subject"] == f"before {word} after end"


def test_references_are_folded_between_message_ids():
    ids = " ".join(f"<{i}.patch@git.example>" for i in range(80))
    folded = fold(Header.build("References", ids))
    assert_well_folded(folded)
    assert folded.value == ids


def test_a_structured_word_too_long_to_fold_is_refused_clearly():
    with pytest.raises(CannotEncode, match="the Message-ID header holds a word longer than 998 octets"):
        fold(Header.build("Message-ID", "<" + "x" * 1200 + "@x.example>"))


# --------------------------------------------------------------- for the upstream


PHPMAILER_100_TO = (
    "Date: Wed, 2 Dec 2026 10:00:00 +0100\nTo: "
    + ", ".join(f"Mottaker {i} <m{i}@x.example>" for i in range(100))
    + "\nFrom: Kunde AS <post@kunde.example>\nSubject: Nyhetsbrev\nMIME-Version: 1.0\n"
    "Content-Type: text/plain; charset=UTF-8\n\nHei\n"
)


@pytest.mark.parametrize("smtputf8", [True, False])
def test_the_upstream_gets_folded_lines_with_every_recipient_named(smtputf8: bool):
    wire = for_upstream(parse(PHPMAILER_100_TO.encode(), True), ENVELOPE, smtputf8=smtputf8, eightbit=True)
    assert max(len(line) for line in wire.data.split(b"\r\n")) <= 998
    to = as_email(wire.data)["To"].addresses
    assert [(a.display_name, a.addr_spec) for a in to] == [(f"Mottaker {i}", f"m{i}@x.example") for i in range(100)]


def test_utf8_names_are_folded_as_they_are_with_smtputf8_and_encoded_without():
    raw = "To: " + ", ".join(f"Bjørn {i} <b{i}@x.example>" for i in range(60)) + "\nFrom: post@kunde.example\n\nx\n"
    for smtputf8 in (True, False):
        wire = for_upstream(parse(raw.encode(), True), ENVELOPE, smtputf8=smtputf8, eightbit=True)
        header_block = wire.data.split(b"\r\n\r\n")[0]
        assert header_block.isascii() != smtputf8
        assert max(len(line) for line in header_block.split(b"\r\n")) <= 998
        names = [a.display_name for a in as_email(wire.data)["To"].addresses]
        assert names == [f"Bjørn {i}" for i in range(60)]


def test_a_mime_part_header_over_998_octets_is_folded_too():
    filename = " ".join(["vedlegg"] * 200) + ".pdf"
    raw = (
        "From: post@kunde.example\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=b1\n\n"
        f"--b1\nContent-Type: text/plain; charset=utf-8\n\nHei på deg\n"
        f'--b1\nContent-Type: application/pdf\nContent-Disposition: attachment; filename="{filename}"\n'
        "Content-Transfer-Encoding: base64\n\nJVBERi0=\n--b1--\n"
    ).encode()
    wire = for_upstream(parse(raw, True), ENVELOPE, smtputf8=False, eightbit=False)
    assert wire.data.isascii() and max(len(line) for line in wire.data.split(b"\r\n")) <= 998
    parts = list(as_email(wire.data).iter_attachments())
    assert [part.get_filename() for part in parts] == [filename]
