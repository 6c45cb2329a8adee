"""One table from each stage's exceptions to a sysexits code and an SMTP reply.

PHP's mail() reports success for exit 0 only, and PHP 8.5 reports 75 as
success, so 75 is never used: temporary trouble the queue cannot absorb is 69.
"""

from __future__ import annotations

import os

from .accounts import AccountError, UnknownAccount
from .config import ConfigError
from .encoding import CannotEncode
from .envelope import (
    EnvelopeError,
    InvalidRecipient,
    InvalidSender,
    MissingSender,
    NoRecipients,
    TooManyRecipients,
)
from .invocation import UsageError
from .ledger import (
    LedgerError,
    LedgerNotInitialised,
    LedgerUnavailable,
    LimitNeverFits,
    LimitReached,
    UnsupportedLedger,
)
from .message import EmptyMessage, MalformedMessage, MessageError
from .relay import RelayError, UpstreamRefused
from .spf import SpfNotAuthorised, SpfUnavailable

# Most specific first: the first matching class decides.
EXIT_CODES: tuple[tuple[type[BaseException], int], ...] = (
    (UsageError, os.EX_USAGE),
    (EmptyMessage, os.EX_NOINPUT),
    (CannotEncode, os.EX_DATAERR),
    (MalformedMessage, os.EX_DATAERR),
    (MessageError, os.EX_DATAERR),
    (MissingSender, os.EX_DATAERR),
    (InvalidSender, os.EX_NOUSER),
    (InvalidRecipient, os.EX_NOUSER),
    (NoRecipients, os.EX_NOUSER),
    (TooManyRecipients, os.EX_NOPERM),
    (EnvelopeError, os.EX_DATAERR),
    (UnknownAccount, os.EX_NOUSER),
    (AccountError, os.EX_NOPERM),
    (SpfNotAuthorised, os.EX_NOPERM),
    (SpfUnavailable, os.EX_UNAVAILABLE),
    (LimitNeverFits, os.EX_NOPERM),
    (LimitReached, os.EX_UNAVAILABLE),
    (LedgerNotInitialised, os.EX_CONFIG),
    (UnsupportedLedger, os.EX_CONFIG),
    (LedgerUnavailable, os.EX_UNAVAILABLE),
    (LedgerError, os.EX_UNAVAILABLE),
    (RelayError, os.EX_UNAVAILABLE),
    (ConfigError, os.EX_CONFIG),
)

# The reply a -bs client gets for the same refusal.
SMTP_REPLIES: dict[int, tuple[int, str]] = {
    os.EX_USAGE: (501, "5.5.4"),
    os.EX_DATAERR: (554, "5.6.0"),
    os.EX_NOINPUT: (554, "5.6.0"),
    os.EX_NOUSER: (550, "5.1.1"),
    os.EX_UNAVAILABLE: (451, "4.3.0"),
    os.EX_SOFTWARE: (451, "4.3.0"),
    os.EX_NOPERM: (550, "5.7.1"),
    os.EX_CONFIG: (451, "4.3.5"),
}


def exit_code_for(exc: BaseException) -> int:
    for kind, code in EXIT_CODES:
        if isinstance(exc, kind):
            return code
    return os.EX_SOFTWARE


def smtp_reply_for(exc: BaseException, code: int) -> tuple[int, str]:
    """(reply code, enhanced status) for -bs; an upstream 5xx stays permanent."""
    if isinstance(exc, UpstreamRefused):
        return 554, "5.0.0"
    if isinstance(exc, LimitReached):
        return 451, "4.7.1"
    return SMTP_REPLIES.get(code, (451, "4.3.0"))


def stderr_line(exc: BaseException, code: int) -> str:
    """The one line on stderr, after the program name."""
    if code == os.EX_USAGE:
        return str(exc)
    if code == os.EX_CONFIG:
        return f"not sent: configuration error: {exc}; the administrator must fix it"
    return f"not sent: {exc}"
