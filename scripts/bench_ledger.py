#!/usr/bin/env python3
"""Ledger benchmark: decisions per second, the cost of a reservation as use grows, and bursts.

A decision is the ledger's share of one message: authorise the sender
(account, binding, From domain), reserve against every rule, settle the
reservation and record the decision. Limits are the provider's rule shape with
limits too high to refuse anything, so every decision does the full work.

Reservation cost: one reservation for a fresh account and for one with 5,000
sends spread over its 30-day window, interleaved, on SQLite and PostgreSQL in
the same run (goal: at most 1.5 times the fresh account's).

Burst: 100 ``sendmail`` processes started at once, in-process (no gate), with
the ledger on PostgreSQL and a loopback STARTTLS upstream: once all from one
account (25 fit its limit), once spread over five accounts (all fit). Goal:
every refusal is a limit, none "busy".

    python scripts/bench_ledger.py                      # SQLite and a throwaway PostgreSQL
    python scripts/bench_ledger.py --backend sqlite --processes 8 --decisions 300
    python scripts/bench_ledger.py --pg-url postgresql://user@host/db --json
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
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

DAY = 86400

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


# --------------------------------------------------------------------------- reservation cost


def history(ledger: Ledger, address: str, sends: int, now: float) -> None:
    """``sends`` single-recipient messages, sent evenly over the 30 days before ``now``."""
    account = ledger.find_account(address)
    assert account is not None
    start, span = now - 30 * DAY + 60, 30 * DAY - 120
    for n in range(sends):
        ledger.settle(ledger.reserve(account, 1, message_id=f"<h{n}@bench>", now=start + n * span / sends), "sent")


def reservation_cost(url: str, sends: int, samples: int) -> dict[str, Any]:
    """Median ms of one reservation: a fresh account against one with ``sends`` in its window."""
    (fresh, _), (busy, _) = prepare(url, 2, False)
    ledger = Ledger(url, limits=ROOMY)
    history(ledger, busy, sends, time.time())
    accounts = {"fresh": ledger.find_account(fresh), "busy": ledger.find_account(busy)}
    times: dict[str, list[float]] = {"fresh": [], "busy": []}
    for n in range(samples + 5):  # interleaved, so that the machine's noise hits both alike
        for name, account in accounts.items():
            assert account is not None
            started = time.perf_counter()
            reservation = ledger.reserve(account, 1, message_id=f"<c{n}@bench>")
            elapsed = time.perf_counter() - started
            ledger.settle(reservation, "released")  # the busy account stays at its history
            if n >= 5:  # the first few warm the caches
                times[name].append(elapsed)
    ledger.close()
    fresh_ms, busy_ms = (round(statistics.median(times[name]) * 1000, 3) for name in ("fresh", "busy"))
    return {"sends_in_window": sends, "samples": samples, "fresh_ms": fresh_ms, "busy_ms": busy_ms,
            "ratio": round(busy_ms / fresh_ms, 2)}


# --------------------------------------------------------------------------- a burst of processes on PostgreSQL


def burst(url: str, callers: int, rounds: int) -> list[dict[str, Any]]:
    """``callers`` in-process sendmail processes at once, per round; what became of each."""
    import trustme

    sys.path.insert(0, str(REPO / "scripts"))
    from bench import installed_sendmail

    from tests.support.shim import dump_toml
    from tests.support.upstream import SmtpUpstream, write_ca

    sendmail, ca = installed_sendmail(), trustme.CA()
    results = []
    with tempfile.TemporaryDirectory(prefix="bench-burst-") as directory, SmtpUpstream(ca) as upstream:
        config = Path(directory) / "config.toml"
        config.write_text(dump_toml({
            "upstream": {"host": "127.0.0.1", "port": upstream.port, "ca_file": str(write_ca(ca, Path(directory)))},
            "ledger": {"url": url}, "spf": {"enabled": False}, "log": {"syslog": False}}))
        env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
        env["SENDMAIL_SHIM_CONFIG"] = str(config)
        for round_number in range(rounds):
            for accounts in (1, 5):
                senders = burst_accounts(url, f"b{round_number}x{accounts}", accounts)
                results.append({"accounts": accounts, **burst_round(sendmail, env, senders, callers)})
    return results


def burst_accounts(url: str, tag: str, count: int) -> list[str]:
    """One customer with ``count`` accounts under the provider's default limits (25 messages / 5 min)."""
    with Ledger(url) as ledger:
        ledger.add_customer(tag)
        return [ledger.add_account(f"site{i}@{tag}.example", tag, authenticated=True).address
                for i in range(count)]


def burst_round(sendmail: str, env: dict[str, str], senders: list[str], callers: int) -> dict[str, Any]:
    started = time.perf_counter()
    processes = [subprocess.Popen([sendmail, "-t", "-i"], stdin=subprocess.PIPE, stderr=subprocess.PIPE,
                                  env=env) for _ in range(callers)]
    for n, process in enumerate(processes):
        assert process.stdin is not None
        process.stdin.write(f"From: {senders[n % len(senders)]}\nTo: ola@x.example\nSubject: {n}\n\n"
                            "hei\n".encode())
        process.stdin.close()
    outcome: dict[str, int] = {"sent": 0, "limit": 0, "busy": 0, "other": 0}
    for process in processes:
        assert process.stderr is not None
        line = process.stderr.read().decode(errors="replace")
        process.wait()
        kind = ("sent" if process.returncode == 0 else "limit" if " reached " in line
                else "busy" if "busy" in line else "other")
        outcome[kind] += 1
        if kind == "other":
            print(f"burst: exit {process.returncode}: {line.strip()}", file=sys.stderr)
    return {**outcome, "callers": callers, "seconds": round(time.perf_counter() - started, 1)}


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


def report_cost(costs: dict[str, dict[str, Any]], bursts: list[dict[str, Any]]) -> None:
    if costs:
        sends = f"{next(iter(costs.values()))['sends_in_window']:,} sends in 30 d"
        print()
        print(f"{'one reservation, median':<26} {'fresh account':>14} {sends:>20} {'ratio':>6}")
        for backend, cost in costs.items():
            print(f"{backend:<26} {cost['fresh_ms']:>11} ms {cost['busy_ms']:>17} ms {cost['ratio']:>6}")
    if bursts:
        print()
        print(f"{'burst on PostgreSQL':<26} {'accounts':>8} {'sent':>5} {'limit':>6} {'busy':>5} {'other':>6} "
              f"{'seconds':>8}")
        for row in bursts:
            print(f"{str(row['callers']) + ' sendmail at once':<26} {row['accounts']:>8} {row['sent']:>5} "
                  f"{row['limit']:>6} {row['busy']:>5} {row['other']:>6} {row['seconds']:>8}")


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
    parser.add_argument("--sends", type=int, default=5000, help="sends in the busy account's 30 days")
    parser.add_argument("--samples", type=int, default=200, help="reservations timed per account")
    parser.add_argument("--callers", type=int, default=100, help="sendmail processes in a burst")
    parser.add_argument("--rounds", type=int, default=2, help="bursts of each kind")
    parser.add_argument("--json", action="store_true")
    options = parser.parse_args()
    results: list[dict[str, Any]] = []
    costs: dict[str, dict[str, Any]] = {}
    bursts: list[dict[str, Any]] = []
    stack: list[Any] = []
    try:
        with tempfile.TemporaryDirectory(prefix="bench-ledger-") as directory:
            urls = {}
            if options.backend in ("sqlite", "all"):
                urls["SQLite"] = f"sqlite:///{directory}/ledger.db"
            if options.backend in ("postgresql", "all") and (pg := postgres_url(options, stack)):
                urls["PostgreSQL 15"] = pg
            for name, url in urls.items():
                results.append(bench_backend("sqlite" if name == "SQLite" else "postgresql", url, options))
            for name, url in urls.items():
                costs[name] = reservation_cost(url, options.sends, options.samples)
            if "PostgreSQL 15" in urls and options.callers:
                bursts = burst(urls["PostgreSQL 15"], options.callers, options.rounds)
        bare_ms = median_ms([sys.executable, "-c", "pass"], options.calls)
    finally:
        for cluster in stack:
            cluster.destroy()
    if options.json:
        print(json.dumps({"bare_python_ms": bare_ms, "results": results, "reservation_cost": costs,
                          "burst": bursts}, indent=2))
    else:
        report(results, bare_ms)
        report_cost(costs, bursts)


if __name__ == "__main__":
    main()
