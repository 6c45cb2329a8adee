"""Starting and stopping the gate: who it runs as, what it checks first, its start line."""

from __future__ import annotations

import os
import signal
import sys
import threading
from collections.abc import Callable

from .. import __version__, exitcodes, maillog, trust
from ..config import Config, ConfigError
from ..ledger import iso_utc
from ..pipeline import Runtime
from .acceptor import Gate
from .budget import UploadBudget
from .errors import GateError, LedgerNotReady, RootRefused
from .events import log_event
from .files import check_private_files
from .guard import Prober, TrustGuard
from .instruments import GateMetrics, instrument
from .listener import Listener, inherited_socket, notify_systemd_ready, open_listener
from .metrics_http import MetricsServer, open_metrics_server
from .recorder import Recorder
from .reload import Reloader

# ------------------------------------------------------------------ entry points


def serve(config: Config, *, user: str | None = None, ready: Callable[[], None] | None = None) -> int:
    """Run the gate until SIGTERM or SIGINT; 0 after a graceful stop.

    Started as root, ``user`` is the Unix user the gate becomes once the
    checks that need root are done. ``ready`` is called once the socket
    accepts connections (default: tell systemd, when it asks with
    ``NOTIFY_SOCKET``). Raises GateError, TrustError or ConfigError when the
    gate cannot start; returns 78 when a relay that was down at start turns
    out to be open to everyone.
    """
    identity = serving_identity(config, user)
    egress, prober = _egress_as_root(config, identity)
    inherited = inherited_socket()
    # Bound while root is still there: a UNIX socket may go in root's /run/sendmail-shim.
    metrics, exporter = _metrics(config, identity, lambda: gate.runtime)
    if os.geteuid() == 0:
        drop_privileges(identity)
    check_private_files(config)
    maillog.require_writable(config, identity.name)  # a log file it cannot write stops the start
    runtime = Runtime(config, in_gate=True)
    runtime.holder = gate_holder(config, runtime.hostname)
    guard = TrustGuard(config, identity, runtime, egress, prober)
    runtime.upstream = guard.upstream
    warm_up(runtime)
    guard.start()  # verified: the upstream keeps a secured connection ready from here on
    listener = open_listener(config.gate, inherited)
    report_unsettled(runtime)  # before the first caller: every reservation of ours now is a dead run's
    recorder = Recorder(config)
    gate = Gate(listener, instrument(runtime, metrics), guard, recorder, UploadBudget(config), metrics)
    reloader = Reloader(gate, identity)
    housekeeping = runtime.ledger.housekeeping(lambda event, fields: log_event(
        gate.config, "warning" if fields.get("failed") else "info", event=event, **fields))
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: gate.stop())
        signal.signal(signal.SIGHUP, lambda *_: reloader.request())
    log_event(config, "info", event="gate-start", **start_fields(config, runtime, listener, guard),
              metrics=exporter.where if exporter else None)
    if exporter is not None:
        exporter.start()
    (ready or notify_systemd_ready)()
    housekeeping.start()  # timed-out reservations every minute, pruning every hour
    try:
        gate.run()
    finally:
        if exporter is not None:
            exporter.close()
        reloader.close()
        housekeeping.stop()
        gate.guard.close()
        listener.close()
        recorder.close()  # what was answered is recorded before the gate goes
        gate.runtime.upstream.close()
        runtime.ledger.close()  # every reloaded runtime shares this one's connections
        maillog.flush(gate.config.log, everything=True)  # what was suppressed is counted before the gate goes
        log_event(gate.config, "info", event="gate-stop", socket=listener.where, pid=os.getpid())
    return gate.exit_code


def main(argv: list[str] | None = None) -> None:
    """``python -m sendmail_shim.gate [--user USER]``: the gate with the usual config file."""
    from ..config import load
    from ..ledger import LedgerError

    args = sys.argv[1:] if argv is None else argv
    user = args[1] if len(args) == 2 and args[0] == "--user" else None
    if args and user is None:
        sys.stderr.write("usage: python -m sendmail_shim.gate [--user USER]\n")
        sys.exit(exitcodes.EX_USAGE)
    try:
        code = serve(load(), user=user)
    except (ConfigError, GateError, LedgerError, trust.TrustError) as exc:
        sys.stderr.write(f"sendmail-shim: {exc}\n")
        code = exitcodes.exit_code_for(exc)
    sys.exit(code)


def _metrics(config: Config, identity: trust.Identity,
             runtime: Callable[[], Runtime]) -> tuple[GateMetrics | None, MetricsServer | None]:
    """The gate's metrics and their server, when ``[metrics] listen`` is set (bound now, started later)."""
    if config.metrics.listen is None:
        return None, None
    metrics = GateMetrics(runtime)
    return metrics, open_metrics_server(config.metrics, metrics.render, identity)


# ------------------------------------------------------------------ who the gate runs as


def serving_identity(config: Config, user: str | None) -> trust.Identity:
    """The user the gate serves as; refuses root, and a user that ``[gate] user`` contradicts."""
    euid = os.geteuid()
    if user is None:
        if euid == 0:
            raise RootRefused("the gate will not run as root: start it with --user USER to become the "
                              "gate's own user once the start checks are done (sendmail-shim serve --user "
                              "sendmail-shim, as the packaged unit does), or start it as that user")
        identity = trust.Identity.of_uid(euid)
    else:
        import pwd

        try:
            entry = pwd.getpwnam(user)
        except KeyError:
            raise RootRefused(f"--user {user}: no Unix user of that name") from None
        identity = trust.Identity(entry.pw_name, entry.pw_uid, entry.pw_gid)
        if identity.uid == 0:
            raise RootRefused("--user must name the gate's own user, not root")
        if euid not in (0, identity.uid):
            raise RootRefused(f"--user {user} needs the gate to be started as root (it runs as uid {euid})")
    wanted = config.gate.user
    if wanted is not None and wanted != identity.name:
        raise RootRefused(f"[gate] user is {wanted}, but the gate would run as {identity.name}; sendmail "
                          f"would refuse to talk to it. Start it as {wanted} (--user {wanted}) or fix [gate] user")
    return identity


def drop_privileges(identity: trust.Identity) -> None:
    """Become ``identity`` for good: no supplementary groups, and no way back to root."""
    os.setgroups([])
    os.setgid(identity.gid)
    os.setuid(identity.uid)  # from root, this clears the saved uid too: setuid(0) must now fail
    try:
        os.setuid(0)
    except PermissionError:
        pass
    else:  # pragma: no cover - the kernel would have to be lying
        raise RootRefused("could not drop root privileges irrevocably; refusing to serve")
    if os.getresuid() != (identity.uid,) * 3 or os.getresgid() != (identity.gid,) * 3 or os.getgroups():
        raise RootRefused(f"could not become {identity.name} completely; refusing to serve")


def _egress_as_root(config: Config, identity: trust.Identity) -> tuple[trust.Probe | None, Prober | None]:
    """The egress probe, which must run before root is given up; and a prober for later, if needed."""
    if os.geteuid() != 0 or config.gate.egress != "restricted" or config.gate.trust == "single-tenant":
        return None, None
    probe = trust.egress_probe(config.upstream, identity, may_switch_uid=True)
    prober = Prober.start(config, identity) if probe.outcome == trust.UNKNOWN else None
    return probe, prober


def gate_holder(config: Config, hostname: str) -> str:
    """The name this gate puts on its reservations: one gate per host and socket, across restarts."""
    return f"gate {hostname} {config.gate.socket or '(systemd socket)'}"[:300]


def report_unsettled(runtime: Runtime) -> None:
    """Log, as outcome unknown, each reservation a previous run of this gate left unsettled.

    That run died between committing the reservation and settling it: the
    upstream may or may not have the message, so it counts on (until the
    reservation times out), and the admin gets its Message-ID, Unix user and
    account to check with the relay.
    """
    from ..ledger import LedgerError

    assert runtime.holder is not None
    try:
        unsettled = runtime.ledger.claim_unsettled(runtime.holder)
    except LedgerError as exc:
        log_event(runtime.config, "warning", event="gate-unsettled-unchecked", reason=str(exc))
        return
    for send in unsettled:
        log_event(runtime.config, "warning", event="gate-outcome-unknown", send=send.id, msgid=send.message_id,
             uid=send.uid, account=send.account, customer=send.customer_id, rcpts=send.recipients,
             reserved_at=iso_utc(send.at),
             reason="the mail gate stopped while relaying this message; the upstream may have it, so it "
                    "counts against the limits until [ledger] reservation_timeout; check the relay's log for "
                    "its Message-ID before sending it again")


def start_fields(config: Config, runtime: Runtime, listener: Listener, guard: TrustGuard) -> dict[str, object]:
    """The start line: enough to tell from the log alone which gate runs, and how."""
    return {"version": __version__, "socket": listener.where, "pid": os.getpid(), "uid": os.geteuid(),
            "activated": listener.inherited, "backlog": listener.backlog,
            "upstream": f"{config.upstream.host}:{config.upstream.port}", "ledger": runtime.ledger.where,
            "rules": rule_summary(config), "trust": guard.state, "trust_mode": guard.mode or "not yet verified",
            "config_sha256": config.sha256}


def rule_summary(config: Config) -> str:
    account = ", ".join(str(rule) for rule in config.limits.account)
    customer = ", ".join(str(rule) for rule in config.limits.customer)
    return f"account: {account}; customer: {customer}"


def warm_up(runtime: Runtime) -> None:
    """Load what every message needs now, so that a broken file stops the start, not a customer."""
    _ = runtime.upstream.tls_context
    runtime.upstream.password()
    _warm_ledger(runtime)


def _warm_ledger(runtime: Runtime) -> None:
    """Open the ledger connection; a missing or outdated schema stops the start.

    A database that is merely down does not: each message then fails closed
    (exit 69) until it is back, and the gate need not be restarted. Any other
    ledger error stops the start with its own line and exit code.
    """
    from ..ledger import LedgerUnavailable

    try:
        status = runtime.ledger.schema_status()
    except LedgerUnavailable as exc:
        log_event(runtime.config, "warning", event="gate-ledger-unavailable", reason=str(exc))
        return
    if status.pending or status.unknown:
        raise LedgerNotReady(f"the ledger {runtime.ledger.where} is not at this version's schema; "
                             f"run: sendmail-shim db upgrade")
