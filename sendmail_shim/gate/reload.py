"""SIGHUP: read the config file again without dropping a request in flight."""

from __future__ import annotations

import dataclasses
import threading

from .. import maillog, trust
from ..config import Config, ConfigError, load
from ..pipeline import Runtime
from .acceptor import SHUTDOWN_GRACE, Gate
from .errors import GateError
from .events import log_event
from .files import check_private_files
from .guard import TrustGuard
from .instruments import instrument

# ------------------------------------------------------------------ reloading the config

# What a running gate cannot change: its socket and user are fixed at start (and root is gone),
# the egress probe needs root, the trust mode was verified once, and the ledger's connections
# and timeouts are shared by everything in flight, and the upload budget is shared out as it stands.
RESTART_ONLY_GATE_KEYS = ("socket", "user", "backlog", "egress", "trust",
                          "upload_memory", "max_uploads_per_uid")  # and all of [ledger]
RESTART_ONLY_METRICS_KEYS = ("listen",)  # its socket is bound at start, before any reload
_SECTIONS = ("upstream", "ledger", "spf", "limits", "message", "gate", "queue", "log", "metrics", "abuse", "notify")


class ReloadRefused(Exception):
    """The reloaded config cannot be used; the running one is kept. ``str(exc)`` says why."""


class Reloader:
    """SIGHUP: read the config file again and give new connections the result.

    The signal handler only wakes this thread: loading the file and verifying
    a new upstream take time and may fail. Connections already admitted keep
    the runtime they started with (``Gate.switch``); the old upstream is
    closed once the last of them is done. A file that does not load, or an
    upstream that fails the trust checks ``serve`` ran at start, leaves the
    running config in place, and the log says why.
    """

    def __init__(self, gate: Gate, identity: trust.Identity) -> None:
        self.gate, self.identity = gate, identity
        self._wanted, self._closing = threading.Event(), False
        self._thread = threading.Thread(target=self._run, name="gate-reload", daemon=True)
        self._thread.start()

    def request(self) -> None:
        """From the signal handler: nothing here may block or take a lock the main thread holds."""
        self._wanted.set()

    def close(self) -> None:
        self._closing = True
        self._wanted.set()
        self._thread.join(timeout=SHUTDOWN_GRACE)

    def _run(self) -> None:
        while True:
            self._wanted.wait()
            self._wanted.clear()
            if self._closing:
                return
            try:
                self.reload()
            except Exception as exc:  # noqa: BLE001 - a bug in one reload must not end reloading
                log_event(self.gate.config, "err", event="gate-reload-failed", reason=f"{type(exc).__name__}: {exc}",
                     action="kept the running config")

    def reload(self) -> None:
        """One reload, logged: what changed, what needs a restart, or why nothing was applied."""
        running = self.gate.config
        try:
            loaded = load(running.path)
            applied, restart_needed = applicable(running, loaded)
            check_private_files(applied)
            maillog.require_writable(applied, self.identity.name)  # a new [log] file it cannot write
            runtime, guard = self._runtime_for(applied)
        except (ConfigError, GateError, ReloadRefused, trust.TrustError, OSError) as exc:
            log_event(running, "err", event="gate-reload-failed", reason=str(exc), action="kept the running config")
            self._count("failed")
            return
        instrument(runtime, self.gate.metrics)
        self._count("applied")
        old_guard = self.gate.guard
        old = self.gate.switch(runtime, guard, restart_needed)
        if self.gate.recorder is not None:  # its own lines and the summaries follow the new [log]
            self.gate.recorder.config = applied
        log_event(applied, "info", event="gate-reload", changed="; ".join(changes(running, applied)) or "nothing",
             config_sha256=applied.sha256)
        if restart_needed:
            log_event(applied, "warning", event="gate-reload-needs-restart", keys=", ".join(restart_needed),
                 reason="these settings changed in the file but take effect only when the gate restarts "
                        "(systemctl restart sendmail-shim-gate); the running gate keeps the old values")
        if old.upstream is not runtime.upstream:
            threading.Thread(target=self._retire, args=(old, old_guard), name="gate-retire", daemon=True).start()

    def _count(self, result: str) -> None:
        if self.gate.metrics is not None:
            self.gate.metrics.reloads.inc(result)

    def _runtime_for(self, config: Config) -> tuple[Runtime, TrustGuard]:
        """The runtime for ``config``: the running upstream when it is unchanged, else a verified new one."""
        current, guard = self.gate.runtime, self.gate.guard
        ledger = current.ledger.with_limits(config.limits)
        if config.upstream == current.config.upstream:
            runtime = Runtime(config, in_gate=True, ledger=ledger, upstream=current.upstream)
            runtime.holder = current.holder
            return runtime, guard
        runtime = Runtime(config, in_gate=True, ledger=ledger)
        runtime.holder = current.holder
        same_address = (config.upstream.host, config.upstream.port) == (current.config.upstream.host,
                                                                       current.config.upstream.port)
        fresh = TrustGuard(config, self.identity, runtime, guard.egress if same_address else None, None)
        runtime.upstream = fresh.upstream
        try:
            _ = fresh.upstream.tls_context
            fresh.upstream.password()
            assessment = trust.assess(config, fresh.upstream, self.identity, egress=fresh.egress)
        except Exception:
            fresh.upstream.close()
            raise
        if assessment.outcome != trust.VERIFIED:
            fresh.upstream.close()
            raise ReloadRefused(f"the new upstream {config.upstream.host}:{config.upstream.port} is not used, "
                                f"it did not pass the trust checks: {assessment.summary}")
        fresh.adopt(assessment)
        return runtime, fresh

    def _retire(self, old: Runtime, old_guard: TrustGuard) -> None:
        self.gate.wait_until_unused(old)
        if old_guard is not self.gate.guard:
            old_guard.close()
        old.upstream.close()


def applicable(running: Config, loaded: Config) -> tuple[Config, tuple[str, ...]]:
    """``loaded`` with the running values of what needs a restart, and the keys that would have changed."""
    kept_gate = {key: getattr(running.gate, key) for key in RESTART_ONLY_GATE_KEYS}
    restart_needed = [f"gate.{key}" for key, value in kept_gate.items() if getattr(loaded.gate, key) != value]
    restart_needed += [f"ledger.{name}" for name in _changed_fields(running.ledger, loaded.ledger)]
    kept_metrics = {key: getattr(running.metrics, key) for key in RESTART_ONLY_METRICS_KEYS}
    restart_needed += [f"metrics.{key}" for key, value in kept_metrics.items() if getattr(loaded.metrics, key) != value]
    applied = dataclasses.replace(loaded, ledger=running.ledger, gate=dataclasses.replace(loaded.gate, **kept_gate),
                                  metrics=dataclasses.replace(loaded.metrics, **kept_metrics))
    return applied, tuple(restart_needed)


def changes(before: Config, after: Config) -> list[str]:
    """``section.key: old -> new`` for each setting that differs; no secret is shown."""
    found = []
    for section in _SECTIONS:
        old, new = getattr(before, section), getattr(after, section)
        if old is None or new is None:  # an optional section ([notify]) added or removed
            if (old is None) != (new is None):
                found.append(f"{section}: {'off' if old is None else 'on'} -> {'off' if new is None else 'on'}")
            continue
        for name in _changed_fields(old, new):
            found.append(f"{section}.{name}: {_shown(section, getattr(old, name))} -> "
                         f"{_shown(section, getattr(new, name))}")
    return found


def _changed_fields(old: object, new: object) -> list[str]:
    return [f.name for f in dataclasses.fields(old)  # type: ignore[arg-type]
            if getattr(old, f.name) != getattr(new, f.name)]


def _shown(section: str, value: object) -> str:
    if section == "ledger" and isinstance(value, str) and "://" in value:
        from ..ledger.connections import safe_url

        return safe_url(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(str(item) for item in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)
