"""Usage buckets: the invariant of windows.py holds, the cost stays flat, an old ledger upgrades in place."""

from __future__ import annotations

import itertools
import os
import tempfile
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sendmail_shim import queue
from sendmail_shim.config import LedgerConfig
from sendmail_shim.ledger import Ledger, LimitReached, schema
from sendmail_shim.ledger.windows import COUNTED_STATES, GRAINS
from tests.ledger.common import NOON, add_account, limits, open_ledger

US = 1_000_000
DAY = 86400
ROOMY = limits(["1000000 messages / 5m", "1000000 recipients / 24h", "1000000 recipients / 30d"],
               ["1000000 messages / 1h"])


def buckets_in_table(ledger: Ledger) -> Counter[tuple[str, str, int, int, str]]:
    with ledger.transaction(write=False) as tx:
        rows = tx.rows("SELECT scope, subject, grain_us, start_us, messages, recipients FROM usage_buckets")
    found: Counter[tuple[str, str, int, int, str]] = Counter()
    for scope, subject, grain, start, messages, recipients in rows:
        found[(scope, subject, int(grain), int(start), "messages")] += int(messages)
        found[(scope, subject, int(grain), int(start), "recipients")] += int(recipients)
    return +found  # empty buckets are as good as none


def buckets_from_sends(ledger: Ledger) -> Counter[tuple[str, str, int, int, str]]:
    """What the invariant says the buckets hold, recomputed from the send log and the resets."""
    with ledger.transaction(write=False) as tx:
        sends = tx.rows("SELECT id, account, customer_id, recipients, at_us, state FROM sends")
        resets = {(scope, subject): int(upto) for scope, subject, upto in
                  tx.rows("SELECT scope, subject, max(upto_send_id) FROM usage_resets GROUP BY scope, subject")}
    expected: Counter[tuple[str, str, int, int, str]] = Counter()
    for send_id, account, customer, recipients, at_us, state in sends:
        if state not in COUNTED_STATES:
            continue
        for scope, subject in (("account", account), ("customer", customer)):
            if int(send_id) <= resets.get((scope, subject), 0):
                continue
            for grain in GRAINS:
                start = int(at_us) // grain * grain
                expected[(scope, subject, grain, start, "messages")] += 1
                expected[(scope, subject, grain, start, "recipients")] += int(recipients)
    return expected


# --------------------------------------------------------------------------- the invariant

_customers = itertools.count(1)
operation = st.one_of(
    st.tuples(st.just("send"), st.integers(0, 1), st.integers(1, 4),
              st.sampled_from(["sent", "queued", "released", "unsettled", "queued-then-released"])),
    st.tuples(st.just("reset"), st.integers(0, 2), st.just(0), st.just("-")),
    st.tuples(st.just("timeout"), st.just(0), st.just(0), st.just("-")),
    st.tuples(st.just("late"), st.integers(0, 3), st.just(0), st.sampled_from(["sent", "released"])),
)
# Steps of seconds to a day, so that sends fall in the same and in different buckets of every grain.
step = st.sampled_from([0, 1, 59, 61, 3599, 3601, 86399, 86401])


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(plan=st.lists(st.tuples(step, operation), min_size=5, max_size=40))
def test_the_buckets_always_hold_exactly_the_sends_that_count(ledger_url: str, plan: list) -> None:
    ledger = shared(ledger_url)
    customer = f"inv{next(_customers)}"
    accounts = [add_account(ledger, f"site{i}@{customer}.example", customer) for i in range(2)]
    now, unsettled = NOON, []
    for seconds, (kind, who, size, outcome) in plan:
        now += seconds
        if kind == "send":
            reservation = ledger.reserve(accounts[who], size, message_id="<m>", now=now)
            if outcome == "queued-then-released":
                ledger.settle(reservation, "queued")
                outcome = "released"
            if outcome == "unsettled":
                unsettled.append(reservation)
            else:
                ledger.settle(reservation, outcome)
        elif kind == "reset":
            scope, subject = ("customer", customer) if who == 2 else ("account", accounts[who].address)
            ledger.reset_usage(scope, subject, reason="test", now=now)
        elif kind == "timeout":
            now += ledger.rates.settings.reservation_timeout + 1
            ledger.resolve_stale(now=now)
        elif unsettled:
            ledger.settle(unsettled[who % len(unsettled)], outcome)  # late, perhaps after its timeout
    assert buckets_in_table(ledger) == buckets_from_sends(ledger)


_ledgers: dict[str, Ledger] = {}


def shared(url: str) -> Ledger:
    if url not in _ledgers:
        _ledgers[url] = Ledger(url, limits=ROOMY, settings=LedgerConfig(url=url, reservation_timeout=600))
        _ledgers[url].upgrade()
    return _ledgers[url]


# --------------------------------------------------------------------------- cost flat with use


@pytest.fixture
def fast_sqlite_url() -> Iterator[str]:
    """An SQLite ledger in memory-backed storage when there is some: the test makes 5,000 commits."""
    base = "/dev/shm" if os.path.isdir("/dev/shm") and os.access("/dev/shm", os.W_OK) else None
    with tempfile.TemporaryDirectory(dir=base) as directory:
        yield f"sqlite:///{directory}/ledger.db"


def vm_steps(ledger: Ledger, action: Callable[[], object]) -> int:
    """SQLite virtual-machine instructions (in tens) that ``action`` makes the ledger execute."""
    backend = ledger.store.backend()
    with backend.transaction(write=False):
        pass  # one idle connection in the pool: the next transaction takes it
    connection = backend._idle[-1][1]  # type: ignore[attr-defined]
    steps = [0]

    def count() -> int:
        steps[0] += 1
        return 0

    connection.set_progress_handler(count, 10)
    try:
        action()
    finally:
        connection.set_progress_handler(None, 10)
    return steps[0]


def steady_sender(ledger: Ledger, address: str, customer: str, sends: int) -> object:
    """An account with ``sends`` single-recipient messages spread evenly over the last 30 days."""
    account = add_account(ledger, address, customer)
    start, span = NOON - 30 * DAY + 60, 30 * DAY - 120
    for i in range(sends):
        ledger.settle(ledger.reserve(account, 1, message_id=f"<{i}>", now=start + i * span / sends), "sent")
    return account


def test_the_work_of_a_reservation_does_not_grow_with_the_sends_in_its_window(fast_sqlite_url: str) -> None:
    """Counted in SQLite VM instructions, which do not depend on the machine's load: five times
    the sends, the same work; the send log alone would cost five times as much to sum."""
    ledger = open_ledger(fast_sqlite_url)  # the provider's rules: 5000 recipients / 30 days
    fresh = add_account(ledger, "fresh@kunde.example", "kunde1")
    some = steady_sender(ledger, "some@shop.example", "kunde2", 1000)
    busy = steady_sender(ledger, "busy@travel.example", "kunde3", 4990)
    assert [u.used for u in ledger.usage("account", busy.address, now=NOON)][-1] == 4990

    def cost(account: object) -> int:
        return min(vm_steps(ledger, lambda: ledger.settle(
            ledger.reserve(account, 1, message_id="<x>", now=NOON), "released")) for _ in range(3))

    fresh_cost, some_cost, busy_cost = cost(fresh), cost(some), cost(busy)
    assert busy_cost <= 1.15 * some_cost, (some_cost, busy_cost)
    assert busy_cost <= 2 * fresh_cost, (fresh_cost, busy_cost)  # a bounded number of bucket rows more
    with ledger.transaction(write=False) as tx:
        counted = tx.rows("SELECT count(*) FROM sends WHERE account = :a", {"a": busy.address})[0][0]
    assert counted == 4990 + 3  # the released ones are in the log, and cost nothing either
    for i in range(10):  # and it still refuses exactly at the limit
        ledger.settle(ledger.reserve(busy, 1, message_id=f"<last {i}>", now=NOON + i), "sent")
    with pytest.raises(LimitReached, match="5000 recipients per 30 days"):
        ledger.reserve(busy, 1, message_id="<over>", now=NOON + 11)


def test_a_refusal_finds_the_exact_next_free_instant_through_the_buckets(ledger: Ledger) -> None:
    account = add_account(ledger)
    sends = [(NOON - 2 * DAY + 3661.25, 240),  # older than 24 h
             (NOON - DAY + 3607.5, 240),  # inside an hour bucket of the 24 h window, not at its edge
             (NOON - DAY + 7200.25, 240), (NOON - 3600 + 0.5, 240), (NOON - 400, 240), (NOON - 1, 9)]
    for at, size in sends:
        ledger.settle(ledger.reserve(account, size, message_id="<m>", now=at), "sent")
    with pytest.raises(LimitReached) as caught:
        ledger.reserve(account, 100, message_id="<big>", now=NOON)
    # 969 of "1000 recipients / 24h" in use; 100 more need 69 freed: the send at NOON - DAY + 3607.5.
    assert (caught.value.rule.window_seconds, caught.value.used) == (DAY, 969)
    assert caught.value.next_free_at == NOON + 3607.5
    with pytest.raises(LimitReached):
        ledger.reserve(account, 100, message_id="<early>", now=NOON + 3607.5 - 1e-6)
    ledger.reserve(account, 100, message_id="<on time>", now=NOON + 3607.5)


# --------------------------------------------------------------------------- upgrading a 0002 ledger


def make_0002_ledger(url: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """A ledger as the previous version left it: schema 0002 and rows written the way it wrote them."""
    monkeypatch.setattr(schema, "MIGRATIONS", ("0001_initial", "0002_queue"))
    Ledger(url).upgrade()
    monkeypatch.undo()
    t = round(NOON * US)
    rows = [  # (account, customer, recipients, seconds before NOON, state)
        *[("a@kunde.example", "kunde1", 2, 3600 * i + 30, "sent") for i in range(30)],
        *[("a@kunde.example", "kunde1", 5, 60 * i + 10, "released") for i in range(5)],
        ("a@kunde.example", "kunde1", 3, 20, "reserved"), ("a@kunde.example", "kunde1", 1, 40, "queued"),
        *[("b@kunde.example", "kunde1", 1, 100 + i, "sent") for i in range(4)],
        ("b@kunde.example", "kunde1", 7, 10, "sent"),
    ]
    backend = Ledger(url).store.backend()
    with backend.transaction(write=True) as tx:
        tx.run("INSERT INTO customers (id, created_at) VALUES ('kunde1', 0)")
        tx.run("INSERT INTO domains (domain, customer_id) VALUES ('kunde.example', 'kunde1')")
        tx.run("INSERT INTO unix_users (unix_user, customer_id) VALUES ('web1', 'kunde1')")
        for address in ("a@kunde.example", "b@kunde.example"):
            tx.run("INSERT INTO accounts (address, domain, customer_id, authenticated, blocked, created_at, "
                   "updated_at) VALUES (:a, 'kunde.example', 'kunde1', 1, 0, 0, 0)", {"a": address})
        for account, customer, recipients, ago, state in sorted(rows, key=lambda r: -r[3]):
            tx.run("INSERT INTO sends (account, customer_id, message_id, recipients, at_us, state) "
                   "VALUES (:a, :c, '<m>', :n, :t, :s)", {"a": account, "c": customer, "n": recipients,
                                                         "t": t - ago * US, "s": state})
        # b was reset after its first four sends: only its last one counts.
        upto = tx.rows("SELECT max(id) FROM sends WHERE account = 'b@kunde.example' AND recipients = 1")[0][0]
        tx.run("INSERT INTO usage_resets (scope, subject, upto_send_id, at, reason) "
               "VALUES ('account', 'b@kunde.example', :u, 0, 'false alarm')", {"u": upto})
        tx.run("INSERT INTO decisions (at, verdict, code, account) VALUES (1, 'sent', 0, 'a@kunde.example')")
        tx.run("INSERT INTO queue_messages (id, kind, state, send_id, sender, data, created_at, attempts, "
               "next_attempt_at) VALUES ('q1', 'message', 'queued', "
               "(SELECT id FROM sends WHERE state = 'queued'), 'a@kunde.example', :d, 0, 0, 0)",
               {"d": b"Subject: x\r\n\r\nx\r\n"})


def test_db_upgrade_brings_a_0002_ledger_to_0003_in_place_with_its_usage(
        ledger_url: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from click.testing import CliRunner

    from sendmail_shim.cli import cli
    from tests.ledger.common import write_config

    make_0002_ledger(ledger_url, monkeypatch)
    before = Ledger(ledger_url).schema_status()
    assert before.pending == ("0003_store", "0004_default_sender", "0005_unconfirmed", "0006_send_holder",
                              "0007_operations", "0008_abuse")
    config = write_config(tmp_path, ledger_url)
    result = CliRunner().invoke(cli, ["--config", str(config), "db", "upgrade", "--json"])
    assert result.exit_code == 0, result.output
    assert ('"applied": [\n    "0003_store",\n    "0004_default_sender",\n    "0005_unconfirmed",\n'
            '    "0006_send_holder",\n    "0007_operations",\n    "0008_abuse"\n  ]' in result.output)
    ledger = Ledger(ledger_url)
    assert ledger.schema_status().pending == ()
    kept = queue.show(ledger, "q1")  # the queued message is still waiting, with no unanswered dot
    assert (kept.state, kept.unconfirmed) == ("queued", 0)
    used = {(u.metric, u.window_seconds): u.used for u in ledger.usage("account", "a@kunde.example", now=NOON)}
    # 30 sent of 2, one an hour, one reserved of 3 and one queued of 1; the released ones never count.
    assert used == {("messages", 300): 3, ("recipients", 300): 2 + 3 + 1, ("recipients", DAY): 2 * 24 + 4,
                    ("recipients", 30 * DAY): 2 * 30 + 4}
    assert [u.used for u in ledger.usage("account", "b@kunde.example", now=NOON)] == [1, 7, 7, 7]
    customer = ledger.usage("customer", "kunde1", now=NOON)
    # The last hour: a's three that count, and all five of b's (its reset was of the account only).
    assert [u.used for u in customer] == [3 + 5, 6 + 4 + 7]
    assert buckets_in_table(ledger) == buckets_from_sends(ledger)
    assert len(ledger.list_sends("account", "a@kunde.example")) == 37
    assert ledger.customer_of_user("web1") == "kunde1" and len(ledger.recent_decisions()) == 1
    with ledger.transaction(write=False) as tx:
        assert tx.rows("SELECT id, state FROM queue_messages") == [("q1", "queued")]
    assert CliRunner().invoke(cli, ["--config", str(config), "db", "upgrade"]).output.startswith(
        "the ledger is up to date")
