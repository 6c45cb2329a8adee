"""What an admin or a caller may hand the ledger, checked and put in canonical form."""

from __future__ import annotations

from .errors import InvalidInput

SCOPES = ("account", "customer")


def canonical_domain(text: str) -> str:
    """Lowercase A-label form of a domain (the address parser's); raise InvalidInput when it is not one."""
    from ..addresses import AddressError
    from ..addresses import canonical_domain as parse_domain

    try:
        domain = parse_domain(text.strip())
    except AddressError:
        raise InvalidInput(f"{text!r} is not a valid domain name (write e.g. kunde.example)") from None
    if "." not in domain:
        raise InvalidInput(f"{text!r} is not a valid domain name (write e.g. kunde.example)")
    return domain


def canonical_address(text: str) -> str:
    """``Post@Kunde.Example`` -> ``post@kunde.example`` (the address parser's key); else InvalidInput.

    Account names are matched without regard to case, as the provider's mail
    servers do, so both parts are lowercased.
    """
    from ..addresses import AddressError, parse_mailbox

    try:
        mailbox = parse_mailbox(text.strip())
    except AddressError as exc:
        raise InvalidInput(f"{text!r} is not an email address ({exc}; write e.g. post@kunde.example)") from None
    if mailbox.display_name is not None or "<" in text:
        raise InvalidInput(f"{text!r} is not a bare email address (write e.g. post@kunde.example)")
    canonical_domain(mailbox.domain)
    return mailbox.key


def check_identifier(text: str, what: str) -> str:
    """A customer id or Unix user name: 1-64 visible ASCII characters, no spaces."""
    visible = all(c.isascii() and c.isprintable() and c != " " for c in text)
    if not 0 < len(text) <= 64 or not visible:
        raise InvalidInput(f"{text!r} is not a valid {what} (1-64 visible characters, no spaces)")
    return text


def check_reason(text: str | None, *, required: bool) -> str | None:
    if text is None or not text.strip():
        if required:
            raise InvalidInput("a reason is required: say why, for the audit log")
        return None
    if any(ord(c) < 32 for c in text) or len(text) > 500:
        raise InvalidInput("the reason must be one line of at most 500 characters")
    return text.strip()


def check_scope(scope: str) -> str:
    if scope not in SCOPES:
        raise InvalidInput(f"{scope!r} is not a scope (account or customer)")
    return scope


def parse_expiry(text: str, now: float) -> float:
    """``7d``/``12h``/``90m`` from now, or an ISO date/time (UTC unless it says otherwise)."""
    from datetime import UTC, datetime

    from ..config import parse_duration

    seconds = parse_duration(text)
    if seconds is not None:
        return now + seconds
    try:
        moment = datetime.fromisoformat(text.strip().replace("Z", "+00:00"))
    except ValueError:
        raise InvalidInput(
            f"{text!r} is not an expiry; write a duration (7d, 12h) "
            f"or a UTC time (2026-06-01T12:00)"
        ) from None
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


def parse_since(text: str, now: float) -> float:
    """``24h``/``7d``/``30m`` before now, or an ISO date/time (UTC unless it says otherwise)."""
    from ..config import parse_duration

    seconds = parse_duration(text)
    if seconds is not None:
        return now - seconds
    try:
        return parse_expiry(text, now)
    except InvalidInput:
        raise InvalidInput(f"{text!r} is not a time; write a duration before now (24h, 7d, 30m) "
                           f"or a UTC time (2026-06-01T12:00)") from None
