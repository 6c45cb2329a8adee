"""The schema of every table in the ledger database, and the migrations that make it.

Each migration's tables are written here once and never change: a later
migration adds to them. ``MIGRATIONS`` lists them in order; the table
``schema_migrations`` records which ones a database has had.

The queue's tables (``queue_messages``, ``queue_recipients``; their format is
described in ``sendmail_shim/queue.py``) are defined here too, so that the
store never needs the stage that uses them.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

from .connections import Backend, SqlAlchemyBackend, prepare_sqlite_file

MIGRATIONS = ("0001_initial", "0002_queue", "0003_store", "0004_default_sender", "0005_unconfirmed",
              "0006_send_holder", "0007_operations", "0008_abuse")
_PG_ADVISORY_UPGRADE_LOCK = 7_352_001


class SchemaStatus(NamedTuple):
    applied: tuple[str, ...]
    pending: tuple[str, ...]
    unknown: tuple[str, ...]  # applied by a newer sendmail-shim


def status(backend: Backend) -> SchemaStatus:
    """Applied and pending migrations; raises LedgerNotInitialised when there is no schema at all."""
    with backend.transaction(write=False) as tx:
        rows = tx.rows("SELECT name FROM schema_migrations ORDER BY name")
    applied = tuple(str(row[0]) for row in rows)
    return SchemaStatus(
        applied=applied,
        pending=tuple(name for name in MIGRATIONS if name not in applied),
        unknown=tuple(name for name in applied if name not in MIGRATIONS),
    )


def upgrade(url: str, busy_timeout: float, sqlite_file: str | None) -> list[str]:
    """Create or upgrade the schema; return the names of the migrations applied now."""
    if sqlite_file is not None:
        prepare_sqlite_file(sqlite_file, busy_timeout)
    backend = SqlAlchemyBackend(url, busy_timeout, sqlite_path=sqlite_file, create=True)
    try:
        return _apply_migrations(backend)
    finally:
        backend.close()


def _apply_migrations(backend: SqlAlchemyBackend) -> list[str]:
    import sqlalchemy as sa

    applied_now: list[str] = []
    with backend.transaction(write=True) as tx:
        connection = tx.connection  # type: ignore[attr-defined]
        if backend.dialect == "postgresql":
            tx.run("SET LOCAL statement_timeout = 0")
            tx.rows("SELECT pg_advisory_xact_lock(:k)", {"k": _PG_ADVISORY_UPGRADE_LOCK})
        _migrations_table(sa).create(connection, checkfirst=True)
        done = {row[0] for row in tx.rows("SELECT name FROM schema_migrations")}
        for name in MIGRATIONS:
            if name in done:
                continue
            _MIGRATION_STEPS[name](connection, sa)
            tx.run("INSERT INTO schema_migrations (name, applied_at) VALUES (:n, :t)",
                   {"n": name, "t": time.time()})
            applied_now.append(name)
    return applied_now


def _migrations_table(sa: Any) -> Any:
    md = sa.MetaData()
    return sa.Table("schema_migrations", md, sa.Column("name", sa.String(64), primary_key=True),
                    sa.Column("applied_at", sa.Double, nullable=False))


# --------------------------------------------------------------------------- 0001_initial


def _initial_tables(sa: Any) -> Any:
    """The directory, the send log, overrides, resets, decisions, audit and SPF cache."""
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


def _migrate_0001_initial(connection: Any, sa: Any) -> None:
    _initial_tables(sa).create_all(connection)


# --------------------------------------------------------------------------- 0002_queue


def _queue_tables(sa: Any) -> Any:
    """The durable queue: one row per message, one per envelope recipient (see queue.py)."""
    md = sa.MetaData()
    sa.Table(
        "queue_messages", md,
        sa.Column("id", sa.String(32), primary_key=True),
        sa.Column("kind", sa.String(16), nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("send_id", sa.BigInteger),
        sa.Column("account", sa.String(320)),
        sa.Column("customer_id", sa.String(64)),
        sa.Column("sender", sa.String(320), nullable=False),
        sa.Column("message_id", sa.Text),
        sa.Column("data", sa.LargeBinary, nullable=False),
        sa.Column("dsn_notify", sa.String(64)),
        sa.Column("dsn_ret", sa.String(8)),
        sa.Column("dsn_envid", sa.String(128)),
        sa.Column("created_at", sa.Double, nullable=False),
        sa.Column("attempts", sa.Integer, nullable=False),
        sa.Column("next_attempt_at", sa.Double, nullable=False),
        sa.Column("last_attempt_at", sa.Double),
        sa.Column("claimed_by", sa.String(128)),
        sa.Column("claimed_until", sa.Double),
        sa.Column("last_error", sa.Text),
        sa.Column("finished_at", sa.Double),
        sa.Index("queue_due", "state", "next_attempt_at"),
    )
    sa.Table(
        "queue_recipients", md,
        sa.Column("queue_id", sa.String(32), sa.ForeignKey("queue_messages.id", ondelete="CASCADE"),
                  primary_key=True),
        sa.Column("address", sa.String(320), primary_key=True),
        sa.Column("position", sa.Integer, nullable=False),
        sa.Column("state", sa.String(16), nullable=False),
        sa.Column("code", sa.Integer),
        sa.Column("reply", sa.Text),
        sa.Column("updated_at", sa.Double, nullable=False),
    )
    return md


def _migrate_0002_queue(connection: Any, sa: Any) -> None:
    _queue_tables(sa).create_all(connection)


# --------------------------------------------------------------------------- 0003_store


def _store_tables(sa: Any) -> Any:
    """Usage buckets (see windows.py), and the indexes that keep pruning and timeouts cheap."""
    md = sa.MetaData()
    sa.Table("usage_buckets", md,
             sa.Column("scope", sa.String(16), primary_key=True),
             sa.Column("subject", sa.String(320), primary_key=True),
             sa.Column("grain_us", sa.BigInteger, primary_key=True, autoincrement=False),
             sa.Column("start_us", sa.BigInteger, primary_key=True, autoincrement=False),
             sa.Column("messages", sa.BigInteger, nullable=False),
             sa.Column("recipients", sa.BigInteger, nullable=False),
             sa.Index("usage_buckets_start", "start_us"))
    return md


def _store_indexes(sa: Any, tables: Any) -> list[Any]:
    sends, queue = tables.tables["sends"], tables.tables["queue_messages"]
    unsettled = sa.text("state = 'reserved'")
    return [
        sa.Index("sends_at", sends.c.at_us),
        # Only unsettled sends: the timeout's lookup stays small however long the log is.
        sa.Index("sends_reserved", sends.c.customer_id, sends.c.at_us,
                 sqlite_where=unsettled, postgresql_where=unsettled),
        sa.Index("queue_send", queue.c.send_id),
        sa.Index("queue_finished", queue.c.state, queue.c.finished_at),
    ]


def _backfill_buckets(connection: Any, sa: Any) -> None:
    """The buckets of every send that counts now, so that an upgraded ledger keeps its usage.

    The grains and states are written out: a migration must not change when the code does.
    """
    for scope, column in (("account", "account"), ("customer", "customer_id")):
        for grain in (60_000_000, 3_600_000_000, 86_400_000_000):
            connection.execute(sa.text(
                "INSERT INTO usage_buckets (scope, subject, grain_us, start_us, messages, recipients) "
                f"SELECT '{scope}', s.{column}, {grain}, (s.at_us / {grain}) * {grain}, count(*), "
                "sum(s.recipients) FROM sends s WHERE s.state IN ('reserved', 'sent', 'queued') AND s.id > "
                "(SELECT coalesce(max(r.upto_send_id), 0) FROM usage_resets r "
                f"WHERE r.scope = '{scope}' AND r.subject = s.{column}) "
                f"GROUP BY s.{column}, (s.at_us / {grain}) * {grain}"))


def _migrate_0003_store(connection: Any, sa: Any) -> None:
    _store_tables(sa).create_all(connection)
    existing = sa.MetaData()
    existing.reflect(connection, only=["sends", "queue_messages"])
    for index in _store_indexes(sa, existing):
        index.create(connection)
    _backfill_buckets(connection, sa)


def _migrate_0004_default_sender(connection: Any, sa: Any) -> None:
    """A default sender (one of the customer's accounts) per customer and per Unix-user binding."""
    for table in ("customers", "unix_users"):
        connection.execute(sa.text(f"ALTER TABLE {table} ADD COLUMN default_sender VARCHAR(320)"))


def _migrate_0005_unconfirmed(connection: Any, sa: Any) -> None:
    """How many times a queued message's final dot went unanswered (it may have been delivered)."""
    connection.execute(sa.text("ALTER TABLE queue_messages ADD COLUMN unconfirmed INTEGER NOT NULL DEFAULT 0"))


def _migrate_0006_send_holder(connection: Any, sa: Any) -> None:
    """Which gate holds a reservation while it relays, and for which Unix user.

    A gate that dies between reserving and settling leaves its reservations
    behind; at its next start it finds its own by ``holder`` and reports each
    as outcome unknown (the upstream may have the message).
    """
    connection.execute(sa.text("ALTER TABLE sends ADD COLUMN holder VARCHAR(300)"))
    connection.execute(sa.text("ALTER TABLE sends ADD COLUMN uid INTEGER"))


def _migrate_0007_operations(connection: Any, sa: Any) -> None:
    """What the operator's console needs: who sent it, whom to tell, what was told.

    ``decisions`` gain the script (``X-PHP-Originating-Script``) and, for gate
    callers, the process's working directory and executable. ``customers``
    gain a contact address. ``notices`` holds one row per notice sent; its
    unique key is what makes "at most one per rule and window" hold across
    processes and servers sharing the ledger.
    """
    for column in ("script", "cwd", "exe"):
        connection.execute(sa.text(f"ALTER TABLE decisions ADD COLUMN {column} TEXT"))
    connection.execute(sa.text("ALTER TABLE customers ADD COLUMN contact VARCHAR(320)"))
    md = sa.MetaData()
    big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    sa.Table("notices", md, sa.Column("id", big_id, primary_key=True, autoincrement=True),
             sa.Column("at", sa.Double, nullable=False, index=True),
             sa.Column("kind", sa.String(16), nullable=False),  # warn, limit, block
             sa.Column("scope", sa.String(16), nullable=False),  # account, customer
             sa.Column("subject", sa.String(320), nullable=False),
             sa.Column("rule", sa.String(64), nullable=False),  # e.g. "10 messages / 5m"; "abuse" for blocks
             sa.Column("window_start", sa.Double, nullable=False),
             sa.Column("recipients", sa.Text),  # where it went, comma separated
             sa.Column("message_id", sa.Text),
             sa.UniqueConstraint("kind", "scope", "subject", "rule", "window_start",
                                 name="notices_once"))
    md.create_all(connection)


def _migrate_0008_abuse(connection: Any, sa: Any) -> None:
    """What the automatic blocks judge by, and who blocked an account when.

    ``outcomes`` holds one row per message the upstream answered at RCPT (how
    many recipients it accepted, deferred with 4xx, refused with 5xx) and per
    refusal by a limit; the abuse rules count them in a window, by account.
    ``accounts`` gain when and by whom (``admin`` or ``auto``) they were
    blocked, and when they were last unblocked: outcomes before that no
    longer count, so a lifted block is a fresh start.
    """
    connection.execute(sa.text("ALTER TABLE accounts ADD COLUMN blocked_at DOUBLE PRECISION"))
    connection.execute(sa.text("ALTER TABLE accounts ADD COLUMN blocked_by VARCHAR(16)"))
    connection.execute(sa.text("ALTER TABLE accounts ADD COLUMN unblocked_at DOUBLE PRECISION"))
    md = sa.MetaData()
    big_id = sa.BigInteger().with_variant(sa.Integer(), "sqlite")
    sa.Table("outcomes", md, sa.Column("id", big_id, primary_key=True, autoincrement=True),
             sa.Column("at", sa.Double, nullable=False, index=True),
             sa.Column("account", sa.String(320), nullable=False),
             sa.Column("customer_id", sa.String(64)),
             sa.Column("accepted", sa.Integer, nullable=False),
             sa.Column("deferred", sa.Integer, nullable=False),
             sa.Column("failed", sa.Integer, nullable=False),
             sa.Column("limited", sa.Integer, nullable=False),
             sa.Index("outcomes_account_at", "account", "at"))
    md.create_all(connection)


_MIGRATION_STEPS: dict[str, Callable[[Any, Any], None]] = {
    "0001_initial": _migrate_0001_initial,
    "0002_queue": _migrate_0002_queue,
    "0003_store": _migrate_0003_store,
    "0004_default_sender": _migrate_0004_default_sender,
    "0005_unconfirmed": _migrate_0005_unconfirmed,
    "0006_send_holder": _migrate_0006_send_holder,
    "0007_operations": _migrate_0007_operations,
    "0008_abuse": _migrate_0008_abuse,
}
