"""The frame format both sides share: sizes, order, deadlines and the verdict encoding."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from sendmail_shim import gate_protocol as protocol


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    left, right = socket.socketpair()
    with left, right:
        yield left, right


def _soon(seconds: float = 5) -> float:
    return time.monotonic() + seconds


def test_frames_arrive_whole_even_when_sent_a_byte_at_a_time(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    data = protocol.frame(protocol.ARG, b"-t") + protocol.frame(protocol.DATA, b"x" * 35000)
    sender = threading.Thread(target=lambda: [left.send(data[i:i + 1]) for i in range(len(data))])
    sender.start()
    assert protocol.read_frame(right, _soon(), protocol.ARG) == (protocol.ARG, b"-t")
    assert protocol.read_frame(right, _soon(), protocol.DATA) == (protocol.DATA, b"x" * 35000)
    sender.join()


@pytest.mark.parametrize(("kind", "size"), [(protocol.ARG, 8193), (protocol.DATA, 65537),
                                            (protocol.END, 1), (protocol.VERDICT, 4097)])
def test_a_frame_over_its_maximum_cannot_be_built(kind: bytes, size: int) -> None:
    with pytest.raises(protocol.BadFrame, match="at most"):
        protocol.frame(kind, b"x" * size)


def test_an_absurd_length_is_refused_before_any_payload_is_read(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    left.sendall(protocol.DATA + (2**32 - 1).to_bytes(4, "big"))
    started = time.monotonic()
    with pytest.raises(protocol.BadFrame, match="over the limit"):
        protocol.read_frame(right, _soon(), protocol.DATA)
    assert time.monotonic() - started < 1


def test_a_frame_out_of_order_is_refused(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    left.sendall(protocol.frame(protocol.END))
    with pytest.raises(protocol.BadFrame, match="unexpected frame type"):
        protocol.read_frame(right, _soon(), protocol.ARG)


def test_the_deadline_covers_the_whole_frame_not_each_byte(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    left.sendall(protocol.frame(protocol.DATA, b"abcdef")[:-3])

    def trickle() -> None:
        for byte in b"def":
            time.sleep(0.4)
            left.send(bytes([byte]))

    sender = threading.Thread(target=trickle)
    sender.start()
    started = time.monotonic()
    with pytest.raises(protocol.PeerTooSlow):
        protocol.read_frame(right, time.monotonic() + 1, protocol.DATA)
    assert 0.9 < time.monotonic() - started < 1.5
    sender.join()


def test_a_connection_closed_inside_a_frame_is_noticed(pair: tuple[socket.socket, socket.socket]) -> None:
    left, right = pair
    left.sendall(protocol.frame(protocol.DATA, b"complete-looking")[:-4])
    left.shutdown(socket.SHUT_WR)
    with pytest.raises(protocol.PeerClosed):
        protocol.read_frame(right, _soon(), protocol.DATA)


def test_verdict_round_trip_keeps_each_part() -> None:
    verdict = protocol.WireVerdict(77, "not sent: post@b.example is not yours", 550, "5.7.1 not yours")
    back = protocol.WireVerdict.decode(verdict.encode())
    assert (back.code, back.line, back.smtp_code, back.smtp_text) == (
        77, "not sent: post@b.example is not yours", 550, "5.7.1 not yours")
    assert protocol.WireVerdict.decode(protocol.WireVerdict(0, None, 250, "2.0.0 sent").encode()).line is None


def test_verdict_text_can_never_add_a_line() -> None:
    hostile = protocol.WireVerdict(69, "first\r\nsendmail: sent fine\x1b[2J", 451, "4.3.0 a\nb")
    back = protocol.WireVerdict.decode(hostile.encode())
    assert back.line == "first  sendmail: sent fine [2J" and back.smtp_text == "4.3.0 a b"


def test_a_very_long_verdict_still_fits_one_frame_and_decodes() -> None:
    long = protocol.WireVerdict(65, "ø" * 5000, 554, "é" * 5000)
    payload = long.encode()
    assert len(payload) <= protocol.MAX_PAYLOAD[protocol.VERDICT]
    back = protocol.WireVerdict.decode(payload)
    assert back.code == 65 and back.line and back.line.startswith("øøø") and back.smtp_text.startswith("ééé")


@pytest.mark.parametrize("payload", [b"", b"\x00\x00", b"\x00\x00\x00no-newline", b"\x00\x00\x05x\ny"])
def test_malformed_verdicts_are_refused(payload: bytes) -> None:
    with pytest.raises(protocol.BadFrame):
        protocol.WireVerdict.decode(payload)
