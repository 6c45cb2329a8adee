"""Which program sent the message: the caller's process, best effort, from ``/proc``.

The process that runs ``sendmail`` is rarely the one an admin looks for:
PHP's ``mail()`` runs ``sh -c "/usr/sbin/sendmail -t -i"``, so the gate's
``SO_PEERCRED`` pid is the ``sendmail`` client and its parent a shell. The
walk goes up the parent chain (``/proc/PID/stat``, readable by everyone)
past the client and the shells to the first other process -- ``php8.2``,
``php-fpm``, ``perl``, ``cron`` -- at most ``MAX_STEPS`` steps, and records
that one.

What is recorded, and why:

- ``exe``: the program's command line (``/proc/PID/cmdline``, readable by
  everyone), e.g. ``php /srv/site-a/cron.php`` or ``/bin/sh ./backup.sh``:
  for an interpreter it names the script too, where the executable's path
  (``/usr/bin/php8.2``) would not, and the gate and in-process ``sendmail``
  record the same thing. The path (``readlink /proc/PID/exe``) is the
  fallback for a process without one. Linux lets a process read that link
  and the working directory of its own uid only; the gate runs as its own
  user and is not given ``CAP_SYS_PTRACE`` to read more: that capability
  would let a compromised gate read and trace the memory of every process
  on the server, root's included.
- ``cwd``: the working directory, under the same rule: in-process
  ``sendmail`` records its own (a PHP site's directory); the gate records
  none.
- Either is absent when the process is gone (it exited, or its pid is
  hidden by ``/proc``'s ``hidepid``), and a pid may have been reused by the
  time it is read: this is a hint for the admin, never evidence and never a
  reason to refuse a message.
"""

from __future__ import annotations

import os
import unicodedata
from dataclasses import dataclass

MAX_STEPS = 5  # parents looked at past the caller itself: a shell or two, a wrapper, then the program
MAX_TEXT = 300  # characters kept of a path or command line (it is the caller's to make long)
# Programs that only pass a message on: the sendmail clients, shells and the usual wrappers.
PASS_THROUGH = frozenset({"sendmail", "sendmail-shim", "sh", "dash", "bash", "ash", "zsh", "busybox",
                          "env", "nice", "nohup", "timeout", "flock", "chronic", "ionice", "setsid"})


@dataclass(frozen=True)
class Origin:
    """The sending program's working directory and executable (or command line); None: unknown."""

    cwd: str | None = None
    exe: str | None = None


def of_peer(pid: int | None) -> Origin:
    """The gate's caller: ``pid`` is the ``sendmail`` client, so the walk starts at its parent."""
    if pid is None or pid <= 1:
        return Origin()
    parent = _ppid(pid)
    program = _program(parent) if parent is not None else None
    if program is None:
        return Origin()
    return Origin(cwd=_link(program, "cwd"), exe=_executable(program))


def of_this_process() -> Origin:
    """In-process ``sendmail``: its own working directory, and the program that ran it."""
    try:
        cwd: str | None = clean(os.getcwd())
    except OSError:  # the directory was removed under it
        cwd = None
    program = _program(os.getppid())
    return Origin(cwd=cwd, exe=_executable(program) if program is not None else None)


def clean(text: str, limit: int = MAX_TEXT) -> str | None:
    """One line of at most ``limit`` characters: control and format characters become ``?``.

    Format characters (bidirectional overrides, zero-width spaces) go too: a
    script name must read in a terminal as it will be matched.
    """
    cut = text[:limit]
    shown = "".join("?" if unicodedata.category(c)[0] == "C" else c for c in cut.replace("\t", " "))
    return shown.strip() or None


def _program(pid: int) -> int | None:
    """The first process from ``pid`` up that is not a sendmail client, shell or wrapper."""
    for _ in range(MAX_STEPS):
        if pid <= 1:
            return None  # init: the real parent is gone, and pid 1 would only mislead
        stat = _stat(pid)
        if stat is None:
            return None
        name, parent = stat
        if name not in PASS_THROUGH:
            return pid
        pid = parent
    return None


def _stat(pid: int) -> tuple[str, int] | None:
    """(command name, parent pid) from ``/proc/PID/stat``; None when the process is gone or a zombie."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as handle:
            text = handle.read(1024)
    except OSError:
        return None
    # "PID (NAME) STATE PPID ...": the name may itself hold ")" and spaces, so split at the last one.
    head, _, rest = text.rpartition(b")")
    fields = rest.split()
    if not head or len(fields) < 2 or not fields[1].isdigit() or fields[0] in (b"Z", b"X"):
        return None  # a zombie has exited: its parent link no longer says who ran it
    return head.partition(b"(")[2].decode("utf-8", "replace"), int(fields[1])


def _ppid(pid: int) -> int | None:
    stat = _stat(pid)
    return stat[1] if stat is not None else None


def _link(pid: int, name: str) -> str | None:
    try:
        return clean(os.readlink(f"/proc/{pid}/{name}"))
    except OSError:  # EACCES for another uid's process (no CAP_SYS_PTRACE), ENOENT once it is gone
        return None


def _executable(pid: int) -> str | None:
    """The command line (argv joined by spaces), else the executable's path if readable."""
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as handle:
            argv = handle.read(MAX_TEXT * 4)
    except OSError:
        argv = b""
    line = clean(b" ".join(argv.rstrip(b"\0").split(b"\0")).decode("utf-8", "replace"))
    return line if line is not None else _link(pid, "exe")
