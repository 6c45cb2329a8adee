"""The ledger: customers, accounts, exact rolling-window rate limits and the decision log.

Every accepted message is a row in ``sends`` with its time in integer
microseconds, so window arithmetic is exact. A rule "N per W" holds when, at
the instant of each acceptance, the counted sends in the last W plus this
message stay within N; since usage in any window can only grow at an
acceptance, that keeps every window at every instant within N. The check and
the insert of the reservation happen in one transaction that is serialised per
customer: ``BEGIN IMMEDIATE`` on SQLite (one writer at a time), a row lock on
the customer (``SELECT ... FOR UPDATE``) at READ COMMITTED on PostgreSQL.

SQLite is the default. Its runtime statements go through the standard
``sqlite3`` module because importing SQLAlchemy costs more than the whole
per-message budget of ``sendmail``; schema changes (``upgrade``) and every
other database go through SQLAlchemy. The SQL is written once and runs on both.

Nothing heavy is imported at module import time: ``sendmail`` imports this
module on every call.
"""

from __future__ import annotations

import math
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple, Protocol

from .limits import Rule

if TYPE_CHECKING:
    from .config import Config, LimitsConfig

MIGRATIONS = ("0001_initial", "0002_queue")
SCOPES = ("account", "customer")
OUTCOMES = ("sent", "queued", "released")
COUNTED_STATES = ("reserved", "sent", "queued")
DECISION_FIELDS = (
    "verdict", "code", "account", "customer", "uid", "user", "recipients",
    "reason", "message_id", "time", "stage", "reference",
)
# The mail log's names for the same fields, so that a log record can be stored as it is.
DECISION_ALIASES = {"rcpts": "recipients", "msgid": "message_id", "ref": "reference",
                    "sender": "account"}
_INTEGER_FIELDS = ("code", "uid", "recipients")

_US = 1_000_000
_COUNTED_SQL = "state IN ('reserved', 'sent', 'queued')"
_SCOPE_COLUMN = {"account": "account", "customer": "customer_id"}
_PG_ADVISORY_UPGRADE_LOCK = 7_352_001
_RUN_UPGRADE = "run: sendmail-shim db upgrade"
_CUSTOMER_OF_USER = "SELECT customer_id FROM unix_users WHERE unix_user = :u"


def _no_customer(customer_id: str) -> str:
    return f"customer {customer_id} does not exist; add it with: sendmail-shim customer add"


# --------------------------------------------------------------------------- errors


class LedgerError(Exception):
    """Family root. ``str(exc)`` is the one line the user sees: what happened, what to do."""

    exit_code = 69


class LedgerUnavailable(LedgerError):
    """The ledger cannot be opened, locked or reached within the timeout: fail closed."""

    exit_code = 69


class LedgerNotInitialised(LedgerError):
    """The schema is missing or older than this program: ``sendmail-shim db upgrade``."""

    exit_code = 78


class UnsupportedLedger(LedgerError):
    """The ``[ledger] url`` names a database this program cannot use."""

    exit_code = 78


class InvalidInput(LedgerError):
    """An address, customer id, user name, rule or reason that cannot be stored."""

    exit_code = 65


class UnknownSubject(LedgerError):
    """An admin operation names an account, customer or override that does not exist."""

    exit_code = 67


class Conflict(LedgerError):
    """The change contradicts what is stored (a domain or user of another customer)."""

    exit_code = 65


class LimitReached(LedgerError):
    """The message does not fit a rule now; it will at ``next_free_at`` (epoch seconds)."""

    exit_code = 69

    def __init__(
        self, scope: str, subject: str, rule: Rule, used: int, needed: int,
        next_free_at: float, now: float,
    ) -> None:
        self.scope, self.subject, self.rule = scope, subject, rule
        self.used, self.needed = used, needed
        self.next_free_at, self.now = next_free_at, now
        super().__init__(_limit_reached_line(self))


class LimitNeverFits(LedgerError):
    """The message is larger than a rule allows in any window."""

    exit_code = 77

    def __init__(self, scope: str, subject: str, rule: Rule, needed: int) -> None:
        self.scope, self.subject, self.rule, self.needed = scope, subject, rule, needed
        who = _scope_name(scope, subject)
        if rule.metric == "recipients":
            line = (f"this message has {needed} recipients but {who} may send at most "
                    f"{rule.phrase}, so it can never be sent; send to fewer recipients per "
                    f"message or use a bulk mail service")
        else:
            line = (f"{who} may send at most {rule.phrase}, so no message can be sent; "
                    f"ask your hosting provider about the limit")
        super().__init__(line)


def _scope_name(scope: str, subject: str) -> str:
    return subject if scope == "account" else f"customer {subject} (all its accounts together)"


def _limit_reached_line(exc: LimitReached) -> str:
    usage = f"{exc.used} used"
    if exc.rule.metric == "recipients":
        usage += f", this message has {exc.needed}"
    return (
        f"{_scope_name(exc.scope, exc.subject)} reached {exc.rule.phrase} ({usage}); "
        f"next message possible at {format_instant(exc.next_free_at, exc.now)} "
        f"(in {format_delay(exc.next_free_at - exc.now)})"
    )


def format_instant(at: float, now: float | None = None) -> str:
    """``12:06:08 UTC``, with the date when it is not today (UTC); rounded up to the second."""
    moment = time.gmtime(math.ceil(at))
    today = time.gmtime(now if now is not None else time.time())
    if moment[:3] == today[:3]:
        return time.strftime("%H:%M:%S UTC", moment)
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", moment)


def format_utc(at: float) -> str:
    """``2026-06-01 12:00:00 UTC``."""
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(math.ceil(at)))


def format_delay(seconds: float) -> str:
    """``2 min 31 s``; rounded up so the promise is never early."""
    total = max(0, math.ceil(seconds - 1e-9))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    if days:
        return f"{days} d {hours} h" if hours else f"{days} d"
    if hours:
        return f"{hours} h {minutes} min" if minutes else f"{hours} h"
    if minutes:
        return f"{minutes} min {secs} s" if secs else f"{minutes} min"
    return f"{secs} s"


# --------------------------------------------------------------------------- records
# Account and Reservation travel the hot path as frozen dataclasses; the admin
# records are NamedTuples, which cost far less to define at import time.


@dataclass(frozen=True)
class Account:
    address: str
    customer_id: str
    authenticated: bool
    blocked: bool
    block_reason: str | None

    @property
    def domain(self) -> str:
        return self.address.rpartition("@")[2]


class Customer(NamedTuple):
    id: str
    unix_users: tuple[str, ...]
    domains: tuple[str, ...]
    accounts: int


@dataclass(frozen=True)
class Reservation:
    """A counted send; settle it with ``Ledger.settle`` once the relay has answered."""

    id: int
    account: str
    customer_id: str
    recipients: int
    at: float
    message_id: str


class Override(NamedTuple):
    id: int
    scope: str
    subject: str
    rule: Rule
    expires_at: float
    reason: str
    created_at: float
    created_by: str | None


class RuleUsage(NamedTuple):
    """One rule as it stands for one account or customer at ``now``."""

    scope: str
    subject: str
    rule: Rule
    used: int
    next_free_at: float | None  # when one more unit fits again; None while some remain
    override: Override | None

    @property
    def metric(self) -> str:
        return self.rule.metric

    @property
    def limit(self) -> int:
        return self.rule.limit

    @property
    def window_seconds(self) -> int:
        return self.rule.window_seconds

    @property
    def remaining(self) -> int:
        return max(0, self.rule.limit - self.used)


class ResetMarker(NamedTuple):
    id: int
    scope: str
    subject: str
    at: float
    reason: str
    created_by: str | None


class Decision(NamedTuple):
    id: int
    at: float
    verdict: str | None
    code: int | None
    account: str | None
    customer: str | None
    uid: int | None
    user: str | None
    recipients: int | None
    reason: str | None
    message_id: str | None
    stage: str | None
    reference: str | None
    extra: str | None  # other fields of the decision, as key=value text


class AuditEntry(NamedTuple):
    id: int
    at: float
    actor: str | None
    action: str
    subject: str
    detail: str | None


class SendRecord(NamedTuple):
    id: int
    account: str
    customer_id: str
    recipients: int
    at: float
    state: str
    message_id: str | None


class SchemaStatus(NamedTuple):
    applied: tuple[str, ...]
    pending: tuple[str, ...]
    unknown: tuple[str, ...]  # applied by a newer sendmail-shim


# --------------------------------------------------------------------------- input checks




def canonical_domain(text: str) -> str:
    """Lowercase A-label form of a domain (the address parser's); raise InvalidInput when it is not one."""
    from .addresses import AddressError
    from .addresses import canonical_domain as parse_domain

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
    from .addresses import AddressError, parse_mailbox

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


# --------------------------------------------------------------------------- database access


class _Tx(Protocol):
    def rows(self, sql: str, params: dict[str, Any] | None = None) -> list[Sequence[Any]]: ...

    def run(self, sql: str, params: dict[str, Any] | None = None) -> int: ...


class _Backend(Protocol):
    dialect: str
    where: str

    def transaction(self, *, write: bool) -> Any: ...  # context manager yielding a _Tx

    def close(self) -> None: ...


class _CursorTx:
    """Runs SQL on a ``sqlite3`` connection (named ``:param`` style, as SQLAlchemy's text())."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    def rows(self, sql: str, params: dict[str, Any] | None = None) -> list[Sequence[Any]]:
        return list(self.connection.execute(sql, params or {}).fetchall())

    def run(self, sql: str, params: dict[str, Any] | None = None) -> int:
        return int(self.connection.execute(sql, params or {}).rowcount)


class _SqliteBackend:
    """SQLite through the standard library, with a small pool of idle connections.

    A connection serves one transaction at a time and goes back to the pool, so
    a threaded service holds as many connections as it runs transactions at once.
    """

    dialect = "sqlite"

    def __init__(self, path: str, busy_timeout: float) -> None:
        self.path, self.busy_timeout = path, busy_timeout
        self.where = path
        self._lock = threading.Lock()
        self._idle: list[tuple[int, Any]] = []  # (pid that opened it, connection)
        # Writers of this process queue here, handed the lock at once, rather than in SQLite's
        # busy handler, which polls in sleeps of milliseconds; other processes still wait there.
        self._writer = threading.Lock()

    def _borrow(self) -> Any:
        with self._lock:
            while self._idle:
                pid, connection = self._idle.pop()
                if pid == os.getpid():  # one inherited over fork stays the parent's
                    return connection
        return open_sqlite(self.path, self.busy_timeout, create=False)

    def _give_back(self, connection: Any) -> None:
        with self._lock:
            self._idle.append((os.getpid(), connection))

    @contextmanager
    def transaction(self, *, write: bool) -> Iterator[_Tx]:
        import sqlite3

        if not write:
            yield from self._transaction(write=False)
            return
        if not self._writer.acquire(timeout=self.busy_timeout):
            raise sqlite_error(sqlite3.OperationalError("database is locked"), self.path, self.busy_timeout)
        try:
            yield from self._transaction(write=True)
        finally:
            self._writer.release()

    def _transaction(self, *, write: bool) -> Iterator[_Tx]:
        import sqlite3

        connection = self._borrow()
        try:
            # IMMEDIATE takes the write lock up front, so the busy timeout applies
            # (a deferred transaction upgrading to a write fails at once when busy).
            connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield _CursorTx(connection)
            except BaseException:
                if connection.in_transaction:
                    connection.rollback()
                raise
            connection.execute("COMMIT")
        except sqlite3.Error as exc:
            connection.close()  # whatever went wrong, start afresh next time
            raise sqlite_error(exc, self.path, self.busy_timeout) from None
        except BaseException:
            self._give_back(connection)
            raise
        self._give_back(connection)

    def close(self) -> None:
        with self._lock:
            idle, self._idle = self._idle, []
        for pid, connection in idle:
            if pid == os.getpid():
                connection.close()


def open_sqlite(path: str, busy_timeout: float, *, create: bool) -> Any:
    """A ``sqlite3`` connection in autocommit mode (we issue BEGIN ourselves)."""
    import sqlite3
    from urllib.parse import quote

    if not create and not os.path.exists(path):
        raise LedgerNotInitialised(
            f"the ledger {path} does not exist; run: sendmail-shim db upgrade"
        )
    mode = "rwc" if create else "rw"
    try:
        connection = sqlite3.connect(
            f"file:{quote(os.path.abspath(path))}?mode={mode}", uri=True,
            timeout=busy_timeout, isolation_level=None, check_same_thread=False,
        )
        connection.execute("PRAGMA synchronous=FULL")
        connection.execute("PRAGMA foreign_keys=ON")
    except sqlite3.Error as exc:
        raise sqlite_error(exc, path, busy_timeout) from None
    return connection


def sqlite_error(exc: Exception, path: str, busy_timeout: float) -> LedgerError:
    """Turn a sqlite3 error into one clear line; never "database is locked"."""
    name = getattr(exc, "sqlite_errorname", "") or ""
    text = str(exc)
    if "no such table" in text:
        return LedgerNotInitialised(f"the ledger {path} is not initialised; {_RUN_UPGRADE}")
    if name.startswith("SQLITE_BUSY") or name.startswith("SQLITE_LOCKED") or "locked" in text:
        return LedgerUnavailable(
            f"the ledger {path} stayed busy for {busy_timeout:g} s; try again later"
        )
    if name.startswith("SQLITE_READONLY") or "readonly" in text:
        return LedgerUnavailable(
            f"cannot write the ledger {path} as uid {os.getuid()} (read-only); "
            f"its owner or permissions must let this user write it and its directory"
        )
    if name.startswith("SQLITE_CANTOPEN") or "unable to open" in text:
        return LedgerUnavailable(
            f"cannot open the ledger {path} as uid {os.getuid()}; "
            f"check that the file and its directory exist and this user may read and write them"
        )
    if name.startswith("SQLITE_FULL") or "full" in text:
        return LedgerUnavailable(f"the disk holding the ledger {path} is full; free space")
    if name.startswith("SQLITE_NOTADB") or "not a database" in text:
        return LedgerUnavailable(f"{path} is not a ledger database; check [ledger] url")
    return LedgerUnavailable(f"the ledger {path} failed ({_one_line(text)}); try again later")


def _one_line(text: str) -> str:
    return " ".join(text.split())[:300]


class _ConnectionTx:
    """Runs SQL on a SQLAlchemy connection."""

    def __init__(self, connection: Any, text: Callable[[str], Any]) -> None:
        self.connection, self.text = connection, text

    def rows(self, sql: str, params: dict[str, Any] | None = None) -> list[Sequence[Any]]:
        return list(self.connection.execute(self.text(sql), params or {}).all())

    def run(self, sql: str, params: dict[str, Any] | None = None) -> int:
        return int(self.connection.execute(self.text(sql), params or {}).rowcount)


class _SqlAlchemyBackend:
    """Any SQLAlchemy URL; in practice PostgreSQL (and SQLite for schema changes)."""

    def __init__(self, url: str, busy_timeout: float, *, sqlite_path: str | None = None,
                 create: bool = False) -> None:
        self.url, self.busy_timeout = url, busy_timeout
        self.sqlite_path, self.create = sqlite_path, create
        self.dialect = "sqlite" if sqlite_path is not None else _dialect_of(url)
        self.where = sqlite_path or _safe_url(url)
        self._engine: Any = None
        self._engine_pid = 0
        self._lock = threading.Lock()

    @property
    def engine(self) -> Any:
        with self._lock:
            if self._engine is not None and self._engine_pid != os.getpid():
                self._engine.dispose(close=False)  # a forked child must not share sockets
            if self._engine is None or self._engine_pid != os.getpid():
                self._engine = self._create_engine()
                self._engine_pid = os.getpid()
            return self._engine

    def _create_engine(self) -> Any:
        from sqlalchemy import create_engine

        if self.sqlite_path is not None:
            path, timeout, create = self.sqlite_path, self.busy_timeout, self.create
            return create_engine(
                "sqlite://", creator=lambda: open_sqlite(path, timeout, create=create),
            )
        url = _driver_url(self.url)
        connect_args: dict[str, Any] = {}
        if url.get_backend_name() == "postgresql":
            connect_args = _postgres_connect_args(url, self.busy_timeout)
        try:
            return create_engine(url, pool_pre_ping=True, connect_args=connect_args)
        except ImportError as exc:
            raise UnsupportedLedger(
                f"the ledger {self.where} needs a database driver that is not installed "
                f"({exc}); install it, e.g. pip install 'sendmail-shim[postgresql]'"
            ) from None

    @contextmanager
    def transaction(self, *, write: bool) -> Iterator[_Tx]:
        from sqlalchemy import exc as sa_exc
        from sqlalchemy import text

        try:
            with self.engine.connect() as connection:
                if self.dialect == "sqlite":
                    yield from self._sqlite_transaction(connection, text, write)
                else:
                    with connection.begin():
                        yield _ConnectionTx(connection, text)
        except (sa_exc.DBAPIError, sa_exc.NoSuchModuleError) as exc:
            raise self._translate(exc) from None

    @staticmethod
    def _sqlite_transaction(connection: Any, text: Callable[[str], Any],
                            write: bool) -> Iterator[_Tx]:
        connection = connection.execution_options(isolation_level="AUTOCOMMIT")
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield _ConnectionTx(connection, text)
        except BaseException:
            connection.exec_driver_sql("ROLLBACK")
            raise
        connection.exec_driver_sql("COMMIT")

    def _translate(self, exc: Exception) -> LedgerError:
        import sqlite3

        from sqlalchemy import exc as sa_exc

        original = getattr(exc, "orig", None)
        if isinstance(original, sqlite3.Error):
            return sqlite_error(original, self.where, self.busy_timeout)
        if isinstance(exc, sa_exc.IntegrityError):
            return Conflict("someone else changed the same entry at the same time; try again")
        if isinstance(exc, sa_exc.NoSuchModuleError):
            return UnsupportedLedger(f"the ledger url {self.where} names an unknown driver")
        state = getattr(original, "sqlstate", None)
        if state == "42P01":
            return LedgerNotInitialised(
                f"the ledger {self.where} is not initialised; {_RUN_UPGRADE}"
            )
        if state in ("55P03", "57014"):
            return LedgerUnavailable(
                f"the ledger {self.where} stayed busy for {self.busy_timeout:g} s; try again later"
            )
        detail = _one_line(str(original or exc).split("\n")[0])
        return LedgerUnavailable(
            f"cannot use the ledger database {self.where} ({detail}); try again later"
        )

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


def _dialect_of(url: str) -> str:
    scheme = url.split("://", 1)[0]
    return scheme.split("+", 1)[0].lower()


def _safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if at and ":" in credentials:
        credentials = credentials.split(":", 1)[0] + ":***"
    return f"{scheme}{sep}{credentials}{at}{host}"


def _driver_url(url: str) -> Any:
    from sqlalchemy.engine import make_url

    parsed = make_url(url)
    if parsed.drivername in ("postgresql", "postgres"):
        # The [postgresql] extra installs psycopg 3, not SQLAlchemy's default driver.
        parsed = parsed.set(drivername="postgresql+psycopg")
    return parsed


def _postgres_connect_args(url: Any, busy_timeout: float) -> dict[str, Any]:
    args: dict[str, Any] = {
        "connect_timeout": max(2, math.ceil(busy_timeout)),
        "application_name": "sendmail-shim",
    }
    if "options" not in url.query:
        # lock_timeout bounds the wait for a customer's row; statement_timeout
        # bounds a hung server: past either, the caller fails closed.
        lock_ms = max(1, round(busy_timeout * 1000))
        args["options"] = f"-c lock_timeout={lock_ms} -c statement_timeout={lock_ms * 3}"
    return args


def _sqlite_path(url: str) -> str | None:
    """The file of a ``sqlite:///path`` URL; None for other databases."""
    scheme, sep, rest = url.partition("://")
    if not sep or scheme.lower() not in ("sqlite", "sqlite+pysqlite"):
        return None
    path = rest[1:] if rest.startswith("/") else rest
    path = path.split("?", 1)[0]
    if not path or path == ":memory:":
        raise UnsupportedLedger(
            f"the ledger url {url} names no file; give one, e.g. sqlite:////var/lib/sendmail-shim/ledger.db"
        )
    return path


# --------------------------------------------------------------------------- schema


def _schema(sa: Any) -> Any:
    """Version 1 of the schema, as SQLAlchemy Core tables."""
    md = sa.MetaData()
    big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")  # rowid alias on SQLite
    text, name = sa.Text, sa.String(64)

    def customer_ref() -> Any:
        return sa.ForeignKey("customers.id")

    address = sa.String(320)
    sa.Table("customers", md, sa.Column("id", name, primary_key=True),
             sa.Column("created_at", sa.Double, nullable=False))
    sa.Table("unix_users", md, sa.Column("unix_user", name, primary_key=True),
             sa.Column("customer_id", name, customer_ref(), nullable=False, index=True))
    sa.Table("domains", md, sa.Column("domain", sa.String(253), primary_key=True),
             sa.Column("customer_id", name, customer_ref(), nullable=False, index=True))
    sa.Table("accounts", md, sa.Column("address", address, primary_key=True),
             sa.Column("domain", sa.String(253), nullable=False, index=True),
             sa.Column("customer_id", name, customer_ref(), nullable=False, index=True),
             sa.Column("authenticated", sa.Integer, nullable=False, default=0),
             sa.Column("blocked", sa.Integer, nullable=False, default=0),
             sa.Column("block_reason", text),
             sa.Column("created_at", sa.Double, nullable=False),
             sa.Column("updated_at", sa.Double, nullable=False))
    sa.Table("sends", md, sa.Column("id", big_id, primary_key=True, autoincrement=True),
             sa.Column("account", address, nullable=False),
             sa.Column("customer_id", name, nullable=False),
             sa.Column("message_id", text),
             sa.Column("recipients", sa.Integer, nullable=False),
             sa.Column("at_us", sa.BigInteger, nullable=False),
             sa.Column("state", sa.String(16), nullable=False),
             sa.Column("settled_at", sa.Double),
             sa.Index("sends_account_at", "account", "at_us"),
             sa.Index("sends_customer_at", "customer_id", "at_us"))
    sa.Table("decisions", md, sa.Column("id", big_id, primary_key=True, autoincrement=True),
             sa.Column("at", sa.Double, nullable=False, index=True),
             sa.Column("verdict", sa.String(32)), sa.Column("code", sa.Integer),
             sa.Column("account", address, index=True), sa.Column("customer_id", name, index=True),
             sa.Column("uid", sa.BigInteger), sa.Column("unix_user", name),
             sa.Column("recipients", sa.Integer), sa.Column("reason", text),
             sa.Column("message_id", text), sa.Column("stage", sa.String(64)),
             sa.Column("reference", sa.String(64)), sa.Column("extra", text))
    sa.Table("overrides", md, sa.Column("id", big_id, primary_key=True, autoincrement=True),
             sa.Column("scope", sa.String(16), nullable=False),
             sa.Column("subject", address, nullable=False),
             sa.Column("metric", sa.String(16), nullable=False),
             sa.Column("limit_value", sa.BigInteger, nullable=False),
             sa.Column("window_seconds", sa.BigInteger, nullable=False),
             sa.Column("expires_at", sa.Double, nullable=False),
             sa.Column("reason", text, nullable=False),
             sa.Column("created_at", sa.Double, nullable=False),
             sa.Column("created_by", name),
             sa.Index("overrides_subject", "scope", "subject"))
    sa.Table("usage_resets", md, sa.Column("id", big_id, primary_key=True, autoincrement=True),
             sa.Column("scope", sa.String(16), nullable=False),
             sa.Column("subject", address, nullable=False),
             sa.Column("upto_send_id", sa.BigInteger, nullable=False),
             sa.Column("at", sa.Double, nullable=False),
             sa.Column("reason", text, nullable=False),
             sa.Column("created_by", name),
             sa.Index("usage_resets_subject", "scope", "subject"))
    sa.Table("audit", md, sa.Column("id", big_id, primary_key=True, autoincrement=True),
             sa.Column("at", sa.Double, nullable=False),
             sa.Column("actor", name), sa.Column("action", sa.String(64), nullable=False),
             sa.Column("subject", address, nullable=False), sa.Column("detail", text))
    sa.Table("spf_cache", md, sa.Column("domain", sa.String(253), primary_key=True),
             sa.Column("ip", sa.String(64), primary_key=True),
             sa.Column("result", sa.String(16), nullable=False),
             sa.Column("expires_at", sa.Double, nullable=False, index=True))
    return md


def _migrations_table(sa: Any) -> Any:
    md = sa.MetaData()
    return sa.Table("schema_migrations", md, sa.Column("name", sa.String(64), primary_key=True),
                    sa.Column("applied_at", sa.Double, nullable=False))


def _migrate_0001_initial(connection: Any, sa: Any) -> None:
    _schema(sa).create_all(connection)


def _migrate_0002_queue(connection: Any, sa: Any) -> None:
    from .queue import queue_schema  # the queue documents its own format

    queue_schema(sa).create_all(connection)


_MIGRATION_STEPS: dict[str, Callable[[Any, Any], None]] = {
    "0001_initial": _migrate_0001_initial,
    "0002_queue": _migrate_0002_queue,
}


# --------------------------------------------------------------------------- rules


class _ActiveRule(NamedTuple):
    scope: str
    subject: str
    rule: Rule
    override: Override | None

    def amount(self, recipients: int) -> int:
        return 1 if self.rule.metric == "messages" else recipients


def _apply_overrides(scope: str, subject: str, rules: Sequence[Rule],
                     overrides: Sequence[Override]) -> list[_ActiveRule]:
    """Configured rules with same-window overrides in place; other overrides added (newest wins)."""
    active = {(r.metric, r.window_seconds): _ActiveRule(scope, subject, r, None) for r in rules}
    for override in sorted(overrides, key=lambda o: o.id):
        key = (override.rule.metric, override.rule.window_seconds)
        active[key] = _ActiveRule(scope, subject, override.rule, override)
    return list(active.values())


def parse_expiry(text: str, now: float) -> float:
    """``7d``/``12h``/``90m`` from now, or an ISO date/time (UTC unless it says otherwise)."""
    from datetime import UTC, datetime

    from .config import parse_duration

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


# --------------------------------------------------------------------------- the ledger


class Ledger:
    """The ledger at an SQLAlchemy URL. Lazy: nothing is opened until first use.

    One Ledger per process (or thread pool); it keeps its connections warm.
    """

    def __init__(self, url: str, *, busy_timeout: float = 10.0,
                 limits: LimitsConfig | None = None, via_sqlalchemy: bool = False) -> None:
        self.url = url
        self.busy_timeout = busy_timeout
        self._limits = limits
        self._via_sqlalchemy = via_sqlalchemy
        self._sqlite_file = _sqlite_path(url)
        self._backend: _Backend | None = None
        self._schema_checked = False

    @classmethod
    def from_config(cls, config: Config) -> Ledger:
        return cls(config.ledger.url, busy_timeout=config.ledger.busy_timeout, limits=config.limits)

    def __enter__(self) -> Ledger:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    @property
    def limits(self) -> LimitsConfig:
        if self._limits is None:
            from .config import LimitsConfig

            self._limits = LimitsConfig()
        return self._limits

    @property
    def dialect(self) -> str:
        return "sqlite" if self._sqlite_file is not None else _dialect_of(self.url)

    @property
    def where(self) -> str:
        """The ledger's location for messages, without any password."""
        return self._sqlite_file or _safe_url(self.url)

    # ----------------------------------------------------------- plumbing

    def _db(self) -> _Backend:
        if self._backend is None:
            if self._sqlite_file is not None and not self._via_sqlalchemy:
                self._backend = _SqliteBackend(self._sqlite_file, self.busy_timeout)
            else:
                self._backend = _SqlAlchemyBackend(
                    self.url, self.busy_timeout, sqlite_path=self._sqlite_file
                )
        return self._backend

    def transaction(self, *, write: bool) -> Any:
        """A transaction for another stage's tables (the queue): ``with ledger.transaction(write=True) as tx``.

        Writes are serialised as the reservations are (BEGIN IMMEDIATE on SQLite).
        """
        self._ensure_schema()
        return self._db().transaction(write=write)

    def now(self, tx: Any) -> float:
        """The ledger's clock (the database's on PostgreSQL, so that servers agree)."""
        return self._now_us(tx, None) / _US

    def _read(self) -> Any:
        self._ensure_schema()
        return self._db().transaction(write=False)

    def _write(self) -> Any:
        self._ensure_schema()
        return self._db().transaction(write=True)

    def _ensure_schema(self) -> None:
        if self._schema_checked:
            return
        status = self._schema_status()
        if not status.applied:
            raise LedgerNotInitialised(
                f"the ledger {self.where} is not initialised; run: sendmail-shim db upgrade"
            )
        if status.unknown:
            raise LedgerNotInitialised(
                f"the ledger {self.where} was upgraded by a newer sendmail-shim "
                f"(it has {', '.join(status.unknown)}); install that version"
            )
        if status.pending:
            raise LedgerNotInitialised(
                f"the ledger {self.where} is not initialised or is older than this program "
                f"(missing {', '.join(status.pending)}); run: sendmail-shim db upgrade"
            )
        self._schema_checked = True

    def schema_status(self) -> SchemaStatus:
        """Applied and pending migrations; a missing ledger has every migration pending."""
        try:
            return self._schema_status()
        except LedgerNotInitialised:
            return SchemaStatus(applied=(), pending=MIGRATIONS, unknown=())

    def _schema_status(self) -> SchemaStatus:
        with self._db().transaction(write=False) as tx:
            rows = tx.rows("SELECT name FROM schema_migrations ORDER BY name")
        applied = tuple(str(row[0]) for row in rows)
        return SchemaStatus(
            applied=applied,
            pending=tuple(name for name in MIGRATIONS if name not in applied),
            unknown=tuple(name for name in applied if name not in MIGRATIONS),
        )

    def _now_us(self, tx: _Tx, now: float | None) -> int:
        if now is not None:
            return round(now * _US)
        if self.dialect == "postgresql":
            # The database's clock, so that several web servers agree on "now".
            value = tx.rows(
                "SELECT CAST(extract(epoch FROM clock_timestamp()) * 1000000 AS BIGINT)"
            )
            return int(value[0][0])
        return round(time.time() * _US)

    def _lock_customer(self, tx: _Tx, customer_id: str) -> None:
        """Serialise all reservations of one customer (SQLite's BEGIN IMMEDIATE already does)."""
        if self.dialect == "sqlite":
            return
        found = tx.rows("SELECT id FROM customers WHERE id = :c FOR UPDATE", {"c": customer_id})
        if not found:
            raise UnknownSubject(f"customer {customer_id} does not exist")

    def _audit(self, tx: _Tx, action: str, subject: str, detail: str | None,
               actor: str | None, now: float | None = None) -> None:
        tx.run(
            "INSERT INTO audit (at, actor, action, subject, detail) "
            "VALUES (:at, :actor, :action, :subject, :detail)",
            {"at": now if now is not None else time.time(), "actor": actor, "action": action,
             "subject": subject, "detail": detail},
        )

    # ----------------------------------------------------------- schema

    def upgrade(self) -> list[str]:
        """Create or upgrade the schema; return the names of the migrations applied now."""
        if self._sqlite_file is not None:
            _prepare_sqlite_file(self._sqlite_file, self.busy_timeout)
            backend = _SqlAlchemyBackend(self.url, self.busy_timeout,
                                         sqlite_path=self._sqlite_file, create=True)
        else:
            backend = _SqlAlchemyBackend(self.url, self.busy_timeout)
        try:
            return self._apply_migrations(backend)
        finally:
            backend.close()
            self._schema_checked = False

    def _apply_migrations(self, backend: _SqlAlchemyBackend) -> list[str]:
        import sqlalchemy as sa

        applied_now: list[str] = []
        with backend.transaction(write=True) as tx:
            connection = tx.connection  # type: ignore[attr-defined]
            if backend.dialect == "postgresql":
                tx.run("SET LOCAL statement_timeout = 0")
                tx.rows("SELECT pg_advisory_xact_lock(:k)", {"k": _PG_ADVISORY_UPGRADE_LOCK})
            table = _migrations_table(sa)
            table.create(connection, checkfirst=True)
            done = {row[0] for row in tx.rows("SELECT name FROM schema_migrations")}
            for name in MIGRATIONS:
                if name in done:
                    continue
                _MIGRATION_STEPS[name](connection, sa)
                tx.run("INSERT INTO schema_migrations (name, applied_at) VALUES (:n, :t)",
                       {"n": name, "t": time.time()})
                applied_now.append(name)
        return applied_now

    # ----------------------------------------------------------- accounts and customers

    def find_account(self, address: str) -> Account | None:
        try:
            address = canonical_address(address)
        except InvalidInput:
            return None
        with self._read() as tx:
            return self._account(tx, address)

    @staticmethod
    def _account(tx: _Tx, address: str) -> Account | None:
        rows = tx.rows(
            "SELECT address, customer_id, authenticated, blocked, block_reason "
            "FROM accounts WHERE address = :a", {"a": address},
        )
        if not rows:
            return None
        row = rows[0]
        return Account(row[0], row[1], bool(row[2]), bool(row[3]), row[4])

    def _require_account(self, tx: _Tx, address: str) -> Account:
        account = self._account(tx, canonical_address(address))
        if account is None:
            raise UnknownSubject(
                f"{address} is not a registered account; add it with: sendmail-shim account add"
            )
        return account

    @staticmethod
    def _require_customer(tx: _Tx, customer_id: str) -> None:
        if not tx.rows("SELECT 1 FROM customers WHERE id = :c", {"c": customer_id}):
            raise UnknownSubject(_no_customer(customer_id))

    def customer_of_user(self, unix_user: str) -> str | None:
        with self._read() as tx:
            rows = tx.rows(_CUSTOMER_OF_USER, {"u": unix_user})
        return str(rows[0][0]) if rows else None

    def customer_domains(self, customer_id: str) -> set[str]:
        with self._read() as tx:
            rows = tx.rows("SELECT domain FROM domains WHERE customer_id = :c", {"c": customer_id})
        return {str(row[0]) for row in rows}

    def add_customer(self, customer_id: str, unix_users: Sequence[str] = (), *,
                     actor: str | None = None) -> Customer:
        """Create a customer (or keep the existing one) and bind the given Unix users to it."""
        check_identifier(customer_id, "customer id")
        for user in unix_users:
            check_identifier(user, "Unix user name")
        with self._write() as tx:
            if not tx.rows("SELECT 1 FROM customers WHERE id = :c", {"c": customer_id}):
                tx.run("INSERT INTO customers (id, created_at) VALUES (:c, :t)",
                       {"c": customer_id, "t": time.time()})
                self._audit(tx, "customer add", customer_id, None, actor)
            for user in unix_users:
                self._bind(tx, customer_id, user, actor)
        return self.get_customer(customer_id)

    def bind_user(self, customer_id: str, unix_user: str, *, actor: str | None = None) -> Customer:
        """Sites running as ``unix_user`` send for ``customer_id`` and only for it."""
        check_identifier(unix_user, "Unix user name")
        with self._write() as tx:
            self._require_customer(tx, customer_id)
            self._bind(tx, customer_id, unix_user, actor)
        return self.get_customer(customer_id)

    def _bind(self, tx: _Tx, customer_id: str, user: str, actor: str | None) -> None:
        rows = tx.rows("SELECT customer_id FROM unix_users WHERE unix_user = :u", {"u": user})
        if rows and rows[0][0] != customer_id:
            raise Conflict(
                f"the Unix user {user} is bound to customer {rows[0][0]}; "
                f"unbind it first (sendmail-shim customer unbind {user})"
            )
        if not rows:
            tx.run("INSERT INTO unix_users (unix_user, customer_id) VALUES (:u, :c)",
                   {"u": user, "c": customer_id})
            self._audit(tx, "customer bind", customer_id, f"unix user {user}", actor)

    def unbind_user(self, unix_user: str, *, actor: str | None = None) -> str:
        """Remove a binding; return the customer it was bound to."""
        with self._write() as tx:
            rows = tx.rows(_CUSTOMER_OF_USER, {"u": unix_user})
            if not rows:
                raise UnknownSubject(f"the Unix user {unix_user} is not bound to any customer")
            tx.run("DELETE FROM unix_users WHERE unix_user = :u", {"u": unix_user})
            self._audit(tx, "customer unbind", str(rows[0][0]), f"unix user {unix_user}", actor)
        return str(rows[0][0])

    def get_customer(self, customer_id: str) -> Customer:
        customers = self.list_customers(customer_id)
        if not customers:
            raise UnknownSubject(_no_customer(customer_id))
        return customers[0]

    def list_customers(self, only: str | None = None) -> list[Customer]:
        where, params = ("WHERE id = :c", {"c": only}) if only is not None else ("", {})
        with self._read() as tx:
            found = tx.rows(f"SELECT id FROM customers {where} ORDER BY id", params)
            ids = [str(row[0]) for row in found]
            users = tx.rows("SELECT customer_id, unix_user FROM unix_users ORDER BY unix_user")
            domains = tx.rows("SELECT customer_id, domain FROM domains ORDER BY domain")
            counted = tx.rows("SELECT customer_id, count(*) FROM accounts GROUP BY customer_id")
        counts = {str(row[0]): int(row[1]) for row in counted}
        return [
            Customer(
                id=cid,
                unix_users=tuple(str(u) for c, u in users if c == cid),
                domains=tuple(str(d) for c, d in domains if c == cid),
                accounts=int(counts.get(cid, 0)),
            )
            for cid in ids
        ]

    def add_account(self, address: str, customer_id: str, *, authenticated: bool = False,
                    actor: str | None = None) -> Account:
        """Register a sending account; its domain becomes (or must already be) the customer's."""
        address = canonical_address(address)
        domain = address.rpartition("@")[2]
        with self._write() as tx:
            self._require_customer(tx, customer_id)
            existing = self._account(tx, address)
            if existing is not None:
                if existing.customer_id != customer_id:
                    raise Conflict(
                        f"{address} is already an account of customer {existing.customer_id}"
                    )
                return existing
            owner = tx.rows("SELECT customer_id FROM domains WHERE domain = :d", {"d": domain})
            if owner and owner[0][0] != customer_id:
                raise Conflict(
                    f"the domain {domain} belongs to customer {owner[0][0]}; "
                    f"a domain may belong to only one customer"
                )
            if not owner:
                tx.run("INSERT INTO domains (domain, customer_id) VALUES (:d, :c)",
                       {"d": domain, "c": customer_id})
            now = time.time()
            tx.run(
                "INSERT INTO accounts (address, domain, customer_id, authenticated, blocked, "
                "created_at, updated_at) VALUES (:a, :d, :c, :auth, 0, :t, :t)",
                {"a": address, "d": domain, "c": customer_id, "auth": int(authenticated), "t": now},
            )
            self._audit(tx, "account add", address, f"customer {customer_id}", actor)
            return self._require_account(tx, address)

    def remove_account(self, address: str, *, actor: str | None = None) -> Account:
        """Remove an account (its send history stays and counts again if it is re-added)."""
        with self._write() as tx:
            account = self._require_account(tx, address)
            tx.run("DELETE FROM accounts WHERE address = :a", {"a": account.address})
            others = tx.rows("SELECT 1 FROM accounts WHERE domain = :d", {"d": account.domain})
            if not others:
                tx.run("DELETE FROM domains WHERE domain = :d", {"d": account.domain})
            self._audit(tx, "account remove", account.address,
                        f"customer {account.customer_id}", actor)
        return account

    def authenticate(self, address: str, authenticated: bool = True, *,
                     actor: str | None = None) -> Account:
        return self._set_flags(address, "authenticate" if authenticated else "revoke",
                               {"authenticated": int(authenticated)}, None, actor)

    def block(self, address: str, reason: str | None = None, *,
              actor: str | None = None) -> Account:
        reason = check_reason(reason, required=False)
        values = {"blocked": 1, "block_reason": reason}
        return self._set_flags(address, "block", values, reason, actor)

    def unblock(self, address: str, reason: str | None = None, *,
                actor: str | None = None) -> Account:
        reason = check_reason(reason, required=False)
        values = {"blocked": 0, "block_reason": None}
        return self._set_flags(address, "unblock", values, reason, actor)

    def _set_flags(self, address: str, action: str, values: dict[str, Any],
                   detail: str | None, actor: str | None) -> Account:
        assignments = ", ".join(f"{column} = :{column}" for column in values)
        with self._write() as tx:
            account = self._require_account(tx, address)
            tx.run(f"UPDATE accounts SET {assignments}, updated_at = :t WHERE address = :a",
                   {**values, "t": time.time(), "a": account.address})
            self._audit(tx, f"account {action}", account.address, detail, actor)
            return self._require_account(tx, account.address)

    def list_accounts(self, customer_id: str | None = None) -> list[Account]:
        where, params = ("WHERE customer_id = :c", {"c": customer_id}) if customer_id else ("", {})
        with self._read() as tx:
            if customer_id:
                self._require_customer(tx, customer_id)
            rows = tx.rows(
                "SELECT address, customer_id, authenticated, blocked, block_reason "
                f"FROM accounts {where} ORDER BY customer_id, address", params,
            )
        return [Account(r[0], r[1], bool(r[2]), bool(r[3]), r[4]) for r in rows]

    # ----------------------------------------------------------- rate limits

    def reserve(self, account: Account, recipients: int, *, message_id: str,
                now: float | None = None) -> Reservation:
        """Check every account and customer rule and count the message, in one transaction.

        Raises LimitNeverFits when the message is larger than a rule allows and
        LimitReached (with the exact instant it would fit) when it does not fit now.
        """
        if recipients < 1:
            raise ValueError("a message has at least one recipient")
        with self._write() as tx:
            self._lock_customer(tx, account.customer_id)
            now_us = self._now_us(tx, now)
            rules = self._active_rules(tx, account.address, account.customer_id, now_us / _US)
            for active in rules:
                needed = active.amount(recipients)
                if needed > active.rule.limit:
                    raise LimitNeverFits(active.scope, active.subject, active.rule, needed)
            self._refuse_if_over(tx, rules, recipients, now_us)
            rows = tx.rows(
                "INSERT INTO sends (account, customer_id, message_id, recipients, at_us, state) "
                "VALUES (:a, :c, :m, :n, :t, 'reserved') RETURNING id",
                {"a": account.address, "c": account.customer_id, "m": message_id,
                 "n": recipients, "t": now_us},
            )
        return Reservation(int(rows[0][0]), account.address, account.customer_id,
                           recipients, now_us / _US, message_id)

    def _active_rules(self, tx: _Tx, address: str, customer_id: str,
                      now: float) -> list[_ActiveRule]:
        overrides = self._overrides(
            tx, "((scope = 'account' AND subject = :a) OR (scope = 'customer' AND subject = :c)) "
                "AND expires_at > :now", {"a": address, "c": customer_id, "now": now},
        )
        return [
            *_apply_overrides("account", address, self.limits.account,
                              [o for o in overrides if o.scope == "account"]),
            *_apply_overrides("customer", customer_id, self.limits.customer,
                              [o for o in overrides if o.scope == "customer"]),
        ]

    def _refuse_if_over(self, tx: _Tx, rules: Sequence[_ActiveRule], recipients: int,
                        now_us: int) -> None:
        worst: LimitReached | None = None
        for scope in SCOPES:
            scoped = [r for r in rules if r.scope == scope]
            if not scoped:
                continue
            used = self._window_sums(tx, scope, scoped[0].subject, [r.rule for r in scoped], now_us)
            for active in scoped:
                in_use = used[(active.rule.metric, active.rule.window_seconds)]
                needed = active.amount(recipients)
                if in_use + needed <= active.rule.limit:
                    continue
                excess = in_use + needed - active.rule.limit
                free_us = self._next_free_us(tx, active, excess, now_us)
                if worst is None or free_us / _US > worst.next_free_at:
                    worst = LimitReached(scope, active.subject, active.rule, in_use, needed,
                                         free_us / _US, now_us / _US)
        if worst is not None:
            raise worst

    @staticmethod
    def _counted_filter(scope: str) -> str:
        """Sends that count for a scope: not released and after the latest reset marker."""
        return (
            f"{_SCOPE_COLUMN[scope]} = :subject AND {_COUNTED_SQL} AND id > "
            "(SELECT coalesce(max(upto_send_id), 0) FROM usage_resets "
            f"WHERE scope = '{scope}' AND subject = :subject)"
        )

    def _window_sums(self, tx: _Tx, scope: str, subject: str, rules: Sequence[Rule],
                     now_us: int) -> dict[tuple[str, int], int]:
        """Messages and recipients in each rule's window (now - W, now], one query."""
        windows = sorted({rule.window_seconds for rule in rules}, reverse=True)
        if not windows:
            return {}
        params: dict[str, Any] = {"subject": subject}
        columns = []
        for i, window in enumerate(windows):
            # Sends dated after now (a clock that stepped back) count too: that keeps
            # every later window within the limit.
            params[f"c{i}"] = now_us - window * _US
            columns.append(f"coalesce(sum(CASE WHEN at_us > :c{i} THEN 1 ELSE 0 END), 0)")
            columns.append(f"coalesce(sum(CASE WHEN at_us > :c{i} THEN recipients ELSE 0 END), 0)")
        sql = (f"SELECT {', '.join(columns)} FROM sends WHERE {self._counted_filter(scope)} "
               "AND at_us > :c0")
        row = tx.rows(sql, params)[0]
        sums: dict[tuple[str, int], int] = {}
        for i, window in enumerate(windows):
            sums[("messages", window)] = int(row[2 * i])
            sums[("recipients", window)] = int(row[2 * i + 1])
        return sums

    def _next_free_us(self, tx: _Tx, active: _ActiveRule, excess: int, now_us: int) -> int:
        """The instant enough of the oldest sends have left the window to free ``excess``."""
        window_us = active.rule.window_seconds * _US
        amount = "1" if active.rule.metric == "messages" else "recipients"
        rows = tx.rows(
            f"SELECT at_us, {amount} FROM sends WHERE {self._counted_filter(active.scope)} "
            "AND at_us > :cutoff ORDER BY at_us, id",
            {"subject": active.subject, "cutoff": now_us - window_us},
        )
        freed = 0
        for at_us, size in rows:
            freed += int(size)
            if freed >= excess:
                return int(at_us) + window_us
        return now_us  # unreachable while the message fits the rule at all

    def settle(self, reservation: Reservation | int, outcome: str) -> None:
        """``sent`` or ``queued`` keep counting; ``released`` (refused, permanent failure) stops.

        Only a reserved or queued send changes: a sent one is never uncounted.
        """
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, not {outcome!r}")
        send_id = reservation if isinstance(reservation, int) else reservation.id
        with self._write() as tx:
            self.settle_in(tx, send_id, outcome)

    def settle_in(self, tx: _Tx, send_id: int, outcome: str) -> None:
        """``settle`` inside a transaction another stage holds (the queue's commit)."""
        if outcome not in OUTCOMES:
            raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, not {outcome!r}")
        tx.run(
            "UPDATE sends SET state = :s, settled_at = :t WHERE id = :i "
            "AND state IN ('reserved', 'queued')",
            {"s": outcome, "t": time.time(), "i": send_id},
        )

    def usage(self, scope: str, subject: str, now: float | None = None) -> list[RuleUsage]:
        """Every rule of an account (``scope="account"``) or a customer, as it stands now."""
        check_scope(scope)
        with self._read() as tx:
            if scope == "account":
                account = self._require_account(tx, subject)
                subject, customer_id = account.address, account.customer_id
            else:
                self._require_customer(tx, subject)
                customer_id = subject
            now_us = self._now_us(tx, now)
            rules = [r for r in self._active_rules(tx, subject, customer_id, now_us / _US)
                     if r.scope == scope]
            used = self._window_sums(tx, scope, subject, [r.rule for r in rules], now_us)
            return [self._rule_usage(tx, r, used, now_us) for r in rules]

    def _rule_usage(self, tx: _Tx, active: _ActiveRule, used: dict[tuple[str, int], int],
                    now_us: int) -> RuleUsage:
        in_use = used[(active.rule.metric, active.rule.window_seconds)]
        next_free = None
        if 0 < active.rule.limit <= in_use:
            next_free = self._next_free_us(tx, active, in_use + 1 - active.rule.limit, now_us) / _US
        return RuleUsage(active.scope, active.subject, active.rule, in_use, next_free,
                         active.override)

    def list_sends(self, scope: str, subject: str, *,
                   counted_only: bool = False) -> list[SendRecord]:
        """The send log of an account or customer, oldest first."""
        check_scope(scope)
        where = f"{_SCOPE_COLUMN[scope]} = :s" + (f" AND {_COUNTED_SQL}" if counted_only else "")
        with self._read() as tx:
            rows = tx.rows(
                "SELECT id, account, customer_id, recipients, at_us, state, message_id FROM sends "
                f"WHERE {where} ORDER BY at_us, id", {"s": subject},
            )
        return [SendRecord(int(r[0]), r[1], r[2], int(r[3]), int(r[4]) / _US, r[5], r[6])
                for r in rows]

    # ----------------------------------------------------------- overrides and resets

    def _require_subject(self, tx: _Tx, scope: str, subject: str) -> str:
        check_scope(scope)
        if scope == "account":
            return self._require_account(tx, subject).address
        self._require_customer(tx, subject)
        return subject

    def set_override(self, scope: str, subject: str, rule: Rule, *, expires_at: float,
                     reason: str, actor: str | None = None, now: float | None = None) -> Override:
        """Replace the rule with the same metric and window (or add one) until ``expires_at``."""
        reason_text = check_reason(reason, required=True)
        now = time.time() if now is None else now
        if expires_at <= now:
            raise InvalidInput("the override's expiry is in the past; give a later time")
        with self._write() as tx:
            subject = self._require_subject(tx, scope, subject)
            tx.run(
                "DELETE FROM overrides WHERE scope = :sc AND subject = :su AND metric = :m "
                "AND window_seconds = :w",
                {"sc": scope, "su": subject, "m": rule.metric, "w": rule.window_seconds},
            )
            rows = tx.rows(
                "INSERT INTO overrides (scope, subject, metric, limit_value, window_seconds, "
                "expires_at, reason, created_at, created_by) VALUES "
                "(:sc, :su, :m, :l, :w, :e, :r, :t, :by) RETURNING id",
                {"sc": scope, "su": subject, "m": rule.metric, "l": rule.limit,
                 "w": rule.window_seconds, "e": expires_at, "r": reason_text, "t": now,
                 "by": actor},
            )
            self._audit(tx, "override set", subject,
                        f"{scope} {rule} until {format_utc(expires_at)}: {reason_text}", actor, now)
        return Override(int(rows[0][0]), scope, subject, rule, expires_at, reason_text or "",
                        now, actor)

    def list_overrides(self, scope: str | None = None, subject: str | None = None, *,
                       include_expired: bool = False, now: float | None = None) -> list[Override]:
        clauses: list[str] = ["1 = 1"]
        params: dict[str, Any] = {"now": time.time() if now is None else now}
        if scope is not None:
            clauses.append("scope = :scope")
            params["scope"] = check_scope(scope)
        if subject is not None:
            clauses.append("subject = :subject")
            params["subject"] = canonical_address(subject) if scope == "account" else subject
        if not include_expired:
            clauses.append("expires_at > :now")
        with self._read() as tx:
            return self._overrides(tx, " AND ".join(clauses), params)

    @staticmethod
    def _overrides(tx: _Tx, where: str, params: dict[str, Any]) -> list[Override]:
        rows = tx.rows(
            "SELECT id, scope, subject, metric, limit_value, window_seconds, expires_at, reason, "
            f"created_at, created_by FROM overrides WHERE {where} ORDER BY id", params,
        )
        return [
            Override(int(r[0]), r[1], r[2], Rule(r[3], int(r[4]), int(r[5])), float(r[6]),
                     r[7], float(r[8]), r[9])
            for r in rows
        ]

    def remove_override(self, override_id: int, *, actor: str | None = None) -> Override:
        with self._write() as tx:
            found = self._overrides(tx, "id = :i", {"i": override_id})
            if not found:
                raise UnknownSubject(
                    f"there is no override {override_id}; see: sendmail-shim override list"
                )
            tx.run("DELETE FROM overrides WHERE id = :i", {"i": override_id})
            override = found[0]
            self._audit(tx, "override rm", override.subject,
                        f"#{override.id} {override.scope} {override.rule}", actor)
        return override

    def reset_usage(self, scope: str, subject: str, *, reason: str, actor: str | None = None,
                    now: float | None = None) -> ResetMarker:
        """Forgive everything sent so far in this scope; the sends stay in the log."""
        reason_text = check_reason(reason, required=True) or ""
        with self._write() as tx:
            subject = self._require_subject(tx, scope, subject)
            customer_id = (subject if scope == "customer"
                           else self._require_account(tx, subject).customer_id)
            self._lock_customer(tx, customer_id)
            at = self._now_us(tx, now) / _US
            upto = int(tx.rows("SELECT coalesce(max(id), 0) FROM sends")[0][0])
            rows = tx.rows(
                "INSERT INTO usage_resets (scope, subject, upto_send_id, at, reason, created_by) "
                "VALUES (:sc, :su, :u, :at, :r, :by) RETURNING id",
                {"sc": scope, "su": subject, "u": upto, "at": at, "r": reason_text, "by": actor},
            )
            self._audit(tx, "usage reset", subject, f"{scope}: {reason_text}", actor, at)
        return ResetMarker(int(rows[0][0]), scope, subject, at, reason_text, actor)

    # ----------------------------------------------------------- decision log

    def record_decision(self, **fields: object) -> None:
        """One row per decision for ``sendmail-shim log``.

        DECISION_FIELDS have columns of their own (the mail log's names in
        DECISION_ALIASES are accepted too); any other field is kept as
        ``key=value`` text in ``extra``.
        """
        with self._write() as tx:
            self._insert_decision(tx, fields)

    def settle_and_record(self, reservation: Reservation, outcome: str, decision: dict[str, object]) -> None:
        """``settle`` and ``record_decision`` in one transaction: one commit (one fsync) per message."""
        self.settle_and_record_all([(reservation, outcome, decision)])

    def settle_and_record_all(self, items: Sequence[tuple[Reservation | None, str | None,
                                                          dict[str, object]]]) -> None:
        """Several messages' settles (where there is a reservation to settle) and decision rows, one commit."""
        with self._write() as tx:
            for reservation, outcome, decision in items:
                if reservation is not None and outcome is not None:
                    self.settle_in(tx, reservation.id, outcome)
                self._insert_decision(tx, decision)

    @staticmethod
    def _insert_decision(tx: _Tx, fields: dict[str, object]) -> None:
        values: dict[str, Any] = {name: None for name in DECISION_FIELDS}
        extra = []
        for name, value in fields.items():
            column = DECISION_ALIASES.get(name, name)
            if column in values and values[column] is None:
                values[column] = value
            elif value is not None:
                extra.append(f"{name}={value}")
        for name in _INTEGER_FIELDS:
            values[name] = int(values[name]) if values[name] is not None else None
        for name in set(DECISION_FIELDS) - set(_INTEGER_FIELDS) - {"time"}:
            values[name] = str(values[name]) if values[name] is not None else None
        values["time"] = float(values["time"]) if values["time"] is not None else time.time()
        values["extra"] = " ".join(extra)[:4000] or None
        tx.run(
            "INSERT INTO decisions (at, verdict, code, account, customer_id, uid, unix_user, "
            "recipients, reason, message_id, stage, reference, extra) VALUES (:time, "
            ":verdict, :code, :account, :customer, :uid, :user, :recipients, :reason, "
            ":message_id, :stage, :reference, :extra)",
            values,
        )

    def recent_decisions(self, limit: int = 50, *, account: str | None = None,
                         customer: str | None = None) -> list[Decision]:
        """The latest decisions, newest first."""
        clauses: list[str] = ["1 = 1"]
        params: dict[str, Any] = {"n": limit}
        if account is not None:
            clauses.append("account = :a")
            params["a"] = canonical_address(account)
        if customer is not None:
            clauses.append("customer_id = :c")
            params["c"] = customer
        with self._read() as tx:
            rows = tx.rows(
                "SELECT id, at, verdict, code, account, customer_id, uid, unix_user, recipients, "
                "reason, message_id, stage, reference, extra FROM decisions "
                f"WHERE {' AND '.join(clauses)} ORDER BY at DESC, id DESC LIMIT :n", params,
            )
        return [Decision(int(r[0]), float(r[1]), *r[2:]) for r in rows]

    def audit_log(self, limit: int = 50, *, subject: str | None = None) -> list[AuditEntry]:
        """The latest admin actions, newest first."""
        params: dict[str, Any] = {"s": subject, "n": limit}
        where = "WHERE subject = :s" if subject else ""
        with self._read() as tx:
            rows = tx.rows(
                f"SELECT id, at, actor, action, subject, detail FROM audit {where} "
                "ORDER BY id DESC LIMIT :n", params,
            )
        return [AuditEntry(int(r[0]), float(r[1]), r[2], r[3], r[4], r[5]) for r in rows]

    # ----------------------------------------------------------- SPF verdicts

    def spf_cache(self) -> SqlSpfCache:
        return SqlSpfCache(self)


class SqlSpfCache:
    """SPF verdicts kept in the ledger, shared by every process and server using it.

    A cache that cannot be read or written behaves as a miss: SPF is then checked afresh.
    """

    def __init__(self, ledger: Ledger) -> None:
        self.ledger = ledger

    def get(self, domain: str, ip: str, now: float) -> str | None:
        try:
            with self.ledger._read() as tx:
                rows = tx.rows(
                    "SELECT result FROM spf_cache "
                    "WHERE domain = :d AND ip = :i AND expires_at > :t",
                    {"d": domain, "i": ip, "t": now},
                )
        except LedgerError:
            return None
        return str(rows[0][0]) if rows else None

    def put(self, domain: str, ip: str, result: str, expires_at: float) -> None:
        try:
            with self.ledger._write() as tx:
                tx.run(
                    "INSERT INTO spf_cache (domain, ip, result, expires_at) "
                    "VALUES (:d, :i, :r, :e) "
                    "ON CONFLICT (domain, ip) DO UPDATE SET result = excluded.result, "
                    "expires_at = excluded.expires_at",
                    {"d": domain, "i": ip, "r": result, "e": expires_at},
                )
                tx.run("DELETE FROM spf_cache WHERE expires_at < :t", {"t": time.time() - 3600})
        except LedgerError:
            pass


def _prepare_sqlite_file(path: str, busy_timeout: float) -> None:
    """Create the directory (0750) and an empty file (0600) so no umask can widen them,
    then switch the file to WAL (a persistent setting)."""
    directory = os.path.dirname(os.path.abspath(path))
    try:
        os.makedirs(directory, mode=0o750, exist_ok=True)
        if not os.path.exists(path):
            os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600))
    except FileExistsError:
        pass
    except OSError as exc:
        raise LedgerUnavailable(
            f"cannot create the ledger {path} ({exc.strerror}); "
            f"check the directory's owner and permissions"
        ) from None
    connection = open_sqlite(path, busy_timeout, create=True)
    try:
        connection.execute("PRAGMA journal_mode=WAL")
    except Exception as exc:  # sqlite3.Error; sqlite3 is imported lazily
        raise sqlite_error(exc, path, busy_timeout) from None
    finally:
        connection.close()

