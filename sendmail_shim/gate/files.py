"""The files the gate guards: its secrets and its ledger must be its own."""

from __future__ import annotations

import os
import re
import stat

from ..config import Config, check_private_file
from .errors import ExposedSecret

_PASSWORD_IN_URL = re.compile(r"^[^:/]+://[^/@:]*:[^/@]+@|[?&]password=", re.IGNORECASE)


# ------------------------------------------------------------------ files the gate guards


def check_private_files(config: Config) -> None:
    """Refuse to start when customers could read or change what the gate protects."""
    _check_ledger_file(config)
    if config.upstream.password_file:
        check_private_file(config.path, "upstream.password_file", config.upstream.password_file)
    if _PASSWORD_IN_URL.search(config.ledger.url) and _mode(config.path) & stat.S_IROTH:
        raise ExposedSecret(
            f"{config.path} holds the ledger password in [ledger] url and every user can read it; "
            f"run: chmod 640 {config.path} (sendmail reads only [gate] from a file of its own), "
            f"or let PostgreSQL authenticate the gate's user without a password"
        )


def _check_ledger_file(config: Config) -> None:
    from ..ledger import Ledger

    ledger = Ledger(config.ledger.url)
    if ledger.dialect != "sqlite" or not os.path.exists(ledger.where):
        return
    check_private_file(config.path, "ledger.url", ledger.where)
    directory = os.path.dirname(os.path.abspath(ledger.where))
    if _mode(directory) & (stat.S_IWGRP | stat.S_IWOTH):
        raise ExposedSecret(f"{directory}, the ledger's directory, is writable by other users; "
                            f"run: chmod 750 {directory}")


def _mode(path: str) -> int:
    try:
        return os.stat(path).st_mode
    except OSError:
        return 0
