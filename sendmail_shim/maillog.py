"""One log line per decision: syslog (mail facility), ``key=value`` fields.

Values are escaped so that a hostile subject, address or name can never
start a second log record or hide a field (no CR, LF, ESC or quotes pass raw).
"""

from __future__ import annotations

import time
from collections.abc import Mapping

from .config import LogConfig

_opened = False
PRIORITIES = {"info": 6, "notice": 5, "warning": 4, "err": 3}


def format_fields(fields: Mapping[str, object]) -> str:
    return " ".join(f"{key}={_value(value)}" for key, value in fields.items() if value is not None)


def _value(value: object) -> str:
    text = value if isinstance(value, str) else str(value)
    escaped = "".join(_escape(c) for c in text[:500])
    if not escaped or any(c in escaped for c in ' ="'):
        return '"' + escaped.replace('"', '\\"') + '"'
    return escaped


def _escape(char: str) -> str:
    if char == "\\":
        return "\\\\"
    if char.isprintable():
        return char
    return char.encode("unicode_escape").decode("ascii")


def write(config: LogConfig, fields: Mapping[str, object], priority: str = "info") -> None:
    """Log one decision to syslog and, when configured, to ``[log] file``."""
    line = format_fields(fields)
    if config.syslog:
        _syslog(line, PRIORITIES.get(priority, 6))
    if config.file:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        try:
            with open(config.file, "a", encoding="utf-8") as handle:
                handle.write(f"{stamp} {priority} {line}\n")
        except OSError:
            pass  # the log must never turn a decision into a failure


def _syslog(line: str, priority: int) -> None:
    global _opened
    import syslog

    if not _opened:
        syslog.openlog("sendmail-shim", syslog.LOG_PID, syslog.LOG_MAIL)
        _opened = True
    syslog.syslog(priority, line)
