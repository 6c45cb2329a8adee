"""One log line per decision: syslog (mail facility), ``key=value`` fields.

Values are escaped so that a hostile subject, address or name can never
start a second log record or hide a field (no CR, LF, ESC or quotes pass raw).

Repeated refusals are capped per caller: a site that floods the gate with
mail it may not send gets ``[log] repeat_limit`` lines per reason and uid in
each ``repeat_window``, then one summary line. The decision rows in the
ledger stay complete; only the log is limited.
"""

from __future__ import annotations

import atexit
import os
import stat
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TextIO

from .config import Config, ConfigError, LogConfig

_opened = False
PRIORITIES = {"info": 6, "notice": 5, "warning": 4, "err": 3}
MAX_REPEAT_KEYS = 4096  # uid and reason pairs tracked at once: the table's memory is bounded
FAILURE_REPORT_INTERVAL = 60.0  # a log file that cannot be written is reported this often at most
DELIVERED = ("sent", "queued")  # verdicts an admin needs every line of: never suppressed


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
    """Log one decision to syslog and, when configured, to ``[log] file`` (unless it repeats too often)."""
    allowed, summaries = _repeats.admit(fields, config.repeat_limit, config.repeat_window)
    for summary in summaries:
        _emit(config, summary, "notice")
    if allowed:
        _emit(config, fields, priority)
    else:
        _flush_at_exit(config)


def flush(config: LogConfig, *, everything: bool = False) -> None:
    """Write the summary lines of windows that have ended (``everything``: of all windows, now)."""
    for summary in _repeats.due(config.repeat_window, everything=everything):
        _emit(config, summary, "notice")


def _emit(config: LogConfig, fields: Mapping[str, object], priority: str) -> None:
    line = format_fields(fields)
    if config.syslog:
        _syslog(line, PRIORITIES.get(priority, 6))
    if config.file:
        stamp = time.strftime("%Y-%m-%dT%H:%M:%S%z")
        try:
            with _open_for_append(config.file) as handle:
                handle.write(f"{stamp} {priority} {line}\n")
        except OSError as exc:  # the log must never turn a decision into a failure: say so elsewhere
            _file_failures.failed(config.file, exc, in_syslog=config.syslog)


def _open_for_append(path: str) -> TextIO:
    """``path`` opened to append, created (mode 0640) if missing."""
    flags = os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC
    try:
        fd = os.open(path, flags)
    except FileNotFoundError:
        fd = os.open(path, flags | os.O_CREAT, 0o640)
        _give_to_directory_owner(fd, path)
    return os.fdopen(fd, "a", encoding="utf-8")


def _give_to_directory_owner(fd: int, path: str) -> None:
    """A file root just created belongs to its directory's owner: the gate's user must go on
    writing it after root (``queue run`` by hand) wrote the first line after a rotation."""
    if os.geteuid() != 0 or os.fstat(fd).st_uid != 0:
        return
    directory = os.stat(os.path.dirname(os.path.abspath(path)))
    if directory.st_uid != 0:
        os.fchown(fd, directory.st_uid, directory.st_gid)


def _syslog(line: str, priority: int) -> None:
    global _opened
    import syslog

    if not _opened:
        syslog.openlog("sendmail-shim", syslog.LOG_PID, syslog.LOG_MAIL)
        _opened = True
    syslog.syslog(priority, line)


# ------------------------------------------------------------------ repeated lines


def repeat_key(fields: Mapping[str, object]) -> tuple[object, str] | None:
    """What makes lines "similar": the caller's uid and the reason (None: never suppressed).

    A refusal's reason is its stage's exception class (its text differs by the
    second); other caller lines by their event. Sent and queued mail, and
    internal errors (whose reference the caller is told to quote), are all kept.
    """
    uid = fields.get("uid")
    if uid is None or fields.get("ref") is not None or fields.get("verdict") in DELIVERED:
        return None
    reason = fields.get("stage") if fields.get("verdict") == "refused" else fields.get("event")
    return (uid, str(reason)) if reason is not None else None


@dataclass
class _Window:
    started: float
    written: int = 1
    suppressed: int = 0


class Repeats:
    """Counts similar lines per window; says which to write, and the summaries that are due."""

    def __init__(self, clock: Callable[[], float] = time.monotonic, max_keys: int = MAX_REPEAT_KEYS) -> None:
        self.clock, self.max_keys = clock, max_keys
        self._windows: OrderedDict[tuple[object, str], _Window] = OrderedDict()  # oldest window first
        self._lock = threading.Lock()

    def admit(self, fields: Mapping[str, object], limit: int, window: float) -> tuple[bool, list[dict[str, object]]]:
        key = repeat_key(fields)
        if key is None or limit <= 0:
            return True, []
        with self._lock:
            now = self.clock()
            found = self._windows.get(key)
            if found is not None and now - found.started < window:
                if found.written < limit:
                    found.written += 1
                    return True, []
                found.suppressed += 1
                return False, []
            summaries = self._take_due(now, window, everything=False)
            # An ended window of this key was among those due (windows end in the order they started).
            if len(self._windows) >= self.max_keys:  # full of live windows: end the oldest early
                oldest = next(iter(self._windows))
                summaries += self._end(oldest, now - self._windows[oldest].started)
            self._windows[key] = _Window(now)
            return True, summaries

    def due(self, window: float, *, everything: bool = False) -> list[dict[str, object]]:
        with self._lock:
            return self._take_due(self.clock(), window, everything=everything)

    def _take_due(self, now: float, window: float, *, everything: bool) -> list[dict[str, object]]:
        summaries: list[dict[str, object]] = []
        while self._windows:
            key, oldest = next(iter(self._windows.items()))
            ended = now - oldest.started >= window
            if not (ended or everything):
                break  # windows are in the order they started: the rest are younger
            summaries += self._end(key, window if ended else now - oldest.started)
        return summaries

    def _end(self, key: tuple[object, str], seconds: float) -> list[dict[str, object]]:
        ended = self._windows.pop(key)
        if not ended.suppressed:
            return []
        uid, reason = key
        seconds = max(1, round(seconds))
        return [{"event": "log-suppressed", "uid": uid, "similar": reason, "suppressed": ended.suppressed,
                 "seconds": seconds,
                 "reason": f"suppressed {ended.suppressed} similar lines from uid {uid} in the last {seconds} s"}]


_repeats = Repeats()
_at_exit: dict[str, LogConfig] = {}


def _flush_at_exit(config: LogConfig) -> None:
    """Once a line is suppressed, its count is written before the process ends, whatever comes."""
    if not _at_exit:
        atexit.register(lambda: flush(_at_exit["config"], everything=True))
    _at_exit["config"] = config


# ------------------------------------------------------------------ a log file that cannot be written


class FileFailures:
    """Reports to syslog that ``[log] file`` cannot be written: at once, then at most once a minute."""

    def __init__(self, clock: Callable[[], float] = time.monotonic,
                 report: Callable[[str, int], None] = _syslog) -> None:
        self.clock, self.report = clock, report
        self._last: float | None = None
        self._since = 0  # failed writes not yet reported
        self._lock = threading.Lock()

    def failed(self, path: str, exc: OSError, *, in_syslog: bool) -> None:
        """Count one failed write; report it unless one was reported in the last minute.

        ``in_syslog``: whether the decisions go to syslog too, which the report says.
        """
        with self._lock:
            self._since += 1
            now = self.clock()
            if self._last is not None and now - self._last < FAILURE_REPORT_INTERVAL:
                return
            self._last, count, self._since = now, self._since, 0
        line = format_fields({"event": "log-file-failed", "file": path, "failed_writes": count,
                              "reason": f"cannot write {path} ({exc.strerror or exc}); the decisions are in "
                                        f"the ledger (sendmail-shim log){' and in syslog' if in_syslog else ''}"})
        self.report(line, PRIORITIES["err"])


_file_failures = FileFailures()


def require_writable(config: Config, user: str) -> None:
    """Refuse (ConfigError) a ``[log] file`` that this process, running as ``user``, cannot append to."""
    if config.log.file:
        _require(config, user, open_problem(config.log.file))


def require_writable_by(config: Config, user: str, uid: int, gids: Sequence[int]) -> None:
    """The same on another user's behalf, by the modes of the file and its directories."""
    if config.log.file:
        _require(config, user, file_problem(config.log.file, uid, gids))


def _require(config: Config, user: str, problem: str | None) -> None:
    if problem is not None:
        raise ConfigError(config.path, "log.file",
                          f"{user} cannot write {config.log.file}: {problem}; choose a file in a directory "
                          f"that {user} owns (the packages make /var/log/sendmail-shim for it)")


def file_problem(path: str, uid: int, gids: Sequence[int]) -> str | None:
    """Why the user ``uid`` (in groups ``gids``) could not append to ``path`` by its modes (None: it could).

    For checking on another user's behalf (``config check`` as root for the
    gate's user); a process checking for itself opens the file (``open_problem``).
    """
    directory = os.path.dirname(os.path.abspath(path))
    problem = _path_problem(directory, uid, gids)
    if problem is not None:
        return problem
    try:
        info = os.stat(path)
    except FileNotFoundError:
        if not _may(os.stat(directory), uid, gids, stat.S_IWUSR):
            return f"it cannot create files in {directory} (mode {stat.S_IMODE(os.stat(directory).st_mode):04o})"
        return None
    except OSError as exc:
        return str(exc.strerror)
    if stat.S_ISDIR(info.st_mode):
        return f"{path} is a directory"
    if not _may(info, uid, gids, stat.S_IWUSR):
        return f"{path} is not writable by it (mode {stat.S_IMODE(info.st_mode):04o})"
    return None


def _path_problem(directory: str, uid: int, gids: Sequence[int]) -> str | None:
    """What stops ``uid`` from reaching into ``directory``: one on the way missing, or not to be entered."""
    for parent in [*reversed(_ancestors(directory)), directory]:
        try:
            found = os.stat(parent)
        except OSError as exc:
            return f"{parent}: {exc.strerror}"
        if not stat.S_ISDIR(found.st_mode):
            return f"{parent} is not a directory"
        if not _may(found, uid, gids, stat.S_IXUSR):
            return f"{parent} cannot be entered by it (mode {stat.S_IMODE(found.st_mode):04o})"
    return None


def _ancestors(directory: str) -> list[str]:
    found = []
    while directory != "/":
        directory = os.path.dirname(directory)
        found.append(directory)
    return found


def _may(info: os.stat_result, uid: int, gids: Sequence[int], owner_bit: int) -> bool:
    """Whether the owner, group or other bit (``owner_bit`` shifted) grants ``uid`` the access."""
    if uid == 0:
        return True
    if info.st_uid == uid:
        return bool(info.st_mode & owner_bit)
    if info.st_gid in gids:
        return bool(info.st_mode & (owner_bit >> 3))
    return bool(info.st_mode & (owner_bit >> 6))


def open_problem(path: str) -> str | None:
    """Why this process cannot append to ``path`` (None: it can; the file is created if missing)."""
    try:
        with _open_for_append(path):
            return None
    except OSError as exc:
        return str(exc.strerror or exc)
