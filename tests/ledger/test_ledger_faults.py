"""Faults: a busy, unwritable, missing or unreachable ledger fails closed with one clear line."""

from __future__ import annotations

import json
import sqlite3
import threading
import time
from pathlib import Path

import pytest

from sendmail_shim.exitcodes import exit_code_for
from sendmail_shim.ledger import (
    Ledger,
    LedgerError,
    LedgerUnavailable,
    UnsupportedLedger,
)
from tests.ledger.common import NOON, add_account, open_ledger, run_python
from tests.support.postgres import PostgresCluster

PROBE = """
import json, sys
from sendmail_shim.exitcodes import exit_code_for
from sendmail_shim.ledger import Ledger, LedgerError
ledger = Ledger(sys.argv[1] if len(sys.argv) > 1 else {url!r}, busy_timeout=1)
def attempt(step):
    try:
        step()
        return "ok"
    except LedgerError as exc:
        return f"{{type(exc).__name__}} {{exit_code_for(exc)}}: {{exc}}"
print(json.dumps({{
    "read": attempt(lambda: ledger.find_account("post@kunde.example")),
    "reserve": attempt(lambda: ledger.reserve(ledger.find_account("post@kunde.example"), 1,
                                              message_id="<m@x>")),
    "upgrade": attempt(ledger.upgrade),
}}))
"""


def probe(url: str) -> dict[str, str]:
    """What a process bound by file permissions gets from the ledger at ``url``."""
    result = run_python(PROBE.format(url=url), unprivileged=True)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    return dict(json.loads(result.stdout))


def test_busy_sqlite_ledger_fails_closed_after_the_timeout(sqlite_url: str) -> None:
    ledger = open_ledger(sqlite_url)
    account = add_account(ledger)
    slow = Ledger(sqlite_url, busy_timeout=0.3)
    holder = sqlite3.connect(ledger.where, isolation_level=None)
    holder.execute("BEGIN IMMEDIATE")  # another writer that never lets go
    started = time.monotonic()
    try:
        with pytest.raises(LedgerUnavailable) as caught:
            slow.reserve(account, 1, message_id="<m@x>", now=NOON)
    finally:
        holder.execute("ROLLBACK")
        holder.close()
    assert 0.25 <= time.monotonic() - started < 5
    assert str(caught.value) == f"the ledger {ledger.where} stayed busy for 0.3 s; try again later"
    assert "locked" not in str(caught.value)
    assert exit_code_for(caught.value) == 69
    assert slow.list_sends("account", account.address) == []
    slow.reserve(account, 1, message_id="<m@x>", now=NOON)  # free again


def test_writers_of_one_process_take_turns_within_the_busy_timeout(sqlite_url: str) -> None:
    """The gate's threads queue for the write lock in the process: a turn within the timeout is
    taken, a writer held longer gets the same clear refusal as one held by another process."""
    ledger = open_ledger(sqlite_url)
    account = add_account(ledger)
    shared = Ledger(sqlite_url, busy_timeout=0.3)

    def hold(seconds: float, inside: threading.Event) -> None:
        with shared.transaction(write=True):
            inside.set()
            time.sleep(seconds)

    for seconds, refused in ((0.1, False), (1.0, True)):
        inside = threading.Event()
        holder = threading.Thread(target=hold, args=(seconds, inside))
        holder.start()
        assert inside.wait(5)
        try:
            if refused:
                with pytest.raises(LedgerUnavailable) as caught:
                    shared.reserve(account, 1, message_id="<late@x>", now=NOON)
                assert str(caught.value) == f"the ledger {ledger.where} stayed busy for 0.3 s; try again later"
            else:
                shared.reserve(account, 1, message_id="<turn@x>", now=NOON)
        finally:
            holder.join()
    assert [send.message_id for send in shared.list_sends("account", account.address)] == ["<turn@x>"]


def test_busy_postgresql_customer_fails_closed_after_the_timeout(
        postgres_cluster: PostgresCluster, pg_url: str) -> None:
    ledger = open_ledger(pg_url)
    account = add_account(ledger)
    slow = Ledger(pg_url, busy_timeout=1)
    database = postgres_cluster.database_of(pg_url)
    with postgres_cluster.connect(database) as holder:
        holder.autocommit = False
        holder.execute("SELECT id FROM customers WHERE id = 'kunde1' FOR UPDATE")
        started = time.monotonic()
        with pytest.raises(LedgerUnavailable) as caught:
            slow.reserve(account, 1, message_id="<m@x>")
        elapsed = time.monotonic() - started
        holder.rollback()
    assert 0.9 <= elapsed < 5
    assert str(caught.value).endswith("stayed busy for 1 s; try again later")
    assert slow.list_sends("account", account.address) == []


def test_a_connection_killed_mid_transaction_charges_nothing(
        postgres_cluster: PostgresCluster, pg_url: str) -> None:
    ledger = open_ledger(pg_url)
    account = add_account(ledger)
    database = postgres_cluster.database_of(pg_url)
    outcome: list[BaseException] = []

    def reserve() -> None:
        try:
            ledger.reserve(account, 1, message_id="<m@x>")
        except BaseException as exc:  # noqa: BLE001 - handed to the test thread
            outcome.append(exc)

    with postgres_cluster.connect(database) as holder, postgres_cluster.connect() as admin:
        holder.autocommit = False
        holder.execute("SELECT id FROM customers WHERE id = 'kunde1' FOR UPDATE")
        worker = threading.Thread(target=reserve)
        worker.start()
        waiting = wait_for_waiting_backend(admin, database)
        admin.execute("SELECT pg_terminate_backend(%s)", (waiting,))
        worker.join(timeout=30)
        holder.rollback()
    assert len(outcome) == 1 and isinstance(outcome[0], LedgerUnavailable)
    assert str(outcome[0]).startswith("cannot use the ledger database")
    assert ledger.list_sends("account", account.address) == []
    ledger.reserve(account, 1, message_id="<m@x>")  # the pool recovers


def wait_for_waiting_backend(admin: object, database: str) -> int:
    for _ in range(100):
        rows = admin.execute(  # type: ignore[attr-defined]
            "SELECT pid FROM pg_stat_activity WHERE datname = %s "
            "AND application_name = 'sendmail-shim' AND wait_event_type = 'Lock'", (database,),
        ).fetchall()
        if rows:
            return int(rows[0][0])
        time.sleep(0.05)
    raise AssertionError("the reservation never waited for the customer's lock")


def test_postgresql_down_fails_closed_and_recovers_when_it_is_back() -> None:
    with PostgresCluster() as cluster:
        url = cluster.create_database("ledger").replace("postgres@", "postgres:s3cret@")
        ledger = open_ledger(url)
        account = add_account(ledger)
        cluster.stop()
        started = time.monotonic()
        with pytest.raises(LedgerUnavailable) as caught:
            ledger.reserve(account, 1, message_id="<m@x>")
        assert time.monotonic() - started < 15
        line = str(caught.value)
        assert line.startswith("cannot use the ledger database postgresql+psycopg://postgres:***@/ledger")
        assert line.endswith("; try again later")
        assert "s3cret" not in line and "\n" not in line
        assert exit_code_for(caught.value) == 69
        cluster.start()
        ledger.reserve(account, 1, message_id="<m@x>")
        assert len(ledger.list_sends("account", account.address)) == 1


def test_unreachable_postgresql_socket_fails_at_once(tmp_path: Path) -> None:
    ledger = Ledger(f"postgresql://postgres@/ledger?host={tmp_path}&port=5999", busy_timeout=2)
    with pytest.raises(LedgerUnavailable, match="try again later"):
        ledger.find_account("post@kunde.example")


def test_read_only_ledger_file_refuses_writes_with_a_clear_line(sqlite_url: str) -> None:
    ledger = open_ledger(sqlite_url)
    add_account(ledger)
    ledger.close()
    path = Path(ledger.where)
    for leftover in path.parent.glob("ledger.db-*"):
        leftover.unlink()
    path.chmod(0o444)
    seen = probe(sqlite_url)
    expected = (f"LedgerUnavailable 69: cannot write the ledger {path} as uid")
    assert seen["reserve"].startswith(expected), seen
    assert seen["reserve"].endswith("its owner or permissions must let this user write it "
                                    "and its directory")
    assert seen["read"] == "ok"  # reading is still possible


def test_unreadable_ledger_file_cannot_be_opened(sqlite_url: str) -> None:
    ledger = open_ledger(sqlite_url)
    ledger.close()
    Path(ledger.where).chmod(0o000)
    seen = probe(sqlite_url)
    assert seen["read"].startswith(f"LedgerUnavailable 69: cannot open the ledger {ledger.where}")
    assert all("locked" not in line for line in seen.values())


def test_ledger_in_an_unwritable_directory_cannot_be_created(tmp_path: Path) -> None:
    locked = tmp_path / "locked"
    locked.mkdir(mode=0o555)
    seen = probe(f"sqlite:///{locked}/state/ledger.db")
    assert seen["upgrade"] == (
        f"LedgerUnavailable 69: cannot create the ledger {locked}/state/ledger.db "
        f"(Permission denied); check the directory's owner and permissions")
    assert seen["read"].startswith("LedgerNotInitialised 78: the ledger")


def test_a_file_that_is_not_a_database_is_named(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    path.write_bytes(b"this is a text file, not a ledger\n" * 200)
    with pytest.raises(LedgerUnavailable, match=f"{path} is not a ledger database"):
        Ledger(f"sqlite:///{path}").find_account("post@kunde.example")


@pytest.mark.parametrize("url, says", [
    ("mysql://user@localhost/ledger", "driver that is not installed"),
    ("sqlite://", "names no file"),
])
def test_unsupported_ledger_urls_are_configuration_errors(url: str, says: str) -> None:
    with pytest.raises(UnsupportedLedger, match=says) as caught:
        Ledger(url).find_account("post@kunde.example")
    assert exit_code_for(caught.value) == 78


def test_no_ledger_error_line_is_ever_more_than_one_line(sqlite_url: str) -> None:
    ledger = Ledger(sqlite_url)
    for step in (lambda: ledger.find_account("a@b.example"), lambda: ledger.usage("x", "y")):
        with pytest.raises(LedgerError) as caught:
            step()
        assert "\n" not in str(caught.value)


def test_a_caller_behind_a_moving_queue_waits_past_the_busy_timeout(
        postgres_cluster: PostgresCluster, pg_url: str) -> None:
    """Four holders, 0.6 s each, ahead of a reservation with busy_timeout 1: the queue moves, so it waits."""
    ledger = open_ledger(pg_url)
    account = add_account(ledger)
    patient = Ledger(pg_url, busy_timeout=1)
    patient.find_account(account.address)  # connected: the wait below is for the lock alone
    database = postgres_cluster.database_of(pg_url)
    started = time.monotonic()

    def hold(turn: int) -> None:
        time.sleep(0.02 * turn)  # queue up in turn
        with postgres_cluster.connect(database) as holder:
            holder.autocommit = False
            holder.execute("SELECT id FROM customers WHERE id = 'kunde1' FOR UPDATE")
            time.sleep(0.6)
            holder.commit()

    holders = [threading.Thread(target=hold, args=(turn,)) for turn in range(4)]
    for thread in holders:
        thread.start()
    time.sleep(0.2)
    reservation = patient.reserve(account, 1, message_id="<m@x>")
    waited = time.monotonic() - started
    for thread in holders:
        thread.join()
    assert waited >= 1.8  # well past busy_timeout: it stood in a queue that moved
    assert [s.id for s in ledger.list_sends("account", account.address)] == [reservation.id]


def test_a_server_with_no_connection_slot_free_is_waited_for_then_busy() -> None:
    import psycopg

    with PostgresCluster(settings={"max_connections": "6"}) as cluster:
        url = cluster.create_database("ledger")
        ledger = open_ledger(url)
        account = add_account(ledger)
        ledger.close()
        database = cluster.database_of(url)
        holders: list[psycopg.Connection] = []
        while True:  # take every slot there is
            try:
                holders.append(cluster.connect(database))
            except psycopg.OperationalError:
                break
        assert holders
        patient = Ledger(url, busy_timeout=1)
        started = time.monotonic()
        with pytest.raises(LedgerUnavailable) as caught:
            patient.find_account(account.address)
        assert 0.9 <= time.monotonic() - started < 5
        assert str(caught.value).endswith("stayed busy for 1 s; try again later")
        threading.Timer(0.5, holders.pop().close).start()  # a slot frees up while it waits
        patient = Ledger(url, busy_timeout=3)
        assert patient.find_account(account.address) is not None
        patient.close()
        for holder in holders:
            holder.close()
