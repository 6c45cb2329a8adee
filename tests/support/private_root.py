"""Tests never touch the machine's own installation: the default places, made private.

``private_root()`` is the prefix that runs a command under ``scripts/private-root``,
where /etc/sendmail-shim, /var/lib/sendmail-shim and /run/sendmail-shim are empty
tmpfs directories of a mount namespace of its own. A test that must exercise the
defaults (the shipped config names the default socket) runs its command that way.
``make test`` runs the whole suite under ``scripts/private-root --decoy``: a fake gate
listens on the default socket and the run fails if anything reaches it.
"""

from __future__ import annotations

import os
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[2] / "scripts" / "private-root"
DEFAULT_PLACES = ("/etc/sendmail-shim", "/var/lib/sendmail-shim", "/run/sendmail-shim")


def private_root(*, decoy: bool = False) -> list[str]:
    return [str(SCRIPT), *(["--decoy"] if decoy else [])]


def running_under() -> str:
    """``decoy`` (make test), ``private`` (one command), ``none`` (no namespaces here) or ``""`` (not at all)."""
    return os.environ.get("SENDMAIL_SHIM_PRIVATE_ROOT", "")
