"""Timeouts by stage (RFC 5321 4.5.3.2), and no duplicate loop after the final dot, in-process and in the runner."""

from __future__ import annotations

import json
import time

import pytest

from sendmail_shim import queue
from tests.support.shim import Shim
from tests.support.upstream import SmtpUpstream

MESSAGE = b"From: post@kunde.example\nTo: ola@x.example\nSubject: s\n\nhei\n"


def run_queue(shim: Shim) -> dict:
    result = shim.admin("queue", "run", "--now", "--json")
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


def only_entry(shim: Shim) -> queue.QueuedMessage:
    (entry,) = queue.list_queue(shim.ledger, include_done=True)
    return entry


def queue_later(shim: Shim, upstream: SmtpUpstream) -> queue.QueuedMessage:
    """A message in the queue after an ordinary temporary refusal, and the upstream well again."""
    upstream.script.replies["MAIL"] = "451 4.3.0 try later"
    assert shim.sendmail("-t", "-i", input=MESSAGE).code == 0
    del upstream.script.replies["MAIL"]
    return only_entry(shim)


@pytest.mark.parametrize(("stage", "key", "text"), [("MAIL", "mail_timeout", "MAIL FROM"),
                                                     ("RCPT", "rcpt_timeout", "RCPT TO")])
def test_the_runner_waits_as_long_as_each_stage_allows(shim: Shim, upstream: SmtpUpstream, stage: str, key: str,
                                                       text: str) -> None:
    queue_later(shim, upstream)
    upstream.script.delays[stage] = 2.5
    shim.configure("upstream", timeout=1, **{key: 1})  # the stage's own timeout is what counts
    assert run_queue(shim)["delivered"] == 0
    entry = only_entry(shim)
    assert entry.state == "queued" and f"did not answer {text} in 1 s" in (entry.last_error or "")
    shim.configure("upstream", timeout=1, **{key: 10})  # longer than [upstream] timeout: still waited for
    assert run_queue(shim)["delivered"] == 1
    assert only_entry(shim).state == "done" and len(upstream.received) == 1


def test_the_runner_waits_for_a_slow_reply_to_the_final_dot(shim: Shim, upstream: SmtpUpstream) -> None:
    """[upstream] timeout is short, but the reply to the dot gets dot_timeout (10 minutes by default)."""
    queue_later(shim, upstream)
    upstream.script.delays["DATA"] = 3
    shim.configure("upstream", timeout=1)
    report = run_queue(shim)
    assert (report["delivered"], report["uncertain"]) == (1, 0)
    assert only_entry(shim).state == "done" and len(upstream.received) == 1
    assert run_queue(shim)["messages"] == 0


def test_an_unanswered_dot_in_the_runner_is_uncertain_and_retried_once_then_held(shim: Shim,
                                                                                 upstream: SmtpUpstream) -> None:
    queue_later(shim, upstream)
    upstream.script.delays["DATA"] = 3
    shim.configure("upstream", dot_timeout=1)
    assert run_queue(shim)["uncertain"] == 1
    entry = only_entry(shim)
    assert entry.state == "uncertain" and entry.unconfirmed == 1
    assert "did not answer the end of data in 1 s" in (entry.last_error or "")
    assert "closed the connection" not in (entry.last_error or "")
    # The one retry waits for the longest backoff step, not the first one.
    assert entry.next_attempt_at - time.time() >= 4 * 3600 - 60
    assert shim.admin("queue", "run", "--json").stdout.count(b'"messages": 0') == 1  # not due yet
    for _ in range(3):
        run_queue(shim)
    assert len(upstream.received) == 2  # the first copy and the one retry, never a third
    first, second = upstream.received
    assert first.headers["message-id"] == second.headers["message-id"]
    held = json.loads(shim.admin("queue", "show", entry.id, "--json").stdout)
    assert held["state"] == "held" and "not sent again" in held["last_error"]
    listed = json.loads(shim.admin("queue", "list", "--json").stdout)
    assert [e["state"] for e in listed] == ["held"]  # the admin sees it
    lines = [line for line in shim.log_lines() if "event=queue-attempt" in line]
    assert "state=uncertain" in lines[0] and "state=held" in lines[-1]


def test_in_process_a_dot_timeout_is_uncertain_with_the_true_reason(shim: Shim, upstream: SmtpUpstream) -> None:
    upstream.script.delays["DATA"] = 3
    shim.configure("upstream", dot_timeout=1)
    result = shim.sendmail("-t", "-i", input=MESSAGE)
    assert result.code == 0 and "has not yet confirmed" in result.line
    entry = only_entry(shim)
    assert entry.state == "uncertain"
    assert "did not answer the end of data in 1 s" in (entry.last_error or "")
    (line,) = [line for line in shim.log_lines() if "verdict=queued" in line]
    assert "state=uncertain" in line and "did not answer the end of data in 1 s" in line
    assert "closed the connection" not in line


def test_in_process_the_sync_budget_ends_the_wait_and_the_message_is_uncertain(shim: Shim,
                                                                               upstream: SmtpUpstream) -> None:
    """sendmail must exit: after sync_timeout it queues the message as uncertain and says so."""
    upstream.script.delays["DATA"] = 6
    shim.configure("upstream", sync_timeout=2)
    started = time.monotonic()
    result = shim.sendmail("-t", "-i", input=MESSAGE)
    elapsed = time.monotonic() - started
    assert result.code == 0 and elapsed < 2 + 2.5, elapsed
    assert "not yet confirmed" in result.line and "within 2 s" in result.line
    assert only_entry(shim).state == "uncertain"
    assert len(upstream.wait_for(1)) == 1  # the upstream did store it


def test_a_reply_lost_after_the_dot_sends_at_most_two_copies_over_many_runs(shim: Shim,
                                                                           upstream: SmtpUpstream) -> None:
    upstream.script.drop_after_data = True
    result = shim.sendmail("-t", "-i", input=MESSAGE)
    assert result.code == 0 and "closed the connection after the end of data" in result.line
    for _ in range(4):
        run_queue(shim)
    assert len(upstream.received) == 2
    assert len({m.headers["message-id"][0] for m in upstream.received}) == 1
    assert only_entry(shim).state == "held"
