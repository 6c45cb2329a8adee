"""The mail's life as one call: (options, message bytes, caller) -> verdict.

The ``sendmail`` command, the ``-bs`` dialogue and the gate all call
``submit`` (the gate calls ``decide``, to answer before the bookkeeping);
none of them decides anything itself.
"""

from __future__ import annotations

import contextlib
import os
import socket
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from . import accounts, exitcodes, maillog, queue, spf
from . import envelope as envelope_stage
from . import message as message_stage
from .accounts import Caller
from .config import Config
from .encoding import too_long
from .envelope import Envelope
from .invocation import Invocation
from .ledger import Ledger, LedgerError, LimitReached, Outcome, Reservation
from .message import Message
from .relay import PendingReply, RelayError, RelayResult, ReplyPending, Upstream, rcpt_replies

if TYPE_CHECKING:
    from . import notify
    from .dnsclient import Resolver

__all__ = ["Caller", "Record", "Runtime", "Verdict", "decide", "record_together", "refuse", "submit"]


@dataclass(frozen=True)
class Verdict:
    """What happened: the exit code, the stderr line and the -bs reply."""

    code: int
    line: str | None = None
    smtp_code: int = 250
    smtp_text: str = "2.0.0 accepted"
    fields: dict[str, object] = field(default_factory=dict)
    # Seconds spent in the slow steps ("reservation", "upstream"), for the gate's metrics; never logged.
    timings: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.code == os.EX_OK


class Runtime:
    """Configuration plus what is worth keeping warm between messages (the gate)."""

    def __init__(self, config: Config, *, in_gate: bool = False, ledger: Ledger | None = None,
                 upstream: Upstream | None = None) -> None:
        """``ledger`` and ``upstream``: kept from the runtime a reloading gate replaces."""
        self.config = config
        self.in_gate = in_gate
        self.upstream = upstream or Upstream(config.upstream, config.path, reuse=in_gate)
        self.ledger = ledger or Ledger.from_config(config)
        self.spf_cache = self.ledger.spf_cache()  # shared by every process and server on this ledger
        self.hostname = socket.gethostname()
        self.holder: str | None = None  # the gate's name on its reservations (see Ledger.claim_unsettled)
        self._notifier: notify.Notifier | None = None

    def notifier(self) -> notify.Notifier:
        """Made on first use: most messages need none (nor the import)."""
        if self._notifier is None:
            from . import notify

            self._notifier = notify.Notifier(self.config, self.ledger, self.upstream, self.hostname,
                                             background=self.in_gate)
        return self._notifier

    @property
    def require_binding(self) -> bool:
        """In the gate, callers are strangers: they must be bound to a customer unless allowed."""
        return self.in_gate and not self.config.gate.allow_unbound

    def resolver(self) -> Resolver:
        from .dnsclient import NetworkResolver

        cfg = self.config.spf
        return NetworkResolver.from_config(cfg.nameservers, cfg.timeout)


def submit(invocation: Invocation, raw: bytes, caller: Caller, runtime: Runtime) -> Verdict:
    """Run one message through every stage and say what became of it."""
    verdict, record = decide(invocation, raw, caller, runtime)
    record()
    return verdict


def decide(invocation: Invocation, raw: bytes, caller: Caller, runtime: Runtime) -> tuple[Verdict, Record]:
    """The verdict as soon as it is final, and the bookkeeping that may follow the answer.

    When the verdict is returned the outcome is already durable: the
    reservation is committed (an unsettled one counts against the limits) and
    the message is with the upstream or committed to the queue. What is left
    -- the log line, and settling the reservation with the decision record in
    one commit -- is the returned Record, which the gate keeps for after its
    answer (and commits together with other messages' records).
    """
    started = time.monotonic()
    fields: dict[str, object] = {**caller_fields(caller), "size": len(raw)}
    reservation: Reservation | None = None
    outcome: str | None = None  # how the reservation is settled with the decision record
    follow_up: Callable[[], None] | None = None
    timings: dict[str, float] = {}
    replies: list[RelayResult] = []  # what the upstream said at RCPT, for the abuse rules
    notices: tuple[notify.Trigger, ...] = ()
    try:
        message, envelope = _prepare(invocation, raw, caller, runtime, fields)
        account = _authorise(envelope, message, caller, runtime)
        fields.update(account=account.address, customer=account.customer_id)
        _check_spf(envelope, message, runtime)
        # The committed reservation, naming this gate, is the mark that the message is being relayed:
        # if the gate dies before settling it, its next start reports the outcome as unknown.
        reserving = time.monotonic()
        try:
            reservation = runtime.ledger.reserve(account, len(envelope.recipients),
                                                 message_id=message.message_id or "", holder=runtime.holder,
                                                 uid=caller.uid)
        finally:  # a refusal by a limit took the ledger's time too
            timings["reservation"] = time.monotonic() - reserving
        queue.crash_point("pipeline:after-reserve")
        # From here on the message counts against the limits: it ends up sent, queued or released
        # (or, if this process dies first, expired after [ledger] reservation_timeout).
        verdict, outcome, follow_up = _relay_or_queue(envelope, message, reservation, runtime, fields, timings,
                                                      replies)
        notices = _crossed(runtime, reservation)
    except Exception as exc:  # every refusal becomes a verdict; nothing escapes as a traceback
        outcome = "released" if reservation is not None else None
        verdict = _refused(exc, fields)
        notices = _reached(runtime, exc, fields)
        counted = _counted(runtime, fields, replies, limited=isinstance(exc, LimitReached))
    else:
        counted = _counted(runtime, fields, replies)
    verdict.fields["ms"] = round((time.monotonic() - started) * 1000)
    verdict.timings.update(timings, decision=time.monotonic() - started)
    return verdict, Record(runtime, verdict, reservation, outcome, follow_up, counted, notices)


def _crossed(runtime: Runtime, reservation: Reservation) -> tuple[notify.Trigger, ...]:
    """The rules this message took past ``[notify] warn_at``; without [notify], not even the import."""
    if runtime.config.notify is None:
        return ()
    from . import notify

    return notify.crossed(runtime.config.notify, reservation)


def _reached(runtime: Runtime, exc: Exception, fields: dict[str, object]) -> tuple[notify.Trigger, ...]:
    """The rule a refusal by a limit reached, for its notice."""
    if runtime.config.notify is None:
        return ()
    from . import notify

    return notify.reached(runtime.config.notify, exc, _str_or_none(fields.get("account")),
                          _str_or_none(fields.get("customer")))


def _str_or_none(value: object) -> str | None:
    return None if value is None else str(value)


def _counted(runtime: Runtime, fields: dict[str, object], replies: list[RelayResult], *,
             limited: bool = False) -> Outcome | None:
    """This message for the abuse rules: its recipients by the upstream's answer, or a refusal by a limit."""
    account = fields.get("account")
    if not runtime.config.abuse.enabled or account is None or not (replies or limited):
        return None
    rcpt = replies[0] if replies else RelayResult(0, "", ())
    return Outcome(str(account), str(fields.get("customer")), accepted=len(rcpt.accepted),
                   deferred=len(rcpt.deferred), failed=len(rcpt.refused), limited=int(limited))


def _prepare(invocation: Invocation, raw: bytes, caller: Caller, runtime: Runtime,
             fields: dict[str, object]) -> tuple[Message, Envelope]:
    """The message as it will be sent and its envelope; each repair made on the way is a log field."""
    cfg = runtime.config.message
    message = message_stage.parse(raw, invocation.ignore_dots, legacy_charset=cfg.legacy_charset,
                                  max_header_size=cfg.max_header_size)
    fields.update(message.repairs)
    fields["script"] = message_stage.originating_script(message)
    defaults = envelope_stage.SenderDefaults(caller.user, lambda: _default_sender(runtime, caller))
    envelope = envelope_stage.build(invocation, message, cfg.qualify_domain, cfg.max_recipients, defaults)
    fields.update(sender=envelope.sender.key, rcpts=len(envelope.recipients), **envelope.repairs)
    assert envelope.author is not None  # build always chooses one
    message_stage.complete(message, envelope.author, _trace(runtime, caller))
    fields["msgid"] = message.message_id
    folded = [h.name for h in message.headers if too_long(h)]
    if folded:
        fields["folded"] = ",".join(folded)
    return message, envelope


def _default_sender(runtime: Runtime, caller: Caller) -> str | None:
    return runtime.ledger.default_sender(caller.user) if caller.user is not None else None


def _authorise(envelope: Envelope, message: Message, caller: Caller, runtime: Runtime) -> accounts.Account:
    from_domain = message.from_mailbox.domain if message.from_mailbox else None
    identities = [(header, mailbox.domain) for header, mailbox
                  in message_stage.identity_mailboxes(message, runtime.config.message.qualify_domain)]
    return accounts.authorise(runtime.ledger, envelope.sender.key, from_domain, caller,
                              require_binding=runtime.require_binding, identities=identities)


def _check_spf(envelope: Envelope, message: Message, runtime: Runtime) -> None:
    cfg = runtime.config.spf
    if not cfg.enabled:
        return
    domains = [envelope.sender.domain]
    if message.from_mailbox is not None:
        domains.append(message.from_mailbox.domain)
    spf.require_authorised(
        domains, cfg.relay_ips, accept=cfg.accept, hint=cfg.hint, sender=envelope.sender.address,
        budget=cfg.timeout, cache=runtime.spf_cache, cache_max_ttl=cfg.cache_max_ttl, resolver=runtime.resolver,
    )


def _relay_or_queue(envelope: Envelope, message: Message, reservation: Reservation, runtime: Runtime,
                    fields: dict[str, object], timings: dict[str, float], replies: list[RelayResult],
                    ) -> tuple[Verdict, str | None, Callable[[], None] | None]:
    """The verdict, how the reservation is still to be settled (None: the queue did it), and
    what is left to do once the caller has its answer (the gate's wait for a late reply).
    ``replies`` gets what the recipients were told at RCPT, however the attempt ended."""
    relaying = time.monotonic()
    try:
        result = runtime.upstream.send(envelope, message, synchronous=True)
    except ReplyPending as late:
        replies.append(late.pending.rcpt)
        timings["upstream"] = time.monotonic() - relaying
        if not runtime.config.queue.enabled:
            late.pending.abandon()
            raise _unconfirmed_error(late) from None
        return _awaiting(late, envelope, message, reservation, runtime, fields)
    except RelayError as exc:
        timings["upstream"] = time.monotonic() - relaying
        replies.extend(r for r in [rcpt_replies(exc)] if r is not None)
        if not (exc.temporary and runtime.config.queue.enabled):
            raise
        state = "uncertain" if exc.uncertain else "queued"  # the upstream may have it: one retry at most
        queue_id = queue.enqueue(runtime.ledger, runtime.config.queue, reservation=reservation,
                                 envelope=envelope, message=message, error=str(exc), state=state)
        # From here on the mail is safe: committed to the queue, it will be delivered or bounced.
        return _queued(queue_id, str(exc), exc.site_problem, fields, state), None, None
    timings["upstream"] = time.monotonic() - relaying
    replies.append(result)
    if result.deferred:  # some recipients said "later": they wait in the queue, the rest have it
        queue_id = queue.enqueue(runtime.ledger, runtime.config.queue, reservation=reservation,
                                 envelope=envelope, message=message, delivered=result.accepted,
                                 error="; ".join(f"{r.address}: {r.code} {r.text}" for r in result.deferred))
        return _queued(queue_id, f"{len(result.deferred)} recipient(s) deferred", False, fields), None, None
    queue.crash_point("pipeline:after-relay")  # the upstream has it; nothing is settled or answered yet
    return _sent(result, fields), "sent", None


def _unconfirmed_error(late: ReplyPending) -> RelayError:
    from .relay import UpstreamUncertain

    return UpstreamUncertain(f"{late}; it may have the message", late.pending.rcpt)


def _awaiting(late: ReplyPending, envelope: Envelope, message: Message, reservation: Reservation,
              runtime: Runtime, fields: dict[str, object]) -> tuple[Verdict, None, Callable[[], None] | None]:
    """The final dot is out and the caller's budget spent: queue the message before answering.

    The gate waits on for the reply (``awaiting_reply``); ``sendmail`` in-process must exit,
    so the message is ``uncertain`` and the connection is dropped.
    """
    pending = late.pending
    state = "awaiting_reply" if runtime.in_gate else "uncertain"
    queue_id = queue.enqueue(runtime.ledger, runtime.config.queue, reservation=reservation, envelope=envelope,
                             message=message, error=str(late), state=state,
                             reply_wait=max(pending.deadline - time.monotonic(), 0.0))
    verdict = _queued(queue_id, str(late), False, fields, state)
    if not runtime.in_gate:
        pending.abandon()
        return verdict, None, None
    return verdict, None, lambda: _await_reply(runtime, queue_id, pending, dict(fields))


def _await_reply(runtime: Runtime, queue_id: str, pending: PendingReply, fields: dict[str, object]) -> None:
    """The gate, after answering: wait for the late reply and settle the queued message with it."""
    outcome: RelayResult | RelayError
    try:
        outcome = pending.finish()
    except RelayError as exc:
        outcome = exc
    line: dict[str, object] = {"event": "reply-after-dot", "queue": queue_id, "msgid": fields.get("msgid"),
                               "account": fields.get("account")}
    if isinstance(outcome, RelayError):
        line.update(verdict="uncertain" if outcome.uncertain else "deferred" if outcome.temporary else "bounced",
                    reason=str(outcome))
    else:
        line.update(verdict="sent", upstream=f"{outcome.code} {outcome.text}")
    try:
        runner = queue.Runner(runtime.ledger, runtime.upstream, runtime.config.queue, hostname=runtime.hostname)
        line["state"] = runner.finish_reply(queue_id, outcome) or "gone"
    except LedgerError as exc:  # the lease runs out and a runner takes the message as uncertain
        line.update(state="awaiting_reply", alert=f"the reply could not be recorded ({exc})")
    maillog.write(runtime.config.log, line, "info" if line["verdict"] == "sent" else "warning")


@dataclass(frozen=True)
class Record:
    """What is left of a message once its verdict is out: the log line, the settle, the decision row."""

    runtime: Runtime
    verdict: Verdict
    reservation: Reservation | None
    outcome: str | None  # how the reservation is settled; None: nothing to settle (or the queue did it)
    follow_up: Callable[[], None] | None = None  # for after the answer: the gate's wait for a late reply
    counted: Outcome | None = None  # what the abuse rules count of this message; None: nothing
    notices: tuple[notify.Trigger, ...] = ()  # rules this message crossed or was stopped by

    def __call__(self) -> None:
        record_together([self])


def record_together(records: Sequence[Record]) -> None:
    """Log each decision, then settle the reservations and insert the decision rows in one commit;
    then judge the accounts whose messages gave the abuse rules a signal."""
    for record in records:
        fields = record.verdict.fields
        priority = "warning" if "alert" in fields else "info" if record.verdict.ok else "notice"
        maillog.write(record.runtime.config.log, fields, priority)
    counted = [r.counted for r in records if r.counted is not None]
    # A ledger failure here leaves unsettled reservations counting (the safe side), and the
    # syslog lines above as the record of last resort.
    with contextlib.suppress(LedgerError):
        records[0].runtime.ledger.settle_and_record_all(
            [(r.reservation, r.outcome, r.verdict.fields) for r in records], counted)
        _judge_abuse(records[-1].runtime, counted)  # the newest config, should a reload have come in between
    # After the commit, so that the decision rows are there for the notice's top scripts.
    for record in records:
        if record.notices:
            record.runtime.notifier().send_all(record.notices)


def _judge_abuse(runtime: Runtime, counted: Sequence[Outcome]) -> None:
    """The abuse rules, for the messages that gave them a signal; each block is told like a limit."""
    if not counted:  # [abuse] is off, or the batch had nothing for it: not even the import
        return
    from . import abuse

    if not any(abuse.signals(c) for c in counted):
        return
    for block in abuse.judge_all(runtime.config, runtime.ledger, counted):
        if runtime.config.notify is not None:
            runtime.notifier().blocked(block.account, block.customer_id, block.reason, block.at)


def caller_fields(caller: Caller) -> dict[str, object]:
    """Who called, for the log line and the decision row; cwd and exe only when known."""
    return {"uid": caller.uid, "user": caller.user, "cwd": caller.cwd, "exe": caller.exe}


def _trace(runtime: Runtime, caller: Caller) -> str:
    who = f"userid {caller.uid}" + (f" ({caller.user})" if caller.user else "")
    return f"by {runtime.hostname} (sendmail-shim, from {who})"


_UNCONFIRMED_LINES = {
    "awaiting_reply": "the mail gate is still waiting for its reply",
    "uncertain": "it is retried once more, later, and never after that",
}


def _queued(queue_id: str, reason: str, site_problem: bool, fields: dict[str, object],
            state: str = "queued") -> Verdict:
    fields.update(verdict="queued", code=0, queue=queue_id, state=state, reason=reason)
    if site_problem:
        fields["alert"] = "the upstream relay needs the admin's attention"
    if state == "queued":
        return Verdict(os.EX_OK, None, 250, f"2.0.0 queued as {queue_id}; the upstream will be retried", fields)
    line = (f"queued as {queue_id}: the upstream has not yet confirmed the message ({reason}); "
            f"{_UNCONFIRMED_LINES[state]}")
    return Verdict(os.EX_OK, line, 250, f"2.0.0 {line}"[:400], fields)


def _sent(result: RelayResult, fields: dict[str, object]) -> Verdict:
    fields.update(verdict="sent", code=0, upstream=f"{result.code} {result.text}")
    return Verdict(os.EX_OK, None, 250, f"2.0.0 sent ({result.text})"[:400], fields)


def _refused(exc: Exception, fields: dict[str, object]) -> Verdict:
    code = exitcodes.exit_code_for(exc)
    if code == exitcodes.EX_SOFTWARE:
        reference = os.urandom(4).hex()
        fields["ref"] = reference
        fields["trace"] = "".join(traceback.format_exception(exc)).strip()[-1500:]
        exc = RuntimeError(
            f"internal error (reference {reference}); the administrator can find it in the mail log"
        )
    line = exitcodes.stderr_line(exc, code)
    smtp_code, status = exitcodes.smtp_reply_for(exc, code)
    fields.update(verdict="refused", code=code, stage=type(exc).__name__, reason=str(exc))
    return Verdict(code, line, smtp_code, f"{status} {exc}"[:400], fields)


def refuse(exc: Exception, caller: Caller, runtime: Runtime) -> Verdict:
    """A refusal that happened before ``submit`` (such as reading stdin), logged the same way."""
    verdict = _refused(exc, caller_fields(caller))
    Record(runtime, verdict, None, None)()
    return verdict
