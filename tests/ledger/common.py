"""Shared code for the ledger and admin CLI tests."""

from __future__ import annotations

import calendar
import os
import shutil
import subprocess
import sys
from collections.abc import Iterable, Sequence
from pathlib import Path

import pytest

from sendmail_shim.config import LimitsConfig
from sendmail_shim.ledger import AccountEntry, Ledger, SendRecord
from sendmail_shim.limits import Rule, parse_rule

# 2026-05-09 12:00:00 UTC: the "now" most deterministic tests start from.
NOON = float(calendar.timegm((2026, 5, 9, 12, 0, 0)))
PYTHON = sys.executable
REPO = Path(__file__).resolve().parents[2]


def limits(account: Sequence[str] = (), customer: Sequence[str] = ()) -> LimitsConfig:
    return LimitsConfig(account=tuple(parse_rule(r) for r in account),
                        customer=tuple(parse_rule(r) for r in customer))


def open_ledger(url: str, limits_config: LimitsConfig | None = None) -> Ledger:
    """An upgraded ledger (the provider's default limits unless others are given)."""
    ledger = Ledger(url, limits=limits_config)
    ledger.upgrade()
    return ledger


def add_account(ledger: Ledger, address: str = "post@kunde.example", customer: str = "kunde1",
                *, users: Iterable[str] = (), authenticated: bool = True) -> AccountEntry:
    ledger.add_customer(customer, tuple(users))
    return ledger.add_account(address, customer, authenticated=authenticated)


def write_config(directory: Path, ledger_url: str, *, account_rules: Sequence[str] | None = None,
                 customer_rules: Sequence[str] | None = None, busy_timeout: float = 10.0) -> Path:
    """A minimal valid config file naming the given ledger."""
    lines = ['[upstream]', 'host = "smtp.example.net"', '[ledger]', f'url = "{ledger_url}"',
             f'busy_timeout = {busy_timeout}', '[spf]', 'enabled = false']
    if account_rules is not None or customer_rules is not None:
        lines.append('[limits]')
        if account_rules is not None:
            lines.append("account = [" + ", ".join(f'"{r}"' for r in account_rules) + "]")
        if customer_rules is not None:
            lines.append("customer = [" + ", ".join(f'"{r}"' for r in customer_rules) + "]")
    path = directory / "config.toml"
    path.write_text("\n".join(lines) + "\n")
    return path


def window_peaks(sends: Sequence[SendRecord], rule: Rule) -> int:
    """The largest usage of ``rule`` over any window (t - W, t], by brute force.

    Usage only grows at a send's instant, so checking those instants covers every instant.
    """
    window = rule.window_seconds * 1_000_000
    times = [(round(s.at * 1_000_000), 1 if rule.metric == "messages" else s.recipients)
             for s in sends]
    peak = 0
    for end, _ in times:
        peak = max(peak, sum(size for at, size in times if end - window < at <= end))
    return peak


def without_file_privileges() -> list[str]:
    """A command prefix under which file permission bits apply, even to root.

    Root normally ignores them (CAP_DAC_OVERRIDE); dropping those capabilities
    makes a read-only ledger really read-only for the child.
    """
    if os.geteuid() != 0:
        return []
    if shutil.which("setpriv") is None:
        pytest.skip("running as root and setpriv (util-linux) is missing")
    caps = "-dac_override,-dac_read_search,-fowner"
    return ["setpriv", "--bounding-set", caps, "--inh-caps", caps, "--"]


def run_python(code: str, *, unprivileged: bool = False, env: dict[str, str] | None = None,
               timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run a Python snippet in a fresh interpreter (optionally bound by file permissions)."""
    prefix = without_file_privileges() if unprivileged else []
    full_env = {**os.environ, "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run([*prefix, PYTHON, "-c", code], capture_output=True, text=True,
                          timeout=timeout, env=full_env, cwd=REPO)
