"""An in-memory Resolver answering from an SPF test suite's ``zonedata``.

It follows the suite README's rules: SPF entries are served as TXT unless the
name has TXT entries of its own (``TXT: NONE`` adds none but still counts);
``TIMEOUT`` makes queries for types not listed before it time out; a name not
in the data is NXDOMAIN, a listed name without the type is NODATA; CNAMEs are
followed and loops end in a DNS error; names compare case-insensitively.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Mapping, Sequence
from typing import Any

from sendmail_shim.dnsclient import DnsAnswer, DnsTemporaryError

TTL = 3600
MAX_CNAME_CHAIN = 10


def octets(text: str) -> bytes:
    """Zone strings stand for octets: ``\\xNN`` escapes in YAML are raw bytes."""
    return text.encode("latin-1") if all(ord(c) < 256 for c in text) else text.encode()


def normalise(name: str) -> str:
    return name.rstrip(".").lower()


class ZoneResolver:
    def __init__(self, zonedata: Mapping[str, Sequence[Any]]) -> None:
        self.zone = {normalise(name): list(entries or []) for name, entries in zonedata.items()}
        self.queries: list[tuple[str, str]] = []

    def lookup(self, name: str, rdtype: str, *, timeout: float | None = None) -> DnsAnswer:
        self.queries.append((normalise(name), rdtype))
        current = normalise(name)
        for _ in range(MAX_CNAME_CHAIN):
            if current not in self.zone:
                return DnsAnswer(nxdomain=True, ttl=TTL)
            entries = self._answerable(current, rdtype, name)
            alias = [value for kind, value in entries if kind == "CNAME"]
            if alias and rdtype != "CNAME":
                current = normalise(str(alias[0]))
                continue
            return DnsAnswer(self._records(entries, rdtype), ttl=TTL)
        raise DnsTemporaryError("CNAME loop", name, rdtype)

    def _answerable(self, name: str, rdtype: str, asked: str) -> list[tuple[str, Any]]:
        """(type, value) pairs usable for this query; raise for a TIMEOUT marker."""
        pairs: list[tuple[str, Any]] = []
        for entry in self.zone[name]:
            if entry == "TIMEOUT":
                if not self._records(pairs, rdtype) and not _has(pairs, "CNAME"):
                    raise DnsTemporaryError("DNS did not answer", asked, rdtype)
                break
            (kind, value), = entry.items()
            pairs.append((kind.upper(), value))
        return pairs

    def _records(self, pairs: list[tuple[str, Any]], rdtype: str) -> tuple[Any, ...]:
        if rdtype == "TXT":
            kind = "TXT" if _has(pairs, "TXT") else "SPF"
            return tuple(_txt(value) for k, value in pairs if k == kind and value != "NONE")
        values = [value for kind, value in pairs if kind == rdtype]
        if rdtype in ("A", "AAAA"):
            return tuple(str(ipaddress.ip_address(value)) for value in values)
        if rdtype == "MX":
            return tuple((int(pref), normalise(str(host))) for pref, host in values)
        return tuple(normalise(str(value)) for value in values)


def _has(pairs: list[tuple[str, Any]], kind: str) -> bool:
    return any(k == kind for k, _ in pairs)


def _txt(value: Any) -> tuple[bytes, ...]:
    strings = [value] if isinstance(value, str) else list(value)
    return tuple(octets(part) for part in strings)
