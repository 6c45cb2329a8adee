"""The mail's life as one call: (options, message bytes, caller) -> verdict.

The ``sendmail`` command, the ``-bs`` dialogue and the gate all call
``submit``; none of them decides anything itself.
"""

from __future__ import annotations

import os
import socket
import time
import traceback
from dataclasses import dataclass, field

from . import envelope as envelope_stage
from . import exitcodes, maillog
from . import message as message_stage
from .config import Config
from .invocation import Invocation
from .relay import RelayResult, Upstream


@dataclass(frozen=True)
class Caller:
    """Who is sending: learned from the process (in-process) or the kernel (gate)."""

    uid: int
    user: str | None = None
    pid: int | None = None

    @classmethod
    def current(cls) -> Caller:
        return cls(uid=os.getuid(), user=_user_name(os.getuid()), pid=os.getpid())


def _user_name(uid: int) -> str | None:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


@dataclass(frozen=True)
class Verdict:
    """What happened: the exit code, the stderr line and the -bs reply."""

    code: int
    line: str | None = None
    smtp_code: int = 250
    smtp_text: str = "2.0.0 accepted"
    fields: dict[str, object] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.code == os.EX_OK


class Runtime:
    """Configuration plus what is worth keeping warm between messages (the gate)."""

    def __init__(self, config: Config, *, in_gate: bool = False) -> None:
        self.config = config
        self.in_gate = in_gate  # callers are then strangers: bound to a customer unless allowed
        self.upstream = Upstream(config.upstream, config.path)
        self.hostname = socket.gethostname()


def submit(invocation: Invocation, raw: bytes, caller: Caller, runtime: Runtime) -> Verdict:
    """Run one message through every stage and say what became of it."""
    started = time.monotonic()
    fields: dict[str, object] = {"uid": caller.uid, "user": caller.user, "size": len(raw)}
    try:
        cfg = runtime.config.message
        message = message_stage.parse(raw, invocation.ignore_dots, cfg.qualify_domain)
        envelope = envelope_stage.build(invocation, message, cfg.qualify_domain, cfg.max_recipients)
        fields.update(sender=envelope.sender.key, rcpts=len(envelope.recipients))
        message_stage.complete(message, envelope.sender, invocation.full_name, _trace(runtime, caller))
        fields["msgid"] = message.message_id
        # From here on only the upstream decides.
        result = runtime.upstream.send(envelope, message)
        verdict = _sent(result, fields)
    except Exception as exc:  # every refusal becomes a verdict; nothing escapes to a traceback
        verdict = _refused(exc, fields)
    verdict.fields["ms"] = round((time.monotonic() - started) * 1000)
    maillog.write(runtime.config.log, verdict.fields, "info" if verdict.ok else "notice")
    return verdict


def _trace(runtime: Runtime, caller: Caller) -> str:
    who = f"userid {caller.uid}" + (f" ({caller.user})" if caller.user else "")
    return f"by {runtime.hostname} (sendmail-shim, from {who})"


def _sent(result: RelayResult, fields: dict[str, object]) -> Verdict:
    fields.update(verdict="sent", code=0, upstream=f"{result.code} {result.text}")
    return Verdict(os.EX_OK, None, 250, f"2.0.0 sent ({result.text})"[:400], fields)


def _refused(exc: Exception, fields: dict[str, object]) -> Verdict:
    code = exitcodes.exit_code_for(exc)
    if code == os.EX_SOFTWARE:
        reference = os.urandom(4).hex()
        fields["ref"] = reference
        fields["trace"] = "".join(traceback.format_exception(exc)).strip()[-1500:]
        exc = RuntimeError(
            f"internal error (reference {reference}); the administrator can find it in the mail log"
        )
    line = exitcodes.stderr_line(exc, code)
    smtp_code, status = exitcodes.smtp_reply_for(exc, code)
    fields.update(verdict="refused", code=code, stage=type(exc).__name__, reason=str(exc))
    return Verdict(code, line, smtp_code, f"{status} {exc}"[:400], fields)


def refuse(exc: Exception, caller: Caller, runtime: Runtime) -> Verdict:
    """A refusal that happened before ``submit`` (such as reading stdin), logged the same way."""
    verdict = _refused(exc, {"uid": caller.uid, "user": caller.user})
    maillog.write(runtime.config.log, verdict.fields, "notice")
    return verdict
