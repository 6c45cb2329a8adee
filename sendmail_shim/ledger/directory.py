"""The directory: customers, their sending accounts and domains, and the Unix users bound to them.

A domain belongs to one customer (it comes with the customer's first account
in it); a Unix user is bound to at most one customer. Every change is audited.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

from .connections import Tx
from .errors import Conflict, InvalidInput, UnknownSubject, no_account, no_customer
from .inputs import canonical_address, check_identifier, check_reason
from .journal import audit
from .store import Store

_ACCOUNT_COLUMNS = "address, customer_id, authenticated, blocked, block_reason, blocked_by, blocked_at"
AUTO = "auto"  # accounts.blocked_by of a block the abuse rules made; "admin" for one made by hand
_CUSTOMER_OF_USER = "SELECT customer_id FROM unix_users WHERE unix_user = :u"
# A binding's own default sender, else its customer's.
_DEFAULT_SENDER_OF_USER = ("SELECT COALESCE(u.default_sender, c.default_sender) FROM unix_users u "
                           "JOIN customers c ON c.id = u.customer_id WHERE u.unix_user = :u")


class AccountEntry(NamedTuple):
    """A sending account as the directory holds it."""

    address: str
    customer_id: str
    authenticated: bool
    blocked: bool
    block_reason: str | None
    blocked_by: str | None = None  # "admin" or "auto" (the abuse rules); None when not blocked
    blocked_at: float | None = None

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]


class Customer(NamedTuple):
    id: str
    unix_users: tuple[str, ...]
    domains: tuple[str, ...]
    accounts: int
    default_sender: str | None = None
    user_default_senders: tuple[tuple[str, str], ...] = ()  # (unix user, its binding's own default sender)
    contact: str | None = None  # where notices about its limits and blocks go


def _entry(row: Sequence[Any]) -> AccountEntry:
    blocked_at = float(row[6]) if row[6] is not None else None
    return AccountEntry(row[0], row[1], bool(row[2]), bool(row[3]), row[4], row[5], blocked_at)


def account_entry(tx: Tx, address: str) -> AccountEntry | None:
    """The account at a canonical address, if registered."""
    rows = tx.rows(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts WHERE address = :a", {"a": address})
    return _entry(rows[0]) if rows else None


def require_account(tx: Tx, address: str) -> AccountEntry:
    account = account_entry(tx, canonical_address(address))
    if account is None:
        raise no_account(address)
    return account


def require_customer(tx: Tx, customer_id: str) -> None:
    if not tx.rows("SELECT 1 FROM customers WHERE id = :c", {"c": customer_id}):
        raise no_customer(customer_id)


def _claim(tx: Tx, table: str, column: str, name: str, customer_id: str,
           conflict: Callable[[str], str]) -> bool:
    """Give ``name`` (a domain, a Unix user) to the customer: one owner each. True when it is new."""
    owner = tx.rows(f"SELECT customer_id FROM {table} WHERE {column} = :n", {"n": name})
    if owner and owner[0][0] != customer_id:
        raise Conflict(conflict(str(owner[0][0])))
    if owner:
        return False
    tx.run(f"INSERT INTO {table} ({column}, customer_id) VALUES (:n, :c)", {"n": name, "c": customer_id})
    return True


class Directory:
    """Lookups for the sending path and changes for the admin CLI."""

    def __init__(self, store: Store) -> None:
        self.store = store

    # ----------------------------------------------------------- lookups (the sending path)

    def find_account(self, address: str) -> AccountEntry | None:
        try:
            address = canonical_address(address)
        except InvalidInput:
            return None
        with self.store.read() as tx:
            return account_entry(tx, address)

    def customer_of_user(self, unix_user: str) -> str | None:
        with self.store.read() as tx:
            rows = tx.rows(_CUSTOMER_OF_USER, {"u": unix_user})
        return str(rows[0][0]) if rows else None

    def customer_domains(self, customer_id: str) -> set[str]:
        with self.store.read() as tx:
            rows = tx.rows("SELECT domain FROM domains WHERE customer_id = :c", {"c": customer_id})
        return {str(row[0]) for row in rows}

    # ----------------------------------------------------------- customers and Unix users

    def add_customer(self, customer_id: str, unix_users: Sequence[str] = (), *,
                     default_sender: str | None = None, actor: str | None = None) -> Customer:
        """Create a customer (or keep the existing one), bind the given Unix users to it and,
        when given, set its default sender (which must already be one of its accounts)."""
        check_identifier(customer_id, "customer id")
        for user in unix_users:
            check_identifier(user, "Unix user name")
        with self.store.write() as tx:
            if not tx.rows("SELECT 1 FROM customers WHERE id = :c", {"c": customer_id}):
                tx.run("INSERT INTO customers (id, created_at) VALUES (:c, :t)",
                       {"c": customer_id, "t": time.time()})
                audit(tx, "customer add", customer_id, None, actor)
            for user in unix_users:
                self._bind(tx, customer_id, user, actor)
            if default_sender is not None:
                self._set_default_sender(tx, customer_id, default_sender, None, actor)
        return self.get_customer(customer_id)

    # ----------------------------------------------------------- default senders

    def default_sender(self, unix_user: str) -> str | None:
        """Who a caller bound as ``unix_user`` sends as when its message does not say."""
        with self.store.read() as tx:
            rows = tx.rows(_DEFAULT_SENDER_OF_USER, {"u": unix_user})
        return str(rows[0][0]) if rows and rows[0][0] else None

    def set_default_sender(self, customer_id: str, address: str | None, *, unix_user: str | None = None,
                           actor: str | None = None) -> Customer:
        """Set (None: clear) the default sender of a customer, or of one of its Unix-user bindings."""
        with self.store.write() as tx:
            require_customer(tx, customer_id)
            self._set_default_sender(tx, customer_id, address, unix_user, actor)
        return self.get_customer(customer_id)

    @staticmethod
    def _set_default_sender(tx: Tx, customer_id: str, address: str | None,
                            unix_user: str | None, actor: str | None) -> None:
        if address is not None:
            account = require_account(tx, address)
            if account.customer_id != customer_id:
                raise Conflict(f"{account.address} is an account of customer {account.customer_id}, "
                               f"not of {customer_id}; a default sender must be one of the customer's accounts")
            address = account.address
        if unix_user is None:
            tx.run("UPDATE customers SET default_sender = :a WHERE id = :c", {"a": address, "c": customer_id})
            detail = f"default sender {address or 'cleared'}"
        else:
            bound = tx.rows(_CUSTOMER_OF_USER, {"u": unix_user})
            if not bound or bound[0][0] != customer_id:
                raise UnknownSubject(f"the Unix user {unix_user} is not bound to customer {customer_id}; "
                                     f"bind it first (sendmail-shim customer bind {customer_id} {unix_user})")
            tx.run("UPDATE unix_users SET default_sender = :a WHERE unix_user = :u",
                   {"a": address, "u": unix_user})
            detail = f"default sender of unix user {unix_user} {address or 'cleared'}"
        audit(tx, "customer default-sender", customer_id, detail, actor)

    def contact(self, customer_id: str) -> str | None:
        """The customer's contact address (one read, for a notice)."""
        with self.store.read() as tx:
            rows = tx.rows("SELECT contact FROM customers WHERE id = :c", {"c": customer_id})
        return str(rows[0][0]) if rows and rows[0][0] else None

    def set_contact(self, customer_id: str, address: str | None, *, actor: str | None = None) -> Customer:
        """Set (None: clear) where the customer's notices go; any valid address, not only its accounts."""
        if address is not None:
            canonical_address(address)  # checked; stored as written, since a mailbox's local part may be case-sensitive
            address = address.strip()
        with self.store.write() as tx:
            require_customer(tx, customer_id)
            tx.run("UPDATE customers SET contact = :a WHERE id = :c", {"a": address, "c": customer_id})
            audit(tx, "customer contact", customer_id, f"contact {address or 'cleared'}", actor)
        return self.get_customer(customer_id)

    @staticmethod
    def _forget_default_sender(tx: Tx, account: AccountEntry, actor: str | None) -> None:
        """A removed account is no one's default sender any more (audited, so the admin can see why)."""
        cleared = tx.run("UPDATE customers SET default_sender = NULL WHERE default_sender = :a",
                         {"a": account.address})
        cleared += tx.run("UPDATE unix_users SET default_sender = NULL WHERE default_sender = :a",
                          {"a": account.address})
        if cleared:
            audit(tx, "customer default-sender", account.customer_id,
                  f"default sender {account.address} cleared: the account was removed", actor)

    def bind_user(self, customer_id: str, unix_user: str, *, actor: str | None = None) -> Customer:
        """Sites running as ``unix_user`` send for ``customer_id`` and only for it."""
        check_identifier(unix_user, "Unix user name")
        with self.store.write() as tx:
            require_customer(tx, customer_id)
            self._bind(tx, customer_id, unix_user, actor)
        return self.get_customer(customer_id)

    @staticmethod
    def _bind(tx: Tx, customer_id: str, user: str, actor: str | None) -> None:
        if _claim(tx, "unix_users", "unix_user", user, customer_id, lambda other: (
                f"the Unix user {user} is bound to customer {other}; "
                f"unbind it first (sendmail-shim customer unbind {user})")):
            audit(tx, "customer bind", customer_id, f"unix user {user}", actor)

    def unbind_user(self, unix_user: str, *, actor: str | None = None) -> str:
        """Remove a binding; return the customer it was bound to."""
        with self.store.write() as tx:
            rows = tx.rows(_CUSTOMER_OF_USER, {"u": unix_user})
            if not rows:
                raise UnknownSubject(f"the Unix user {unix_user} is not bound to any customer")
            tx.run("DELETE FROM unix_users WHERE unix_user = :u", {"u": unix_user})
            audit(tx, "customer unbind", str(rows[0][0]), f"unix user {unix_user}", actor)
        return str(rows[0][0])

    def get_customer(self, customer_id: str) -> Customer:
        customers = self.list_customers(customer_id)
        if not customers:
            raise no_customer(customer_id)
        return customers[0]

    def list_customers(self, only: str | None = None) -> list[Customer]:
        where, params = ("WHERE id = :c", {"c": only}) if only is not None else ("", {})
        with self.store.read() as tx:
            found = tx.rows(f"SELECT id, default_sender, contact FROM customers {where} ORDER BY id", params)
            users = tx.rows("SELECT customer_id, unix_user, default_sender FROM unix_users ORDER BY unix_user")
            domains = tx.rows("SELECT customer_id, domain FROM domains ORDER BY domain")
            counted = tx.rows("SELECT customer_id, count(*) FROM accounts GROUP BY customer_id")
        counts = {str(row[0]): int(row[1]) for row in counted}
        return [
            Customer(
                id=str(cid),
                unix_users=tuple(str(u) for c, u, _ in users if c == cid),
                domains=tuple(str(d) for c, d in domains if c == cid),
                accounts=int(counts.get(cid, 0)),
                default_sender=str(default) if default else None,
                user_default_senders=tuple((str(u), str(a)) for c, u, a in users if c == cid and a),
                contact=str(contact) if contact else None,
            )
            for cid, default, contact in found
        ]

    # ----------------------------------------------------------- accounts

    def add_account(self, address: str, customer_id: str, *, authenticated: bool = False,
                    actor: str | None = None) -> AccountEntry:
        """Register a sending account; its domain becomes (or must already be) the customer's."""
        address = canonical_address(address)
        domain = address.rpartition("@")[2]
        with self.store.write() as tx:
            require_customer(tx, customer_id)
            existing = account_entry(tx, address)
            if existing is not None:
                if existing.customer_id != customer_id:
                    raise Conflict(f"{address} is already an account of customer {existing.customer_id}")
                return existing
            _claim(tx, "domains", "domain", domain, customer_id, lambda other: (
                f"the domain {domain} belongs to customer {other}; a domain may belong to only one customer"))
            now = time.time()
            tx.run(
                "INSERT INTO accounts (address, domain, customer_id, authenticated, blocked, "
                "created_at, updated_at) VALUES (:a, :d, :c, :auth, 0, :t, :t)",
                {"a": address, "d": domain, "c": customer_id, "auth": int(authenticated), "t": now},
            )
            audit(tx, "account add", address, f"customer {customer_id}", actor)
            return require_account(tx, address)

    def remove_account(self, address: str, *, actor: str | None = None) -> AccountEntry:
        """Remove an account (its send history stays and counts again if it is re-added)."""
        with self.store.write() as tx:
            account = require_account(tx, address)
            tx.run("DELETE FROM accounts WHERE address = :a", {"a": account.address})
            self._forget_default_sender(tx, account, actor)
            others = tx.rows("SELECT 1 FROM accounts WHERE domain = :d", {"d": account.domain})
            if not others:
                tx.run("DELETE FROM domains WHERE domain = :d", {"d": account.domain})
            audit(tx, "account remove", account.address, f"customer {account.customer_id}", actor)
        return account

    def authenticate(self, address: str, authenticated: bool = True, *,
                     actor: str | None = None) -> AccountEntry:
        return self._set_flags(address, "authenticate" if authenticated else "revoke",
                               {"authenticated": int(authenticated)}, None, actor)

    def block(self, address: str, reason: str | None = None, *, actor: str | None = None) -> AccountEntry:
        reason = check_reason(reason, required=False)
        return self._set_flags(address, "block", {"blocked": 1, "block_reason": reason, "blocked_by": "admin",
                                                  "blocked_at": time.time()}, reason, actor)

    def unblock(self, address: str, reason: str | None = None, *,
                actor: str | None = None) -> AccountEntry:
        """Lift a block; what the account did before now no longer counts towards an automatic one."""
        reason = check_reason(reason, required=False)
        return self._set_flags(address, "unblock", {"blocked": 0, "block_reason": None, "blocked_by": None,
                                                    "blocked_at": None, "unblocked_at": time.time()},
                               reason, actor)

    def auto_block(self, address: str, reason: str, *, actor: str) -> AccountEntry | None:
        """Block an account that is not blocked yet (the abuse rules); None when it already was.

        The condition is in the UPDATE, so two gates judging the same account
        at once block it once, and an admin's block is never replaced.
        """
        with self.store.write() as tx:
            account = require_account(tx, address)
            now = time.time()
            changed = tx.run("UPDATE accounts SET blocked = 1, block_reason = :r, blocked_by = :by, "
                             "blocked_at = :t, updated_at = :t WHERE address = :a AND blocked = 0",
                             {"r": reason, "by": AUTO, "t": now, "a": account.address})
            if not changed:
                return None
            audit(tx, "account block", account.address, reason, actor, now)
            return require_account(tx, account.address)

    def _set_flags(self, address: str, action: str, values: dict[str, Any],
                   detail: str | None, actor: str | None) -> AccountEntry:
        assignments = ", ".join(f"{column} = :{column}" for column in values)
        with self.store.write() as tx:
            account = require_account(tx, address)
            tx.run(f"UPDATE accounts SET {assignments}, updated_at = :t WHERE address = :a",
                   {**values, "t": time.time(), "a": account.address})
            audit(tx, f"account {action}", account.address, detail, actor)
            return require_account(tx, account.address)

    def list_accounts(self, customer_id: str | None = None) -> list[AccountEntry]:
        where, params = ("WHERE customer_id = :c", {"c": customer_id}) if customer_id else ("", {})
        with self.store.read() as tx:
            if customer_id:
                require_customer(tx, customer_id)
            rows = tx.rows(f"SELECT {_ACCOUNT_COLUMNS} FROM accounts {where} "
                           "ORDER BY customer_id, address", params)
        return [_entry(r) for r in rows]
