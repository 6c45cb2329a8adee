"""A small authoritative DNS server on loopback, for tests that need real DNS.

It answers over UDP and TCP on one port from zone data held in memory, built
with dnspython's message classes. Zone data uses the layout of the SPF
conformance suites: a mapping from a name to a list of entries, each a one-key
mapping ``{TYPE: value}`` (optionally with ``ttl``) or the bare word ``TIMEOUT``::

    zone = {
        "kunde.example": [{"TXT": "v=spf1 include:_spf.provider.example -all"}],
        "_spf.provider.example": [{"TXT": ["v=spf1 ip4:192.0.2.25", " -all"], "ttl": 60}],
        "mx.kunde.example": [{"A": "192.0.2.7"}, {"MX": [10, "mx.kunde.example"]}],
        "slow.example": ["TIMEOUT"],
    }
    with DnsServer(zone) as server:
        resolver = NetworkResolver([server.address], timeout=2)
        server.set_records("kunde.example", "TXT", ["v=spf1 -all"], ttl=30)
        assert server.count("kunde.example", "TXT") == 1

Types: A, AAAA, MX ``[preference, exchange]``, PTR, CNAME, TXT (a string is one
character-string, a list several), SPF (type 99, served only as SPF). Entries
listed before ``TIMEOUT`` are answered; queries for other types at that name get
no reply at all, so the client times out. Names compare case-insensitively; a
name with no entries of the asked type gets NODATA, an unknown name NXDOMAIN
(names above a known name exist, as in real DNS). Negative answers carry an SOA
whose MINIMUM is ``negative_ttl``.

Knobs for failure tests: ``drop_queries(name)`` (never answer), ``silent=True`` (a dead
server: reads every query over UDP and TCP and never replies), ``force_tcp(name)``
(always answer UDP with TC=1) and ``udp_size_limit`` (TC=1 for UDP answers
larger than this; default: what the client advertised, or 512 bytes).
Every query is logged: ``queries``, ``count(name, rdtype, transport)``.
"""

from __future__ import annotations

import socket
import socketserver
import struct
import threading
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.rcode
import dns.rdata
import dns.rdataclass
import dns.rdatatype
import dns.rdtypes.ANY.CNAME
import dns.rdtypes.ANY.MX
import dns.rdtypes.ANY.PTR
import dns.rdtypes.ANY.SOA
import dns.rdtypes.ANY.SPF
import dns.rdtypes.ANY.TXT
import dns.rdtypes.IN.A
import dns.rdtypes.IN.AAAA
import dns.rrset

Zone = Mapping[str, Sequence[Any]]
SUPPORTED_TYPES = ("A", "AAAA", "MX", "PTR", "CNAME", "TXT", "SPF")
CLASSIC_UDP_LIMIT = 512
MAX_CNAME_CHAIN = 10


@dataclass(frozen=True)
class Query:
    """One question the server received."""

    name: str  # lower case, no trailing dot
    rdtype: str
    transport: str  # "udp" or "tcp"


@dataclass
class _Node:
    rrsets: dict[str, tuple[int, list[Any]]] = field(default_factory=dict)
    answered_types: set[str] | None = None  # set when the entries hold TIMEOUT


def normalise(name: str) -> str:
    return name.rstrip(".").lower() if name != "." else ""


class DnsServer:
    """Authoritative DNS for the given zone data on ``host``:<free port>, UDP and TCP."""

    def __init__(self, zone: Zone | None = None, *, host: str = "127.0.0.1", ttl: int = 300,
                 negative_ttl: int = 300, udp_size_limit: int | None = None,
                 silent: bool = False) -> None:
        self.host, self.ttl, self.negative_ttl = host, ttl, negative_ttl
        self.silent = silent
        self.udp_size_limit = udp_size_limit
        self._lock = threading.Lock()
        self._nodes: dict[str, _Node] = {}
        self._dropped: set[str] = set()
        self._forced_tcp: set[str] = set()
        self._queries: list[Query] = []
        self._servers: list[socketserver.BaseServer] = []
        self._threads: list[threading.Thread] = []
        self.port = 0
        if zone:
            self.load_zone(zone)

    # -- lifecycle ---------------------------------------------------------------

    @property
    def address(self) -> tuple[str, int]:
        return (self.host, self.port)

    @property
    def nameserver(self) -> str:
        """The address as written in ``[spf] nameservers``."""
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    def start(self) -> DnsServer:
        udp, tcp = self._bind_pair()
        for server in (udp, tcp):
            server.dns = self  # type: ignore[attr-defined]
            thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05},
                                      name=f"dns-server-{self.port}", daemon=True)
            thread.start()
            self._servers.append(server)
            self._threads.append(thread)
        return self

    def stop(self) -> None:
        for server in self._servers:
            server.shutdown()
            server.server_close()
        for thread in self._threads:
            thread.join(timeout=5)
        self._servers.clear()
        self._threads.clear()

    def __enter__(self) -> DnsServer:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def _bind_pair(self) -> tuple[socketserver.BaseServer, socketserver.BaseServer]:
        """A UDP and a TCP server on the same free port (retried if TCP's is taken)."""
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        last_error: OSError | None = None
        for _ in range(20):
            udp = _UdpServer((self.host, 0), _UdpHandler, family)
            port = udp.server_address[1]
            try:
                tcp = _TcpServer((self.host, port), _TcpHandler, family)
            except OSError as exc:
                udp.server_close()
                last_error = exc
                continue
            self.port = port
            return udp, tcp
        raise RuntimeError(f"no free port for a DNS server on {self.host}: {last_error}")

    # -- zone data -----------------------------------------------------------------

    def load_zone(self, zone: Zone) -> None:
        """Replace all zone data."""
        nodes: dict[str, _Node] = {}
        for name, entries in zone.items():
            nodes[normalise(name)] = self._node(entries)
        with self._lock:
            self._nodes = nodes

    def set_records(self, name: str, rdtype: str, values: Iterable[Any],
                    ttl: int | None = None) -> None:
        """Replace the ``rdtype`` records at ``name`` (values as in zone data)."""
        rdtype = rdtype.upper()
        if rdtype not in SUPPORTED_TYPES:
            raise ValueError(f"unsupported record type {rdtype}")
        values = list(values)
        for value in values:
            _rdata(rdtype, value)  # a bad value fails here, not in the server thread
        with self._lock:
            node = self._nodes.setdefault(normalise(name), _Node())
            node.rrsets[rdtype] = (self.ttl if ttl is None else ttl, values)

    def delete_records(self, name: str, rdtype: str | None = None) -> None:
        """Remove one type at ``name``, or the whole name when no type is given."""
        with self._lock:
            key = normalise(name)
            if rdtype is None:
                self._nodes.pop(key, None)
            elif key in self._nodes:
                self._nodes[key].rrsets.pop(rdtype.upper(), None)

    def drop_queries(self, name: str, drop: bool = True) -> None:
        """Never answer questions about ``name`` (the client sees a timeout)."""
        with self._lock:
            (self._dropped.add if drop else self._dropped.discard)(normalise(name))

    def force_tcp(self, name: str, force: bool = True) -> None:
        """Answer UDP questions about ``name`` with TC=1 and no records."""
        with self._lock:
            (self._forced_tcp.add if force else self._forced_tcp.discard)(normalise(name))

    def _node(self, entries: Sequence[Any]) -> _Node:
        node = _Node()
        for entry in entries:
            if entry == "TIMEOUT":
                node.answered_types = set(node.rrsets)
                continue
            if not isinstance(entry, Mapping):
                raise ValueError(f"zone entry {entry!r} is neither TIMEOUT nor {{TYPE: value}}")
            ttl = int(entry.get("ttl", self.ttl))
            for rdtype, value in entry.items():
                if rdtype == "ttl":
                    continue
                rdtype = rdtype.upper()
                if rdtype not in SUPPORTED_TYPES:
                    raise ValueError(f"unsupported record type {rdtype}")
                if rdtype == "TXT" and value == "NONE":
                    continue  # the suites' marker for "no TXT records here"
                _rdata(rdtype, value)  # a bad value fails here, not in the server thread
                known_ttl, values = node.rrsets.get(rdtype, (ttl, []))
                node.rrsets[rdtype] = (min(known_ttl, ttl), values + [value])
        return node

    # -- query log -----------------------------------------------------------------

    @property
    def queries(self) -> list[Query]:
        with self._lock:
            return list(self._queries)

    def count(self, name: str | None = None, rdtype: str | None = None,
              transport: str | None = None) -> int:
        """How many queries matched all the given filters."""
        wanted = normalise(name) if name is not None else None
        return sum(1 for q in self.queries
                   if (wanted is None or q.name == wanted)
                   and (rdtype is None or q.rdtype == rdtype.upper())
                   and (transport is None or q.transport == transport))

    def clear_queries(self) -> None:
        with self._lock:
            self._queries.clear()

    # -- answering -----------------------------------------------------------------

    def respond(self, wire: bytes, transport: str) -> bytes | None:
        """The reply to one query message, or None to stay silent."""
        try:
            query = dns.message.from_wire(wire)
        except dns.exception.DNSException:
            return None
        if len(query.question) != 1:
            return None
        question = query.question[0]
        name = _text(question.name)
        rdtype = dns.rdatatype.to_text(question.rdtype)
        with self._lock:
            self._queries.append(Query(name, rdtype, transport))
            if self.silent or name in self._dropped or self._times_out(name, rdtype):
                return None
            response = self._build(query, question.name, rdtype)
            forced = name in self._forced_tcp
        if transport == "udp":
            limit = self.udp_size_limit or max(query.payload if query.edns >= 0 else 0,
                                               CLASSIC_UDP_LIMIT)
            wire_out = response.to_wire(max_size=65535)
            if forced or len(wire_out) > limit:
                return _truncated(query)
            return wire_out
        return response.to_wire(max_size=65535)

    def _times_out(self, name: str, rdtype: str) -> bool:
        node = self._nodes.get(name)
        return bool(node and node.answered_types is not None and rdtype not in node.answered_types)

    def _build(self, query: dns.message.Message, qname: dns.name.Name, rdtype: str
               ) -> dns.message.Message:
        response = dns.message.make_response(query)
        response.flags |= dns.flags.AA
        current = qname
        for _ in range(MAX_CNAME_CHAIN):
            node = self._nodes.get(_text(current))
            if node is None:
                if not self._exists(_text(current)):
                    response.set_rcode(dns.rcode.NXDOMAIN)
                self._add_soa(response, current)
                return response
            if rdtype in node.rrsets:
                response.answer.append(_rrset(current, rdtype, *node.rrsets[rdtype]))
                return response
            if "CNAME" in node.rrsets:
                ttl, targets = node.rrsets["CNAME"]
                alias = _rrset(current, "CNAME", ttl, targets[:1])
                response.answer.append(alias)
                current = alias[0].target
                if self._times_out(_text(current), rdtype) or _text(current) in self._dropped:
                    return response  # the target is out of reach: the client must ask on
                continue
            self._add_soa(response, current)  # NODATA
            return response
        response.set_rcode(dns.rcode.SERVFAIL)  # a CNAME loop
        return response

    def _exists(self, name: str) -> bool:
        suffix = "." + name
        return any(known.endswith(suffix) for known in self._nodes)

    def _add_soa(self, response: dns.message.Message, name: dns.name.Name) -> None:
        owner = name.parent() if len(name.labels) > 2 else name
        soa = dns.rdtypes.ANY.SOA.SOA(
            dns.rdataclass.IN, dns.rdatatype.SOA, dns.name.from_text("ns.test."),
            dns.name.from_text("hostmaster.test."), 1, 3600, 600, 86400, self.negative_ttl)
        rrset = dns.rrset.RRset(owner, dns.rdataclass.IN, dns.rdatatype.SOA)
        rrset.add(soa, self.negative_ttl)
        response.authority.append(rrset)


def _truncated(query: dns.message.Message) -> bytes:
    reply = dns.message.make_response(query)
    reply.flags |= dns.flags.AA | dns.flags.TC
    return reply.to_wire()


def _text(name: dns.name.Name) -> str:
    return ".".join(label.decode("latin-1") for label in name.labels if label).lower()


def _wire_name(text: str) -> dns.name.Name:
    text = text.rstrip(".")
    labels = [label.encode("latin-1") if all(ord(c) < 256 for c in label) else label.encode()
              for label in text.split(".")] if text else []
    return dns.name.Name(labels + [b""])


def _octets(text: str) -> bytes:
    """Zone strings stand for octets: ``\\xNN`` escapes in YAML are raw bytes."""
    return text.encode("latin-1") if all(ord(c) < 256 for c in text) else text.encode()


def _rdata(rdtype: str, value: Any) -> dns.rdata.Rdata:
    IN = dns.rdataclass.IN
    kind = dns.rdatatype.from_text(rdtype)
    if rdtype == "A":
        return dns.rdtypes.IN.A.A(IN, kind, str(value))
    if rdtype == "AAAA":
        return dns.rdtypes.IN.AAAA.AAAA(IN, kind, str(value))
    if rdtype == "MX":
        preference, exchange = value
        return dns.rdtypes.ANY.MX.MX(IN, kind, int(preference), _wire_name(str(exchange)))
    if rdtype == "PTR":
        return dns.rdtypes.ANY.PTR.PTR(IN, kind, _wire_name(str(value)))
    if rdtype == "CNAME":
        return dns.rdtypes.ANY.CNAME.CNAME(IN, kind, _wire_name(str(value)))
    strings = [value] if isinstance(value, str) else list(value)
    parts = [_octets(part) for part in strings] or [b""]
    if rdtype == "SPF":
        return dns.rdtypes.ANY.SPF.SPF(IN, kind, parts)
    return dns.rdtypes.ANY.TXT.TXT(IN, kind, parts)


def _rrset(owner: dns.name.Name, rdtype: str, ttl: int, values: list[Any]) -> dns.rrset.RRset:
    rrset = dns.rrset.RRset(owner, dns.rdataclass.IN, dns.rdatatype.from_text(rdtype))
    for value in values:
        rrset.add(_rdata(rdtype, value), ttl)
    return rrset


class _UdpServer(socketserver.ThreadingUDPServer):
    daemon_threads = True
    allow_reuse_address = False
    socket_type = socket.SOCK_DGRAM

    def __init__(self, address: tuple[str, int], handler: type, family: int) -> None:
        self.address_family = family
        super().__init__(address, handler)


class _TcpServer(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type, family: int) -> None:
        self.address_family = family
        super().__init__(address, handler)


class _UdpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        data, sock = self.request
        reply = self.server.dns.respond(data, "udp")  # type: ignore[attr-defined]
        if reply is not None:
            sock.sendto(reply, self.client_address)


class _TcpHandler(socketserver.BaseRequestHandler):
    def handle(self) -> None:
        self.request.settimeout(10)
        try:
            while True:
                header = _read_exactly(self.request, 2)
                if header is None:
                    return
                wire = _read_exactly(self.request, struct.unpack("!H", header)[0])
                if wire is None:
                    return
                reply = self.server.dns.respond(wire, "tcp")  # type: ignore[attr-defined]
                if reply is not None:
                    self.request.sendall(struct.pack("!H", len(reply)) + reply)
        except OSError:
            return


def _read_exactly(sock: socket.socket, size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = sock.recv(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data
