"""SPF in the pipeline, against a real DNS server on loopback."""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

from tests.support.dnsserver import DnsServer
from tests.support.shim import Shim
from tests.support.upstream import SmtpUpstream

RELAY = "192.0.2.25"
HINT = "include:_spf.provider.example"
ZONE = {
    "kunde.example": [{"TXT": "v=spf1 include:_spf.provider.example -all"}],
    "_spf.provider.example": [{"TXT": f"v=spf1 ip4:{RELAY} -all"}],
    "web1.kunde.example": [{"TXT": "v=spf1 ip4:198.51.100.7 -all", "ttl": 1}],
    "slow.kunde.example": ["TIMEOUT"],
}


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer(ZONE) as server:
        yield server


@pytest.fixture
def spf_shim(shim: Shim, dns: DnsServer) -> Shim:
    shim.configure("spf", enabled=True, relay_ips=[RELAY], nameservers=[dns.nameserver], hint=HINT,
                   timeout=1.5, cache_max_ttl=60)
    shim.ledger.add_account("post@slow.kunde.example", "kunde", authenticated=True)
    return shim


def message(sender: str) -> bytes:
    return f"From: {sender}\nTo: ola@x.example\nSubject: s\n\nhei\n".encode()


def test_pass_through_include_is_sent_and_cached(spf_shim: Shim, upstream: SmtpUpstream, dns: DnsServer):
    assert spf_shim.sendmail("-t", "-i", input=message("post@kunde.example")).code == 0
    queries = dns.count("kunde.example", "TXT")
    assert queries == 1
    assert spf_shim.sendmail("-t", "-i", input=message("post@kunde.example")).code == 0
    assert dns.count("kunde.example", "TXT") == queries  # the verdict came from the ledger's cache
    assert len(upstream.received) == 2


def test_record_without_the_relay_is_77_with_the_hint(spf_shim: Shim, upstream: SmtpUpstream):
    result = spf_shim.sendmail("-t", "-i", input=message("root@web1.kunde.example"))
    assert result.code == 77
    assert "web1.kunde.example" in result.line and "fail" in result.line and HINT in result.line
    assert upstream.received == []
    assert all(u.used == 0 for u in spf_shim.ledger.usage("customer", "kunde"))


def test_from_domain_is_checked_when_it_differs(spf_shim: Shim, upstream: SmtpUpstream):
    result = spf_shim.sendmail("-f", "post@kunde.example", "-t", "-i", input=message("root@web1.kunde.example"))
    assert result.code == 77 and "web1.kunde.example" in result.line
    assert upstream.received == []


def test_dns_timeout_is_69_within_the_budget(spf_shim: Shim, upstream: SmtpUpstream):
    started = time.monotonic()
    result = spf_shim.sendmail("-t", "-i", input=message("post@slow.kunde.example"))
    assert time.monotonic() - started < 6
    assert result.code == 69 and "could not check SPF" in result.line
    assert upstream.received == []


def test_php_mail_false_until_the_record_is_fixed(spf_shim: Shim, upstream: SmtpUpstream, dns: DnsServer):
    code = 'var_dump(mail("ola@x.example", "s", "b", "From: root@web1.kunde.example"));'
    assert spf_shim.php(code).stdout.strip().splitlines()[-1] == "bool(false)"
    dns.set_records("web1.kunde.example", "TXT", [f"v=spf1 {HINT} -all"], ttl=1)
    time.sleep(1.2)  # the refusal was cached for the record's one-second TTL
    assert spf_shim.php(code).stdout.strip().splitlines()[-1] == "bool(true)"
    assert len(upstream.received) == 1


# ------------------------------------------------------------------ nameservers that do not answer

PHP_MAIL = 'var_dump(mail("ola@x.example", "s", "b", "From: post@kunde.example"));'


@pytest.fixture
def dead_dns() -> Iterator[DnsServer]:
    """A nameserver that reads every query, over UDP and TCP, and never replies."""
    with DnsServer(silent=True) as server:
        yield server


def test_php_mail_is_false_within_the_timeout_when_dns_does_not_answer(
        spf_shim: Shim, upstream: SmtpUpstream, dead_dns: DnsServer):
    spf_shim.configure("spf", nameservers=[dead_dns.nameserver], timeout=None)  # the default timeout
    started = time.monotonic()
    php = spf_shim.php(PHP_MAIL)
    waited = time.monotonic() - started
    assert php.stdout.strip().splitlines()[-1] == "bool(false)"
    assert waited < 10 + 1  # [spf] timeout is 10 s by default; in fact 1 s + 2 s
    assert "could not check SPF for kunde.example (DNS did not answer" in php.stderr
    assert f"no reply from {dead_dns.nameserver}" in php.stderr
    (line,) = spf_shim.log_lines()
    assert "verdict=refused" in line and "code=69" in line and "DNS did not answer" in line
    assert upstream.received == []
    assert dead_dns.count() >= 1


def test_a_dead_first_nameserver_does_not_hold_the_send(
        spf_shim: Shim, upstream: SmtpUpstream, dns: DnsServer, dead_dns: DnsServer):
    spf_shim.configure("spf", nameservers=[dead_dns.nameserver, dns.nameserver], timeout=None)
    started = time.monotonic()
    php = spf_shim.php(PHP_MAIL)
    waited = time.monotonic() - started
    assert php.stdout.strip().splitlines()[-1] == "bool(true)", php.stderr
    assert waited < 4  # one second lost to the dead server, of the 10 s allowed
    assert dead_dns.count() == 1  # the include's lookup went to the good server first
    assert dns.count("kunde.example", "TXT") == 1 and dns.count("_spf.provider.example", "TXT") == 1
    assert len(upstream.received) == 1
