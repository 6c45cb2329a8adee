"""What a mail reader makes of a delivered message: Python's ``email`` with the default policy."""

from __future__ import annotations

import email
import email.policy
from email.message import EmailMessage


def read_mail(data: bytes) -> EmailMessage:
    """The message as a reader decodes it; raw UTF-8 headers (as under SMTPUTF8) are read as text."""
    message: EmailMessage = email.message_from_bytes(data, policy=email.policy.default)  # type: ignore[assignment]
    head = data.split(b"\r\n\r\n", 1)[0]
    if not head.isascii():
        # The bytes parser reads 8-bit header bytes as undecodable; a UTF-8-aware reader does not.
        text: EmailMessage = email.message_from_string(head.decode("utf-8") + "\r\n\r\n",  # type: ignore[assignment]
                                                       policy=email.policy.default)
        for name in set(message.keys()):
            del message[name]
        for name, value in text.items():
            message[name] = value
    return message


def body_text(message: EmailMessage) -> str:
    """The text body as decoded with its charset, with plain newlines."""
    return str(message.get_content()).replace("\r\n", "\n")


def named_addresses(message: EmailMessage, name: str) -> list[tuple[str, str]]:
    """(display name, address) of every mailbox in every ``name`` header, groups flattened."""
    return [(a.display_name, a.addr_spec) for header in message.get_all(name, []) for a in header.addresses]


def longest_line(data: bytes) -> int:
    return max(len(line) for line in data.split(b"\r\n"))
