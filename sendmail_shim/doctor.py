"""``sendmail-shim doctor``: the installation checked the way an attacker would look at it.

Run as root on the web server. Each check tries what a hostile site could
try, or what would make mail fail, and reports one line: ``ok``, ``warn``
or ``fail``, what it found, and the fix. Nothing is changed and no message
is sent.

Checks: a stranger (``nobody``) reaching the relay without AUTH; the files
the gate guards (ledger and queue, password file, log, config) open to
others; the socket's directory and every parent; the gate running,
answering as its own user, and running the config on disk; every Unix-user
binding naming a user that exists; every registered domain's SPF for the
relay addresses; the relay's certificate against the configured trust.
"""

from __future__ import annotations

import os
import pwd
import stat
from dataclasses import asdict, dataclass

from . import trust
from .config import Config, exposed_mode
from .relay import RelayError, Upstream, UpstreamInsecure

OK, WARN, FAIL = "ok", "warn", "fail"


@dataclass(frozen=True)
class Check:
    """One finding: ``status`` is ok, warn or fail; ``fix`` says what to run or change."""

    name: str
    status: str
    found: str
    fix: str = ""

    def as_dict(self) -> dict[str, str]:
        return asdict(self)

    @property
    def line(self) -> str:
        return f"{self.status:<4}  {self.name}: {self.found}" + (f"; fix: {self.fix}" if self.fix else "")


def examine(config: Config, gate_user: str) -> list[Check]:
    """Every check, in the order an admin would fix them."""
    context = Context(config, gate_user)
    checks: list[Check] = []
    for step in (check_relay_from_a_stranger, check_relay_certificate, check_files, check_socket_place,
                 check_gate, check_bindings, check_spf):
        checks.extend(step(context))
    return checks


class Context:
    """What the checks share: the config, the gate's user, and the ledger opened once."""

    def __init__(self, config: Config, gate_user: str) -> None:
        self.config, self.gate_user = config, gate_user
        try:
            entry = pwd.getpwnam(gate_user)
            self.gate: trust.Identity | None = trust.Identity(entry.pw_name, entry.pw_uid, entry.pw_gid)
        except KeyError:
            self.gate = None
        self.as_root = os.geteuid() == 0

    def ledger_url_path(self) -> str | None:
        from .ledger import Ledger

        ledger = Ledger(self.config.ledger.url)
        return ledger.where if ledger.dialect == "sqlite" else None


# ------------------------------------------------------------------ the relay


def check_relay_from_a_stranger(context: Context) -> list[Check]:
    """What any site could do: speak SMTP to the relay itself, without AUTH."""
    name = "relay bypass"
    if not context.as_root:
        return [Check(name, WARN, "not checked: trying the relay as another user needs root",
                      "run sendmail-shim doctor as root")]
    exclude = (0, context.gate.uid) if context.gate else (0,)
    stranger = trust.Identity.probe_user(exclude=exclude)
    upstream = Upstream(context.config.upstream, context.config.path)
    try:
        _ = upstream.tls_context  # loaded here: the stranger need not be able to read the CA file
    except Exception as exc:  # noqa: BLE001 - a ConfigError naming ca_file; the certificate check says more
        return [Check(name, WARN, f"not checked: {exc}", "fix [upstream] ca_file, then run doctor again")]
    report = trust.run_as(stranger, lambda: _mail_without_auth(upstream))
    where = f"{context.config.upstream.host}:{context.config.upstream.port}"
    if report.startswith("2"):
        return [Check(name, FAIL, f"{stranger.name} (uid {stranger.uid}) can send through the relay {where} "
                                  f"without AUTH (it answered MAIL with {report})",
                      f"require AUTH at the relay, or load {trust.EGRESS_RULE_FILE} (nft -f) so that only "
                      f"{context.gate_user} reaches it")]
    if report.startswith("5"):
        return [Check(name, OK, f"the relay {where} refuses MAIL without AUTH from {stranger.name} ({report})")]
    if report.startswith("unreachable"):
        return [Check(name, OK, f"{stranger.name} cannot reach the relay {where} ({report})")]
    return [Check(name, WARN, f"could not tell whether {stranger.name} can use the relay {where}: {report}",
                  "check that the relay is up, then run doctor again")]


def _mail_without_auth(upstream: Upstream) -> str:
    """The child's report: the reply code first, or ``unreachable (…)``."""
    from .relay import UpstreamUnavailable

    try:
        code, text = upstream.mail_without_auth()
    except UpstreamInsecure as exc:
        return f"TLS failed ({exc})"
    except UpstreamUnavailable as exc:
        return f"unreachable ({exc})" if exc.stage in ("connect", "timeout") else f"no answer ({exc})"
    except RelayError as exc:
        return f"no answer ({exc})"
    return f"{code} {text}"


def check_relay_certificate(context: Context) -> list[Check]:
    """The relay's certificate, checked as the gate checks it, from the gate's user (the firewall lets it)."""
    name = "relay certificate"
    upstream = Upstream(context.config.upstream, context.config.path)
    trust_source = context.config.upstream.ca_file or "the system trust store"
    try:
        _ = upstream.tls_context
    except Exception as exc:  # noqa: BLE001 - a ConfigError naming ca_file
        return [Check(name, FAIL, str(exc), "point [upstream] ca_file at a readable PEM file")]
    if context.as_root and context.gate is not None:
        report = trust.run_as(context.gate, lambda: _mail_without_auth(upstream))
    else:
        report = _mail_without_auth(upstream)
    if report.startswith("TLS failed"):
        return [Check(name, FAIL, f"{report} against {trust_source}",
                      "give [upstream] ca_file the relay's CA, or tls_server_name the name its certificate carries")]
    if report[:1].isdigit():
        return [Check(name, OK, f"the relay's certificate verifies against {trust_source}")]
    return [Check(name, WARN, f"not checked: {report}", "check that the relay is up, then run doctor again")]


# ------------------------------------------------------------------ files


def check_files(context: Context) -> list[Check]:
    """What the gate guards must be out of other users' reach."""
    config = context.config
    checks: list[Check] = []
    ledger = context.ledger_url_path()
    if ledger is not None:
        checks.append(_private_file("ledger and queue", ledger, context))
        checks.append(_private_directory("ledger directory", os.path.dirname(os.path.abspath(ledger)), context))
    if config.upstream.password_file:
        checks.append(_private_file("relay password", config.upstream.password_file, context))
    if config.log.file:
        checks.append(_log_file(config.log.file))
    checks.append(_config_file(config.path))
    return checks


def _private_file(name: str, path: str, context: Context) -> Check:
    try:
        info = os.stat(path)
    except OSError as exc:
        return Check(name, WARN, f"{path}: {exc.strerror}", "create it (sendmail-shim db upgrade for the ledger)")
    mode = stat.S_IMODE(info.st_mode)
    owner = trust.Identity.of_uid(info.st_uid).name
    if exposed_mode(info) is not None:
        return Check(name, FAIL, f"{path} is mode {mode:04o}: other users can read or change it",
                     f"chmod 600 {path}")
    if context.gate is not None and info.st_uid not in (context.gate.uid,):
        status = FAIL if info.st_uid != 0 else WARN
        return Check(name, status, f"{path} belongs to {owner}, not to the gate's user {context.gate_user}",
                     f"chown {context.gate_user} {path}")
    return Check(name, OK, f"{path} is {owner}'s alone (mode {mode:04o})")


def _log_file(path: str) -> Check:
    """Sites must not forge or read the decisions (they name other customers' senders and recipients)."""
    name = "decision log"
    try:
        mode = stat.S_IMODE(os.stat(path).st_mode)
    except OSError as exc:
        return Check(name, WARN, f"{path}: {exc.strerror}", "it is created with the first decision")
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        return Check(name, FAIL, f"{path} is mode {mode:04o}: other users can write it", f"chmod 600 {path}")
    if mode & stat.S_IROTH and _reachable_by_everyone(path):
        return Check(name, FAIL, f"{path} is mode {mode:04o}: every user can read it", f"chmod 600 {path}")
    return Check(name, OK, f"{path} (mode {mode:04o}) is out of other users' reach")


def _reachable_by_everyone(path: str) -> bool:
    directory = os.path.dirname(os.path.abspath(path))
    while True:
        if not os.stat(directory).st_mode & stat.S_IXOTH:
            return False
        if directory == "/":
            return True
        directory = os.path.dirname(directory)


def _private_directory(name: str, path: str, context: Context) -> Check:
    try:
        info = os.stat(path)
    except OSError as exc:
        return Check(name, WARN, f"{path}: {exc.strerror}", f"install -d -o {context.gate_user} -m 0700 {path}")
    mode = stat.S_IMODE(info.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH):
        return Check(name, FAIL, f"{path} is mode {mode:04o}: other users can replace the ledger",
                     f"chmod 700 {path}")
    if exposed_mode(info) is not None:
        return Check(name, WARN, f"{path} is mode {mode:04o}: other users can list it", f"chmod 700 {path}")
    return Check(name, OK, f"{path} is mode {mode:04o}")


def _config_file(path: str) -> Check:
    name = "config file"
    try:
        info = os.stat(path)
    except OSError as exc:
        return Check(name, FAIL, f"{path}: {exc.strerror}")
    mode = stat.S_IMODE(info.st_mode)
    if mode & (stat.S_IWGRP | stat.S_IWOTH) or info.st_uid != 0:
        return Check(name, FAIL, f"{path} (owner uid {info.st_uid}, mode {mode:04o}) can be changed by users "
                                 f"other than root", f"chown root {path} && chmod 644 {path}")
    return Check(name, OK, f"{path} belongs to root, mode {mode:04o}")


# ------------------------------------------------------------------ the socket and the gate


def check_socket_place(context: Context) -> list[Check]:
    from .gate import socket_place_problem

    socket_path = context.config.gate.socket
    if not socket_path:
        return [Check("gate socket", WARN, "[gate] socket is not set: sendmail runs in-process, and every "
                                           "site can read the ledger it writes", "set [gate] socket")]
    checks = []
    if context.config.gate.user is None:
        checks.append(Check("gate user", WARN, "[gate] user is not set: sendmail trusts whoever owns the socket",
                            f'set [gate] user = "{context.gate_user}"'))
    directory = os.path.dirname(socket_path)
    gate_uid = context.gate.uid if context.gate else 0
    try:
        problem = socket_place_problem(directory, gate_uid, context.gate_user)
    except OSError as exc:
        return [*checks, Check("socket directory", FAIL, f"{directory}: {exc.strerror}",
                               "enable sendmail-shim-gate.socket, which creates it")]
    if problem:
        return [*checks, Check("socket directory", FAIL, problem)]
    return [*checks, Check("socket directory", OK, f"{directory} and every directory above it are safe from "
                                                   f"other users")]


def check_gate(context: Context) -> list[Check]:
    """The gate answers, as its own user, with the config that is on disk now."""
    from . import gate_client

    socket_path = context.config.gate.socket
    if not socket_path:
        return []
    target = gate_client.GateTarget(socket_path, 10.0, gate_user=context.config.gate.user or context.gate_user)
    try:
        status = gate_client.ask(target, "status")
    except gate_client.GateClientError as exc:
        return [Check("gate", FAIL, str(exc).removeprefix("not sent: "),
                      "systemctl enable --now sendmail-shim-gate.socket sendmail-shim-gate.service")]
    checks = [Check("gate", OK, f"running as {status.get('user')} (pid {status.get('pid')}), "
                                f"version {status.get('version')}, started {status.get('started_at')}")]
    checks.append(_trust_state(status))
    checks.append(_config_on_disk(status))
    return checks


def _trust_state(status: dict[str, object]) -> Check:
    state = status.get("trust") if isinstance(status.get("trust"), dict) else {}
    assert isinstance(state, dict)
    mode, how = state.get("mode"), state.get("state")
    if how == "verified" and mode in ("auth", "egress"):
        return Check("gate trust", OK, f"the gate verified at start that only it can reach the relay ({mode})")
    if mode == "single-tenant":
        return Check("gate trust", WARN, "[gate] trust = \"single-tenant\": nothing keeps sites from the relay",
                     "on a shared server require AUTH at the relay or set [gate] egress = \"restricted\"")
    return Check("gate trust", WARN, f"the gate has not verified the relay yet ({how}); mail waits in the queue",
                 "check that the relay is up: journalctl -u sendmail-shim-gate")


def _config_on_disk(status: dict[str, object]) -> Check:
    from .gate_client import config_drift

    drift = config_drift(status)
    if drift is not None:
        return Check("gate config", FAIL, *drift)
    loaded = status.get("config") if isinstance(status.get("config"), dict) else {}
    assert isinstance(loaded, dict)
    return Check("gate config", OK, f"the gate runs {loaded.get('path')} as it is on disk "
                                    f"(loaded {loaded.get('loaded_at')})")


# ------------------------------------------------------------------ the ledger's contents


def check_bindings(context: Context) -> list[Check]:
    from .ledger import Ledger, LedgerError

    try:
        customers = Ledger.from_config(context.config).list_customers()
    except LedgerError as exc:
        return [Check("bindings", FAIL, str(exc), "sendmail-shim db upgrade")]
    missing = [f"{user} (customer {customer.id})" for customer in customers for user in customer.unix_users
               if not _user_exists(user)]
    if missing:
        return [Check("bindings", FAIL, f"bound Unix users that do not exist: {', '.join(missing)}",
                      "create the users, or sendmail-shim customer unbind USER")]
    count = sum(len(customer.unix_users) for customer in customers)
    return [Check("bindings", OK, f"all {count} bound Unix users exist")]


def _user_exists(name: str) -> bool:
    try:
        pwd.getpwnam(name)
    except KeyError:
        return False
    return True


def check_spf(context: Context) -> list[Check]:
    """Every registered domain, as the gate would check it today: those listed will be refused."""
    from . import spf
    from .dnsclient import NetworkResolver
    from .ledger import Ledger, LedgerError

    cfg = context.config.spf
    if not cfg.enabled:
        return [Check("spf", WARN, "[spf] enabled = false: no domain's SPF record is checked")]
    try:
        domains = sorted({d for c in Ledger.from_config(context.config).list_customers() for d in c.domains})
    except LedgerError as exc:
        return [Check("spf", FAIL, str(exc))]
    resolver = NetworkResolver.from_config(cfg.nameservers, cfg.timeout)
    refused, unknown = [], []
    for domain in domains:
        results = set(spf.report(domain, cfg.relay_ips, resolver=resolver, budget=cfg.timeout).results.values())
        if spf.TEMPERROR in results:
            unknown.append(domain)
        elif not results <= set(cfg.accept):
            refused.append(f"{domain} ({', '.join(sorted(results))})")
    return _spf_checks(len(domains), refused, unknown, cfg.hint)


def _spf_checks(count: int, refused: list[str], unknown: list[str], hint: str | None) -> list[Check]:
    checks = []
    if refused:
        fix = f"the customers must add {hint} to their SPF records" if hint else "the customers must fix their SPF"
        checks.append(Check("spf", FAIL, f"{len(refused)} of {count} domains will be refused: "
                                         f"{', '.join(refused)}", fix))
    if unknown:
        checks.append(Check("spf", WARN, f"DNS did not answer for: {', '.join(unknown)}",
                            "check [spf] nameservers and the resolver"))
    if not checks:
        checks.append(Check("spf", OK, f"all {count} registered domains authorise the relay addresses"))
    return checks


def failed(checks: list[Check]) -> bool:
    return any(check.status == FAIL for check in checks)

