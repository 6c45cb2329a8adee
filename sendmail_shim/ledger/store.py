"""The store: one database, its backend, its clock and its transactions.

Every concern of the ledger (directory, rates, journal, SPF cache, retention)
works through one ``Store``. It opens nothing until first use, checks once that
the schema is this program's, and hands out transactions.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager

from . import schema
from .connections import (
    Backend,
    ConnectionTx,
    SqlAlchemyBackend,
    SqliteBackend,
    Tx,
    busy,
    dialect_of,
    safe_url,
    sqlite_path,
)
from .errors import LedgerNotInitialised, no_customer
from .times import US

_CLOCK = "SELECT CAST(extract(epoch FROM clock_timestamp()) * 1000000 AS BIGINT)"


class Store:
    """The ledger database at an SQLAlchemy URL."""

    def __init__(self, url: str, *, busy_timeout: float = 10.0, via_sqlalchemy: bool = False) -> None:
        self.url = url
        self.busy_timeout = busy_timeout
        self.sqlite_file = sqlite_path(url)
        self._via_sqlalchemy = via_sqlalchemy
        self._backend: Backend | None = None
        self._schema_checked = False

    @property
    def dialect(self) -> str:
        return "sqlite" if self.sqlite_file is not None else dialect_of(self.url)

    @property
    def where(self) -> str:
        """The ledger's location for messages, without any password."""
        return self.sqlite_file or safe_url(self.url)

    def backend(self) -> Backend:
        if self._backend is None:
            if self.sqlite_file is not None and not self._via_sqlalchemy:
                self._backend = SqliteBackend(self.sqlite_file, self.busy_timeout)
            else:
                self._backend = SqlAlchemyBackend(self.url, self.busy_timeout, sqlite_path=self.sqlite_file)
        return self._backend

    def close(self) -> None:
        if self._backend is not None:
            self._backend.close()
            self._backend = None

    # ----------------------------------------------------------- transactions

    def read(self) -> AbstractContextManager[Tx]:
        self._ensure_schema()
        return self.backend().transaction(write=False)

    def write(self) -> AbstractContextManager[Tx]:
        """A write transaction; on SQLite it holds the one write lock from its start."""
        self._ensure_schema()
        return self.backend().transaction(write=True)

    def lock_customer(self, tx: Tx, customer_id: str) -> int | None:
        """Serialise everything that counts for one customer (SQLite's BEGIN IMMEDIATE already does).

        On PostgreSQL, the customer's row lock. Under a burst, many callers queue
        for it and each holds it briefly; a caller waits as long as the queue
        moves, and fails (busy) only when one holder has kept it for
        ``busy_timeout``. Returns the database's clock in microseconds when the
        lock came at once (one round trip for both), else None.
        """
        if self.dialect == "sqlite":
            return None
        params = {"c": customer_id}
        if self.dialect != "postgresql" or not isinstance(tx, ConnectionTx):
            if not tx.rows("SELECT id FROM customers WHERE id = :c FOR UPDATE", params):
                raise no_customer(customer_id)
            return None
        free = tx.rows(f"{_CLOCK} FROM customers WHERE id = :c FOR UPDATE SKIP LOCKED", params)
        if free:
            return int(free[0][0])
        if not tx.rows("SELECT 1 FROM customers WHERE id = :c", params):
            raise no_customer(customer_id)
        self._wait_for_customer(tx, customer_id)
        return None

    def _wait_for_customer(self, tx: ConnectionTx, customer_id: str) -> None:
        """Wait in turns of ``slice`` seconds; between turns, see whether the holder changed."""
        wait = min(1.0, max(0.05, self.busy_timeout / 4))
        params = {"c": customer_id}
        holder, moved_at = None, time.monotonic()
        while tx.rows_within("SELECT id FROM customers WHERE id = :c FOR UPDATE", params, wait) is None:
            # The locking transaction's id: a new one means the queue moves.
            current = tx.rows("SELECT CAST(xmax AS TEXT) FROM customers WHERE id = :c", params)[0][0]
            if holder is not None and current != holder:
                moved_at = time.monotonic()
            holder = current
            if time.monotonic() - moved_at >= self.busy_timeout:
                raise busy(self.where, self.busy_timeout)

    def now_us(self, tx: Tx, now: float | None = None) -> int:
        """``now`` if given (tests, replays), else the ledger's clock in microseconds.

        On PostgreSQL that is the database's clock, so that several web servers agree.
        """
        if now is not None:
            return round(now * US)
        if self.dialect == "postgresql":
            return int(tx.rows(_CLOCK)[0][0])
        return round(time.time() * US)

    # ----------------------------------------------------------- schema

    def upgrade(self) -> list[str]:
        try:
            return schema.upgrade(self.url, self.busy_timeout, self.sqlite_file)
        finally:
            self._schema_checked = False

    def schema_status(self) -> schema.SchemaStatus:
        """Applied and pending migrations; a missing ledger has every migration pending."""
        try:
            return schema.status(self.backend())
        except LedgerNotInitialised:
            return schema.SchemaStatus(applied=(), pending=schema.MIGRATIONS, unknown=())

    def _ensure_schema(self) -> None:
        if self._schema_checked:
            return
        found = schema.status(self.backend())
        if not found.applied:
            raise LedgerNotInitialised(
                f"the ledger {self.where} is not initialised; run: sendmail-shim db upgrade"
            )
        if found.unknown:
            raise LedgerNotInitialised(
                f"the ledger {self.where} was upgraded by a newer sendmail-shim "
                f"(it has {', '.join(found.unknown)}); install that version"
            )
        if found.pending:
            raise LedgerNotInitialised(
                f"the ledger {self.where} is not initialised or is older than this program "
                f"(missing {', '.join(found.pending)}); run: sendmail-shim db upgrade"
            )
        self._schema_checked = True
