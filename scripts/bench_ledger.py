#!/usr/bin/env python3
"""Ledger benchmark: decisions per second with concurrent processes, and the per-call cost.

A decision is the ledger's share of one message: authorise the sender
(account, binding, From domain), reserve against every rule, settle the
reservation and record the decision. Limits are the provider's rule shape with
limits too high to refuse anything, so every decision does the full work.

    python scripts/bench_ledger.py                      # SQLite and a throwaway PostgreSQL
    python scripts/bench_ledger.py --backend sqlite --processes 8 --decisions 300
    python scripts/bench_ledger.py --pg-url postgresql://user@host/db --json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from sendmail_shim.accounts import Caller, authorise  # noqa: E402
from sendmail_shim.config import LimitsConfig  # noqa: E402
from sendmail_shim.ledger import Ledger  # noqa: E402
from sendmail_shim.limits import parse_rule  # noqa: E402

FORK = multiprocessing.get_context("fork")
ROOMY = LimitsConfig(
    account=tuple(parse_rule(r) for r in ("100000000 messages / 5m", "100000000 recipients / 5m",
                                          "100000000 recipients / 24h",
                                          "100000000 recipients / 30d")),
    customer=tuple(parse_rule(r) for r in ("100000000 messages / 1h",
                                           "100000000 recipients / 1h")),
)


def decide(ledger: Ledger, address: str, caller: Caller, n: int) -> None:
    account = authorise(ledger, address, address.split("@")[1], caller)
    reservation = ledger.reserve(account, 3, message_id=f"<{n}@bench>")
    ledger.settle(reservation, "sent")
    ledger.record_decision(verdict="sent", code=0, account=account.address,
                           customer=account.customer_id, uid=caller.uid, recipients=3)


def worker(url: str, address: str, user: str, decisions: int, barrier: Any, out: Any) -> None:
    ledger = Ledger(url, limits=ROOMY)
    caller = Caller(uid=2000, user=user)
    decide(ledger, address, caller, -1)  # warm: connection, schema check
    barrier.wait()
    started = time.perf_counter()
    for n in range(decisions):
        decide(ledger, address, caller, n)
    out.put(time.perf_counter() - started)


def prepare(url: str, processes: int, shared_customer: bool) -> list[tuple[str, str]]:
    """Customers and accounts: one customer per process, or one customer for all."""
    ledger = Ledger(url, limits=ROOMY)
    ledger.upgrade()
    tag = f"{int(time.time() * 1000) % 10**8}"
    plan = []
    for i in range(processes):
        customer = f"bench{tag}" if shared_customer else f"bench{tag}-{i}"
        user = f"web{tag}" if shared_customer else f"web{tag}-{i}"
        ledger.add_customer(customer, [user])
        address = f"site{i}@{customer}.example"
        ledger.add_account(address, customer, authenticated=True)
        plan.append((address, user))
    ledger.close()
    return plan


def throughput(url: str, processes: int, decisions: int, shared_customer: bool) -> dict[str, Any]:
    plan = prepare(url, processes, shared_customer)
    barrier, out = FORK.Barrier(processes + 1), FORK.Queue()
    children = [FORK.Process(target=worker, args=(url, address, user, decisions, barrier, out))
                for address, user in plan]
    for child in children:
        child.start()
    barrier.wait()
    started = time.perf_counter()
    per_process = [out.get(timeout=600) for _ in children]
    elapsed = time.perf_counter() - started
    for child in children:
        child.join()
    total = processes * decisions
    return {"customers": "one shared" if shared_customer else "one per process",
            "processes": processes, "decisions": total, "seconds": round(elapsed, 3),
            "decisions_per_second": round(total / elapsed, 1),
            "slowest_process_seconds": round(max(per_process), 3)}


CALL = """
from sendmail_shim.accounts import Caller, authorise
from sendmail_shim.ledger import Ledger
ledger = Ledger({url!r}, via_sqlalchemy={via!r})
account = authorise(ledger, {address!r}, {domain!r}, Caller.current())
ledger.settle(ledger.reserve(account, 1, message_id="<call@bench>"), "sent")
"""


def per_call(url: str, calls: int, via_sqlalchemy: bool = False) -> float:
    """Median wall time (ms) of a fresh process: import + open + authorise + reserve + settle."""
    address = prepare(url, 1, False)[0][0]
    with Ledger(url) as ledger:  # the default limits, widened so that no call is refused
        ledger.set_override("account", address, parse_rule("1000000 messages / 5m"),
                            expires_at=time.time() + 3600, reason="benchmark")
    code = CALL.format(url=url, via=via_sqlalchemy, address=address,
                       domain=address.split("@")[1])
    return median_ms([sys.executable, "-c", code], calls)


def median_ms(command: list[str], calls: int) -> float:
    times = []
    for _ in range(calls):
        started = time.perf_counter()
        subprocess.run(command, check=True, cwd=REPO, env={"PYTHONPATH": str(REPO)})
        times.append(time.perf_counter() - started)
    return round(statistics.median(times) * 1000, 1)


def warm_ms(url: str, decisions: int) -> float:
    """Mean time (ms) of one decision in a warm process."""
    address, user = prepare(url, 1, False)[0]
    ledger = Ledger(url, limits=ROOMY)
    caller = Caller(uid=2000, user=user)
    decide(ledger, address, caller, -1)
    started = time.perf_counter()
    for n in range(decisions):
        decide(ledger, address, caller, n)
    return round((time.perf_counter() - started) / decisions * 1000, 3)


def bench_backend(name: str, url: str, options: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {"backend": name, "throughput": [
        throughput(url, options.processes, options.decisions, shared_customer=False),
        throughput(url, options.processes, options.decisions, shared_customer=True),
    ], "warm_decision_ms": warm_ms(url, min(options.decisions, 200)),
        "fresh_process_call_ms": per_call(url, options.calls)}
    if name == "sqlite":
        result["fresh_process_call_ms_via_sqlalchemy"] = per_call(url, options.calls, True)
    return result


def postgres_url(options: argparse.Namespace, stack: list[Any]) -> str | None:
    if options.pg_url:
        return str(options.pg_url)
    try:
        from tests.support.postgres import PostgresCluster, PostgresUnavailable
    except ImportError:
        return None
    try:
        cluster = PostgresCluster(settings={"fsync": "on", "synchronous_commit": "on",
                                            "full_page_writes": "on"}).start()
    except PostgresUnavailable as exc:
        print(f"PostgreSQL skipped: {exc}", file=sys.stderr)
        return None
    stack.append(cluster)
    return cluster.create_database("bench")


def report(results: list[dict[str, Any]], bare_ms: float) -> None:
    print(f"{'backend':<11} {'customers':<16} {'procs':>5} {'decisions':>9} {'seconds':>8} "
          f"{'decisions/s':>11}")
    for result in results:
        for row in result["throughput"]:
            print(f"{result['backend']:<11} {row['customers']:<16} {row['processes']:>5} "
                  f"{row['decisions']:>9} {row['seconds']:>8} {row['decisions_per_second']:>11}")
    print()
    print(f"fresh process, median: bare python {bare_ms} ms")
    for result in results:
        line = (f"  {result['backend']}: import + open + authorise + reserve + settle "
                f"{result['fresh_process_call_ms']} ms")
        if "fresh_process_call_ms_via_sqlalchemy" in result:
            line += f" (through SQLAlchemy: {result['fresh_process_call_ms_via_sqlalchemy']} ms)"
        print(line)
    for result in results:
        print(f"warm process, one decision: {result['backend']} {result['warm_decision_ms']} ms")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", choices=["sqlite", "postgresql", "all"], default="all")
    parser.add_argument("--processes", type=int, default=8)
    parser.add_argument("--decisions", type=int, default=200, help="per process")
    parser.add_argument("--calls", type=int, default=20, help="fresh processes to time")
    parser.add_argument("--pg-url", help="an existing PostgreSQL database (else a throwaway one)")
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    results: list[dict[str, Any]] = []
    stack: list[Any] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ledger-") as directory:
            if options.backend in ("sqlite", "all"):
                results.append(bench_backend("sqlite", f"sqlite:///{directory}/ledger.db",
                                             options))
            if options.backend in ("postgresql", "all"):
                url = postgres_url(options, stack)
                if url:
                    results.append(bench_backend("postgresql", url, options))
        bare_ms = median_ms([sys.executable, "-c", "pass"], options.calls)
    finally:
        for cluster in stack:
            cluster.destroy()
    if options.json:
        print(json.dumps({"bare_python_ms": bare_ms, "results": results}, indent=2))
    else:
        report(results, bare_ms)


if __name__ == "__main__":
    main()
