"""The store: one database, its backend, its clock and its transactions.

Every concern of the ledger (directory, rates, journal, SPF cache, retention)
works through one ``Store``. It opens nothing until first use, checks once that
the schema is this program's, and hands out transactions.
"""

from __future__ import annotations

import time
from contextlib import AbstractContextManager

from . import schema
from .connections import Backend, SqlAlchemyBackend, SqliteBackend, Tx, dialect_of, safe_url, sqlite_path
from .errors import LedgerNotInitialised, no_customer
from .times import US


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

    def lock_customer(self, tx: Tx, customer_id: str) -> None:
        """Serialise everything that counts for one customer (SQLite's BEGIN IMMEDIATE already does)."""
        if self.dialect == "sqlite":
            return
        found = tx.rows("SELECT id FROM customers WHERE id = :c FOR UPDATE", {"c": customer_id})
        if not found:
            raise no_customer(customer_id)

    def now_us(self, tx: Tx, now: float | None = None) -> int:
        """``now`` if given (tests, replays), else the ledger's clock in microseconds.

        On PostgreSQL that is the database's clock, so that several web servers agree.
        """
        if now is not None:
            return round(now * US)
        if self.dialect == "postgresql":
            value = tx.rows("SELECT CAST(extract(epoch FROM clock_timestamp()) * 1000000 AS BIGINT)")
            return int(value[0][0])
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
