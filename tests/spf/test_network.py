"""SPF over real DNS: NetworkResolver against an authoritative server on loopback.

The cases are data (``network/*.yaml``), in the layout of the RFC 7208 suite:
``zonedata`` served by DnsServer, and per test the inputs, the expected result
and optional expectations: ``matched``, ``matched_in``, ``lookups``,
``void_lookups``, ``explanation``, ``problem_contains``, ``within_seconds``
(wall time), ``tcp_queries`` / ``udp_only`` ("name TYPE" seen over TCP / never
over TCP). Knobs: ``budget`` (seconds), ``force_tcp`` (names), and a scenario's
``server`` options (e.g. ``udp_size_limit``).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from sendmail_shim.dnsclient import NetworkResolver
from sendmail_shim.spf import check_host
from tests.support.dnsserver import DnsServer

CASE_DIR = Path(__file__).parent / "network"


def load_cases() -> list[Any]:
    cases = []
    for path in sorted(CASE_DIR.glob("*.yaml")):
        scenario = yaml.safe_load(path.read_text(encoding="utf-8"))
        for test_id, case in scenario["tests"].items():
            cases.append(pytest.param(scenario, case, id=f"{path.stem}/{test_id}"))
    return cases


@pytest.mark.parametrize(("scenario", "case"), load_cases())
def test_spf_over_dns(scenario: dict[str, Any], case: dict[str, Any]) -> None:
    with DnsServer(scenario["zonedata"], **scenario.get("server", {})) as server:
        for name in case.get("force_tcp", []):
            server.force_tcp(name)
        resolver = NetworkResolver([server.address], timeout=5.0)
        mailfrom = case["mailfrom"]
        started = time.monotonic()
        outcome = check_host(case["host"], mailfrom.rpartition("@")[2], mailfrom,
                             helo=case.get("helo", "mail.provider.example"), resolver=resolver,
                             budget=case.get("budget", 10.0), default_explanation="DEFAULT")
        elapsed = time.monotonic() - started
        tcp_seen = {f"{q.name} {q.rdtype}" for q in server.queries if q.transport == "tcp"}

    trace = "\n".join(f"  [{s.domain}] {s.term}: {s.detail}" for s in outcome.trace)
    assert outcome.result == case["result"], trace
    for key in ("matched", "matched_in", "lookups", "void_lookups", "explanation"):
        if key in case:
            assert getattr(outcome, key) == case[key], f"{key}\n{trace}"
    if "problem_contains" in case:
        assert case["problem_contains"] in (outcome.problem or ""), trace
    if "within_seconds" in case:
        assert elapsed < case["within_seconds"]
    for query in case.get("tcp_queries", []):
        assert query in tcp_seen, f"no TCP query for {query}; TCP saw {sorted(tcp_seen)}"
    for query in case.get("udp_only", []):
        assert query not in tcp_seen


def test_every_required_situation_has_a_case() -> None:
    ids = {param.id for param in load_cases()}
    for required in ("include/include-pass-ip4", "macros/exists-by-client-address",
                     "split-strings/split-inside-an-address", "timeout/record-lookup-times-out",
                     "tcp/large-txt-over-tcp", "limits/include-loop", "limits/too-many-lookups",
                     "limits/too-many-void-lookups"):
        assert required in ids
