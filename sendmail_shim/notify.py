"""Notices: a warning near a limit, a notice when a limit or an automatic block stops an account.

They go to the customer's contact address and to ``[notify] admin``, at most
one per rule and window (the claim is the ``notices`` row, see
``ledger/notices.py``). A notice is committed to the product's own queue and
tried at once; it never passes the pipeline, so it counts against no limit
and can never cause a notice itself. A notice the upstream refuses for good
is logged and dropped: no bounce is made about a notice.

Seeing that a rule was crossed costs no query: the reservation carries each
rule's use before and after the message (``Reservation.levels``). Only the
message that crosses ``warn_at``, or a refusal by a limit, reads the ledger.
"""

from __future__ import annotations

import math
import socket
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass
from queue import Empty, SimpleQueue
from typing import TYPE_CHECKING

from . import maillog, queue
from . import notice_templates as texts
from .addresses import parse_mailbox
from .envelope import Envelope
from .ledger import LedgerError, LimitReached, NoticeClaim, Reservation, RuleLevel, format_delay
from .message import format_date, new_message_id, parse

if TYPE_CHECKING:
    from .config import Config, NotifyConfig
    from .ledger import Ledger
    from .relay import Upstream

TOP_SCRIPTS = 3
IDLE_THREAD_EXIT = 60.0  # seconds the gate's notice thread waits for work before it ends
_KNOWN_LIMIT = 4096  # claims this process remembers, so a burst of refusals costs no write each


class NotifyError(Exception):
    """A notice that could not be made or queued (logged; the mail it is about is unaffected)."""


@dataclass(frozen=True)
class Trigger:
    """A rule crossed or reached: what a notice is about."""

    kind: str  # warn or limit
    scope: str
    subject: str
    customer_id: str
    account: str
    rule: RuleLevel
    used: int
    window_start: float | None = None  # known for a limit (from its next free instant); read for a warning
    free_at: float | None = None


def crossed(config: NotifyConfig | None, reservation: Reservation) -> tuple[Trigger, ...]:
    """The rules this message took over ``warn_at``: CPU only, from what the reservation saw."""
    if config is None:
        return ()
    found = []
    for level in reservation.levels:
        threshold = math.ceil(config.warn_at * level.rule.limit)
        if level.before < threshold <= level.after:
            found.append(Trigger("warn", level.scope, level.subject, reservation.customer_id,
                                 reservation.account, level, level.after))
    return tuple(found)


def reached(config: NotifyConfig | None, exc: Exception, account: str | None,
            customer_id: str | None) -> tuple[Trigger, ...]:
    """The limit notice for a refusal by ``LimitReached``; nothing for any other refusal."""
    if config is None or not isinstance(exc, LimitReached) or account is None or customer_id is None:
        return ()
    level = RuleLevel(exc.scope, exc.subject, exc.rule, exc.used, exc.used)
    # The window the refusal sits in began when the send that frees it was made: stable for the burst.
    start = round(exc.next_free_at - exc.rule.window_seconds, 6)
    return (Trigger("limit", exc.scope, exc.subject, customer_id, account, level, exc.used, start,
                    exc.next_free_at),)


class Notifier:
    """Sends the notices of one process: the gate's recorder thread, or ``sendmail`` after its answer."""

    def __init__(self, config: Config, ledger: Ledger, upstream: Upstream, hostname: str | None = None, *,
                 background: bool = False) -> None:
        """``background``: try each notice on a thread of its own (the gate), not in the caller's (sendmail)."""
        assert config.notify is not None
        self.config, self.notify, self.ledger, self.upstream = config, config.notify, ledger, upstream
        self.hostname = hostname or socket.gethostname()
        self.background = background
        self._waiting: SimpleQueue[tuple[str, dict[str, object]]] | None = None
        self._lock = threading.Lock()
        self._known: dict[tuple[object, ...], None] = {}  # claims decided already, oldest first

    def send_all(self, triggers: Sequence[Trigger]) -> None:
        for trigger in triggers:
            try:
                self._send(trigger)
            except (LedgerError, NotifyError, queue.QueueError) as exc:
                self.log({"event": "notice", "kind": trigger.kind, "subject": trigger.subject,
                           "rule": str(trigger.rule.rule), "alert": f"the notice could not be sent ({exc})"},
                          "warning")

    def blocked(self, account: str, customer_id: str, reason: str, at: float) -> None:
        """The notice of an automatic block: one per block (its instant is the window's start)."""
        values = {**self.common_values("account", account, account, customer_id), "reason": reason,
                  "at": iso_seconds(at, up=False)}
        try:
            self.deliver("block", "account", account, "abuse", at, 0, customer_id, values, ("block", account, at))
        except (LedgerError, NotifyError, queue.QueueError) as exc:
            self.log({"event": "notice", "kind": "block", "subject": account,
                      "alert": f"the notice could not be sent ({exc})"}, "warning")

    def _send(self, trigger: Trigger) -> None:
        rule = trigger.rule.rule
        start = trigger.window_start
        if start is None:
            start = round(self.ledger.window_start(trigger.rule), 6)
        key = (trigger.kind, trigger.scope, trigger.subject, str(rule), start)
        if key in self._known:
            return
        now = time.time()
        free_at = trigger.free_at if trigger.free_at is not None else start + rule.window_seconds
        values = self._rule_values(trigger, start, free_at, now)
        self.deliver(trigger.kind, trigger.scope, trigger.subject, str(rule), start, rule.window_seconds,
                     trigger.customer_id, values, key)

    def _rule_values(self, trigger: Trigger, start: float, free_at: float, now: float) -> dict[str, str]:
        rule, language = trigger.rule.rule, self.notify.language
        scripts = self.ledger.top_scripts(trigger.scope, trigger.subject, start, TOP_SCRIPTS)
        return {
            **self.common_values(trigger.scope, trigger.subject, trigger.account, trigger.customer_id),
            "rule": str(rule), "rule_words": texts.rule_words(rule.limit, rule.metric, rule.window_seconds, language),
            "used": str(trigger.used), "limit": str(rule.limit),
            "percent": str(round(100 * trigger.used / rule.limit)) if rule.limit else "100",
            "window": texts.window_words(rule.window_seconds, language),
            "window_start": iso_seconds(start, up=False),
            "free_at": iso_seconds(free_at), "free_in": format_delay(free_at - now),
            "scripts": texts.script_lines(scripts, language),
        }

    def common_values(self, scope: str, subject: str, account: str, customer_id: str) -> dict[str, str]:
        return {"who": texts.who_words(scope, subject, self.notify.language), "account": account,
                "customer": customer_id, "hostname": self.hostname}

    def deliver(self, kind: str, scope: str, subject: str, rule: str, start: float, window: int,
                customer_id: str, values: dict[str, str], key: tuple[object, ...]) -> None:
        """Claim the notice, queue it, try it at once; log what became of it."""
        contact = self.ledger.contact(customer_id)
        recipients = [*([contact] if contact else []), *(a for a in self.notify.admin if a != contact)]
        domain = self.notify.sender.rpartition("@")[2]
        message_id = new_message_id(domain)
        claim = NoticeClaim(kind, scope, subject, customer_id, rule, start, window, ",".join(recipients), message_id)
        won = self.ledger.claim_notice(claim)
        self._remember(key)
        if won is None:
            return  # sent already, by this process or another
        fields: dict[str, object] = {"event": "notice", "kind": kind, "scope": scope, "subject": subject,
                                     "rule": rule, "customer": customer_id}
        if not recipients:
            self.log({**fields, "to": "", "alert": "no one could be told: the customer has no contact "
                       "(sendmail-shim customer set ID --contact ADDRESS) and [notify] admin is not set"}, "warning")
            return
        subject_line, body = self.notify.template(kind).render(values)
        raw = self._compose(recipients, subject_line, body, message_id, kind)
        queue_id = self._enqueue(raw, recipients)
        fields.update(to=",".join(recipients), queue=queue_id, msgid=message_id)
        if self.background:
            self._hand_over(queue_id, fields)
        else:
            self._attempt(queue_id, fields)

    def _compose(self, recipients: Sequence[str], subject: str, body: str, message_id: str, kind: str) -> bytes:
        subject = " ".join(subject.split())  # an admin's template may put a reason with line breaks there
        headers = [
            f"From: {self.notify.sender}", f"To: {', '.join(recipients)}", f"Subject: {subject}",
            f"Date: {format_date(time.time())}", f"Message-ID: {message_id}", "Auto-Submitted: auto-generated",
            f"X-Sendmail-Shim-Notice: {kind}", "MIME-Version: 1.0", "Content-Type: text/plain; charset=utf-8",
            "Content-Transfer-Encoding: 8bit",
        ]
        return ("\r\n".join(headers) + "\r\n\r\n" + body.replace("\n", "\r\n")).encode("utf-8")

    def _enqueue(self, raw: bytes, recipients: Sequence[str]) -> str:
        envelope = Envelope(parse_mailbox(self.notify.sender), tuple(parse_mailbox(r) for r in recipients))
        message = parse(raw, ignore_dots=True, max_header_size=None)
        return queue.enqueue(self.ledger, self.config.queue, reservation=None, envelope=envelope, message=message,
                             error="", kind="notice", attempted=False)

    def _attempt(self, queue_id: str, fields: dict[str, object]) -> None:
        """One attempt now, so a notice does not wait for the queue's timer; a deferral leaves it to the timer."""
        runner = queue.Runner(self.ledger, self.upstream, self.config.queue, hostname=self.hostname,
                              log=self.config.log)
        try:
            fields["state"] = runner.run_one(queue_id) or "queued"
        except LedgerError as exc:  # committed: the queue's timer tries it
            fields.update(state="queued", reason=f"not tried now ({exc})")
        self.log(fields, "notice")

    def _hand_over(self, queue_id: str, fields: dict[str, object]) -> None:
        """The gate's: one thread tries the notices, so a slow upstream holds no one's bookkeeping."""
        with self._lock:  # put under the lock: an idle thread ends only with nothing waiting
            if self._waiting is None:
                self._waiting = SimpleQueue()
                threading.Thread(target=self._work, args=(self._waiting,), name="gate-notices", daemon=True).start()
            self._waiting.put((queue_id, fields))

    def _work(self, waiting: SimpleQueue[tuple[str, dict[str, object]]]) -> None:
        while (item := self._next(waiting)) is not None:
            queue_id, fields = item
            try:
                self._attempt(queue_id, fields)
            except Exception as exc:  # noqa: BLE001 - one notice's bug must not stop the others; the timer retries
                self.log({**fields, "alert": f"the notice was not tried now ({type(exc).__name__}: {exc})"},
                          "warning")

    def _next(self, waiting: SimpleQueue[tuple[str, dict[str, object]]]) -> tuple[str, dict[str, object]] | None:
        """The next notice to try; None once idle, so the runtime a reload replaced keeps no thread."""
        try:
            return waiting.get(timeout=IDLE_THREAD_EXIT)
        except Empty:
            with self._lock:
                if not waiting.empty():  # handed over while the wait timed out
                    return waiting.get()
                self._waiting = None
                return None

    def _remember(self, key: tuple[object, ...]) -> None:
        if len(self._known) >= _KNOWN_LIMIT:
            self._known.pop(next(iter(self._known)))
        self._known[key] = None

    def log(self, fields: dict[str, object], priority: str) -> None:
        maillog.write(self.config.log, fields, priority)


def notify_blocked(config: Config, ledger: Ledger, *, account: str, customer_id: str, reason: str,
                   at: float) -> None:
    """Tell the customer (and the admin) that ``account`` was blocked automatically, once per block.

    For a caller without a runtime; the pipeline uses its runtime's notifier (``Notifier.blocked``).
    """
    if config.notify is None:
        return
    from .relay import Upstream

    upstream = Upstream(config.upstream, config.path)
    try:
        Notifier(config, ledger, upstream).blocked(account, customer_id, reason, at)
    finally:
        upstream.close()


def iso_seconds(at: float, *, up: bool = True) -> str:
    """``2026-12-04T19:30:01Z``: ISO 8601 UTC, to the second; a promise is rounded up, never early."""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(math.ceil(at - 1e-6) if up else math.floor(at)))
