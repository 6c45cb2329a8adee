"""Trust in the relay: verified at start, watched while the gate runs (see ``trust``)."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from collections.abc import Callable

from .. import trust
from ..config import Config
from ..pipeline import Runtime
from ..relay import Upstream, UpstreamUnavailable
from .events import log_event

TRUST_RETRY_FIRST, TRUST_RETRY_LONGEST = 5.0, 60.0  # re-probing a relay that was down at start


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
        log_event(self.config, "warning", event="gate-trust-pending", reason=assessment.summary,
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
                log_event(self.config, "err", event="gate-trust-refuted", reason=line)
                self.on_refuted()
                return
            self.pending = assessment.summary
            delay = min(delay * 2, TRUST_RETRY_LONGEST)

    def _verified(self, assessment: trust.Assessment) -> None:
        self.state, self.mode, self.pending = "verified", assessment.mode, None
        if assessment.mode == "single-tenant":
            log_event(self.config, "warning", event="gate-single-tenant",
                 reason="[gate] trust = \"single-tenant\": nothing keeps local users from reaching the relay "
                        "without the gate; never use this on a server with more than one customer")
        else:
            log_event(self.config, "info", event="gate-trust-verified", mode=assessment.mode, reason=assessment.summary)
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
