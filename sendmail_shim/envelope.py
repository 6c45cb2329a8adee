"""Sender and recipients: from ``-f``/``-r`` or the From header, from argv and ``-t``.

The envelope sender is the sending account. Recipients are unique envelope
recipients (``Mailbox.key``), in the order first seen.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from .addresses import AddressError, Mailbox, mailboxes, parse_address_list, parse_mailbox
from .invocation import Invocation
from .message import Message, header_recipients


class EnvelopeError(Exception):
    """The sender or the recipients cannot be used."""


class InvalidSender(EnvelopeError):
    """The envelope sender is missing or not an address (exit 67; 65 when missing)."""


class MissingSender(EnvelopeError):
    """No From header and no -f: nothing says who sends (exit 65)."""


class InvalidRecipient(EnvelopeError):
    """A recipient is not an address (exit 67)."""


class NoRecipients(EnvelopeError):
    """No valid recipient at all (exit 67)."""


class TooManyRecipients(EnvelopeError):
    """More recipients than one message may have here (exit 77)."""


# The null sender <>: only our own bounces use it, so that a bounce is never bounced.
NULL_SENDER = Mailbox("", "")


@dataclass(frozen=True)
class Envelope:
    sender: Mailbox
    recipients: tuple[Mailbox, ...]
    dsn_notify: str | None = None
    dsn_ret: str | None = None
    dsn_envid: str | None = None

    @property
    def mail_from(self) -> str:
        return "" if self.sender is NULL_SENDER else self.sender.address

    @property
    def needs_smtputf8(self) -> bool:
        return self.sender.needs_smtputf8 or any(r.needs_smtputf8 for r in self.recipients)


def sender_of(invocation_sender: str | None, message: Message, qualify_domain: str | None) -> Mailbox:
    if invocation_sender is not None:
        if invocation_sender.strip() in ("", "<>"):
            raise InvalidSender("the null sender (-f '<>') cannot send here; give the sending account with -f")
        try:
            return parse_mailbox(invocation_sender, qualify_domain)
        except AddressError as exc:
            raise InvalidSender(f"the sender {_show(invocation_sender)} is not a valid address ({exc})") from None
    if message.from_mailbox is None:
        raise MissingSender("the message has no From header and no sender was given; add From: or use -f")
    return message.from_mailbox


def unique(found: Iterable[Mailbox]) -> tuple[Mailbox, ...]:
    seen: dict[str, Mailbox] = {}
    for mailbox in found:
        seen.setdefault(mailbox.key, mailbox)
    return tuple(seen.values())


def argv_recipients(arguments: Iterable[str], qualify_domain: str | None) -> list[Mailbox]:
    found: list[Mailbox] = []
    for argument in arguments:
        try:
            found.extend(mailboxes(parse_address_list(argument, qualify_domain)))
        except AddressError as exc:
            raise InvalidRecipient(f"the recipient {_show(argument)} is not a valid address ({exc})") from None
    return found


def build(invocation: Invocation, message: Message, qualify_domain: str | None, max_recipients: int) -> Envelope:
    """The envelope for a message read in ``-bm`` mode."""
    sender = sender_of(invocation.sender, message, qualify_domain)
    found = argv_recipients(invocation.recipients, qualify_domain)
    if invocation.extract_recipients:
        found = header_recipients(message, qualify_domain) + found
    recipients = checked_recipients(unique(found), max_recipients)
    return Envelope(sender, recipients, invocation.dsn_notify, invocation.dsn_ret, invocation.dsn_envid)


def checked_recipients(recipients: tuple[Mailbox, ...], max_recipients: int) -> tuple[Mailbox, ...]:
    if not recipients:
        raise NoRecipients("the message has no recipient: add To, Cc or Bcc (with -t) or give them as arguments")
    if len(recipients) > max_recipients:
        raise TooManyRecipients(
            f"the message has {len(recipients)} recipients; at most {max_recipients} are allowed in one "
            "message: use a bulk mail service for lists"
        )
    return recipients


def _show(text: str) -> str:
    cleaned = "".join(c if c.isprintable() else "?" for c in text[:80])
    return repr(cleaned)
