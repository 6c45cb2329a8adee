"""`sendmail-shim metrics show|write`: what the ledger knows, for servers without the gate, as Prometheus reads it."""

from __future__ import annotations

import json
from pathlib import Path

from tests.support.prometheus import check_metrics, label_values, parse, value
from tests.support.shim import Shim
from tests.support.upstream import SmtpUpstream


def send(shim: Shim, sender: str, recipients: int = 1) -> None:
    to = ", ".join(f"r{i}@x.example" for i in range(recipients))
    result = shim.sendmail("-t", "-i", input=f"From: {sender}\nTo: {to}\nSubject: s\n\nhei\n".encode())
    assert result.code == 0, result.line


def test_the_textfile_names_at_most_n_customers_however_many_send(shim: Shim, upstream: SmtpUpstream,
                                                                   tmp_path: Path) -> None:
    shim.configure("metrics", top_customers=2)
    for n in range(1, 6):  # five customers sending: 2 + 3
        shim.ledger.add_customer(f"k{n}")
        shim.ledger.add_account(f"post@k{n}.example", f"k{n}", authenticated=True)
        for _ in range(n):
            send(shim, f"post@k{n}.example", recipients=2)
    assert shim.sendmail("-t", "-i", input=b"From: nobody@k1.example\nTo: a@x.example\n\nhei\n").code == 67
    target = tmp_path / "textfile" / "sendmail-shim.prom"
    target.parent.mkdir()
    written = shim.admin("metrics", "write", "--textfile", str(target), "--json")
    assert written.code == 0, written.stderr
    document = json.loads(written.stdout)
    assert document["ok"] is True and document["textfile"] == str(target)
    text = target.read_text()
    checked = check_metrics(text)
    assert (checked.returncode, checked.stdout, checked.stderr) == (0, "", "")
    samples = parse(text)
    assert document["series"] == len(samples)
    # The two busiest by name, the other three summed up, and the idle "kunde" among them.
    assert label_values(samples, "sendmail_shim_customer_usage", "customer") == {"k5", "k4", "(other)"}
    assert label_values(samples, "sendmail_shim_customer_usage_ratio", "customer") == {"k5", "k4", "(other)"}
    assert value(samples, "sendmail_shim_customer_usage", customer="k5", rule="250 messages / 1h") == 5
    assert value(samples, "sendmail_shim_customer_usage", customer="k4", rule="1500 recipients / 1h") == 8
    assert value(samples, "sendmail_shim_customer_usage", customer="(other)", rule="250 messages / 1h") == 1 + 2 + 3
    assert value(samples, "sendmail_shim_customer_usage_ratio", customer="(other)",
                 rule="250 messages / 1h") == 3 / 250
    assert value(samples, "sendmail_shim_customers") == 6
    # The decision log of the last hour and day: 15 sent, one refused for an unknown account.
    for window in ("1h", "24h"):
        assert value(samples, "sendmail_shim_recent_messages", verdict="sent", window=window) == 15
        assert value(samples, "sendmail_shim_recent_messages", verdict="refused", stage="UnknownAccount",
                     window=window) == 1
        assert value(samples, "sendmail_shim_recent_recipients", verdict="sent", window=window) == 30
    assert shim.admin("metrics", "show").stdout.decode().splitlines()[:3] == text.splitlines()[:3]


def test_a_customer_at_its_limit_is_counted_and_ranked_first(shim: Shim, upstream: SmtpUpstream) -> None:
    shim.configure("limits", customer=["2 messages / 1h"])
    shim.configure("metrics", top_customers=1)
    shim.ledger.add_customer("quiet")
    send(shim, "post@kunde.example")
    send(shim, "post@kunde.example")
    samples = parse(shim.admin("metrics", "show").stdout.decode())
    assert value(samples, "sendmail_shim_customer_usage_ratio", customer="kunde", rule="2 messages / 1h") == 1
    assert value(samples, "sendmail_shim_customers_at_limit") == 1
    assert value(samples, "sendmail_shim_customers_near_limit") == 1
    assert label_values(samples, "sendmail_shim_customer_usage", "customer") == {"kunde", "(other)"}


def test_blocked_accounts_are_counted_by_who_blocked_them(shim: Shim) -> None:
    samples = parse(shim.admin("metrics", "show").stdout.decode())
    assert (value(samples, "sendmail_shim_accounts_blocked", by="admin"),
            value(samples, "sendmail_shim_accounts_blocked", by="auto")) == (0, 0)
    assert shim.admin("account", "block", "post@kunde.example", "--reason", "phishing kit").code == 0
    assert shim.ledger.auto_block("bounce@kunde.example", "auto: 20 of 40 recipients failed", actor="test")
    assert shim.ledger.auto_block("post@kunde.example", "auto: already blocked", actor="test") is None
    text = shim.admin("metrics", "show").stdout.decode()
    assert check_metrics(text).returncode == 0
    samples = parse(text)
    assert (value(samples, "sendmail_shim_accounts_blocked", by="admin"),
            value(samples, "sendmail_shim_accounts_blocked", by="auto")) == (1, 1)
    assert shim.admin("account", "unblock", "bounce@kunde.example").code == 0
    samples = parse(shim.admin("metrics", "show").stdout.decode())
    assert value(samples, "sendmail_shim_accounts_blocked", by="auto") == 0


def test_the_queue_depth_and_the_oldest_age(shim: Shim, upstream: SmtpUpstream) -> None:
    upstream.script.replies["MAIL"] = "451 4.3.0 try later"
    send(shim, "post@kunde.example")
    send(shim, "post@kunde.example")
    samples = parse(shim.admin("metrics", "show").stdout.decode())
    assert value(samples, "sendmail_shim_queue_messages", state="queued") == 2
    assert 0 < value(samples, "sendmail_shim_queue_oldest_age_seconds") < 120


def test_show_json_is_one_document_of_the_same_figures(shim: Shim) -> None:
    result = shim.admin("metrics", "show", "--json")
    assert result.code == 0
    document = json.loads(result.stdout)
    names = [family["name"] for family in document["metrics"]]
    assert "sendmail_shim_queue_messages" in names and "sendmail_shim_customer_usage_ratio" in names
    assert document["generated_at"].endswith("Z")


def test_write_refuses_without_a_path_or_with_one_the_collector_ignores(shim: Shim, tmp_path: Path) -> None:
    missing = shim.admin("metrics", "write")
    assert missing.code == 64
    assert "no textfile: give --textfile PATH or set [metrics] textfile" in missing.stderr
    ignored = shim.admin("metrics", "write", "--textfile", str(tmp_path / "sendmail-shim.txt"))
    assert ignored.code == 64 and "reads only files ending in .prom" in ignored.stderr
    unwritable = shim.admin("metrics", "write", "--textfile", str(tmp_path / "no-such-dir" / "s.prom"))
    assert unwritable.code == 64 and "cannot write" in unwritable.stderr
    shim.configure("metrics", textfile="relative.prom")
    bad = shim.admin("metrics", "write")
    assert bad.code == 78 and "metrics.textfile" in bad.stderr


def test_write_uses_the_configured_textfile(shim: Shim, tmp_path: Path) -> None:
    target = tmp_path / "sendmail-shim.prom"
    shim.configure("metrics", textfile=str(target))
    assert shim.admin("metrics", "write").code == 0
    assert check_metrics(target.read_text()).returncode == 0
    assert target.stat().st_mode & 0o777 == 0o644


def test_an_unreadable_ledger_is_said_in_the_metrics_not_by_a_failure(shim: Shim, tmp_path: Path) -> None:
    shim.configure("ledger", url="postgresql+psycopg://nobody@127.0.0.1:1/none")
    result = shim.admin("metrics", "show")
    samples = parse(result.stdout.decode())
    assert value(samples, "sendmail_shim_ledger_up") == 0
    assert ("sendmail_shim_queue_messages", frozenset({("state", "queued")})) not in samples


def test_config_check_shows_where_the_gate_serves_its_metrics(shim: Shim) -> None:
    assert json.loads(shim.admin("config", "check", "--json").stdout)["summary"]["metrics"] == "off"
    shim.configure("metrics", listen="[::1]:9525")
    checked = shim.admin("config", "check", "--json")
    assert checked.code == 0 and json.loads(checked.stdout)["summary"]["metrics"] == "[::1]:9525"
    shim.configure("metrics", listen="192.0.2.10:9525")
    refused = shim.admin("config", "check")
    assert refused.code == 78
    assert refused.stderr.strip().endswith("metrics.listen: 192.0.2.10 is not a loopback address: the metrics "
                                           "name customers and must not be served to the network; use 127.0.0.1 "
                                           "or ::1 (a Prometheus elsewhere scrapes through a proxy or "
                                           "node-exporter's textfile), or a UNIX socket")


def test_the_figures_read_the_same_from_a_postgresql_ledger(postgres_cluster, tmp_path: Path) -> None:  # noqa: ANN001
    from sendmail_shim.gauges import ledger_families
    from sendmail_shim.ledger import Ledger
    from sendmail_shim.metrics import render

    ledger = Ledger(postgres_cluster.create_database())
    ledger.upgrade()
    try:
        for n in (1, 2, 3):
            ledger.add_customer(f"k{n}")
            account = ledger.add_account(f"post@k{n}.example", f"k{n}", authenticated=True)
            for _ in range(n):
                ledger.settle(ledger.reserve(account, 3, message_id="<m@x>"), "sent")
        text = render(ledger_families(ledger, 1, recent=True))
    finally:
        ledger.close()
    assert check_metrics(text).returncode == 0
    samples = parse(text)
    assert value(samples, "sendmail_shim_ledger_up") == 1
    assert value(samples, "sendmail_shim_customer_usage", customer="k3", rule="1500 recipients / 1h") == 9
    assert value(samples, "sendmail_shim_customer_usage", customer="(other)", rule="250 messages / 1h") == 3
    assert label_values(samples, "sendmail_shim_customer_usage", "customer") == {"k3", "(other)"}
