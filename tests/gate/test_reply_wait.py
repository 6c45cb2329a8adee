"""A slow reply to the final dot through the gate: the site gets its answer in time, the message goes once."""

from __future__ import annotations

import json
import time

from tests.gate.conftest import needs_users
from tests.gate.deployment import Deployment, message
from tests.support.upstream import SmtpUpstream

SYNC_TIMEOUT = 3  # scaled down from 30 s, as the dot's delay is from 40 s (the last test runs at full scale)
DOT_DELAY = 8  # past sync_timeout, within dot_timeout
SLACK = 2.5


def queue_entries(deployment: Deployment) -> list[dict]:
    result = deployment.admin("queue", "list", "--all", "--json")
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


def run_queue(deployment: Deployment) -> dict:
    result = deployment.admin("queue", "run", "--now", "--json")
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


def send_slowly_answered(deployment: Deployment, relay: SmtpUpstream) -> str:
    """One message whose final dot the relay answers late (or never); the site's view of it."""
    deployment.configure("upstream", sync_timeout=SYNC_TIMEOUT, dot_timeout=30)
    deployment.start_gate()
    relay.script.delays["DATA"] = DOT_DELAY
    started = time.monotonic()
    result = deployment.sendmail("-t", "-i", input=message(subject="slow"))
    elapsed = time.monotonic() - started
    assert result.code == 0 and elapsed < SYNC_TIMEOUT + SLACK, (result, elapsed)
    assert "queued as" in result.line and "has not yet confirmed" in result.line
    (entry,) = queue_entries(deployment)
    assert entry["state"] == "awaiting_reply"
    assert entry["id"] in result.line
    return str(entry["id"])


@needs_users
def test_a_late_250_marks_the_message_sent_and_it_arrives_once(deployment: Deployment,
                                                              relay: SmtpUpstream) -> None:
    queue_id = send_slowly_answered(deployment, relay)
    assert "verdict=sent" in deployment.wait_for_log("event=reply-after-dot", timeout=DOT_DELAY + 10)
    shown = json.loads(deployment.admin("queue", "show", queue_id, "--json").stdout)
    assert shown["state"] == "done" and [r["state"] for r in shown["recipients"]] == ["delivered"]
    assert run_queue(deployment)["messages"] == 0
    assert len(relay.received) == 1
    queued = deployment.wait_for_log("verdict=queued")
    assert "state=awaiting_reply" in queued and f"queue={queue_id}" in queued
    usage = json.loads(deployment.admin("usage", "--account", "post@a.example", "--json").stdout)
    assert any(rule["used"] == 1 for rule in usage["rules"] if rule["metric"] == "messages")


@needs_users
def test_a_connection_lost_after_the_dot_gives_two_copies_at_most(deployment: Deployment,
                                                                 relay: SmtpUpstream) -> None:
    relay.script.drop_after_data = True  # the reply to the final dot never comes, on every attempt
    queue_id = send_slowly_answered(deployment, relay)
    line = deployment.wait_for_log("event=reply-after-dot", timeout=DOT_DELAY + 10)
    assert "verdict=uncertain" in line and "state=uncertain" in line
    assert "closed the connection after the end of data" in line
    relay.script.delays.clear()
    for _ in range(4):
        run_queue(deployment)
    assert len(relay.received) == 2
    assert len({m.headers["message-id"][0] for m in relay.received}) == 1
    shown = json.loads(deployment.admin("queue", "show", queue_id, "--json").stdout)
    assert shown["state"] == "held" and "not sent again" in shown["last_error"]


@needs_users
def test_a_late_5xx_bounces_the_message(deployment: Deployment, relay: SmtpUpstream) -> None:
    relay.script.replies["DATA"] = "554 5.7.1 rejected after all"
    queue_id = send_slowly_answered(deployment, relay)
    assert "verdict=bounced" in deployment.wait_for_log("event=reply-after-dot", timeout=DOT_DELAY + 10)
    kinds = {e["id"]: (e["kind"], e["state"]) for e in queue_entries(deployment)}
    assert kinds.pop(queue_id) == ("message", "done")
    assert list(kinds.values()) == [("bounce", "queued")]  # to the sender, through the usual path


@needs_users
def test_at_the_products_defaults_a_reply_after_40_s_answers_the_site_in_30_s_and_sends_once(
        deployment: Deployment, relay: SmtpUpstream) -> None:
    """The fault as found: every [upstream] and [gate] timeout at its default (sync budget 30 s)."""
    del deployment.sections["upstream"]["timeout"], deployment.sections["gate"]["request_timeout"]
    deployment.write_config()
    deployment.start_gate()
    relay.script.delays["DATA"] = 40
    started = time.monotonic()
    result = deployment.sendmail("-t", "-i", input=message(subject="forty seconds"), timeout=90)
    elapsed = time.monotonic() - started
    assert result.code == 0 and 30 - SLACK < elapsed < 30 + SLACK, (result, elapsed)
    (entry,) = queue_entries(deployment)
    assert entry["state"] == "awaiting_reply" and entry["id"] in result.line
    line = deployment.wait_for_log("event=reply-after-dot", timeout=40 - elapsed + 15)
    assert "verdict=sent" in line
    shown = json.loads(deployment.admin("queue", "show", str(entry["id"]), "--json").stdout)
    assert shown["state"] == "done"
    assert run_queue(deployment)["messages"] == 0
    assert len(relay.received) == 1
