"""Default senders in the ledger: per customer and per Unix-user binding, and the 0004 migration."""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from sendmail_shim.ledger import MIGRATIONS, Conflict, Ledger, UnknownSubject
from tests.ledger.common import add_account, open_ledger
from tests.support.shim import ADMIN, dump_toml

BEFORE_0004 = ("0001_initial", "0002_queue", "0003_store")


def test_a_bound_user_sends_as_its_customers_default(ledger: Ledger) -> None:
    add_account(ledger, users=["web1", "web2"])
    assert ledger.default_sender("web1") is None
    customer = ledger.set_default_sender("kunde1", "Post@Kunde.example", actor="admin")
    assert customer.default_sender == "post@kunde.example"
    assert (ledger.default_sender("web1"), ledger.default_sender("web2")) == ("post@kunde.example",) * 2
    assert ledger.default_sender("nobody-bound") is None
    audit = ledger.audit_log(subject="kunde1")
    assert audit[0].action == "customer default-sender" and audit[0].actor == "admin"
    assert audit[0].detail == "default sender post@kunde.example"


def test_a_bindings_own_default_wins_over_the_customers(ledger: Ledger) -> None:
    add_account(ledger, users=["web1", "web2"])
    ledger.add_account("shop@kunde.example", "kunde1", authenticated=True)
    ledger.set_default_sender("kunde1", "post@kunde.example")
    customer = ledger.set_default_sender("kunde1", "shop@kunde.example", unix_user="web2")
    assert customer.user_default_senders == (("web2", "shop@kunde.example"),)
    assert ledger.default_sender("web1") == "post@kunde.example"
    assert ledger.default_sender("web2") == "shop@kunde.example"
    ledger.set_default_sender("kunde1", None)  # the customer's cleared: web2 keeps its own
    assert (ledger.default_sender("web1"), ledger.default_sender("web2")) == (None, "shop@kunde.example")


def test_a_default_sender_must_be_one_of_the_customers_accounts(ledger: Ledger) -> None:
    add_account(ledger, users=["web1"])
    add_account(ledger, "post@other.example", "kunde2", users=["web9"])
    with pytest.raises(Conflict, match="post@other.example is an account of customer kunde2, not of kunde1"):
        ledger.set_default_sender("kunde1", "post@other.example")
    with pytest.raises(UnknownSubject, match="not a registered account"):
        ledger.set_default_sender("kunde1", "nobody@kunde.example")
    with pytest.raises(UnknownSubject, match="web9 is not bound to customer kunde1"):
        ledger.set_default_sender("kunde1", "post@kunde.example", unix_user="web9")
    with pytest.raises(UnknownSubject, match="customer nope does not exist"):
        ledger.set_default_sender("nope", "post@kunde.example")
    assert ledger.get_customer("kunde1").default_sender is None
    assert ledger.default_sender("web9") is None


def test_customer_add_sets_it_in_the_same_transaction(ledger: Ledger) -> None:
    add_account(ledger, users=["web1"])
    with pytest.raises(UnknownSubject):
        ledger.add_customer("kunde1", ["web3"], default_sender="missing@kunde.example")
    assert ledger.get_customer("kunde1").unix_users == ("web1",)  # nothing half-done
    customer = ledger.add_customer("kunde1", ["web3"], default_sender="post@kunde.example")
    assert customer.unix_users == ("web1", "web3") and customer.default_sender == "post@kunde.example"


def test_removing_the_account_clears_it_everywhere(ledger: Ledger) -> None:
    add_account(ledger, users=["web1", "web2"])
    ledger.set_default_sender("kunde1", "post@kunde.example")
    ledger.set_default_sender("kunde1", "post@kunde.example", unix_user="web2")
    ledger.remove_account("post@kunde.example", actor="admin")
    customer = ledger.get_customer("kunde1")
    assert (customer.default_sender, customer.user_default_senders) == (None, ())
    assert ledger.default_sender("web2") is None
    assert "cleared: the account was removed" in (ledger.audit_log(subject="kunde1")[0].detail or "")


def _old_ledger(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ledger as the release before default senders made it, with a customer in it."""
    with monkeypatch.context() as patched:
        patched.setattr("sendmail_shim.ledger.schema.MIGRATIONS", BEFORE_0004)
        old = open_ledger(url)
        with old.store.backend().transaction(write=True) as tx:  # the rows that release's commands wrote
            tx.run("INSERT INTO customers (id, created_at) VALUES ('kunde1', 0)")
            tx.run("INSERT INTO unix_users (unix_user, customer_id) VALUES ('web1', 'kunde1')")
            tx.run("INSERT INTO domains (domain, customer_id) VALUES ('kunde.example', 'kunde1')")
            tx.run("INSERT INTO accounts (address, domain, customer_id, authenticated, blocked, created_at, "
                   "updated_at) VALUES ('post@kunde.example', 'kunde.example', 'kunde1', 1, 0, 0, 0)")
        assert old.schema_status().applied == BEFORE_0004
        old.close()


def test_upgrade_adds_the_columns_to_an_existing_ledger(ledger_url: str,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    _old_ledger(ledger_url, monkeypatch)
    ledger = Ledger(ledger_url)
    pending = ("0004_default_sender", "0005_unconfirmed", "0006_send_holder", "0007_operations", "0008_abuse")
    assert ledger.schema_status().pending == pending
    assert ledger.upgrade() == list(pending)
    assert ledger.find_account("post@kunde.example") is not None  # the data stayed
    assert ledger.set_default_sender("kunde1", "post@kunde.example").default_sender == "post@kunde.example"
    assert ledger.default_sender("web1") == "post@kunde.example"
    assert ledger.schema_status().applied == MIGRATIONS


def test_db_upgrade_command_upgrades_in_place(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path}/ledger.db"
    _old_ledger(url, monkeypatch)
    config = tmp_path / "config.toml"
    config.write_text(dump_toml({"upstream": {"host": "127.0.0.1"}, "ledger": {"url": url}, "spf": {"enabled": False}}))
    env = dict(os.environ, SENDMAIL_SHIM_CONFIG=str(config))

    def admin(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([ADMIN, *args], capture_output=True, text=True, env=env, timeout=60)

    refused = admin("customer", "show", "kunde1")
    assert refused.returncode == 78
    assert ("missing 0004_default_sender, 0005_unconfirmed, 0006_send_holder, 0007_operations, 0008_abuse); "
            "run: sendmail-shim db upgrade" in refused.stderr)
    upgraded = json.loads(admin("db", "upgrade", "--json").stdout)
    assert upgraded["applied"] == ["0004_default_sender", "0005_unconfirmed", "0006_send_holder",
                                   "0007_operations", "0008_abuse"]
    assert upgraded["schema"] == list(MIGRATIONS)
    assert admin("customer", "set", "kunde1", "--default-sender", "post@kunde.example").returncode == 0
    shown = json.loads(admin("customer", "show", "kunde1", "--json").stdout)
    assert shown["default_sender"] == "post@kunde.example" and shown["unix_users"] == ["web1"]
