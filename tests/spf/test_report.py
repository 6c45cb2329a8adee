"""``report``: what ``sendmail-shim spf check DOMAIN [--ip IP] [--json]`` shows."""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest

from sendmail_shim.dnsclient import NetworkResolver
from sendmail_shim.spf import report
from tests.support.dnsserver import DnsServer

ZONE = {
    "kunde.example": [{"TXT": "v=spf1 a:gone.example include:_spf.provider.example -all",
                       "ttl": 600}],
    "_spf.provider.example": [{"TXT": "v=spf1 ip4:192.0.2.25 -all", "ttl": 120}],
}


@pytest.fixture
def resolver() -> Iterator[NetworkResolver]:
    with DnsServer(ZONE, negative_ttl=30) as server:
        yield NetworkResolver([server.address], timeout=2.0)


def test_json_report_has_result_match_lookups_and_trace(resolver: NetworkResolver) -> None:
    data = json.loads(json.dumps(report("kunde.example", ["192.0.2.25", "2001:db8::25"],
                                        resolver=resolver).as_dict()))
    assert data["domain"] == "kunde.example"
    assert data["sender"] == "postmaster@kunde.example"
    first, second = data["results"]
    assert (first["ip"], first["result"], first["matched"]) == (
        "192.0.2.25", "pass", "include:_spf.provider.example")
    assert (first["lookups"], first["lookup_limit"], first["void_lookups"]) == (2, 10, 1)
    assert first["ttl"] == 30  # the void lookup's negative TTL is the smallest
    assert first["record"] == "v=spf1 a:gone.example include:_spf.provider.example -all"
    assert {"depth": 1, "domain": "_spf.provider.example", "term": "ip4:192.0.2.25",
            "detail": "match: pass"} in first["trace"]
    assert (second["ip"], second["result"], second["matched"]) == ("2001:db8::25", "fail", "-all")
    assert "does not authorise 2001:db8::25" in second["explanation"]


def test_text_report_reads_as_an_answer(resolver: NetworkResolver) -> None:
    text = report("Kunde.Example.", ["192.0.2.25"], resolver=resolver).as_text()
    lines = text.splitlines()
    assert lines[0] == "SPF for kunde.example (checked as postmaster@kunde.example)"
    assert ("relay 192.0.2.25: pass (matched include:_spf.provider.example in kunde.example)"
            in lines)
    assert "  DNS lookups: 2 of 10, void lookups: 1 of 2; answers valid for 30 s" in lines
    assert any("[_spf.provider.example] ip4:192.0.2.25: match: pass" in line for line in lines)


def test_report_of_a_missing_domain(resolver: NetworkResolver) -> None:
    result = report("missing.example", ["192.0.2.25"], resolver=resolver)
    assert result.results == {"192.0.2.25": "none"}
    assert not result.all_pass()
