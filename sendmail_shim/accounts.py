"""The sending account and the caller.

The sending account is the envelope sender. It must be registered,
authenticated for web hosting and not blocked. A caller whose Unix user is
bound to a customer may only send from that customer's accounts, and the From
header's domain must be one of the customer's domains (the domains of its
accounts).

The ledger's directory holds the accounts; this stage reads them through a
ledger it is handed and imports no part of the store.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .ledger import AccountEntry, Ledger


@dataclass(frozen=True)
class Caller:
    """Who runs ``sendmail``: the process itself, or a peer the gate learnt from the kernel."""

    uid: int
    user: str | None  # the Unix user name of uid, if it has one
    pid: int | None = None
    cwd: str | None = None  # of the program that ran sendmail, when known (see origin.py)
    exe: str | None = None  # that program's executable, or its command line

    @classmethod
    def current(cls) -> Caller:
        return cls.from_uid(os.getuid(), os.getpid())

    @classmethod
    def from_uid(cls, uid: int, pid: int | None = None) -> Caller:
        return cls(uid=uid, user=user_name(uid), pid=pid)

    @property
    def label(self) -> str:
        return self.user if self.user is not None else f"uid {self.uid}"


@dataclass(frozen=True)
class Account:
    """The sending account of one message, as the directory holds it."""

    address: str
    customer_id: str
    authenticated: bool
    blocked: bool
    block_reason: str | None

    @classmethod
    def from_entry(cls, entry: AccountEntry) -> Account:
        return cls(entry.address, entry.customer_id, entry.authenticated, entry.blocked, entry.block_reason)

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]


def user_name(uid: int) -> str | None:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


class AccountError(Exception):
    """Family root. ``str(exc)`` is the user's one line: what happened and what to do."""


class UnknownAccount(AccountError):
    def __init__(self, sender: str) -> None:
        self.sender = sender
        super().__init__(
            f"{sender} is not a registered sending account; send from an account registered "
            f"with your hosting provider, or register this one in the control panel"
        )


class AccountNotAuthenticated(AccountError):
    def __init__(self, account: Account) -> None:
        self.account = account
        super().__init__(
            f"{account.address} is not authenticated for sending from web hosting; "
            f"authenticate it in the control panel, then try again"
        )


class AccountBlocked(AccountError):
    def __init__(self, account: Account) -> None:
        self.account = account
        why = f" ({account.block_reason})" if account.block_reason else ""
        super().__init__(
            f"{account.address} is blocked from sending{why}; "
            f"contact your hosting provider to have the block lifted"
        )


class NotCallersAccount(AccountError):
    def __init__(self, account: Account, caller: Caller) -> None:
        self.account, self.caller = account, caller
        super().__init__(
            f"{account.address} is not an account of the customer that the Unix user "
            f"{caller.label} belongs to; send from one of your own accounts"
        )


class ForeignFromDomain(AccountError):
    """An identity header (From, Sender, Resent-From, Resent-Sender) names another customer's domain."""

    def __init__(self, from_domain: str, account: Account, domains: set[str], header: str = "From") -> None:
        self.from_domain, self.account, self.domains, self.header = from_domain, account, domains, header
        own = ", ".join(sorted(domains)[:5]) + (", ..." if len(domains) > 5 else "")
        super().__init__(
            f"the {header} address's domain {from_domain} is not one of the sender's domains "
            f"({own}); use an address of your own domain in {header}"
        )


class UnboundCaller(AccountError):
    def __init__(self, caller: Caller) -> None:
        self.caller = caller
        super().__init__(
            f"the Unix user {caller.label} is not linked to any customer, so it may not send; "
            f"ask your hosting provider to link it (sendmail-shim customer bind)"
        )


def authorise(
    ledger: Ledger,
    sender: str,
    from_domain: str | None,
    caller: Caller,
    *,
    require_binding: bool = False,
    identities: Sequence[tuple[str, str]] = (),
) -> Account:
    """The account ``sender`` if ``caller`` may send from it with this From domain.

    ``sender`` is the canonical envelope sender (``local@domain``, lowercase
    A-label domain); ``from_domain`` likewise, or None when From has no domain
    of its own. ``identities`` are the other identity headers as (header name,
    domain): Sender, Resent-From, Resent-Sender follow the same rule as From.
    Raises an AccountError naming why not and what to do.
    """
    entry = ledger.find_account(sender)
    if entry is None:
        raise UnknownAccount(sender)
    account = Account.from_entry(entry)
    # The binding is checked before the account's own state so that a site
    # learns nothing about another customer's accounts.
    bound = ledger.customer_of_user(caller.user) if caller.user is not None else None
    if bound is None and require_binding:
        raise UnboundCaller(caller)
    if bound is not None and bound != account.customer_id:
        raise NotCallersAccount(account, caller)
    if account.blocked:
        raise AccountBlocked(account)
    if not account.authenticated:
        raise AccountNotAuthenticated(account)
    claimed = [("From", from_domain)] if from_domain is not None else []
    claimed += [(header, domain) for header, domain in identities if header != "From"]
    _require_own_domains(ledger, account, claimed)
    return account


def _require_own_domains(ledger: Ledger, account: Account, claimed: Sequence[tuple[str, str]]) -> None:
    """The From rule, for every header that names the author: the domain must be the customer's."""
    domains: set[str] | None = None
    for header, domain in claimed:
        wanted = domain.lower().rstrip(".")
        if wanted == account.domain:
            continue
        if domains is None:
            domains = ledger.customer_domains(account.customer_id)
        if wanted not in domains:
            raise ForeignFromDomain(domain, account, domains, header)
