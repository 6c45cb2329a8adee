"""Real clients, as they call sendmail on Debian: PHP mail(), PHPMailer, Symfony Mailer, mailx, cron."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from pathlib import Path

import pytest
import trustme

from tests.support.mailreader import body_text, longest_line, named_addresses, read_mail
from tests.support.shim import SENDMAIL, Shim
from tests.support.upstream import SmtpUpstream

ROOT = Path(__file__).resolve().parents[2]
PHPMAILER = "/usr/share/php/libphp-phpmailer/autoload.php"
SYMFONY = "/usr/share/php/Symfony/Component/Mailer/autoload.php"


def php_mail(to: str, subject: str, body: str, headers: str, params: str = "") -> str:
    args = ", ".join(f'"{v}"' for v in (to, subject, body, headers)) + (f', "{params}"' if params else "")
    return f"var_dump(mail({args}));"


def test_php_mail_with_to_cc_bcc_and_mixed_line_endings(shim: Shim, upstream: SmtpUpstream):
    code = php_mail("ola@x.example", "Hei på deg", "Line one\\nLine two\\n.\\nLine four",
                    "From: Bjørn <post@kunde.example>\\nCc: kari@x.example\\r\\nBcc: hemmelig@x.example")
    proc = shim.php(code)
    assert proc.stdout.strip() == "bool(true)", proc.stderr
    (got,) = upstream.received
    assert got.mail_from == "post@kunde.example"
    assert got.rcpt_tos == ["ola@x.example", "kari@x.example", "hemmelig@x.example"]
    assert b"hemmelig" not in got.data
    assert "Subject: Hei på deg".encode() in got.data
    assert got.body == b"Line one\r\nLine two\r\n.\r\nLine four\r\n"


def test_php_mail_fifth_parameter_sets_the_envelope_sender(shim: Shim, upstream: SmtpUpstream):
    proc = shim.php(php_mail("ola@x.example", "s", "b", "From: post@kunde.example", "-f bounce@kunde.example"))
    assert proc.stdout.strip() == "bool(true)"
    assert upstream.received[0].mail_from == "bounce@kunde.example"


def test_php_mail_is_false_for_a_refusal(shim: Shim, upstream: SmtpUpstream):
    # The fifth parameter trying the PHPMailer CVE-2016-10033 trick.
    proc = shim.php(php_mail("ola@x.example", "s", "b", "From: post@kunde.example", "-X/tmp/shell.php"))
    assert proc.stdout.strip() == "bool(false)"
    assert "sendmail: option -X is refused" in proc.stdout + proc.stderr
    upstream_down = shim.php(php_mail("ola@x.example", "s", "b", "From: nobody"))
    assert upstream_down.stdout.strip().endswith("bool(false)")
    assert upstream.received == []


def test_php_mail_is_false_when_the_upstream_refuses(shim: Shim, upstream: SmtpUpstream):
    upstream.script.replies["DATA"] = "554 5.7.1 no thanks"
    proc = shim.php(php_mail("ola@x.example", "s", "b", "From: post@kunde.example"))
    assert proc.stdout.strip().endswith("bool(false)")


def test_phpmailer_issendmail(shim: Shim, upstream: SmtpUpstream):
    proc = shim.php(f'''
        require "{PHPMAILER}";
        $m = new PHPMailer\\PHPMailer\\PHPMailer(true);
        $m->isSendmail();
        $m->Sendmail = "{SENDMAIL}";
        $m->CharSet = "UTF-8";
        $m->setFrom("post@kunde.example", "Kunde AS");
        $m->addAddress("ola@x.example");
        $m->addBCC("hemmelig@x.example");
        $m->Subject = "Hei på deg";
        $m->Body = "Blåbær\\n.\\nlast";
        var_dump($m->send());
    ''')
    assert proc.stdout.strip() == "bool(true)", proc.stdout + proc.stderr
    (got,) = upstream.received
    assert got.mail_from == "post@kunde.example"
    assert got.rcpt_tos == ["ola@x.example", "hemmelig@x.example"]
    assert b"hemmelig" not in got.data
    assert "Blåbær\r\n.\r\nlast".encode() in got.body


def test_phpmailer_reports_a_refusal(shim: Shim, upstream: SmtpUpstream):
    proc = shim.php(f'''
        require "{PHPMAILER}";
        $m = new PHPMailer\\PHPMailer\\PHPMailer(false);
        $m->isSendmail();
        $m->Sendmail = "{SENDMAIL}";
        $m->setFrom("post@kunde.example");
        $m->addAddress("ola@x.example");
        $m->Body = "x\\0y";
        var_dump($m->send()); echo $m->ErrorInfo;
    ''')
    assert proc.stdout.startswith("bool(false)")
    assert upstream.received == []


def symfony(shim: Shim, command: str, extra: str = "") -> subprocess.CompletedProcess[str]:
    return shim.php(f'''
        require "{SYMFONY}";
        use Symfony\\Component\\Mailer\\Transport\\SendmailTransport;
        use Symfony\\Component\\Mailer\\Mailer;
        use Symfony\\Component\\Mime\\Email;
        $mailer = new Mailer(new SendmailTransport("{command}"));
        $e = (new Email())->from("post@kunde.example")->to("ola@x.example")->cc("kari@x.example")
            ->bcc("hemmelig@x.example")->subject("Hei på deg")->text("Hei\\n.\\n..to prikker\\n");
        {extra}
        try {{ $mailer->send($e); echo "sent\\n"; }}
        catch (Exception $ex) {{ echo "failed: ", $ex->getMessage(), "\\n"; }}
    ''', timeout=30)


def test_symfony_default_bs_mode(shim: Shim, upstream: SmtpUpstream):
    proc = symfony(shim, f"{SENDMAIL} -bs")
    assert proc.stdout.strip() == "sent", proc.stdout + proc.stderr
    (got,) = upstream.received
    assert got.rcpt_tos == ["ola@x.example", "kari@x.example", "hemmelig@x.example"]
    assert b"hemmelig" not in got.data
    assert b"Hei\r\n.\r\n..to prikker\r\n" in got.body.replace(b"=\r\n", b"")


def test_symfony_t_mode_relies_on_dot_unstuffing(shim: Shim, upstream: SmtpUpstream):
    # Symfony drops -t, passes -f and "-- rcpts", and doubles leading dots when -i is absent.
    proc = symfony(shim, f"{SENDMAIL} -t")
    assert proc.stdout.strip() == "sent", proc.stdout + proc.stderr
    (got,) = upstream.received
    assert got.rcpt_tos == ["ola@x.example", "kari@x.example", "hemmelig@x.example"]
    assert b"Hei\r\n.\r\n..to prikker\r\n" in got.body.replace(b"=\r\n", b"")


def test_symfony_bs_mode_reports_a_refusal_as_smtp(shim: Shim, upstream: SmtpUpstream):
    upstream.script.replies["DATA"] = "554 5.7.1 not today"
    proc = symfony(shim, f"{SENDMAIL} -bs")
    assert proc.stdout.startswith("failed:") and "not today" in proc.stdout


def mailx_binary() -> str:
    found = shutil.which("bsd-mailx") or str(ROOT / "build/tools/usr/bin/bsd-mailx")
    assert Path(found).exists(), "bsd-mailx is required: run make setup"
    return found


def test_bsd_mailx(shim: Shim, upstream: SmtpUpstream, tmp_path: Path):
    rc = tmp_path / "mailrc"
    rc.write_text(f"set sendmail={SENDMAIL}\n")
    env = dict(shim.env, MAILRC=str(rc), HOME=str(tmp_path))
    proc = subprocess.run([mailx_binary(), "-s", "Hei på deg", "-r", "post@kunde.example",
                           "-b", "hemmelig@x.example", "ola@x.example"],
                          input="hello from mailx\n", capture_output=True, text=True, env=env, timeout=30)
    assert proc.returncode == 0, proc.stderr
    (got,) = upstream.received
    assert got.mail_from == "post@kunde.example"
    assert got.rcpt_tos == ["ola@x.example", "hemmelig@x.example"]
    assert b"hemmelig" not in got.data and got.headers["message-id"]


def mailx(shim: Shim, tmp_path: Path, *args: str, body: str = "hello from mailx\n") -> subprocess.CompletedProcess[str]:
    rc = tmp_path / "mailrc"
    rc.write_text(f"set sendmail={SENDMAIL}\n")
    env = dict(shim.env, MAILRC=str(rc), HOME=str(tmp_path))
    return subprocess.run([mailx_binary(), *args], input=body, capture_output=True, text=True, env=env, timeout=30)


def my_full_name() -> str:
    """The GECOS name of the user running the tests, unless it only repeats the login name."""
    me = pwd.getpwuid(os.getuid())
    name = me.pw_gecos.split(",")[0].strip()
    return "" if name == me.pw_name else name


def bind_me_with_default_sender(shim: Shim, address: str = "post@kunde.example") -> None:
    """The Unix user running these tests (root in CI) becomes a site of customer kunde."""
    shim.ledger.bind_user("kunde", pwd.getpwuid(os.getuid()).pw_name)
    shim.ledger.set_default_sender("kunde", address)


def test_bsd_mailx_without_r_sends_as_the_default_sender(shim: Shim, upstream: SmtpUpstream, tmp_path: Path):
    bind_me_with_default_sender(shim)
    proc = mailx(shim, tmp_path, "-s", "Hei på deg", "-b", "hemmelig@x.example", "ola@x.example")
    assert proc.returncode == 0, proc.stderr
    (got,) = upstream.received
    assert got.mail_from == "post@kunde.example"
    assert got.rcpt_tos == ["ola@x.example", "hemmelig@x.example"]
    assert b"hemmelig" not in got.data
    read = read_mail(got.data)
    assert named_addresses(read, "From") == [(my_full_name(), "post@kunde.example")]
    assert read["Subject"] == "Hei på deg" and body_text(read) == "hello from mailx\n"
    assert "default_sender=post@kunde.example" in shim.log_lines()[-1]


def test_bsd_mailx_without_r_and_without_a_default_sender_names_both_fixes(shim: Shim, upstream: SmtpUpstream,
                                                                          tmp_path: Path):
    shim.ledger.bind_user("kunde", pwd.getpwuid(os.getuid()).pw_name)  # bound, but no default sender
    proc = mailx(shim, tmp_path, "-s", "Hei på deg", "ola@x.example")
    assert proc.returncode != 0
    assert "sendmail process failed with error code 65" in proc.stderr
    assert ("sendmail: not sent: the message has no From header and no sender was given; add -f with your "
            "sending address to sendmail_path (or a From: header to the message), or ask your hosting provider "
            "to set a default sender") in proc.stderr
    assert upstream.received == []


def test_cron_invocation(shim: Shim, upstream: SmtpUpstream):
    shim.configure("message", qualify_domain="web1.kunde.example")
    message = (
        "From: root (Cron Daemon)\nTo: ola@x.example,kari@x.example\nSubject: Cron <root@web1> backup.sh\n"
        "MIME-Version: 1.0\nContent-Type: text/plain; charset=UTF-8\nContent-Transfer-Encoding: 8bit\n"
        "X-Cron-Env: <SHELL=/bin/sh>\n\nbackup ferdig ✓\n"
    ).encode()
    result = shim.sendmail("-FCronDaemon", "-i", "-B8BITMIME", "-oem", "ola@x.example,kari@x.example",
                           input=message)
    assert result.code == 0, result.line
    (got,) = upstream.received
    assert got.mail_from == "root@web1.kunde.example"
    assert got.rcpt_tos == ["ola@x.example", "kari@x.example"]
    assert got.headers["from"] == ["Cron Daemon <root@web1.kunde.example>"]  # the display name is kept


def test_cron_from_a_bound_user_sends_as_its_default_sender(shim: Shim, upstream: SmtpUpstream):
    shim.configure("message", qualify_domain="web1.kunde.example")
    bind_me_with_default_sender(shim)
    message = (
        "From: root (Cron Daemon)\nTo: root\nSubject: Cron <root@web1> /usr/local/bin/backup.sh\n"
        "MIME-Version: 1.0\nContent-Type: text/plain; charset=UTF-8\nContent-Transfer-Encoding: 8bit\n"
        "X-Cron-Env: <SHELL=/bin/sh>\nX-Cron-Env: <HOME=/root>\nX-Cron-Env: <LOGNAME=root>\n\n"
        "backup ferdig ✓\n"
    ).encode()
    result = shim.sendmail("-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root", input=message)
    assert (result.code, result.line) == (0, "")
    (got,) = upstream.received
    assert got.mail_from == "post@kunde.example"
    assert got.rcpt_tos == ["root@web1.kunde.example"]
    read = read_mail(got.data)
    assert named_addresses(read, "From") == [("Cron Daemon", "post@kunde.example")]
    assert read["Subject"] == "Cron <root@web1> /usr/local/bin/backup.sh"
    assert body_text(read) == "backup ferdig ✓\n"
    assert read.get_all("X-Cron-Env") == ["<SHELL=/bin/sh>", "<HOME=/root>", "<LOGNAME=root>"]
    log = shim.log_lines()[-1]
    assert "from_mapped=root->post@kunde.example" in log and "default_sender=post@kunde.example" in log


# ------------------------------------------------------------------ PHPMailer with a hundred named addresses


def phpmailer_hundred(shim: Shim, mode: str, field: str) -> subprocess.CompletedProcess[str]:
    add = {"To": "addAddress", "Bcc": "addBCC"}[field]
    transport = f'$m->isSendmail(); $m->Sendmail = "{SENDMAIL}";' if mode == "isSendmail" else "$m->isMail();"
    first = '$m->addAddress("ola@x.example", "Ola Nordmann");' if field == "Bcc" else ""
    return shim.php(f'''
        require "{PHPMAILER}";
        $m = new PHPMailer\\PHPMailer\\PHPMailer(true);
        {transport}
        $m->CharSet = "UTF-8";
        $m->setFrom("post@kunde.example", "Kunde AS");
        {first}
        for ($i = 0; $i < 100; $i++) {{
            $m->{add}("m$i@x.example", $i % 10 ? "Mottaker nummer $i" : "Bjørn Ærlig $i");
        }}
        $m->Subject = "Nyhetsbrev for desember";
        $m->Body = "Hei på deg\\n";
        var_dump($m->send());
    ''')


def hundred_names() -> list[tuple[str, str]]:
    return [(f"Mottaker nummer {i}" if i % 10 else f"Bjørn Ærlig {i}", f"m{i}@x.example") for i in range(100)]


@pytest.mark.parametrize("field", ["Bcc", "To"])
@pytest.mark.parametrize("mode", ["isSendmail", "isMail"])
def test_phpmailer_with_a_hundred_named_addresses(shim: Shim, upstream: SmtpUpstream, mode: str, field: str):
    proc = phpmailer_hundred(shim, mode, field)
    assert proc.stdout.strip() == "bool(true)", proc.stdout + proc.stderr
    (got,) = upstream.received
    assert got.mail_from == "post@kunde.example"
    hundred = [address for _, address in hundred_names()]
    read = read_mail(got.data)
    assert longest_line(got.data) <= 998
    assert named_addresses(read, "From") == [("Kunde AS", "post@kunde.example")]
    assert read["Subject"] == "Nyhetsbrev for desember"
    assert body_text(read).rstrip("\n") == "Hei på deg"  # mail() adds a line
    log = shim.log_lines()[-1]
    if field == "Bcc":
        assert got.rcpt_tos == ["ola@x.example", *hundred]
        assert read.get_all("Bcc") is None and b"m1@x.example" not in got.data
        assert named_addresses(read, "To") == [("Ola Nordmann", "ola@x.example")]
        assert "folded=" not in log  # the Bcc line went before anything was folded
    else:
        assert got.rcpt_tos == hundred
        assert named_addresses(read, "To") == hundred_names()
        assert "folded=To" in log


# ------------------------------------------------------------------ a Latin-1 PHP site

LATIN1_SITE = """<?php
$headers = "From: Jörg Müller <post@kunde.example>\\r\\nMIME-Version: 1.0\\r\\n"
         . "Content-Type: text/plain; charset=ISO-8859-1\\r\\nContent-Transfer-Encoding: 8bit";
var_dump(mail("Åse Ødegård <ola@x.example>", "Grüße aus Köln, Ihre Bestellung",
              "Vielen Dank für Ihre Bestellung.\\n", $headers));
"""


@pytest.mark.parametrize("smtputf8", [True, False], ids=["SMTPUTF8", "7-bit headers"])
def test_a_latin1_php_site_is_delivered_as_it_wrote(tmp_path: Path, ca: trustme.CA, ca_file: Path,
                                                    smtputf8: bool):
    script = tmp_path / "kontakt.php"
    script.write_bytes(LATIN1_SITE.encode("iso-8859-1"))
    with SmtpUpstream(ca, smtputf8=smtputf8) as upstream:
        (tmp_path / "shim").mkdir()
        shim = Shim(tmp_path / "shim", upstream.port, ca_file)
        proc = shim.php(f'include "{script}";')
        assert proc.stdout.strip() == "bool(true)", proc.stdout + proc.stderr
        (got,) = upstream.received
    assert got.mail_from == "post@kunde.example" and got.rcpt_tos == ["ola@x.example"]
    assert got.data.split(b"\r\n\r\n")[0].isascii() != smtputf8
    read = read_mail(got.data)
    assert read["Subject"] == "Grüße aus Köln, Ihre Bestellung"
    assert named_addresses(read, "From") == [("Jörg Müller", "post@kunde.example")]
    assert named_addresses(read, "To") == [("Åse Ødegård", "ola@x.example")]
    assert body_text(read).rstrip("\n") == "Vielen Dank für Ihre Bestellung."  # mail() adds a line
    assert "charset=To:iso-8859-1,Subject:iso-8859-1,From:iso-8859-1" in shim.log_lines()[-1]


# ------------------------------------------------------------------ group syntax


def test_phpmailer_with_only_bcc_writes_an_empty_group(shim: Shim, upstream: SmtpUpstream):
    proc = shim.php(f'''
        require "{PHPMAILER}";
        $m = new PHPMailer\\PHPMailer\\PHPMailer(true);
        $m->isSendmail(); $m->Sendmail = "{SENDMAIL}";
        $m->setFrom("post@kunde.example");
        $m->addBCC("a@x.example"); $m->addBCC("b@x.example");
        $m->Subject = "s"; $m->Body = "b";
        var_dump($m->send());
    ''')
    assert proc.stdout.strip() == "bool(true)", proc.stdout + proc.stderr
    (got,) = upstream.received
    assert got.rcpt_tos == ["a@x.example", "b@x.example"]
    assert got.headers["to"] == ["undisclosed-recipients:;"] and b"Bcc" not in got.data


def test_php_mail_to_a_named_group_sends_to_its_members(shim: Shim, upstream: SmtpUpstream):
    proc = shim.php(php_mail("styret: leder@x.example, kasserer@x.example;", "Møte", "b",
                             "From: post@kunde.example\\r\\nCc: tomt:;"))
    assert proc.stdout.strip() == "bool(true)", proc.stderr
    (got,) = upstream.received
    assert got.rcpt_tos == ["leder@x.example", "kasserer@x.example"]
    read = read_mail(got.data)
    assert named_addresses(read, "To") == [("", "leder@x.example"), ("", "kasserer@x.example")]
    assert [g.display_name for g in read["To"].groups] == ["styret"]


def test_an_empty_group_alone_is_no_recipient(shim: Shim, upstream: SmtpUpstream):
    result = shim.sendmail("-t", "-i", input=b"From: post@kunde.example\nTo: undisclosed-recipients:;\n\nx\n")
    assert result.code == 67 and "the message has no recipient" in result.line
    assert upstream.received == []


def test_a_queued_message_keeps_its_repairs_and_is_folded_when_it_is_finally_sent(shim: Shim,
                                                                                  upstream: SmtpUpstream):
    bind_me_with_default_sender(shim)
    to = ", ".join(f"Mottaker {i} <m{i}@x.example>" for i in range(60))
    message = f"To: {to}\nSubject: Gr\xfc\xdfe\nContent-Type: text/plain; charset=ISO-8859-1\n\nHei\n".encode("latin-1")
    upstream.script.replies["MAIL"] = "451 4.3.0 try later"
    assert shim.sendmail("-t", "-i", input=message).code == 0  # queued
    del upstream.script.replies["MAIL"]
    assert shim.admin("queue", "run", "--now").code == 0
    (got,) = upstream.received
    assert got.mail_from == "post@kunde.example" and len(got.rcpt_tos) == 60
    assert longest_line(got.data) <= 998
    read = read_mail(got.data)
    assert read["Subject"] == "Grüße" and named_addresses(read, "To") == [
        (f"Mottaker {i}", f"m{i}@x.example") for i in range(60)]
    assert named_addresses(read, "From") == [(my_full_name(), "post@kunde.example")]
