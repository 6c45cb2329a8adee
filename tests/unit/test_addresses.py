"""One strict address parser for argv, -f and every address header."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sendmail_shim.addresses import (
    AddressError,
    Group,
    Mailbox,
    mailboxes,
    parse_address_list,
    parse_mailbox,
)


def keys(text: str, qualify: str | None = None) -> list[str]:
    return [m.key for m in mailboxes(parse_address_list(text, qualify))]


@pytest.mark.parametrize(("text", "expected"), [
    ("a@x.example", ["a@x.example"]),
    ("a@x.example,b@y.example", ["a@x.example", "b@y.example"]),  # cron MAILTO
    ("Ola Nordmann <ola@x.example>", ["ola@x.example"]),
    ('"Nordmann, Ola" <ola@x.example>, kari@x.example', ["ola@x.example", "kari@x.example"]),
    ("ola@x.example (Ola)", ["ola@x.example"]),
    ("list: a@x.example, b@x.example;", ["a@x.example", "b@x.example"]),
    ("undisclosed-recipients:;", []),
    ("<A@X.Example.>", ["a@x.example"]),
    ('"a"@x.example', ["a@x.example"]),
    ("Bjørn <bjørn@bücher.example>", ["bjørn@xn--bcher-kva.example"]),
    ("a@x.example, , b@x.example", ["a@x.example", "b@x.example"]),
    ("John Q. Public <jqp@x.example>", ["jqp@x.example"]),
])
def test_valid_lists(text, expected):
    assert keys(text) == expected


@pytest.mark.parametrize("text", [
    "attacker@evil.example <bob@victim.example>",  # CVE-2023-27043 shape
    "alice@example.org(<bob@example.org>",
    "a@malicious.example@important.example",  # CVE-2019-16056 shape
    "a@x.example,\r\n Bcc: evil@x.example",  # a folded To smuggling a group with no ';'
    "a@[192.0.2.1]",
    "a @x.example",
    '"unterminated@x.example',
    "a@-x.example",
    "a@x_y.example",
    "a@" + "x" * 64 + ".example",
    "x" * 65 + "@x.example",
    "-oQ/tmp@x.example",
    "outer: inner: a@x.example;;",
    "a@x.example\0",
    "",  # parses as an empty list, refused by parse_mailbox
])
def test_invalid_mailbox(text):
    with pytest.raises(AddressError):
        parse_mailbox(text)


def test_unqualified_needs_a_domain():
    with pytest.raises(AddressError, match="no domain"):
        parse_mailbox("root")
    assert parse_mailbox("root (Cron Daemon)", "host.example").key == "root@host.example"


def test_duplicates_share_a_key():
    forms = ["a@x.example", "<A@X.EXAMPLE>", '"a"@x.example', "a@x.example."]
    assert {parse_mailbox(f).key for f in forms} == {"a@x.example"}


def test_quoted_local_part_survives():
    box = parse_mailbox('"john smith"@x.example')
    assert box.address == '"john smith"@x.example'


def test_group_structure_is_kept():
    items = parse_address_list("team: a@x.example;, b@x.example")
    assert isinstance(items[0], Group) and items[0].display_name == "team"
    assert isinstance(items[1], Mailbox)


_atext = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789!#$%&'*+/=?^_`{|}~", min_size=1, max_size=10)
_label = st.from_regex(r"[a-z0-9]([a-z0-9-]{0,8}[a-z0-9])?", fullmatch=True)


@given(local=st.lists(_atext, min_size=1, max_size=3).map(".".join), labels=st.lists(_label, min_size=1, max_size=4),
       name=st.one_of(st.none(), st.text(min_size=1, max_size=20).filter(lambda s: s.isprintable())))
def test_render_then_parse_round_trips(local, labels, name):
    from sendmail_shim.addresses import quote_phrase

    domain = ".".join(labels)
    if local.startswith("-"):
        return
    text = f"{quote_phrase(name.strip() or 'x')} <{local}@{domain}>" if name else f"{local}@{domain}"
    box = parse_mailbox(text)
    assert box.address == f"{local}@{domain}"
    assert parse_mailbox(box.address) == Mailbox(box.local, box.domain)


@given(st.text(max_size=80))
def test_parser_never_crashes_and_never_yields_line_breaks(text):
    try:
        found = mailboxes(parse_address_list(text))
    except AddressError:
        return
    for box in found:
        assert "\r" not in box.address and "\n" not in box.address and "\0" not in box.address
