"""The ``sendmail`` command: a thin front end to the pipeline.

It parses argv, reads the config, reads stdin and prints the verdict: one
line on stderr and the exit code. It never writes to stdout except in
``-bs`` mode and for ``--help``/``--version`` (PHP passes our stdout through
to the web page).
"""

from __future__ import annotations

import os
import sys

from . import __version__, exitcodes

TYPE_CHECKING = False
if TYPE_CHECKING:
    from typing import BinaryIO, TextIO

    from .accounts import Caller
    from .config import Config
    from .invocation import Invocation
    from .pipeline import Runtime

PROGRAM = "sendmail"


def main() -> None:
    # The shared-hosting path first: it needs neither the config module nor the argv parser.
    from .gate_client import run_fast

    args = (sys.argv[0], sys.argv[1:], sys.stdin.buffer, sys.stdout.buffer, sys.stderr)
    code = run_fast(*args)
    if code is None:
        code = run(*args)
    sys.stderr.flush()
    sys.exit(code)


def run(program: str, args: list[str], stdin: BinaryIO, stdout: BinaryIO, stderr: TextIO) -> int:
    from .config import ConfigError, load
    from .invocation import UsageError, help_text, parse_argv

    try:
        invocation = parse_argv(args, program)
    except UsageError as exc:
        code = exitcodes.exit_code_for(exc)
        _usage_logged(args, str(exc), code)
        return _say(stderr, exitcodes.stderr_line(exc, code), code)
    if invocation.mode == "help":
        stdout.write(help_text().encode())
        return os.EX_OK
    if invocation.mode == "version":
        stdout.write(f"sendmail-shim {__version__}\n".encode())
        return os.EX_OK
    try:
        config = load()
    except ConfigError as exc:
        code = exitcodes.exit_code_for(exc)
        return _say(stderr, exitcodes.stderr_line(exc, code), code)
    if config.gate.socket:
        # The shared-hosting path: hand the message to the gate; hold no secrets, open no ledger.
        from .gate_client import run_via_gate

        return run_via_gate(invocation, config, stdin, stdout, stderr, [program, *args])
    return _in_process(invocation, config, stdin, stdout, stderr)


def _in_process(invocation: Invocation, config: Config, stdin: BinaryIO, stdout: BinaryIO, stderr: TextIO) -> int:
    from .pipeline import Caller, Runtime, refuse, submit

    runtime = Runtime(config)
    caller = _with_origin(Caller.current())
    if invocation.mode == "smtp":
        return _smtp_session(invocation, stdin, stdout, caller, runtime)
    from .message import MessageError, read_input

    try:
        raw = read_input(stdin, config.message.max_size)
    except MessageError as exc:
        verdict = refuse(exc, caller, runtime)
    else:
        verdict = submit(invocation, raw, caller, runtime)
    return _say(stderr, verdict.line, verdict.code) if verdict.line else verdict.code


def _with_origin(caller: Caller) -> Caller:
    """In-process, the program behind sendmail is of the same uid: its executable is readable."""
    import dataclasses

    from .origin import of_this_process

    found = of_this_process()
    return dataclasses.replace(caller, cwd=found.cwd, exe=found.exe)


def _smtp_session(invocation: Invocation, stdin: BinaryIO, stdout: BinaryIO, caller: Caller, runtime: Runtime) -> int:
    from .pipeline import submit
    from .stdio_session import Session

    def deliver(request: Invocation, raw: bytes) -> tuple[int, str]:
        verdict = submit(request, raw, caller, runtime)
        return verdict.smtp_code, verdict.smtp_text

    cfg = runtime.config.message
    return Session(invocation, stdin, stdout, deliver, hostname=runtime.hostname,
                   max_size=cfg.max_size, max_recipients=cfg.max_recipients).run()


def _say(stderr: TextIO, line: str | None, code: int) -> int:
    if line:
        stderr.write(f"{PROGRAM}: {line}\n")
    return code


def _usage_logged(args: list[str], reason: str, code: int) -> None:
    """A refused option is worth a log line: it is how -X/-C/-be probes show up."""
    from . import maillog
    from .config import LogConfig

    shown = " ".join(args)[:300]
    maillog.write(LogConfig(), {"verdict": "refused", "code": code, "uid": os.getuid(),
                                "reason": reason, "argv": shown}, "notice")
