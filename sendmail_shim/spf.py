"""The sender domain's SPF record: may the provider's relay send for it?

Three layers, top to bottom:

- ``require_authorised``: the pipeline's stage. Every relay IP must get an
  accepted result (``pass`` by default) for the envelope sender's domain and the
  From domain; otherwise it raises ``SpfNotAuthorised`` (exit 77) or, when DNS
  cannot answer in time, ``SpfUnavailable`` (exit 69). Verdicts are cached
  within their DNS TTL.
- ``report``: the same evaluation with its trace, for ``sendmail-shim spf check``.
- ``check_host``: RFC 7208 section 4 in full, on any ``dnsclient.Resolver``.

Limits follow RFC 7208 section 4.6.4: at most 10 terms that query DNS, at most 2
of them finding nothing ("void lookups"), at most 10 MX or PTR names per term,
and one overall time budget (temperror when it runs out).
"""

from __future__ import annotations

import ipaddress
import re
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple, Protocol

from .dnsclient import DnsAnswer, DnsTemporaryError, Resolver

NONE, NEUTRAL, PASS, FAIL = "none", "neutral", "pass", "fail"
SOFTFAIL, TEMPERROR, PERMERROR = "softfail", "temperror", "permerror"
RESULTS = (NONE, NEUTRAL, PASS, FAIL, SOFTFAIL, TEMPERROR, PERMERROR)

MAX_DNS_TERMS = 10
MAX_VOID_LOOKUPS = 2
MAX_NAMES_PER_TERM = 10  # MX exchanges or PTR names whose addresses one term may look up
MAX_DOMAIN_LENGTH = 253
MAX_LABEL_LENGTH = 63
MAX_TTL = 86400
# RFC 7208 4.6.4 suggests 20 s for a receiving server; here PHP's mail() (and the web
# request behind it) waits for the whole evaluation, so the budget is half that.
DEFAULT_BUDGET = 10.0
DEFAULT_HELO = "unknown"
DEFAULT_RECEIVER = "unknown"
DEFAULT_EXPLANATION = "the SPF record of %{d} does not authorise %{c} to send mail for %{o}"

_QUALIFIER_RESULTS = {"+": PASS, "-": FAIL, "~": SOFTFAIL, "?": NEUTRAL}


# ---------------------------------------------------------------------------
# Errors the pipeline sees
# ---------------------------------------------------------------------------


class SpfError(Exception):
    """The SPF stage refused the message; ``str(exc)`` is the user's stderr line."""


class SpfNotAuthorised(SpfError):
    """A relay IP did not get an accepted result for a domain (exit 77)."""

    def __init__(self, domain: str, ip: str, result: str, hint: str | None = None,
                 problem: str | None = None) -> None:
        self.domain, self.ip, self.result, self.hint, self.problem = (
            domain, ip, result, hint, problem)
        super().__init__(_refusal_line(domain, ip, result, hint or _ip_term(ip), problem))


class SpfUnavailable(SpfError):
    """SPF could not be checked now: DNS failed or the time budget ran out (exit 69)."""

    def __init__(self, domain: str, reason: str, ip: str | None = None) -> None:
        self.domain, self.reason, self.ip = domain, reason, ip
        self.result = TEMPERROR
        super().__init__(
            f"could not check SPF for {_one_line(domain)} ({_one_line(reason)}); try again later")


def _refusal_line(domain: str, ip: str, result: str, addition: str, problem: str | None) -> str:
    domain, addition = _one_line(domain), _one_line(addition)
    if result == NONE:
        return (f"{domain} publishes no SPF record, so the relay {ip} is not authorised "
                f'(result: none); publish one such as "v=spf1 {addition} ~all"')
    if result == PERMERROR:
        why = f": {_one_line(problem)}" if problem else ""
        return (f"the SPF record of {domain} is invalid (result: permerror{why}); "
                f'correct it and make sure it contains "{addition}"')
    return (f"the SPF record of {domain} does not authorise the relay {ip} (result: {result}); "
            f'add "{addition}" to the domain\'s SPF record')


def _ip_term(ip: str) -> str:
    """The mechanism that would authorise ``ip`` when no hint is configured."""
    address = ipaddress.ip_address(ip)
    return f"ip{address.version}:{address}"


def _one_line(text: str, limit: int = 200) -> str:
    """DNS data is foreign input: keep stderr lines printable, single and short."""
    clean = "".join(c if " " <= c <= "~" else "?" for c in text)
    return clean if len(clean) <= limit else clean[: limit - 3] + "..."


# ---------------------------------------------------------------------------
# What an evaluation returns
# ---------------------------------------------------------------------------


class TraceStep(NamedTuple):
    """One thing the evaluation did: a record fetched, a term evaluated, a lookup."""

    depth: int  # 0 for the checked domain, +1 inside each include/redirect
    domain: str  # the domain whose record was being evaluated
    term: str  # the term, or "" for the record itself
    detail: str

    def as_dict(self) -> dict[str, Any]:
        return {"depth": self.depth, "domain": self.domain, "term": self.term,
                "detail": self.detail}


@dataclass(frozen=True)
class SpfOutcome:
    """The result of ``check_host`` and how it came about."""

    ip: str
    domain: str
    result: str
    explanation: str | None = None  # only for "fail"
    matched: str | None = None  # the term that decided, None for a default result
    matched_in: str | None = None  # the domain whose record holds that term
    problem: str | None = None  # why, for permerror and temperror
    record: str | None = None  # the SPF record of ``domain``
    trace: tuple[TraceStep, ...] = ()
    lookups: int = 0  # terms that queried DNS (limit 10)
    void_lookups: int = 0  # of which found nothing (limit 2)
    ttl: int | None = None  # smallest TTL of the answers used; None when DNS was not asked
    uses_sender: bool = False  # the record looked at the sender's address (macros)

    def as_dict(self) -> dict[str, Any]:
        return {
            "ip": self.ip, "domain": self.domain, "result": self.result,
            "matched": self.matched, "matched_in": self.matched_in,
            "explanation": self.explanation, "problem": self.problem, "record": self.record,
            "lookups": self.lookups, "lookup_limit": MAX_DNS_TERMS,
            "void_lookups": self.void_lookups, "void_lookup_limit": MAX_VOID_LOOKUPS,
            "ttl": self.ttl, "trace": [step.as_dict() for step in self.trace],
        }


class _Abort(Exception):
    """Ends the whole evaluation with permerror or temperror."""

    def __init__(self, result: str, problem: str) -> None:
        super().__init__(problem)
        self.result, self.problem = result, problem


# ---------------------------------------------------------------------------
# Macros (RFC 7208 section 7)
# ---------------------------------------------------------------------------

_DOMAIN_LETTERS = frozenset("slodipvh")
_EXPLANATION_LETTERS = _DOMAIN_LETTERS | frozenset("crt")
_MACRO_EXPAND = re.compile(r"%\{([a-z])([0-9]*)(r?)([.\-+,/_=]*)\}", re.IGNORECASE)
_ESCAPES = {"%%": "%", "%_": " ", "%-": "%20"}


class _BadSyntax(ValueError):
    pass


class _Macro(NamedTuple):
    letter: str  # as written: upper case asks for URL escaping
    keep: int | None  # the DIGIT transformer: rightmost parts to keep
    reverse: bool
    delimiters: str


class _Escape(str):
    """What %%, %_ or %- stand for; a macro-expand, not a literal, in the grammar."""


_Token = str | _Macro  # a literal run, an _Escape or a macro


def _parse_macro_string(text: str, letters: frozenset[str],
                        spaces: bool = False) -> tuple[_Token, ...]:
    """Tokens of a macro-string (or of an explain-string when ``spaces``)."""
    tokens: list[_Token] = []
    position = 0
    while position < len(text):
        if text[position] != "%":
            end = text.find("%", position)
            end = len(text) if end < 0 else end
            literal = text[position:end]
            if not all("!" <= c <= "~" or (spaces and c == " ") for c in literal):
                raise _BadSyntax(f"character not allowed in {text!r}")
            tokens.append(literal)
            position = end
            continue
        pair = text[position:position + 2]
        if pair in _ESCAPES:
            tokens.append(_Escape(_ESCAPES[pair]))
            position += 2
            continue
        match = _MACRO_EXPAND.match(text, position)
        if match is None:
            raise _BadSyntax(f"invalid macro at {text[position:position + 10]!r}")
        tokens.append(_macro(match, letters))
        position = match.end()
    return tuple(tokens)


def _macro(match: re.Match[str], letters: frozenset[str]) -> _Macro:
    letter, digits, reverse, delimiters = match.groups()
    if letter.lower() not in letters:
        raise _BadSyntax(f"macro letter {letter!r} is not allowed here")
    if digits and int(digits) == 0:
        raise _BadSyntax("a macro cannot keep zero parts")
    return _Macro(letter, int(digits) if digits else None, bool(reverse), delimiters)


def _transform(value: str, macro: _Macro) -> str:
    """Split on the delimiters, maybe reverse, keep the rightmost parts, join with dots."""
    separators = macro.delimiters or "."
    parts = re.split("[" + re.escape(separators) + "]", value)
    if macro.reverse:
        parts.reverse()
    if macro.keep is not None and macro.keep < len(parts):
        parts = parts[-macro.keep:]
    text = ".".join(parts)
    if macro.letter.isupper():
        from urllib.parse import quote

        text = quote(text, safe="")  # keeps exactly RFC 3986's unreserved characters
    return text


_TOPLABEL = re.compile(r"[a-z0-9]*[a-z][a-z0-9]*|[a-z0-9]+-[a-z0-9-]*[a-z0-9]", re.IGNORECASE)


def _parse_domain_spec(text: str) -> tuple[_Token, ...]:
    """A domain-spec: a macro-string ending in a macro or in "." toplabel ["."]."""
    tokens = _parse_macro_string(text, _DOMAIN_LETTERS)
    if not tokens:
        raise _BadSyntax("empty domain")
    tail = tokens[-1]
    if isinstance(tail, _Macro | _Escape):
        return tokens
    tail = tail[:-1] if tail.endswith(".") else tail
    _, dot, toplabel = tail.rpartition(".")
    if not dot or not _TOPLABEL.fullmatch(toplabel):
        raise _BadSyntax(f"{text!r} does not end in a valid top-level label")
    return tokens


# ---------------------------------------------------------------------------
# Records (RFC 7208 sections 4.5, 4.6, 5 and 6)
# ---------------------------------------------------------------------------

_MODIFIER = re.compile(r"([a-z][a-z0-9_.\-]*)=(.*)", re.IGNORECASE | re.DOTALL)
_HOST_ARGS = re.compile(r"(?::(?P<domain>.*?))?(?P<cidr4>/[0-9]+)?(?P<cidr6>//[0-9]+)?",
                        re.DOTALL)
_NETWORK_ARGS = re.compile(r":(?P<network>[^/]+)(?:/(?P<cidr>[0-9]+))?", re.DOTALL)
_CIDR = re.compile(r"0|[1-9][0-9]{0,2}")


class _Mechanism(NamedTuple):
    text: str
    qualifier: str
    name: str
    domain_spec: tuple[_Token, ...] | None = None
    cidr4: int = 32
    cidr6: int = 128
    network: ipaddress.IPv4Network | ipaddress.IPv6Network | None = None

    @property
    def result(self) -> str:
        return _QUALIFIER_RESULTS[self.qualifier]


class _Record(NamedTuple):
    mechanisms: tuple[_Mechanism, ...]
    redirect: tuple[_Token, ...] | None = None
    redirect_text: str = ""
    explanation: tuple[_Token, ...] | None = None


def _is_spf_record(text: bytes) -> bool:
    return text[:6].lower() == b"v=spf1" and text[6:7] in (b"", b" ")


def _parse_record(text: str) -> _Record:
    """Check the whole record's syntax before any of it is evaluated (RFC 7208 4.6)."""
    mechanisms: list[_Mechanism] = []
    modifiers: dict[str, tuple[str, tuple[_Token, ...]]] = {}
    for term in text[6:].split(" "):
        if not term:
            continue
        modifier = _MODIFIER.fullmatch(term)
        if modifier:
            _add_modifier(modifiers, modifier[1].lower(), modifier[2], term)
        else:
            mechanisms.append(_parse_mechanism(term))
    redirect = modifiers.get("redirect")
    explanation = modifiers.get("exp")
    return _Record(tuple(mechanisms), redirect[1] if redirect else None,
                   redirect[0] if redirect else "", explanation[1] if explanation else None)


def _add_modifier(modifiers: dict[str, tuple[str, tuple[_Token, ...]]], name: str,
                  value: str, term: str) -> None:
    try:
        if name in ("redirect", "exp"):
            if name in modifiers:
                raise _Abort(PERMERROR, f"{name}= appears more than once")
            modifiers[name] = (term, _parse_domain_spec(value))
        else:  # unknown modifiers are ignored, but their syntax must be right
            _parse_macro_string(value, _EXPLANATION_LETTERS)
    except _BadSyntax as exc:
        raise _Abort(PERMERROR, f"bad term {term!r}: {exc}") from None


def _parse_mechanism(term: str) -> _Mechanism:
    qualifier = term[0] if term[0] in _QUALIFIER_RESULTS else "+"
    body = term[1:] if term[0] in _QUALIFIER_RESULTS else term
    split = min((i for i in (body.find(":"), body.find("/")) if i >= 0), default=len(body))
    name, argument = body[:split].lower(), body[split:]
    parser = _ARGUMENT_PARSERS.get(name)
    if parser is None:
        raise _Abort(PERMERROR, f"unknown mechanism {term!r}")
    try:
        return _Mechanism(term, qualifier, name, **parser(argument))
    except _BadSyntax as exc:
        raise _Abort(PERMERROR, f"bad term {term!r}: {exc}") from None


def _no_argument(argument: str) -> dict[str, Any]:
    if argument:
        raise _BadSyntax("takes no argument")
    return {}


def _required_domain(argument: str) -> dict[str, Any]:
    if not argument.startswith(":"):
        raise _BadSyntax("needs :domain")
    return {"domain_spec": _parse_domain_spec(argument[1:])}


def _optional_domain(argument: str) -> dict[str, Any]:
    if not argument:
        return {}
    return _required_domain(argument)


def _host_with_cidrs(argument: str) -> dict[str, Any]:
    match = _HOST_ARGS.fullmatch(argument)
    if match is None:
        raise _BadSyntax("bad domain or prefix length")
    fields: dict[str, Any] = {}
    if match["domain"] is not None:
        fields["domain_spec"] = _parse_domain_spec(match["domain"])
    if match["cidr4"]:
        fields["cidr4"] = _prefix_length(match["cidr4"][1:], 32)
    if match["cidr6"]:
        fields["cidr6"] = _prefix_length(match["cidr6"][2:], 128)
    return fields


def _ip4_network(argument: str) -> dict[str, Any]:
    return {"network": _network(argument, 4)}


def _ip6_network(argument: str) -> dict[str, Any]:
    return {"network": _network(argument, 6)}


def _network(argument: str, version: int) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    match = _NETWORK_ARGS.fullmatch(argument)
    if match is None or "%" in match["network"]:
        raise _BadSyntax("needs :address[/prefix]")
    kind = ipaddress.IPv4Address if version == 4 else ipaddress.IPv6Address
    try:
        address = kind(match["network"])  # rejects short forms and leading zeros
    except ValueError:
        raise _BadSyntax(f"{match['network']!r} is not an IPv{version} address") from None
    bits = address.max_prefixlen
    prefix = _prefix_length(match["cidr"], bits) if match["cidr"] is not None else bits
    return ipaddress.ip_network(f"{address}/{prefix}", strict=False)


def _prefix_length(text: str, maximum: int) -> int:
    if not _CIDR.fullmatch(text) or int(text) > maximum:
        raise _BadSyntax(f"prefix length /{text} is not 0 to {maximum}")
    return int(text)


_ARGUMENT_PARSERS: dict[str, Callable[[str], dict[str, Any]]] = {
    "all": _no_argument,
    "include": _required_domain,
    "exists": _required_domain,
    "a": _host_with_cidrs,
    "mx": _host_with_cidrs,
    "ptr": _optional_domain,
    "ip4": _ip4_network,
    "ip6": _ip6_network,
}


# ---------------------------------------------------------------------------
# Domain names
# ---------------------------------------------------------------------------


def _strip_dot(name: str) -> str:
    return name[:-1] if name.endswith(".") else name


def _labels_ok(name: str) -> bool:
    return bool(name) and len(name) <= MAX_DOMAIN_LENGTH and all(
        0 < len(label) <= MAX_LABEL_LENGTH for label in name.split("."))


def _is_checkable_domain(name: str) -> bool:
    """RFC 7208 4.3: a well-formed, multi-label name; anything else gives "none"."""
    return not name.startswith("[") and "." in name and _labels_ok(name)


def _fit_length(name: str) -> str:
    """RFC 7208 7.1: drop labels on the left until the name fits in 253 characters."""
    while len(name) > MAX_DOMAIN_LENGTH and "." in name:
        name = name.split(".", 1)[1]
    return name


def _is_within(name: str, domain: str) -> bool:
    name, domain = _strip_dot(name).lower(), _strip_dot(domain).lower()
    return name == domain or name.endswith("." + domain)


# ---------------------------------------------------------------------------
# The client address
# ---------------------------------------------------------------------------


class _Client(NamedTuple):
    address: ipaddress.IPv4Address | ipaddress.IPv6Address

    @property
    def is_ipv4(self) -> bool:
        return self.address.version == 4

    @property
    def dotted(self) -> str:
        """The ``i`` macro: dotted quad, or 32 dot-separated nibbles for IPv6.

        Nibbles are upper case, as the RFC 7208 test suite expects; DNS ignores case.
        """
        if self.is_ipv4:
            return str(self.address)
        return ".".join(self.address.packed.hex().upper())

    @property
    def reverse_name(self) -> str:
        parts = self.dotted.split(".")
        return ".".join(reversed(parts)) + (".in-addr.arpa" if self.is_ipv4 else ".ip6.arpa")

    @property
    def address_type(self) -> str:
        return "A" if self.is_ipv4 else "AAAA"

    def within(self, address: str, prefix: int) -> bool:
        try:
            other = ipaddress.ip_address(address)
        except ValueError:
            return False
        if other.version != self.address.version:
            return False
        return self.address in ipaddress.ip_network(f"{other}/{prefix}", strict=False)


def _client(ip: str) -> _Client:
    """RFC 7208 5/9: an IPv4-mapped IPv6 address is treated as the IPv4 address."""
    address = ipaddress.ip_address(ip.strip())
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return _Client(address.ipv4_mapped)
    return _Client(address)


# ---------------------------------------------------------------------------
# The evaluation (RFC 7208 sections 4 to 6)
# ---------------------------------------------------------------------------


class _LookupCounter:
    """The processing limits of one check_host() call, nested records included."""

    def __init__(self, budget: float) -> None:
        self.budget = budget
        self.deadline = time.monotonic() + budget
        self.terms = 0
        self.voids = 0
        self.ttl: int | None = None

    def count_term(self, term: str) -> None:
        self.terms += 1
        if self.terms > MAX_DNS_TERMS:
            raise _Abort(PERMERROR, f"more than {MAX_DNS_TERMS} DNS lookups "
                                    f"(the limit was passed at {term!r})")

    def count_void(self, name: str) -> None:
        self.voids += 1
        if self.voids > MAX_VOID_LOOKUPS:
            raise _Abort(PERMERROR, f"more than {MAX_VOID_LOOKUPS} lookups found nothing "
                                    f"(the last for {name})")

    def remaining(self) -> float:
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise _Abort(TEMPERROR, f"DNS did not answer within the time limit of {self.budget:g} s")
        return left

    def expired(self) -> bool:
        return time.monotonic() >= self.deadline

    def note_ttl(self, ttl: int) -> None:
        self.ttl = ttl if self.ttl is None else min(self.ttl, ttl)


class _Verdict(NamedTuple):
    result: str
    matched: str | None = None
    matched_in: str | None = None
    explanation: str | None = None


class _Place(NamedTuple):
    depth: int
    domain: str
    term: str = ""


class _Evaluation:
    """One check_host() call: its inputs, limits, trace and what it found out."""

    def __init__(self, client: _Client, sender: str, helo: str, receiver: str,
                 default_explanation: str, resolver: Resolver, counter: _LookupCounter) -> None:
        self.client, self.helo, self.receiver = client, helo, receiver
        self.sender, self.local_part, self.sender_domain = _sender_parts(sender, helo)
        self.default_explanation = default_explanation
        self.resolver, self.counter = resolver, counter
        self.trace: list[TraceStep] = []
        self.record: str | None = None  # the checked domain's own record
        self.uses_sender = False
        self._place = _Place(0, "")
        self._client_names: list[str] | None = None  # validated PTR names, for %{p}

    # -- check_host() ------------------------------------------------------------------

    def run(self, domain: str, explain: bool) -> tuple[_Verdict, str | None]:
        """The verdict for ``domain`` and, for permerror or temperror, the problem."""
        try:
            return self.check_host(domain, 0, explain), None
        except _Abort as abort:
            self._place = _Place(0, _strip_dot(domain))
            self._note(f"{abort.result}: {abort.problem}")
            return _Verdict(abort.result), abort.problem

    def check_host(self, domain: str, depth: int, explain: bool) -> _Verdict:
        domain = _strip_dot(domain)
        self._place = _Place(depth, domain)
        if not _is_checkable_domain(domain):
            self._note(f"{domain!r} is not a valid domain name: none")
            return _Verdict(NONE)
        text = self._fetch_record(domain)
        if text is None:
            return _Verdict(NONE)
        if depth == 0:
            self.record = text
        record = _parse_record(text)
        for mechanism in record.mechanisms:
            if self._matches(mechanism, domain, depth):
                explanation = (self._explain(record, domain)
                               if mechanism.result == FAIL and explain else None)
                return _Verdict(mechanism.result, mechanism.text, domain, explanation)
        if record.redirect is not None:
            return self._redirect(record, domain, depth, explain)
        self._place = _Place(depth, domain)
        self._note("no mechanism matched: neutral")
        return _Verdict(NEUTRAL)

    def _fetch_record(self, domain: str) -> str | None:
        """RFC 7208 4.4 and 4.5: the one TXT record that starts with v=spf1."""
        answer = self._lookup_or_temperror(domain, "TXT")
        texts = [b"".join(strings) for strings in answer.records]
        records = [text for text in texts if _is_spf_record(text)]
        if not records:
            self._note("no SPF record")
            return None
        if len(records) > 1:
            raise _Abort(PERMERROR, f"{domain} has {len(records)} SPF records; "
                                    "there must be exactly one")
        try:
            text = records[0].decode("ascii")
        except UnicodeDecodeError:
            raise _Abort(PERMERROR, f"the SPF record of {domain} contains non-ASCII "
                                    "characters") from None
        self._note(f"record: {text}")
        return text

    def _redirect(self, record: _Record, domain: str, depth: int, explain: bool) -> _Verdict:
        assert record.redirect is not None
        self._place = _Place(depth, domain, record.redirect_text)
        self.counter.count_term(record.redirect_text)
        target = self._expand_name(record.redirect, domain)
        self._note(f"no mechanism matched: following the redirect to {target}")
        verdict = self.check_host(target, depth + 1, explain)
        if verdict.result == NONE:
            raise _Abort(PERMERROR, f"redirect target {target} has no SPF record")
        return verdict

    def _matches(self, mechanism: _Mechanism, domain: str, depth: int) -> bool:
        self._place = _Place(depth, domain, mechanism.text)
        evaluate: Callable[[_Mechanism, str, int], bool] = getattr(self, "_" + mechanism.name)
        matched = evaluate(mechanism, domain, depth)
        self._place = _Place(depth, domain, mechanism.text)  # an include moved it
        self._note(f"match: {mechanism.result}" if matched else "no match")
        return matched

    # -- one function per mechanism (RFC 7208 section 5) -----------------------------------

    def _all(self, mechanism: _Mechanism, domain: str, depth: int) -> bool:
        return True

    def _include(self, mechanism: _Mechanism, domain: str, depth: int) -> bool:
        self.counter.count_term(mechanism.text)
        assert mechanism.domain_spec is not None
        target = self._expand_name(mechanism.domain_spec, domain)
        verdict = self.check_host(target, depth + 1, explain=False)
        self._place = _Place(depth, domain, mechanism.text)  # back from the included record
        if verdict.result == NONE:
            raise _Abort(PERMERROR, f"included domain {target} has no SPF record")
        self._note(f"{target} gave {verdict.result}")
        return verdict.result == PASS

    def _a(self, mechanism: _Mechanism, domain: str, depth: int) -> bool:
        self.counter.count_term(mechanism.text)
        target = self._target(mechanism, domain)
        return target is not None and self._has_client_address(target, mechanism, True)

    def _mx(self, mechanism: _Mechanism, domain: str, depth: int) -> bool:
        self.counter.count_term(mechanism.text)
        target = self._target(mechanism, domain)
        if target is None:
            return False
        answer = self._lookup_or_temperror(target, "MX")
        if answer.empty:
            self.counter.count_void(target)
            return False
        if len(answer.records) > MAX_NAMES_PER_TERM:
            raise _Abort(PERMERROR, f"{target} has {len(answer.records)} MX records; "
                                    f"at most {MAX_NAMES_PER_TERM} may be checked")
        exchanges = [name for _, name in sorted(answer.records) if _strip_dot(name)]
        return any(self._has_client_address(name, mechanism, False) for name in exchanges)

    def _ptr(self, mechanism: _Mechanism, domain: str, depth: int) -> bool:
        self.counter.count_term(mechanism.text)
        target = (self._expand_name(mechanism.domain_spec, domain)
                  if mechanism.domain_spec else domain)
        return bool(self._validated_names(within=target, count_void=True))

    def _ip4(self, mechanism: _Mechanism, domain: str, depth: int) -> bool:
        return self.client.is_ipv4 and self.client.address in (mechanism.network or ())

    def _ip6(self, mechanism: _Mechanism, domain: str, depth: int) -> bool:
        return not self.client.is_ipv4 and self.client.address in (mechanism.network or ())

    def _exists(self, mechanism: _Mechanism, domain: str, depth: int) -> bool:
        self.counter.count_term(mechanism.text)
        target = self._target(mechanism, domain)
        if target is None:
            return False
        answer = self._lookup_or_temperror(target, "A")  # A even for an IPv6 client
        if answer.empty:
            self.counter.count_void(target)
            return False
        return True

    # -- what the mechanisms share ---------------------------------------------------------

    def _target(self, mechanism: _Mechanism, domain: str) -> str | None:
        """The name a mechanism queries, or None when no DNS name can be made of it."""
        if mechanism.domain_spec is None:
            return domain
        name = self._expand_name(mechanism.domain_spec, domain)
        if not _labels_ok(name):
            self._note(f"{name!r} is not a valid DNS name: no match")
            return None
        return name

    def _has_client_address(self, name: str, mechanism: _Mechanism, count_void: bool) -> bool:
        answer = self._lookup_or_temperror(name, self.client.address_type)
        if answer.empty and count_void:
            self.counter.count_void(name)
        prefix = mechanism.cidr4 if self.client.is_ipv4 else mechanism.cidr6
        return any(self.client.within(address, prefix) for address in answer.records)

    def _validated_names(self, within: str | None, count_void: bool) -> list[str]:
        """RFC 7208 5.5: names of the client's PTR records that resolve back to it.

        Only the first 10 PTR names count; lookup errors skip a name (or all of
        them, for the PTR query itself) instead of failing the evaluation.
        """
        try:
            answer = self._lookup(self.client.reverse_name, "PTR")
        except DnsTemporaryError:
            return []
        if answer.empty and count_void:
            self.counter.count_void(self.client.reverse_name)
        names = [_strip_dot(name) for name in answer.records[:MAX_NAMES_PER_TERM]]
        validated = []
        for name in names:
            if within is not None and not _is_within(name, within):
                continue
            try:
                addresses = self._lookup(name, self.client.address_type).records
            except DnsTemporaryError:
                continue
            if any(self.client.within(address, self.client.address.max_prefixlen)
                   for address in addresses):
                validated.append(name)
        return validated

    # -- DNS -------------------------------------------------------------------------------

    def _lookup(self, name: str, rdtype: str) -> DnsAnswer:
        timeout = self.counter.remaining()
        try:
            answer = self.resolver.lookup(name, rdtype, timeout=timeout)
        except DnsTemporaryError as exc:
            self._note(f"{rdtype} {name}: {exc.reason}")
            if self.counter.expired():  # a spent budget is temperror, whoever asked
                raise _Abort(TEMPERROR, _dns_problem(exc, rdtype, name)) from None
            raise
        self.counter.note_ttl(answer.ttl)
        self._note(f"{rdtype} {name}: {_describe(answer, rdtype)}")
        return answer

    def _lookup_or_temperror(self, name: str, rdtype: str) -> DnsAnswer:
        try:
            return self._lookup(name, rdtype)
        except DnsTemporaryError as exc:
            raise _Abort(TEMPERROR, _dns_problem(exc, rdtype, name)) from None

    def _note(self, detail: str) -> None:
        place = self._place
        self.trace.append(TraceStep(place.depth, place.domain, place.term, detail))

    # -- macros ----------------------------------------------------------------------------

    def _expand_name(self, tokens: tuple[_Token, ...], domain: str) -> str:
        return _fit_length(_strip_dot(self._expand(tokens, domain)))

    def _expand(self, tokens: tuple[_Token, ...], domain: str) -> str:
        return "".join(token if isinstance(token, str)
                       else _transform(self._macro_value(token.letter.lower(), domain), token)
                       for token in tokens)

    def _macro_value(self, letter: str, domain: str) -> str:
        if letter in "slo":
            self.uses_sender = True  # such a result may differ per sender: not cached
        if letter == "p":
            return self._validated_name_of_client(domain)  # costs DNS lookups: only on demand
        if letter == "t":
            return str(int(time.time()))
        return {
            "s": self.sender, "l": self.local_part, "o": self.sender_domain, "d": domain,
            "i": self.client.dotted, "v": "in-addr" if self.client.is_ipv4 else "ip6",
            "h": self.helo, "c": str(self.client.address), "r": self.receiver,
        }[letter]

    def _validated_name_of_client(self, domain: str) -> str:
        """The ``p`` macro: prefer ``domain`` itself, then a name below it, then any."""
        if self._client_names is None:
            self._client_names = self._validated_names(within=None, count_void=False)
        names = self._client_names
        same = [name for name in names if name.lower() == domain.lower()]
        below = [name for name in names if _is_within(name, domain)]
        for candidates in (same, below, names):
            if candidates:
                return candidates[0]
        return "unknown"

    # -- explanation (RFC 7208 6.2) --------------------------------------------------------

    def _explain(self, record: _Record, domain: str) -> str:
        """The exp= text for a fail; any problem with it means the default text."""
        uses_sender = self.uses_sender  # the text does not change the result
        try:
            return self._explanation_text(record, domain)
        finally:
            self.uses_sender = uses_sender

    def _explanation_text(self, record: _Record, domain: str) -> str:
        default = self._default_explanation(domain)
        if record.explanation is None:
            return default
        try:
            name = self._expand_name(record.explanation, domain)
            if not _labels_ok(name):
                return default
            answer = self._lookup(name, "TXT")
            if len(answer.records) != 1:
                return default
            text = b"".join(answer.records[0]).decode("ascii")
            tokens = _parse_macro_string(text, _EXPLANATION_LETTERS, spaces=True)
            return self._expand(tokens, domain)
        except (_Abort, DnsTemporaryError, _BadSyntax, UnicodeDecodeError):
            return default

    def _default_explanation(self, domain: str) -> str:
        try:
            tokens = _parse_macro_string(self.default_explanation, _EXPLANATION_LETTERS,
                                         spaces=True)
            return self._expand(tokens, domain)
        except (_Abort, _BadSyntax):
            return self.default_explanation


def _dns_problem(exc: DnsTemporaryError, rdtype: str, name: str) -> str:
    """What went wrong with one lookup, naming the servers that gave no reply (for the admin)."""
    silent = f"; no reply from {', '.join(exc.silent)}" if exc.silent else ""
    return f"{exc.reason} looking up {rdtype} {name}{silent}"


def _describe(answer: DnsAnswer, rdtype: str) -> str:
    if answer.nxdomain:
        return "no such domain"
    if answer.empty:
        return "no records"
    shown = [_show_record(record, rdtype) for record in answer.records[:5]]
    more = f" and {len(answer.records) - 5} more" if len(answer.records) > 5 else ""
    return ", ".join(shown) + more


def _show_record(record: Any, rdtype: str) -> str:
    if rdtype == "TXT":
        return '"' + _one_line(b"".join(record).decode("ascii", "replace"), 120) + '"'
    if rdtype == "MX":
        return f"{record[0]} {record[1] or '.'}"
    return str(record)


def _sender_parts(sender: str, helo: str) -> tuple[str, str, str]:
    """(sender, local-part, domain); RFC 7208 4.3: an empty local-part is "postmaster"."""
    if not sender:
        sender = f"postmaster@{helo}"
    local, at, domain = sender.rpartition("@")
    if not at:
        local, domain = "", sender
    local = local or "postmaster"
    return f"{local}@{domain}", local, domain


def check_host(ip: str, domain: str, sender: str, *, resolver: Resolver,
               helo: str = DEFAULT_HELO, budget: float = DEFAULT_BUDGET,
               receiver: str = DEFAULT_RECEIVER,
               default_explanation: str = DEFAULT_EXPLANATION,
               explain: bool = True) -> SpfOutcome:
    """RFC 7208 check_host(): may ``ip`` send mail for ``domain`` as ``sender``?

    ``sender`` is the MAIL FROM address ("" means the HELO identity,
    postmaster@``helo``). ``budget`` is the time all DNS lookups together may
    take; exceeding it gives temperror. For a fail, the explanation is the
    record's exp= text or ``default_explanation`` (both macro-expanded);
    ``explain=False`` skips it. Raises ValueError for a malformed ``ip``.
    """
    counter = _LookupCounter(budget)
    evaluation = _Evaluation(_client(ip), sender, helo, receiver, default_explanation, resolver,
                             counter)
    verdict, problem = evaluation.run(domain, explain)
    ttl = None if counter.ttl is None else max(0, min(counter.ttl, MAX_TTL))
    return SpfOutcome(
        ip=ip.strip(), domain=_strip_dot(domain), result=verdict.result,
        explanation=verdict.explanation, matched=verdict.matched,
        matched_in=verdict.matched_in, problem=problem, record=evaluation.record,
        trace=tuple(evaluation.trace), lookups=min(counter.terms, MAX_DNS_TERMS + 1),
        void_lookups=counter.voids, ttl=ttl, uses_sender=evaluation.uses_sender)


# ---------------------------------------------------------------------------
# Verdict cache
# ---------------------------------------------------------------------------


class VerdictCache(Protocol):
    """Remembers SPF results per (domain, relay IP) until they expire."""

    def get(self, domain: str, ip: str, now: float) -> str | None:
        """The cached result, or None when there is none or it expired at ``now``."""
        ...

    def put(self, domain: str, ip: str, result: str, expires_at: float) -> None:
        ...


class MemoryVerdictCache:
    """An in-process VerdictCache, safe to share between threads; bounded in size."""

    def __init__(self, max_entries: int = 10000) -> None:
        self.max_entries = max_entries
        self._entries: dict[tuple[str, str], tuple[str, float]] = {}
        self._lock = threading.Lock()

    def get(self, domain: str, ip: str, now: float) -> str | None:
        key = (domain.lower(), ip)
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry[1] <= now:
                del self._entries[key]
                return None
            return entry[0]

    def put(self, domain: str, ip: str, result: str, expires_at: float) -> None:
        with self._lock:
            if len(self._entries) >= self.max_entries:
                self._evict()
            self._entries[(domain.lower(), ip)] = (result, expires_at)

    def __len__(self) -> int:
        return len(self._entries)

    def _evict(self) -> None:
        """Make room: drop the half of the entries that expire first."""
        by_expiry = sorted(self._entries, key=lambda key: self._entries[key][1])
        for key in by_expiry[: len(by_expiry) // 2 + 1]:
            del self._entries[key]


# ---------------------------------------------------------------------------
# The policy: the pipeline's SPF stage
# ---------------------------------------------------------------------------


class _RememberingResolver:
    """Answers each question once per policy call, failures included.

    Several relay IPs and domains usually share most records; asking again
    would only spend the time budget.
    """

    def __init__(self, resolver: Resolver) -> None:
        self._resolver = resolver
        self._answers: dict[tuple[str, str], DnsAnswer | DnsTemporaryError] = {}

    def lookup(self, name: str, rdtype: str, *, timeout: float | None = None) -> DnsAnswer:
        key = (_strip_dot(name).lower(), rdtype)
        if key not in self._answers:
            try:
                self._answers[key] = self._resolver.lookup(name, rdtype, timeout=timeout)
            except DnsTemporaryError as exc:
                self._answers[key] = exc
        answer = self._answers[key]
        if isinstance(answer, DnsTemporaryError):
            raise answer
        return answer


def _resolver_source(resolver: Resolver | Callable[[], Resolver]) -> Callable[[], Resolver]:
    """A function building the (remembering) resolver on first use only."""
    built: list[Resolver] = []

    def get() -> Resolver:
        if not built:
            real = resolver if hasattr(resolver, "lookup") else resolver()
            built.append(_RememberingResolver(real))
        return built[0]

    return get


def _identity_for(sender: str, domain: str) -> str:
    """The address checked for ``domain``: the sender's local-part at that domain."""
    local, at, sender_domain = sender.rpartition("@")
    if at and sender_domain.lower() == domain:
        return sender
    return f"{local or 'postmaster'}@{domain}"


def _unique_domains(domains: Sequence[str]) -> list[str]:
    seen: list[str] = []
    for domain in domains:
        name = _strip_dot(domain.strip()).lower()
        if name and name not in seen:
            seen.append(name)
    return seen


def require_authorised(domains: Sequence[str], relay_ips: Sequence[str], *,
                       accept: Sequence[str], resolver: Resolver | Callable[[], Resolver],
                       hint: str | None, sender: str, budget: float,
                       cache: VerdictCache | None = None, cache_max_ttl: int = 3600,
                       now: Callable[[], float] = time.time) -> None:
    """Every relay IP must get a result in ``accept`` for every domain.

    ``domains`` are the envelope sender's domain and the From domain (duplicates
    are checked once). Raises SpfNotAuthorised at the first refusal; a DNS
    failure (temperror) is never accepted and raises SpfUnavailable unless some
    other pair is refused outright. ``budget`` is the time for the whole call.
    Results other than temperror are cached until their DNS TTL runs out, at
    most ``cache_max_ttl`` seconds; records that look at the sender's address
    are not cached.
    """
    deadline = time.monotonic() + budget
    get_resolver = _resolver_source(resolver)
    unavailable: SpfUnavailable | None = None
    for domain in _unique_domains(domains):
        identity = _identity_for(sender, domain)
        for ip in relay_ips:
            result, problem = _verdict(domain, ip, identity, get_resolver, deadline, cache,
                                       cache_max_ttl, now)
            if result == TEMPERROR:
                unavailable = unavailable or SpfUnavailable(domain, problem or "DNS failure", ip)
            elif result not in accept:
                raise SpfNotAuthorised(domain, ip, result, hint, problem)
    if unavailable is not None:
        raise unavailable


def _verdict(domain: str, ip: str, identity: str, get_resolver: Callable[[], Resolver],
             deadline: float, cache: VerdictCache | None, cache_max_ttl: int,
             now: Callable[[], float]) -> tuple[str, str | None]:
    """(result, problem) for one pair, from the cache when it knows."""
    if cache is not None:
        cached = cache.get(domain, ip, now())
        if cached is not None:
            return cached, None
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        return TEMPERROR, "DNS did not answer within the time limit"
    outcome = check_host(ip, domain, identity, resolver=get_resolver(), budget=remaining,
                         explain=False)  # the refusal line does not show it
    if cache is not None and outcome.result != TEMPERROR and not outcome.uses_sender:
        lifetime = min(cache_max_ttl if outcome.ttl is None else outcome.ttl, cache_max_ttl)
        if lifetime > 0:
            cache.put(domain, ip, outcome.result, now() + lifetime)
    return outcome.result, outcome.problem


# ---------------------------------------------------------------------------
# The report for `sendmail-shim spf check`
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SpfReport:
    """The results for one domain and each relay IP, with their traces."""

    domain: str
    sender: str
    outcomes: tuple[SpfOutcome, ...]

    @property
    def results(self) -> dict[str, str]:
        return {outcome.ip: outcome.result for outcome in self.outcomes}

    def all_pass(self) -> bool:
        return all(outcome.result == PASS for outcome in self.outcomes)

    def as_dict(self) -> dict[str, Any]:
        return {"domain": self.domain, "sender": self.sender,
                "results": [outcome.as_dict() for outcome in self.outcomes]}

    def as_text(self) -> str:
        lines = [f"SPF for {self.domain} (checked as {_one_line(self.sender)})"]
        for outcome in self.outcomes:
            lines.extend(_outcome_lines(outcome))
        return "\n".join(lines)


def _outcome_lines(outcome: SpfOutcome) -> list[str]:
    summary = f"relay {outcome.ip}: {outcome.result}"
    if outcome.matched:
        summary += f" (matched {_one_line(outcome.matched)} in {outcome.matched_in})"
    elif outcome.result == NEUTRAL:
        summary += " (no mechanism matched)"
    lines = ["", summary]
    if outcome.problem:
        lines.append(f"  problem: {_one_line(outcome.problem)}")
    if outcome.explanation:
        lines.append(f"  explanation: {_one_line(outcome.explanation)}")
    ttl = f"; answers valid for {outcome.ttl} s" if outcome.ttl is not None else ""
    lines.append(f"  DNS lookups: {outcome.lookups} of {MAX_DNS_TERMS}, void lookups: "
                 f"{outcome.void_lookups} of {MAX_VOID_LOOKUPS}{ttl}")
    lines.append("  trace:")
    for step in outcome.trace:
        term = f"{_one_line(step.term, 80)}: " if step.term else ""
        lines.append(f"    {'  ' * step.depth}[{step.domain}] {term}{_one_line(step.detail)}")
    return lines


def report(domain: str, ips: Sequence[str], *, resolver: Resolver, sender: str | None = None,
           budget: float = DEFAULT_BUDGET) -> SpfReport:
    """Evaluate ``domain`` for each IP and keep everything an admin needs to see why."""
    name = _strip_dot(domain.strip()).lower()
    identity = sender or f"postmaster@{name}"
    remembering = _RememberingResolver(resolver)
    deadline = time.monotonic() + budget
    outcomes = []
    for ip in ips:
        remaining = max(deadline - time.monotonic(), 0.001)
        outcomes.append(check_host(ip, name, identity, resolver=remembering, budget=remaining))
    return SpfReport(name, identity, tuple(outcomes))
