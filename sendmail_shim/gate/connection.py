"""One caller, one message: greeting, arguments, message, verdict."""

from __future__ import annotations

import contextlib
import dataclasses
import os
import socket
import threading
import time
from collections.abc import Callable
from typing import BinaryIO, cast

from .. import exitcodes, origin
from .. import gate_protocol as protocol
from ..invocation import UsageError, parse_argv
from ..message import MessageError, read_input
from ..pipeline import Caller, Record, Runtime, Verdict, decide, refuse
from .budget import LARGE_MESSAGE, UploadBudget, UploadsBusy
from .events import log_event
from .instruments import GateMetrics
from .recorder import Recorder

SEND_TIMEOUT = 10.0  # for writing a verdict to a caller that does not read it
WAIT_SHARE = 0.75  # of request_timeout, at most, spent waiting for a share: the rest is for reading on


class Connection:
    """One caller, one message: greeting, arguments, message, verdict."""

    def __init__(self, conn: socket.socket, caller: Caller, runtime: Runtime,
                 status: Callable[[], dict[str, object]], recorder: Recorder | None = None,
                 budget: UploadBudget | None = None, metrics: GateMetrics | None = None) -> None:
        self.conn, self.caller, self.runtime = conn, caller, runtime
        self.status, self.recorder, self.budget, self.metrics = status, recorder, budget, metrics
        self.config = runtime.config
        self.deadline = time.monotonic() + self.config.gate.request_timeout

    def serve(self) -> None:
        try:
            self._send(protocol.frame(protocol.GREETING, protocol.GREETING_TEXT))
            kind, payload = protocol.read_frame(self.conn, self.deadline, protocol.ARG + protocol.QUERY)
            if kind == protocol.QUERY:
                self._answer_query(payload)
                return
            self._learn_origin()
            argv, upload = self._read_argv(payload)
            try:
                verdict, record = self._decide(argv, upload)
            finally:
                upload.give_back()  # the message and its copies are gone with _decide's frame
        except protocol.PeerClosed:
            self._log_broken("closed before the end of the request", "notice", "closed")
            return
        except protocol.PeerTooSlow as exc:
            self._log_broken("not complete in time", "notice", "timeout")
            self._answer_broken(exitcodes.exit_code_for(exc), "not sent: the request was not complete "
                                f"within {self.config.gate.request_timeout:g} seconds")
            return
        except protocol.BadFrame as exc:
            self._log_broken(f"protocol error: {exc}", "warning", "protocol")
            self._answer_broken(exitcodes.exit_code_for(exc),
                                f"not sent: the request broke the gate protocol ({exc})")
            return
        except OSError as exc:
            self._log_broken(f"connection error: {exc.strerror or exc}", "notice", "connection")
            return
        try:
            self._answer(verdict)
        except OSError as exc:  # the caller left; the log has the verdict
            self._log_broken(f"verdict not delivered: {exc.strerror or exc}", "notice", "undelivered")
        finally:
            if self.metrics is not None:  # after the answer: the caller never waits for its counters
                self.metrics.decided(verdict)
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

    def _learn_origin(self) -> None:
        """The program behind the caller, read from /proc while the client is still there.

        Read once the first frame is in: the client then waits for the verdict, so
        its parents are still there, and the rest of the request streams meanwhile.
        """
        found = origin.of_peer(self.caller.pid)
        self.caller = dataclasses.replace(self.caller, cwd=found.cwd, exe=found.exe)

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
        self._send(protocol.frame(protocol.VERDICT, wire_verdict(verdict.code, verdict.line,
                                                           verdict.smtp_code, verdict.smtp_text).encode()))

    def _answer_broken(self, code: int, line: str) -> None:
        with contextlib.suppress(OSError):
            self._send(protocol.frame(protocol.VERDICT, wire_verdict(code, line).encode()))

    def _send(self, data: bytes) -> None:
        self.conn.settimeout(SEND_TIMEOUT)
        self.conn.sendall(data)

    def _log_broken(self, reason: str, priority: str, kind: str) -> None:
        if self.metrics is not None:
            self.metrics.dropped.inc(kind)
        log_event(self.config, priority, event="gate-request-dropped", uid=self.caller.uid,
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


def wire_verdict(code: int, line: str | None, smtp_code: int | None = None,
          smtp_text: str | None = None) -> protocol.WireVerdict:
    if smtp_code is None or smtp_text is None:
        smtp_code, status = exitcodes.SMTP_REPLIES.get(code, (451, "4.3.0"))
        smtp_text = f"{status} {line or ''}".strip()
    return protocol.WireVerdict(code, line, smtp_code, smtp_text)
