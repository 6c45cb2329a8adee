"""Every time in every ``--json`` document is ISO 8601 UTC (docs/admin-cli.md, "Times in JSON").

Every command that takes ``--json`` is found in the click command tree and run against a ledger
and queue with real rows in them; a command that takes ``--json`` but is not run here fails
the test, so a new command is covered as soon as it exists.

A field is a time when one of the ``_``-separated words of its name is a time word (``at``,
``since``, ``until``, ``expires``, ``time``, ``timestamp``, ``date``, ``when``): ``created_at``,
``next_free_at``, ``kept_since``, ``expires``. Durations are named for their unit
(``window_seconds``, ``ttl``, ``timeout``) and are numbers. A time field holds null, an ISO 8601
string with ``Z`` or a zero UTC offset, or a list or object of those.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timedelta
from typing import Any

import click
import pytest

from sendmail_shim.cli import cli
from tests.support.dnsserver import DnsServer
from tests.support.shim import ADMIN, Shim
from tests.support.upstream import SmtpUpstream

TIME_WORDS = {"at", "since", "until", "expires", "time", "timestamp", "date", "when"}
ISO_UTC = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?(Z|[+-]00:00)$")
MESSAGE = b"From: post@kunde.example\nTo: %s\nSubject: s\n\nhei\n"
ZONE = {"kunde.example": [{"TXT": "v=spf1 ip4:192.0.2.25 -all"}]}


def json_commands(group: click.Group = cli, path: tuple[str, ...] = ()) -> set[tuple[str, ...]]:
    """The path of every command in the tree that takes --json."""
    found: set[tuple[str, ...]] = set()
    for name, command in group.commands.items():
        if any(isinstance(p, click.Option) and "--json" in p.opts for p in command.params):
            found.add((*path, name))  # a group may take --json too (`usage --account A --json`)
        if isinstance(command, click.Group):
            found |= json_commands(command, (*path, name))
    return found


def is_time_name(key: str) -> bool:
    return bool(TIME_WORDS & set(key.lower().split("_")))


def time_problems(value: Any, where: str) -> list[str]:
    """What is wrong with the value of a time field (null, ISO 8601 UTC, or a list/object of those)."""
    if value is None:
        return []
    if isinstance(value, dict):
        return [p for key, item in value.items() for p in time_problems(item, f"{where}.{key}")]
    if isinstance(value, list):
        return [p for i, item in enumerate(value) for p in time_problems(item, f"{where}[{i}]")]
    if not isinstance(value, str) or not ISO_UTC.match(value):
        return [f"{where} = {value!r} is not ISO 8601 UTC"]
    moment = datetime.fromisoformat(value.replace("Z", "+00:00"))
    return [] if moment.utcoffset() == timedelta(0) else [f"{where} = {value!r} is not UTC"]


def check_document(document: Any, where: str, seen: set[str]) -> list[str]:
    """Every time field of the document, recursively; the names of those holding a time go to ``seen``."""
    problems: list[str] = []
    if isinstance(document, dict):
        for key, value in document.items():
            here = f"{where}.{key}"
            if is_time_name(key):
                problems += time_problems(value, here)
                if value is not None:
                    seen.add(key)
            elif isinstance(value, float) and 1e9 < value < 1e10:
                problems.append(f"{here} = {value!r} looks like epoch seconds under a name that hides it")
            else:
                problems += check_document(value, here, seen)
    elif isinstance(document, list):
        for i, item in enumerate(document):
            problems += check_document(item, f"{where}[{i}]", seen)
    return problems


@pytest.fixture
def dns() -> Iterator[DnsServer]:
    with DnsServer(ZONE) as server:
        yield server


def admin_json(shim: Shim, *args: str, findings: bool = False) -> Any:
    """The command's JSON document; ``findings``: it may exit non-zero for what it found (doctor)."""
    result = shim.admin(*args, "--json")
    assert result.code == 0 or (findings and result.stdout), (args, result.stderr, result.stdout)
    return json.loads(result.stdout)


def fill_queue(shim: Shim, upstream: SmtpUpstream) -> None:
    """Queued messages in several states: delivered, refused for good (with a bounce), still waiting."""
    upstream.script.replies["MAIL"] = "451 4.3.0 try later"
    for rcpt in (b"ok@x.example", b"gone@x.example"):
        assert shim.sendmail("-t", "-i", input=MESSAGE % rcpt).code == 0
    del upstream.script.replies["MAIL"]
    upstream.script.replies["RCPT:gone@x.example"] = "550 5.1.1 no such user"
    assert admin_json(shim, "queue", "run", "--now")["failed"] == 1
    upstream.script.replies["MAIL"] = "451 4.3.0 try later"
    assert shim.sendmail("-t", "-i", input=MESSAGE % b"later@x.example").code == 0
    del upstream.script.replies["MAIL"]


def serve_json(shim: Shim) -> Any:
    """`serve --json` prints its document when the gate stops: start it, wait for its socket, stop it.
    As root without --user it refuses to start, and its document is the refusal."""
    socket_path = shim.dir / "gate" / "gate.sock"
    shim.configure("gate", socket=str(socket_path), trust="single-tenant")
    if os.geteuid() == 0:
        refused = admin_json(shim, "serve", findings=True)
        assert refused["ok"] is False and refused["exit_code"] == 78, refused
        return refused
    proc = subprocess.Popen([ADMIN, "serve", "--json"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            env=shim.env, cwd=shim.dir)
    try:
        deadline = time.monotonic() + 30
        while not socket_path.exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert socket_path.exists(), proc.stderr.read().decode() if proc.poll() is not None else "no socket"
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    shim.sections.pop("gate")
    shim.write()
    assert stdout, stderr
    return json.loads(stdout)


def run_every_json_command(shim: Shim, upstream: SmtpUpstream, dns: DnsServer) -> dict[tuple[str, ...], Any]:
    """Each command with --json, in an order that leaves rows of every kind behind it."""
    shim.configure("spf", relay_ips=["192.0.2.25"], nameservers=[dns.nameserver], timeout=2)
    fill_queue(shim, upstream)
    docs: dict[tuple[str, ...], Any] = {}

    def run(*args: str, findings: bool = False) -> Any:
        path = tuple(a for a in args if not a.startswith("-"))
        command = next(c for c in sorted(json_commands(), key=len, reverse=True) if path[:len(c)] == c)
        docs[command] = admin_json(shim, *args, findings=findings)
        return docs[command]

    run("db", "upgrade")
    run("db", "status")
    run("customer", "add", "kunde2", "--unix-user", "web2", "--allow-missing-user")
    run("account", "add", "info@kunde2.example", "--customer", "kunde2")
    run("account", "authenticate", "info@kunde2.example")
    run("customer", "set", "kunde2", "--default-sender", "info@kunde2.example")
    run("customer", "bind", "kunde2", "web3", "--allow-missing-user")
    run("customer", "unbind", "web3")
    run("customer", "show", "kunde2")
    run("customer", "list")
    run("account", "block", "info@kunde2.example", "--reason", "spam")
    run("account", "unblock", "info@kunde2.example", "--reason", "cleaned")
    run("account", "list")
    made = run("override", "set", "--account", "post@kunde.example", "--rule", "50 messages / 5m",
               "--expires", "2h", "--reason", "campaign")
    run("override", "set", "--customer", "kunde", "--rule", "500 messages / 1h", "--expires", "1d",
        "--reason", "campaign")
    run("override", "list")
    run("limits", "show", "--account", "post@kunde.example")
    run("usage", "--account", "post@kunde.example")
    run("usage", "reset", "--customer", "kunde", "--reason", "forgiven")
    run("override", "rm", str(made["id"]))
    run("log")
    run("report", "--since", "24h", "--by", "script")
    docs[("log", "--audit")] = admin_json(shim, "log", "--audit")
    docs[("log", "--notices")] = admin_json(shim, "log", "--notices")
    run("config", "check")
    run("spf", "check", "kunde.example")
    entries = run("queue", "list", "--all")
    waiting = [e for e in entries if e["state"] == "queued" and e["kind"] == "message"]
    run("queue", "show", waiting[0]["id"])
    run("queue", "run")
    run("queue", "delete", waiting[0]["id"])
    run("db", "prune")
    run("metrics", "show")
    run("metrics", "write", "--textfile", str(shim.dir / "sendmail-shim.prom"))
    run("account", "remove", "info@kunde2.example")
    run("doctor", "--gate-user", os.environ.get("USER") or "root", findings=True)
    docs[("serve",)] = serve_json(shim)
    return docs


def test_every_time_in_every_json_document_is_iso_8601_utc(shim: Shim, upstream: SmtpUpstream,
                                                            dns: DnsServer) -> None:
    docs = run_every_json_command(shim, upstream, dns)
    assert json_commands() <= set(docs), f"commands with --json not run here: {json_commands() - set(docs)}"
    seen: set[str] = set()
    problems = [p for command, doc in docs.items() for p in check_document(doc, " ".join(command), seen)]
    assert not problems, "\n".join(problems)
    entries = docs[("queue", "list")]  # the queue had rows of several states and kinds
    assert {"done", "queued"} <= {e["state"] for e in entries}
    assert "bounce" in {e["kind"] for e in entries}
    assert {"delivered", "failed", "pending"} <= {r["state"] for e in entries for r in e["recipients"]}
    # the rows were real: their times were there to check
    assert {"created_at", "next_attempt_at", "expires_at", "at", "checked_at", "kept_since", "generated_at",
            "written_at", "blocked_at"} <= seen, seen


@pytest.mark.parametrize(("key", "value", "ok"), [
    ("created_at", "2026-12-03T12:00:00.000000Z", True), ("next_free_at", None, True),
    ("kept_since", {"sends": "2026-12-03T12:00:00+00:00"}, True),
    ("created_at", 1796197545.841338, False), ("expires", "2026-12-03 12:00:00 UTC", False),
    ("until", "2026-12-03T13:00:00+01:00", False), ("kept_since", {"sends": 1796197545.8}, False),
    ("window_seconds", 300, True), ("size", 1796197545.5, False),
])
def test_the_rule_tells_times_from_other_fields(key: str, value: Any, ok: bool) -> None:
    assert (check_document({"outer": [{key: value}]}, "doc", set()) == []) is ok
