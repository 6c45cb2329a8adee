"""Exact rolling-window limits, per account and per customer, with overrides and resets."""

from __future__ import annotations

import time

import pytest

from sendmail_shim.exitcodes import exit_code_for
from sendmail_shim.ledger import (
    InvalidInput,
    Ledger,
    LimitNeverFits,
    LimitReached,
    UnknownSubject,
)
from sendmail_shim.limits import parse_rule
from tests.ledger.common import NOON, add_account, limits, open_ledger, window_peaks

US = 1e-6


def fill(ledger: Ledger, address: str, times: list[float], recipients: int = 1) -> None:
    account = ledger.find_account(address)
    assert account is not None
    for i, at in enumerate(times):
        ledger.settle(ledger.reserve(account, recipients, message_id=f"<{i}@x>", now=at), "sent")


def test_the_26th_message_in_five_minutes_gets_the_exact_line(ledger: Ledger) -> None:
    account = add_account(ledger)
    # The first of 25 messages at 12:01:08; the 26th tried at 12:03:37.
    fill(ledger, account.address, [NOON + 68 + i for i in range(25)])
    with pytest.raises(LimitReached) as caught:
        ledger.reserve(account, 1, message_id="<26@x>", now=NOON + 217)
    assert str(caught.value) == (
        "post@kunde.example reached 25 messages per 5 minutes (25 used); "
        "next message possible at 12:06:08 UTC (in 2 min 31 s)")
    refusal = caught.value
    assert exit_code_for(refusal) == 69
    assert (refusal.scope, refusal.subject, str(refusal.rule), refusal.used) == \
        ("account", "post@kunde.example", "25 messages / 5m", 25)
    assert refusal.next_free_at == NOON + 368


def test_next_free_at_is_exact_to_the_microsecond(ledger: Ledger) -> None:
    account = add_account(ledger)
    fill(ledger, account.address, [NOON + 0.123457 + i for i in range(25)])
    with pytest.raises(LimitReached) as caught:
        ledger.reserve(account, 1, message_id="<x>", now=NOON + 100)
    free = caught.value.next_free_at
    assert free == pytest.approx(NOON + 300.123457, abs=0.5 * US)
    with pytest.raises(LimitReached):
        ledger.reserve(account, 1, message_id="<early>", now=free - US)
    assert ledger.reserve(account, 1, message_id="<on time>", now=free).at == free


def test_a_large_message_waits_until_enough_old_recipients_have_left(ledger: Ledger) -> None:
    account = add_account(ledger)
    for i, size in enumerate([100, 100, 50]):
        ledger.reserve(account, size, message_id=f"<{i}@x>", now=NOON + 10 * i)
    with pytest.raises(LimitReached) as caught:
        ledger.reserve(account, 120, message_id="<big>", now=NOON + 30)
    # 120 more need 120 freed: the first send frees 100, the second 100 more.
    assert caught.value.next_free_at == NOON + 10 + 300
    assert str(caught.value).startswith(
        "post@kunde.example reached 250 recipients per 5 minutes (250 used, this message has 120)")
    with pytest.raises(LimitReached):
        ledger.reserve(account, 120, message_id="<big>", now=NOON + 309.999999)
    ledger.reserve(account, 120, message_id="<big>", now=NOON + 310)


def test_a_message_that_can_never_fit_is_77_and_counts_nothing(ledger: Ledger) -> None:
    account = add_account(ledger)
    with pytest.raises(LimitNeverFits) as caught:
        ledger.reserve(account, 251, message_id="<list>", now=NOON)
    assert exit_code_for(caught.value) == 77
    assert str(caught.value) == (
        "this message has 251 recipients but post@kunde.example may send at most "
        "250 recipients per 5 minutes, so it can never be sent; send to fewer recipients "
        "per message or use a bulk mail service")
    assert ledger.list_sends("account", account.address) == []


def test_the_customer_limit_trips_on_the_sum_of_its_accounts(ledger_url: str) -> None:
    ledger = open_ledger(ledger_url, limits(["5 messages / 1h"], ["12 messages / 1h"]))
    addresses = [f"site{i}@kunde.example" for i in range(4)]
    for address in addresses:
        add_account(ledger, address)
    for i, address in enumerate(addresses[:3]):
        fill(ledger, address, [NOON + 60 * i + k for k in range(4)])
    fresh = ledger.find_account(addresses[3])
    assert fresh is not None
    with pytest.raises(LimitReached) as caught:
        ledger.reserve(fresh, 1, message_id="<13>", now=NOON + 600)
    assert caught.value.scope == "customer" and caught.value.subject == "kunde1"
    assert str(caught.value) == (
        "customer kunde1 (all its accounts together) reached 12 messages per hour (12 used); "
        "next message possible at 13:00:00 UTC (in 50 min)")


def test_the_line_names_the_rule_that_frees_last(ledger_url: str) -> None:
    ledger = open_ledger(ledger_url, limits(["2 messages / 1m"], ["2 messages / 1h"]))
    account = add_account(ledger)
    fill(ledger, account.address, [NOON, NOON + 1])
    with pytest.raises(LimitReached) as caught:
        ledger.reserve(account, 1, message_id="<3>", now=NOON + 2)
    assert caught.value.scope == "customer"
    assert caught.value.next_free_at == NOON + 3600


def test_released_sends_stop_counting_and_unsettled_ones_keep_counting(ledger: Ledger) -> None:
    account = add_account(ledger)
    reservations = [ledger.reserve(account, 1, message_id=f"<{i}>", now=NOON + i) for i in range(25)]
    for reservation in reservations[:5]:
        ledger.settle(reservation, "released")  # refused by the upstream: does not count
    for reservation in reservations[5:10]:
        ledger.settle(reservation, "queued")
    for reservation in reservations[10:15]:
        ledger.settle(reservation, "sent")
    # reservations[15:] are never settled (a crash): they keep counting.
    for i in range(5):
        ledger.reserve(account, 1, message_id=f"<again {i}>", now=NOON + 30 + i)
    with pytest.raises(LimitReached):
        ledger.reserve(account, 1, message_id="<one too many>", now=NOON + 40)


def test_a_sent_message_is_never_uncounted(ledger: Ledger) -> None:
    account = add_account(ledger)
    reservation = ledger.reserve(account, 4, message_id="<m>", now=NOON)
    ledger.settle(reservation, "queued")
    ledger.settle(reservation, "sent")
    ledger.settle(reservation, "released")
    assert [s.state for s in ledger.list_sends("account", account.address)] == ["sent"]
    with pytest.raises(ValueError):
        ledger.settle(reservation, "lost")


def test_an_override_replaces_the_rule_with_the_same_window_until_it_expires(ledger: Ledger) -> None:
    account = add_account(ledger)
    override = ledger.set_override("account", account.address, parse_rule("30 messages / 5m"),
                                   expires_at=NOON + 1000, reason="newsletter move", now=NOON)
    fill(ledger, account.address, [NOON + i for i in range(30)])
    with pytest.raises(LimitReached, match="reached 30 messages per 5 minutes"):
        ledger.reserve(account, 1, message_id="<31>", now=NOON + 31)
    usage = ledger.usage("account", account.address, now=NOON + 31)
    assert [(str(u.rule), u.override.id if u.override else None) for u in usage][0] == \
        ("30 messages / 5m", override.id)
    # After expiry the configured 25 apply again.
    assert ledger.usage("account", account.address, now=NOON + 1001)[0].limit == 25


def test_an_override_may_add_a_rule_and_may_be_removed(ledger: Ledger) -> None:
    account = add_account(ledger)
    extra = ledger.set_override("customer", "kunde1", parse_rule("2 messages / 1m"),
                                expires_at=NOON + 3600, reason="under investigation", now=NOON)
    fill(ledger, account.address, [NOON, NOON + 1])
    with pytest.raises(LimitReached) as caught:
        ledger.reserve(account, 1, message_id="<3>", now=NOON + 2)
    assert caught.value.scope == "customer" and str(caught.value.rule) == "2 messages / 1m"
    assert ledger.remove_override(extra.id).reason == "under investigation"
    ledger.reserve(account, 1, message_id="<3>", now=NOON + 2)
    with pytest.raises(UnknownSubject):
        ledger.remove_override(extra.id)


def test_setting_an_override_again_replaces_it(ledger: Ledger) -> None:
    account = add_account(ledger)
    rule = parse_rule("40 messages / 5m")
    ledger.set_override("account", account.address, rule, expires_at=NOON + 99, reason="a", now=NOON)
    second = ledger.set_override("account", account.address, parse_rule("50 messages / 5m"),
                                 expires_at=NOON + 99, reason="b", now=NOON)
    assert ledger.list_overrides(now=NOON) == [second]


def test_an_override_needs_a_reason_a_future_expiry_and_a_known_subject(ledger: Ledger) -> None:
    account = add_account(ledger)
    rule = parse_rule("40 messages / 5m")
    with pytest.raises(InvalidInput, match="reason"):
        ledger.set_override("account", account.address, rule, expires_at=NOON + 9, reason=" ",
                            now=NOON)
    with pytest.raises(InvalidInput, match="past"):
        ledger.set_override("account", account.address, rule, expires_at=NOON - 1, reason="x",
                            now=NOON)
    with pytest.raises(UnknownSubject):
        ledger.set_override("customer", "nope", rule, expires_at=NOON + 9, reason="x", now=NOON)


def test_reset_is_a_marker_not_a_deletion(ledger: Ledger) -> None:
    account = add_account(ledger)
    fill(ledger, account.address, [NOON + i for i in range(25)])
    marker = ledger.reset_usage("account", account.address, reason="false alarm", actor="alice",
                                now=NOON + 30)
    assert (marker.scope, marker.subject, marker.reason, marker.created_by) == \
        ("account", "post@kunde.example", "false alarm", "alice")
    ledger.reserve(account, 1, message_id="<after reset>", now=NOON + 31)
    assert len(ledger.list_sends("account", account.address)) == 26
    assert ledger.audit_log(1)[0].action == "usage reset"
    # The customer's own count was not reset.
    customer = {str(u.rule): u.used for u in ledger.usage("customer", "kunde1", now=NOON + 32)}
    assert customer["250 messages / 1h"] == 26


def test_usage_reports_used_remaining_and_next_free(ledger: Ledger) -> None:
    account = add_account(ledger)
    fill(ledger, account.address, [NOON + i for i in range(25)], recipients=2)
    usage = ledger.usage("account", account.address, now=NOON + 60)
    assert [(u.scope, u.metric, u.window_seconds, u.limit, u.used, u.remaining, u.next_free_at)
            for u in usage] == [
        ("account", "messages", 300, 25, 25, 0, NOON + 300),
        ("account", "recipients", 300, 250, 50, 200, None),
        ("account", "recipients", 86400, 1000, 50, 950, None),
        ("account", "recipients", 2592000, 5000, 50, 4950, None),
    ]
    customer = ledger.usage("customer", "kunde1", now=NOON + 60)
    assert [(u.metric, u.used) for u in customer] == [("messages", 25), ("recipients", 50)]
    # A send leaves the window exactly W after it was made.
    assert [u.used for u in ledger.usage("account", account.address, now=NOON + 301)][:2] == [23, 46]
    assert [u.used for u in ledger.usage("account", account.address, now=NOON + 324)][:2] == [0, 0]


def test_usage_of_unknown_subjects_is_67(ledger: Ledger) -> None:
    with pytest.raises(UnknownSubject):
        ledger.usage("account", "ghost@kunde.example")
    with pytest.raises(UnknownSubject):
        ledger.usage("customer", "ghost")


def test_without_an_injected_time_the_clock_is_now(ledger: Ledger) -> None:
    account = add_account(ledger)
    before = time.time()
    reservation = ledger.reserve(account, 1, message_id="<now>")
    assert before - 1 <= reservation.at <= time.time() + 1


def test_no_window_ever_exceeds_a_limit_in_a_long_busy_day(ledger_url: str) -> None:
    rules = limits(["3 messages / 10s", "8 recipients / 30s"], ["5 messages / 20s"])
    ledger = open_ledger(ledger_url, rules)
    first = add_account(ledger, "a@kunde.example")
    second = add_account(ledger, "b@kunde.example")
    accepted = 0
    for step in range(120):
        account = first if step % 3 else second
        try:
            ledger.reserve(account, 1 + step % 4, message_id=f"<{step}>", now=NOON + step * 1.7)
            accepted += 1
        except LimitReached:
            pass
    assert accepted > 20
    for scope, subject, scoped_rules in (("account", "a@kunde.example", rules.account),
                                         ("account", "b@kunde.example", rules.account),
                                         ("customer", "kunde1", rules.customer)):
        sends = ledger.list_sends(scope, subject, counted_only=True)
        for rule in scoped_rules:
            assert window_peaks(sends, rule) <= rule.limit


def test_decisions_are_logged_newest_first(ledger: Ledger) -> None:
    ledger.record_decision(verdict="sent", code=0, account="post@kunde.example", customer="kunde1",
                           uid=1001, user="web1", recipients=3, message_id="<a@x>", time=NOON)
    ledger.record_decision(verdict="refused", code=69, account="post@kunde.example",
                           customer="kunde1", uid=1001, recipients=1, stage="limits",
                           reason="reached 25 messages per 5 minutes", time=NOON + 1)
    ledger.record_decision(verdict="refused", code=67, account="x@annen.example", time=NOON + 2)
    recent = ledger.recent_decisions(10, account="post@kunde.example")
    assert [(d.verdict, d.code, d.at) for d in recent] == [("refused", 69, NOON + 1),
                                                           ("sent", 0, NOON)]
    assert recent[1].user == "web1" and recent[1].message_id == "<a@x>"
    assert len(ledger.recent_decisions(2)) == 2


def test_a_mail_log_record_can_be_stored_as_it_is(ledger: Ledger) -> None:
    ledger.record_decision(uid=1001, user="web1", size=2048, sender="post@kunde.example",
                           rcpts=2, msgid="<a@x>", verdict="refused", code=77,
                           stage="ForeignFromDomain", reason="the From address's domain ...",
                           ms=12, time=NOON)
    (decision,) = ledger.recent_decisions(1, account="post@kunde.example")
    assert (decision.account, decision.recipients, decision.message_id, decision.stage,
            decision.code) == ("post@kunde.example", 2, "<a@x>", "ForeignFromDomain", 77)
    assert decision.extra == "size=2048 ms=12"


def test_spf_verdicts_are_cached_until_they_expire(ledger: Ledger) -> None:
    cache = ledger.spf_cache()
    now = float(int(time.time()))  # put() purges entries that expired an hour ago by the clock
    assert cache.get("kunde.example", "192.0.2.25", now) is None
    cache.put("kunde.example", "192.0.2.25", "pass", now + 300)
    cache.put("kunde.example", "2001:db8::25", "fail", now + 300)
    assert cache.get("kunde.example", "192.0.2.25", now + 299) == "pass"
    assert cache.get("kunde.example", "2001:db8::25", now) == "fail"
    assert cache.get("kunde.example", "192.0.2.25", now + 300) is None
    cache.put("kunde.example", "192.0.2.25", "softfail", now + 900)
    assert cache.get("kunde.example", "192.0.2.25", now + 600) == "softfail"
    assert Ledger(ledger.url).spf_cache().get("kunde.example", "192.0.2.25", now) == "softfail"


def test_spf_cache_on_a_missing_ledger_is_a_miss(tmp_path: object) -> None:
    cache = Ledger(f"sqlite:///{tmp_path}/none.db").spf_cache()
    cache.put("kunde.example", "192.0.2.25", "pass", NOON)
    assert cache.get("kunde.example", "192.0.2.25", NOON) is None


def test_a_message_that_does_not_fit_would_exceed_the_rule_it_has_not_reached(ledger: Ledger) -> None:
    account = add_account(ledger)
    fill(ledger, account.address, [NOON], recipients=248)
    with pytest.raises(LimitReached) as caught:
        ledger.reserve(account, 5, message_id="<five>", now=NOON + 60)
    assert str(caught.value) == (
        "post@kunde.example would exceed 250 recipients per 5 minutes (248 used, this message has 5); "
        "next message possible at 12:05:00 UTC (in 4 min)")
    ledger.reserve(account, 2, message_id="<two>", now=NOON + 61)  # two still fit: now the rule is full
    with pytest.raises(LimitReached) as full:
        ledger.reserve(account, 1, message_id="<one>", now=NOON + 62)
    assert str(full.value).startswith(
        "post@kunde.example reached 250 recipients per 5 minutes (250 used, this message has 1); ")
