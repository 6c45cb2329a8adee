"""SPF verdicts kept in the ledger, shared by every process and server using it."""

from __future__ import annotations

import time

from .errors import LedgerError
from .store import Store

EXPIRED_KEPT = 3600  # seconds an expired verdict may linger before a write sweeps it


class SqlSpfCache:
    """A cache that cannot be read or written behaves as a miss: SPF is then checked afresh."""

    def __init__(self, store: Store) -> None:
        self.store = store

    def get(self, domain: str, ip: str, now: float) -> str | None:
        try:
            with self.store.read() as tx:
                rows = tx.rows(
                    "SELECT result FROM spf_cache WHERE domain = :d AND ip = :i AND expires_at > :t",
                    {"d": domain, "i": ip, "t": now},
                )
        except LedgerError:
            return None
        return str(rows[0][0]) if rows else None

    def put(self, domain: str, ip: str, result: str, expires_at: float) -> None:
        try:
            with self.store.write() as tx:
                tx.run(
                    "INSERT INTO spf_cache (domain, ip, result, expires_at) VALUES (:d, :i, :r, :e) "
                    "ON CONFLICT (domain, ip) DO UPDATE SET result = excluded.result, "
                    "expires_at = excluded.expires_at",
                    {"d": domain, "i": ip, "r": result, "e": expires_at},
                )
                tx.run("DELETE FROM spf_cache WHERE expires_at < :t", {"t": time.time() - EXPIRED_KEPT})
        except LedgerError:
            pass
