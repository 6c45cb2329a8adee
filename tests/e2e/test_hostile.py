"""Hostile input: every option, header and byte may be an attack (see the security catalogue)."""

from __future__ import annotations

import os
import re
import subprocess
from pathlib import Path

import pytest

from tests.support.mailreader import read_mail
from tests.support.shim import SENDMAIL, Shim
from tests.support.upstream import SmtpUpstream

BARE = re.compile(rb"\r(?!\n)|(?<!\r)\n")


@pytest.mark.parametrize("args", [
    ["-X", "{dir}/shell.php", "-t"],
    ["-X{dir}/shell.php", "-t"],
    ["-t", "-i", "-X{dir}/log.txt"],
    ["-C{dir}/evil.cf", "-t"],
    ["-C", "{dir}/evil.cf", "-t"],
    ["-froot@localhost", "-be", "${{run{{/bin/touch {dir}/pwn}}}}"],
    ["-bd"], ["-bp"], ["-q"], ["-bv", "ola@x.example"], ["-d0.1", "-t"],
])
def test_dangerous_options_touch_nothing(shim: Shim, upstream: SmtpUpstream, tmp_path: Path, args):
    victim = tmp_path / "victim"
    victim.mkdir()
    (victim / "evil.cf").write_text("D{x}y\n")
    before = sorted(os.listdir(victim))
    argv = [a.format(dir=victim) for a in args]
    result = shim.sendmail(*argv, input=b"From: post@kunde.example\nTo: ola@x.example\n\nx\n")
    assert result.code == 64
    assert result.line.startswith("sendmail: ") and "\n" not in result.line
    assert sorted(os.listdir(victim)) == before
    assert upstream.received == []


def test_php_fifth_parameter_shell_words_arrive_as_literal_recipients(shim: Shim, upstream: SmtpUpstream):
    # PHP passes "$(id)", ";", "|" as their own argv words after escapeshellcmd.
    for word in ("$(id)", ";touch", "|", "`id`"):
        result = shim.sendmail("-t", "-i", word, input=b"From: post@kunde.example\nTo: ola@x.example\n\nx\n")
        assert result.code == 67, (word, result.line)
    assert upstream.received == []


@pytest.mark.parametrize("name", ["mailq", "newaliases"])
def test_called_as_mailq_or_newaliases(shim: Shim, upstream: SmtpUpstream, tmp_path: Path, name):
    link = tmp_path / name
    link.symlink_to(SENDMAIL)
    proc = subprocess.run([str(link)], input=b"", capture_output=True, env=shim.env, timeout=30)
    assert proc.returncode == 64 and b"only sends mail" in proc.stderr


@pytest.mark.parametrize("body", [
    b"a\n.\nMAIL FROM:<ceo@victim.example>\n",
    b"a\r.\r\nMAIL FROM:<ceo@victim.example>\r\n",
    b"a\n.\r\nMAIL FROM:<ceo@victim.example>\r\n",
    b"a\r\n.\rMAIL FROM:<ceo@victim.example>\r\n",
    b"a\r\n.\nMAIL FROM:<ceo@victim.example>\n",
    b"a\r\n.\r\nMAIL FROM:<ceo@victim.example>\r\nRCPT TO:<x@victim.example>\r\nDATA\r\n"
    b"From: ceo@victim.example\r\n\r\nwire money\r\n.\r\nQUIT\r\n",
])
def test_smuggling_bodies_stay_one_message(shim: Shim, upstream: SmtpUpstream, body):
    message = b"From: post@kunde.example\r\nTo: ola@x.example\r\nSubject: s\r\n\r\n" + body
    result = shim.sendmail("-t", "-i", input=message)
    assert result.code == 0, result.line
    (got,) = upstream.wait_for(1)
    assert got.rcpt_tos == ["ola@x.example"] and got.mail_from == "post@kunde.example"
    assert BARE.search(got.data) is None
    assert b"\r\n.\r\nMAIL FROM:<ceo@victim.example>\r\n" in got.data  # delivered as data, one dot line


def test_without_i_a_dot_line_ends_the_message_and_the_rest_is_dropped(shim: Shim, upstream: SmtpUpstream):
    message = b"From: post@kunde.example\nTo: ola@x.example\n\nkept\n.\nMAIL FROM:<ceo@victim.example>\n"
    assert shim.sendmail("-t", input=message).code == 0
    (got,) = upstream.received
    assert b"ceo@victim" not in got.data and got.body == b"kept\r\n"


def test_folded_to_carrying_bcc_is_refused(shim: Shim, upstream: SmtpUpstream):
    message = b"From: post@kunde.example\r\nTo: ola@x.example,\r\n Bcc: evil@x.example\r\nSubject: s\r\n\r\nx\r\n"
    result = shim.sendmail("-t", "-i", input=message)
    assert result.code == 65 and "To header" in result.line
    assert upstream.received == []


def test_bare_lf_bcc_from_additional_headers_is_a_recipient_and_removed(shim: Shim, upstream: SmtpUpstream):
    # PHP lets "From: me\nBcc: victim" through additional_headers: it is a real Bcc header.
    message = b"To: ola@x.example\r\nSubject: s\r\nFrom: post@kunde.example\nBcc: victim@x.example\r\n\r\nx\r\n"
    assert shim.sendmail("-t", "-i", input=message).code == 0
    (got,) = upstream.received
    assert "victim@x.example" in got.rcpt_tos and b"victim" not in got.data


def test_nul_byte(shim: Shim, upstream: SmtpUpstream):
    result = shim.sendmail("-t", "-i", input=b"From: post@kunde.example\nTo: ola@x.example\n\nbo\0dy\n")
    assert result.code == 65 and "NUL" in result.line
    assert upstream.received == []


def test_twenty_megabytes_is_refused_with_bounded_memory(shim: Shim, upstream: SmtpUpstream):
    header = b"From: post@kunde.example\nTo: ola@x.example\n\n"
    big = header + (b"y" * 76 + b"\n") * (20 * 1024 * 1024 // 77)
    # time(1) reports the peak RSS of sendmail alone (not of this test process it was forked from).
    proc = subprocess.run(["/usr/bin/time", "-f", "maxrss=%M", SENDMAIL, "-t", "-i"], input=big,
                          capture_output=True, env=shim.env, timeout=60)
    stderr = proc.stderr.decode()
    assert proc.returncode == 65 and "larger than the limit" in stderr
    peak_kib = int(re.search(r"maxrss=(\d+)", stderr).group(1))  # type: ignore[union-attr]
    assert peak_kib < 60 * 1024  # the cap is 10 MB: the input is never held whole, let alone twice
    assert upstream.received == []


def test_five_thousand_recipients_are_refused_whole(shim: Shim, upstream: SmtpUpstream):
    to = ", ".join(f"r{i}@x.example" for i in range(2500)).encode()
    bcc = ", ".join(f"b{i}@x.example" for i in range(2500)).encode()
    message = b"From: post@kunde.example\nTo: " + to + b"\nBcc: " + bcc + b"\n\nx\n"
    # Folded header lines of at most 998 octets, as a real client would write them.
    message = re.sub(rb", ", b",\n ", message)
    result = shim.sendmail("-t", "-i", input=message)
    assert result.code == 77 and "5000 recipients" in result.line
    assert upstream.received == []


def test_giant_header_line_is_folded_and_says_the_same(shim: Shim, upstream: SmtpUpstream):
    message = b"From: post@kunde.example\nTo: ola@x.example\nSubject: " + b"A" * 5000 + b"\n\nx\n"
    result = shim.sendmail("-t", "-i", input=message)
    assert (result.code, result.line) == (0, "")
    (got,) = upstream.received
    assert max(len(x) for x in got.data.split(b"\r\n")) <= 998
    assert read_mail(got.data)["Subject"] == "A" * 5000
    assert "folded=Subject" in shim.log_lines()[-1]


def test_headers_past_the_bound_are_refused_with_bounded_memory(shim: Shim, upstream: SmtpUpstream):
    big = b"From: post@kunde.example\nTo: ola@x.example\nX-Filler: " + b"y " * (4 * 1024 * 1024) + b"\n\nx\n"
    proc = subprocess.run(["/usr/bin/time", "-f", "maxrss=%M", SENDMAIL, "-t", "-i"], input=big,
                          capture_output=True, env=shim.env, timeout=60)
    stderr = proc.stderr.decode()
    assert proc.returncode == 65
    assert ("sendmail: not sent: the message's headers are larger than 262144 bytes in all; shorten them "
            "(send to long lists through a bulk mail service)") in stderr
    assert int(re.search(r"maxrss=(\d+)", stderr).group(1)) < 60 * 1024  # type: ignore[union-attr]
    shim.configure("message", max_header_size=16 * 1024 * 1024)
    assert shim.sendmail("-t", "-i", input=big).code == 0  # the bound is the admin's to raise
    assert len(upstream.received) == 1


def test_giant_body_line_is_encoded_not_split(shim: Shim, upstream: SmtpUpstream):
    line = b"z" * 5000
    message = b"From: post@kunde.example\nTo: ola@x.example\n\n" + line + b"\n"
    assert shim.sendmail("-t", "-i", input=message).code == 0
    (got,) = upstream.received
    assert max(len(x) for x in got.data.split(b"\r\n")) <= 998
    assert got.headers["content-transfer-encoding"] == ["quoted-printable"]
    assert got.body.replace(b"=\r\n", b"").strip() == line


def test_header_injection_through_F_is_refused(shim: Shim, upstream: SmtpUpstream):
    result = shim.sendmail("-f", "post@kunde.example", "-F", "Eve\r\nBcc: x@evil.example", "ola@x.example",
                           input=b"Subject: s\n\nx\n")
    assert result.code == 64
    assert upstream.received == []


def test_log_lines_escape_hostile_values(shim: Shim, upstream: SmtpUpstream):
    shim.sendmail("-t", "-i", "-f", "post@kunde.example", "bad\u001b[31m\nname",
                  input=b"To: ola@x.example\n\nx\n")
    lines = shim.log_lines()
    assert len(lines) == 1 and "\x1b" not in lines[0]
