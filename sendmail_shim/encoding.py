"""Make the message fit what the upstream offers, never sending what it cannot take.

* Raw UTF-8 headers go as they are with ``SMTPUTF8``; otherwise they are
  RFC 2047-encoded (address headers are rebuilt from the parsed addresses,
  so only display names are encoded and domains are A-labels).
* An 8-bit body goes with ``BODY=8BITMIME``; otherwise each 8-bit text part
  is re-encoded as quoted-printable. Lines over 998 octets are re-encoded the
  same way in any case, never split silently.
* What cannot be represented (a non-ASCII local part without SMTPUTF8, an
  8-bit base64 part) is refused with a clear line.
"""

from __future__ import annotations

import base64
import binascii
import re
from dataclasses import dataclass

from .addresses import AddressError, Group, Mailbox, parse_address_list, quote_phrase
from .envelope import Envelope
from .message import MAX_LINE, Header, MalformedMessage, Message, _split_header_section, serialise

ADDRESS_HEADERS = frozenset({
    "from", "sender", "reply-to", "to", "cc", "bcc", "resent-from", "resent-sender",
    "resent-to", "resent-cc", "resent-bcc", "disposition-notification-to",
})
_MAX_NESTING = 20


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
    headers, body = _entity(headers, message.body, eightbit or use_utf8, top=True, depth=0)
    data = serialise(headers, body)
    return Wire(data=data, smtputf8=use_utf8, eightbit=use_utf8 or not _is_7bit(body))


def _is_7bit(lines: list[bytes]) -> bool:
    return all(line.isascii() for line in lines)


def _needs_work(lines: list[bytes], allow_8bit: bool) -> bool:
    return any(len(line) > MAX_LINE or (not allow_8bit and not line.isascii()) for line in lines)


# --- body ------------------------------------------------------------------


def _entity(
    headers: list[Header], body: list[bytes], allow_8bit: bool, *, top: bool, depth: int
) -> tuple[list[Header], list[bytes]]:
    if not _needs_work(body, allow_8bit):
        return headers, body
    if depth > _MAX_NESTING:
        raise CannotEncode("the MIME structure is nested too deeply")
    ctype, boundary = _content_type(headers)
    if ctype.startswith("multipart/"):
        if not boundary:
            raise CannotEncode("a multipart part has no boundary")
        return headers, _multipart(body, boundary, allow_8bit, depth)
    if ctype == "message/rfc822":
        inner_headers, inner_body = _split_header_section(body)
        if not allow_8bit:
            inner_headers = [encode_header(h) for h in inner_headers]
        inner_headers, inner_body = _entity(inner_headers, inner_body, allow_8bit, top=False, depth=depth + 1)
        return headers, serialise(inner_headers, inner_body).split(b"\r\n")[:-1]
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


def _multipart(body: list[bytes], boundary: str, allow_8bit: bool, depth: int) -> list[bytes]:
    delimiter = b"--" + boundary.encode("ascii", "replace")
    closing = delimiter + b"--"
    out: list[bytes] = []
    part: list[bytes] | None = None
    for index, line in enumerate(body):
        stripped = line.rstrip(b" \t")
        if stripped in (delimiter, closing):
            if part is not None:
                out.extend(_rebuild_part(part, allow_8bit, depth))
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


def _rebuild_part(lines: list[bytes], allow_8bit: bool, depth: int) -> list[bytes]:
    headers, body = _split_header_section(lines)
    headers, body = _entity(headers, body, allow_8bit, top=False, depth=depth + 1)
    return serialise(headers, body).split(b"\r\n")[:-1]


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
