"""`sendmail` as a process against a real STARTTLS upstream on loopback."""

from __future__ import annotations

import re

from tests.support.shim import Shim
from tests.support.upstream import Script, SmtpUpstream, free_port

PHP_STYLE = (
    b"To: ola@x.example\r\nSubject: Hei\r\nFrom: Kunde <post@kunde.example>\n"
    b"Cc: kari@x.example\r\nBcc: hemmelig@x.example\r\n\r\nLine one\nLine two\n\r\n"
)


def test_php_style_message_is_relayed_over_tls(shim: Shim, upstream: SmtpUpstream):
    result = shim.sendmail("-t", "-i", input=PHP_STYLE)
    assert (result.code, result.line, result.stdout) == (0, "", b"")
    (got,) = upstream.received
    assert got.tls
    assert got.mail_from == "post@kunde.example"
    assert got.rcpt_tos == ["ola@x.example", "kari@x.example", "hemmelig@x.example"]
    headers = got.headers
    assert "bcc" not in headers and b"hemmelig" not in got.data
    assert headers["date"] and re.fullmatch(r"<.+@kunde\.example>", headers["message-id"][0])
    assert got.body == b"Line one\r\nLine two\r\n\r\n"
    assert re.search(rb"\r(?!\n)|(?<!\r)\n", got.data) is None
    (line,) = shim.log_lines()
    assert "verdict=sent" in line and "code=0" in line and "sender=post@kunde.example" in line


def test_argv_recipients_are_added_to_header_recipients(shim: Shim, upstream: SmtpUpstream):
    result = shim.sendmail("-t", "-i", "Per <per@x.example>, pal@x.example", "ola@x.example", input=PHP_STYLE)
    assert result.code == 0
    assert upstream.received[0].rcpt_tos == [
        "ola@x.example", "kari@x.example", "hemmelig@x.example", "per@x.example", "pal@x.example"]


def test_without_t_only_argv_recipients_get_it(shim: Shim, upstream: SmtpUpstream):
    result = shim.sendmail("-i", "--", "per@x.example", input=PHP_STYLE)
    assert result.code == 0
    got = upstream.received[0]
    assert got.rcpt_tos == ["per@x.example"]
    assert "bcc" not in got.headers  # Bcc is removed whatever the mode


def test_envelope_sender_from_f_and_from_built_with_F(shim: Shim, upstream: SmtpUpstream):
    result = shim.sendmail("-f", "post@kunde.example", "-F", "Kunde AS", "ola@x.example",
                           input=b"Subject: no from\n\nbody\n")
    assert result.code == 0
    got = upstream.received[0]
    assert got.mail_from == "post@kunde.example"
    assert got.headers["from"] == ["Kunde AS <post@kunde.example>"]


def test_no_from_and_no_sender_is_refused(shim: Shim, upstream: SmtpUpstream):
    result = shim.sendmail("ola@x.example", input=b"Subject: who?\n\nbody\n")
    assert result.code == 65
    assert result.line.startswith("sendmail: not sent: ") and "From" in result.line
    assert upstream.received == []


def test_empty_input(shim: Shim, upstream: SmtpUpstream):
    result = shim.sendmail("-t", input=b"")
    assert result.code == 66 and "empty" in result.line
    assert upstream.received == []


def test_no_valid_recipient(shim: Shim, upstream: SmtpUpstream):
    result = shim.sendmail("-t", "-i", input=b"From: post@kunde.example\nSubject: s\n\nx\n")
    assert result.code == 67 and "no recipient" in result.line
    bad = shim.sendmail("-i", "not an address", input=b"From: post@kunde.example\n\nx\n")
    assert bad.code == 67 and "not a valid address" in bad.line
    assert upstream.received == []


def test_upstream_5xx_at_end_of_data_is_69_with_its_text(shim: Shim, upstream: SmtpUpstream):
    upstream.script.replies["DATA"] = "554 5.7.1 spam detected"
    result = shim.sendmail("-t", "-i", input=PHP_STYLE)
    assert result.code == 69
    assert "554 5.7.1 spam detected" in result.line
    assert "code=69" in shim.log_lines()[0]


def test_with_the_queue_off_a_4xx_is_69_never_75(shim: Shim, upstream: SmtpUpstream):
    shim.configure("queue", enabled=False)
    upstream.script.replies["MAIL"] = "451 4.3.0 try again later"
    result = shim.sendmail("-t", "-i", input=PHP_STYLE)
    assert result.code == 69 and "451" in result.line


def test_a_refused_recipient_means_nothing_is_sent(shim: Shim, upstream: SmtpUpstream):
    upstream.script.replies["RCPT:kari@x.example"] = "550 5.1.1 no such user"
    result = shim.sendmail("-t", "-i", input=PHP_STYLE)
    assert result.code == 69
    assert "kari@x.example: 550 5.1.1 no such user" in result.line and "nothing was sent" in result.line
    assert upstream.received == []


def test_upstream_down_with_the_queue_off(shim: Shim, upstream: SmtpUpstream):
    shim.configure("queue", enabled=False)
    shim.configure("upstream", port=free_port())  # nothing listens there
    result = shim.sendmail("-t", "-i", input=PHP_STYLE)
    assert result.code == 69 and "cannot reach the upstream" in result.line
    assert "verdict=refused" in shim.log_lines()[0]


def test_no_stdout_output_in_t_mode(shim: Shim, upstream: SmtpUpstream):
    for args in (["-t", "-i", "-v"], ["-t", "-i"]):
        assert shim.sendmail(*args, input=PHP_STYLE).stdout == b""


def test_8bit_without_smtputf8_is_encoded(ca, shim: Shim):
    with SmtpUpstream(ca, smtputf8=False, script=Script(drop_ehlo=("8BITMIME",))) as plain7:
        shim.configure("upstream", port=plain7.port)
        message = "From: Bjørn <post@kunde.example>\nTo: ola@x.example\nSubject: Hei på deg\n\nBlåbær\n".encode()
        result = shim.sendmail("-t", "-i", input=message)
        assert result.code == 0, result.line
        got = plain7.received[0]
        assert got.data.isascii()
        assert "SMTPUTF8" not in got.mail_options and "BODY=8BITMIME" not in got.mail_options
        assert b"Subject: Hei =?utf-8?b?" in got.data


def test_8bit_with_smtputf8_goes_as_it_is(shim: Shim, upstream: SmtpUpstream):
    message = "From: Bjørn <post@kunde.example>\nTo: ola@x.example\nSubject: Hei på deg\n\nBlåbær\n".encode()
    assert shim.sendmail("-t", "-i", input=message).code == 0
    got = upstream.received[0]
    assert "SMTPUTF8" in got.mail_options and "BODY=8BITMIME" in got.mail_options
    assert "Subject: Hei på deg".encode() in got.data


def test_dsn_options_reach_the_upstream_when_offered(shim: Shim, upstream: SmtpUpstream):
    # aiosmtpd does not offer DSN: the options are then not sent (never a protocol error).
    result = shim.sendmail("-N", "failure", "-R", "hdrs", "-i", "ola@x.example", input=PHP_STYLE)
    assert result.code == 0
    assert not any(o.startswith(("RET=", "ENVID=")) for o in upstream.received[0].mail_options)
