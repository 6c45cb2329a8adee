"""The SPF stage as the pipeline uses it: require_authorised over real DNS on loopback."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from sendmail_shim.dnsclient import NetworkResolver, Resolver
from sendmail_shim.spf import (
    MemoryVerdictCache,
    SpfNotAuthorised,
    SpfUnavailable,
    require_authorised,
)
from tests.support.dnsserver import DnsServer

RELAYS = ("192.0.2.25", "2001:db8::25")
HINT = "include:_spf.provider.example"
ZONE: dict[str, list[Any]] = {
    "kunde.example": [{"TXT": f"v=spf1 mx {HINT} -all", "ttl": 300},
                      {"MX": [10, "mx.kunde.example"]}],
    "mx.kunde.example": [{"A": "198.51.100.7"}],
    "_spf.provider.example": [{"TXT": "v=spf1 ip4:192.0.2.25 ip6:2001:db8::25 -all", "ttl": 60}],
    "v4only.example": [{"TXT": "v=spf1 ip4:192.0.2.25 -all"}],
    "soft.example": [{"TXT": "v=spf1 ~all"}],
    "nospf.example": [{"A": "198.51.100.8"}, {"TXT": "some-verification=1"}],
    "broken.example": [{"TXT": "v=spf1 include:nowhere.example -all"}],
    "slow.example": ["TIMEOUT"],
    "loop.example": [{"CNAME": "loop2.example"}],
    "loop2.example": [{"CNAME": "loop.example"}],
    "peruser.example": [{"TXT": "v=spf1 exists:%{l}._u.peruser.example -all"}],
    "post._u.peruser.example": [{"A": "127.0.0.2"}],
}


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer(ZONE) as server:
        yield server


class Clock:
    def __init__(self, start: float = 1_000_000.0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now


def authorise(server: DnsServer, domains: tuple[str, ...] = ("kunde.example",),
              **options: Any) -> None:
    settings: dict[str, Any] = {
        "accept": ("pass",), "hint": HINT, "sender": "post@kunde.example", "budget": 5.0,
        "resolver": NetworkResolver([server.address], timeout=2.0),
    }
    settings.update(options)
    relay_ips = settings.pop("relay_ips", RELAYS)
    require_authorised(domains, relay_ips, **settings)


def test_both_relays_pass_through_the_include(dns: DnsServer) -> None:
    authorise(dns)
    assert dns.count("kunde.example", "TXT") == 1  # asked once for both relay IPs
    assert dns.count("_spf.provider.example", "TXT") == 1


def test_refusal_names_domain_relay_result_and_what_to_add(dns: DnsServer) -> None:
    with pytest.raises(SpfNotAuthorised) as caught:
        authorise(dns, ("v4only.example",))
    refusal = caught.value
    assert (refusal.domain, refusal.ip, refusal.result) == (
        "v4only.example", "2001:db8::25", "fail")
    assert str(refusal) == (
        "the SPF record of v4only.example does not authorise the relay 2001:db8::25 "
        '(result: fail); add "include:_spf.provider.example" to the domain\'s SPF record')


def test_without_a_hint_the_line_suggests_the_relay_address(dns: DnsServer) -> None:
    with pytest.raises(SpfNotAuthorised, match=r'add "ip6:2001:db8::25"'):
        authorise(dns, ("v4only.example",), hint=None)


def test_only_results_in_the_accept_list_are_accepted(dns: DnsServer) -> None:
    with pytest.raises(SpfNotAuthorised) as caught:
        authorise(dns, ("soft.example",))
    assert caught.value.result == "softfail"
    authorise(dns, ("soft.example",), accept=("pass", "softfail"))


def test_a_domain_without_spf_record_is_told_to_publish_one(dns: DnsServer) -> None:
    with pytest.raises(SpfNotAuthorised) as caught:
        authorise(dns, ("nospf.example",))
    assert caught.value.result == "none"
    assert 'publish one such as "v=spf1 include:_spf.provider.example ~all"' in str(caught.value)


def test_a_broken_record_is_a_refusal_that_says_what_is_wrong(dns: DnsServer) -> None:
    with pytest.raises(SpfNotAuthorised) as caught:
        authorise(dns, ("broken.example",))
    assert caught.value.result == "permerror"
    assert "nowhere.example has no SPF record" in str(caught.value)
    assert "\n" not in str(caught.value)


def test_the_from_domain_is_checked_when_it_differs(dns: DnsServer) -> None:
    with pytest.raises(SpfNotAuthorised) as caught:
        authorise(dns, ("kunde.example", "v4only.example"))
    assert caught.value.domain == "v4only.example"
    assert dns.count("kunde.example", "TXT") == 1
    assert dns.count("v4only.example", "TXT") == 1


def test_the_same_domain_twice_is_checked_once(dns: DnsServer) -> None:
    authorise(dns, ("kunde.example", "KUNDE.example."))
    assert dns.count("kunde.example", "TXT") == 1


def test_every_relay_ip_must_pass(dns: DnsServer) -> None:
    authorise(dns, ("v4only.example",), relay_ips=("192.0.2.25",))
    with pytest.raises(SpfNotAuthorised) as caught:
        authorise(dns, ("v4only.example",), relay_ips=("192.0.2.25", "2001:db8::25"))
    assert caught.value.ip == "2001:db8::25"


def test_a_dns_timeout_is_unavailable_within_the_budget(dns: DnsServer) -> None:
    started = time.monotonic()
    with pytest.raises(SpfUnavailable) as caught:
        authorise(dns, ("slow.example",), budget=0.5)
    assert time.monotonic() - started < 2.0
    assert caught.value.domain == "slow.example"
    assert str(caught.value).startswith("could not check SPF for slow.example (DNS did not answer")
    assert str(caught.value).endswith("; try again later")


def test_a_budget_spent_before_the_last_domain_is_unavailable_not_pass(dns: DnsServer) -> None:
    with pytest.raises(SpfUnavailable):
        authorise(dns, ("slow.example", "kunde.example"), budget=0.3)


def test_a_dns_server_failure_is_unavailable(dns: DnsServer) -> None:
    with pytest.raises(SpfUnavailable, match=r"SERVFAIL"):
        authorise(dns, ("loop.example",))


def test_a_definite_refusal_wins_over_a_dns_failure(dns: DnsServer) -> None:
    with pytest.raises(SpfNotAuthorised) as caught:
        authorise(dns, ("loop.example", "v4only.example"))
    assert caught.value.domain == "v4only.example"


def counting(factory: Callable[[], Resolver]) -> tuple[Callable[[], Resolver], list[int]]:
    calls: list[int] = []

    def build() -> Resolver:
        calls.append(1)
        return factory()

    return build, calls


def test_a_cached_verdict_asks_no_dns_and_builds_no_resolver(dns: DnsServer) -> None:
    cache, clock = MemoryVerdictCache(), Clock()
    authorise(dns, cache=cache, now=clock)
    assert dns.count() > 0
    dns.clear_queries()
    factory, calls = counting(lambda: NetworkResolver([dns.address], timeout=2.0))
    clock.now += 30
    authorise(dns, cache=cache, now=clock, resolver=factory)
    assert dns.count() == 0
    assert calls == []


def test_a_cached_verdict_expires_with_the_smallest_ttl(dns: DnsServer) -> None:
    cache, clock = MemoryVerdictCache(), Clock()
    authorise(dns, cache=cache, now=clock)  # TTLs 300 and 60: valid for 60 s
    dns.clear_queries()
    clock.now += 59
    authorise(dns, cache=cache, now=clock)
    assert dns.count() == 0
    clock.now += 2
    authorise(dns, cache=cache, now=clock)
    assert dns.count("kunde.example", "TXT") == 1


def test_cache_max_ttl_bounds_the_cache_lifetime(dns: DnsServer) -> None:
    cache, clock = MemoryVerdictCache(), Clock()
    authorise(dns, cache=cache, now=clock, cache_max_ttl=10)
    dns.clear_queries()
    clock.now += 11
    authorise(dns, cache=cache, now=clock, cache_max_ttl=10)
    assert dns.count("kunde.example", "TXT") == 1


def test_a_changed_record_is_seen_after_expiry(dns: DnsServer) -> None:
    cache, clock = MemoryVerdictCache(), Clock()
    authorise(dns, cache=cache, now=clock)
    dns.set_records("kunde.example", "TXT", ["v=spf1 -all"], ttl=300)
    authorise(dns, cache=cache, now=clock)  # still cached
    clock.now += 61
    with pytest.raises(SpfNotAuthorised):
        authorise(dns, cache=cache, now=clock)


def test_a_refusal_is_cached_too(dns: DnsServer) -> None:
    cache, clock = MemoryVerdictCache(), Clock()
    with pytest.raises(SpfNotAuthorised):
        authorise(dns, ("v4only.example",), cache=cache, now=clock)
    dns.clear_queries()
    with pytest.raises(SpfNotAuthorised) as caught:
        authorise(dns, ("v4only.example",), cache=cache, now=clock)
    assert caught.value.result == "fail"
    assert dns.count() == 0


def test_a_dns_failure_is_never_cached(dns: DnsServer) -> None:
    cache, clock = MemoryVerdictCache(), Clock()
    with pytest.raises(SpfUnavailable):
        authorise(dns, ("loop.example",), cache=cache, now=clock)
    assert len(cache) == 0
    dns.clear_queries()
    with pytest.raises(SpfUnavailable):
        authorise(dns, ("loop.example",), cache=cache, now=clock)
    assert dns.count("loop.example") > 0


def test_records_that_look_at_the_sender_are_not_cached(dns: DnsServer) -> None:
    cache, clock = MemoryVerdictCache(), Clock()
    authorise(dns, ("peruser.example",), sender="post@peruser.example", cache=cache, now=clock)
    assert len(cache) == 0
    with pytest.raises(SpfNotAuthorised):
        authorise(dns, ("peruser.example",), sender="other@peruser.example", cache=cache,
                  now=clock)


def test_the_from_domain_is_checked_with_the_senders_local_part(dns: DnsServer) -> None:
    with pytest.raises(SpfNotAuthorised) as caught:
        authorise(dns, ("kunde.example", "peruser.example"), sender="other@kunde.example")
    assert caught.value.domain == "peruser.example"
    assert dns.count("other._u.peruser.example", "A") == 1


def test_memory_cache_forgets_expired_entries_and_stays_bounded() -> None:
    cache = MemoryVerdictCache(max_entries=4)
    cache.put("Kunde.example", "192.0.2.25", "pass", expires_at=100.0)
    assert cache.get("kunde.example", "192.0.2.25", now=99.0) == "pass"
    assert cache.get("kunde.example", "192.0.2.25", now=100.0) is None
    for number in range(10):
        cache.put(f"d{number}.example", "192.0.2.25", "fail", expires_at=200.0 + number)
    assert len(cache) <= 4
    assert cache.get("d9.example", "192.0.2.25", now=150.0) == "fail"


def test_a_dead_nameserver_ends_the_whole_check_well_within_the_budget() -> None:
    with DnsServer(silent=True) as dead:
        started = time.monotonic()
        with pytest.raises(SpfUnavailable) as caught:
            authorise(dead, ("kunde.example", "v4only.example"), budget=10.0,
                      resolver=NetworkResolver([dead.address], timeout=10.0))
        waited = time.monotonic() - started
        # 1 s + 2 s for the first domain's record, one short try for the second's
        assert waited < 5.0
        assert dead.count("v4only.example", "TXT", "udp") == 1
    line = str(caught.value)
    assert line.startswith("could not check SPF for kunde.example (DNS did not answer looking up TXT")
    assert f"no reply from {dead.nameserver}" in line and line.endswith("; try again later")


PTR_ZONE: dict[str, list[Any]] = {
    "kunde.example": [{"TXT": "v=spf1 ptr ip4:192.0.2.25 -all"}],
    "25.2.0.192.in-addr.arpa": [{"PTR": "h1.kunde.example"}, {"PTR": "h2.kunde.example"}],
    "h1.kunde.example": ["TIMEOUT"],
    "h2.kunde.example": ["TIMEOUT"],
}


def test_lookups_the_record_may_skip_do_not_spend_the_budget_each_in_full() -> None:
    # RFC 7208 5.5: a ptr name whose address lookup fails is skipped and the record goes on.
    with DnsServer(PTR_ZONE) as server:
        started = time.monotonic()
        authorise(server, budget=6.0, relay_ips=("192.0.2.25",),
                  resolver=NetworkResolver([server.address], timeout=6.0))
        assert time.monotonic() - started < 5.0  # 1 s + 2 s for the first name, one short try for the other
        tries = sorted(server.count(name, "A") for name in ("h1.kunde.example", "h2.kunde.example"))
        assert tries == [1, 2]
