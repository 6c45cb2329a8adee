"""Why the gate will not start: one family, mapped to exit codes by ``exitcodes``."""

from __future__ import annotations


class GateError(Exception):
    """The gate cannot start. ``str(exc)`` is the one line the admin sees."""


class SocketInUse(GateError):
    """Another gate already answers on the socket."""


class UnsafeSocketPlace(GateError):
    """The socket cannot be created, or could be replaced by other users."""


class ExposedSecret(GateError):
    """A file the gate protects can be read or changed by other users."""


class ActivationError(GateError):
    """systemd handed over something that is not a UNIX stream socket."""


class RootRefused(GateError):
    """Started as root without a user to become, or told to become a user it cannot."""


class LedgerNotReady(GateError):
    """The ledger's schema is not this version's."""


class MetricsUnavailable(GateError):
    """``[metrics] listen`` is set, and the gate cannot listen there."""
