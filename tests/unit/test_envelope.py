"""Who sends: -f, the From header, or the caller's default sender; and the From the message goes with."""

from __future__ import annotations

import pytest

from sendmail_shim.addresses import Mailbox
from sendmail_shim.envelope import MissingSender, SenderDefaults, build
from sendmail_shim.invocation import parse_argv
from sendmail_shim.message import complete, parse

DEFAULT = "post@kunde.example"


class Directory:
    """The ledger's answer for one bound caller, counting how often it is asked."""

    def __init__(self, answer: str | None) -> None:
        self.answer, self.asked = answer, 0

    def __call__(self) -> str | None:
        self.asked += 1
        return self.answer


def envelope_for(argv: list[str], raw: str, default: str | None = DEFAULT, user: str = "web1",
                 qualify: str | None = None):
    directory = Directory(default)
    message = parse(raw.encode(), True)
    found = build(parse_argv(argv), message, qualify, 1000, SenderDefaults(user, directory))
    return found, message, directory


def test_no_sender_anywhere_sends_as_the_default_with_a_from_named_by_F():
    envelope, message, _ = envelope_for(["-t", "-F", "Kari Nordmann"], "To: ola@x.example\nSubject: s\n\nx\n")
    assert envelope.sender == Mailbox("post", "kunde.example")
    assert envelope.author == Mailbox("post", "kunde.example", "Kari Nordmann")
    assert envelope.repairs == {"default_sender": DEFAULT}
    complete(message, envelope.author, "by test")
    assert message.first("From") == "Kari Nordmann <post@kunde.example>"


def test_a_from_without_a_domain_maps_to_the_default_and_keeps_its_display_name():
    cron = "From: root (Cron Daemon)\nTo: ola@x.example\nSubject: Cron <root@web1> backup\n\nok\n"
    envelope, message, _ = envelope_for(["-FCronDaemon", "-i", "-B8BITMIME", "-oem", "ola@x.example"], cron)
    assert envelope.sender == Mailbox("post", "kunde.example")
    assert envelope.author == Mailbox("post", "kunde.example", "Cron Daemon")
    assert envelope.repairs == {"from_mapped": "root->post@kunde.example", "default_sender": DEFAULT}
    complete(message, envelope.author, "by test")
    assert [h.value for h in message.get_all("From")] == ["Cron Daemon <post@kunde.example>"]
    assert [h.name for h in message.headers][:2] == ["Received", "From"]  # replaced where it stood


@pytest.mark.parametrize("header", ["From: web1", "From: Anacron <web1>", "From: root"])
def test_the_login_name_and_root_map_alike(header: str):
    envelope, _, _ = envelope_for(["-t"], f"{header}\nTo: ola@x.example\n\nx\n")
    assert (envelope.sender.address, envelope.author.address) == (DEFAULT, DEFAULT)


def test_with_f_the_envelope_is_f_and_a_bare_from_still_maps_to_the_default():
    envelope, _, _ = envelope_for(["-t", "-f", "bounce@kunde.example"], "From: root\nTo: ola@x.example\n\nx\n")
    assert envelope.sender.address == "bounce@kunde.example"
    assert envelope.author == Mailbox("post", "kunde.example")
    assert "default_sender" not in envelope.repairs


def test_a_from_with_an_address_is_never_replaced_and_the_directory_is_not_asked():
    envelope, _, directory = envelope_for(["-t"], "From: Kari <kari@kunde.example>\nTo: ola@x.example\n\nx\n")
    assert envelope.sender.address == "kari@kunde.example" and envelope.repairs == {}
    assert directory.asked == 0
    envelope, _, directory = envelope_for(["-t", "-f", "bounce@kunde.example"], "To: ola@x.example\n\nx\n")
    assert envelope.author == Mailbox("bounce", "kunde.example") and directory.asked == 0


def test_without_a_default_the_refusal_names_both_fixes():
    with pytest.raises(MissingSender) as caught:
        envelope_for(["-t"], "To: ola@x.example\nSubject: s\n\nx\n", default=None)
    assert str(caught.value) == (
        "the message has no From header and no sender was given; add -f with your sending address to "
        "sendmail_path (or a From: header to the message), or ask your hosting provider to set a default sender")
    with pytest.raises(MissingSender, match="the From header 'root' has no domain .* default sender"):
        envelope_for(["-t"], "From: root (Cron Daemon)\nTo: ola@x.example\n\nx\n", default=None)


def test_without_a_default_a_bare_from_is_qualified_or_takes_f():
    envelope, _, _ = envelope_for(["-t"], "From: root (Cron Daemon)\nTo: ola@x.example\n\nx\n", default=None,
                                  qualify="web1.kunde.example")
    assert envelope.author == Mailbox("root", "web1.kunde.example", "Cron Daemon")
    assert envelope.sender == Mailbox("root", "web1.kunde.example")
    envelope, _, _ = envelope_for(["-t", "-f", "bounce@kunde.example"], "From: root\nTo: ola@x.example\n\nx\n",
                                  default=None)
    assert envelope.author == Mailbox("bounce", "kunde.example")
