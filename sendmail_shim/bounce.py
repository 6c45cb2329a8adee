"""Delivery status notifications (RFC 3464) for queued messages that failed.

A bounce goes to the original envelope sender with the null sender, so that it
is never bounced itself, and carries only the original's headers (the body may
be large and was the sender's own anyway).
"""

from __future__ import annotations

import os
import re
import time

from .message import format_date, new_message_id

_ENHANCED = re.compile(r"^([245]\.\d{1,3}\.\d{1,3})\b")


def status_of(reply: str) -> str:
    """The RFC 3463 status for a failure: the upstream's own, else one from the reply class."""
    text = reply.split(" ", 1)[1] if reply[:3].isdigit() and " " in reply else reply
    match = _ENHANCED.match(text.strip())
    if match and match.group(1).startswith("5"):
        return match.group(1)
    if reply.startswith("gave up"):
        return "4.4.7"  # delivery time expired
    return "5.0.0"


def delivery_report(sender: str, original: bytes, failed: dict[str, str], *, hostname: str,
                    arrived: float) -> bytes:
    """The notification for ``sender`` about the ``failed`` recipients (address -> last reply)."""
    boundary = f"dsn-{os.urandom(8).hex()}"
    domain = sender.rsplit("@", 1)[-1] if "@" in sender else hostname
    headers = original.split(b"\r\n\r\n", 1)[0]
    explanation = [
        f"This is the mail system at {hostname}.",
        "",
        "Your message could not be delivered to the recipients below. The reasons are the",
        "receiving system's own words.",
        "",
        *[f"  <{address}>: {reply}" for address, reply in sorted(failed.items())],
    ]
    per_message = [f"Reporting-MTA: dns; {hostname}", f"Arrival-Date: {format_date(arrived)}"]
    per_recipient: list[str] = []
    for address, reply in sorted(failed.items()):
        per_recipient += ["", f"Final-Recipient: rfc822; {address}", "Action: failed",
                          f"Status: {status_of(reply)}"]
        if reply[:3].isdigit():
            per_recipient.append(f"Diagnostic-Code: smtp; {reply}")
    lines = [
        f"From: Mail Delivery System <MAILER-DAEMON@{hostname}>",
        f"To: <{sender}>",
        "Subject: Undelivered Mail Returned to Sender",
        f"Date: {format_date(time.time())}",
        f"Message-ID: {new_message_id(domain)}",
        "Auto-Submitted: auto-replied",
        "MIME-Version: 1.0",
        f'Content-Type: multipart/report; report-type=delivery-status; boundary="{boundary}"',
        "",
        f"--{boundary}",
        "Content-Type: text/plain; charset=utf-8",
        "Content-Transfer-Encoding: 8bit",
        "",
        *explanation,
        "",
        f"--{boundary}",
        "Content-Type: message/delivery-status",
        "",
        *per_message,
        *per_recipient,
        "",
        f"--{boundary}",
        "Content-Type: text/rfc822-headers",
        "",
    ]
    tail = ["", f"--{boundary}--", ""]
    return ("\r\n".join(lines)).encode("utf-8") + b"\r\n" + headers + b"\r\n" + "\r\n".join(tail).encode()
