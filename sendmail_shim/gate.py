"""The gate: the local service that ``sendmail`` submits through on shared servers.

It runs under its own system user, owns the ledger, the queue and the relay
credentials, and listens on the UNIX socket ``[gate] socket`` (mode 0666 in a
directory only root or the gate can write, like OpenSMTPD's control socket).
Each connection is one message framed as ``gate_protocol`` describes. The
caller's identity comes from the kernel (``SO_PEERCRED``), never from argv,
the environment or headers; the gate re-parses the arguments itself and runs
the same pipeline as ``sendmail`` in-process, with one warm ``Runtime``.

Bounds: a connection gets ``[gate] request_timeout`` to deliver its request,
at most ``[gate] max_connections_per_uid`` run at once per Unix user and
``MAX_CONNECTIONS`` in all, frames have fixed maximum sizes and the message
``[message] max_size``. A message that grows past ``LARGE_MESSAGE`` waits for
a share of ``[gate] upload_memory`` before it is read on, at most ``[gate]
max_uploads_per_uid`` of them per Unix user at once (``UploadBudget``): small
messages never wait. A refused or broken connection never touches the ledger
or the upstream, and costs other callers nothing.

Before serving, the gate verifies that sites cannot reach the relay past it
(``trust.py``), refuses to run as root unless told which user to become
(``--user``, after the checks that need root), and refuses a socket whose
directory, or any parent, others could replace.

SIGTERM or SIGINT stop accepting, let the requests in progress finish (for at
most ``SHUTDOWN_GRACE`` seconds) and exit 0. SIGHUP reloads the config file
(``Reloader``): requests in progress finish with the config they started with.

Each reservation the gate commits names the gate (``holder``) before the
message goes to the upstream; a gate killed before settling one finds it at
its next start and logs its outcome as unknown (``report_unsettled``). Under systemd the listening
socket may be handed over (``LISTEN_FDS``, see packaging/systemd), so
connections made during a restart wait in the socket instead of failing.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import queue
import re
import selectors
import signal
import socket
import stat
import struct
import sys
import threading
import time
from collections.abc import Callable
from typing import BinaryIO, cast

from . import __version__, exitcodes, maillog, trust
from . import gate_protocol as protocol
from .config import Config, ConfigError, GateConfig, check_private_file, load
from .invocation import UsageError, parse_argv
from .ledger import iso_utc
from .message import MessageError, read_input
from .pipeline import Caller, Record, Runtime, Verdict, decide, record_together, refuse
from .relay import Upstream, UpstreamUnavailable

MAX_CONNECTIONS = 256  # in all, whoever the callers are; each holds at most one message
MAX_RECORDS_PER_COMMIT = 64  # messages whose bookkeeping shares one ledger commit, at most
BUSY_LOG_INTERVAL = 10.0  # one gate-busy line per uid this often, with a count: a flood must not flood the log
TRUST_RETRY_FIRST, TRUST_RETRY_LONGEST = 5.0, 60.0  # re-probing a relay that was down at start
SOMAXCONN_FILE = "/proc/sys/net/core/somaxconn"
SHUTDOWN_GRACE = 30.0
LOG_FLUSH_INTERVAL = 1.0  # the recorder wakes this often when idle, to write the log's due summaries
SEND_TIMEOUT = 10.0  # for writing a verdict to a caller that does not read it
SD_LISTEN_FDS_START = 3
LARGE_MESSAGE = 1024 * 1024  # a message past this many bytes waits for a share of [gate] upload_memory
# What the gate holds at its peak per byte of a message: the input, its lines, the bytes for DATA
# (measured with tracemalloc: about 3.5; the rest is room for the allocator).
MEMORY_PER_BYTE = 4
WAIT_SHARE = 0.75  # of request_timeout, at most, spent waiting for a share: the rest is for reading on
_PEERCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_PASSWORD_IN_URL = re.compile(r"^[^:/]+://[^/@:]*:[^/@]+@|[?&]password=", re.IGNORECASE)


class GateError(Exception):
    """The gate cannot start. ``str(exc)`` is the one line the admin sees."""


class SocketInUse(GateError):
    """Another gate already answers on the socket."""


class UnsafeSocketPlace(GateError):
    """The socket cannot be created, or could be replaced by other users."""


class ExposedSecret(GateError):
    """A file the gate protects can be read or changed by other users."""


class ActivationError(GateError):
    """systemd handed over something that is not a UNIX stream socket."""


class RootRefused(GateError):
    """Started as root without a user to become, or told to become a user it cannot."""


class LedgerNotReady(GateError):
    """The ledger's schema is not this version's."""


class UploadsBusy(Exception):
    """A large message found no share of ``[gate] upload_memory`` in time; nothing was sent (exit 69)."""


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
    inherited = _inherited_socket()
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
    gate = Gate(listener, runtime, guard, recorder, UploadBudget(config))
    reloader = Reloader(gate, identity)
    housekeeping = runtime.ledger.housekeeping(lambda event, fields: _log(
        gate.config, "warning" if fields.get("failed") else "info", event=event, **fields))
    if threading.current_thread() is threading.main_thread():
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, lambda *_: gate.stop())
        signal.signal(signal.SIGHUP, lambda *_: reloader.request())
    _log(config, "info", event="gate-start", **start_fields(config, runtime, listener, guard))
    (ready or _notify_systemd_ready)()
    housekeeping.start()  # timed-out reservations every minute, pruning every hour
    try:
        gate.run()
    finally:
        reloader.close()
        housekeeping.stop()
        gate.guard.close()
        listener.close()
        recorder.close()  # what was answered is recorded before the gate goes
        gate.runtime.upstream.close()
        runtime.ledger.close()  # every reloaded runtime shares this one's connections
        maillog.flush(gate.config.log, everything=True)  # what was suppressed is counted before the gate goes
        _log(gate.config, "info", event="gate-stop", socket=listener.where, pid=os.getpid())
    return gate.exit_code


def main(argv: list[str] | None = None) -> None:
    """``python -m sendmail_shim.gate [--user USER]``: the gate with the usual config file."""
    from .config import load
    from .ledger import LedgerError

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
    from .ledger import LedgerError

    assert runtime.holder is not None
    try:
        unsettled = runtime.ledger.claim_unsettled(runtime.holder)
    except LedgerError as exc:
        _log(runtime.config, "warning", event="gate-unsettled-unchecked", reason=str(exc))
        return
    for send in unsettled:
        _log(runtime.config, "warning", event="gate-outcome-unknown", send=send.id, msgid=send.message_id,
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
    from .ledger import LedgerUnavailable

    try:
        status = runtime.ledger.schema_status()
    except LedgerUnavailable as exc:
        _log(runtime.config, "warning", event="gate-ledger-unavailable", reason=str(exc))
        return
    if status.pending or status.unknown:
        raise LedgerNotReady(f"the ledger {runtime.ledger.where} is not at this version's schema; "
                             f"run: sendmail-shim db upgrade")


# ------------------------------------------------------------------ trust in the relay


class GuardedUpstream(Upstream):
    """The upstream, held back while the gate cannot yet tell that the relay is its alone."""

    def __init__(self, runtime: Runtime, guard: TrustGuard) -> None:
        super().__init__(runtime.config.upstream, runtime.config.path, reuse=True)
        self.guard = guard

    def send(self, *args: object, **kwargs: object) -> object:  # type: ignore[override]
        pending = self.guard.pending
        if pending is not None:
            # Temporary: with the queue on, the message waits (exit 0) until the relay is verified.
            raise UpstreamUnavailable(f"the mail gate has not yet verified that only it can reach the relay "
                                      f"({pending}); nothing was sent", stage="trust")
        return super().send(*args, **kwargs)  # type: ignore[arg-type]


class TrustGuard:
    """Verifies at start that only the gate can reach the relay, and keeps checking while it cannot tell.

    A relay that is down at start cannot be asked. Refusing to start would
    turn a relay outage into refused mail for every site, and trusting it
    unverified would open the gate's bypass: so the gate starts, holds every
    message back (the queue keeps it, exit 0; without the queue it is 69),
    and asks again with backoff. Verified: mail flows. Refuted: the gate
    stops with 78.
    """

    def __init__(self, config: Config, identity: trust.Identity, runtime: Runtime,
                 egress: trust.Probe | None, prober: Prober | None) -> None:
        self.config, self.identity = config, identity
        self.egress, self.prober = egress, prober
        self.upstream = GuardedUpstream(runtime, self)
        self.pending: str | None = None
        self.state, self.mode = "unverified", ""
        self.on_refuted: Callable[[], None] = lambda: None
        self._stopping = threading.Event()
        self._watcher: threading.Thread | None = None

    def start(self) -> None:
        """Assess now: raise TrustError when refuted; watch in the background when it cannot be told."""
        assessment = trust.assess(self.config, self.upstream, self.identity, egress=self.egress)
        if assessment.outcome == trust.REFUTED:
            raise trust.refusal(assessment, self.identity)
        if assessment.outcome == trust.VERIFIED:
            self._verified(assessment)
            return
        self.pending, self.state = assessment.summary, "pending"
        _log(self.config, "warning", event="gate-trust-pending", reason=assessment.summary,
             action="holding mail in the queue until the relay can be verified")
        self._watcher = threading.Thread(target=self._watch, name="gate-trust", daemon=True)
        self._watcher.start()

    def _watch(self) -> None:
        delay = TRUST_RETRY_FIRST
        while not self._stopping.wait(delay):
            egress = self.prober.probe() if self.prober is not None else None
            assessment = trust.assess(self.config, self.upstream, self.identity, egress=egress)
            if assessment.outcome == trust.VERIFIED:
                self._verified(assessment)
                return
            if assessment.outcome == trust.REFUTED:
                self.state = "refuted"
                line = str(trust.refusal(assessment, self.identity))
                _log(self.config, "err", event="gate-trust-refuted", reason=line)
                self.on_refuted()
                return
            self.pending = assessment.summary
            delay = min(delay * 2, TRUST_RETRY_LONGEST)

    def _verified(self, assessment: trust.Assessment) -> None:
        self.state, self.mode, self.pending = "verified", assessment.mode, None
        if assessment.mode == "single-tenant":
            _log(self.config, "warning", event="gate-single-tenant",
                 reason="[gate] trust = \"single-tenant\": nothing keeps local users from reaching the relay "
                        "without the gate; never use this on a server with more than one customer")
        else:
            _log(self.config, "info", event="gate-trust-verified", mode=assessment.mode, reason=assessment.summary)
        if self.prober is not None:
            self.prober.close()
            self.prober = None
        self.upstream.keep_ready()  # from now on a message need not wait for TCP, TLS and AUTH

    def adopt(self, assessment: trust.Assessment) -> None:
        """A reload verified this guard's upstream before using it."""
        self._verified(assessment)

    def close(self) -> None:
        self._stopping.set()
        if self.prober is not None:
            self.prober.close()


class Prober:
    """A root child kept only while a relay that was down at start must still be probed as another user.

    It reads one byte per question on its socket, answers with the egress
    probe as JSON, and takes no other input; it exits when the gate closes the socket.
    """

    def __init__(self, sock: socket.socket, pid: int) -> None:
        self.sock, self.pid = sock, pid

    @classmethod
    def start(cls, config: Config, identity: trust.Identity) -> Prober:
        mine, theirs = socket.socketpair()
        pid = os.fork()
        if pid == 0:  # pragma: no cover - the child's work is seen through its answers
            mine.close()
            os.closerange(3, theirs.fileno())
            _answer_probes(theirs, config, identity)
            os._exit(0)
        theirs.close()
        return cls(mine, pid)

    def probe(self) -> trust.Probe:
        import json

        try:
            self.sock.sendall(b"?")
            answer = self.sock.makefile("rb").readline()
            found = json.loads(answer)
            return trust.Probe(found["outcome"], found["found"])
        except (OSError, ValueError, KeyError):
            return trust.Probe(trust.UNKNOWN, "the egress prober is gone")

    def close(self) -> None:
        self.sock.close()
        with contextlib.suppress(ChildProcessError):
            os.waitpid(self.pid, 0)


def _answer_probes(sock: socket.socket, config: Config, identity: trust.Identity) -> None:  # pragma: no cover
    import json

    while sock.recv(1):
        probe = trust.egress_probe(config.upstream, identity, may_switch_uid=True)
        sock.sendall(json.dumps({"outcome": probe.outcome, "found": probe.found}).encode() + b"\n")


# ------------------------------------------------------------------ reloading the config

# What a running gate cannot change: its socket and user are fixed at start (and root is gone),
# the egress probe needs root, the trust mode was verified once, and the ledger's connections
# and timeouts are shared by everything in flight, and the upload budget is shared out as it stands.
RESTART_ONLY_GATE_KEYS = ("socket", "user", "backlog", "egress", "trust",
                          "upload_memory", "max_uploads_per_uid")  # and all of [ledger]
_SECTIONS = ("upstream", "ledger", "spf", "limits", "message", "gate", "queue", "log")


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
                _log(self.gate.config, "err", event="gate-reload-failed", reason=f"{type(exc).__name__}: {exc}",
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
            _log(running, "err", event="gate-reload-failed", reason=str(exc), action="kept the running config")
            return
        old_guard = self.gate.guard
        old = self.gate.switch(runtime, guard, restart_needed)
        if self.gate.recorder is not None:  # its own lines and the summaries follow the new [log]
            self.gate.recorder.config = applied
        _log(applied, "info", event="gate-reload", changed="; ".join(changes(running, applied)) or "nothing",
             config_sha256=applied.sha256)
        if restart_needed:
            _log(applied, "warning", event="gate-reload-needs-restart", keys=", ".join(restart_needed),
                 reason="these settings changed in the file but take effect only when the gate restarts "
                        "(systemctl restart sendmail-shim-gate); the running gate keeps the old values")
        if old.upstream is not runtime.upstream:
            threading.Thread(target=self._retire, args=(old, old_guard), name="gate-retire", daemon=True).start()

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
    applied = dataclasses.replace(loaded, ledger=running.ledger, gate=dataclasses.replace(loaded.gate, **kept_gate))
    return applied, tuple(restart_needed)


def changes(before: Config, after: Config) -> list[str]:
    """``section.key: old -> new`` for each setting that differs; no secret is shown."""
    found = []
    for section in _SECTIONS:
        old, new = getattr(before, section), getattr(after, section)
        for name in _changed_fields(old, new):
            found.append(f"{section}.{name}: {_shown(section, getattr(old, name))} -> "
                         f"{_shown(section, getattr(new, name))}")
    return found


def _changed_fields(old: object, new: object) -> list[str]:
    return [f.name for f in dataclasses.fields(old)  # type: ignore[arg-type]
            if getattr(old, f.name) != getattr(new, f.name)]


def _shown(section: str, value: object) -> str:
    if section == "ledger" and isinstance(value, str) and "://" in value:
        from .ledger.connections import safe_url

        return safe_url(value)
    if isinstance(value, tuple):
        return "[" + ", ".join(str(item) for item in value) + "]"
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def gate_status(gate: Gate) -> Callable[[], dict[str, object]]:
    """The answer to the ``status`` question: non-secret facts only (see gate_protocol).

    ``config`` is the config the gate runs now (after its last reload); ``restart_needed``
    lists the keys of that file the running gate could not take without a restart.
    """
    started = time.time()

    def status() -> dict[str, object]:
        config, guard = gate.config, gate.guard
        return {"version": __version__, "pid": os.getpid(), "uid": os.geteuid(), "user": guard.identity.name,
                "config": {"path": os.path.abspath(config.path), "sha256": config.sha256,
                           "loaded_at": iso_utc(gate.loaded_at or started),
                           "restart_needed": list(gate.restart_needed)},
                "started_at": iso_utc(started), "trust": {"state": guard.state, "mode": guard.mode},
                "socket": gate.listener.where, "backlog": gate.listener.backlog}

    return status


# ------------------------------------------------------------------ files the gate guards


def check_private_files(config: Config) -> None:
    """Refuse to start when customers could read or change what the gate protects."""
    _check_ledger_file(config)
    if config.upstream.password_file:
        check_private_file(config.path, "upstream.password_file", config.upstream.password_file)
    if _PASSWORD_IN_URL.search(config.ledger.url) and _mode(config.path) & stat.S_IROTH:
        raise ExposedSecret(
            f"{config.path} holds the ledger password in [ledger] url and every user can read it; "
            f"run: chmod 640 {config.path} (sendmail reads only [gate] from a file of its own), "
            f"or let PostgreSQL authenticate the gate's user without a password"
        )


def _check_ledger_file(config: Config) -> None:
    from .ledger import Ledger

    ledger = Ledger(config.ledger.url)
    if ledger.dialect != "sqlite" or not os.path.exists(ledger.where):
        return
    check_private_file(config.path, "ledger.url", ledger.where)
    directory = os.path.dirname(os.path.abspath(ledger.where))
    if _mode(directory) & (stat.S_IWGRP | stat.S_IWOTH):
        raise ExposedSecret(f"{directory}, the ledger's directory, is writable by other users; "
                            f"run: chmod 750 {directory}")


def _mode(path: str) -> int:
    try:
        return os.stat(path).st_mode
    except OSError:
        return 0


# ------------------------------------------------------------------ the listening socket


class Listener:
    """The listening socket, bound here or handed over by systemd."""

    def __init__(self, sock: socket.socket, where: str, *, inherited: bool, backlog: int | None = None) -> None:
        self.sock, self.where, self.inherited, self.backlog = sock, where, inherited, backlog
        self._inode = None if inherited else os.stat(where).st_ino

    def close(self) -> None:
        self.sock.close()
        inode, self._inode = self._inode, None
        if inode is not None:
            # Only our own socket file: a successor may already have bound a new one.
            with contextlib.suppress(OSError):
                if os.stat(self.where).st_ino == inode:
                    os.unlink(self.where)


def open_listener(config: GateConfig, inherited: socket.socket | None = None) -> Listener:
    if inherited is not None:
        return Listener(inherited, config.socket or "(systemd socket)", inherited=True)
    if not config.socket:
        raise UnsafeSocketPlace("[gate] socket is not set; set it (e.g. /run/sendmail-shim/gate.sock)")
    backlog = listen_backlog(config.backlog)
    return Listener(_bind(config.socket, backlog), config.socket, inherited=False, backlog=backlog)


def listen_backlog(wanted: int) -> int:
    """``[gate] backlog``, capped by the kernel's ``somaxconn`` as listen(2) would silently do."""
    try:
        with open(SOMAXCONN_FILE, encoding="ascii") as handle:
            return min(wanted, int(handle.read()))
    except (OSError, ValueError):
        return wanted


def _inherited_socket() -> socket.socket | None:
    """The socket systemd passed (sd_listen_fds protocol), if it is meant for us."""
    if os.environ.get("LISTEN_PID") != str(os.getpid()):
        return None
    count = int(os.environ.get("LISTEN_FDS", "0") or "0")
    for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
        os.environ.pop(name, None)
    if count < 1:
        return None
    sock = socket.socket(fileno=SD_LISTEN_FDS_START)
    if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM:
        raise ActivationError("the socket systemd passed is not a UNIX stream socket; "
                              "use ListenStream=/run/sendmail-shim/gate.sock in the .socket unit")
    sock.set_inheritable(False)
    return sock


def _bind(path: str, backlog: int) -> socket.socket:
    check_socket_directory(os.path.dirname(path))
    _remove_stale_socket(path)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.bind(path)
        os.chmod(path, 0o666)  # every local user may submit; the kernel tells us who they are
        sock.listen(backlog)
    except OSError as exc:
        sock.close()
        raise UnsafeSocketPlace(f"cannot listen on {path} ({exc.strerror}); check the directory") from None
    return sock


def check_socket_directory(directory: str) -> None:
    """Create the socket's directory if need be; refuse one that other users could change."""
    if not os.path.isdir(directory):
        _create_socket_directory(directory)
    problem = socket_place_problem(directory, os.geteuid(), _gate_user_name())
    if problem is not None:
        raise UnsafeSocketPlace(problem)


def socket_place_problem(directory: str, gate_uid: int, gate_user: str) -> str | None:
    """What lets others replace a socket in ``directory`` (None: nothing).

    Whoever can rename a directory on the way can put a socket of their own
    in the gate's place: each must belong to root or the gate, and none may
    be writable by others unless it has the sticky bit (as /tmp does). The
    socket's own directory may not be writable by others at all.
    """
    info = os.stat(directory)
    if info.st_uid not in (0, gate_uid) or info.st_mode & (stat.S_IWGRP | stat.S_IWOTH):
        return (f"{directory} can be written by users other than root and the gate, so they could "
                f"replace the socket; run: chown {gate_user} {directory} && chmod 755 {directory}")
    for parent in _parents(directory):
        found = os.stat(parent)
        writable = found.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not found.st_mode & stat.S_ISVTX
        if found.st_uid not in (0, gate_uid) or writable:
            return (f"{parent}, above the socket's directory {directory}, can be changed by other users "
                    f"(owner uid {found.st_uid}, mode {stat.S_IMODE(found.st_mode):04o}), so they could replace "
                    f"the socket's directory; choose a socket under a directory only root can change, "
                    f"such as /run/sendmail-shim")
    return None


def _parents(directory: str) -> list[str]:
    found, path = [], os.path.abspath(directory)
    while path != "/":
        path = os.path.dirname(path)
        found.append(path)
    return found


def _create_socket_directory(directory: str) -> None:
    try:
        os.mkdir(directory, 0o755)
    except OSError as exc:
        user = _gate_user_name()
        raise UnsafeSocketPlace(
            f"cannot create {directory} ({exc.strerror}); create it owned by the gate's user, mode 0755 "
            f"(run: install -d -o {user} -m 0755 {directory}), or use the packaged systemd units: "
            f"sendmail-shim-gate.socket creates it"
        ) from None


def _gate_user_name() -> str:
    return trust.Identity.of_uid(os.geteuid()).name


def _remove_stale_socket(path: str) -> None:
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(info.st_mode):
        raise UnsafeSocketPlace(f"{path} exists and is not a socket; remove it or choose another path")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.settimeout(2)
        probe.connect(path)
    except OSError:
        os.unlink(path)  # left behind by a gate that died
        return
    finally:
        probe.close()
    raise SocketInUse(f"another gate is already listening on {path}; stop it first")


def _notify_systemd_ready() -> None:
    _notify_systemd(b"READY=1")


def _notify_systemd(state: bytes) -> None:
    address = os.environ.get("NOTIFY_SOCKET")
    if not address:
        return
    target = "\0" + address[1:] if address.startswith("@") else address
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as notify:
            notify.sendto(state, target)
    except OSError:
        pass  # systemd's readiness is a courtesy; the socket is already listening


# ------------------------------------------------------------------ connections


class Gate:
    """Accepts connections, admits them per Unix user, and serves each in a thread."""

    def __init__(self, listener: Listener, runtime: Runtime, guard: TrustGuard,
                 recorder: Recorder | None = None, budget: UploadBudget | None = None) -> None:
        self.listener, self.runtime, self.guard, self.recorder = listener, runtime, guard, recorder
        self.budget = budget
        self.exit_code = os.EX_OK
        self.loaded_at: float | None = None  # of the last reload; None: the config of the start
        self.restart_needed: tuple[str, ...] = ()
        self.status = gate_status(self)
        guard.on_refuted = self._refuted
        self.per_uid: dict[int, int] = {}
        self.serving: dict[int, int] = {}  # id(runtime) -> connections admitted with it, still open
        self._busy_logged: dict[int, tuple[float, int]] = {}  # uid -> (last line, refusals since)
        self._busy_frames: dict[tuple[int, bool], bytes] = {}
        self.lock = threading.Lock()
        self.idle = threading.Condition(self.lock)
        self.stopping = threading.Event()
        self._wake_r, self._wake_w = socket.socketpair()

    @property
    def config(self) -> Config:
        """The config new connections get (the last one reloaded)."""
        return self.runtime.config

    def _refuted(self) -> None:
        self.exit_code = exitcodes.EX_CONFIG
        self.stop()

    def switch(self, runtime: Runtime, guard: TrustGuard, restart_needed: tuple[str, ...]) -> Runtime:
        """New connections get ``runtime`` from now on; returns the one they got before."""
        guard.on_refuted = self._refuted
        with self.lock:
            old, self.runtime, self.guard = self.runtime, runtime, guard
            self.loaded_at, self.restart_needed = time.time(), restart_needed
            self._busy_frames = {}  # their line names [gate] max_connections_per_uid
        return old

    def wait_until_unused(self, runtime: Runtime) -> None:
        """Until no connection admitted with ``runtime`` is still open."""
        with self.lock:
            while self.serving.get(id(runtime)):
                self.idle.wait()

    def stop(self) -> None:
        """Stop accepting; ``run`` returns once the requests in progress are done."""
        self.stopping.set()
        with contextlib.suppress(OSError):
            self._wake_w.send(b"x")

    def run(self) -> None:
        with selectors.DefaultSelector() as selector:
            self.listener.sock.setblocking(False)
            selector.register(self.listener.sock, selectors.EVENT_READ)
            selector.register(self._wake_r, selectors.EVENT_READ)
            while not self.stopping.is_set():
                selector.select()
                self._accept_all()
        _notify_systemd(b"STOPPING=1")
        self.listener.close()  # new callers now see a stopped gate (or wait in systemd's socket)
        self._wait_for_requests(SHUTDOWN_GRACE)

    def _accept_all(self) -> None:
        while not self.stopping.is_set():
            try:
                conn, _ = self.listener.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:  # e.g. out of file descriptors: keep serving the others
                _log(self.config, "err", event="gate-accept-failed", reason=exc.strerror)
                time.sleep(0.05)
                return
            self._admit(conn)

    def _admit(self, conn: socket.socket) -> None:
        # Everything here runs in the one accepting thread: a flood of connections must cost a
        # few system calls each, never a thread, a name lookup or a log line, or the backlog
        # fills and other users' callers find no slot.
        pid, uid = peer_credentials(conn)
        if _hung_up(conn):  # connected and gone again before saying anything: nothing to serve
            conn.close()
            self._log_busy(uid, "closed before the greeting")
            return
        with self.lock:
            runtime = self.runtime  # the connection keeps this config to its end, whatever reloads meanwhile
            limit = runtime.config.gate.max_connections_per_uid
            mine, total = self.per_uid.get(uid, 0), sum(self.per_uid.values())
            busy = mine >= limit or total >= MAX_CONNECTIONS
            if not busy:
                self.per_uid[uid] = mine + 1
                self.serving[id(runtime)] = self.serving.get(id(runtime), 0) + 1
        if busy:
            self._refuse_busy(conn, uid, mine >= limit)
            return
        try:
            threading.Thread(target=self._serve, args=(conn, pid, uid, runtime), daemon=True,
                             name=f"gate-uid-{uid}").start()
        except RuntimeError:  # no more threads: this caller must try again later
            self._release(uid, runtime)
            self._refuse_busy(conn, uid, False)

    def _refuse_busy(self, conn: socket.socket, uid: int, over_own_limit: bool) -> None:
        """Answer 69 and close, at once: a prepared frame, one send that never waits."""
        with contextlib.suppress(OSError):  # a fresh socket's buffer takes one small frame
            conn.send(self._busy_frame(uid, over_own_limit), socket.MSG_DONTWAIT)
        conn.close()
        self._log_busy(uid, "per-user limit" if over_own_limit else "gate full")

    def _busy_frame(self, uid: int, over_own_limit: bool) -> bytes:
        key = (uid, over_own_limit)
        frame = self._busy_frames.get(key)
        if frame is None:
            if over_own_limit:
                line = (f"not sent: the Unix user {_user_label(uid)} already has "
                        f"{self.config.gate.max_connections_per_uid} messages in progress at the mail gate, "
                        f"the most allowed at once; try again in a moment")
            else:
                line = ("not sent: the mail gate is busy with as many messages as it takes at once; "
                        "try again in a moment")
            frame = protocol.frame(protocol.VERDICT, _wire(exitcodes.EX_UNAVAILABLE, line).encode())
            if len(self._busy_frames) < 4096:
                self._busy_frames[key] = frame
        return frame

    def _log_busy(self, uid: int, reason: str) -> None:
        now = time.monotonic()
        last, count = self._busy_logged.get(uid, (-BUSY_LOG_INTERVAL, 0))
        if now - last < BUSY_LOG_INTERVAL:
            self._busy_logged[uid] = (last, count + 1)
            return
        self._busy_logged[uid] = (now, 0)
        _log(self.config, "notice", event="gate-busy", uid=uid, refused_since_last=count, reason=reason)

    def _release(self, uid: int, runtime: Runtime) -> None:
        with self.lock:
            self.per_uid[uid] -= 1
            if not self.per_uid[uid]:
                del self.per_uid[uid]
            self.serving[id(runtime)] -= 1
            if not self.serving[id(runtime)]:
                del self.serving[id(runtime)]
            self.idle.notify_all()

    def _wait_for_requests(self, grace: float) -> None:
        deadline = time.monotonic() + grace
        with self.lock:
            while self.per_uid and time.monotonic() < deadline:
                self.idle.wait(max(0.0, deadline - time.monotonic()))

    def _serve(self, conn: socket.socket, pid: int, uid: int, runtime: Runtime) -> None:
        caller = Caller(uid=uid, user=_user_name(uid), pid=pid)  # the name lookup may be slow (NSS)
        try:
            Connection(conn, caller, runtime, self.status, self.recorder, self.budget).serve()
        except Exception as exc:  # noqa: BLE001 - one connection's bug must not stop the gate
            _log(runtime.config, "err", event="gate-internal-error", uid=caller.uid,
                 reason=f"{type(exc).__name__}: {exc}")
        finally:
            conn.close()
            self._release(uid, runtime)


def _hung_up(conn: socket.socket) -> bool:
    try:
        return conn.recv(1, socket.MSG_PEEK | socket.MSG_DONTWAIT) == b""
    except (BlockingIOError, InterruptedError):
        return False
    except OSError:
        return True


def peer_credentials(conn: socket.socket) -> tuple[int, int]:
    """(pid, uid) of the process on the other end, as the kernel saw it at connect time."""
    pid, uid, _gid = _PEERCRED.unpack(conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                      _PEERCRED.size))
    return pid, uid


_NAMES: dict[int, str] = {}  # uids already named: the busy line must not cost an NSS lookup each


def _user_name(uid: int) -> str | None:
    import pwd

    try:
        name = pwd.getpwuid(uid).pw_name
    except KeyError:
        return None
    _NAMES[uid] = name
    return name


def _user_label(uid: int) -> str:
    return _NAMES.get(uid) or f"uid {uid}"


class Recorder:
    """The bookkeeping that follows the answers, several messages to one ledger commit.

    Each connection hands over its Record once it has answered; this thread
    logs and settles whatever is waiting in one transaction, so under load
    the settle-and-record commit (and its fsync) is shared, and a message
    costs about one commit, its reservation's.
    """

    def __init__(self, config: Config) -> None:
        self.config = config
        self._waiting: queue.SimpleQueue[Record | None] = queue.SimpleQueue()
        self._thread = threading.Thread(target=self._run, name="gate-recorder", daemon=True)
        self._thread.start()

    def put(self, record: Record) -> None:
        self._waiting.put(record)

    def close(self) -> None:
        """Record what is still waiting, then stop."""
        self._waiting.put(None)
        self._thread.join()

    def _run(self) -> None:
        stopping = False
        while not stopping:
            batch, stopping = self._take()
            if batch:
                self._record(batch)
            maillog.flush(self.config.log)  # summaries of suppressed lines whose window has ended

    def _record(self, batch: list[Record]) -> None:
        try:
            record_together(batch)
        except Exception as exc:  # noqa: BLE001 - a bug in one batch must not stop the bookkeeping
            _log(self.config, "err", event="gate-internal-error", records=len(batch),
                 reason=f"{type(exc).__name__}: {exc}")

    def _take(self) -> tuple[list[Record], bool]:
        """What is waiting now (waiting for the first), and whether the gate is stopping."""
        try:
            first = self._waiting.get(timeout=LOG_FLUSH_INTERVAL)
        except queue.Empty:  # quiet for a while: the summaries that are due are written all the same
            return [], False
        if first is None:
            return [], True
        batch = [first]
        while len(batch) < MAX_RECORDS_PER_COMMIT:
            try:
                more = self._waiting.get_nowait()
            except queue.Empty:
                break
            if more is None:
                return batch, True
            batch.append(more)
        return batch, False


class UploadBudget:
    """``[gate] upload_memory``, shared out among the large messages being read and processed.

    A message's size is known only at its end. One that grows past
    ``LARGE_MESSAGE`` takes, before it is read on, a share for the largest
    message allowed (``MEMORY_PER_BYTE`` x ``[message] max_size``, at most the
    whole budget); at its end the share shrinks to what its own size needs,
    and it is given back once the verdict is decided. A share covers the
    whole message, so no two messages can each hold part of the budget and
    wait for the rest. At most ``[gate] max_uploads_per_uid`` shares go to
    one Unix user at once, so one customer cannot hold the whole budget; the
    others wait their turn, in the caller's ``request_timeout``.
    """

    def __init__(self, config: Config) -> None:
        self.total, self.per_uid = config.gate.upload_memory, config.gate.max_uploads_per_uid
        self.largest = min(self.total, MEMORY_PER_BYTE * config.message.max_size)
        self.used = 0
        self.holders: dict[int, int] = {}
        self._changed = threading.Condition()

    def take(self, uid: int, until: float) -> int:
        """A share for the largest message, waiting for it until ``until``; raises UploadsBusy."""
        with self._changed:
            while self.holders.get(uid, 0) >= self.per_uid or self.used + self.largest > self.total:
                remaining = until - time.monotonic()
                if remaining <= 0:
                    raise UploadsBusy(self._busy_line(uid))
                self._changed.wait(remaining)
            self.used += self.largest
            self.holders[uid] = self.holders.get(uid, 0) + 1
        return self.largest

    def shrink(self, share: int, size: int) -> int:
        """The share cut down to what a message of ``size`` bytes needs."""
        smaller = min(share, MEMORY_PER_BYTE * size)
        with self._changed:
            self.used -= share - smaller
            self._changed.notify_all()
        return smaller

    def give_back(self, uid: int, share: int) -> None:
        with self._changed:
            self.used -= share
            self.holders[uid] -= 1
            if not self.holders[uid]:
                del self.holders[uid]
            self._changed.notify_all()

    def _busy_line(self, uid: int) -> str:
        if self.holders.get(uid, 0) >= self.per_uid:
            return (f"the Unix user {_user_label(uid)} already has {self.per_uid} large message(s) in progress "
                    f"at the mail gate, the most allowed at once, and this one found no turn in time; "
                    f"try again in a moment")
        return "the mail gate is busy with other large messages and this one found no turn in time; " \
               "try again in a moment"


class Connection:
    """One caller, one message: greeting, arguments, message, verdict."""

    def __init__(self, conn: socket.socket, caller: Caller, runtime: Runtime,
                 status: Callable[[], dict[str, object]], recorder: Recorder | None = None,
                 budget: UploadBudget | None = None) -> None:
        self.conn, self.caller, self.runtime = conn, caller, runtime
        self.status, self.recorder, self.budget = status, recorder, budget
        self.config = runtime.config
        self.deadline = time.monotonic() + self.config.gate.request_timeout

    def serve(self) -> None:
        try:
            self._send(protocol.frame(protocol.GREETING, protocol.GREETING_TEXT))
            kind, payload = protocol.read_frame(self.conn, self.deadline, protocol.ARG + protocol.QUERY)
            if kind == protocol.QUERY:
                self._answer_query(payload)
                return
            argv, upload = self._read_argv(payload)
            try:
                verdict, record = self._decide(argv, upload)
            finally:
                upload.give_back()  # the message and its copies are gone with _decide's frame
        except protocol.PeerClosed:
            self._log_broken("closed before the end of the request", "notice")
            return
        except protocol.PeerTooSlow as exc:
            self._log_broken("not complete in time", "notice")
            self._answer_broken(exitcodes.exit_code_for(exc), "not sent: the request was not complete "
                                f"within {self.config.gate.request_timeout:g} seconds")
            return
        except protocol.BadFrame as exc:
            self._log_broken(f"protocol error: {exc}", "warning")
            self._answer_broken(exitcodes.exit_code_for(exc),
                                f"not sent: the request broke the gate protocol ({exc})")
            return
        except OSError as exc:
            self._log_broken(f"connection error: {exc.strerror or exc}", "notice")
            return
        try:
            self._answer(verdict)
        except OSError as exc:  # the caller left; the log has the verdict
            self._log_broken(f"verdict not delivered: {exc.strerror or exc}", "notice")
        finally:
            if record is not None and record.follow_up is not None:
                # A late reply to the final dot is awaited on its own thread: the caller has its
                # answer, and the wait (up to [upstream] dot_timeout) holds none of its slots.
                threading.Thread(target=record.follow_up, name="gate-reply-wait", daemon=True).start()
            # The caller is not kept waiting for the log line, the settle and the decision record.
            if record is not None and self.recorder is not None:
                self.recorder.put(record)
            elif record is not None:
                record()
        with contextlib.suppress(protocol.ProtocolError, OSError):
            upload.drain()  # a refusal may come early; the rest of the request goes unread

    def _answer_query(self, question: bytes) -> None:
        """Facts about the gate, for root and the gate's own user only."""
        import json

        if self.caller.uid not in (0, os.geteuid()):
            self._answer_broken(exitcodes.EX_NOPERM, "not answered: only root and the gate's user may ask the gate")
            return
        document = self.status() if question == b"status" else {"error": "unknown question"}
        answer = json.dumps(document).encode()[:protocol.MAX_PAYLOAD[protocol.STATUS]]
        self._send(protocol.frame(protocol.STATUS, answer))

    def _read_argv(self, first: bytes) -> tuple[list[str] | str, Upload]:
        """The arguments, or the refusal line when there are too many of them (all are read first)."""
        argv: list[str] = []
        count, total, payload = 1, len(first), first
        while True:
            too_long = protocol.argv_counts_too_long(count, total, 0)
            if too_long is None:
                argv.append(os.fsdecode(payload))
            kind, payload = protocol.read_frame(self.conn, self.deadline, protocol.ARG + protocol.DATA + protocol.END)
            if kind != protocol.ARG:
                return too_long or argv, Upload(self.conn, self.deadline, kind, payload, self._admission())
            count, total = count + 1, total + len(payload)

    def _admission(self) -> Admission | None:
        if self.budget is None:
            return None
        timeout = self.config.gate.request_timeout
        return Admission(self.budget, self.caller.uid, self.deadline - (1 - WAIT_SHARE) * timeout)

    def _decide(self, argv: list[str] | str, upload: Upload) -> tuple[Verdict, Record | None]:
        """The verdict and what to record after answering; reading the message stops at its first refusal."""
        try:
            if isinstance(argv, str):
                raise UsageError(argv)
            invocation = parse_argv(argv[1:], argv[0])
            if invocation.mode != "deliver":
                raise UsageError(f"{' '.join(argv[1:])[:60]}: -bs, --help and --version are "
                                 f"answered by sendmail itself, not by the mail gate")
            # Returns only after END: a request cut short is never sent.
            raw = read_input(cast(BinaryIO, upload), self.config.message.max_size)
        except (UsageError, MessageError, UploadsBusy) as exc:
            return refuse(exc, self.caller, self.runtime), None  # recorded at once
        return decide(invocation, raw, self.caller, self.runtime)

    def _answer(self, verdict: Verdict) -> None:
        self._send(protocol.frame(protocol.VERDICT, _wire(verdict.code, verdict.line,
                                                           verdict.smtp_code, verdict.smtp_text).encode()))

    def _answer_broken(self, code: int, line: str) -> None:
        with contextlib.suppress(OSError):
            self._send(protocol.frame(protocol.VERDICT, _wire(code, line).encode()))

    def _send(self, data: bytes) -> None:
        self.conn.settimeout(SEND_TIMEOUT)
        self.conn.sendall(data)

    def _log_broken(self, reason: str, priority: str) -> None:
        _log(self.config, priority, event="gate-request-dropped", uid=self.caller.uid,
             user=self.caller.user, pid=self.caller.pid, reason=reason)


class Admission:
    """One message's share of the ``UploadBudget``, taken once it turns out to be large."""

    def __init__(self, budget: UploadBudget, uid: int, wait_until: float) -> None:
        self.budget, self.uid, self.wait_until = budget, uid, wait_until
        self.share = 0

    def received(self, size: int, ended: bool) -> None:
        """``size`` bytes have arrived: past LARGE_MESSAGE a share is needed before reading on."""
        if not self.share and size > LARGE_MESSAGE:
            self.share = self.budget.take(self.uid, self.wait_until)
        if self.share and ended:
            self.share = self.budget.shrink(self.share, size)

    def give_back(self) -> None:
        share, self.share = self.share, 0
        if share:
            self.budget.give_back(self.uid, share)


class Upload:
    """The message as it arrives in DATA frames; reading stops at END."""

    def __init__(self, conn: socket.socket, deadline: float, kind: bytes, payload: bytes,
                 admission: Admission | None = None) -> None:
        self.conn, self.deadline, self.admission = conn, deadline, admission
        self.ended = kind == protocol.END
        self._pending = b"" if self.ended else payload
        self.size = len(self._pending)

    def read(self, size: int = -1) -> bytes:
        while not self._pending and not self.ended:  # an empty DATA frame is not the end
            self._next_frame()
            if self.admission is not None:  # may wait (holding one frame) for the message's turn
                self.admission.received(self.size, self.ended)
        if size < 0:
            size = len(self._pending)
        piece, self._pending = self._pending[:size], self._pending[size:]
        return piece

    def _next_frame(self) -> None:
        kind, payload = protocol.read_frame(self.conn, self.deadline, protocol.DATA + protocol.END)
        self.ended = kind == protocol.END
        self._pending = payload
        self.size += len(payload)

    def drain(self) -> None:
        """Read and drop the rest of the message, up to END (it is not processed: no share needed)."""
        while not self.ended:
            self._next_frame()
        self._pending = b""

    def give_back(self) -> None:
        """The message's share of the budget, once it is no longer held."""
        if self.admission is not None:
            self.admission.give_back()


def _wire(code: int, line: str | None, smtp_code: int | None = None,
          smtp_text: str | None = None) -> protocol.WireVerdict:
    if smtp_code is None or smtp_text is None:
        smtp_code, status = exitcodes.SMTP_REPLIES.get(code, (451, "4.3.0"))
        smtp_text = f"{status} {line or ''}".strip()
    return protocol.WireVerdict(code, line, smtp_code, smtp_text)


def _log(config: Config, priority: str, **fields: object) -> None:
    maillog.write(config.log, fields, priority)


if __name__ == "__main__":
    # Run the package's own module, so that its errors keep the names the exit-code table knows.
    from sendmail_shim.gate import main as gate_main

    gate_main()
