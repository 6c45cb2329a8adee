"""Automatic blocks ([abuse]): an account whose mail keeps failing, or that hammers the limits.

Two rules, judged after a message's decision is recorded (the gate's recorder
thread), never while the caller waits, and only for a message that had a
failed or deferred recipient or was refused by a limit:

- the share of recipients the upstream refused (5xx) or deferred (4xx) at RCPT
  in ``failed_window`` reaches ``failed_share``, once at least ``failed_min``
  of them failed or were deferred (cPanel's rule: a site sending to harvested
  or made-up addresses);
- more than ``limit_refusals`` refusals by the rate limits in ``limit_window``
  (a script sending in a loop).

A breach blocks the account (``blocked_by`` = auto, reason ``auto: ...``,
an audit row); an account already blocked, by an admin or by these rules,
is left as it is. ``account unblock`` lifts it, and only what the account
does after that counts again.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass

from . import maillog
from .config import AbuseConfig, Config
from .ledger import Ledger, LedgerError, Outcome, Tally
from .limits import describe_window

ACTOR = "sendmail-shim abuse"  # the audit log's actor of an automatic block


@dataclass(frozen=True)
class AutoBlock:
    """An account the abuse rules just blocked."""

    account: str
    customer_id: str
    rule: str  # "failed-share" or "limit-refusals"
    reason: str  # as stored on the account: "auto: ..."
    at: float


def signals(outcome: Outcome) -> bool:
    """Whether this message gives a rule anything to judge (clean mail costs no query)."""
    return bool(outcome.failed or outcome.deferred or outcome.limited)


def judge_all(config: Config, ledger: Ledger, outcomes: Iterable[Outcome]) -> list[AutoBlock]:
    """Judge each account with a signal among ``outcomes`` once; block those over a rule."""
    if not config.abuse.enabled:
        return []
    accounts = {o.account: o for o in outcomes if signals(o)}
    blocks = []
    for outcome in accounts.values():
        try:
            block = judge(config, ledger, outcome.account, outcome.customer_id or "")
        except LedgerError as exc:  # the next signal judges again; the log says why not now
            maillog.write(config.log, {"event": "auto-block-failed", "account": outcome.account,
                                       "reason": f"the ledger failed: {exc}; nothing was blocked"}, "warning")
            continue
        if block is not None:
            blocks.append(block)
    return blocks


def judge(config: Config, ledger: Ledger, account: str, customer_id: str,
          now: float | None = None) -> AutoBlock | None:
    """Block ``account`` when it is over a rule now and not blocked yet; the block, or None."""
    cfg = config.abuse
    now = time.time() if now is None else now
    counted = ledger.outcome_tally(account, failed_since=now - cfg.failed_window,
                                   limited_since=now - cfg.limit_window)
    breach = breached(cfg, counted)
    if breach is None:
        return None
    rule, reason = breach
    if ledger.auto_block(account, reason, actor=ACTOR) is None:
        return None  # blocked already: an admin's block stays as it is, and nothing is blocked twice
    block = AutoBlock(account, customer_id, rule, reason, now)
    on_auto_block(config, ledger, block)
    return block


def breached(cfg: AbuseConfig, counted: Tally) -> tuple[str, str] | None:
    """The rule broken and the block's reason, or None."""
    share = counted.failed / counted.recipients if counted.recipients else 0.0
    if counted.failed >= cfg.failed_min and share >= cfg.failed_share:
        return "failed-share", (
            f"auto: {counted.failed} of {counted.recipients} recipients failed or deferred in "
            f"{describe_window(cfg.failed_window)}, a share of {share:.2f} where {cfg.failed_share:g} blocks")
    if counted.limited > cfg.limit_refusals:
        return "limit-refusals", (
            f"auto: {counted.limited} refusals by the limits in {describe_window(cfg.limit_window)}, "
            f"more than {cfg.limit_refusals}")
    return None


def on_auto_block(config: Config, ledger: Ledger, block: AutoBlock) -> None:
    """The log line of an automatic block (the pipeline then sends its notice, with [notify])."""
    maillog.write(config.log, {"event": "auto-block", "account": block.account, "customer": block.customer_id,
                               "rule": block.rule, "reason": block.reason,
                               "action": "sendmail-shim account unblock " + block.account}, "warning")
