"""The message goes to DATA dot-stuffed block by block: the same bytes as stuffing it whole."""

from __future__ import annotations

import random
import re

import pytest

from sendmail_shim.relay import BLOCK_SIZE, dot_stuffed_blocks

_LINE_START_DOT = re.compile(rb"(?m)^\.")


def stuffed_whole(data: bytes) -> bytes:
    """RFC 5321 4.5.2 on the whole message, then the final dot on a line of its own."""
    wire = _LINE_START_DOT.sub(b"..", data)
    if not wire.endswith(b"\r\n"):
        wire += b"\r\n"
    return wire + b".\r\n"


def _random_message(seed: int) -> bytes:
    rng = random.Random(seed)
    pieces = [b".", b"..", b"a", b"\r\n", b"\r\n.", b"\r\n..\r\n", b"x" * rng.randint(0, 3 * BLOCK_SIZE // 2)]
    return b"".join(rng.choice(pieces) for _ in range(rng.randint(0, 60)))


@pytest.mark.parametrize("data", [
    b"", b".", b"x", b".\r\n", b"a\r\n.\r\n..\r\n", b"\r\n" * BLOCK_SIZE,
    b"." + b"x" * (3 * BLOCK_SIZE) + b"\r\n.y",  # a line longer than a block, starting with a dot
    (b"y" * (BLOCK_SIZE - 2) + b"\r\n.") * 5,  # a dot at the start of each block
])
def test_blocks_carry_the_bytes_stuffing_the_whole_would(data: bytes) -> None:
    assert b"".join(dot_stuffed_blocks(data)) == stuffed_whole(data)


@pytest.mark.parametrize("seed", range(200))
def test_random_messages_are_stuffed_alike(seed: int) -> None:
    data = _random_message(seed)
    assert b"".join(dot_stuffed_blocks(data)) == stuffed_whole(data)


def test_a_large_message_is_never_copied_whole() -> None:
    data = (b"line of a large message\r\n.hidden dot\r\n" * 100_000)
    blocks = list(dot_stuffed_blocks(data))
    assert max(len(block) for block in blocks) <= BLOCK_SIZE + BLOCK_SIZE // 8
    assert b"".join(blocks) == stuffed_whole(data)


def test_a_small_message_goes_in_one_write_with_its_final_dot() -> None:
    assert list(dot_stuffed_blocks(b"Subject: x\r\n\r\n.hi\r\n")) == [b"Subject: x\r\n\r\n..hi\r\n.\r\n"]
