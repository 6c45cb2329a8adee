"""The one address parser: argv recipients, ``-f``, and every address header.

Strict RFC 5322 address lists (with RFC 6532 UTF-8): mailboxes, ``Name <addr>``,
groups, comments and quoted strings. Anything a lenient parser would guess at
(``a@b@c``, ``x@evil <y@victim>``, an unclosed comment, a group without ``;``)
is an error, so what we check is exactly what the upstream will see.

Addresses are canonicalised once here: domains lowercased, trailing dot
dropped, IDNA A-labels; quoted local parts unquoted when they need no quotes.
``Mailbox.key`` is what de-duplication and the ledger use.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

_ATEXT_ASCII = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789!#$%&'*+-/=?^_`{|}~")
_SPECIALS = frozenset('()<>[]:;@\\,."')
MAX_LOCAL = 64
MAX_ADDRESS = 254


class AddressError(ValueError):
    """An address or address list that cannot be parsed strictly."""


def _is_atext(char: str) -> bool:
    return char in _ATEXT_ASCII or ord(char) > 127


def _is_dot_atom(text: str) -> bool:
    return bool(text) and all(part and all(_is_atext(c) for c in part) for part in text.split("."))


@dataclass(frozen=True)
class Mailbox:
    """One mailbox; ``local`` is unquoted text, ``domain`` canonical (A-labels)."""

    local: str
    domain: str
    display_name: str | None = None

    @property
    def address(self) -> str:
        """The addr-spec as it goes on the wire (local part quoted when needed)."""
        return f"{quote_local(self.local)}@{self.domain}"

    @property
    def key(self) -> str:
        """Canonical form for de-duplication and the ledger."""
        return f"{quote_local(self.local.lower())}@{self.domain}"

    @property
    def needs_smtputf8(self) -> bool:
        return not self.local.isascii()

    def __str__(self) -> str:
        return self.address


@dataclass(frozen=True)
class Group:
    display_name: str
    members: tuple[Mailbox, ...]


Address = Mailbox | Group


@dataclass(frozen=True)
class LocalPart:
    """A mailbox with no domain, as cron writes ``From: root (Cron Daemon)``.

    It names a user of this machine, not an address anyone can reply to: the
    envelope stage decides which address it stands for.
    """

    local: str
    display_name: str | None = None


def quote_local(local: str) -> str:
    if _is_dot_atom(local):
        return local
    return '"' + local.replace("\\", "\\\\").replace('"', '\\"') + '"'


def quote_phrase(name: str) -> str:
    """A display name as an atom sequence when possible, else a quoted string."""
    words = name.split(" ")
    if all(word and all(_is_atext(c) for c in word) for word in words):
        return name
    return '"' + name.replace("\\", "\\\\").replace('"', '\\"') + '"'


def canonical_domain(domain: str) -> str:
    """Lowercase, no trailing dot, IDNA A-labels; raise AddressError if not a domain name."""
    text = domain.rstrip(".") if domain.endswith(".") and not domain.endswith("..") else domain
    if not text:
        raise AddressError("empty domain")
    if text.startswith("["):
        raise AddressError(f"address literal {domain!r} is not accepted; use a domain name")
    try:
        ascii_domain = text.encode("idna").decode("ascii") if not text.isascii() else text
    except UnicodeError:
        raise AddressError(f"{domain!r} is not a valid internationalised domain name") from None
    ascii_domain = ascii_domain.lower()
    labels = ascii_domain.split(".")
    if len(ascii_domain) > 253 or any(not _is_ldh_label(label) for label in labels):
        raise AddressError(f"{domain!r} is not a valid domain name")
    return ascii_domain


def _is_ldh_label(label: str) -> bool:
    return (
        0 < len(label) <= 63
        and label[0] != "-"
        and label[-1] != "-"
        and all(c.isascii() and (c.isalnum() or c == "-") for c in label)
    )


# --- tokenizer -------------------------------------------------------------


@dataclass
class _Token:
    kind: str  # "atom", "qstring", or the special character itself
    text: str
    spaced: bool  # whitespace or a comment came before it
    start: int = 0  # where it starts in the text


def _tokenize(text: str, comments: dict[int, str] | None = None) -> list[_Token]:
    """The tokens; ``comments`` gets each comment's text, keyed by the number of tokens before it."""
    tokens: list[_Token] = []
    i, spaced = 0, False
    while i < len(text):
        char = text[i]
        if char in " \t":
            i, spaced = i + 1, True
        elif char in "\r\n":
            # Only folding (CRLF followed by white space) may reach here.
            if not text.startswith("\r\n", i) or i + 2 >= len(text) or text[i + 2] not in " \t":
                raise AddressError("line break inside an address")
            i, spaced = i + 2, True
        elif char == "(":
            end = _skip_comment(text, i)
            if comments is not None:
                comments.setdefault(len(tokens), _comment_text(text[i + 1:end - 1]))
            i, spaced = end, True
        elif char == '"':
            start = i
            value, i = _read_quoted(text, i)
            tokens.append(_Token("qstring", value, spaced, start))
            spaced = False
        elif char in _SPECIALS:
            tokens.append(_Token(char, char, spaced, i))
            i, spaced = i + 1, False
        elif _is_atext(char):
            start = i
            while i < len(text) and _is_atext(text[i]):
                i += 1
            tokens.append(_Token("atom", text[start:i], spaced, start))
            spaced = False
        else:
            raise AddressError(f"character {char!r} is not allowed in an address")
    return tokens


def _skip_comment(text: str, i: int) -> int:
    depth = 0
    while i < len(text):
        char = text[i]
        if char == "\\":
            i += 2
            continue
        if char in "\r\n\0":
            raise AddressError("control character inside a comment")
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
            if depth == 0:
                return i + 1
        i += 1
    raise AddressError("unclosed comment '(' in address")


def _comment_text(inner: str) -> str:
    """A comment's words, as a display name: quoted pairs resolved, white space collapsed."""
    unquoted = re.sub(r"\\(.)", r"\1", inner)
    return " ".join(unquoted.split())


def _read_quoted(text: str, i: int) -> tuple[str, int]:
    out: list[str] = []
    i += 1
    while i < len(text):
        char = text[i]
        if char == "\\" and i + 1 < len(text):
            out.append(text[i + 1])
            i += 2
            continue
        if char == '"':
            return "".join(out), i + 1
        if char in "\r\n\0":
            raise AddressError("control character inside a quoted string")
        out.append(char)
        i += 1
    raise AddressError("unclosed quoted string in address")


# --- grammar ---------------------------------------------------------------


class _Parser:
    def __init__(self, text: str, qualify_domain: str | None) -> None:
        if "\0" in text:
            raise AddressError("NUL byte in address")
        self.comments: dict[int, str] = {}
        self.tokens = _tokenize(text, self.comments)
        self.pos = 0
        self.qualify_domain = qualify_domain
        self.bare: LocalPart | None = None  # set instead of failing when asked to keep a domain-less mailbox
        self.keep_bare = False

    def peek(self, offset: int = 0) -> _Token | None:
        index = self.pos + offset
        return self.tokens[index] if index < len(self.tokens) else None

    def take(self, kind: str | None = None) -> _Token:
        token = self.peek()
        if token is None or (kind is not None and token.kind != kind):
            want = f"'{kind}'" if kind and len(kind) == 1 else (kind or "more")
            got = f"'{token.text}'" if token else "the end"
            raise AddressError(f"expected {want} but found {got}")
        self.pos += 1
        return token

    def address_list(self) -> list[Address]:
        items: list[Address] = []
        while self.peek() is not None:
            if self.peek_kind() == ",":  # empty list elements are tolerated
                self.pos += 1
                continue
            items.append(self.address())
            if self.peek() is not None:
                self.take(",")
        return items

    def peek_kind(self, offset: int = 0) -> str | None:
        token = self.peek(offset)
        return token.kind if token else None

    def address(self) -> Address:
        # A phrase followed by ':' is a group; followed by '<' a name-addr.
        offset = 0
        while self.peek_kind(offset) in ("atom", "qstring", "."):
            offset += 1
        following = self.peek_kind(offset)
        if offset and following == ":":
            return self.group()
        if following == "<":
            name = self.phrase() if offset else None
            return self.angle_addr(name)
        return self.addr_spec(None)

    def phrase(self) -> str:
        parts: list[str] = []
        while self.peek_kind() in ("atom", "qstring", "."):
            token = self.take()
            if parts and token.spaced:
                parts.append(" ")
            parts.append(token.text)
        return "".join(parts)

    def group(self) -> Group:
        name = self.phrase()
        self.take(":")
        members: list[Mailbox] = []
        while self.peek_kind() != ";":
            if self.peek() is None:
                raise AddressError(f"group {name!r} is not closed with ';'")
            if self.peek_kind() == ",":
                self.pos += 1
                continue
            member = self.address()
            if isinstance(member, Group):
                raise AddressError("a group cannot contain another group")
            members.append(member)
            if self.peek_kind() not in (",", ";"):
                raise AddressError(f"group {name!r} is not closed with ';'")
        self.take(";")
        return Group(name, tuple(members))

    def angle_addr(self, name: str | None) -> Mailbox:
        self.take("<")
        mailbox = self.addr_spec(name, inside_angle=True)
        self.take(">")
        return mailbox

    def addr_spec(self, name: str | None, inside_angle: bool = False) -> Mailbox:
        first = self.take()
        if first.kind not in ("atom", "qstring"):
            raise AddressError(f"expected an address but found '{first.text}'")
        local = first.text
        if first.kind == "atom":
            while self.peek_kind() == "." and self.peek_kind(1) == "atom":
                dot, atom = self.take(), self.take()
                if dot.spaced or atom.spaced:
                    raise AddressError("white space inside an address")
                local += "." + atom.text
            if not _is_dot_atom(local):
                raise AddressError(f"{local!r} is not a valid local part")
        at = self.peek()
        if at is None or at.kind != "@":
            if at is not None and at.kind not in (",", ";", ">"):
                raise AddressError(f"unexpected '{at.text}' after {local!r}")
            return self._qualified(local, name)
        self.take("@")
        if at.spaced or (self.peek() is not None and self.peek().spaced):  # type: ignore[union-attr]
            raise AddressError("white space inside an address")
        domain = self.domain()
        return self._mailbox(local, domain, name)

    def domain(self) -> str:
        token = self.take()
        if token.kind == "[":
            raise AddressError("address literals such as [192.0.2.1] are not accepted")
        if token.kind != "atom":
            raise AddressError(f"expected a domain but found '{token.text}'")
        domain = token.text
        while self.peek_kind() == "." and not self.peek().spaced:  # type: ignore[union-attr]
            self.take(".")
            following = self.peek()
            if following is None or following.kind != "atom" or following.spaced:
                domain += "."  # a trailing root dot; canonical_domain drops it
                break
            domain += "." + self.take().text
        if self.peek_kind() == "@":
            raise AddressError("more than one '@' in an address")
        return domain

    def _qualified(self, local: str, name: str | None) -> Mailbox:
        if self.keep_bare and self.bare is None:
            # "root (Cron Daemon)": the comment after the address is its old-style display name.
            self.bare = LocalPart(self._checked_local(local), name or self.comments.get(self.pos) or None)
            return Mailbox(local, "", name)
        if not self.qualify_domain:
            raise AddressError(f"{local!r} has no domain (no '@')")
        return self._mailbox(local, self.qualify_domain, name)

    @staticmethod
    def _checked_local(local: str) -> str:
        if not local:
            raise AddressError("empty local part")
        if len(local.encode()) > MAX_LOCAL:
            raise AddressError(f"local part longer than {MAX_LOCAL} octets")
        if any(ord(c) < 32 or ord(c) == 127 for c in local):
            raise AddressError("control character in address")
        if local.startswith("-"):
            # Legal, but an argv-shaped address is far likelier an option injection.
            raise AddressError(f"{local!r} starts with '-'")
        return local

    @classmethod
    def _mailbox(cls, local: str, domain: str, name: str | None) -> Mailbox:
        mailbox = Mailbox(cls._checked_local(local), canonical_domain(domain), name)
        if len(mailbox.address.encode()) > MAX_ADDRESS:
            raise AddressError(f"address longer than {MAX_ADDRESS} octets")
        return mailbox


def parse_address_list(text: str, qualify_domain: str | None = None) -> list[Address]:
    """Parse an address list (header value or one argv argument)."""
    return _Parser(text, qualify_domain).address_list()


def mailboxes(items: list[Address]) -> list[Mailbox]:
    """Flatten groups into their members."""
    out: list[Mailbox] = []
    for item in items:
        out.extend(item.members if isinstance(item, Group) else (item,))
    return out


def parse_mailbox(text: str, qualify_domain: str | None = None) -> Mailbox:
    """Exactly one mailbox, as ``-f`` or a From header must hold."""
    items = parse_address_list(text, qualify_domain)
    if len(items) != 1 or not isinstance(items[0], Mailbox):
        raise AddressError("must be exactly one address")
    return items[0]


def parse_author(text: str) -> Mailbox | LocalPart:
    """A From header's one mailbox; one without a domain comes back as a LocalPart."""
    parser = _Parser(text, None)
    parser.keep_bare = True
    items = parser.address_list()
    if len(items) != 1 or not isinstance(items[0], Mailbox):
        raise AddressError("must be exactly one address")
    return parser.bare if parser.bare is not None else items[0]


def list_separators(text: str) -> list[int]:
    """Where the commas between the addresses of an address list are (never inside a name or comment)."""
    parser = _Parser(text, "fold.invalid")
    parser.address_list()  # only a list that parses is folded at its commas
    return [token.start for token in parser.tokens if token.kind == ","]
