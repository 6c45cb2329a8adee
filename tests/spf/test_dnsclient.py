"""NetworkResolver against the loopback DNS server: records, errors, TCP, failover."""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from sendmail_shim.dnsclient import (
    DnsAnswer,
    DnsTemporaryError,
    NetworkResolver,
    system_nameservers,
)
from tests.support.dnsserver import DnsServer

ZONE: dict[str, list[Any]] = {
    "kunde.example": [
        {"TXT": ["v=spf1 ", "-all"], "ttl": 120},
        {"TXT": "other"},
        {"A": "192.0.2.1"}, {"A": "192.0.2.2"},
        {"AAAA": "2001:DB8::1"},
        {"MX": [20, "mx2.kunde.example."]}, {"MX": [10, "mx1.kunde.example"]},
    ],
    "1.2.0.192.in-addr.arpa": [{"PTR": "mail.kunde.example."}],
    "alias.example": [{"CNAME": "kunde.example"}, {"ttl": 30, "CNAME": "kunde.example"}],
    "deep.sub.kunde.example": [{"A": "192.0.2.9"}],
    "odd name%.example": [{"A": "192.0.2.10"}],
}


@pytest.fixture
def server() -> Iterator[DnsServer]:
    with DnsServer(ZONE, negative_ttl=45) as running:
        yield running


def resolver_for(*servers: DnsServer, timeout: float = 2.0) -> NetworkResolver:
    return NetworkResolver([s.address for s in servers], timeout=timeout)


def test_records_come_back_as_plain_values(server: DnsServer) -> None:
    resolver = resolver_for(server)
    txt = resolver.lookup("kunde.example", "TXT")
    assert sorted(txt.records) == [(b"other",), (b"v=spf1 ", b"-all")]
    assert txt.ttl == 120
    assert sorted(resolver.lookup("kunde.example", "A").records) == ["192.0.2.1", "192.0.2.2"]
    assert resolver.lookup("kunde.example", "AAAA").records == ("2001:db8::1",)
    exchanges = resolver.lookup("KUNDE.EXAMPLE.", "MX").records  # case may follow the question
    assert sorted((pref, name.lower()) for pref, name in exchanges) == [
        (10, "mx1.kunde.example"), (20, "mx2.kunde.example")]
    assert resolver.lookup("1.2.0.192.in-addr.arpa", "PTR").records == ("mail.kunde.example",)


def test_nxdomain_and_nodata_differ_and_carry_the_negative_ttl(server: DnsServer) -> None:
    resolver = resolver_for(server)
    assert resolver.lookup("missing.example", "TXT") == DnsAnswer((), 45, nxdomain=True)
    assert resolver.lookup("kunde.example", "PTR") == DnsAnswer((), 45, nxdomain=False)
    # A name above an existing name exists, even without records of its own.
    assert resolver.lookup("sub.kunde.example", "A") == DnsAnswer((), 45, nxdomain=False)


def test_cnames_are_followed_and_their_ttl_counts(server: DnsServer) -> None:
    answer = resolver_for(server).lookup("alias.example", "A")
    assert sorted(answer.records) == ["192.0.2.1", "192.0.2.2"]
    assert answer.ttl == 30


def test_names_are_taken_literally(server: DnsServer) -> None:
    assert resolver_for(server).lookup("odd name%.example", "A").records == ("192.0.2.10",)
    assert resolver_for(server).lookup("a..b.example", "A").nxdomain  # cannot exist


def test_a_truncated_udp_answer_is_asked_again_over_tcp(server: DnsServer) -> None:
    server.force_tcp("kunde.example")
    assert resolver_for(server).lookup("kunde.example", "A").records
    assert server.count("kunde.example", "A", "udp") == 1
    assert server.count("kunde.example", "A", "tcp") == 1


def test_a_silent_server_is_a_timeout_within_the_limit(server: DnsServer) -> None:
    server.drop_queries("kunde.example")
    started = time.monotonic()
    with pytest.raises(DnsTemporaryError) as caught:
        resolver_for(server, timeout=5.0).lookup("kunde.example", "TXT", timeout=0.4)
    assert time.monotonic() - started < 1.0
    assert caught.value.reason == "DNS did not answer"
    assert caught.value.silent == (server.nameserver,)


def test_the_next_server_answers_when_the_first_is_silent(server: DnsServer) -> None:
    with DnsServer(ZONE) as second:
        server.drop_queries("kunde.example")
        answer = resolver_for(server, second, timeout=3.0).lookup("kunde.example", "A")
    assert answer.records
    assert second.count("kunde.example", "A") == 1


def test_a_server_failure_moves_on_then_gives_up() -> None:
    looping = {"loop.example": [{"CNAME": "loop2.example"}],
               "loop2.example": [{"CNAME": "loop.example"}]}
    with DnsServer(looping) as first, DnsServer(looping) as second:
        with pytest.raises(DnsTemporaryError, match="SERVFAIL"):
            resolver_for(first, second).lookup("loop.example", "A")
        assert first.count() == 1 and second.count() == 1


def test_system_nameservers_come_from_resolv_conf(tmp_path: Path) -> None:
    conf = tmp_path / "resolv.conf"
    conf.write_text("# local\nsearch example\nnameserver 192.0.2.53\nnameserver fe80::1%eth0\n")
    assert system_nameservers(str(conf)) == [("192.0.2.53", 53), ("fe80::1", 53)]
    assert system_nameservers(str(tmp_path / "missing")) == [("127.0.0.1", 53)]


def test_configured_nameservers_are_parsed(server: DnsServer) -> None:
    resolver = NetworkResolver.from_config([server.nameserver, "[::1]:5353", "192.0.2.53"], 3.0)
    assert resolver.nameservers == [server.address, ("::1", 5353), ("192.0.2.53", 53)]
    assert resolver.timeout == 3.0
    assert resolver.lookup("kunde.example", "A").records
    assert NetworkResolver.from_config([], 3.0).nameservers == system_nameservers()


@pytest.fixture
def dead() -> Iterator[DnsServer]:
    """A nameserver that reads every query, over UDP and TCP, and never replies."""
    with DnsServer(silent=True) as running:
        yield running


def test_a_dead_server_is_given_up_after_two_short_tries(dead: DnsServer) -> None:
    started = time.monotonic()
    with pytest.raises(DnsTemporaryError) as caught:
        resolver_for(dead, timeout=10.0).lookup("kunde.example", "TXT")
    waited = time.monotonic() - started
    assert 2.9 <= waited < 3.6  # 1 s, then 2 s: not the whole 10 s
    assert caught.value.reason == "DNS did not answer"
    assert caught.value.silent == (dead.nameserver,)
    assert dead.count("kunde.example", "TXT", "udp") == 2


def test_a_dead_server_is_not_waited_for_in_full_again(dead: DnsServer) -> None:
    resolver = resolver_for(dead, timeout=10.0)
    with pytest.raises(DnsTemporaryError):
        resolver.lookup("kunde.example", "TXT")
    started = time.monotonic()
    with pytest.raises(DnsTemporaryError) as caught:
        resolver.lookup("_spf.provider.example", "TXT")
    assert time.monotonic() - started < 1.5  # one short try, not 1 s + 2 s again
    assert caught.value.reason == "DNS did not answer"
    assert dead.count("_spf.provider.example") == 1


def test_after_a_dead_first_server_the_good_one_is_asked_first(dead: DnsServer, server: DnsServer) -> None:
    resolver = resolver_for(dead, server, timeout=10.0)
    started = time.monotonic()
    assert resolver.lookup("kunde.example", "A").records
    assert time.monotonic() - started < 1.5  # one try at the dead server, then the good one
    started = time.monotonic()
    for name in ("deep.sub.kunde.example", "alias.example", "kunde.example"):
        assert resolver.lookup(name, "TXT" if name == "kunde.example" else "A").records
    assert time.monotonic() - started < 0.5
    assert dead.count() == 1  # asked once, then left for last
    assert resolver.silent_servers() == [dead.address]


def test_a_server_that_answers_again_is_no_longer_left_for_last(server: DnsServer) -> None:
    resolver = resolver_for(server, timeout=10.0)
    resolver.first_attempt_timeout = 0.2
    server.drop_queries("kunde.example")
    with pytest.raises(DnsTemporaryError):
        resolver.lookup("kunde.example", "A")
    assert resolver.silent_servers() == [server.address]
    assert resolver.lookup("deep.sub.kunde.example", "A").records
    assert resolver.silent_servers() == []
