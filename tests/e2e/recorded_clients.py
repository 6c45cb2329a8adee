"""Every way real clients were recorded calling ``sendmail``, as replayable test data, and the replay.

Each case is one recorded invocation: the exact argv (after argv[0]), the
stdin bytes with the client's own line endings and headers, and what the
client needs to happen: delivered once, from the right envelope sender to the
right recipients, Bcc stripped, a From present. Recorded on Debian 12 from
PHP 8.2 ``mail()``, PHPMailer 6.6 (``isSendmail``, ``isMail``, ``isQmail``),
Symfony Mailer 5.4 (``-bs`` and ``-t``), bsd-mailx, git send-email, cron,
and the system tools that call ``/usr/sbin/sendmail`` (anacron, atd,
unattended-upgrades, apt-listchanges, logwatch, mdadm, sudo, mutt).

The replay registers every sender the cases use, binds the calling Unix user
to the customer with a default sender, and sets ``qualify_domain`` for
recipients such as cron's ``root``: what is measured is compatibility only.
"""

from __future__ import annotations

import os
import pwd
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from tests.support.mailreader import read_mail
from tests.support.shim import SENDMAIL, Result, Shim
from tests.support.upstream import Received, SmtpUpstream

DEFAULT_SENDER = "post@kunde.example"
QUALIFY_DOMAIN = "web1.kunde.example"
SENDERS = ("post@kunde.example", "bounce@kunde.example", "forced@kunde.example", "patches@kunde.example",
           "backup@kunde.example", "root@web1.kunde.example")
GENEROUS_LIMITS = {"account": ["100000 messages / 5m", "100000 recipients / 5m"],
                   "customer": ["100000 messages / 1h", "100000 recipients / 1h"]}


@dataclass(frozen=True)
class Recorded:
    case: str
    client: str
    argv: tuple[str, ...]
    stdin: bytes
    sender: str  # the envelope sender the client needs
    recipients: tuple[str, ...]  # the envelope recipients, in order
    hidden: tuple[str, ...] = ()  # Bcc recipients: they get it, nobody sees them
    seekable: bool = False  # bsd-mailx hands over a deleted temporary file, not a pipe


@dataclass(frozen=True)
class Hostile:
    """A recorded invocation that must be refused whole: nothing sent, nothing run."""

    case: str
    argv: tuple[str, ...]
    stdin: bytes


def _lf(text: str) -> bytes:
    return text.encode()


def _crlf(text: str) -> bytes:
    return text.replace("\n", "\r\n").encode()


def _php(headers: str, body: str = "Line one\nLine two\n", to: str = "ola@x.example", subject: str = "Hei",
         x_script: bool = False, lf_only: bool = False) -> bytes:
    """What PHP's mail() writes: To and Subject with CRLF, the extra headers as given, the body untouched."""
    eol = "\n" if lf_only else "\r\n"
    script = f"X-PHP-Originating-Script: 0:kontakt.php{eol}" if x_script else ""
    extra = f"{headers}{eol}" if headers else ""
    return f"To: {to}{eol}Subject: {subject}{eol}{script}{extra}{eol}{body}{eol}".encode()


_PHPMAILER_HEAD = (
    "Date: Wed, 2 Dec 2026 10:00:00 +0100\n{to}From: Kunde AS <post@kunde.example>\nCc: kari@x.example\n"
    "Bcc: hemmelig@x.example\nReply-To: Kundeservice <svar@kunde.example>\n{subject}"
    "Message-ID: <hK2nq8W1@web1.kunde.example>\nX-Mailer: PHPMailer 6.6.3 (https://github.com/PHPMailer/PHPMailer)\n"
    "MIME-Version: 1.0\n"
)
_PHPMAILER_TEXT = "Content-Type: text/plain; charset=UTF-8\nContent-Transfer-Encoding: 8bit\n\nBlåbær\n.\nsiste linje\n"
_PHPMAILER_ALT = (
    'Content-Type: multipart/alternative;\n boundary="b1_hK2nq8W1"\nContent-Transfer-Encoding: 8bit\n\n'
    "This is a multi-part message in MIME format.\n--b1_hK2nq8W1\nContent-Type: text/plain; charset=UTF-8\n\n"
    "Blåbær\n\n--b1_hK2nq8W1\nContent-Type: text/html; charset=UTF-8\n\n<p>Blåbær</p>\n\n--b1_hK2nq8W1--\n"
)
_SUBJECT = "Subject: =?UTF-8?Q?Hei_p=C3=A5_deg?=\n"


def _phpmailer(to: str = "To: Ola Nordmann <ola@x.example>\n", body: str = _PHPMAILER_TEXT, *,
               mail_function: bool = False) -> bytes:
    if mail_function:  # isMail(): PHP writes To and Subject, PHPMailer the rest, all with CRLF
        head = _PHPMAILER_HEAD.format(to="", subject="")
        return _crlf(f"{to}{_SUBJECT}{head}{body}\n")
    return _lf(_PHPMAILER_HEAD.format(to=to, subject=_SUBJECT) + body)


def _named(field: str, count: int) -> str:
    return f"{field}: " + ", ".join(f"Mottaker nummer {i} <m{i}@x.example>" for i in range(count)) + "\n"


_HUNDRED = tuple(f"m{i}@x.example" for i in range(100))
_SIXTY = _HUNDRED[:60]

_SYMFONY_DATA = (
    "From: post@kunde.example\r\nTo: ola@x.example\r\nCc: kari@x.example\r\n"
    "Subject: =?utf-8?q?Hei_p=C3=A5_deg?=\r\nMessage-ID: <3c5b0b5f@kunde.example>\r\n"
    "Date: Wed, 02 Dec 2026 10:00:00 +0100\r\nMIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n"
    "Content-Transfer-Encoding: quoted-printable\r\n\r\nHei\r\n.\r\n..to prikker\r\n"
)


def _smtp_dialogue(data: str, helo: str = "HELO [127.0.0.1]") -> bytes:
    stuffed = "".join("." + line if line.startswith(".") else line for line in data.splitlines(keepends=True))
    return (f"{helo}\r\nMAIL FROM:<post@kunde.example>\r\nRCPT TO:<ola@x.example>\r\nRCPT TO:<kari@x.example>\r\n"
            f"RCPT TO:<hemmelig@x.example>\r\nDATA\r\n{stuffed}.\r\nQUIT\r\n").encode()


def _symfony_lf(doubled_dots: bool) -> bytes:
    text = _SYMFONY_DATA.replace("\r\n", "\n")
    if doubled_dots:  # without -i Symfony doubles every leading dot, counting on un-stuffing
        text = "".join("." + line if line.startswith(".") else line for line in text.splitlines(keepends=True))
    return text.encode()


_SYMFONY_RCPTS = ("ola@x.example", "kari@x.example", "hemmelig@x.example")
_SYMFONY_ARGS = ("--", *_SYMFONY_RCPTS)

_MAILX_HEAD = 'MIME-Version: 1.0\nContent-Type: text/plain; charset="UTF-8"\nContent-Transfer-Encoding: 8bit\n'

_GIT_PATCH = (
    "From: Kari Utvikler <patches@kunde.example>\nTo: ola@x.example\nCc: kari@x.example,\n\tper@x.example\n"
    "Subject: [PATCH {n}/2] Rett skrivefeil i kontaktskjemaet\nDate: Wed,  2 Dec 2026 10:00:0{n} +0100\n"
    "Message-Id: <20261202090000.4711-{n}-patches@kunde.example>\nX-Mailer: git-send-email 2.39.5\n{thread}"
    "MIME-Version: 1.0\nContent-Transfer-Encoding: 8bit\n\n---\n kontakt.php | 2 +-\n 1 file changed\n"
)
_GIT_THREAD = ("In-Reply-To: <20261202090000.4711-1-patches@kunde.example>\n"
               "References: <20261202090000.4711-1-patches@kunde.example>\n")
_GIT_RCPTS = ("ola@x.example", "kari@x.example", "per@x.example", "patches@kunde.example")

_CRON = (
    "From: {sender}\nTo: {to}\nSubject: Cron <root@web1> {command}\nMIME-Version: 1.0\n"
    "Content-Type: {ctype}\nContent-Transfer-Encoding: 8bit\nX-Cron-Env: <SHELL=/bin/sh>\n"
    "X-Cron-Env: <HOME=/root>\nX-Cron-Env: <PATH=/usr/bin:/bin>\nX-Cron-Env: <LOGNAME=root>\n\n{output}"
)


def _cron(to: str = "root", sender: str = "root (Cron Daemon)", command: str = "/usr/local/bin/backup.sh",
          ctype: str = "text/plain; charset=UTF-8", output: str = "backup ferdig ✓\n") -> bytes:
    return _CRON.format(to=to, sender=sender, command=command, ctype=ctype, output=output).encode()


ROOT_AT_HOST = f"root@{QUALIFY_DOMAIN}"

RECORDED: tuple[Recorded, ...] = (
    # --- PHP mail(), Debian's compiled-in "sendmail -t -i"; the fifth parameter appended under sh -c
    Recorded("php_mail_debian_default_path", "PHP mail()", ("-t", "-i"),
             _php("From: post@kunde.example\nReply-To: svar@x.example"), DEFAULT_SENDER, ("ola@x.example",)),
    Recorded("php_mail_fifth_param_f", "PHP mail()", ("-t", "-i", "-f", "bounce@kunde.example"),
             _php("From: post@kunde.example"), "bounce@kunde.example", ("ola@x.example",)),
    Recorded("php_mail_fifth_param_r", "PHP mail()", ("-t", "-i", "-rbounce@kunde.example"),
             _php("From: post@kunde.example"), "bounce@kunde.example", ("ola@x.example",)),
    Recorded("php_mail_fifth_param_quoted_F", "PHP mail()", ("-t", "-i", "-f", "bounce@kunde.example", "-F",
                                                             "Bounce Name"),
             _php("Reply-To: svar@x.example"), "bounce@kunde.example", ("ola@x.example",)),
    Recorded("php_mail_force_extra_parameters", "PHP mail()", ("-t", "-i", "-fforced@kunde.example"),
             _php("From: forced@kunde.example"), "forced@kunde.example", ("ola@x.example",)),
    Recorded("php_mail_mixed_lf_and_crlf_on", "PHP mail()", ("-t", "-i"),
             _php("From: post@kunde.example\nReply-To: svar@x.example", lf_only=True), DEFAULT_SENDER,
             ("ola@x.example",)),
    Recorded("php_mail_add_x_header", "PHP mail()", ("-t", "-i"),
             _php("From: post@kunde.example", x_script=True), DEFAULT_SENDER, ("ola@x.example",)),
    Recorded("php_mail_no_from_old_script", "PHP mail()", ("-t", "-i"),
             _php("", body="Noen har fylt ut skjemaet.\n"),
             DEFAULT_SENDER, ("ola@x.example",)),
    Recorded("php_mail_empty_to_with_bcc", "PHP mail()", ("-t", "-i"),
             _php("From: post@kunde.example\r\nBcc: hemmelig@x.example", to=""), DEFAULT_SENDER,
             ("hemmelig@x.example",), hidden=("hemmelig@x.example",)),
    Recorded("php_mail_bcc_and_second_to_in_headers", "PHP mail()", ("-t", "-i"),
             _php("From: post@kunde.example\r\nBcc: hemmelig@x.example\r\nTo: andre@x.example"), DEFAULT_SENDER,
             ("ola@x.example", "hemmelig@x.example", "andre@x.example"), hidden=("hemmelig@x.example",)),
    Recorded("php_mail_inject_subject_spaces", "PHP mail()", ("-t", "-i"),
             _php("From: post@kunde.example", subject="Hello  Bcc: evil@x.example"), DEFAULT_SENDER,
             ("ola@x.example",)),
    Recorded("php_mail_folded_subject", "PHP mail()", ("-t", "-i"),
             _php("From: post@kunde.example", subject="Del en\r\n del to"), DEFAULT_SENDER, ("ola@x.example",)),
    Recorded("php_mail_latin1_site", "PHP mail()", ("-t", "-i"),
             _php("From: J\xf6rg M\xfcller <post@kunde.example>\r\nContent-Type: text/plain; charset=ISO-8859-1",
                  subject="Gr\xfc\xdfe aus K\xf6ln", body="Vielen Dank f\xfcr Ihre Bestellung.\n").decode()
             .encode("latin-1"), DEFAULT_SENDER, ("ola@x.example",)),
    # --- PHPMailer isSendmail(): LF only; Sender from setFrom(); the defaults' sendmail_path adds "-t -i"
    Recorded("phpmailer_sendmail", "PHPMailer isSendmail()", ("-oi", "-fpost@kunde.example", "-t"),
             _phpmailer(), DEFAULT_SENDER, ("ola@x.example", "kari@x.example", "hemmelig@x.example"),
             hidden=("hemmelig@x.example",)),
    Recorded("phpmailer_sendmail_no_sender", "PHPMailer isSendmail()", ("-oi", "-t"), _phpmailer(),
             DEFAULT_SENDER, ("ola@x.example", "kari@x.example", "hemmelig@x.example"),
             hidden=("hemmelig@x.example",)),
    Recorded("phpmailer_sendmail_default", "PHPMailer isSendmail()",
             ("-t", "-i", "-oi", "-fpost@kunde.example", "-t"), _phpmailer(), DEFAULT_SENDER,
             ("ola@x.example", "kari@x.example", "hemmelig@x.example"), hidden=("hemmelig@x.example",)),
    Recorded("phpmailer_sendmail_singleto_1", "PHPMailer isSendmail()", ("-oi", "-fpost@kunde.example", "-t"),
             b"To: ola@x.example\n" + _phpmailer(to=""), DEFAULT_SENDER,
             ("ola@x.example", "kari@x.example", "hemmelig@x.example"), hidden=("hemmelig@x.example",)),
    Recorded("phpmailer_sendmail_singleto_2", "PHPMailer isSendmail()", ("-oi", "-fpost@kunde.example", "-t"),
             b"To: per@x.example\n" + _phpmailer(to=""), DEFAULT_SENDER,
             ("per@x.example", "kari@x.example", "hemmelig@x.example"), hidden=("hemmelig@x.example",)),
    Recorded("phpmailer_sendmail_html_alternative", "PHPMailer isSendmail()",
             ("-oi", "-fpost@kunde.example", "-t"), _phpmailer(body=_PHPMAILER_ALT), DEFAULT_SENDER,
             ("ola@x.example", "kari@x.example", "hemmelig@x.example"), hidden=("hemmelig@x.example",)),
    Recorded("phpmailer_sendmail_100_named_bcc", "PHPMailer isSendmail()", ("-oi", "-fpost@kunde.example", "-t"),
             _phpmailer().replace(b"Bcc: hemmelig@x.example\n", _named("Bcc", 100).encode()), DEFAULT_SENDER,
             ("ola@x.example", "kari@x.example", *_HUNDRED), hidden=_HUNDRED),
    Recorded("phpmailer_sendmail_60_named_cc", "PHPMailer isSendmail()", ("-oi", "-fpost@kunde.example", "-t"),
             _phpmailer().replace(b"Cc: kari@x.example\n", _named("Cc", 60).encode()), DEFAULT_SENDER,
             ("ola@x.example", *_SIXTY, "hemmelig@x.example"), hidden=("hemmelig@x.example",)),
    Recorded("phpmailer_sendmail_bcc_only", "PHPMailer isSendmail()", ("-oi", "-fpost@kunde.example", "-t"),
             _phpmailer(to="To: undisclosed-recipients:;\n").replace(b"Cc: kari@x.example\n", b""),
             DEFAULT_SENDER, ("hemmelig@x.example",), hidden=("hemmelig@x.example",)),
    # --- PHPMailer isQmail(): -f only, recipients left to the headers
    Recorded("phpmailer_qmail", "PHPMailer isQmail()", ("-fpost@kunde.example",), _phpmailer(), DEFAULT_SENDER,
             ("ola@x.example", "kari@x.example", "hemmelig@x.example"), hidden=("hemmelig@x.example",)),
    # --- PHPMailer isMail(): through mail(), CRLF everywhere, -f as the fifth parameter
    Recorded("phpmailer_mail", "PHPMailer isMail()", ("-t", "-i", "-fpost@kunde.example"),
             _phpmailer("To: Ola Nordmann <ola@x.example>\n", mail_function=True), DEFAULT_SENDER,
             ("ola@x.example", "kari@x.example", "hemmelig@x.example"), hidden=("hemmelig@x.example",)),
    Recorded("phpmailer_mail_no_sender", "PHPMailer isMail()", ("-t", "-i"),
             _phpmailer("To: Ola Nordmann <ola@x.example>\n", mail_function=True), DEFAULT_SENDER,
             ("ola@x.example", "kari@x.example", "hemmelig@x.example"), hidden=("hemmelig@x.example",)),
    Recorded("phpmailer_mail_100_named_to", "PHPMailer isMail()", ("-t", "-i", "-fpost@kunde.example"),
             _phpmailer(_named("To", 100), mail_function=True), DEFAULT_SENDER,
             (*_HUNDRED, "kari@x.example", "hemmelig@x.example"), hidden=("hemmelig@x.example",)),
    # --- Symfony Mailer: -bs by default (HELO, never EHLO), or -t turned into -f and "-- recipients"
    Recorded("symfony_bs", "Symfony -bs", ("-bs",), _smtp_dialogue(_SYMFONY_DATA), DEFAULT_SENDER,
             _SYMFONY_RCPTS, hidden=("hemmelig@x.example",)),
    Recorded("symfony_default_bs", "Symfony -bs", ("-bs",),
             _smtp_dialogue(_SYMFONY_DATA.replace("Hei\r\n", "Hei igjen\r\n")), DEFAULT_SENDER, _SYMFONY_RCPTS,
             hidden=("hemmelig@x.example",)),
    Recorded("symfony_dsn_sendmail_default", "Symfony -bs", ("-bs",),
             _smtp_dialogue(_SYMFONY_DATA.replace("Message-ID: <3c5b", "Message-ID: <4d6c")), DEFAULT_SENDER,
             _SYMFONY_RCPTS, hidden=("hemmelig@x.example",)),
    Recorded("symfony_t", "Symfony -t", ("-fpost@kunde.example", *_SYMFONY_ARGS), _symfony_lf(doubled_dots=True),
             DEFAULT_SENDER, _SYMFONY_RCPTS, hidden=("hemmelig@x.example",)),
    Recorded("symfony_t_i", "Symfony -t", ("-i", "-fpost@kunde.example", *_SYMFONY_ARGS),
             _symfony_lf(doubled_dots=False), DEFAULT_SENDER, _SYMFONY_RCPTS, hidden=("hemmelig@x.example",)),
    Recorded("symfony_oi_t", "Symfony -t", ("-oi", "-fpost@kunde.example", *_SYMFONY_ARGS),
             _symfony_lf(doubled_dots=False), DEFAULT_SENDER, _SYMFONY_RCPTS, hidden=("hemmelig@x.example",)),
    Recorded("symfony_native", "Symfony native://", ("-i", "-fpost@kunde.example", *_SYMFONY_ARGS),
             _symfony_lf(doubled_dots=False), DEFAULT_SENDER, _SYMFONY_RCPTS, hidden=("hemmelig@x.example",)),
    # --- bsd-mailx: -i -t, no recipients in argv, From only with -r; stdin a deleted temporary file
    Recorded("mailx_plain", "bsd-mailx", ("-i", "-t"),
             _lf(f"To: ola@x.example\nSubject: Hei på deg\n{_MAILX_HEAD}\nhello from mailx\n"), DEFAULT_SENDER,
             ("ola@x.example",), seekable=True),
    Recorded("mailx_r", "bsd-mailx", ("-i", "-t", "-f", "bounce@kunde.example"),
             _lf(f"From: bounce@kunde.example\nTo: ola@x.example\nSubject: Hei\n{_MAILX_HEAD}\nhello\n"),
             "bounce@kunde.example", ("ola@x.example",), seekable=True),
    Recorded("mailx_v", "bsd-mailx", ("-i", "-v", "-t"),
             _lf(f"To: ola@x.example\nSubject: Hei\n{_MAILX_HEAD}\nhello\n"), DEFAULT_SENDER, ("ola@x.example",),
             seekable=True),
    Recorded("mailx_cc_bcc_extra_header", "bsd-mailx", ("-i", "-t"),
             _lf(f"To: ola@x.example\nSubject: Hei\nCc: kari@x.example\nBcc: hemmelig@x.example\nX-Priority: 1\n"
                 f"{_MAILX_HEAD}\nhello\n"), DEFAULT_SENDER, ("ola@x.example", "kari@x.example", "hemmelig@x.example"),
             hidden=("hemmelig@x.example",), seekable=True),
    # --- git send-email: recipients (To, Cc, Bcc and the author) as arguments, no "--", no Bcc header
    Recorded("git_send_email_sendmail_cmd", "git send-email", ("-i", *_GIT_RCPTS),
             _lf(_GIT_PATCH.format(n=1, thread="")), "patches@kunde.example", _GIT_RCPTS),
    Recorded("git_send_email_envelope_sender", "git send-email", ("-f", "patches@kunde.example", "-i", *_GIT_RCPTS),
             _lf(_GIT_PATCH.format(n=1, thread="")), "patches@kunde.example", _GIT_RCPTS),
    Recorded("git_send_email_smtp_server_path_series", "git send-email", ("-i", *_GIT_RCPTS),
             _lf(_GIT_PATCH.format(n=2, thread=_GIT_THREAD)), "patches@kunde.example", _GIT_RCPTS),
    Recorded("git_send_email_bcc", "git send-email", ("-i", *_GIT_RCPTS, "hemmelig@x.example"),
             _lf(_GIT_PATCH.format(n=1, thread="")), "patches@kunde.example", (*_GIT_RCPTS, "hemmelig@x.example"),
             hidden=("hemmelig@x.example",)),
    # --- cron: "-FCronDaemon -i -B8BITMIME -oem MAILTO", From: root (Cron Daemon), no -f
    Recorded("cron_mailto_default", "cron", ("-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"), _cron(),
             DEFAULT_SENDER, (ROOT_AT_HOST,)),
    Recorded("cron_mailto_address", "cron", ("-FCronDaemon", "-i", "-B8BITMIME", "-oem", "ola@x.example"),
             _cron(to="ola@x.example"), DEFAULT_SENDER, ("ola@x.example",)),
    Recorded("cron_mailto_list", "cron", ("-FCronDaemon", "-i", "-B8BITMIME", "-oem", "ola@x.example,kari@x.example"),
             _cron(to="ola@x.example,kari@x.example"), DEFAULT_SENDER, ("ola@x.example", "kari@x.example")),
    Recorded("cron_mailfrom", "cron", ("-FCronDaemon", "-i", "-B8BITMIME", "-oem", "ola@x.example"),
             _cron(to="ola@x.example", sender="backup@kunde.example"), "backup@kunde.example", ("ola@x.example",)),
    Recorded("cron_content_type_latin1", "cron", ("-FCronDaemon", "-i", "-B8BITMIME", "-oem", "root"),
             _cron(command="/usr/local/bin/s\xe6rlig-kopi.sh", ctype="text/plain; charset=ISO-8859-1",
                   output="ferdig p\xe5 3 s\n").decode().encode("latin-1"), DEFAULT_SENDER, (ROOT_AT_HOST,)),
    # --- system tools (static survey): argv as their sources write it
    Recorded("anacron", "anacron", ("-FAnacron", "-odi", "root"),
             _lf("From: Anacron <root>\nTo: root\nContent-Type: text/plain; charset=\"UTF-8\"\n"
                 "Subject: Anacron job 'cron.daily' on web1\n\nrun-parts: /etc/cron.daily/logrotate exited 1\n"),
             DEFAULT_SENDER, (ROOT_AT_HOST,)),
    Recorded("atd", "atd", ("-i", "root"),
             _lf("Subject: Output from your job        7\nTo: root\n\nferdig\n"), DEFAULT_SENDER, (ROOT_AT_HOST,)),
    Recorded("unattended_upgrades", "unattended-upgrades", ("-oi", "-t"),
             _lf("Content-Type: text/plain; charset=\"utf-8\"\nMIME-Version: 1.0\nContent-Transfer-Encoding: 8bit\n"
                 "Subject: unattended-upgrades result for web1: SUCCESS\nFrom: root\nTo: root\n\n"
                 "Unattended upgrade result: All upgrades installed\n"), DEFAULT_SENDER, (ROOT_AT_HOST,)),
    Recorded("apt_listchanges", "apt-listchanges", ("-oi", "-t"),
             _lf("Content-Type: text/plain; charset=\"utf-8\"\nMIME-Version: 1.0\nContent-Transfer-Encoding: 8bit\n"
                 "Subject: apt-listchanges: news for web1\nFrom: apt-listchanges <root>\nTo: root\n\n"
                 "php8.2 (8.2.36-1~deb12u1) bookworm-security\n"), DEFAULT_SENDER, (ROOT_AT_HOST,)),
    Recorded("logwatch", "logwatch", ("-t",),
             _lf("To: root\nFrom: Logwatch\nSubject: Logwatch for web1 (Linux)\nMIME-Version: 1.0\n"
                 "Content-Transfer-Encoding: 7bit\nContent-Type: text/plain; charset=\"us-ascii\"\n\n"
                 " ################### Logwatch 7.8 ####################\n"), DEFAULT_SENDER, (ROOT_AT_HOST,)),
    Recorded("mdadm", "mdadm", ("-t",),
             _lf("From: mdadm monitoring <root>\nTo: root\nSubject: Fail event on /dev/md0:web1\n\n"
                 "A Fail event had been detected on md device /dev/md0.\n"), DEFAULT_SENDER, (ROOT_AT_HOST,)),
    Recorded("sudo", "sudo", ("-t",),
             _lf("To: root\nFrom: root\nAuto-Submitted: auto-generated\n"
                 "Subject: *** SECURITY information for web1 ***\n\nweb1 : user NOT in sudoers ; COMMAND=/bin/sh\n"),
             DEFAULT_SENDER, (ROOT_AT_HOST,)),
    Recorded("mutt", "mutt", ("-oem", "-oi", "ola@x.example"),
             _lf("Date: Wed, 2 Dec 2026 10:00:00 +0100\nFrom: root <root@web1.kunde.example>\nTo: ola@x.example\n"
                 "Subject: Hei\nMessage-ID: <Z0@web1.kunde.example>\nMIME-Version: 1.0\n"
                 "Content-Type: text/plain; charset=us-ascii\nContent-Disposition: inline\n\nhei\n"),
             ROOT_AT_HOST, ("ola@x.example",)),
)

HOSTILE: tuple[Hostile, ...] = (
    # mail()'s fifth parameter "-f x;touch /tmp/pwned" after escapeshellcmd: literal arguments
    Hostile("php_mail_fifth_param_semicolon", ("-t", "-i", "-f", "post@kunde.example", ";touch", "{dir}/pwned"),
            _php("From: post@kunde.example")),
    # "a@x,\r\n Bcc: evil@x" in $to: PHP keeps CRLF followed by a space, a folded To smuggling a group
    Hostile("php_mail_inject_folded_to", ("-t", "-i"),
            _php("From: post@kunde.example", to="ola@x.example,\r\n Bcc: evil@x.example")),
)


# ------------------------------------------------------------------ the replay


@dataclass(frozen=True)
class Outcome:
    case: str
    client: str
    ok: bool
    why: str


def replay_shim(directory: Path, upstream_port: int, ca_file: Path) -> Shim:
    """Every sender registered, the caller bound with a default sender, limits out of the way."""
    shim = Shim(directory, upstream_port, ca_file, accounts=SENDERS)
    shim.configure("message", qualify_domain=QUALIFY_DOMAIN)
    shim.configure("limits", **GENEROUS_LIMITS)
    shim.ledger.bind_user("kunde", pwd.getpwuid(os.getuid()).pw_name)
    shim.ledger.set_default_sender("kunde", DEFAULT_SENDER)
    return shim


def run_case(shim: Shim, case: Recorded) -> Result:
    if not case.seekable:
        return shim.sendmail(*case.argv, input=case.stdin)
    with tempfile.TemporaryFile(dir=shim.dir) as stdin:  # as bsd-mailx does: a deleted, seekable file
        stdin.write(case.stdin)
        stdin.seek(0)
        proc = subprocess.run([SENDMAIL, *case.argv], stdin=stdin, capture_output=True, env=shim.env,
                              timeout=60, cwd=shim.dir)
    return Result(proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace"))


def replay(shim: Shim, upstream: SmtpUpstream, case: Recorded) -> Outcome:
    """Run one recorded invocation and judge it as the client would."""
    before = len(upstream.received)
    result = run_case(shim, case)
    why = _judge(case, result, upstream.received[before:])
    return Outcome(case.case, case.client, why == "", why or "delivered as the client needed")


def _judge(case: Recorded, result: Result, delivered: list[Received]) -> str:
    refused = [line for line in result.stdout.decode(errors="replace").splitlines() if line[:1] in ("4", "5")]
    if case.argv == ("-bs",) and refused:
        return f"the SMTP dialogue got {refused[0]!r}"
    if case.argv != ("-bs",) and result.code != 0:
        return f"exit {result.code}: {result.line}"
    if len(delivered) != 1:
        return f"delivered {len(delivered)} times"
    got = delivered[0]
    if got.mail_from != case.sender or tuple(got.rcpt_tos) != case.recipients:
        return f"envelope {got.mail_from} -> {got.rcpt_tos}"
    read = read_mail(got.data)
    if read.get_all("Bcc") or any(hidden.encode() in got.data for hidden in case.hidden):
        return "a Bcc recipient is visible"
    if not read["From"] or not read["From"].addresses:
        return "no From"
    return ""


def replay_all(directory: Path, upstream: SmtpUpstream, ca_file: Path) -> list[Outcome]:
    shim = replay_shim(directory, upstream.port, ca_file)
    return [replay(shim, upstream, case) for case in RECORDED]


def refuse_hostile(shim: Shim, upstream: SmtpUpstream, case: Hostile) -> Outcome:
    """A hostile invocation: refused whole, nothing delivered, nothing named on the command line made."""
    with tempfile.TemporaryDirectory(dir=shim.dir) as scratch:
        before = len(upstream.received)
        argv = tuple(arg.format(dir=scratch) for arg in case.argv)
        result = shim.sendmail(*argv, input=case.stdin)
        made = os.listdir(scratch)
    ok = result.code != 0 and len(upstream.received) == before and not made
    return Outcome(case.case, "hostile", ok, f"exit {result.code}: {result.line}")

