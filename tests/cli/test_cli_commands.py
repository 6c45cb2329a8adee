"""The admin CLI, command by command, through click's test runner."""

from __future__ import annotations

import json
import os
import pwd
import re
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from click.testing import Result

from sendmail_shim.config import load
from sendmail_shim.ledger import MIGRATIONS, Ledger
from tests.cli.conftest import Invoke
from tests.ledger.common import write_config


def document(result: Result) -> Any:
    assert result.stdout.count("\n{") == 0 or result.stdout.startswith("{")
    return json.loads(result.stdout)


def one_line_error(result: Result, code: int) -> str:
    assert result.exit_code == code, result.output
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sendmail-shim: "), result.stderr
    assert "Error:" not in lines[0] and "Traceback" not in result.output
    return lines[0].removeprefix("sendmail-shim: ")


def ledger_of(config_file: Path) -> Ledger:
    return Ledger.from_config(load(str(config_file)))


def test_db_upgrade_then_up_to_date(invoke: Invoke) -> None:
    first = invoke("db", "upgrade", "--json")
    assert first.exit_code == 0
    assert document(first)["applied"] == list(MIGRATIONS)
    again = invoke("db", "upgrade")
    assert again.stdout.splitlines()[0] == "the ledger is up to date"
    status = document(invoke("db", "status", "--json"))
    assert (status["applied"], status["pending"]) == (list(MIGRATIONS), [])


def test_commands_before_upgrade_say_run_db_upgrade(invoke: Invoke, tmp_path: Path) -> None:
    line = one_line_error(invoke("account", "list"), 78)
    assert line.endswith("does not exist; run: sendmail-shim db upgrade")
    assert not (tmp_path / "state" / "ledger.db").exists()
    assert document(invoke("db", "status", "--json"))["pending"] == list(MIGRATIONS)


def test_customers_and_their_unix_users(ready: Invoke) -> None:
    assert document(ready("customer", "bind", "kunde1", "web2", "--allow-missing-user", "--json"))["unix_users"] == \
        ["web1", "web2"]
    assert document(ready("customer", "list", "--json")) == [
        {"id": "kunde1", "unix_users": ["web1", "web2"], "domains": ["kunde.example"],
         "accounts": 1, "default_sender": None, "contact": None,
         "bindings": [{"unix_user": "web1", "default_sender": None, "sends_as": None},
                      {"unix_user": "web2", "default_sender": None, "sends_as": None}]}]
    assert document(ready("customer", "unbind", "web2", "--json"))["customer"] == "kunde1"
    assert "contact" not in ready("customer", "list").stdout
    assert one_line_error(ready("customer", "add", "kunde2", "--unix-user", "web1", "--allow-missing-user"), 65) == (
        "the Unix user web1 is bound to customer kunde1; unbind it first "
        "(sendmail-shim customer unbind web1)")
    assert ready("customer", "list").stdout == \
        "kunde1  unix users: web1  domains: kunde.example  accounts: 1\n"


def test_account_life_cycle(ready: Invoke) -> None:
    added = document(ready("account", "add", "Info@Kunde.example", "--customer", "kunde1",
                           "--json"))
    assert added == {"address": "info@kunde.example", "customer": "kunde1",
                     "authenticated": False, "blocked": False, "block_reason": None,
                     "blocked_by": None, "blocked_at": None,
                     "default_sender": False, "default_sender_unix_users": []}
    assert document(ready("account", "authenticate", "info@kunde.example", "--json"))[
        "authenticated"] is True
    blocked = document(ready("account", "block", "info@kunde.example", "--reason",
                             "phishing kit found", "--json"))
    assert (blocked["blocked"], blocked["block_reason"], blocked["blocked_by"]) == (True, "phishing kit found", "admin")
    assert blocked["blocked_at"].endswith("Z")
    assert ready("account", "list", "--customer", "kunde1").stdout.splitlines() == [
        "info@kunde.example  customer=kunde1  authenticated, BLOCKED (phishing kit found)",
        "post@kunde.example  customer=kunde1  authenticated",
    ]
    assert document(ready("account", "unblock", "info@kunde.example", "--reason", "cleaned",
                          "--json"))["blocked"] is False
    assert document(ready("account", "authenticate", "info@kunde.example", "--revoke",
                          "--json"))["authenticated"] is False
    assert document(ready("account", "remove", "info@kunde.example", "--json"))["ok"] is True
    assert [a["address"] for a in document(ready("account", "list", "--json"))] == \
        ["post@kunde.example"]


def test_account_errors_have_their_exit_codes(ready: Invoke) -> None:
    assert one_line_error(ready("account", "add", "not-an-address", "--customer", "kunde1"),
                          65).startswith("'not-an-address' is not an email address")
    assert one_line_error(ready("account", "add", "x@other.example", "--customer", "nope"),
                          67) == ("customer nope does not exist; add it with: "
                                  "sendmail-shim customer add")
    assert one_line_error(ready("account", "block", "ghost@kunde.example"), 67).startswith(
        "ghost@kunde.example is not a registered account")
    assert "--customer" in one_line_error(ready("account", "add", "x@kunde.example"), 64)


def test_errors_with_json_are_one_document_too(ready: Invoke) -> None:
    result = ready("account", "add", "bad", "--customer", "kunde1", "--json")
    assert result.exit_code == 65
    assert document(result) == {"ok": False, "exit_code": 65,
                                "error": "'bad' is not an email address ('bad' has no domain (no '@'); "
                                         "write e.g. post@kunde.example)"}


def test_usage_json_lists_every_rule_with_exact_next_free(ready: Invoke,
                                                         config_file: Path) -> None:
    ledger = ledger_of(config_file)
    account = ledger.find_account("post@kunde.example")
    assert account is not None
    first = ledger.reserve(account, 3, message_id="<0@x>")
    for i in range(1, 25):
        ledger.reserve(account, 3, message_id=f"<{i}@x>")
    result = ready("usage", "--account", "post@kunde.example", "--json")
    assert result.exit_code == 0
    report = document(result)
    assert (report["scope"], report["subject"]) == ("account", "post@kunde.example")
    rows = [{k: rule[k] for k in ("scope", "metric", "window_seconds", "limit", "used",
                                  "remaining")} for rule in report["rules"]]
    assert rows == [
        {"scope": "account", "metric": "messages", "window_seconds": 300, "limit": 25,
         "used": 25, "remaining": 0},
        {"scope": "account", "metric": "recipients", "window_seconds": 300, "limit": 250,
         "used": 75, "remaining": 175},
        {"scope": "account", "metric": "recipients", "window_seconds": 86400, "limit": 1000,
         "used": 75, "remaining": 925},
        {"scope": "account", "metric": "recipients", "window_seconds": 2592000, "limit": 5000,
         "used": 75, "remaining": 4925},
        {"scope": "customer", "metric": "messages", "window_seconds": 3600, "limit": 250,
         "used": 25, "remaining": 225},
        {"scope": "customer", "metric": "recipients", "window_seconds": 3600, "limit": 1500,
         "used": 75, "remaining": 1425},
    ]
    next_free = report["rules"][0]["next_free_at"]
    assert datetime.fromisoformat(next_free).timestamp() == first.at + 300
    assert [rule["next_free_at"] for rule in report["rules"][1:]] == [None] * 5
    text = ready("usage", "--account", "post@kunde.example").stdout.splitlines()
    assert text[0] == "account post@kunde.example"
    assert text[1].startswith("  25 messages / 5m         used     25  remaining      0  "
                              "next free ")
    assert re.search(r" UTC \(in (5 min|4 min \d+ s)\)$", text[1])
    assert text[5] == "customer kunde1"


def test_usage_needs_exactly_one_subject(ready: Invoke) -> None:
    assert one_line_error(ready("usage"), 64).startswith(
        "give exactly one of --account ADDRESS or --customer ID")
    one_line_error(ready("usage", "--account", "post@kunde.example", "--customer", "kunde1"), 64)
    one_line_error(ready("usage", "--customer", "ghost"), 67)


def test_usage_reset_is_audited(ready: Invoke, config_file: Path) -> None:
    ledger = ledger_of(config_file)
    account = ledger.find_account("post@kunde.example")
    assert account is not None
    ledger.reserve(account, 7, message_id="<m@x>")
    reset = document(ready("usage", "reset", "--customer", "kunde1", "--reason",
                           "compromised form fixed", "--json"))
    assert (reset["scope"], reset["subject"], reset["by"]) == ("customer", "kunde1", "tester")
    after = document(ready("usage", "--customer", "kunde1", "--json"))["rules"]
    assert [rule["used"] for rule in after] == [0, 0]
    audit = document(ready("log", "--audit", "--json", "--limit", "1"))[0]
    assert (audit["action"], audit["actor"], audit["detail"]) == \
        ("usage reset", "tester", "customer: compromised form fixed")
    assert "--reason" in one_line_error(ready("usage", "reset", "--customer", "kunde1"), 64)


def test_limits_show_prints_the_configured_rules_and_overrides(ready: Invoke,
                                                              tmp_path: Path) -> None:
    (tmp_path / "custom").mkdir()
    config = write_config(tmp_path / "custom", f"sqlite:///{tmp_path}/state/ledger.db",
                          account_rules=["10 messages / 1m"], customer_rules=["99 messages / 1h"])
    shown = document(ready("limits", "show", "--json", config=config))
    assert shown["account"] == [{"rule": "10 messages / 1m", "metric": "messages", "limit": 10,
                                 "window_seconds": 60}]
    assert shown["customer"][0]["rule"] == "99 messages / 1h" and shown["overrides"] == []
    made = document(ready("override", "set", "--customer", "kunde1", "--rule",
                          "500 messages / 1h", "--expires", "2099-01-01T00:00",
                          "--reason", "migration weekend", "--json"))
    text = ready("limits", "show", config=config).stdout.splitlines()
    assert text[:5] == ["account rules (each sending account):", "  10 messages / 1m",
                        "customer rules (all of a customer's accounts together):",
                        "  99 messages / 1h", "overrides:"]
    assert text[5] == (f"  #{made['id']} customer kunde1: 500 messages / 1h until "
                       f"2099-01-01 00:00:00 UTC - migration weekend")


def test_overrides_set_list_and_remove(ready: Invoke) -> None:
    made = document(ready("override", "set", "--account", "post@kunde.example", "--rule",
                          "100 messages / 5m", "--expires", "7d", "--reason", "newsletter",
                          "--json"))
    assert (made["scope"], made["metric"], made["limit"], made["window_seconds"],
            made["reason"], made["created_by"]) == \
        ("account", "messages", 100, 300, "newsletter", "tester")
    usage = document(ready("usage", "--account", "post@kunde.example", "--json"))["rules"][0]
    assert usage["limit"] == 100 and usage["override"]["id"] == made["id"]
    assert [o["id"] for o in document(ready("override", "list", "--json"))] == [made["id"]]
    assert document(ready("override", "rm", str(made["id"]), "--json"))["ok"] is True
    assert document(ready("override", "list", "--json")) == []
    one_line_error(ready("override", "rm", str(made["id"])), 67)


def test_override_input_errors(ready: Invoke) -> None:
    base = ["override", "set", "--account", "post@kunde.example", "--reason", "x"]
    assert "is not a limit rule" in one_line_error(
        ready(*base, "--rule", "lots", "--expires", "7d"), 65)
    assert "is not an expiry" in one_line_error(
        ready(*base, "--rule", "9 messages / 1m", "--expires", "someday"), 65)
    assert "in the past" in one_line_error(
        ready(*base, "--rule", "9 messages / 1m", "--expires", "2001-01-01"), 65)
    one_line_error(ready("override", "set", "--account", "post@kunde.example",
                         "--rule", "9 messages / 1m", "--expires", "7d"), 64)


def test_log_shows_recent_decisions(ready: Invoke, config_file: Path) -> None:
    ledger = ledger_of(config_file)
    ledger.record_decision(verdict="sent", code=0, account="post@kunde.example",
                           customer="kunde1", uid=1001, recipients=2, time=1_778_328_000.0)
    ledger.record_decision(verdict="refused", code=69, account="post@kunde.example",
                           customer="kunde1", uid=1001, recipients=1, time=1_778_328_001.0,
                           reason="reached 25 messages per 5 minutes")
    entries = document(ready("log", "--account", "post@kunde.example", "--json"))
    assert [(e["verdict"], e["code"], e["at"]) for e in entries] == [
        ("refused", 69, "2026-05-09T12:00:01.000000Z"), ("sent", 0, "2026-05-09T12:00:00.000000Z")]
    assert ready("log", "--limit", "1").stdout == (
        "2026-05-09 12:00:01 UTC  refused (69)  post@kunde.example  customer=kunde1  uid=1001"
        "  recipients=1  reached 25 messages per 5 minutes\n")


def test_log_shows_notices_or_the_audit_log_not_both(ready: Invoke) -> None:
    assert ready("log", "--notices").stdout == "no notices\n"
    assert document(ready("log", "--notices", "--json")) == []
    both = ready("log", "--notices", "--audit")
    assert both.exit_code == 64 and "give --audit or --notices, not both" in both.stderr


def test_config_check_reports_a_good_config(ready: Invoke, config_file: Path) -> None:
    report = document(ready("config", "check", "--json"))
    assert report["ok"] is True and report["problems"] == []
    assert report["config"] == str(config_file)
    assert report["summary"]["account_limits"][0] == "25 messages / 5m"
    assert report["summary"]["notify"] == "off"


def test_config_check_shows_notify_and_names_a_bad_template(ready: Invoke, config_file: Path, tmp_path: Path) -> None:
    templates = tmp_path / "notices"
    templates.mkdir()
    with config_file.open("a") as handle:
        handle.write(f'[notify]\nfrom = "varsel@provider.example"\nadmin = ["support@provider.example"]\n'
                     f'language = "nb"\ntemplates = "{templates}"\n')
    assert document(ready("config", "check", "--json"))["summary"]["notify"] == (
        f"from varsel@provider.example, admin support@provider.example, warn at 0.8, language nb, "
        f"templates from {templates}")
    (templates / "warn.nb.txt").write_text("Subject: $who\n\n$brukt av $limit\n")
    line = one_line_error(ready("config", "check"), 78)
    assert line.startswith(f"{config_file}: notify.templates: {templates / 'warn.nb.txt'}: unknown placeholder $brukt")


def test_config_errors_exit_78_with_the_config_error(invoke: Invoke, tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[upstream]\nhost = "smtp.example.net"\n[spf]\nenabled = false\n'
                   '[limits]\naccount = ["lots"]\n')
    line = one_line_error(invoke("config", "check", config=bad), 78)
    assert line.startswith(f"{bad}: limits.account: 'lots' is not a limit rule")
    missing = one_line_error(invoke("account", "list", config=tmp_path / "none.toml"), 78)
    assert missing.endswith("file not found (set SENDMAIL_SHIM_CONFIG or create it)")


def test_config_check_finds_a_readable_password_file(invoke: Invoke, tmp_path: Path) -> None:
    secret = tmp_path / "password"
    secret.write_text("hunter2\n")
    secret.chmod(0o644)
    config = tmp_path / "relay.toml"
    config.write_text(f'[upstream]\nhost = "smtp.example.net"\nusername = "relay"\n'
                      f'password_file = "{secret}"\n[ledger]\n'
                      f'url = "sqlite:///{tmp_path}/state/ledger.db"\n[spf]\nenabled = false\n')
    invoke("db", "upgrade", config=config)
    result = invoke("config", "check", config=config)
    assert result.exit_code == 78
    assert (f"upstream.password_file: {secret} is open to other users (mode 0644, must be 0600); "
            f"run: chmod 600 {secret}") in result.stderr
    assert "hunter2" not in result.output


def test_unreachable_ledger_is_69(invoke: Invoke, tmp_path: Path) -> None:
    config = write_config(tmp_path, f"postgresql://postgres@/ledger?host={tmp_path}&port=5999",
                          busy_timeout=2)
    assert one_line_error(invoke("account", "list", config=config), 69).startswith(
        "cannot use the ledger database postgresql://postgres@/ledger")
    assert document(invoke("config", "check", "--json", config=config))["ok"] is False


def test_unknown_command_is_64(invoke: Invoke) -> None:
    assert one_line_error(invoke("frobnicate"), 64) == \
        "No such command 'frobnicate'. (see: sendmail-shim --help)"


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give files away")
def test_db_upgrade_can_hand_the_file_to_the_service_user(invoke: Invoke, tmp_path: Path) -> None:
    result = invoke("db", "upgrade", "--owner", "nobody")
    assert result.exit_code == 0, result.output
    nobody = pwd.getpwnam("nobody")
    for path in (tmp_path / "state", tmp_path / "state" / "ledger.db"):
        assert (path.stat().st_uid, path.stat().st_gid) == (nobody.pw_uid, nobody.pw_gid)
    assert one_line_error(invoke("db", "upgrade", "--owner", "no-such-user-here"), 65) == \
        "'no-such-user-here' is not a known user (or group)"


def test_db_prune_removes_what_retention_no_longer_keeps_and_says_so(ready: Invoke, config_file: Path) -> None:
    import time

    ledger = ledger_of(config_file)
    account = ledger.find_account("post@kunde.example")
    assert account is not None
    now = time.time()
    old = ledger.reserve(account, 2, message_id="<old>", now=now - 40 * 86400)
    ledger.settle_and_record(old, "sent", {"verdict": "sent", "code": 0, "time": now - 40 * 86400})
    ledger.settle_and_record(ledger.reserve(account, 1, message_id="<new>", now=now - 60), "sent",
                             {"verdict": "sent", "code": 0, "time": now - 60})
    ledger.reserve(account, 1, message_id="<killed>", now=now - 7200)  # never settled
    ledger.record_decision(verdict="refused", code=69, time=now - 100 * 86400)
    result = ready("db", "prune", "--json")
    assert result.exit_code == 0, result.output
    doc = document(result)
    assert doc["removed"] == {"sends": 1, "usage_buckets": 6, "queue_messages": 0, "decisions": 1,
                              "spf_verdicts": 0, "outcomes": 0}
    assert doc["reservations_resolved"] == 1 and doc["ok"] is True
    for key in ("sends", "queue_messages", "decisions"):
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z", doc["kept_since"][key])
    kept = datetime.fromisoformat(doc["kept_since"]["decisions"].replace("Z", "+00:00")).timestamp()
    assert abs(kept - (now - 90 * 86400)) < 60  # the default keep_decisions
    # The killed reservation stopped counting (with an audit row); the message of a minute ago counts.
    assert [u.used for u in ledger.usage("account", account.address, now=now)] == [1, 1, 1, 1]
    assert ledger.audit_log(1)[0].action == "reservation expired"
    text = ready("db", "prune")
    assert text.exit_code == 0
    assert text.stdout.splitlines()[0] == ("removed 0 sends, 0 usage buckets, 0 queue messages, 0 decisions, "
                                           "0 spf verdicts, 0 outcomes")


def test_binding_a_unix_user_that_does_not_exist_is_65(invoke: Invoke, config_file: Path) -> None:
    assert invoke("db", "upgrade").exit_code == 0
    missing = "nosuchuser-shimtest"
    for args in (("customer", "add", "kunde9", "--unix-user", missing), ("customer", "bind", "kunde9", missing)):
        assert one_line_error(invoke(*args), 65) == (
            f"there is no Unix user named {missing} on this server; check the name, "
            f"or bind it ahead of its creation with --allow-missing-user")
    assert ledger_of(config_file).list_customers() == []  # nothing was added
    added = document(invoke("customer", "add", "kunde9", "--unix-user", missing, "--allow-missing-user", "--json"))
    assert added["unix_users"] == [missing]
    real = document(invoke("customer", "add", "kunde8", "--unix-user", "root", "--json"))
    assert real["unix_users"] == ["root"]
def test_default_senders_of_a_customer_and_of_one_binding(ready: Invoke) -> None:
    ready("customer", "bind", "kunde1", "web2", "--allow-missing-user")
    ready("account", "add", "shop@kunde.example", "--customer", "kunde1", "--authenticated")
    added = document(ready("customer", "add", "kunde1", "--default-sender", "Post@Kunde.example", "--json"))
    assert added["default_sender"] == "post@kunde.example"
    shown = document(ready("customer", "set", "kunde1", "--unix-user", "web2", "--default-sender",
                           "shop@kunde.example", "--json"))
    assert shown == document(ready("customer", "show", "kunde1", "--json"))
    assert shown["bindings"] == [
        {"unix_user": "web1", "default_sender": None, "sends_as": "post@kunde.example"},
        {"unix_user": "web2", "default_sender": "shop@kunde.example", "sends_as": "shop@kunde.example"}]
    listed = {a["address"]: (a["default_sender"], a["default_sender_unix_users"])
              for a in document(ready("account", "list", "--json"))}
    assert listed == {"post@kunde.example": (True, []), "shop@kunde.example": (False, ["web2"])}
    assert ready("account", "list").stdout.splitlines() == [
        "post@kunde.example  customer=kunde1  authenticated, default sender",
        "shop@kunde.example  customer=kunde1  authenticated, default sender of web2",
    ]
    assert ready("customer", "show", "kunde1").stdout == (
        "kunde1  unix users: web1, web2 (default sender shop@kunde.example)  domains: kunde.example  "
        "accounts: 2  default sender: post@kunde.example\n")
    cleared = document(ready("customer", "set", "kunde1", "--no-default-sender", "--json"))
    assert cleared["default_sender"] is None and cleared["bindings"][1]["sends_as"] == "shop@kunde.example"


def test_a_default_sender_that_is_not_the_customers_is_refused(ready: Invoke) -> None:
    ready("customer", "add", "kunde2")
    ready("account", "add", "post@other.example", "--customer", "kunde2")
    assert one_line_error(ready("customer", "set", "kunde1", "--default-sender", "post@other.example"), 65) == (
        "post@other.example is an account of customer kunde2, not of kunde1; "
        "a default sender must be one of the customer's accounts")
    refused = ready("customer", "add", "kunde3", "--unix-user", "web9", "--allow-missing-user",
                    "--default-sender", "nobody@kunde.example")
    assert one_line_error(refused, 67).startswith("nobody@kunde.example is not a registered")
    assert one_line_error(ready("customer", "show", "kunde3"), 67).startswith("customer kunde3 does not exist")
    assert one_line_error(ready("customer", "set", "kunde1", "--unix-user", "web9", "--default-sender",
                                "post@kunde.example"), 67).startswith("the Unix user web9 is not bound to customer")
    usage = ready("customer", "set", "kunde1")
    assert usage.exit_code == 64 and "give exactly one of --default-sender ADDRESS or --no-default-sender" \
        in usage.stderr
    assert document(ready("customer", "show", "kunde1", "--json"))["default_sender"] is None


def test_a_customers_contact_is_checked_shown_and_audited(ready: Invoke) -> None:
    shown = document(ready("customer", "set", "kunde1", "--contact", "Drift@Kunde-IT.example", "--json"))
    assert shown["contact"] == "Drift@Kunde-IT.example"  # kept as written: a local part may be case-sensitive
    assert ready("customer", "show", "kunde1").stdout.rstrip().endswith("contact: Drift@Kunde-IT.example")
    assert document(ready("customer", "list", "--json"))[0]["contact"] == "Drift@Kunde-IT.example"
    assert one_line_error(ready("customer", "set", "kunde1", "--contact", "not an address"), 65).startswith(
        "'not an address' is not an email address")
    assert document(ready("customer", "add", "kunde2", "--contact", "it@kunde2.example", "--json"))["contact"] == \
        "it@kunde2.example"
    assert document(ready("customer", "set", "kunde1", "--no-contact", "--json"))["contact"] is None
    usage = ready("customer", "set", "kunde1", "--unix-user", "web1", "--contact", "a@b.example")
    assert usage.exit_code == 64 and "--contact is the customer's" in usage.stderr
    audit = document(ready("log", "--audit", "--json"))
    details = [(e["action"], e["subject"], e["detail"]) for e in audit if e["action"] == "customer contact"]
    assert details == [("customer contact", "kunde1", "contact cleared"),
                       ("customer contact", "kunde2", "contact it@kunde2.example"),
                       ("customer contact", "kunde1", "contact Drift@Kunde-IT.example")]
