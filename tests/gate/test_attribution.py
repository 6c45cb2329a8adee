"""Which script sent it: a PHP site through the real gate, and ``sendmail-shim report``.

The site runs PHP as its Unix user with ``mail.add_x_header = On`` and
``sendmail_path`` pointing at the client; the gate (its own user) records the
header's ``UID:script.php`` and, from /proc, the program behind the client:
PHP's command line, since the gate may not read another user's executable.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

from tests.gate.conftest import needs_users
from tests.gate.deployment import Deployment, User, message, run_process
from tests.support.mailreader import read_mail
from tests.support.upstream import SmtpUpstream

pytestmark = needs_users

CONTACT = """<?php
$ok = mail("ola@x.example", "Kontakt", "Hei", "From: post@a.example");
echo $ok ? "sent" : "failed";
"""


def site_script(gate: Deployment, user: User, name: str, text: str) -> Path:
    site = gate.base / "site-a"
    site.mkdir(mode=0o755, exist_ok=True)
    path = site / name
    path.write_text(text)
    os.chown(path, user.uid, user.gid)
    return path


def run_php(gate: Deployment, script: Path, user: User) -> str:
    path = f"sendmail_path={gate.bin / 'sendmail'} -t -i"
    result = run_process(["php", "-n", "-d", "mail.add_x_header=On", "-d", path, str(script)],
                         env=gate.client_env(), cwd=str(script.parent), options=user.run_options())
    assert result.code == 0, result.stderr
    return result.stdout.decode() + result.stderr


def report(gate: Deployment, *args: str) -> dict:
    result = gate.admin("report", "--since", "1h", *args, "--json")
    assert result.code == 0, result.stderr
    return json.loads(result.stdout)


def wait_for_decisions(gate: Deployment, count: int) -> None:
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        groups = report(gate, "--by", "uid")["groups"]
        if sum(g["sent"] + g["queued"] + g["refused"]["total"] for g in groups) >= count:
            return
        time.sleep(0.05)
    raise AssertionError(f"fewer than {count} decisions recorded")


def test_a_php_site_is_named_by_its_script_and_user(gate: Deployment, relay: SmtpUpstream) -> None:
    a = gate.users.a
    script = site_script(gate, a, "kontakt.php", CONTACT)
    assert run_php(gate, script, a) == "sent", gate.log_lines()
    (got,) = relay.received
    assert read_mail(got.data)["X-PHP-Originating-Script"] == f"{a.uid}:kontakt.php"  # forwarded unchanged
    wait_for_decisions(gate, 1)
    (group,) = report(gate, "--by", "script")["groups"]
    assert group["key"] == f"{a.uid}:kontakt.php"
    assert group["users"] == [a.name] and group["sent"] == 1 and group["recipients"] == 1
    line = gate.wait_for_log("verdict=sent")
    assert f"script={a.uid}:kontakt.php" in line
    # The program behind the client: PHP, by its command line (the gate may not read its exe).
    assert f'exe="php -n -d mail.add_x_header=On -d sendmail_path={gate.bin / "sendmail"} -t -i {script}"' in line
    assert "cwd=" not in line


def test_report_counts_a_known_mix_of_sent_refused_and_queued(gate: Deployment, relay: SmtpUpstream) -> None:
    gate.stop_gate()
    gate.configure("limits", account=["3 messages / 5m"], customer=["100 messages / 1h"])
    gate.start_gate()
    relay.script.replies["RCPT:later@x.example"] = "451 4.7.1 try again later"
    a, b = gate.users.a, gate.users.b
    script = site_script(gate, a, "kontakt.php", CONTACT)
    for _ in range(2):
        assert run_php(gate, script, a) == "sent"
    assert gate.sendmail("-t", "-i", input=message(to="later@x.example"), user=a).code == 0  # queued, 3rd
    assert gate.sendmail("-t", "-i", input=message(), user=a).code == 69  # over 3 messages / 5m
    assert gate.sendmail("-t", "-i", input=message(sender="nobody@a.example"), user=a).code == 67
    assert gate.sendmail("-t", "-i", input=message(sender="post@b.example", to="x@x.example, y@x.example"),
                         user=b).code == 0
    wait_for_decisions(gate, 6)

    by_uid = {g["key"]: g for g in report(gate, "--by", "uid")["groups"]}
    assert set(by_uid) == {a.uid, b.uid}
    ga, gb = by_uid[a.uid], by_uid[b.uid]
    assert (ga["sent"], ga["queued"], ga["refused"]["total"], ga["recipients"]) == (2, 1, 2, 3)
    assert ga["refused"]["by_reason"] == {"LimitReached": 1, "UnknownAccount": 1}
    assert ga["users"] == [a.name] and {"script": f"{a.uid}:kontakt.php", "messages": 2} in ga["top_scripts"]
    # sendmail run by hand (here: by the test) is named by the program that ran it
    assert {"script": next(iter(s["script"] for s in ga["top_scripts"] if "pytest" in s["script"])),
            "messages": 3} in ga["top_scripts"]
    assert (gb["sent"], gb["queued"], gb["refused"]["total"], gb["recipients"]) == (1, 0, 0, 2)

    by_customer = {g["key"]: g for g in report(gate, "--by", "customer")["groups"]}
    assert (by_customer["ka"]["sent"], by_customer["ka"]["queued"]) == (2, 1)
    assert by_customer["kb"]["sent"] == 1
    accounts = report(gate, "--by", "account")
    assert [g["key"] for g in accounts["groups"]] == ["post@a.example", "post@b.example", "nobody@a.example"]
    assert accounts["since"].endswith("Z") and accounts["until"].endswith("Z")

    table = gate.admin("report", "--since", "1h", "--by", "account")
    assert table.code == 0, table.stderr
    lines = table.stdout.decode().splitlines()
    assert lines[1].split() == ["ACCOUNT", "SENT", "QUEUED", "REFUSED", "BOUNCED", "RECIPIENTS", "USERS"]
    assert lines[2].split() == ["post@a.example", "2", "1", "1", "0", "3", a.name]
    assert lines[3].strip() == "refused: LimitReached 1"
    assert lines[4].strip().startswith("scripts: ") and lines[4].endswith(f", {a.uid}:kontakt.php (2)")
    assert lines[5].split() == ["post@b.example", "1", "0", "0", "0", "2", b.name]
    assert lines[6].strip().startswith("scripts: ")
    assert lines[7].split() == ["nobody@a.example", "0", "0", "1", "0", "0", a.name]
    assert lines[8].strip() == "refused: UnknownAccount 1"


def test_a_forged_header_is_recorded_bounded_and_clean(gate: Deployment, relay: SmtpUpstream) -> None:
    forged = "1:evil\u0085\u202e.php" + "x" * 100_000
    text = f"X-PHP-Originating-Script: {forged}\nFrom: post@a.example\nTo: ola@x.example\nSubject: s\n\nb\n"
    assert gate.sendmail("-t", "-i", input=text.encode(), user=gate.users.a).code == 0
    wait_for_decisions(gate, 1)
    (group,) = report(gate, "--by", "script")["groups"]
    assert group["key"] == "1:evil??.php" + "x" * (255 - len("1:evil??.php"))
    (got,) = relay.received
    assert "x" * 100_000 in read_mail(got.data)["X-PHP-Originating-Script"]  # forwarded, only folded


def test_a_caller_that_is_gone_is_recorded_without_a_program(gate: Deployment, relay: SmtpUpstream) -> None:
    """The process that connected exits before the request; a child sends it on the same socket."""
    code = f"""
import os, socket, sys, time
sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect({str(gate.socket_path)!r})
parent = os.getpid()
if os.fork():
    os._exit(0)
while os.getppid() == parent:
    time.sleep(0.01)
from sendmail_shim import gate_protocol as p
sock.recv(64)
msg = b"From: post@a.example\\r\\nTo: ola@x.example\\r\\nSubject: s\\r\\n\\r\\nb\\r\\n"
for arg in (b"sendmail", b"-t", b"-i"):
    sock.sendall(p.frame(p.ARG, arg))
sock.sendall(p.frame(p.DATA, msg) + p.frame(p.END, b""))
print(sock.recv(4096))
"""
    result = gate.run_as(gate.users.a, code)
    assert result.code == 0, result.stderr
    line = gate.wait_for_log("verdict=sent")  # the child goes on after run_as returns
    assert f"user={gate.users.a.name}" in line and "exe=" not in line and "cwd=" not in line
    assert len(relay.received) == 1


def test_report_refuses_a_bad_since(gate: Deployment) -> None:
    result = gate.admin("report", "--since", "yesterday")
    assert result.code == 64
    assert result.line == ("sendmail-shim: Invalid value for --since: 'yesterday' is not a time; write a duration "
                           "before now (24h, 7d, 30m) or a UTC time (2026-06-01T12:00) (see: sendmail-shim report "
                           "--help)")
