"""Real clients, as they call sendmail on Debian: PHP mail(), PHPMailer, Symfony Mailer, mailx, cron."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

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


def test_bsd_mailx_shows_the_refusal(shim: Shim, upstream: SmtpUpstream, tmp_path: Path):
    rc = tmp_path / "mailrc"
    rc.write_text(f"set sendmail={SENDMAIL}\n")
    env = dict(shim.env, MAILRC=str(rc), HOME=str(tmp_path))
    proc = subprocess.run([mailx_binary(), "-s", "s", "ola@x.example"],  # no -r: no From, no sender
                          input="x\n", capture_output=True, text=True, env=env, timeout=30)
    assert "sendmail: not sent:" in proc.stderr
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
    assert got.headers["from"] == ["root@web1.kunde.example"]
