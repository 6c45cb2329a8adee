"""The message as read from stdin: bounded, normalised and strictly parsed.

Every line ending (LF, CRLF, a lone CR, any mix: PHP writes them mixed)
becomes CRLF *before* anything else looks at the bytes, so the header/body
boundary and the dot rules we see are the ones the upstream sees (no SMTP
smuggling). Without ``-i`` a line holding only ``.`` ends the message and a
leading ``..`` loses one dot, as in Sendmail 8.

The parsed message is kept as raw header fields plus body lines; nothing is
re-serialised unless the upstream needs it encoded (see ``encoding.py``).

Header bytes that are not UTF-8 (legacy PHP sites write raw ISO-8859-1) are
decoded once, here, with the charset the message declares or else
``[message] legacy_charset``, so every later stage sees the same text. Long
header lines are accepted; they are folded for the upstream (``encoding.py``).
"""

from __future__ import annotations

import os
import re
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import BinaryIO

from .addresses import AddressError, LocalPart, Mailbox, parse_address_list, parse_author
from .charsets import DEFAULT_LEGACY_CHARSET, ascii_compatible

MAX_LINE = 998  # RFC 5322 2.1.1, octets without CRLF
MAX_HEADER_SECTION = 256 * 1024
_DECLARED_CHARSET = re.compile(rb"""charset\s*=\s*["']?([A-Za-z0-9!#$%&+^_`{}~.:-]+)""", re.IGNORECASE)
_CONTROLS = re.compile(r"[\x00-\x08\x0a-\x1f\x7f-\x9f]")
_EOL = re.compile(rb"\r\n|\r|\n")
_FIELD = re.compile(rb"^([\x21-\x39\x3b-\x7e]+)[ \t]*:")
READ_CHUNK = 64 * 1024


class MessageError(Exception):
    """The message cannot be accepted as it is."""


class EmptyMessage(MessageError):
    """No input at all (exit 66)."""


class MalformedMessage(MessageError):
    """Header defects, NUL bytes, several From, … (exit 65)."""


class MessageTooLarge(MalformedMessage):
    """More than ``[message] max_size`` bytes (exit 65)."""


@dataclass
class Header:
    """One header field: its name and the raw lines (CRLF-joined, no final CRLF)."""

    name: str
    raw: bytes

    @property
    def lname(self) -> str:
        return self.name.lower()

    @property
    def value(self) -> str:
        """The unfolded value as text (validated UTF-8 at parse time)."""
        colon = self.raw.index(b":")
        return unfold(self.raw[colon + 1:]).decode("utf-8").strip(" \t")

    @classmethod
    def build(cls, name: str, value: str) -> Header:
        return cls(name, f"{name}: {value}".encode())


@dataclass
class Message:
    headers: list[Header]
    body: list[bytes]
    from_mailbox: Mailbox | None = None
    extras: dict[str, str] = field(default_factory=dict)
    from_local: LocalPart | None = None  # a From without a domain, until the envelope stage maps it
    legacy_charset: str = DEFAULT_LEGACY_CHARSET
    repairs: dict[str, str] = field(default_factory=dict)  # what was repaired, as log fields

    def get_all(self, name: str) -> list[Header]:
        lname = name.lower()
        return [h for h in self.headers if h.lname == lname]

    def first(self, name: str) -> str | None:
        found = self.get_all(name)
        return found[0].value if found else None

    def remove(self, *names: str) -> None:
        lnames = {n.lower() for n in names}
        self.headers = [h for h in self.headers if h.lname not in lnames]

    @property
    def message_id(self) -> str | None:
        return self.first("Message-ID")

    def as_bytes(self) -> bytes:
        return serialise(self.headers, self.body)


def serialise(headers: Iterable[Header], body: list[bytes]) -> bytes:
    """Headers, the blank line and the body, every line ending CRLF.

    One join, so a large body is copied once (not joined, then joined again with the headers).
    """
    return b"\r\n".join([*(h.raw for h in headers), b"", *body, b""])


def unfold(raw: bytes) -> bytes:
    return re.sub(rb"\r\n(?=[ \t])", b"", raw)


def read_input(stream: BinaryIO, max_size: int) -> bytes:
    """Read stdin, never holding more than ``max_size`` + one chunk."""
    chunks: list[bytes] = []
    total = 0
    while True:
        chunk = stream.read(READ_CHUNK)
        if not chunk:
            break
        total += len(chunk)
        if total > max_size:
            raise MessageTooLarge(
                f"the message is larger than the limit of {max_size} bytes; send large files as links"
            )
        chunks.append(chunk)
    if not chunks:
        raise EmptyMessage("the input was empty: pipe the message to sendmail on stdin")
    return b"".join(chunks)


def split_lines(raw: bytes, ignore_dots: bool) -> list[bytes]:
    """CRLF-normalised lines, with Sendmail's dot rules unless ``-i``."""
    if b"\0" in raw:
        raise MalformedMessage("the message contains a NUL byte")
    lines = _EOL.split(raw)
    if lines and lines[-1] == b"":
        lines.pop()
    if ignore_dots:
        return lines
    out: list[bytes] = []
    for line in lines:
        if line == b".":
            break
        out.append(line[1:] if line.startswith(b"..") else line)
    return out


def parse(raw: bytes, ignore_dots: bool, *, legacy_charset: str = DEFAULT_LEGACY_CHARSET,
          max_header_size: int | None = MAX_HEADER_SECTION) -> Message:
    """Split the input into header fields and body lines; raise on defects.

    ``max_header_size`` bounds the header section (None: no bound, for what we stored ourselves).
    """
    lines = split_lines(raw, ignore_dots)
    if not lines:
        raise EmptyMessage("the message is empty: nothing before the end of input")
    if lines[0].startswith(b"From ") and not _FIELD.match(lines[0]):
        lines = lines[1:]  # an mbox separator, not a header (Postfix drops it too)
    headers, body = split_header_section(lines, max_header_size)
    message = Message(headers, body, legacy_charset=legacy_charset)
    decoded = repair_charsets(headers, (declared_charset(headers), legacy_charset))
    if decoded:
        message.repairs["charset"] = ",".join(f"{name}:{charset}" for name, charset in decoded)
    _check_headers(message)
    return message


def split_header_section(lines: list[bytes], max_size: int | None = MAX_HEADER_SECTION,
                         ) -> tuple[list[Header], list[bytes]]:
    """Header fields (raw bytes, possibly not UTF-8: see ``repair_charsets``) and the body lines."""
    headers: list[Header] = []
    current: list[bytes] = []
    size = 0
    index = 0
    for index, line in enumerate(lines):  # noqa: B007 - index is used after the loop
        if line == b"":
            index += 1
            break
        size += len(line) + 2
        if max_size is not None and size > max_size:
            raise MalformedMessage(
                f"the message's headers are larger than {max_size} bytes in all; shorten them "
                "(send to long lists through a bulk mail service)"
            )
        if line[:1] in (b" ", b"\t"):
            if not current:
                raise MalformedMessage("the first header line starts with white space")
            current.append(line)
            continue
        match = _FIELD.match(line)
        if match is None:
            if _looks_like_broken_header(line):
                raise MalformedMessage(f"malformed header line {_preview(line)}")
            break  # the body starts here without a blank line, as in Sendmail
        if current:
            headers.append(_header(current))
        current = [line]
    else:
        index = len(lines)
    if current:
        headers.append(_header(current))
    return headers, lines[index:]


def _looks_like_broken_header(line: bytes) -> bool:
    """``Fröm: x`` or ``To\x01: y``: a field name we cannot read, not body text."""
    name, colon, _ = line.partition(b":")
    return bool(colon) and 0 < len(name) <= 76 and b" " not in name.strip()


def _header(lines: list[bytes]) -> Header:
    raw = b"\r\n".join(lines)
    match = _FIELD.match(raw)
    assert match is not None
    name = match.group(1).decode("ascii")
    if any(b < 32 and b not in (9, 10, 13) or b == 127 for b in raw):
        raise MalformedMessage(f"the {name} header contains a control character")
    return Header(name, raw)


# --- legacy charsets ---------------------------------------------------------


def declared_charset(headers: Iterable[Header]) -> str | None:
    """The ``charset`` parameter of the (first) Content-Type, lowercased."""
    for header in headers:
        if header.lname == "content-type":
            found = _DECLARED_CHARSET.search(header.raw.partition(b":")[2])
            return found.group(1).decode("ascii").lower() if found else None
    return None


def repair_charsets(headers: Iterable[Header], charsets: Iterable[str | None]) -> list[tuple[str, str]]:
    """Re-encode as UTF-8 every header that is not; return (header name, charset used) for each."""
    candidates = [c for c in dict.fromkeys(charsets) if c and ascii_compatible(c)]
    repaired: list[tuple[str, str]] = []
    for header in headers:
        try:
            header.raw.decode("utf-8")
            continue
        except UnicodeDecodeError:
            pass
        header.raw, used = _decoded(header, candidates)
        repaired.append((header.name, used))
    return repaired


def _decoded(header: Header, charsets: list[str]) -> tuple[bytes, str]:
    for charset in charsets:
        try:
            text = header.raw.decode(charset)
        except UnicodeDecodeError:
            continue
        if _CONTROLS.search(text.replace("\r\n", "")):
            continue  # C1 controls: ISO-8859-1 read where the site meant windows-1252
        return text.encode("utf-8"), charset
    tried = " nor ".join(["UTF-8", *charsets])
    raise MalformedMessage(f"the {header.name} header is neither {tried}; encode it (RFC 2047)")


def _preview(line: bytes) -> str:
    text = line[:40].decode("utf-8", "replace")
    return repr("".join(c if c.isprintable() else "?" for c in text))


def _check_headers(message: Message) -> None:
    froms = message.get_all("From")
    if len(froms) > 1:
        raise MalformedMessage("the message has several From headers; keep exactly one")
    if froms:
        try:
            author = parse_author(froms[0].value)
        except AddressError as exc:
            raise MalformedMessage(f"the From header cannot be parsed ({exc}); write From: Name <address>") from None
        if isinstance(author, LocalPart):
            message.from_local = author  # cron's "From: root (Cron Daemon)": the envelope stage maps it
        else:
            message.from_mailbox = author
    for name in ("Sender", "Reply-To", "Resent-From", "Resent-Sender"):
        for header in message.get_all(name):
            _parse_or_fail(header)


def _mailbox_text(mailbox: Mailbox) -> str:
    from .addresses import quote_phrase

    if mailbox.display_name:
        return f"{quote_phrase(mailbox.display_name)} <{mailbox.address}>"
    return mailbox.address


def _parse_or_fail(header: Header, qualify_domain: str | None = None) -> list[Mailbox]:
    from .addresses import mailboxes

    try:
        return mailboxes(parse_address_list(header.value, qualify_domain))
    except AddressError as exc:
        raise MalformedMessage(f"the {header.name} header cannot be parsed ({exc})") from None


ORIGINATING_SCRIPT = "X-PHP-Originating-Script"
MAX_SCRIPT = 255  # characters of it recorded: the value is the caller's own, as long as it likes


def originating_script(message: Message) -> str | None:
    """``UID:script.php`` as PHP's ``mail.add_x_header`` writes it, cleaned for the record.

    PHP puts its own header before the script's headers, so the first one is
    PHP's; the UID in it is the script file's owner. The header itself is
    forwarded unchanged (receivers read it too); only what is recorded is
    bounded to MAX_SCRIPT characters and rid of control characters.
    """
    from .origin import clean

    value = message.first(ORIGINATING_SCRIPT)
    return clean(value, MAX_SCRIPT) if value is not None else None


IDENTITY_HEADERS = ("From", "Sender", "Resent-From", "Resent-Sender")


def identity_mailboxes(message: Message, qualify_domain: str | None = None) -> list[tuple[str, Mailbox]]:
    """Every mailbox that says who the message is from, with its header's name.

    From, Sender, Resent-From and Resent-Sender all name the author to the
    reader, so they all follow the From rule; Reply-To does not (it only says
    where answers go).
    """
    found: list[tuple[str, Mailbox]] = []
    if message.from_mailbox is not None:
        found.append(("From", message.from_mailbox))
    for name in IDENTITY_HEADERS[1:]:
        for header in message.get_all(name):
            found.extend((name, mailbox) for mailbox in _parse_or_fail(header, qualify_domain))
    return found


def header_recipients(message: Message, qualify_domain: str | None) -> list[Mailbox]:
    """Recipients for ``-t``: Resent-To/Cc/Bcc when present (as Sendmail), else To/Cc/Bcc."""
    resent = ("Resent-To", "Resent-Cc", "Resent-Bcc")
    names = resent if any(message.get_all(n) for n in resent) else ("To", "Cc", "Bcc")
    found: list[Mailbox] = []
    for header in message.headers:
        if header.name.lower() in {n.lower() for n in names}:
            found.extend(_parse_or_fail(header, qualify_domain))
    return found


def complete(message: Message, author: Mailbox, trace: str) -> None:
    """Remove Bcc and caller-made trace headers; add From, Date, Message-ID, Received.

    ``author`` is the From the message goes with when it has none, or only a
    mailbox without a domain (which it then replaces where it stood).
    """
    message.remove("Bcc", "Resent-Bcc", "Return-Path", "Delivered-To")
    if message.from_mailbox is None:
        message.from_mailbox = author
        written = Header.build("From", _mailbox_text(author))
        froms = [i for i, h in enumerate(message.headers) if h.lname == "from"]
        if froms:
            message.headers[froms[0]] = written
        else:
            message.headers.insert(0, written)
    now = time.time()
    if not message.get_all("Date"):
        message.headers.append(Header.build("Date", format_date(now)))
    if not message.get_all("Message-ID"):
        message.headers.append(Header.build("Message-ID", new_message_id(message.from_mailbox.domain)))
    message.headers.insert(0, Header.build("Received", f"{trace}; {format_date(now)}"))


_DAYS = ("Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun")
_MONTHS = ("Jan", "Feb", "Mar", "Apr", "May", "Jun", "Jul", "Aug", "Sep", "Oct", "Nov", "Dec")


def format_date(when: float) -> str:
    """RFC 5322 date in local time, independent of the locale."""
    tm = time.localtime(when)
    offset = (tm.tm_gmtoff or 0) // 60
    sign = "+" if offset >= 0 else "-"
    hours, minutes = divmod(abs(offset), 60)
    return (
        f"{_DAYS[tm.tm_wday]}, {tm.tm_mday:02d} {_MONTHS[tm.tm_mon - 1]} {tm.tm_year} "
        f"{tm.tm_hour:02d}:{tm.tm_min:02d}:{tm.tm_sec:02d} {sign}{hours:02d}{minutes:02d}"
    )


def new_message_id(domain: str) -> str:
    return f"<{time.time_ns():x}.{os.urandom(6).hex()}@{domain}>"
