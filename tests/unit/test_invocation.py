"""The sendmail command line, as real clients spell it."""

from __future__ import annotations

import pytest

from sendmail_shim.invocation import IGNORED_OPTIONS, UsageError, help_text, parse_argv


@pytest.mark.parametrize(
    ("argv", "sender", "recipients", "extract", "ignore_dots"),
    [
        (["-t", "-i"], None, (), True, True),  # PHP mail() default
        (["-t", "-i", "-f", "bounce@x.example"], "bounce@x.example", (), True, True),  # mail() 5th parameter
        (["-t", "-i", "-rbounce@x.example"], "bounce@x.example", (), True, True),
        (["-t", "-i", "-oi", "-fme@x.example", "-t"], "me@x.example", (), True, True),  # PHPMailer isSendmail
        (["-i", "-fme@x.example", "--", "a@x.example", "b@x.example"], "me@x.example",
         ("a@x.example", "b@x.example"), False, True),  # Symfony -t mode
        (["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "user@x.example"], None, ("user@x.example",), False, True),
        (["-i", "-t"], None, (), True, True),  # bsd-mailx
        (["-f", "env@x.example", "-i", "a@x.example"], "env@x.example", ("a@x.example",), False, True),  # git
        (["-ti", "a@x.example"], None, ("a@x.example",), True, True),  # clustered flags
        (["a@x.example,b@x.example"], None, ("a@x.example,b@x.example",), False, False),
    ],
)
def test_real_client_argv(argv, sender, recipients, extract, ignore_dots):
    inv = parse_argv(argv)
    assert (inv.sender, inv.recipients, inv.extract_recipients, inv.ignore_dots) == (
        sender, recipients, extract, ignore_dots)


def test_full_name_and_body_type():
    inv = parse_argv(["-F", "Bounce Name", "-B", "7bit", "-t"])
    assert inv.full_name == "Bounce Name" and inv.body_type == "7BIT"
    assert parse_argv(["-FCronDaemon", "x@y.example"]).full_name == "CronDaemon"


def test_dsn_options_are_kept():
    inv = parse_argv(["-N", "success,failure", "-R", "hdrs", "-V", "abc123", "a@b.example"])
    assert (inv.dsn_notify, inv.dsn_ret, inv.dsn_envid) == ("SUCCESS,FAILURE", "HDRS", "abc123")


@pytest.mark.parametrize("argv", [
    ["-oem", "-odi", "-odb", "-t"], ["-O", "DeliveryMode=b", "-t"], ["-v", "-t"], ["-G", "-U", "-t"],
    ["-L", "tag", "-h", "17", "-t"], ["-Am", "-t"], ["-Ac", "-t"], ["-oQ/tmp", "-t"], ["-OQueueDirectory=/tmp", "-t"],
])
def test_ignored_options_are_accepted(argv):
    inv = parse_argv(argv)
    assert inv.extract_recipients
    assert inv.ignored  # recorded, not honoured


@pytest.mark.parametrize(("argv", "needle"), [
    (["-X", "/tmp/log", "-t"], "-X"),
    (["-X/var/www/html/shell.php", "-t"], "-X"),
    (["-C/etc/passwd", "-t"], "-C"),
    (["-C", "/tmp/evil.cf", "-t"], "-C"),
    (["-froot@localhost", "-be", "${run{/bin/touch /tmp/pwn}}"], "-be"),
    (["-bd"], "-bd"), (["-bi"], "-bi"), (["-bp"], "-bp"), (["-bt"], "-bt"), (["-bv", "a@b.example"], "-bv"),
    (["-q"], "-q"), (["-q30m"], "-q"), (["-qR", "x"], "-q"), (["-d0.1", "-t"], "-d"), (["-I"], "-I"),
    (["-n", "-t"], "unknown option"), (["--frobnicate"], "unknown option"),
    (["-B", "BINARYMIME", "-t"], "-B"), (["-N", "sometimes", "-t"], "-N"),
    (["-f"], "needs a value"), (["-F", "Eve\r\nBcc: x@evil.example", "-t"], "control characters"),
    ([], "no recipients"), (["-i"], "no recipients"),
])
def test_refused_options(argv, needle):
    with pytest.raises(UsageError) as info:
        parse_argv(argv)
    assert needle in str(info.value)


def test_operands_end_option_parsing():
    # After the first recipient nothing is an option: '-X' is just a (bad) recipient.
    inv = parse_argv(["a@b.example", "-X/tmp/x"])
    assert inv.recipients == ("a@b.example", "-X/tmp/x")


@pytest.mark.parametrize("name", ["mailq", "newaliases", "/usr/bin/mailq"])
def test_other_program_names_are_refused(name):
    with pytest.raises(UsageError, match="only sends mail"):
        parse_argv(["-t"], program=name)


def test_bs_mode_takes_no_recipients():
    assert parse_argv(["-bs"]).mode == "smtp"
    with pytest.raises(UsageError):
        parse_argv(["-bs", "a@b.example"])


def test_help_lists_every_ignored_option():
    text = help_text()
    for _, _, what in IGNORED_OPTIONS:
        assert what in text
    assert parse_argv(["--help"]).mode == "help"
