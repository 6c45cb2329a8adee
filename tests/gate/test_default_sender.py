"""A site's Unix user, bound to a customer with a default sender, sending through the gate.

The caller is whoever the kernel says it is (SO_PEERCRED): plain ``mail -s``
without ``-r`` and cron's ``From: root (Cron Daemon)`` send as that user's
default sender, with a From named after the Unix user (GECOS) or kept as cron
named it.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_clients import mailx_binary
from tests.gate.conftest import needs_users
from tests.gate.deployment import Deployment, User, run_process
from tests.support.mailreader import body_text, named_addresses, read_mail
from tests.support.upstream import SmtpUpstream

pytestmark = needs_users

BOTH_FIXES = ("sendmail: not sent: the message has no From header and no sender was given; add -f with your "
              "sending address to sendmail_path (or a From: header to the message), or ask your hosting "
              "provider to set a default sender")


@pytest.fixture
def full_name(deployment: Deployment) -> Iterator[str]:
    """Site user a's GECOS name, as `chfn` or `useradd -c` would set it."""
    name = "Kari Nordmann"
    user = deployment.users.a.name
    subprocess.run(["usermod", "-c", f"{name},,,", user], check=True, capture_output=True)
    try:
        yield name
    finally:
        subprocess.run(["usermod", "-c", "", user], check=True, capture_output=True)


def with_default_sender(deployment: Deployment) -> Deployment:
    result = deployment.admin("customer", "set", "ka", "--default-sender", "post@a.example")
    assert result.code == 0, result.stderr
    deployment.configure("message", qualify_domain="web1.a.example")
    deployment.start_gate()
    return deployment


def mailx_as(deployment: Deployment, user: User, *args: str) -> tuple[int, str]:
    """bsd-mailx as the site's user, with sendmail set to the site's `sendmail`."""
    binary = deployment.bin / "mailx"
    shutil.copy(mailx_binary(), binary)
    home = deployment.base / f"home-{user.name}"
    home.mkdir(mode=0o700, exist_ok=True)
    shutil.chown(home, user.uid, user.gid)
    rc = deployment.etc / "mailrc"
    rc.write_text(f"set sendmail={deployment.bin / 'sendmail'}\n")
    rc.chmod(0o644)
    env = deployment.client_env(MAILRC=str(rc), HOME=str(home))
    result = run_process([str(binary), *args], input=b"Hei fra skriptet\n", env=env, cwd=str(home),
                         options=user.run_options())
    return result.code, result.stderr


def test_mailx_without_r_sends_as_the_default_sender_named_after_the_user(
        deployment: Deployment, relay: SmtpUpstream, full_name: str) -> None:
    gate = with_default_sender(deployment)
    code, stderr = mailx_as(gate, gate.users.a, "-s", "Rapport for desember", "-b", "hemmelig@x.example",
                            "ola@x.example")
    assert code == 0, stderr
    (got,) = relay.received
    assert got.mail_from == "post@a.example" and got.rcpt_tos == ["ola@x.example", "hemmelig@x.example"]
    read = read_mail(got.data)
    assert named_addresses(read, "From") == [(full_name, "post@a.example")]
    assert read["Subject"] == "Rapport for desember" and body_text(read) == "Hei fra skriptet\n"
    assert read.get_all("Bcc") is None and b"hemmelig" not in got.data
    line = gate.wait_for_log("verdict=sent")
    assert f"user={gate.users.a.name}" in line and "default_sender=post@a.example" in line


def test_cron_from_a_bound_user_keeps_cron_as_the_name(deployment: Deployment, relay: SmtpUpstream) -> None:
    gate = with_default_sender(deployment)
    cron = (
        "From: root (Cron Daemon)\nTo: root\nSubject: Cron <web1@host> php /srv/web1/cron.php\n"
        "MIME-Version: 1.0\nContent-Type: text/plain; charset=UTF-8\nContent-Transfer-Encoding: 8bit\n"
        "X-Cron-Env: <SHELL=/bin/sh>\nX-Cron-Env: <HOME=/srv/web1>\n\n3 ordrer eksportert ✓\n"
    ).encode()
    result = gate.sendmail("-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root", input=cron, user=gate.users.a)
    assert (result.code, result.line) == (0, "")
    (got,) = relay.received
    assert got.mail_from == "post@a.example" and got.rcpt_tos == ["root@web1.a.example"]
    read = read_mail(got.data)
    assert named_addresses(read, "From") == [("Cron Daemon", "post@a.example")]
    assert read["Subject"] == "Cron <web1@host> php /srv/web1/cron.php"
    assert body_text(read) == "3 ordrer eksportert ✓\n"


def test_another_customers_user_does_not_get_this_default(deployment: Deployment, relay: SmtpUpstream) -> None:
    gate = with_default_sender(deployment)
    result = gate.sendmail("-t", "-i", input=b"To: ola@x.example\nSubject: s\n\nx\n", user=gate.users.b)
    assert (result.code, result.line) == (65, BOTH_FIXES)
    unbound = gate.sendmail("-t", "-i", input=b"To: ola@x.example\nSubject: s\n\nx\n", user=gate.users.c)
    assert unbound.code == 65 and relay.received == []


def test_mailx_without_r_and_without_a_default_sender_names_both_fixes(gate: Deployment,
                                                                     relay: SmtpUpstream) -> None:
    code, stderr = mailx_as(gate, gate.users.a, "-s", "Rapport", "ola@x.example")
    assert code != 0
    assert BOTH_FIXES in stderr and "sendmail process failed with error code 65" in stderr
    assert relay.received == []
    assert Path(gate.base / f"home-{gate.users.a.name}" / "dead.letter").exists()  # mailx kept the text
