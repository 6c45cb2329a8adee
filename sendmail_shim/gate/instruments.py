"""The gate's metrics: what it decided and how fast, its connections, its SPF cache, and the ledger's figures.

Updating one costs a counter under a lock, on the connection's own thread and
after the caller has its answer; nothing here asks the ledger per message. The
ledger's figures (queue, customers) are read when Prometheus scrapes, at most once
per ``gauges.CACHE_SECONDS``. docs/metrics.md describes every metric.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from ..gauges import CachedLedgerFamilies, build_info
from ..metrics import Family, Registry
from ..pipeline import Runtime, Verdict

# Seconds. A relay on the same network answers in tens of milliseconds; the upper buckets
# show an upstream that stalls, up to the RFC 5321 timeouts.
UPSTREAM_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
LEDGER_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 10)
DECISION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 120)


class GateMetrics:
    """Every metric the gate serves on ``[metrics] listen``."""

    def __init__(self, runtime: Callable[[], Runtime]) -> None:
        self._runtime = runtime
        self.started = time.time()
        self.registry = registry = Registry()
        self.messages = registry.counter(
            "sendmail_shim_messages", "Messages the gate decided, by verdict (sent, queued, refused) and, "
            "for refusals, the stage that refused them as the mail log names it.", ("verdict", "stage"))
        self.recipients = registry.counter(
            "sendmail_shim_recipients", "Envelope recipients of the messages the gate decided, by verdict.",
            ("verdict",))
        self.decision_seconds = registry.histogram(
            "sendmail_shim_decision_duration_seconds", "Time from the whole message to the verdict, per message.",
            DECISION_BUCKETS)
        self.upstream_seconds = registry.histogram(
            "sendmail_shim_upstream_duration_seconds",
            "Time of the synchronous relay to the upstream, per message that reached it.", UPSTREAM_BUCKETS)
        self.ledger_seconds = registry.histogram(
            "sendmail_shim_ledger_reservation_duration_seconds",
            "Time of the rate-limit reservation in the ledger, per message that got that far.", LEDGER_BUCKETS)
        self.spf_lookups = registry.counter(
            "sendmail_shim_spf_cache_lookups", "SPF verdicts looked up in the ledger's cache: hit or miss.",
            ("result",))
        self.connections = registry.counter(
            "sendmail_shim_gate_connections", "Connections to the gate's socket, by what became of them: "
            "accepted, busy (answered 69: the Unix user's limit), full (answered 69: the gate's limit), "
            "closed (gone before the greeting).", ("outcome",))
        self.dropped = registry.counter(
            "sendmail_shim_gate_requests_dropped", "Accepted requests that got no verdict, or did not take it: "
            "closed, timeout, protocol, connection, undelivered.", ("reason",))
        self.active = registry.gauge("sendmail_shim_gate_connections_active",
                                     "Connections the gate is serving now.")
        self.reloads = registry.counter("sendmail_shim_gate_reloads", "Config reloads (SIGHUP), by result.",
                                        ("result",))
        registry.gauge("sendmail_shim_gate_start_time_seconds", "When the gate started, in seconds since the epoch.",
                       source=lambda: self.started)
        registry.collect(lambda: [build_info()])
        registry.collect(CachedLedgerFamilies(lambda: self._runtime().ledger,
                                              lambda: self._runtime().config.metrics.top_customers))
        for result in ("hit", "miss"):  # present at 0, so that a rate over them is defined from the start
            self.spf_lookups.inc(result, amount=0)
        for result in ("applied", "failed"):
            self.reloads.inc(result, amount=0)

    def decided(self, verdict: Verdict) -> None:
        """One message's verdict: its counters and the times of its slow steps."""
        fields = verdict.fields
        name = str(fields.get("verdict") or "refused")
        stage = str(fields.get("stage") or "") if name == "refused" else ""
        self.messages.inc(name, stage)
        rcpts = fields.get("rcpts")
        if isinstance(rcpts, int) and rcpts > 0:
            self.recipients.inc(name, amount=rcpts)
        for step, histogram in (("decision", self.decision_seconds), ("upstream", self.upstream_seconds),
                                ("reservation", self.ledger_seconds)):
            if step in verdict.timings:
                histogram.observe(verdict.timings[step])

    def families(self) -> list[Family]:
        return self.registry.families()

    def render(self) -> str:
        return self.registry.render()


class CountingSpfCache:
    """The runtime's SPF cache, counting hits and misses on the way (the gate's runtimes get one each)."""

    def __init__(self, inner: object, metrics: GateMetrics) -> None:
        self.inner, self.metrics = inner, metrics

    def get(self, domain: str, ip: str, now: float) -> str | None:
        found: str | None = self.inner.get(domain, ip, now)  # type: ignore[attr-defined]
        self.metrics.spf_lookups.inc("hit" if found is not None else "miss")
        return found

    def put(self, domain: str, ip: str, result: str, expires_at: float) -> None:
        self.inner.put(domain, ip, result, expires_at)  # type: ignore[attr-defined]


def instrument(runtime: Runtime, metrics: GateMetrics | None) -> Runtime:
    """``runtime`` with its SPF cache counted (when the gate serves metrics)."""
    if metrics is not None and not isinstance(runtime.spf_cache, CountingSpfCache):
        runtime.spf_cache = CountingSpfCache(runtime.spf_cache, metrics)  # type: ignore[assignment]
    return runtime
