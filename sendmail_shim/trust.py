"""Who can reach the relay: the checks that keep a shared server from being bypassed.

A site's own code can always speak SMTP itself, so the gate is a boundary
only if the relay refuses everyone but the gate. One of these must hold, and
the gate verifies it at start (``doctor`` runs the same probes):

* **AUTH**: the relay refuses ``MAIL`` from a session that did not
  authenticate, and the credentials are readable by the gate's user alone
  (``[upstream] password_file`` mode 0600, owned by that user);
* **egress** (``[gate] egress = "restricted"``): the host firewall lets only
  the gate's user reach the relay. Verified by trying to connect as an
  unprivileged uid (``nobody``), which must fail, while the gate's own
  connect succeeds. Switching to another uid needs root, so this needs a
  gate started as root with ``--user``.

``[gate] trust = "single-tenant"`` is the only way to run without either.

A relay that cannot be reached at all proves nothing either way: the
verdict is then *pending*, never "trusted" (see ``gate.py`` for what the
gate does meanwhile).
"""

from __future__ import annotations

import os
import pwd
import socket
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from .config import Config, UpstreamConfig, exposed_mode
from .relay import RelayError, Upstream

VERIFIED, REFUTED, UNKNOWN = "verified", "refuted", "unknown"
EGRESS_RULE_FILE = "/etc/sendmail-shim/egress.nft"
PROBE_USER = "nobody"
NOBODY_UID = 65534
PROBE_TIMEOUT = 10.0  # a firewall that drops rather than rejects makes the stranger's connect wait


class TrustError(Exception):
    """Nothing keeps sites from reaching the relay past the gate; ``str(exc)`` is the admin's line."""


@dataclass(frozen=True)
class Probe:
    """One check: ``outcome`` is VERIFIED, REFUTED or UNKNOWN (the relay could not be asked)."""

    outcome: str
    found: str


@dataclass(frozen=True)
class Assessment:
    """What keeps the relay for the gate alone, and how sure we are."""

    outcome: str  # VERIFIED, REFUTED, UNKNOWN
    mode: str  # "auth", "egress", "single-tenant", or "" when nothing holds
    probes: dict[str, Probe]

    @property
    def summary(self) -> str:
        return "; ".join(f"{name}: {probe.found}" for name, probe in self.probes.items())


@dataclass(frozen=True)
class Identity:
    """A Unix user as the probes need it."""

    name: str
    uid: int
    gid: int

    @classmethod
    def of_uid(cls, uid: int) -> Identity:
        try:
            entry = pwd.getpwuid(uid)
        except KeyError:
            return cls(f"uid {uid}", uid, uid)
        return cls(entry.pw_name, entry.pw_uid, entry.pw_gid)

    @classmethod
    def probe_user(cls, exclude: tuple[int, ...]) -> Identity:
        """``nobody`` (or uid 65534), the stranger whose connect must fail."""
        try:
            entry = pwd.getpwnam(PROBE_USER)
            found = cls(entry.pw_name, entry.pw_uid, entry.pw_gid)
        except KeyError:
            found = cls(PROBE_USER, NOBODY_UID, NOBODY_UID)
        if found.uid in exclude:
            raise TrustError(f"the probe user {found.name} is the gate's own user; give the gate a user of its own")
        return found


# ------------------------------------------------------------------ the verdict


def assess(config: Config, upstream: Upstream, gate: Identity, *, egress: Probe | None = None) -> Assessment:
    """Run the checks ``config`` asks for, as a gate that will serve as ``gate``.

    ``egress`` is the egress probe when it was run earlier (as root, before
    the gate dropped its privileges); otherwise it is run now.
    """
    if config.gate.trust == "single-tenant":
        return Assessment(VERIFIED, "single-tenant", {"trust": Probe(VERIFIED, "single-tenant by configuration")})
    probes = {"auth": auth_probe(config.upstream, upstream, gate.uid)}
    if config.gate.egress == "restricted":
        probes["egress"] = egress or egress_probe(config.upstream, gate, may_switch_uid=os.geteuid() == 0)
    for mode, probe in probes.items():
        if probe.outcome == VERIFIED:
            return Assessment(VERIFIED, mode, probes)
    unknown = any(probe.outcome == UNKNOWN for probe in probes.values())
    return Assessment(UNKNOWN if unknown else REFUTED, "", probes)


def refusal(assessment: Assessment, gate: Identity) -> TrustError:
    """The one line that names the risk and both fixes."""
    return TrustError(
        f"not started: {assessment.summary}; so any site on this server could reach the relay without "
        f"the gate. Fix one: require AUTH at the relay and set [upstream] username and password_file "
        f"(mode 0600, owned by {gate.name}), or let only {gate.name} reach the relay (load "
        f"{EGRESS_RULE_FILE} with nft -f and set [gate] egress = \"restricted\"). "
        f"Only a server with a single customer may set [gate] trust = \"single-tenant\""
    )


# ------------------------------------------------------------------ AUTH


def auth_probe(config: UpstreamConfig, upstream: Upstream, gate_uid: int) -> Probe:
    """VERIFIED when the relay wants AUTH and only the gate can read the credentials."""
    if not (config.username and config.password_file):
        return Probe(REFUTED, "[upstream] sets no username and password_file")
    private = credentials_private(config.password_file, gate_uid)
    if private is not None:
        return Probe(REFUTED, private)
    return relay_refuses_strangers(upstream)


def credentials_private(path: str, gate_uid: int) -> str | None:
    """None when ``path`` is mode 0600 (or stricter) and owned by ``gate_uid``; else what is wrong."""
    try:
        info = os.stat(path)
    except OSError as exc:
        return f"{path} cannot be read ({exc.strerror})"
    mode = exposed_mode(info)
    if mode is not None:
        return f"{path} is mode {mode:04o}, so others can read the relay password"
    if info.st_uid != gate_uid:
        return (f"{path} belongs to {Identity.of_uid(info.st_uid).name}, not to the gate's user "
                f"{Identity.of_uid(gate_uid).name}")
    return None


def relay_refuses_strangers(upstream: Upstream) -> Probe:
    """Ask the relay to take mail from a TLS session that did not authenticate."""
    where = f"{upstream.config.host}:{upstream.config.port}"
    try:
        code, text = upstream.mail_without_auth()
    except RelayError as exc:
        return Probe(UNKNOWN, f"the relay could not be asked whether it requires AUTH ({exc})")
    if 500 <= code < 600:
        return Probe(VERIFIED, f"the relay {where} refuses MAIL without AUTH ({code} {text})")
    if 200 <= code < 300:
        return Probe(REFUTED, f"the relay {where} accepts MAIL without AUTH ({code} {text})")
    return Probe(UNKNOWN, f"the relay {where} answered MAIL without AUTH with {code} {text}")


# ------------------------------------------------------------------ egress


def egress_probe(config: UpstreamConfig, gate: Identity, *, may_switch_uid: bool) -> Probe:
    """VERIFIED when a stranger cannot connect to the relay and the gate's user can."""
    where = f"{config.host}:{config.port}"
    if not may_switch_uid:
        return Probe(REFUTED, f"egress = \"restricted\" is verified by connecting as another user, which "
                              f"needs a gate started as root with --user {gate.name} (the packaged unit does)")
    stranger = Identity.probe_user(exclude=(0, gate.uid))
    timeout = min(config.timeout, PROBE_TIMEOUT)
    reached, how = connect_as(stranger, config.host, config.port, timeout)
    if reached:
        return Probe(REFUTED, f"{stranger.name} (uid {stranger.uid}) reached the relay {where} directly")
    control, control_how = connect_as(gate, config.host, config.port, timeout)
    if not control:
        return Probe(UNKNOWN, f"the relay {where} cannot be reached, not even by {gate.name} ({control_how})")
    return Probe(VERIFIED, f"only {gate.name} reaches the relay {where} ({stranger.name}: {how})")


def connect_as(user: Identity, host: str, port: int, timeout: float) -> tuple[bool, str]:
    """(connected, how) for a TCP connect by a child process running as ``user`` alone."""
    try:
        addresses = [(info[0], info[4]) for info in socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)]
    except OSError as exc:
        return False, f"cannot resolve {host} ({exc.strerror or exc})"
    report = run_as(user, lambda: _connect_any(addresses, timeout))
    return report.startswith("connected"), report


def run_as(user: Identity, work: Callable[[], str]) -> str:
    """``work()``'s report, as a forked child that became ``user`` alone (groups, gid, uid) first."""
    import encodings.idna  # noqa: F401 - the child may no longer read the library to import it
    import smtplib  # noqa: F401

    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child reports through the pipe
        os.close(reader)
        try:
            os.setgroups([])
            os.setgid(user.gid)
            os.setuid(user.uid)
        except OSError as exc:
            report = f"cannot become {user.name} ({exc.strerror})"
        else:
            try:
                report = work()
            except BaseException as exc:  # noqa: BLE001 - whatever happens, the parent must hear of it
                report = f"the probe failed ({type(exc).__name__}: {exc})"
        os.write(writer, report.encode("utf-8", "replace")[:1024])
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as pipe:
        report = pipe.read().decode("utf-8", "replace")
    os.waitpid(pid, 0)
    return report or "the probe process died"


def _connect_any(addresses: Sequence[tuple[int, Any]], timeout: float) -> str:
    reason = "no address"
    for family, address in addresses:
        with socket.socket(family, socket.SOCK_STREAM) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect(address)
                return f"connected to {address[0]}"
            except TimeoutError:
                reason = "timed out"
            except OSError as exc:
                reason = exc.strerror or str(exc)
    return reason
