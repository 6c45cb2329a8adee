"""The one table from every error of the program to a sysexits code and an SMTP reply.

``sendmail``, its ``-bs`` dialogue, the gate and the admin CLI all ask
``exit_code_for``; no error class carries a code of its own. The table names
each class by its import path, so that this module imports nothing of the
program: the gate client, which must stay light, uses it too. A test checks
that every name here is a real exception class and that every error class of
the program gets its code from here.

PHP's mail() reports success for exit 0 only, and PHP 8.5 reports 75 as
success, so 75 is never used: temporary trouble the queue cannot absorb is 69.
"""

from __future__ import annotations

import os

EX_OK = os.EX_OK
EX_USAGE = os.EX_USAGE  # 64
EX_DATAERR = os.EX_DATAERR  # 65
EX_NOINPUT = os.EX_NOINPUT  # 66
EX_NOUSER = os.EX_NOUSER  # 67
EX_UNAVAILABLE = os.EX_UNAVAILABLE  # 69
EX_SOFTWARE = os.EX_SOFTWARE  # 70
EX_PROTOCOL = os.EX_PROTOCOL  # 76
EX_NOPERM = os.EX_NOPERM  # 77
EX_CONFIG = os.EX_CONFIG  # 78

_P = "sendmail_shim."

# (class, code): the class itself or its nearest ancestor listed here decides; anything else is 70.
EXIT_CODES: tuple[tuple[str, int], ...] = (
    # argv and the admin CLI's own usage errors
    (_P + "invocation.UsageError", EX_USAGE),
    ("click.exceptions.UsageError", EX_USAGE),
    ("click.exceptions.ClickException", EX_USAGE),
    ("click.exceptions.Abort", EX_USAGE),
    # the message
    (_P + "message.MessageError", EX_DATAERR),
    (_P + "message.EmptyMessage", EX_NOINPUT),
    # the envelope
    (_P + "envelope.EnvelopeError", EX_DATAERR),
    (_P + "envelope.InvalidSender", EX_NOUSER),
    (_P + "envelope.InvalidRecipient", EX_NOUSER),
    (_P + "envelope.NoRecipients", EX_NOUSER),
    (_P + "envelope.TooManyRecipients", EX_NOPERM),
    # the account and the caller
    (_P + "accounts.AccountError", EX_NOPERM),
    (_P + "accounts.UnknownAccount", EX_NOUSER),
    # SPF: it fails closed
    (_P + "spf.SpfError", EX_UNAVAILABLE),
    (_P + "spf.SpfNotAuthorised", EX_NOPERM),
    (_P + "spf.SpfUnavailable", EX_UNAVAILABLE),
    # the ledger
    (_P + "ledger.errors.LedgerError", EX_UNAVAILABLE),
    (_P + "ledger.errors.LimitNeverFits", EX_NOPERM),
    (_P + "ledger.errors.LedgerNotInitialised", EX_CONFIG),
    (_P + "ledger.errors.UnsupportedLedger", EX_CONFIG),
    (_P + "ledger.errors.InvalidInput", EX_DATAERR),
    (_P + "ledger.errors.Conflict", EX_DATAERR),
    (_P + "ledger.errors.UnknownSubject", EX_NOUSER),
    # the relay and the queue
    (_P + "relay.RelayError", EX_UNAVAILABLE),
    (_P + "queue.QueueError", EX_NOUSER),
    (_P + "notify.NotifyError", EX_UNAVAILABLE),  # logged after the answer; never the mail's own verdict
    # configuration
    (_P + "config.ConfigError", EX_CONFIG),
    (_P + "limits.RuleSyntaxError", EX_DATAERR),
    (_P + "notice_templates.TemplateError", EX_CONFIG),  # reported as [notify] templates' ConfigError
    # the gate, its protocol and its client
    (_P + "gate.errors.GateError", EX_CONFIG),
    (_P + "gate.errors.SocketInUse", EX_UNAVAILABLE),
    (_P + "gate.reload.ReloadRefused", EX_CONFIG),  # logged by the running gate, which keeps its config
    (_P + "gate.budget.UploadsBusy", EX_UNAVAILABLE),
    (_P + "gate_protocol.ProtocolError", EX_UNAVAILABLE),
    (_P + "gate_protocol.BadFrame", EX_PROTOCOL),
    (_P + "gate_client.GateClientError", EX_UNAVAILABLE),
    (_P + "gate_client.GateUserUnknown", EX_CONFIG),
    (_P + "gate_client.ArgumentsTooLong", EX_USAGE),
    # who can reach the relay
    (_P + "trust.TrustError", EX_CONFIG),
)
_CODE_OF = dict(EXIT_CODES)

# The reply a -bs client gets for the same refusal.
SMTP_REPLIES: dict[int, tuple[int, str]] = {
    EX_USAGE: (501, "5.5.4"),
    EX_DATAERR: (554, "5.6.0"),
    EX_NOINPUT: (554, "5.6.0"),
    EX_NOUSER: (550, "5.1.1"),
    EX_UNAVAILABLE: (451, "4.3.0"),
    EX_SOFTWARE: (451, "4.3.0"),
    EX_PROTOCOL: (451, "4.3.0"),
    EX_NOPERM: (550, "5.7.1"),
    EX_CONFIG: (451, "4.3.5"),
}
_SMTP_BY_CLASS: dict[str, tuple[int, str]] = {
    _P + "relay.UpstreamRefused": (554, "5.0.0"),  # an upstream 5xx stays permanent
    _P + "ledger.errors.LimitReached": (451, "4.7.1"),
}


def class_path(kind: type) -> str:
    return f"{kind.__module__}.{kind.__qualname__}"


def _lineage(exc: BaseException) -> list[str]:
    """The exception's class and its ancestors, nearest first, by import path."""
    return [class_path(kind) for kind in type(exc).__mro__]


def exit_code_for(exc: BaseException) -> int:
    for name in _lineage(exc):
        if name in _CODE_OF:
            return _CODE_OF[name]
    return EX_SOFTWARE


def smtp_reply_for(exc: BaseException, code: int) -> tuple[int, str]:
    """(reply code, enhanced status) for -bs."""
    for name in _lineage(exc):
        if name in _SMTP_BY_CLASS:
            return _SMTP_BY_CLASS[name]
    return SMTP_REPLIES.get(code, (451, "4.3.0"))


def stderr_line(exc: BaseException, code: int) -> str:
    """The one line on stderr, after the program name."""
    if code == EX_USAGE:
        return str(exc)
    if code == EX_CONFIG:
        return f"not sent: configuration error: {exc}; the administrator must fix it"
    return f"not sent: {exc}"
