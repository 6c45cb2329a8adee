"""Connections and transactions, for both backends.

SQLite runs through the standard library's ``sqlite3``: importing SQLAlchemy
costs more than the whole per-message budget of ``sendmail``. Schema changes
and every other database (PostgreSQL for a fleet) go through SQLAlchemy. The
SQL is written once, with SQLAlchemy's ``:name`` parameters, and runs on both.

A write transaction on SQLite is ``BEGIN IMMEDIATE``: it takes the one write
lock up front, so the busy timeout applies to it. PostgreSQL runs at READ
COMMITTED; what must be serialised is serialised per customer by the store.
"""

from __future__ import annotations

import math
import os
import random
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from typing import Any, Protocol

from .errors import (
    RUN_UPGRADE,
    Conflict,
    LedgerError,
    LedgerNotInitialised,
    LedgerUnavailable,
    UnsupportedLedger,
)


class Tx(Protocol):
    """One transaction: ``rows`` for a query, ``run`` for a change (its row count)."""

    def rows(self, sql: str, params: dict[str, Any] | None = None) -> list[Sequence[Any]]: ...

    def run(self, sql: str, params: dict[str, Any] | None = None) -> int: ...


class Backend(Protocol):
    dialect: str
    where: str

    def transaction(self, *, write: bool) -> AbstractContextManager[Tx]: ...

    def close(self) -> None: ...


# --------------------------------------------------------------------------- SQLite, standard library


class CursorTx:
    """Runs SQL on a ``sqlite3`` connection (named ``:param`` style, as SQLAlchemy's text())."""

    def __init__(self, connection: Any) -> None:
        self.connection = connection

    def rows(self, sql: str, params: dict[str, Any] | None = None) -> list[Sequence[Any]]:
        return list(self.connection.execute(sql, params or {}).fetchall())

    def run(self, sql: str, params: dict[str, Any] | None = None) -> int:
        return int(self.connection.execute(sql, params or {}).rowcount)


class SqliteBackend:
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
    def transaction(self, *, write: bool) -> Iterator[Tx]:
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

    def _transaction(self, *, write: bool) -> Iterator[Tx]:
        import sqlite3

        connection = self._borrow()
        try:
            # IMMEDIATE takes the write lock up front, so the busy timeout applies
            # (a deferred transaction upgrading to a write fails at once when busy).
            connection.execute("BEGIN IMMEDIATE" if write else "BEGIN")
            try:
                yield CursorTx(connection)
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
        raise LedgerNotInitialised(f"the ledger {path} does not exist; {RUN_UPGRADE}")
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
        return LedgerNotInitialised(f"the ledger {path} is not initialised; {RUN_UPGRADE}")
    if name.startswith("SQLITE_BUSY") or name.startswith("SQLITE_LOCKED") or "locked" in text:
        return busy(path, busy_timeout)
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
    return LedgerUnavailable(f"the ledger {path} failed ({one_line(text)}); try again later")


def busy(where: str, busy_timeout: float) -> LedgerUnavailable:
    return LedgerUnavailable(f"the ledger {where} stayed busy for {busy_timeout:g} s; try again later")


def one_line(text: str) -> str:
    return " ".join(text.split())[:300]


def prepare_sqlite_file(path: str, busy_timeout: float) -> None:
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


# --------------------------------------------------------------------------- SQLAlchemy


class ConnectionTx:
    """Runs SQL on a SQLAlchemy connection."""

    def __init__(self, connection: Any, text: Callable[[str], Any]) -> None:
        self.connection, self.text = connection, text

    def rows(self, sql: str, params: dict[str, Any] | None = None) -> list[Sequence[Any]]:
        return list(self.connection.execute(self.text(sql), params or {}).all())

    def run(self, sql: str, params: dict[str, Any] | None = None) -> int:
        return int(self.connection.execute(self.text(sql), params or {}).rowcount)

    def rows_within(self, sql: str, params: dict[str, Any], wait: float) -> list[Sequence[Any]] | None:
        """``rows`` of a locking query (PostgreSQL) that waits at most ``wait`` seconds for a lock.

        None when the wait ran out; the transaction goes on (a savepoint takes the failure).
        """
        from sqlalchemy import exc as sa_exc

        self.connection.exec_driver_sql("SAVEPOINT lock_wait")
        self.connection.exec_driver_sql(f"SET LOCAL lock_timeout = '{max(1, round(wait * 1000))}ms'")
        try:
            found = self.rows(sql, params)
        except sa_exc.OperationalError as exc:
            if getattr(exc.orig, "sqlstate", None) != LOCK_TIMEOUT:
                raise
            self.connection.exec_driver_sql("ROLLBACK TO SAVEPOINT lock_wait")
            return None
        self.connection.exec_driver_sql("RELEASE SAVEPOINT lock_wait")
        self.connection.exec_driver_sql("SET LOCAL lock_timeout TO DEFAULT")
        return found


LOCK_TIMEOUT, QUERY_CANCELED, TOO_MANY_CONNECTIONS = "55P03", "57014", "53300"  # PostgreSQL SQLSTATEs


class SqlAlchemyBackend:
    """Any SQLAlchemy URL; in practice PostgreSQL (and SQLite for schema changes)."""

    def __init__(self, url: str, busy_timeout: float, *, sqlite_path: str | None = None,
                 create: bool = False) -> None:
        self.url, self.busy_timeout = url, busy_timeout
        self.sqlite_path, self.create = sqlite_path, create
        self.dialect = "sqlite" if sqlite_path is not None else dialect_of(url)
        self.where = sqlite_path or safe_url(url)
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
            # A gate's threads queue for its pool while others wait for a customer's lock,
            # which may take longer than busy_timeout under a burst; statements get three times as long.
            return create_engine(url, pool_pre_ping=True, connect_args=connect_args,
                                 pool_timeout=3 * self.busy_timeout)
        except ImportError as exc:
            raise UnsupportedLedger(
                f"the ledger {self.where} needs a database driver that is not installed "
                f"({exc}); install it, e.g. pip install 'sendmail-shim[postgresql]'"
            ) from None

    @contextmanager
    def transaction(self, *, write: bool) -> Iterator[Tx]:
        from sqlalchemy import exc as sa_exc
        from sqlalchemy import text

        try:
            with self._connect() as connection:
                if self.dialect == "sqlite":
                    yield from self._sqlite_transaction(connection, text, write)
                else:
                    with connection.begin():
                        yield ConnectionTx(connection, text)
        except (sa_exc.DBAPIError, sa_exc.NoSuchModuleError, sa_exc.TimeoutError) as exc:
            raise self._translate(exc) from None

    def _connect(self) -> Any:
        """A connection; while the server has no slot free (a burst of processes), try again."""
        from sqlalchemy import exc as sa_exc

        deadline = time.monotonic() + self.busy_timeout
        pause = 0.02
        while True:
            try:
                return self.engine.connect()
            except sa_exc.OperationalError as exc:
                remaining = deadline - time.monotonic()
                if not _no_slot_free(exc) or remaining <= 0:
                    raise
            time.sleep(min(remaining, pause * random.uniform(0.5, 1.5)))  # jitter spreads the waiting out
            pause = min(0.5, pause * 2)

    @staticmethod
    def _sqlite_transaction(connection: Any, text: Callable[[str], Any],
                            write: bool) -> Iterator[Tx]:
        connection = connection.execution_options(isolation_level="AUTOCOMMIT")
        connection.exec_driver_sql("BEGIN IMMEDIATE" if write else "BEGIN")
        try:
            yield ConnectionTx(connection, text)
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
        if isinstance(exc, sa_exc.TimeoutError) or _no_slot_free(exc):
            return busy(self.where, self.busy_timeout)
        state = getattr(original, "sqlstate", None)
        if state == "42P01":
            return LedgerNotInitialised(f"the ledger {self.where} is not initialised; {RUN_UPGRADE}")
        if state in (LOCK_TIMEOUT, QUERY_CANCELED, TOO_MANY_CONNECTIONS):
            return busy(self.where, self.busy_timeout)
        detail = one_line(str(original or exc).split("\n")[0])
        return LedgerUnavailable(
            f"cannot use the ledger database {self.where} ({detail}); try again later"
        )

    def close(self) -> None:
        if self._engine is not None:
            self._engine.dispose()
            self._engine = None


def _no_slot_free(exc: Exception) -> bool:
    """PostgreSQL refused the connection for want of a free slot (max_connections)."""
    original = getattr(exc, "orig", None)
    text = str(original or exc)
    return (getattr(original, "sqlstate", None) == TOO_MANY_CONNECTIONS or "too many clients" in text
            or "remaining connection slots are reserved" in text)


def dialect_of(url: str) -> str:
    scheme = url.split("://", 1)[0]
    return scheme.split("+", 1)[0].lower()


def safe_url(url: str) -> str:
    """The URL without its password, for messages."""
    scheme, sep, rest = url.partition("://")
    credentials, at, host = rest.rpartition("@")
    if at and ":" in credentials:
        credentials = credentials.split(":", 1)[0] + ":***"
    return f"{scheme}{sep}{credentials}{at}{host}"


def sqlite_path(url: str) -> str | None:
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
