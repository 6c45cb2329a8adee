"""Never lose an accepted message: the queue, retries and bounces, with faults injected on loopback."""

from __future__ import annotations

import json
import signal
import ssl
import subprocess
import time

import pytest
import trustme

from sendmail_shim import queue
from sendmail_shim.ledger import Ledger
from tests.support.faultproxy import FaultProxy
from tests.support.postgres import PostgresCluster
from tests.support.shim import ADMIN, SENDMAIL, Shim
from tests.support.upstream import RawServer, SmtpUpstream, free_port

MESSAGE = b"From: post@kunde.example\nTo: ola@x.example, kari@x.example\nSubject: s\n\nhei\n"


def run_queue(shim: Shim, *args: str) -> dict:
    result = shim.admin("queue", "run", "--now", "--json", *args)
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


def sends_state(shim: Shim) -> list[str]:
    with shim.ledger.transaction(write=False) as tx:
        return [str(r[0]) for r in tx.rows("SELECT state FROM sends ORDER BY id")]


# ------------------------------------------------------------------ first attempt: queue or refuse


CODES = ["421 4.3.2 shutting down", "451 4.3.0 try later", "452 4.3.1 out of space",
         "550 5.7.1 refused", "552 5.3.4 too big", "554 5.7.1 rejected"]


@pytest.mark.parametrize("stage", ["MAIL", "RCPT", "DATA-COMMAND", "DATA"])
@pytest.mark.parametrize("reply", CODES)
def test_first_attempt_queues_temporary_and_refuses_permanent(shim: Shim, upstream: SmtpUpstream, stage, reply):
    outcome = "queued" if reply.startswith("4") else 69
    upstream.script.replies[stage] = reply
    result = shim.sendmail("-t", "-i", input=MESSAGE)
    entries = queue.list_queue(shim.ledger)
    if outcome == "queued":
        assert result.code == 0 and result.stderr == ""
        (entry,) = entries
        assert reply.split()[0] in (entry.last_error or "")
        assert sends_state(shim) == ["queued"]
    else:
        assert result.code == 69 and reply in result.line
        assert entries == [] and sends_state(shim) == ["released"]  # a permanent refusal does not count
    assert upstream.received == []


# A 9 KB reply line: over smtplib's 8192-octet limit, whatever code it starts with.
OVERLONG = "550 5.7.1 " + "x" * 9000


@pytest.mark.parametrize("stage", ["MAIL", "RCPT", "DATA-COMMAND"])
def test_an_overlong_reply_line_is_queued_and_retried_then_sent_once(shim: Shim, upstream: SmtpUpstream, stage):
    upstream.script.replies[stage] = OVERLONG
    result = shim.sendmail("-t", "-i", input=MESSAGE)
    assert (result.code, result.stderr) == (0, "")
    (entry,) = queue.list_queue(shim.ledger)
    assert "sent a reply line over 8192 octets (an SMTP protocol error)" in (entry.last_error or "")
    (line,) = shim.log_lines()
    assert "verdict=queued" in line and "protocol error" in line and "alert=" in line
    report = run_queue(shim)  # the queue runner takes it for a temporary failure too: a retry
    assert (report["deferred"], report["failed"], report["bounces"]) == (2, 0, 0)
    assert [e.id for e in queue.list_queue(shim.ledger)] == [entry.id]
    upstream.script.replies.clear()
    assert run_queue(shim)["delivered"] == 2
    assert run_queue(shim)["messages"] == 0
    (got,) = upstream.received
    assert got.rcpt_tos == ["ola@x.example", "kari@x.example"]
    assert sends_state(shim) == ["sent"]


def test_an_overlong_reply_to_the_final_dot_is_uncertain_and_retried_once(shim: Shim, upstream: SmtpUpstream):
    """The upstream answered the data unreadably: it may have the message, so one retry at most."""
    upstream.script.replies["DATA"] = OVERLONG
    result = shim.sendmail("-t", "-i", input=MESSAGE)
    assert result.code == 0 and "has not yet confirmed" in result.line
    (entry,) = queue.list_queue(shim.ledger)
    assert entry.state == "uncertain" and entry.unconfirmed == 1
    assert "answered the end of data with a reply line over 8192 octets" in (entry.last_error or "")
    upstream.script.replies.clear()
    assert run_queue(shim)["delivered"] == 2
    assert run_queue(shim)["messages"] == 0
    (got,) = upstream.received
    assert got.rcpt_tos == ["ola@x.example", "kari@x.example"]


def test_an_overlong_reply_line_closes_the_connection_at_once(ca: trustme.CA, shim: Shim):
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert("127.0.0.1").configure_cert(tls)
    with RawServer(ehlo=b"250-raw.test\r\n250 STARTTLS\r\n", tls=tls,
                   tls_replies={b"MAIL": OVERLONG.encode() + b"\r\n"}) as raw:
        shim.configure("upstream", port=raw.port)
        started = time.monotonic()
        result = shim.sendmail("-t", "-i", input=MESSAGE)
        assert time.monotonic() - started < 5  # no wait for more of the reply, nor for a timeout
        assert result.code == 0 and len(queue.list_queue(shim.ledger)) == 1
        deadline = time.monotonic() + 5
        while raw.closed_by_client == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert raw.closed_by_client == 1
    # Nothing more was said to a peer that broke the protocol: MAIL was the last command.
    assert bytes(raw.seen_in_tls).splitlines()[-1].upper().startswith(b"MAIL FROM:")
    assert raw.messages == []


@pytest.mark.parametrize("greeting", [b"421 4.3.2 busy\r\n", b"554 5.3.2 not now\r\n"])
def test_a_relay_refusing_us_at_the_greeting_queues_and_alerts(shim: Shim, greeting: bytes):
    with RawServer(greeting=greeting) as raw:
        shim.configure("upstream", port=raw.port)
        result = shim.sendmail("-t", "-i", input=MESSAGE)
    assert result.code == 0
    assert len(queue.list_queue(shim.ledger)) == 1
    assert "warning" in shim.log_lines()[0] and "alert=" in shim.log_lines()[0]


def test_queued_message_is_delivered_once_when_the_upstream_recovers(shim: Shim, upstream: SmtpUpstream):
    upstream.script.replies["MAIL"] = "451 4.3.0 try later"
    assert shim.sendmail("-t", "-i", input=MESSAGE).code == 0
    assert run_queue(shim)["deferred"] == 2  # still failing: kept, with backoff
    upstream.script.replies.clear()
    report = run_queue(shim)
    assert report["delivered"] == 2 and report["messages"] == 1
    assert run_queue(shim)["messages"] == 0
    (got,) = upstream.received
    assert got.rcpt_tos == ["ola@x.example", "kari@x.example"]
    assert queue.list_queue(shim.ledger) == [] and sends_state(shim) == ["sent"]


def test_backoff_is_respected_without_now(shim: Shim, upstream: SmtpUpstream):
    shim.configure("queue", min_backoff="1h")
    upstream.script.replies["MAIL"] = "451 4.3.0 try later"
    shim.sendmail("-t", "-i", input=MESSAGE)
    upstream.script.replies.clear()
    result = shim.admin("queue", "run", "--json")
    assert json.loads(result.stdout)["messages"] == 0  # not due for an hour
    (entry,) = queue.list_queue(shim.ledger)
    assert 3600 <= entry.next_attempt_at - entry.created_at <= 3600 * 1.25 + 1


def test_mixed_recipients_deliver_retry_and_bounce(shim: Shim, upstream: SmtpUpstream):
    message = b"From: post@kunde.example\nTo: a@x.example, b@x.example, c@x.example\nSubject: mixed\n\nhei\n"
    upstream.script.replies["RCPT:c@x.example"] = "452 4.2.2 mailbox full"
    assert shim.sendmail("-t", "-i", input=message).code == 0  # a and b have it, c waits
    assert [r.rcpt_tos for r in upstream.received] == [["a@x.example", "b@x.example"]]
    (entry,) = queue.list_queue(shim.ledger)
    assert {r.address: r.state for r in entry.recipients} == {
        "a@x.example": "delivered", "b@x.example": "delivered", "c@x.example": "pending"}
    upstream.script.replies["RCPT:c@x.example"] = "550 5.1.1 no such user"
    report = run_queue(shim)
    assert report["failed"] == 1 and report["bounces"] == 1
    run_queue(shim)  # delivers the bounce
    assert len(upstream.received) == 2  # a and b were never sent again
    bounce = upstream.received[1]
    assert bounce.mail_from == "<>" and bounce.rcpt_tos == ["post@kunde.example"]  # the null sender
    assert b"report-type=delivery-status" in bounce.data
    assert b"Final-Recipient: rfc822; c@x.example" in bounce.data and b"Status: 5.1.1" in bounce.data
    assert b"Subject: mixed" in bounce.data  # the original headers come back
    assert sends_state(shim) == ["sent"]


def test_expired_message_bounces_and_a_bounce_is_never_bounced(shim: Shim, upstream: SmtpUpstream):
    shim.configure("queue", max_age=1)
    upstream.script.replies["MAIL"] = "451 4.3.0 try later"
    assert shim.sendmail("-t", "-i", input=MESSAGE).code == 0
    time.sleep(1.1)
    report = run_queue(shim)
    assert report["failed"] == 2 and report["bounces"] == 1
    assert sends_state(shim) == ["released"]  # nobody got it: it no longer counts
    upstream.script.replies["MAIL"] = "550 5.1.8 bad sender"  # the bounce fails for good too
    report = run_queue(shim)
    assert report["failed"] == 1 and report["bounces"] == 0
    assert queue.list_queue(shim.ledger) == []
    assert upstream.received == []


def test_upstream_down_then_back(shim: Shim, ca: trustme.CA):
    port = free_port()
    shim.configure("upstream", port=port)
    assert shim.sendmail("-t", "-i", input=MESSAGE).code == 0
    with SmtpUpstream(ca, port=port) as back:
        assert run_queue(shim)["delivered"] == 2
        assert len(back.received) == 1


def test_php_mail_is_true_with_the_upstream_down_and_the_message_arrives_later(shim: Shim, ca: trustme.CA):
    port = free_port()
    shim.configure("upstream", port=port)
    proc = shim.php('var_dump(mail("ola@x.example", "Hei", "hallo", "From: post@kunde.example"));')
    assert proc.stdout.strip() == "bool(true)"
    with SmtpUpstream(ca, port=port) as back:
        run_queue(shim)
        (got,) = back.received
        assert got.rcpt_tos == ["ola@x.example"] and b"Subject: Hei" in got.data


# ------------------------------------------------------------------ faults on the wire

BIG = MESSAGE + b"x" * 76 * 4000 + b"\n"  # 300 kB: a fault "after 100 kB" lands mid-DATA


def test_connection_reset_mid_data_is_queued_and_sent_once_later(shim: Shim, upstream: SmtpUpstream):
    with FaultProxy(upstream.port, mode="reset", after=100_000) as proxy:
        shim.configure("upstream", port=proxy.port)
        assert shim.sendmail("-t", "-i", input=BIG).code == 0
        assert proxy.faulted.is_set()
    shim.configure("upstream", port=upstream.port)
    run_queue(shim)
    (got,) = upstream.received
    assert len(got.data) > 300_000


def test_stalled_upstream_times_out_instead_of_hanging(shim: Shim, upstream: SmtpUpstream):
    with FaultProxy(upstream.port, mode="stall", after=100_000) as proxy:
        shim.configure("upstream", port=proxy.port, timeout=1.5)
        started = time.monotonic()
        result = shim.sendmail("-t", "-i", input=BIG)
        assert time.monotonic() - started < 15
    assert result.code == 0 and len(queue.list_queue(shim.ledger)) == 1


def test_reply_lost_after_the_final_dot_gives_at_most_one_duplicate(shim: Shim, upstream: SmtpUpstream):
    upstream.script.drop_after_data = True
    assert shim.sendmail("-t", "-i", input=MESSAGE).code == 0  # we cannot know: it is queued
    upstream.script.drop_after_data = False
    run_queue(shim)
    first, second = upstream.received
    assert first.headers["message-id"] == second.headers["message-id"]
    assert run_queue(shim)["messages"] == 0


# ------------------------------------------------------------------ crashes


def crash_env(shim: Shim, point: str) -> dict[str, str]:
    return dict(shim.env, SENDMAIL_SHIM_CRASH_AT=point)


def test_sendmail_killed_before_the_queue_commit_refuses(shim: Shim, upstream: SmtpUpstream):
    upstream.script.replies["MAIL"] = "451 4.3.0 try later"
    proc = subprocess.run([SENDMAIL, "-t", "-i"], input=MESSAGE, env=crash_env(shim, "enqueue:before-commit"))
    assert proc.returncode == -signal.SIGKILL  # PHP sees failure
    assert queue.list_queue(shim.ledger) == []


def test_sendmail_killed_after_the_queue_commit_still_delivers_once(shim: Shim, upstream: SmtpUpstream):
    upstream.script.replies["MAIL"] = "451 4.3.0 try later"
    proc = subprocess.run([SENDMAIL, "-t", "-i"], input=MESSAGE, env=crash_env(shim, "enqueue:after-commit"))
    assert proc.returncode == -signal.SIGKILL
    upstream.script.replies.clear()
    run_queue(shim)
    assert len(upstream.received) == 1
    assert run_queue(shim)["messages"] == 0


def test_sendmail_killed_mid_data_sends_nothing_and_says_no(shim: Shim, upstream: SmtpUpstream):
    with FaultProxy(upstream.port, mode="stall", after=100_000) as proxy:
        shim.configure("upstream", port=proxy.port)
        proc = subprocess.Popen([SENDMAIL, "-t", "-i"], stdin=subprocess.PIPE, env=shim.env)
        proc.stdin.write(BIG)  # type: ignore[union-attr]
        proc.stdin.close()  # type: ignore[union-attr]
        assert proxy.faulted.wait(20)
        proc.kill()
        assert proc.wait(10) == -signal.SIGKILL
    assert upstream.received == [] and queue.list_queue(shim.ledger) == []


def test_runner_killed_mid_data_leaves_the_message_to_the_next_runner(shim: Shim, upstream: SmtpUpstream):
    upstream.script.replies["MAIL"] = "451 4.3.0 try later"
    shim.sendmail("-t", "-i", input=BIG)
    upstream.script.replies.clear()
    shim.configure("queue", lease=2)
    with FaultProxy(upstream.port, mode="stall", after=100_000) as proxy:
        shim.configure("upstream", port=proxy.port)
        runner = subprocess.Popen([ADMIN, "queue", "run", "--now"], env=shim.env)
        assert proxy.faulted.wait(20)
        runner.kill()
        runner.wait(10)
    shim.configure("upstream", port=upstream.port)
    assert run_queue(shim)["messages"] == 0  # still claimed by the dead runner
    time.sleep(2.1)
    assert run_queue(shim)["delivered"] == 2
    assert len(upstream.received) == 1


def test_runner_killed_after_the_upstream_took_it_gives_at_most_one_duplicate(shim: Shim, upstream: SmtpUpstream):
    upstream.script.replies["MAIL"] = "451 4.3.0 try later"
    shim.sendmail("-t", "-i", input=MESSAGE)
    upstream.script.replies.clear()
    shim.configure("queue", lease=1)
    proc = subprocess.run([ADMIN, "queue", "run", "--now"], env=crash_env(shim, "runner:after-data"))
    assert proc.returncode == -signal.SIGKILL
    time.sleep(1.1)
    run_queue(shim)
    assert run_queue(shim)["messages"] == 0
    first, second = upstream.received
    assert first.headers["message-id"] == second.headers["message-id"]


def account_usage(shim: Shim) -> dict[str, int]:
    """`sendmail-shim usage --json` as a control panel reads it: rule -> used."""
    result = shim.admin("usage", "--account", "post@kunde.example", "--json")
    assert result.code == 0, result.stderr
    return {rule["rule"]: rule["used"] for rule in json.loads(result.stdout)["rules"] if rule["scope"] == "account"}


def test_sendmail_killed_between_reserve_and_settle_counts_until_the_timeout(shim: Shim, upstream: SmtpUpstream):
    shim.configure("ledger", reservation_timeout=2)
    proc = subprocess.run([SENDMAIL, "-t", "-i"], input=MESSAGE, env=crash_env(shim, "pipeline:after-reserve"))
    killed_at = time.monotonic()
    assert proc.returncode == -signal.SIGKILL  # PHP sees failure; nothing was relayed
    assert upstream.received == []
    assert account_usage(shim)["25 messages / 5m"] == 1  # the safe side: it counts until the timeout
    assert sends_state(shim) == ["reserved"]
    time.sleep(max(0.0, killed_at + 2.2 - time.monotonic()))
    assert account_usage(shim) == {"25 messages / 5m": 0, "250 recipients / 5m": 0,
                                   "1000 recipients / 1d": 0, "5000 recipients / 30d": 0}
    assert sends_state(shim) == ["expired"]
    (entry, *_) = json.loads(shim.admin("log", "--audit", "--json").stdout)
    assert (entry["action"], entry["subject"], entry["actor"]) == \
        ("reservation expired", "post@kunde.example", "sendmail-shim")
    assert "2 recipient(s)" in entry["detail"] and "was not settled within 2 s" in entry["detail"]
    assert shim.sendmail("-t", "-i", input=MESSAGE).code == 0  # and the account sends again
    assert len(upstream.received) == 1 and sends_state(shim) == ["expired", "sent"]


# ------------------------------------------------------------------ many runners


def fill_queue(shim: Shim, count: int) -> None:
    from sendmail_shim.addresses import parse_mailbox
    from sendmail_shim.config import QueueConfig
    from sendmail_shim.envelope import Envelope
    from sendmail_shim.message import complete, parse

    for n in range(count):
        message = parse(f"From: post@kunde.example\nTo: r{n}@x.example\nSubject: {n}\n\nhei\n".encode(), True)
        complete(message, parse_mailbox("post@kunde.example"), "by test")
        envelope = Envelope(parse_mailbox("post@kunde.example"), (parse_mailbox(f"r{n}@x.example"),))
        queue.enqueue(shim.ledger, QueueConfig(), reservation=None, envelope=envelope, message=message,
                      error="upstream was down")


def race_runners(shim: Shim, count: int) -> None:
    runners = [subprocess.Popen([ADMIN, "queue", "run", "--now"], env=shim.env, stdout=subprocess.DEVNULL)
               for _ in range(count)]
    assert [r.wait(120) for r in runners] == [0] * count


@pytest.mark.parametrize("runners", [2, 10])
def test_concurrent_runners_deliver_each_message_once_on_sqlite(shim: Shim, upstream: SmtpUpstream, runners: int):
    fill_queue(shim, 100)
    race_runners(shim, runners)
    ids = sorted(r.headers["message-id"][0] for r in upstream.received)
    assert len(ids) == 100 and len(set(ids)) == 100
    assert queue.list_queue(shim.ledger) == []


def test_ten_runners_on_postgresql_deliver_each_message_once(postgres_cluster: PostgresCluster, shim: Shim,
                                                             upstream: SmtpUpstream):
    url = postgres_cluster.create_database()
    Ledger(url).upgrade()
    shim.configure("ledger", url=url)
    shim.ledger = Ledger(url)
    fill_queue(shim, 100)
    race_runners(shim, 10)
    ids = [r.headers["message-id"][0] for r in upstream.received]
    assert len(ids) == 100 and len(set(ids)) == 100


def test_queue_list_show_delete(shim: Shim, upstream: SmtpUpstream):
    upstream.script.replies["MAIL"] = "451 4.3.0 try later"
    shim.sendmail("-t", "-i", input=MESSAGE)
    listed = json.loads(shim.admin("queue", "list", "--json").stdout)
    (entry,) = listed
    assert entry["sender"] == "post@kunde.example" and entry["attempts"] == 1
    shown = shim.admin("queue", "show", entry["id"])
    assert "ola@x.example: pending" in shown.stdout.decode()
    assert shim.admin("queue", "delete", entry["id"]).code == 0
    assert json.loads(shim.admin("queue", "list", "--json").stdout) == []
    assert sends_state(shim) == ["released"]
    missing = shim.admin("queue", "show", entry["id"])
    assert missing.code == 67 and "no queued message" in missing.stderr
