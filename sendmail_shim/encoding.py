"""Make the message fit what the upstream offers, never sending what it cannot take.

* Raw UTF-8 headers go as they are with ``SMTPUTF8``; otherwise they are
  RFC 2047-encoded (address headers are rebuilt from the parsed addresses,
  so only display names are encoded and domains are A-labels).
* An 8-bit body goes with ``BODY=8BITMIME``; otherwise each 8-bit text part
  is re-encoded as quoted-printable. Lines over 998 octets are re-encoded the
  same way in any case, never split silently.
* Header lines over 998 octets are folded, never refused (PHPMailer writes a
  hundred addresses on one line): address headers at the commas between
  addresses, others at their white space; a word too long for any line
  becomes RFC 2047 encoded-words in unstructured text. Folding only inserts
  line breaks before white space (or after a comma), so the unfolded header
  says what it said.
* What cannot be represented (a non-ASCII local part without SMTPUTF8, an
  8-bit base64 part) is refused with a clear line.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from .addresses import Address, AddressError, Group, Mailbox, list_separators, parse_address_list, quote_phrase
from .envelope import Envelope
from .message import (
    MAX_LINE,
    Header,
    MalformedMessage,
    Message,
    declared_charset,
    repair_charsets,
    serialise,
    split_header_section,
    unfold,
)

ADDRESS_HEADERS = frozenset({
    "from", "sender", "reply-to", "to", "cc", "bcc", "resent-from", "resent-sender",
    "resent-to", "resent-cc", "resent-bcc", "disposition-notification-to",
})
# Structured fields other than addresses: folded at their white space only.
STRUCTURED_HEADERS = frozenset({
    "date", "resent-date", "message-id", "resent-message-id", "in-reply-to", "references",
    "received", "return-path", "mime-version", "content-type", "content-transfer-encoding",
    "content-disposition", "content-id", "content-language", "content-location",
    "dkim-signature", "arc-seal", "arc-message-signature", "arc-authentication-results",
    "authentication-results", "list-id", "list-unsubscribe", "list-unsubscribe-post",
    "list-post", "list-help", "list-subscribe", "list-owner", "list-archive", "auto-submitted",
})
FOLD_WIDTH = 78  # RFC 5322's recommended line length, used wherever a header must be folded anyway
_MAX_NESTING = 20
_WORDS = re.compile(r"[ \t]*[^ \t]+|[ \t]+")
_ENCODED_WORD = re.compile(r"=\?[^?\s]+\?[bBqQ]\?[^?\s]*\?=")


class CannotEncode(MalformedMessage):
    """The message cannot be represented for this upstream (exit 65)."""


@dataclass(frozen=True)
class Wire:
    """The bytes for DATA and the MAIL FROM parameters they need."""

    data: bytes
    smtputf8: bool
    eightbit: bool


def for_upstream(message: Message, envelope: Envelope, *, smtputf8: bool, eightbit: bool) -> Wire:
    if envelope.needs_smtputf8 and not smtputf8:
        raise CannotEncode(
            "an address has a non-ASCII local part, and the upstream does not offer SMTPUTF8"
        )
    headers = message.headers
    use_utf8 = envelope.needs_smtputf8
    if not all(h.raw.isascii() for h in headers):
        if smtputf8:
            use_utf8 = True
        else:
            headers = [encode_header(h) for h in headers]
    headers, body = _entity(headers, message.body, eightbit or use_utf8, top=True, depth=0,
                            legacy=message.legacy_charset)
    data = serialise(fold_long_lines(headers), body)
    return Wire(data=data, smtputf8=use_utf8, eightbit=use_utf8 or not _is_7bit(body))


def _is_7bit(lines: list[bytes]) -> bool:
    return all(line.isascii() for line in lines)


def _needs_work(lines: list[bytes], allow_8bit: bool) -> bool:
    return any(len(line) > MAX_LINE or (not allow_8bit and not line.isascii()) for line in lines)


# --- body ------------------------------------------------------------------


def _entity(
    headers: list[Header], body: list[bytes], allow_8bit: bool, *, top: bool, depth: int, legacy: str
) -> tuple[list[Header], list[bytes]]:
    if not _needs_work(body, allow_8bit):
        return headers, body
    if depth > _MAX_NESTING:
        raise CannotEncode("the MIME structure is nested too deeply")
    ctype, boundary = _content_type(headers)
    if ctype.startswith("multipart/"):
        if not boundary:
            raise CannotEncode("a multipart part has no boundary")
        return headers, _multipart(body, boundary, allow_8bit, depth, legacy)
    if ctype == "message/rfc822":
        return headers, _rebuild_part(body, allow_8bit, depth, legacy)
    return _quoted_printable_part(headers, body, allow_8bit, top=top)


def _quoted_printable_part(
    headers: list[Header], body: list[bytes], allow_8bit: bool, *, top: bool
) -> tuple[list[Header], list[bytes]]:
    cte = _transfer_encoding(headers)
    if cte not in ("", "7bit", "8bit"):
        raise CannotEncode(
            f"a part encoded as {cte} holds 8-bit data or lines longer than {MAX_LINE} octets"
        )
    had_8bit = not _is_7bit(body)
    encoded = [piece for line in body for piece in _qp_line(line)]
    kept = [h for h in headers if h.lname != "content-transfer-encoding"]
    if not allow_8bit:
        kept = [encode_header(h) for h in kept]
    if top and not any(h.lname == "mime-version" for h in kept):
        kept.append(Header.build("MIME-Version", "1.0"))
    if had_8bit and not any(h.lname == "content-type" for h in kept):
        kept.append(Header.build("Content-Type", "text/plain; charset=utf-8"))
    kept.append(Header.build("Content-Transfer-Encoding", "quoted-printable"))
    return kept, encoded


def _qp_line(line: bytes) -> list[bytes]:
    encoded = binascii.b2a_qp(line, quotetabs=False, istext=True, header=False)
    return encoded.split(b"\n")


def _multipart(body: list[bytes], boundary: str, allow_8bit: bool, depth: int, legacy: str) -> list[bytes]:
    delimiter = b"--" + boundary.encode("ascii", "replace")
    closing = delimiter + b"--"
    out: list[bytes] = []
    part: list[bytes] | None = None
    for index, line in enumerate(body):
        stripped = line.rstrip(b" \t")
        if stripped in (delimiter, closing):
            if part is not None:
                out.extend(_rebuild_part(part, allow_8bit, depth, legacy))
            out.append(line)
            if stripped == closing:
                out.extend(_checked_epilogue(body[index + 1:], allow_8bit))
                return out
            part = []
        elif part is None:
            out.append(line)  # preamble
        else:
            part.append(line)
    raise CannotEncode("a multipart part is not closed with its final boundary")


def _checked_epilogue(lines: list[bytes], allow_8bit: bool) -> list[bytes]:
    if _needs_work(lines, allow_8bit):
        raise CannotEncode("the MIME epilogue holds 8-bit data or over-long lines")
    return lines


def _rebuild_part(lines: list[bytes], allow_8bit: bool, depth: int, legacy: str) -> list[bytes]:
    """A MIME part (or an attached message) re-encoded, its headers repaired as the message's are."""
    headers, body = split_header_section(lines, None)  # within max_size: the whole input was
    repair_charsets(headers, (declared_charset(headers), legacy))
    if not allow_8bit:
        headers = [encode_header(h) for h in headers]
    headers, body = _entity(headers, body, allow_8bit, top=False, depth=depth + 1, legacy=legacy)
    return serialise(fold_long_lines(headers), body).split(b"\r\n")[:-1]


_PARAM_BOUNDARY = re.compile(r'boundary\s*=\s*(?:"([^"]*)"|([^;\s]+))', re.IGNORECASE)


def _content_type(headers: list[Header]) -> tuple[str, str | None]:
    for header in headers:
        if header.lname == "content-type":
            value = header.value
            ctype = value.split(";", 1)[0].strip().lower()
            match = _PARAM_BOUNDARY.search(value)
            return ctype, (match.group(1) or match.group(2)) if match else None
    return "text/plain", None


def _transfer_encoding(headers: list[Header]) -> str:
    for header in headers:
        if header.lname == "content-transfer-encoding":
            return header.value.strip().lower()
    return ""


# --- headers (RFC 2047) -----------------------------------------------------


def encode_header(header: Header) -> Header:
    """The header with every non-ASCII word turned into encoded-words."""
    if header.raw.isascii():
        return header
    value = _encode_address_list(header) if header.lname in ADDRESS_HEADERS else _encode_text(header.value)
    return Header(header.name, _fold(f"{header.name}: {value}").encode("ascii"))


def _encode_address_list(header: Header) -> str:
    try:
        items = parse_address_list(header.value)
    except AddressError as exc:
        raise CannotEncode(f"the {header.name} header cannot be encoded ({exc})") from None
    rendered = []
    for item in items:
        if isinstance(item, Group):
            members = ", ".join(_render_mailbox(m) for m in item.members)
            rendered.append(f"{_encode_phrase(item.display_name)}: {members};")
        else:
            rendered.append(_render_mailbox(item))
    return ", ".join(rendered)


def _render_mailbox(mailbox: Mailbox) -> str:
    if mailbox.needs_smtputf8:
        raise CannotEncode(
            f"the address {mailbox.address} has a non-ASCII local part, and the upstream does not offer SMTPUTF8"
        )
    if mailbox.display_name:
        return f"{_encode_phrase(mailbox.display_name)} <{mailbox.address}>"
    return mailbox.address


def _encode_phrase(name: str) -> str:
    return quote_phrase(name) if name.isascii() else _encode_text(name)


def _encode_text(text: str) -> str:
    """Encode runs of non-ASCII words; spaces inside a run go inside the encoding."""
    words = text.split(" ")
    out: list[str] = []
    run: list[str] = []
    for word in words:
        if not word.isascii():
            run.append(word)
            continue
        if run and not word:
            run.append(word)  # keep a doubled space inside the run
            continue
        if run:
            out.append(_encoded_words(" ".join(run)))
            run = []
        out.append(word)
    if run:
        out.append(_encoded_words(" ".join(run)))
    return " ".join(out)


def _encoded_words(text: str) -> str:
    """``=?utf-8?b?...?=`` words of at most 75 characters, split between characters."""
    words: list[str] = []
    chunk = b""
    for char in text:
        data = char.encode("utf-8")
        if len(chunk) + len(data) > 45:  # 45 octets -> 60 base64 characters
            words.append(_b_word(chunk))
            chunk = b""
        chunk += data
    if chunk:
        words.append(_b_word(chunk))
    return " ".join(words)


def _b_word(data: bytes) -> str:
    return "=?utf-8?b?" + base64.b64encode(data).decode("ascii") + "?="


def _fold(line: str, width: int = 78) -> str:
    """Fold at spaces so that lines stay within ``width`` where the words allow."""
    out: list[str] = []
    current = ""
    for word in line.split(" "):
        if not word:
            current += " "  # never fold onto a line of only white space
            continue
        if current and len(current) + 1 + len(word) > width:
            out.append(current)
            current = word
        else:
            current = f"{current} {word}" if current else word
    out.append(current)
    return "\r\n ".join(out)


# --- folding long header lines ----------------------------------------------------


def too_long(header: Header) -> bool:
    return len(header.raw) > MAX_LINE and any(len(line) > MAX_LINE for line in header.raw.split(b"\r\n"))


def fold_long_lines(headers: list[Header]) -> list[Header]:
    """The headers with every one that has a line over 998 octets folded."""
    return [fold(h) if too_long(h) else h for h in headers]


def fold(header: Header) -> Header:
    """The header folded into lines of at most ``FOLD_WIDTH`` octets where its words allow."""
    head, _, value = unfold(header.raw).decode("utf-8").partition(":")
    pieces = _merge_blank(_pieces(header.lname, value))
    lines = [head + ":" + pieces[0]]
    for piece in pieces[1:]:  # every further piece starts with white space: the folding point
        if _octets(lines[-1]) + _octets(piece) > FOLD_WIDTH:
            lines.append(piece)
        else:
            lines[-1] += piece
    if any(_octets(line) > MAX_LINE for line in lines):
        raise CannotEncode(f"the {header.name} header holds a word longer than {MAX_LINE} octets; shorten it")
    return Header(header.name, "\r\n".join(lines).encode("utf-8"))


def _octets(text: str) -> int:
    return len(text) if text.isascii() else len(text.encode("utf-8"))


def _pieces(lname: str, value: str) -> list[str]:
    """The value cut where it may be folded; joined, the pieces say what the value says."""
    if lname in ADDRESS_HEADERS:
        return _address_pieces(value)
    words = _words(value)
    if lname in STRUCTURED_HEADERS:
        return words
    return [piece for index, word in enumerate(words) for piece in _encoded_if_too_long(words, index)]


def _words(text: str) -> list[str]:
    """``text`` cut before each run of white space."""
    return _WORDS.findall(text) or [text]


def _merge_blank(pieces: list[str]) -> list[str]:
    """No line of white space only: a blank piece joins the one before it."""
    merged: list[str] = []
    for piece in pieces:
        if merged and not piece.strip(" \t"):
            merged[-1] += piece
        else:
            merged.append(piece)
    return merged or [""]


def _address_pieces(value: str) -> list[str]:
    """Cut after each comma between addresses; an address too long for a line, at its white space."""
    try:
        commas = list_separators(value)
    except AddressError:
        return _words(value)  # not an address list we can read: fold it as text
    pieces: list[str] = []
    start = 0
    for end in [*(c + 1 for c in commas), len(value)]:
        segment = value[start:end]
        if pieces and segment and segment[0] not in " \t":
            segment = " " + segment  # white space after a comma changes no address
        pieces.extend(_words(segment) if _octets(segment) > MAX_LINE else [segment])
        start = end
    if any(_octets(piece) > MAX_LINE for piece in pieces):
        return _words(" " + _rendered_for_folding(parse_address_list(value)))
    return [piece for piece in pieces if piece]


def _rendered_for_folding(items: list[Address]) -> str:
    """The list written anew, each display name too long for a line as encoded-words."""
    def phrase(name: str) -> str:
        if any(_octets(word) > MAX_LINE // 2 for word in name.split(" ")):
            return _encoded_words(name)
        return quote_phrase(name)

    def mailbox(item: Mailbox) -> str:
        return f"{phrase(item.display_name)} <{item.address}>" if item.display_name else item.address

    rendered = [
        f"{phrase(item.display_name)}: {', '.join(mailbox(m) for m in item.members)};"
        if isinstance(item, Group) else mailbox(item)
        for item in items
    ]
    return ", ".join(rendered)


def _encoded_if_too_long(words: list[str], index: int) -> list[str]:
    """One word of unstructured text, as encoded-words when no line could hold it."""
    word = words[index]
    if _octets(word) <= MAX_LINE:
        return [word]
    text = word.lstrip(" \t")
    lead = word[:len(word) - len(text)] or " "
    # White space between two encoded-words vanishes when decoded: keep it inside ours.
    if index > 0 and _ENCODED_WORD.fullmatch(words[index - 1].strip(" \t")):
        text = lead + text
    if index + 1 < len(words) and _ENCODED_WORD.fullmatch(words[index + 1].strip(" \t")):
        text += words[index + 1][:len(words[index + 1]) - len(words[index + 1].lstrip(" \t"))]
    return _words(lead + _encoded_words(text))
