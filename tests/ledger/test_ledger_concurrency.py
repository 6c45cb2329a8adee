"""Exact limits under real concurrency: separate processes, SQLite and PostgreSQL.

Every test uses the real clock (no injected time), so PostgreSQL's own clock
decides "now" for every process, as it does for a fleet of web servers.
"""

from __future__ import annotations

import json
import subprocess
import threading
import time
from pathlib import Path

from sendmail_shim.ledger import Ledger, LedgerError, LimitReached
from sendmail_shim.limits import Rule
from tests.ledger.common import (
    PYTHON,
    REPO,
    add_account,
    limits,
    open_ledger,
    window_peaks,
    write_config,
)
from tests.ledger.workers import FromUrl, run_processes

ROOMY_CUSTOMER = ["100000 messages / 1h", "100000 recipients / 1h"]


def assert_never_over(ledger: Ledger, scope: str, subject: str,
                      rules: tuple[Rule, ...]) -> None:
    sends = ledger.list_sends(scope, subject, counted_only=True)
    for rule in rules:
        assert window_peaks(sends, rule) <= rule.limit, f"{subject} over {rule}"


def test_eight_processes_racing_for_one_account_get_exactly_the_limit(ledger_url: str) -> None:
    rules = limits(["20 messages / 1h"], ROOMY_CUSTOMER)
    ledger = open_ledger(ledger_url, rules)
    account = add_account(ledger)
    total, errors = run_processes(FromUrl(ledger_url, rules), [([account.address], 8)] * 8)
    assert errors == []
    assert total == {"accepted": 20, "limit": 44}
    assert len(ledger.list_sends("account", account.address, counted_only=True)) == 20
    assert_never_over(ledger, "account", account.address, rules.account)


def test_fifty_submissions_for_the_last_unit_accept_exactly_one(ledger_url: str) -> None:
    rules = limits(["25 messages / 5m"], ROOMY_CUSTOMER)
    ledger = open_ledger(ledger_url, rules)
    account = add_account(ledger)
    for i in range(24):
        ledger.reserve(account, 1, message_id=f"<before {i}>")
    total, errors = run_processes(FromUrl(ledger_url, rules), [([account.address], 1)] * 50)
    assert errors == []
    assert total == {"accepted": 1, "limit": 49}
    assert len(ledger.list_sends("account", account.address, counted_only=True)) == 25


def test_the_customer_limit_holds_across_accounts_racing_in_parallel(ledger_url: str) -> None:
    rules = limits(["8 messages / 1h"], ["20 messages / 1h"])
    ledger = open_ledger(ledger_url, rules)
    addresses = [add_account(ledger, f"site{i}@kunde.example").address for i in range(4)]
    plan = [([addresses[i % 4]], 6) for i in range(8)]  # 12 attempts per account
    total, errors = run_processes(FromUrl(ledger_url, rules), plan)
    assert errors == []
    assert total == {"accepted": 20, "limit": 28}
    for address in addresses:
        assert_never_over(ledger, "account", address, rules.account)
    assert_never_over(ledger, "customer", "kunde1", rules.customer)


def test_customers_do_not_wait_for_each_other_on_postgresql(pg_url: str) -> None:
    """Serialisation is per customer: each of eight customers gets its own full limit."""
    rules = limits(["10 messages / 1h"], ROOMY_CUSTOMER)
    ledger = open_ledger(pg_url, rules)
    addresses = [add_account(ledger, f"post@kunde{i}.example", f"kunde{i}").address
                 for i in range(8)]
    plan = [([address], 15) for address in addresses]
    total, errors = run_processes(FromUrl(pg_url, rules), plan)
    assert errors == []
    assert total == {"accepted": 80, "limit": 40}


def test_two_servers_with_their_own_configs_share_one_postgresql(pg_url: str,
                                                                 tmp_path: Path) -> None:
    account_rules, customer_rules = ["12 messages / 1h"], ["30 messages / 1h"]
    ledger = open_ledger(pg_url, limits(account_rules, customer_rules))
    addresses = [add_account(ledger, f"site{i}@kunde.example").address for i in range(4)]
    servers = []
    start_at = time.time() + 4  # both interpreters up and connected by then
    for name, mine in (("a", addresses[:2]), ("b", addresses[2:])):
        directory = tmp_path / f"server-{name}"
        directory.mkdir()
        config = write_config(directory, pg_url, account_rules=account_rules,
                              customer_rules=customer_rules, busy_timeout=20 if name == "a" else 15)
        servers.append(subprocess.Popen(
            [PYTHON, "-m", "tests.ledger.workers", "--config", str(config),
             "--accounts", ",".join(mine), "--attempts", "10", "--processes", "4",
             "--start-at", str(start_at)],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    reports = []
    for server in servers:
        out, err = server.communicate(timeout=120)
        assert server.returncode == 0, err
        reports.append(json.loads(out))
    assert [r["errors"] for r in reports] == [[], []]
    accepted = sum(r["outcome"].get("accepted", 0) for r in reports)
    refused = sum(r["outcome"].get("limit", 0) for r in reports)
    # 80 attempts; each account may send 12, the customer 30 in all.
    assert (accepted, refused) == (30, 50)
    assert_never_over(ledger, "customer", "kunde1", limits(customer=customer_rules).customer)
    for address in addresses:
        assert_never_over(ledger, "account", address, limits(account_rules).account)


def test_threads_sharing_one_ledger_get_exactly_the_limit(ledger_url: str) -> None:
    """As in a long-running service: one Ledger, many threads at once."""
    rules = limits(["30 messages / 1h"], ROOMY_CUSTOMER)
    ledger = open_ledger(ledger_url, rules)
    account = add_account(ledger)
    outcomes: list[str] = []
    start = threading.Barrier(12)

    def worker() -> None:
        start.wait()
        for i in range(5):
            try:
                ledger.settle(ledger.reserve(account, 1, message_id=f"<{i}>"), "sent")
                outcomes.append("accepted")
            except LimitReached:
                outcomes.append("limit")
            except LedgerError as exc:
                outcomes.append(str(exc))

    threads = [threading.Thread(target=worker) for _ in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=60)
    assert sorted(set(outcomes)) == ["accepted", "limit"]
    assert outcomes.count("accepted") == 30
    assert_never_over(ledger, "account", account.address, rules.account)
