"""Sender and recipients: from ``-f``/``-r`` or the From header, from argv and ``-t``.

The envelope sender is the sending account. Recipients are unique envelope
recipients (``Mailbox.key``), in the order first seen.

Who sends, when the message does not say (plain ``mail -s``, old ``mail()``
scripts, cron's ``From: root (Cron Daemon)``): the default sender of the
caller's Unix-user binding, which the pipeline asks the ledger for only then.
A From without a domain becomes that account, keeping its display name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from .addresses import AddressError, LocalPart, Mailbox, mailboxes, parse_address_list, parse_mailbox
from .invocation import Invocation
from .message import Message, header_recipients

_BOTH_FIXES = ("add -f with your sending address to sendmail_path (or a From: header to the message), "
               "or ask your hosting provider to set a default sender")
MAX_FULL_NAME = 100


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
    author: Mailbox | None = None  # the From the message goes with: its own, or the one chosen here
    repairs: dict[str, str] = field(default_factory=dict, compare=False)  # log fields: what was filled in

    @property
    def mail_from(self) -> str:
        return "" if self.sender is NULL_SENDER else self.sender.address

    @property
    def needs_smtputf8(self) -> bool:
        return self.sender.needs_smtputf8 or any(r.needs_smtputf8 for r in self.recipients)


@dataclass(frozen=True)
class SenderDefaults:
    """What the caller's Unix-user binding supplies when the message does not say who sends."""

    user: str | None = None  # the caller's Unix user: the kernel's word in the gate
    lookup: Callable[[], str | None] | None = None  # its binding's default sender; asked only when needed

    def default_sender(self) -> Mailbox | None:
        found = self.lookup() if self.lookup is not None and self.user is not None else None
        return parse_mailbox(found) if found else None

    def full_name(self) -> str | None:
        """The Unix user's name from GECOS, when it says more than the login name."""
        return gecos_name(self.user) if self.user is not None else None


NO_DEFAULTS = SenderDefaults()


def gecos_name(user: str) -> str | None:
    import pwd

    try:
        gecos = pwd.getpwnam(user).pw_gecos
    except (KeyError, ValueError):
        return None
    name = "".join(c for c in gecos.split(",")[0] if c.isprintable()).strip()[:MAX_FULL_NAME]
    return name if name and name != user else None


@dataclass(frozen=True)
class _Choice:
    sender: Mailbox
    author: Mailbox
    repairs: dict[str, str]


def explicit_sender(invocation_sender: str | None, qualify_domain: str | None) -> Mailbox | None:
    """``-f``/``-r`` as a mailbox, or None when neither was given."""
    if invocation_sender is None:
        return None
    if invocation_sender.strip() in ("", "<>"):
        raise InvalidSender("the null sender (-f '<>') cannot send here; give the sending account with -f")
    try:
        return parse_mailbox(invocation_sender, qualify_domain)
    except AddressError as exc:
        raise InvalidSender(f"the sender {_show(invocation_sender)} is not a valid address ({exc})") from None


def _choose(invocation_sender: str | None, full_name: str | None, message: Message,
            qualify_domain: str | None, defaults: SenderDefaults) -> _Choice:
    explicit = explicit_sender(invocation_sender, qualify_domain)
    if message.from_mailbox is not None:
        return _Choice(explicit or message.from_mailbox, message.from_mailbox, {})
    if message.from_local is not None:
        return _map_local_from(message.from_local, explicit, defaults.default_sender(), qualify_domain, full_name)
    if explicit is not None:
        return _Choice(explicit, _named(explicit, full_name), {})
    default = defaults.default_sender()
    if default is None:
        raise MissingSender(f"the message has no From header and no sender was given; {_BOTH_FIXES}")
    return _Choice(default, _named(default, full_name or defaults.full_name()),
                   {"default_sender": default.address})


def _map_local_from(bare: LocalPart, explicit: Mailbox | None, default: Mailbox | None,
                    qualify_domain: str | None, full_name: str | None) -> _Choice:
    """``From: root (Cron Daemon)``: the default sender, else the qualified name, else -f."""
    qualified = Mailbox(bare.local, qualify_domain) if qualify_domain else None
    target = default or qualified or explicit
    if target is None:
        raise MissingSender(f"the From header {_show(bare.local)} has no domain and no sender was given; "
                            f"write From: Name <address>, {_BOTH_FIXES}")
    author = _named(target, bare.display_name or full_name)
    repairs = {"from_mapped": f"{bare.local}->{target.address}"}
    if explicit is None and target is default:
        repairs["default_sender"] = target.address
    return _Choice(explicit or Mailbox(target.local, target.domain), author, repairs)


def _named(mailbox: Mailbox, display_name: str | None) -> Mailbox:
    return Mailbox(mailbox.local, mailbox.domain, display_name or None)


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


def build(invocation: Invocation, message: Message, qualify_domain: str | None, max_recipients: int,
          defaults: SenderDefaults = NO_DEFAULTS) -> Envelope:
    """The envelope for a message read in ``-bm`` mode, and the From it goes with."""
    chosen = _choose(invocation.sender, invocation.full_name, message, qualify_domain, defaults)
    found = argv_recipients(invocation.recipients, qualify_domain)
    if invocation.extract_recipients:
        found = header_recipients(message, qualify_domain) + found
    recipients = checked_recipients(unique(found), max_recipients)
    return Envelope(chosen.sender, recipients, invocation.dsn_notify, invocation.dsn_ret, invocation.dsn_envid,
                    author=chosen.author, repairs=chosen.repairs)


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
