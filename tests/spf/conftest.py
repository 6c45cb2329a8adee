from __future__ import annotations

from collections.abc import Iterator

import pytest

_TALLY: dict[str, bool] = {}


@pytest.fixture(scope="module")
def conformance_tally() -> Iterator[dict[str, bool]]:
    """Which RFC 7208 suite cases ran and passed, for the summary line."""
    yield _TALLY


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if _TALLY:
        passed = sum(_TALLY.values())
        terminalreporter.write_line(
            f"RFC 7208 conformance suite: {passed}/{len(_TALLY)} cases passed")
