"""Processes that reserve as fast as they can, for the concurrency tests.

Run as a module it is one "web server": it reads its own config file and
forks worker processes that all start at the same instant::

    python -m tests.ledger.workers --config server-a.toml --accounts a@x.example \\
        --attempts 10 --processes 4 --start-at 1778328000.5
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from collections import Counter
from typing import Any

from sendmail_shim.config import LimitsConfig
from sendmail_shim.ledger import Ledger, LimitReached

FORK = multiprocessing.get_context("fork")


def reserve_many(make_ledger: Any, addresses: list[str], attempts: int, start: Any,
                 results: Any) -> None:
    """Reserve ``attempts`` single-recipient messages, spread over ``addresses``."""
    outcome: Counter[str] = Counter()
    errors: list[str] = []
    try:
        ledger: Ledger = make_ledger()
        accounts = [ledger.find_account(address) for address in addresses]  # also warms up
        start.wait(timeout=60)
        for i in range(attempts):
            account = accounts[i % len(accounts)]
            assert account is not None
            try:
                reservation = ledger.reserve(account, 1, message_id=f"<{os.getpid()}.{i}@test>")
                ledger.settle(reservation, "sent")
                outcome["accepted"] += 1
            except LimitReached:
                outcome["limit"] += 1
    except Exception as exc:  # reported to the test, which fails on any
        errors.append(f"{type(exc).__name__}: {exc}")
    results.put((dict(outcome), errors))


def run_processes(make_ledger: Any, plan: list[tuple[list[str], int]],
                  start_at: float | None = None) -> tuple[Counter[str], list[str]]:
    """Fork one process per (addresses, attempts) in ``plan``; all start together."""
    barrier = FORK.Barrier(len(plan))
    results = FORK.Queue()
    processes = [FORK.Process(target=_after(start_at, reserve_many),
                              args=(make_ledger, addresses, attempts, barrier, results))
                 for addresses, attempts in plan]
    for process in processes:
        process.start()
    total: Counter[str] = Counter()
    errors: list[str] = []
    for _ in processes:
        outcome, failed = results.get(timeout=120)
        total.update(outcome)
        errors += failed
    for process in processes:
        process.join(timeout=30)
    return total, errors


def _after(start_at: float | None, function: Any) -> Any:
    def delayed(*args: Any) -> None:
        if start_at is not None:
            time.sleep(max(0.0, start_at - time.time()))
        function(*args)
    return delayed


class FromUrl:
    """Builds a Ledger in the child (never share connections across fork)."""

    def __init__(self, url: str, limits: LimitsConfig, busy_timeout: float = 10.0) -> None:
        self.url, self.limits, self.busy_timeout = url, limits, busy_timeout

    def __call__(self) -> Ledger:
        return Ledger(self.url, busy_timeout=self.busy_timeout, limits=self.limits)


class FromConfig:
    def __init__(self, path: str) -> None:
        self.path = path

    def __call__(self) -> Ledger:
        from sendmail_shim.config import load

        return Ledger.from_config(load(self.path))


def main(argv: list[str]) -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", required=True)
    parser.add_argument("--accounts", required=True)
    parser.add_argument("--attempts", type=int, required=True)
    parser.add_argument("--processes", type=int, required=True)
    parser.add_argument("--start-at", type=float, required=True)
    options = parser.parse_args(argv)
    addresses = options.accounts.split(",")
    plan = [(addresses, options.attempts)] * options.processes
    total, errors = run_processes(FromConfig(options.config), plan, options.start_at)
    print(json.dumps({"outcome": dict(total), "errors": errors}))


if __name__ == "__main__":
    main(sys.argv[1:])
