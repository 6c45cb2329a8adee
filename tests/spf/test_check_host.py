"""check_host details beyond the suite: macro expansion, outcome fields, time budget."""

from __future__ import annotations

import time

import pytest

from sendmail_shim.dnsclient import DnsAnswer
from sendmail_shim.spf import check_host

from .zone_resolver import ZoneResolver

# RFC 7208 section 7.4: sender strong-bad@email.example.com, client 192.0.2.3.
RFC_EXAMPLES = [
    ("%{s}", "strong-bad@email.example.com"),
    ("%{o}", "email.example.com"),
    ("%{d}", "email.example.com"),
    ("%{d4}", "email.example.com"),
    ("%{d3}", "email.example.com"),
    ("%{d2}", "example.com"),
    ("%{d1}", "com"),
    ("%{dr}", "com.example.email"),
    ("%{d2r}", "example.email"),
    ("%{l}", "strong-bad"),
    ("%{l-}", "strong.bad"),
    ("%{lr}", "strong-bad"),
    ("%{lr-}", "bad.strong"),
    ("%{l1r-}", "strong"),
    ("%{ir}.%{v}._spf.%{d2}", "3.2.0.192.in-addr._spf.example.com"),
    ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
    ("%{lr-}.lp.%{ir}.%{v}._spf.%{d2}", "bad.strong.lp.3.2.0.192.in-addr._spf.example.com"),
    ("%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}", "3.2.0.192.in-addr.strong.lp._spf.example.com"),
    ("%{d2}.trusted-domains.example.net", "example.com.trusted-domains.example.net"),
]


def exists_query(macro: str, ip: str = "192.0.2.3",
                 sender: str = "strong-bad@email.example.com") -> str:
    """The name an ``exists:`` with ``macro`` makes check_host look up."""
    resolver = ZoneResolver({"email.example.com": [{"TXT": f"v=spf1 exists:{macro} -all"}]})
    check_host(ip, "email.example.com", sender, resolver=resolver)
    assert resolver.queries[1][1] == "A"
    return resolver.queries[1][0]


@pytest.mark.parametrize(("macro", "expansion"), RFC_EXAMPLES)
def test_rfc_macro_examples(macro: str, expansion: str) -> None:
    assert exists_query(macro) == expansion


def test_ipv6_client_in_nibble_format() -> None:
    # DNS names ignore case; the resolver log is lower case.
    assert exists_query("%{ir}.%{v}._spf.%{d2}", ip="2001:db8::cb01") == (
        "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com")


def test_escapes_and_url_encoding() -> None:
    assert exists_query("%{L}.%%%_%-.%{d}", sender="a+b/c@email.example.com") == (
        "a%2bb%2fc.% %20.email.example.com")


def test_outcome_reports_match_lookups_ttl_and_trace() -> None:
    resolver = ZoneResolver({
        "kunde.example": [{"TXT": "v=spf1 a:gone.example include:_spf.provider.example -all"}],
        "_spf.provider.example": [{"TXT": "v=spf1 ip4:192.0.2.0/24 -all"}],
    })
    outcome = check_host("192.0.2.25", "kunde.example", "post@kunde.example", resolver=resolver)
    assert outcome.result == "pass"
    assert (outcome.matched, outcome.matched_in) == ("include:_spf.provider.example",
                                                     "kunde.example")
    assert (outcome.lookups, outcome.void_lookups) == (2, 1)
    assert outcome.record == "v=spf1 a:gone.example include:_spf.provider.example -all"
    assert outcome.ttl == 3600
    terms = [(step.depth, step.term) for step in outcome.trace if step.detail.startswith("match")]
    assert terms == [(1, "ip4:192.0.2.0/24"), (0, "include:_spf.provider.example")]
    assert any(step.detail == "A gone.example: no such domain" for step in outcome.trace)


def test_fail_carries_the_default_explanation() -> None:
    resolver = ZoneResolver({"kunde.example": [{"TXT": "v=spf1 -all"}]})
    outcome = check_host("192.0.2.9", "kunde.example", "post@kunde.example", resolver=resolver)
    assert outcome.explanation == (
        "the SPF record of kunde.example does not authorise 192.0.2.9 to send mail for "
        "kunde.example")


def test_permerror_says_why() -> None:
    resolver = ZoneResolver({"kunde.example": [{"TXT": "v=spf1 ip4:192.0.2.300 -all"}]})
    outcome = check_host("192.0.2.9", "kunde.example", "post@kunde.example", resolver=resolver)
    assert outcome.result == "permerror"
    assert "192.0.2.300" in (outcome.problem or "")


class SlowResolver:
    """Each answer takes ``delay`` seconds (or the whole timeout, if shorter)."""

    def __init__(self, delay: float) -> None:
        self.delay = delay
        self.timeouts: list[float | None] = []

    def lookup(self, name: str, rdtype: str, *, timeout: float | None = None) -> DnsAnswer:
        self.timeouts.append(timeout)
        time.sleep(self.delay)
        if name == "kunde.example":
            return DnsAnswer(((b"v=spf1 a:a1.example a:a2.example a:a3.example ip4:192.0.2.25",),))
        return DnsAnswer((), 60)


def test_the_budget_covers_all_lookups_together() -> None:
    resolver = SlowResolver(0.1)
    outcome = check_host("192.0.2.25", "kunde.example", "post@kunde.example",
                         resolver=resolver, budget=0.25)
    assert outcome.result == "temperror"
    assert "time limit" in (outcome.problem or "")
    given = [t for t in resolver.timeouts if t is not None]
    assert len(given) == len(resolver.timeouts) and all(t <= 0.25 for t in given)
    assert given == sorted(given, reverse=True)  # the time left shrinks


def test_txt_bytes_records_are_joined() -> None:
    resolver = ZoneResolver({"kunde.example": [{"TXT": ["v=spf1 ip4:192.0.2", ".25 -all"]}]})
    outcome = check_host("192.0.2.25", "kunde.example", "", helo="kunde.example",
                         resolver=resolver)
    assert outcome.result == "pass"


def test_a_malformed_client_address_is_a_programming_error() -> None:
    with pytest.raises(ValueError):
        check_host("192.0.2.256", "kunde.example", "post@kunde.example",
                   resolver=ZoneResolver({}))


@pytest.mark.parametrize("domain",
                         ["[192.0.2.1]", "localhost", "a..example", "x" * 64 + ".example"])
def test_a_domain_that_cannot_have_spf_is_none_without_asking_dns(domain: str) -> None:
    resolver = ZoneResolver({domain: [{"TXT": "v=spf1 +all"}]})
    outcome = check_host("192.0.2.25", domain, f"post@{domain}", resolver=resolver)
    assert outcome.result == "none"
    assert resolver.queries == []
