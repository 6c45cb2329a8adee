"""The RFC 7208 test suite (openspf/pyspf YAML), every case, exact results.

DNS is answered from each scenario's zone data by ZoneResolver. Where a case
lists several acceptable results any of them passes; where it gives an
explanation the explanation must match exactly ("DEFAULT" stands for the
default explanation, so the driver sets that as the default text).

The older RFC 4408 suite runs too: each of its cases also accepts the RFC 7208
answer (it lists both where the two RFCs differ).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from sendmail_shim.spf import check_host

from .zone_resolver import ZoneResolver

SUITES = Path(__file__).parent / "conformance"
EXPECTED_CASES = 203


def load_cases(name: str = "rfc7208") -> list[tuple[str, dict[str, Any], dict[str, Any]]]:
    cases = []
    with (SUITES / f"{name}-tests.yml").open(encoding="utf-8") as handle:
        for scenario in yaml.safe_load_all(handle):
            for test_id, case in scenario["tests"].items():
                cases.append((test_id, case, scenario["zonedata"]))
    return cases


CASES = load_cases()
OLD_CASES = load_cases("rfc4408")


def test_the_whole_suite_is_collected() -> None:
    assert len(CASES) == EXPECTED_CASES
    assert len({test_id for test_id, _, _ in CASES}) == EXPECTED_CASES


@pytest.mark.parametrize(("test_id", "case", "zonedata"), CASES, ids=[c[0] for c in CASES])
def test_rfc7208(test_id: str, case: dict[str, Any], zonedata: dict[str, Any],
                 conformance_tally: dict[str, bool]) -> None:
    conformance_tally[test_id] = False
    run_case(test_id, case, zonedata)
    conformance_tally[test_id] = True


@pytest.mark.parametrize(("test_id", "case", "zonedata"), OLD_CASES,
                         ids=[c[0] for c in OLD_CASES])
def test_rfc4408(test_id: str, case: dict[str, Any], zonedata: dict[str, Any]) -> None:
    run_case(test_id, case, zonedata)


def run_case(test_id: str, case: dict[str, Any], zonedata: dict[str, Any]) -> None:
    mailfrom, helo = case["mailfrom"], case["helo"]
    domain = mailfrom.rpartition("@")[2] if mailfrom else helo
    outcome = check_host(case["host"], domain, mailfrom, helo=helo,
                         resolver=ZoneResolver(zonedata), default_explanation="DEFAULT")
    expected = case["result"] if isinstance(case["result"], list) else [case["result"]]
    detail = f"{test_id}: {case.get('description', '')}\n" + "\n".join(
        f"  [{s.domain}] {s.term}: {s.detail}" for s in outcome.trace)
    assert outcome.result in expected, detail
    if "explanation" in case:
        assert outcome.explanation == case["explanation"], detail
