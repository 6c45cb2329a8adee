"""Legacy header bytes: decoded with the declared charset, else [message] legacy_charset, then sent encoded."""

from __future__ import annotations

import email
import email.policy

import pytest

from sendmail_shim.addresses import Mailbox
from sendmail_shim.config import ConfigError, from_mapping
from sendmail_shim.encoding import for_upstream
from sendmail_shim.envelope import Envelope
from sendmail_shim.message import MalformedMessage, parse

ENVELOPE = Envelope(Mailbox("post", "kunde.example"), (Mailbox("ola", "x.example"),))
LATIN1_SITE = (
    "Subject: Grüße aus Köln – Bestellung\nFrom: Jörg Müller <post@kunde.example>\nTo: ola@x.example\n"
    "MIME-Version: 1.0\nContent-Type: text/plain; charset=ISO-8859-1\n\nGrüße\n"
)


def decoded(data: bytes) -> email.message.EmailMessage:
    return email.message_from_bytes(data, policy=email.policy.default)  # type: ignore[return-value]


def test_declared_charset_decodes_the_headers_and_each_repair_is_recorded():
    message = parse(LATIN1_SITE.replace("–", "-").encode("iso-8859-1"), True)
    assert message.first("Subject") == "Grüße aus Köln - Bestellung"
    assert message.from_mailbox == Mailbox("post", "kunde.example", "Jörg Müller")
    assert message.repairs == {"charset": "Subject:iso-8859-1,From:iso-8859-1"}
    assert message.body == ["Grüße".encode("iso-8859-1")]  # the body is the site's, untouched


def test_windows_1252_bytes_under_a_latin1_label_are_read_as_the_site_meant():
    # 0x96 is an en dash in windows-1252 and a C1 control in ISO-8859-1.
    message = parse(LATIN1_SITE.encode("windows-1252"), True)
    assert message.first("Subject") == "Grüße aus Köln – Bestellung"
    assert message.repairs["charset"] == "Subject:windows-1252,From:iso-8859-1"


def test_without_a_declared_charset_the_configured_one_is_used():
    raw = "Subject: Счёт\nFrom: post@kunde.example\n\nx\n".encode("koi8-r")
    assert parse(raw, True, legacy_charset="koi8-r").first("Subject") == "Счёт"
    assert parse(b"Subject: 5 \x80\n\nx\n", True).first("Subject") == "5 €"  # windows-1252 by default


def test_a_declared_charset_that_does_not_keep_ascii_is_never_used():
    raw = "Subject: Pr\xe6mie\nContent-Type: text/plain; charset=utf-16\n\nx\n".encode("latin-1")
    message = parse(raw, True)
    assert message.first("Subject") == "Præmie" and message.repairs == {"charset": "Subject:windows-1252"}


def test_bytes_that_no_charset_decodes_are_refused_clearly():
    raw = b"Subject: \x81\x8d\nContent-Type: text/plain; charset=us-ascii\n\nx\n"
    with pytest.raises(MalformedMessage) as caught:
        parse(raw, True)
    assert str(caught.value) == (
        "the Subject header is neither UTF-8 nor us-ascii nor windows-1252; encode it (RFC 2047)")


def test_a_decoded_control_character_is_refused():
    with pytest.raises(MalformedMessage, match="neither UTF-8 nor iso-8859-1"):
        parse(b"Subject: a\x85b\nContent-Type: text/plain; charset=iso-8859-1\n\nx\n", True,
              legacy_charset="iso-8859-1")


@pytest.mark.parametrize("smtputf8", [False, True])
def test_repaired_headers_reach_the_upstream_as_the_site_wrote_them(smtputf8: bool):
    message = parse(LATIN1_SITE.encode("windows-1252"), True)
    wire = for_upstream(message, ENVELOPE, smtputf8=smtputf8, eightbit=True)
    head = wire.data.split(b"\r\n\r\n")[0]
    if smtputf8:
        assert "Subject: Grüße aus Köln – Bestellung".encode() in head and wire.smtputf8
    else:
        assert head.isascii() and not wire.smtputf8
    parsed = email.message_from_string(wire.data.decode("utf-8", "surrogateescape"), policy=email.policy.default)
    assert parsed["Subject"] == "Grüße aus Köln – Bestellung"
    assert parsed["From"].addresses[0].display_name == "Jörg Müller"
    assert parsed.get_content_charset() == "iso-8859-1"


def test_the_legacy_charset_is_checked_when_the_config_is_read():
    base = {"upstream": {"host": "relay.example"}, "spf": {"enabled": False}}
    assert from_mapping(base).message.legacy_charset == "windows-1252"
    assert from_mapping({**base, "message": {"legacy_charset": "ISO-8859-15"}}).message.legacy_charset == \
        "iso-8859-15"
    for wrong in ("utf-16", "utf-7", "rot13", "no-such-charset"):
        with pytest.raises(ConfigError) as caught:
            from_mapping({**base, "message": {"legacy_charset": wrong}}, "/etc/x.toml")
        assert str(caught.value).startswith(f"/etc/x.toml: message.legacy_charset: {wrong!r} is not a charset")


def test_the_header_size_bound_is_a_config_key():
    base = {"upstream": {"host": "relay.example"}, "spf": {"enabled": False}}
    assert from_mapping(base).message.max_header_size == 256 * 1024
    assert from_mapping({**base, "message": {"max_header_size": 4096}}).message.max_header_size == 4096
    with pytest.raises(ConfigError, match="message.max_header_size: must be between 1024"):
        from_mapping({**base, "message": {"max_header_size": 10}})
    with pytest.raises(MalformedMessage, match="headers are larger than 4096 bytes in all"):
        parse(b"To: " + b"a@x.example, " * 400 + b"\n\nx\n", True, max_header_size=4096)
