"""Properties of the message stage over arbitrary input (hypothesis)."""

from __future__ import annotations

import contextlib
import re

from hypothesis import given, settings
from hypothesis import strategies as st

from sendmail_shim.message import MessageError, parse

BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")
pieces = st.sampled_from([b"\r\n", b"\n", b"\r", b".", b"..", b"From: a@x.example", b"To: b@x.example",
                          b"Subject: s", b" folded", b"body", b":", b"\xc3\xa5", b"\xff", b"\0", b"\t", b""])


@settings(max_examples=400)
@given(st.lists(pieces, max_size=40).map(b"".join), st.booleans())
def test_accepted_messages_are_clean_crlf_and_stable(raw: bytes, ignore_dots: bool):
    try:
        message = parse(raw, ignore_dots)
    except MessageError:
        return  # a refusal is a fine answer; a crash or a dirty output is not
    data = message.as_bytes()
    assert BARE.search(data) is None
    assert b"\0" not in data
    again = parse(data, ignore_dots=True)
    assert again.as_bytes() == data  # what we send parses to the same thing the upstream will see
    assert [h.name for h in again.headers] == [h.name for h in message.headers]


@given(st.binary(max_size=300), st.booleans())
def test_arbitrary_bytes_never_crash(raw: bytes, ignore_dots: bool):
    with contextlib.suppress(MessageError):
        parse(raw, ignore_dots)
