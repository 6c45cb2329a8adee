"""The sendmail command line: what real clients pass, and nothing more.

Options follow getopt rules (``-ti`` is ``-t -i``; an option that takes a
value takes the rest of its word or the next word) and stop at ``--`` or the
first operand; every operand is a recipient address list. Nothing named on
the command line is ever read, written or run: options that would (``-C``,
``-X``, ``-be``, ``-q``, …) are refused with exit 64.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field


class UsageError(Exception):
    """A bad or refused option (exit 64)."""


# Accepted and ignored, as msmtp, Postfix and dma accept them. One list: --help
# and the man page print it, and the parser consults nothing else.
IGNORED_OPTIONS: tuple[tuple[str, bool, str], ...] = (
    # (letter, takes a value, what it is)
    ("o", True, "-oX  sendmail options such as -oem, -odi, -odb (-oi is honoured)"),
    ("O", True, "-O option=value  sendmail options"),
    ("v", False, "-v  verbose (never writes to stdout)"),
    ("G", False, "-G  gateway submission"),
    ("U", False, "-U  initial user submission"),
    ("L", True, "-L tag  syslog tag"),
    ("h", True, "-h N  hop count"),
    ("A", True, "-Am, -Ac  submission or MTA mode"),
)

HONOURED_OPTIONS: tuple[tuple[str, str], ...] = (
    ("-t", "read recipients from To, Cc and Bcc (or Resent-*), adding any given as arguments"),
    ("-i, -oi", "a line holding only '.' does not end the message"),
    ("-f ADDR, -fADDR, -r ADDR", "envelope sender (the sending account)"),
    ("-F NAME", "full name for a From header built from the envelope sender"),
    ("-bm", "deliver a message read from stdin (the default)"),
    ("-bs", "speak SMTP on stdin and stdout"),
    ("-B 7BIT|8BITMIME", "body type"),
    ("-N NOTIFY, -R RET, -V ENVID", "delivery status notification requests"),
    ("--", "end of options"),
)

# Refused outright: each would read or write a caller-chosen file, run
# something, or do something other than send one message.
REFUSED_OPTIONS: dict[str, str] = {
    "C": "-C would read a caller-chosen configuration file",
    "X": "-X would write a caller-chosen log file",
    "q": "-q would run the queue; an admin uses 'sendmail-shim queue run'",
    "d": "-d debugging is not available",
    "I": "-I (newaliases) is not available",
}

_VALUE_OPTIONS = {"f", "r", "F", "b", "B", "N", "R", "V"} | {
    letter for letter, takes_value, _ in IGNORED_OPTIONS if takes_value
}
_FLAG_OPTIONS = {"t", "i"} | {letter for letter, takes_value, _ in IGNORED_OPTIONS if not takes_value}
_IGNORED = {letter for letter, _, _ in IGNORED_OPTIONS}


@dataclass(frozen=True)
class Invocation:
    """What the command line asks for."""

    mode: str = "deliver"  # deliver | smtp | help | version
    extract_recipients: bool = False
    ignore_dots: bool = False
    sender: str | None = None
    full_name: str | None = None
    body_type: str | None = None
    dsn_notify: str | None = None
    dsn_ret: str | None = None
    dsn_envid: str | None = None
    recipients: tuple[str, ...] = ()
    ignored: tuple[str, ...] = field(default=())


def parse_argv(argv: list[str], program: str = "sendmail") -> Invocation:
    """Parse argv (without argv[0]); raise UsageError on anything refused."""
    name = os.path.basename(program)
    if name in ("mailq", "newaliases", "smtpd", "postqueue"):
        raise UsageError(f"{name} is not available: this program only sends mail")
    state: dict[str, object] = {}
    ignored: list[str] = []
    index = 0
    while index < len(argv):
        word = argv[index]
        if word == "--":
            index += 1
            break
        if word in ("--help", "--version"):
            return Invocation(mode=word[2:])
        if not word.startswith("-") or word == "-":
            break
        if word.startswith("--"):
            raise UsageError(f"unknown option {_show(word)}; see sendmail --help")
        index = _parse_cluster(argv, index, state, ignored)
    recipients = tuple(argv[index:])
    return _build(state, recipients, tuple(ignored))


def _parse_cluster(argv: list[str], index: int, state: dict[str, object], ignored: list[str]) -> int:
    """Parse one ``-xyz`` word (and the next word if it supplies a value)."""
    word = argv[index]
    pos = 1
    while pos < len(word):
        letter = word[pos]
        if letter in REFUSED_OPTIONS:
            raise UsageError(f"option -{letter} is refused: {REFUSED_OPTIONS[letter]}")
        if letter in _FLAG_OPTIONS:
            if letter in _IGNORED:
                ignored.append("-" + letter)
            else:
                state[letter] = True
            pos += 1
            continue
        if letter not in _VALUE_OPTIONS:
            raise UsageError(f"unknown option -{_show(letter)}; see sendmail --help")
        value = word[pos + 1:]
        if not value:
            index += 1
            if index >= len(argv):
                raise UsageError(f"option -{letter} needs a value")
            value = argv[index]
        _take_value(letter, value, state, ignored)
        break
    return index + 1


def _take_value(letter: str, value: str, state: dict[str, object], ignored: list[str]) -> None:
    if any(ord(c) < 32 or ord(c) == 127 for c in value):
        raise UsageError(f"option -{letter}: control characters (such as a line break) are not allowed")
    if letter == "o" and value == "i":
        state["i"] = True
    elif letter in _IGNORED:
        ignored.append(f"-{letter}{value}"[:64])
    elif letter in ("f", "r"):
        state["f"] = value
    elif letter == "b":
        _take_mode(value, state)
    else:
        state[letter] = _checked_value(letter, value)


def _take_mode(value: str, state: dict[str, object]) -> None:
    if value == "m":
        state["b"] = "deliver"
    elif value == "s":
        state["b"] = "smtp"
    else:
        raise UsageError(f"mode -b{_show(value)} is refused: only -bm (send) and -bs (SMTP) are available")


def _checked_value(letter: str, value: str) -> str:
    if letter == "F":
        if len(value) > 200:
            raise UsageError("option -F: the full name is longer than 200 characters")
        return value
    if letter == "B":
        body = value.upper()
        if body not in ("7BIT", "8BITMIME"):
            raise UsageError(f"option -B takes 7BIT or 8BITMIME, not {_show(value)}")
        return body
    if letter == "N":
        notify = value.lower()
        parts = notify.split(",")
        if notify != "never" and not all(p in ("success", "failure", "delay") for p in parts):
            raise UsageError(f"option -N takes never or a list of success,failure,delay, not {_show(value)}")
        return notify.upper()
    if letter == "R":
        if value.lower() not in ("full", "hdrs"):
            raise UsageError(f"option -R takes full or hdrs, not {_show(value)}")
        return value.upper()
    # -V: the envelope id goes on the wire as xtext; keep it short and printable.
    if not (0 < len(value) <= 100 and value.isascii() and value.isprintable() and " " not in value):
        raise UsageError("option -V takes a printable envelope id of at most 100 characters")
    return value


def _build(state: dict[str, object], recipients: tuple[str, ...], ignored: tuple[str, ...]) -> Invocation:
    mode = str(state.get("b", "deliver"))
    extract = bool(state.get("t", False))
    if mode == "deliver" and not extract and not recipients:
        raise UsageError("no recipients: give them as arguments, or use -t to read them from the headers")
    if mode == "smtp" and (recipients or extract):
        raise UsageError("-bs takes its recipients from the SMTP dialogue, not from arguments or -t")
    return Invocation(
        mode=mode,
        extract_recipients=extract,
        ignore_dots=bool(state.get("i", False)),
        sender=_opt(state, "f"),
        full_name=_opt(state, "F"),
        body_type=_opt(state, "B"),
        dsn_notify=_opt(state, "N"),
        dsn_ret=_opt(state, "R"),
        dsn_envid=_opt(state, "V"),
        recipients=recipients,
        ignored=ignored,
    )


def _opt(state: dict[str, object], key: str) -> str | None:
    value = state.get(key)
    return None if value is None else str(value)


def _show(text: str) -> str:
    """An argument echoed back in an error line: printable and short."""
    cleaned = "".join(c if c.isprintable() else "?" for c in text)
    return repr(cleaned[:40])[1:-1]


def help_text() -> str:
    lines = [
        "usage: sendmail [options] [--] [recipient ...]",
        "",
        "Reads a message on stdin and relays it through the provider's upstream after",
        "checking the sending account, its SPF record and its rate limits.",
        "",
        "Honoured options:",
    ]
    lines += [f"  {flag:<28} {what}" for flag, what in HONOURED_OPTIONS]
    lines += ["", "Accepted and ignored:"]
    lines += [f"  {what}" for _, _, what in IGNORED_OPTIONS]
    lines += ["", "Refused (exit 64):"]
    lines += [f"  -{letter}  {why}" for letter, why in REFUSED_OPTIONS.items()]
    lines += ["  -b modes other than -bm and -bs (-be, -bd, -bi, -bp, -bt, -bv, ...)", "  any other option"]
    lines += [
        "",
        "Exit status: 0 sent (or durably queued), 64 usage, 65 bad message, 66 empty input,",
        "67 unknown account or no valid recipient, 69 limit reached or upstream refused or",
        "unavailable, 70 internal error, 77 not permitted, 78 configuration error.",
        "",
        "Example: printf 'Subject: hi\\n\\nhello\\n' | sendmail -f post@kunde.example ola@example.org",
    ]
    return "\n".join(lines) + "\n"
