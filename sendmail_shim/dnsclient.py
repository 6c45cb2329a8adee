"""DNS lookups for the SPF check, behind one small interface.

``Resolver.lookup(name, rdtype)`` returns a ``DnsAnswer`` whose records are plain
Python values, so the SPF evaluator never touches dnspython and tests can answer
from data. ``NetworkResolver`` is the production implementation on dnspython: it
asks the ``[spf] nameservers`` (or the servers in /etc/resolv.conf) over UDP and
retries over TCP when an answer comes back truncated.

This module is imported on the ``sendmail`` hot path, so dnspython is imported
only when a query is actually sent: a cached SPF verdict costs no DNS import.
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

RECORD_TYPES = ("A", "AAAA", "MX", "PTR", "TXT")
MAX_CNAME_HOPS = 8
DEFAULT_PORT = 53
EDNS_PAYLOAD = 1232  # the size the DNS flag day 2020 settled on: no IP fragmentation
RESOLV_CONF = "/etc/resolv.conf"
NO_ANSWER = "DNS did not answer"


class DnsError(Exception):
    """A DNS lookup failed; ``str(exc)`` says why in a few words."""


class DnsTemporaryError(DnsError):
    """No usable answer now (no reply, SERVFAIL, REFUSED, no server reachable).

    ``reason`` is a short phrase such as ``"DNS did not answer"`` for the user's
    stderr line; ``silent`` names the servers ("host:port") that gave no reply.
    """

    def __init__(self, reason: str, name: str = "", rdtype: str = "",
                 silent: Sequence[str] = ()) -> None:
        self.reason, self.name, self.rdtype = reason, name, rdtype
        self.silent = tuple(silent)
        where = f" ({rdtype} {name})" if name else ""
        super().__init__(reason + where)


class DnsAnswer(NamedTuple):
    """The records of one type at one name, after following CNAMEs.

    ``records`` holds, by type: TXT a tuple of byte strings per record (the
    record's character-strings, not yet joined); A/AAAA address strings; MX
    ``(preference, exchange)``; PTR domain names. Names carry no trailing dot.
    ``ttl`` is the smallest TTL involved (for a negative answer: the SOA's
    negative-caching TTL, 0 when the server gave none). ``nxdomain`` tells a
    name that does not exist from one without records of this type.
    """

    records: tuple[Any, ...] = ()
    ttl: int = 0
    nxdomain: bool = False

    @property
    def empty(self) -> bool:
        return not self.records


class Resolver(Protocol):
    """Anything that can answer a DNS question for the SPF check."""

    def lookup(self, name: str, rdtype: str, *, timeout: float | None = None) -> DnsAnswer:
        """Answer ``rdtype`` at ``name``; give up after ``timeout`` seconds.

        Raises ``DnsTemporaryError`` when no usable answer arrives in time.
        """
        ...


def system_nameservers(path: str = RESOLV_CONF) -> list[tuple[str, int]]:
    """The ``nameserver`` lines of resolv.conf; the local host when there are none."""
    servers: list[tuple[str, int]] = []
    try:
        with open(path, encoding="ascii", errors="replace") as handle:
            for line in handle:
                fields = line.split()
                if len(fields) >= 2 and fields[0] == "nameserver":
                    servers.append((fields[1].split("%", 1)[0], DEFAULT_PORT))
    except OSError:
        pass
    # Without a usable resolv.conf the C library asks the local host too.
    return servers or [("127.0.0.1", DEFAULT_PORT)]


class NetworkResolver:
    """Queries DNS servers with dnspython: UDP first, TCP when truncated.

    ``nameservers`` are (host, port) pairs asked in turn until one gives an
    answer; ``None`` means the servers of /etc/resolv.conf. Each server gets
    ``attempts`` tries per lookup, the first after ``first_attempt_timeout``
    seconds and each later one twice as long, so a silent server costs seconds,
    not the whole budget. ``timeout`` bounds one lookup (all servers and retries
    together); the ``timeout`` given to ``lookup`` can only shorten it.

    A server that gave no reply is remembered for ``timeout`` seconds (one SPF
    evaluation): later lookups ask the other servers first and give it a single
    short try, so one dead server does not cost its full wait on every lookup.
    An answer from it clears the mark.
    """

    first_attempt_timeout = 1.0
    attempts = 2

    def __init__(self, nameservers: Sequence[tuple[str, int]] | None = None,
                 timeout: float = 5.0) -> None:
        self._configured = list(nameservers) if nameservers else None
        self.timeout = timeout
        self._silent_since: dict[tuple[str, int], float] = {}

    @classmethod
    def from_config(cls, nameservers: Sequence[str], timeout: float) -> NetworkResolver:
        """For ``[spf] nameservers`` ("192.0.2.53", "127.0.0.1:5353", "[::1]:53");
        an empty list means the system's resolvers."""
        from .config import nameserver_address

        return cls([nameserver_address(text) for text in nameservers] or None, timeout=timeout)

    @property
    def nameservers(self) -> list[tuple[str, int]]:
        if self._configured is None:
            self._configured = system_nameservers()
        return list(self._configured)

    def silent_servers(self) -> list[tuple[str, int]]:
        """The servers that recently gave no reply (and have not answered since)."""
        now = time.monotonic()
        return [server for server in self.nameservers
                if now - self._silent_since.get(server, -math.inf) < self.timeout]

    def lookup(self, name: str, rdtype: str, *, timeout: float | None = None) -> DnsAnswer:
        if rdtype not in RECORD_TYPES:
            raise ValueError(f"unsupported record type {rdtype!r}")
        limit = self.timeout if timeout is None else min(self.timeout, timeout)
        deadline = time.monotonic() + limit
        qname = _wire_name(name)
        if qname is None:
            return DnsAnswer(nxdomain=True)  # no such name can exist in the DNS
        return self._resolve_chain(qname, rdtype, deadline, name)

    def _resolve_chain(self, qname: Any, rdtype: str, deadline: float, text: str) -> DnsAnswer:
        """Ask for ``qname``; when the answer stops at a CNAME target, ask for that."""
        ttls: list[int] = []
        seen: set[Any] = set()
        for _ in range(MAX_CNAME_HOPS):
            seen.add(qname)
            response = self._exchange(qname, rdtype, deadline, text)
            answer, target, chain_ttls = _read_response(response, qname, rdtype)
            ttls.extend(chain_ttls)
            if target is None or target in seen:
                if target is not None:
                    raise DnsTemporaryError("CNAME loop", text, rdtype)
                return DnsAnswer(answer.records, min(ttls + [answer.ttl]), answer.nxdomain)
            qname = target
        raise DnsTemporaryError("CNAME chain too long", text, rdtype)

    def _plan(self) -> list[tuple[tuple[str, int], float]]:
        """(server, attempt timeout) in the order to try them for one lookup.

        Round by round with growing timeouts; servers that were silent before
        come last, with one short try only.
        """
        silent = set(self.silent_servers())
        fresh = [server for server in self.nameservers if server not in silent]
        plan = [(server, self.first_attempt_timeout * 2 ** attempt)
                for attempt in range(self.attempts) for server in fresh]
        return plan + [(server, self.first_attempt_timeout) for server in self.nameservers
                       if server in silent]

    def _exchange(self, qname: Any, rdtype: str, deadline: float, text: str) -> Any:
        """One question, asked of the servers in turn until one answers usefully."""
        import dns.exception
        import dns.message
        import dns.rcode

        query = dns.message.make_query(qname, rdtype, use_edns=0, payload=EDNS_PAYLOAD)
        unusable: set[tuple[str, int]] = set()
        silent: list[str] = []
        failure: str | None = None  # a definite failure says more than silence
        for server, attempt_timeout in self._plan():
            if server in unusable:
                continue
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            host, port = server
            try:
                response = _ask(query, server, min(attempt_timeout, remaining), deadline)
            except dns.exception.Timeout:
                self._silent_since[server] = time.monotonic()
                if _server_text(server) not in silent:
                    silent.append(_server_text(server))
                continue
            except (OSError, dns.exception.DNSException) as exc:
                # Refused, unreachable or garbled: this server is no use for this lookup.
                failure = f"DNS server {host} port {port} unusable ({_short(exc)})"
                unusable.add(server)
                continue
            self._silent_since.pop(server, None)  # it answers after all
            rcode = response.rcode()
            if rcode in (dns.rcode.NOERROR, dns.rcode.NXDOMAIN):
                return response
            failure = f"DNS server failure ({dns.rcode.to_text(rcode)})"
            unusable.add(server)
        raise DnsTemporaryError(failure or NO_ANSWER, text, rdtype, silent)


def _ask(query: Any, server: tuple[str, int], timeout: float, deadline: float) -> Any:
    """One try at one server: UDP, then TCP when the answer was truncated, within ``deadline``."""
    import dns.exception
    import dns.flags
    import dns.query

    host, port = server
    # Stray packets from elsewhere are ignored, not taken as this server's fault.
    response = dns.query.udp(query, host, timeout=timeout, port=port, ignore_unexpected=True)
    if not response.flags & dns.flags.TC:
        return response
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise dns.exception.Timeout
    return dns.query.tcp(query, host, timeout=min(timeout, remaining), port=port)


def _server_text(server: tuple[str, int]) -> str:
    host, port = server
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def _short(exc: BaseException) -> str:
    return str(exc).splitlines()[0][:80] if str(exc) else type(exc).__name__


def _wire_name(name: str) -> Any:
    """``name`` as a dnspython absolute name, or None when it cannot be one.

    Built label by label so that characters SPF macros can produce (spaces,
    ``%``, ``\\``) are taken literally rather than as zone-file escapes.
    """
    import dns.exception
    import dns.name

    text = name[:-1] if name.endswith(".") else name
    if not text:
        return dns.name.root
    labels = [_label_bytes(label) for label in text.split(".")]
    try:
        return dns.name.Name(labels + [b""])
    except dns.exception.DNSException:  # empty or over-long label, name over 255 octets
        return None


def _label_bytes(label: str) -> bytes:
    if label.isascii():
        return label.encode("ascii")
    try:
        return label.encode("idna")  # an internationalised label, as its A-label
    except UnicodeError:
        return label.encode("utf-8")


def _name_text(name: Any) -> str:
    """A dnspython name as plain text without escapes or trailing dot."""
    return ".".join(label.decode("latin-1") for label in name.labels if label)


def _read_response(response: Any, qname: Any, rdtype: str) -> tuple[DnsAnswer, Any, list[int]]:
    """The records for ``qname`` in ``response``, following CNAMEs inside it.

    Returns the answer, the CNAME target still to be asked for (or None) and
    the TTLs of the CNAMEs followed.
    """
    import dns.rcode
    import dns.rdatatype

    wanted = dns.rdatatype.from_text(rdtype)
    current, visited = qname, {qname}
    ttls: list[int] = []
    while True:
        rrset = _find(response.answer, current, wanted)
        if rrset is not None:
            records = tuple(_record_value(rdtype, rdata) for rdata in rrset)
            return DnsAnswer(records, rrset.ttl), None, ttls
        alias = _find(response.answer, current, dns.rdatatype.CNAME)
        if alias is None:
            break
        if alias[0].target in visited or len(visited) > MAX_CNAME_HOPS:
            raise DnsTemporaryError("CNAME loop", _name_text(qname), rdtype)
        ttls.append(alias.ttl)
        current = alias[0].target
        visited.add(current)
    negative_ttl = _soa_ttl(response)
    if current != qname and response.rcode() == dns.rcode.NOERROR and negative_ttl is None:
        return DnsAnswer(), current, ttls  # the chain leaves this server's data: ask on
    nxdomain = response.rcode() == dns.rcode.NXDOMAIN
    return DnsAnswer((), negative_ttl or 0, nxdomain), None, ttls


def _find(section: Any, name: Any, rdtype: Any) -> Any:
    import dns.rdataclass

    for rrset in section:
        if rrset.name == name and rrset.rdtype == rdtype and rrset.rdclass == dns.rdataclass.IN:
            return rrset
    return None


def _soa_ttl(response: Any) -> int | None:
    """Negative-caching TTL (RFC 2308): the smaller of the SOA's TTL and MINIMUM."""
    import dns.rdatatype

    for rrset in response.authority:
        if rrset.rdtype == dns.rdatatype.SOA and len(rrset):
            return int(min(rrset.ttl, rrset[0].minimum))
    return None


def _record_value(rdtype: str, rdata: Any) -> Any:
    if rdtype == "TXT":
        return tuple(bytes(part) for part in rdata.strings)
    if rdtype in ("A", "AAAA"):
        return str(rdata.address)
    if rdtype == "MX":
        return (int(rdata.preference), _name_text(rdata.exchange))
    return _name_text(rdata.target)  # PTR
