"""Creating and upgrading the ledger; what a missing or foreign schema says."""

from __future__ import annotations

import json
import os
import sqlite3
import stat
from pathlib import Path

import pytest

from sendmail_shim.exitcodes import exit_code_for
from sendmail_shim.ledger import MIGRATIONS, Ledger, LedgerNotInitialised
from tests.ledger.common import add_account, open_ledger, run_python


def test_upgrade_creates_directory_and_private_file(tmp_path: Path) -> None:
    path = tmp_path / "var" / "lib" / "sendmail-shim" / "ledger.db"
    old_umask = os.umask(0)  # the modes must not depend on the caller's umask
    try:
        applied = Ledger(f"sqlite:///{path}").upgrade()
    finally:
        os.umask(old_umask)
    assert applied == list(MIGRATIONS)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o750


def test_upgrade_is_repeatable_and_keeps_data(ledger_url: str) -> None:
    ledger = open_ledger(ledger_url)
    add_account(ledger)
    assert ledger.upgrade() == []
    assert ledger.find_account("post@kunde.example") is not None
    status = ledger.schema_status()
    assert status.applied == MIGRATIONS and status.pending == () and status.unknown == ()


def test_sqlite_ledger_is_in_wal_mode(sqlite_url: str) -> None:
    ledger = open_ledger(sqlite_url)
    path = ledger.where
    with sqlite3.connect(path) as connection:
        assert connection.execute("PRAGMA journal_mode").fetchone()[0] == "wal"


def test_missing_sqlite_ledger_says_run_upgrade_and_creates_nothing(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    with pytest.raises(LedgerNotInitialised) as caught:
        Ledger(f"sqlite:///{path}").find_account("post@kunde.example")
    assert str(caught.value) == f"the ledger {path} does not exist; run: sendmail-shim db upgrade"
    assert exit_code_for(caught.value) == 78
    assert not path.exists()


def test_empty_postgres_database_says_run_upgrade(pg_url: str) -> None:
    with pytest.raises(LedgerNotInitialised, match="not initialised; run: sendmail-shim db upgrade"):
        Ledger(pg_url).customer_of_user("web1")


def test_schema_from_a_newer_program_is_refused(ledger_url: str) -> None:
    ledger = open_ledger(ledger_url)
    with ledger.transaction(write=True) as tx:
        tx.run("INSERT INTO schema_migrations (name, applied_at) VALUES ('9999_future', 0)")
    fresh = Ledger(ledger_url)
    with pytest.raises(LedgerNotInitialised, match="newer sendmail-shim .*9999_future"):
        fresh.find_account("post@kunde.example")


def test_older_schema_asks_for_upgrade(ledger_url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    open_ledger(ledger_url)
    # This program now knows a migration the ledger has not had yet.
    monkeypatch.setattr("sendmail_shim.ledger.schema.MIGRATIONS", (*MIGRATIONS, "0099_next"))
    with pytest.raises(LedgerNotInitialised,
                       match=r"older than this program \(missing 0099_next\); run: sendmail-shim db"):
        Ledger(ledger_url).find_account("post@kunde.example")


def test_importing_accounts_and_ledger_loads_no_sqlalchemy() -> None:
    result = run_python(
        "import sys, sendmail_shim.accounts, sendmail_shim.ledger\n"
        "print(sorted(m for m in sys.modules if m.split('.')[0] in ('sqlalchemy', 'sqlite3', 'psycopg')))"
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_sqlite_hot_path_never_imports_sqlalchemy(sqlite_url: str) -> None:
    ledger = open_ledger(sqlite_url)
    add_account(ledger, users=["web1"])
    result = run_python(
        "import json, sys\n"
        "from sendmail_shim.accounts import Caller, authorise\n"
        "from sendmail_shim.ledger import Ledger\n"
        f"ledger = Ledger({sqlite_url!r})\n"
        "account = authorise(ledger, 'post@kunde.example', 'kunde.example', Caller(1000, 'web1'))\n"
        "ledger.settle(ledger.reserve(account, 3, message_id='<m@x>'), 'sent')\n"
        "ledger.record_decision(verdict='sent', code=0, account=account.address)\n"
        "print(json.dumps(any(m.startswith('sqlalchemy') for m in sys.modules)))"
    )
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout) is False
    assert [s.recipients for s in ledger.list_sends("account", "post@kunde.example")] == [3]


def test_sqlalchemy_path_on_sqlite_gives_the_same_answers(sqlite_url: str) -> None:
    """The SQL runs through either driver; the SQLAlchemy one is used by upgrade and PostgreSQL."""
    direct = open_ledger(sqlite_url)
    account = add_account(direct)
    via = Ledger(sqlite_url, via_sqlalchemy=True)
    via.reserve(account, 2, message_id="<a@x>", now=1000.0)
    direct.reserve(account, 2, message_id="<b@x>", now=1001.0)
    assert via.usage("account", account.address, now=1002.0) == \
        direct.usage("account", account.address, now=1002.0)
    assert [u.used for u in via.usage("account", account.address, now=1002.0)] == [2, 4, 4, 4]
