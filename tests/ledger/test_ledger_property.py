"""Property: the ledger decides exactly as a brute-force sliding-window checker.

Random arrivals (times, accounts, recipient counts, outcomes, usage resets) are
replayed against the ledger and against a model that keeps every counted send
in a list and sums windows by brute force. Every decision must agree: never
over a limit, never refusing what fits, and the promised "next message
possible at" instant must be the earliest at which the message fits.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from sendmail_shim.ledger import AccountEntry, Ledger, LimitNeverFits, LimitReached
from sendmail_shim.limits import Rule
from tests.ledger.common import NOON, add_account, limits, open_ledger

# Shaped like the provider's defaults (messages and recipients over the same window, longer
# windows for recipients), scaled to seconds.
RULES = limits(["3 messages / 10s", "6 recipients / 10s", "10 recipients / 30s"],
               ["5 messages / 20s", "14 recipients / 40s"])
LARGEST_FIT = min(r.limit for r in RULES.account + RULES.customer if r.metric == "recipients")
US = 1_000_000
_customers = itertools.count(1)
Scenario = list[tuple[int, str, int, int, str]]  # (at ms, kind, who, size, outcome)

# Arrival times in milliseconds within a minute. Most fall on a 2.5 s grid that divides every
# window, so sends often sit exactly on a window's edge; arbitrary milliseconds test the rest.
on_grid = st.integers(0, 24).map(lambda k: k * 2_500)
arrival = st.one_of(on_grid, on_grid, on_grid, st.integers(0, 60_000))
# Mostly single recipients, so that the message rules bind as often as the recipient rules.
sizes = st.one_of(st.just(1), st.just(1), st.integers(1, LARGEST_FIT + 1))
send = st.tuples(arrival, st.just("send"), st.integers(0, 1), sizes,
                 st.sampled_from(["sent", "queued", "released", "unsettled"]))
reset = st.tuples(arrival, st.just("reset"), st.integers(0, 2), st.just(0), st.just("-"))
scenarios = st.lists(st.one_of(*[send] * 8, reset), min_size=10, max_size=80).map(sorted)


@dataclass
class Model:
    """Every counted send as (id, at_us, account index, recipients); resets as id thresholds."""

    sends: list[tuple[int, int, int, int]] = field(default_factory=list)
    reset_after: dict[str, int] = field(default_factory=dict)
    last_id: int = 0

    def used(self, rule: Rule, scope: str, account: int, at_us: int) -> int:
        key = f"account{account}" if scope == "account" else "customer"
        threshold = self.reset_after.get(key, 0)
        start = at_us - rule.window_seconds * US
        return sum(1 if rule.metric == "messages" else size
                   for send_id, when, who, size in self.sends
                   if send_id > threshold and start < when
                   and (scope == "customer" or who == account))

    def fits(self, size: int, account: int, at_us: int) -> bool:
        return all(
            self.used(rule, scope, account, at_us) + (1 if rule.metric == "messages" else size)
            <= rule.limit
            for scope, rules in (("account", RULES.account), ("customer", RULES.customer))
            for rule in rules
        )

    def earliest_fit(self, size: int, account: int, now_us: int) -> int:
        """Usage only drops when a send leaves a window: try those instants in order."""
        windows = {r.window_seconds * US for r in RULES.account + RULES.customer}
        candidates = sorted({now_us} | {when + w for _, when, _, _ in self.sends for w in windows})
        return next(c for c in candidates if c >= now_us and self.fits(size, account, c))


def replay(ledger: Ledger, scenario: Scenario) -> None:
    customer = f"prop{next(_customers)}"
    accounts: list[AccountEntry] = [
        add_account(ledger, f"site{i}@{customer}.example", customer) for i in range(2)
    ]
    model = Model()
    for at_ms, kind, who, size, outcome in scenario:
        now_us = round(NOON * US) + at_ms * 1000
        if kind == "reset":
            scope = "customer" if who == 2 else "account"
            subject = customer if who == 2 else accounts[who].address
            ledger.reset_usage(scope, subject, reason="property test", now=now_us / US)
            model.reset_after["customer" if who == 2 else f"account{who}"] = model.last_id
            continue
        check_one_send(ledger, model, accounts[who], who, size, outcome, now_us)
    for i, account in enumerate(accounts):
        counted = [s.id for s in ledger.list_sends("account", account.address, counted_only=True)]
        assert counted == [send_id for send_id, _, who, _ in model.sends if who == i]


def check_one_send(ledger: Ledger, model: Model, account: AccountEntry, who: int, size: int,
                   outcome: str, now_us: int) -> None:
    if size > LARGEST_FIT:
        try:
            ledger.reserve(account, size, message_id="<too big>", now=now_us / US)
        except LimitNeverFits:
            return
        raise AssertionError(f"{size} recipients can never fit, yet were accepted")
    if model.fits(size, who, now_us):
        reservation = ledger.reserve(account, size, message_id="<fits>", now=now_us / US)
        assert round(reservation.at * US) == now_us
        model.last_id = reservation.id
        if outcome != "unsettled":
            ledger.settle(reservation, outcome)
        if outcome != "released":
            model.sends.append((reservation.id, now_us, who, size))
        return
    try:
        ledger.reserve(account, size, message_id="<over>", now=now_us / US)
    except LimitReached as refusal:
        assert round(refusal.next_free_at * US) == model.earliest_fit(size, who, now_us)
        assert refusal.used == model.used(refusal.rule, refusal.scope, who, now_us)
        return
    raise AssertionError("accepted a message that goes over a limit")


SHARED_LEDGER = [HealthCheck.function_scoped_fixture, HealthCheck.too_slow]


@settings(max_examples=300, deadline=None, suppress_health_check=SHARED_LEDGER)
@given(scenario=scenarios)
def test_sqlite_decides_like_brute_force(sqlite_url: str, scenario: Scenario) -> None:
    replay(shared_ledger(sqlite_url), scenario)


@settings(max_examples=60, deadline=None, suppress_health_check=SHARED_LEDGER)
@given(scenario=scenarios)
def test_postgresql_decides_like_brute_force(pg_url: str, scenario: Scenario) -> None:
    replay(shared_ledger(pg_url), scenario)


_ledgers: dict[str, Ledger] = {}


def shared_ledger(url: str) -> Ledger:
    """One ledger per test function; each example works on a customer of its own."""
    if url not in _ledgers:
        _ledgers[url] = open_ledger(url, RULES)
    return _ledgers[url]
