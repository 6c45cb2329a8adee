"""The configuration file, ``/etc/sendmail-shim/config.toml`` by default.

``SENDMAIL_SHIM_CONFIG`` names another file. Every error names the file, the
key and what is wrong, and the caller gets exit 78 (EX_CONFIG). Unknown keys
are errors too: a misspelt key must not silently fall back to a default.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .charsets import DEFAULT_LEGACY_CHARSET, ascii_compatible
from .limits import DEFAULT_ACCOUNT_RULES, DEFAULT_CUSTOMER_RULES, Rule, RuleSyntaxError, parse_rule

try:
    import tomllib
except ModuleNotFoundError:  # pragma: no cover - tomli stands in where tomllib is missing
    import tomli as tomllib  # type: ignore[no-redef]

if TYPE_CHECKING:
    from .notice_templates import NoticeTemplate  # loaded with a [notify] section only

DEFAULT_PATH = "/etc/sendmail-shim/config.toml"
ENV_VAR = "SENDMAIL_SHIM_CONFIG"
DEFAULT_LEDGER_URL = "sqlite:////var/lib/sendmail-shim/ledger.db"


class ConfigError(Exception):
    """The configuration is missing or invalid (exit 78)."""

    def __init__(self, path: str, key: str | None, problem: str) -> None:
        self.path, self.key, self.problem = path, key, problem
        where = f"{path}: {key}: " if key else f"{path}: "
        super().__init__(where + problem)


# RFC 5321 section 4.5.3.2's minimum waits for each stage's reply, in seconds.
STAGE_TIMEOUTS = {"greeting_timeout": 300.0, "mail_timeout": 300.0, "rcpt_timeout": 300.0,
                  "data_timeout": 120.0, "block_timeout": 180.0, "dot_timeout": 600.0}


@dataclass(frozen=True)
class UpstreamConfig:
    host: str
    port: int = 25
    ca_file: str | None = None
    tls_server_name: str | None = None
    helo: str | None = None
    timeout: float = 30.0  # connect, TLS, EHLO, AUTH; and each command of the synchronous path
    username: str | None = None
    password_file: str | None = None
    # The waits of RFC 5321 section 4.5.3.2 (docs/configuration.md says what each one bounds).
    greeting_timeout: float = STAGE_TIMEOUTS["greeting_timeout"]
    mail_timeout: float = STAGE_TIMEOUTS["mail_timeout"]
    rcpt_timeout: float = STAGE_TIMEOUTS["rcpt_timeout"]
    data_timeout: float = STAGE_TIMEOUTS["data_timeout"]  # the reply to DATA itself
    block_timeout: float = STAGE_TIMEOUTS["block_timeout"]  # sending each block of the message
    dot_timeout: float = STAGE_TIMEOUTS["dot_timeout"]  # the reply to the final dot
    sync_timeout: float | None = None  # all of one synchronous attempt; None: as long as ``timeout``

    @property
    def sync_budget(self) -> float:
        """How long a caller of ``sendmail`` waits for the upstream at most."""
        return self.timeout if self.sync_timeout is None else self.sync_timeout


@dataclass(frozen=True)
class LedgerConfig:
    url: str = DEFAULT_LEDGER_URL
    busy_timeout: float = 10.0
    reservation_timeout: int = 3600  # an unsettled reservation counts this long, then is resolved
    keep_queue: int = 30 * 86400  # finished queue messages are kept this long
    keep_decisions: int = 90 * 86400  # the decision log is kept this long; the audit log for good


@dataclass(frozen=True)
class SpfConfig:
    relay_ips: tuple[str, ...] = ()
    nameservers: tuple[str, ...] = ()
    accept: tuple[str, ...] = ("pass",)
    hint: str | None = None
    timeout: float = 10.0
    cache_max_ttl: int = 3600
    enabled: bool = True


@dataclass(frozen=True)
class LimitsConfig:
    account: tuple[Rule, ...] = tuple(parse_rule(r) for r in DEFAULT_ACCOUNT_RULES)
    customer: tuple[Rule, ...] = tuple(parse_rule(r) for r in DEFAULT_CUSTOMER_RULES)


@dataclass(frozen=True)
class MessageConfig:
    max_size: int = 10 * 1024 * 1024
    max_recipients: int = 1000
    qualify_domain: str | None = None
    max_header_size: int = 256 * 1024  # the whole header section, folded lines included
    legacy_charset: str = DEFAULT_LEGACY_CHARSET  # for header bytes that are not UTF-8 and declare nothing


EGRESS_MODES = ("open", "restricted")
TRUST_MODES = ("shared", "single-tenant")
DEFAULT_BACKLOG = 1024
DEFAULT_UPLOAD_MEMORY = 96 * 1024 * 1024
_USER_NAME = re.compile(r"^[a-z_][a-z0-9_.-]{0,31}\$?$", re.IGNORECASE)


@dataclass(frozen=True)
class GateConfig:
    socket: str | None = None
    user: str | None = None  # the gate's Unix user: the only peer (besides root) sendmail accepts
    egress: str = "open"  # "restricted": the host firewall lets only the gate's user reach the relay
    trust: str = "shared"  # "single-tenant": run without AUTH or an egress rule, warned at every start
    backlog: int = DEFAULT_BACKLOG
    allow_unbound: bool = False
    max_connections_per_uid: int = 16
    request_timeout: float = 120.0
    upload_memory: int = DEFAULT_UPLOAD_MEMORY  # bytes the large messages being processed may hold in all
    max_uploads_per_uid: int = 1  # large messages processed at once per Unix user; more wait their turn


@dataclass(frozen=True)
class QueueConfig:
    enabled: bool = True
    min_backoff: int = 300
    max_backoff: int = 4 * 3600
    max_age: int = 5 * 86400
    lease: int = 600  # how long a runner may hold a message before another may take it over


@dataclass(frozen=True)
class LogConfig:
    syslog: bool = True
    file: str | None = None
    repeat_limit: int = 10  # similar lines per caller uid and reason in each window; 0: no limit
    repeat_window: int = 60  # seconds; then one line says how many were suppressed


DEFAULT_TOP_CUSTOMERS = 10
MAX_TOP_CUSTOMERS = 100  # the customer label's values are bounded: at most this many, plus "(other)"


@dataclass(frozen=True)
class MetricsConfig:
    listen: str | None = None  # "127.0.0.1:9525" (a loopback address) or a UNIX socket's path; None: off
    top_customers: int = DEFAULT_TOP_CUSTOMERS  # customers named in the usage gauges, closest to a limit first
    textfile: str | None = None  # where `sendmail-shim metrics write` puts node-exporter's textfile

    @property
    def unix_socket(self) -> str | None:
        return self.listen if self.listen is not None and self.listen.startswith("/") else None

    @property
    def address(self) -> tuple[str, int] | None:
        """(host, port) of a TCP ``listen``; None for a UNIX socket or when off."""
        if self.listen is None or self.unix_socket is not None:
            return None
        return _split_host_port(self.listen, default_port=None)


MAX_ABUSE_WINDOW = 86400  # seconds; the ledger keeps recipient outcomes a day (retention.MARGIN)


@dataclass(frozen=True)
class AbuseConfig:
    """[abuse]: when an account is blocked by itself. Without the section, never."""

    enabled: bool = True  # with the section; Config's default (no section) is off
    failed_share: float = 0.5  # of recipients failed (5xx) or deferred (4xx) in failed_window ...
    failed_min: int = 20  # ... once at least this many of them failed or were deferred
    failed_window: int = 3600
    limit_refusals: int = 50  # more refusals by the limits than this in limit_window
    limit_window: int = 600


@dataclass(frozen=True)
class NotifyConfig:
    """``[notify]``: notices near and at a limit, and on an automatic block (no section: none)."""

    sender: str = field(metadata={"key": "from"})  # the From of every notice ("from" is a Python keyword)
    admin: tuple[str, ...] = ()  # a copy of every notice goes here too
    warn_at: float = 0.8  # the share of a rule at which the warning goes
    language: str = "en"
    templates: str | None = None  # a directory whose KIND.LANGUAGE.txt files replace the built-in ones
    # The directory's templates by kind, checked with the config so that a bad one is a config error.
    texts: dict[str, NoticeTemplate] = field(default_factory=dict, compare=False, repr=False,
                                             metadata={"key": None})

    def template(self, kind: str) -> NoticeTemplate:
        """The admin's template for this kind, else the built-in one."""
        from .notice_templates import builtin as builtin_template

        return self.texts.get(kind) or builtin_template(kind, self.language)


@dataclass(frozen=True)
class Config:
    path: str
    upstream: UpstreamConfig
    ledger: LedgerConfig = field(default_factory=LedgerConfig)
    spf: SpfConfig = field(default_factory=SpfConfig)
    limits: LimitsConfig = field(default_factory=LimitsConfig)
    message: MessageConfig = field(default_factory=MessageConfig)
    gate: GateConfig = field(default_factory=GateConfig)
    queue: QueueConfig = field(default_factory=QueueConfig)
    log: LogConfig = field(default_factory=LogConfig)
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    abuse: AbuseConfig = field(default_factory=lambda: AbuseConfig(enabled=False))
    notify: NotifyConfig | None = None
    sha256: str | None = None  # of the file's bytes as loaded: which config a running gate holds


def check_private_file(config_path: str, key: str, path: str, info: os.stat_result | None = None) -> None:
    """Refuse (ConfigError) a file holding a secret that another user could read or change.

    The relay password and the SQLite ledger must be mode 0600 (or stricter)
    and belong to the user who reads them or to root. Root may check on the
    service user's behalf, so for root any owner passes. ``info`` is the
    file's ``fstat`` when the caller has it open already.
    """
    if info is None:
        try:
            info = os.stat(path)
        except OSError as exc:
            raise ConfigError(config_path, key, f"cannot read {path} ({exc.strerror})") from None
    mode = exposed_mode(info)
    if mode is not None:
        raise ConfigError(config_path, key, f"{path} is open to other users (mode {mode:04o}, must be 0600); "
                                            f"run: chmod 600 {path}")
    reader = os.geteuid()
    if reader != 0 and info.st_uid not in (0, reader):
        raise ConfigError(config_path, key, f"{path} belongs to {_user_label(info.st_uid)}, not to the user "
                                            f"reading it ({_user_label(reader)}) or root; "
                                            f"run: chown {_user_label(reader)} {path}")


def exposed_mode(info: os.stat_result) -> int | None:
    """The permission bits when any group or other bit is set (a secret others can reach), else None."""
    mode = info.st_mode & 0o7777
    return mode if mode & 0o077 else None


def _user_label(uid: int) -> str:
    import pwd

    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"


def config_path() -> str:
    return os.environ.get(ENV_VAR) or DEFAULT_PATH


def load(path: str | None = None) -> Config:
    """Read and validate the config file; raise ConfigError naming file and key."""
    path = path or config_path()
    try:
        with open(path, "rb") as handle:
            content = handle.read()
        data = tomllib.loads(content.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise ConfigError(path, None, f"not valid TOML: not UTF-8 ({exc.reason})") from None
    except FileNotFoundError:
        raise ConfigError(path, None, "file not found (set SENDMAIL_SHIM_CONFIG or create it)") from None
    except PermissionError:
        raise ConfigError(path, None, "permission denied reading the file") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(path, None, f"not valid TOML: {exc}") from None
    import dataclasses
    import hashlib

    return dataclasses.replace(from_mapping(data, path), sha256=hashlib.sha256(content).hexdigest())


def from_mapping(data: dict[str, Any], path: str = "<config>") -> Config:
    known = {"upstream", "ledger", "spf", "limits", "message", "gate", "queue", "log", "metrics", "abuse", "notify"}
    for name in data:
        if name not in known:
            raise ConfigError(path, name, f"unknown section (known: {', '.join(sorted(known))})")
    if "upstream" not in data:
        raise ConfigError(path, "upstream.host", "missing: the [upstream] section is required")
    return Config(
        path=path,
        upstream=_upstream(_Section(data, "upstream", path)),
        ledger=_ledger(_Section(data, "ledger", path)),
        spf=_spf(_Section(data, "spf", path)),
        limits=_limits(_Section(data, "limits", path)),
        message=_message(_Section(data, "message", path)),
        gate=_gate(_Section(data, "gate", path)),
        queue=_queue(_Section(data, "queue", path)),
        log=_log(_Section(data, "log", path)),
        metrics=_metrics(_Section(data, "metrics", path)),
        abuse=_abuse(_Section(data, "abuse", path), present="abuse" in data),
        notify=_notify(_Section(data, "notify", path)) if "notify" in data else None,
    )


class _Section:
    """Typed access to one table; ``done()`` rejects keys nobody asked for."""

    def __init__(self, data: dict[str, Any], name: str, path: str) -> None:
        table = data.get(name, {})
        if not isinstance(table, dict):
            raise ConfigError(path, name, f"must be a table ([{name}])")
        self.table, self.name, self.path = table, name, path
        self.asked: set[str] = set()

    def error(self, key: str, problem: str) -> ConfigError:
        return ConfigError(self.path, f"{self.name}.{key}", problem)

    def _get(self, key: str, kinds: tuple[type, ...], wording: str) -> Any:
        self.asked.add(key)
        if key not in self.table:
            return None
        value = self.table[key]
        if isinstance(value, bool) and bool not in kinds:
            raise self.error(key, f"must be {wording}, not a boolean")
        if not isinstance(value, kinds):
            raise self.error(key, f"must be {wording}, not {type(value).__name__} {value!r}")
        return value

    def string(self, key: str, default: str | None = None, required: bool = False) -> str | None:
        value = self._get(key, (str,), "a string")
        if value is None:
            if required:
                raise self.error(key, "missing: this key is required")
            return default
        if not value.strip():
            raise self.error(key, "must not be empty")
        if any(ord(c) < 32 for c in value):
            raise self.error(key, "must not contain control characters")
        return str(value)

    def number(self, key: str, default: float, minimum: float = 0, maximum: float | None = None) -> float:
        value = self._get(key, (int, float), "a number")
        if value is None:
            return default
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise self.error(key, f"must be {bound}, not {value}")
        return float(value)

    def integer(self, key: str, default: int, minimum: int = 0, maximum: int | None = None) -> int:
        value = self._get(key, (int,), "an integer")
        if value is None:
            return default
        if value < minimum or (maximum is not None and value > maximum):
            bound = f"between {minimum} and {maximum}" if maximum is not None else f"at least {minimum}"
            raise self.error(key, f"must be {bound}, not {value}")
        return int(value)

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        """One of ``choices``; the first is the default."""
        value = self.string(key, choices[0])
        if value not in choices:
            raise self.error(key, f"{value!r} is not one of: {', '.join(repr(c) for c in choices)}")
        return str(value)

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key, (bool,), "true or false")
        return default if value is None else bool(value)

    def strings(self, key: str, default: tuple[str, ...]) -> tuple[str, ...]:
        value = self._get(key, (list,), "a list of strings")
        if value is None:
            return default
        if not all(isinstance(item, str) and item.strip() for item in value):
            raise self.error(key, "must be a list of non-empty strings")
        return tuple(value)

    def duration(self, key: str, default: int) -> int:
        value = self._get(key, (int, str), 'a number of seconds or a duration such as "5d"')
        if value is None:
            return default
        seconds = parse_duration(value)
        if seconds is None or seconds <= 0:
            raise self.error(key, f'{value!r} is not a duration (write e.g. 300, "5m", "4h" or "5d")')
        return seconds

    def done(self) -> None:
        for key in self.table:
            if key not in self.asked:
                raise self.error(key, "unknown key")


_DURATION = re.compile(r"^\s*(\d+)\s*([smhd]?)\s*$")


def parse_duration(value: int | str) -> int | None:
    if isinstance(value, int):
        return value
    match = _DURATION.match(value.lower())
    if not match:
        return None
    return int(match[1]) * {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]


def _upstream(s: _Section) -> UpstreamConfig:
    password_file = s.string("password_file")
    username = s.string("username")
    if password_file and not username:
        raise s.error("username", "missing: password_file is set, so a username is required")
    if username and not password_file:
        raise s.error("password_file", "missing: username is set; give the password in a 0600 file")
    host = s.string("host", required=True)
    assert host is not None
    config = UpstreamConfig(
        host=host,
        port=s.integer("port", 25, 1, 65535),
        ca_file=s.string("ca_file"),
        tls_server_name=s.string("tls_server_name"),
        helo=s.string("helo"),
        timeout=s.number("timeout", 30.0, 0.1, 3600),
        username=username,
        password_file=password_file,
        **{key: s.number(key, default, 0.1, 3600) for key, default in STAGE_TIMEOUTS.items()},
        sync_timeout=s.number("sync_timeout", 0.0, 0.1, 3600) or None,  # absent: 0, so as long as timeout
    )
    s.done()
    return config


def _ledger(s: _Section) -> LedgerConfig:
    url = s.string("url", DEFAULT_LEDGER_URL)
    assert url is not None
    if "://" not in url:
        raise s.error("url", f"{url!r} is not an SQLAlchemy URL (e.g. sqlite:////var/lib/sendmail-shim/ledger.db)")
    config = LedgerConfig(
        url=url,
        busy_timeout=s.number("busy_timeout", 10.0, 0.1, 600),
        reservation_timeout=s.duration("reservation_timeout", 3600),
        keep_queue=s.duration("keep_queue", 30 * 86400),
        keep_decisions=s.duration("keep_decisions", 90 * 86400),
    )
    s.done()
    return config


def _spf(s: _Section) -> SpfConfig:
    import ipaddress

    relay_ips = s.strings("relay_ips", ())
    for ip in relay_ips:
        try:
            ipaddress.ip_address(ip)
        except ValueError:
            raise s.error("relay_ips", f"{ip!r} is not an IP address") from None
    nameservers = s.strings("nameservers", ())
    for server in nameservers:
        if _split_host_port(server) is None:
            raise s.error("nameservers", f"{server!r} is not an address (write 192.0.2.53 or 127.0.0.1:5353)")
    accept = s.strings("accept", ("pass",))
    results = {"pass", "neutral", "softfail", "none", "fail", "permerror", "temperror"}
    for result in accept:
        if result not in results:
            raise s.error("accept", f"{result!r} is not an SPF result ({', '.join(sorted(results))})")
    enabled = s.boolean("enabled", True)
    if enabled and not relay_ips:
        raise s.error("relay_ips", "missing: list the upstream's outgoing IP addresses (or set enabled = false)")
    config = SpfConfig(
        relay_ips=relay_ips,
        nameservers=nameservers,
        accept=accept,
        hint=s.string("hint"),
        timeout=s.number("timeout", 10.0, 0.1, 120),
        cache_max_ttl=s.integer("cache_max_ttl", 3600, 0, 86400),
        enabled=enabled,
    )
    s.done()
    return config


def _split_host_port(text: str, default_port: int | None = 53) -> tuple[str, int] | None:
    """``127.0.0.1:5353`` → (host, port); ``[::1]:53``, ``::1`` and bare hosts too (with ``default_port``)."""
    import ipaddress

    host, port = text, default_port
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            return None
        host, rest = text[1:end], text[end + 1:]
        if rest:
            if not rest.startswith(":") or not rest[1:].isdigit():
                return None
            port = int(rest[1:])
    elif text.count(":") == 1:
        host, _, port_text = text.partition(":")
        if not port_text.isdigit():
            return None
        port = int(port_text)
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return None
    return (host, port) if port is not None and 0 < port < 65536 else None


def nameserver_address(text: str) -> tuple[str, int]:
    """A validated ``[spf] nameservers`` entry as (host, port)."""
    parsed = _split_host_port(text)
    if parsed is None:
        raise ValueError(f"{text!r} is not a nameserver address")
    return parsed


def _limits(s: _Section) -> LimitsConfig:
    def rules(key: str, default: tuple[str, ...]) -> tuple[Rule, ...]:
        try:
            return tuple(parse_rule(text) for text in s.strings(key, default))
        except RuleSyntaxError as exc:
            raise s.error(key, str(exc)) from None

    config = LimitsConfig(
        account=rules("account", DEFAULT_ACCOUNT_RULES),
        customer=rules("customer", DEFAULT_CUSTOMER_RULES),
    )
    s.done()
    return config


def _message(s: _Section) -> MessageConfig:
    domain = s.string("qualify_domain")
    if domain and ("@" in domain or " " in domain):
        raise s.error("qualify_domain", f"{domain!r} is not a domain name")
    config = MessageConfig(
        max_size=s.integer("max_size", 10 * 1024 * 1024, 1024, 1024**3),
        max_recipients=s.integer("max_recipients", 1000, 1, 100000),
        qualify_domain=domain.lower().rstrip(".") if domain else None,
        max_header_size=s.integer("max_header_size", 256 * 1024, 1024, 64 * 1024 * 1024),
        legacy_charset=_legacy_charset(s),
    )
    s.done()
    return config


def _legacy_charset(s: _Section) -> str:
    charset = s.string("legacy_charset", DEFAULT_LEGACY_CHARSET)
    assert charset is not None
    if not ascii_compatible(charset):
        raise s.error("legacy_charset", f"{charset!r} is not a charset that keeps ASCII as it is "
                                        "(write e.g. windows-1252, iso-8859-15 or koi8-r)")
    return charset.lower()


def _gate(s: _Section) -> GateConfig:
    socket_path = s.string("socket")
    if socket_path and not socket_path.startswith("/"):
        raise s.error("socket", f"{socket_path!r} must be an absolute path")
    user = s.string("user")
    if user is not None and not _USER_NAME.match(user):
        raise s.error("user", f"{user!r} is not a Unix user name")
    config = GateConfig(
        socket=socket_path,
        user=user,
        egress=s.choice("egress", EGRESS_MODES),
        trust=s.choice("trust", TRUST_MODES),
        backlog=s.integer("backlog", DEFAULT_BACKLOG, 1, 65535),
        allow_unbound=s.boolean("allow_unbound", False),
        max_connections_per_uid=s.integer("max_connections_per_uid", 16, 1, 10000),
        request_timeout=s.number("request_timeout", 120.0, 1, 3600),
        upload_memory=s.integer("upload_memory", DEFAULT_UPLOAD_MEMORY, 16 * 1024 * 1024, 1024**4),
        max_uploads_per_uid=s.integer("max_uploads_per_uid", 1, 1, 10000),
    )
    s.done()
    return config


def _queue(s: _Section) -> QueueConfig:
    config = QueueConfig(
        enabled=s.boolean("enabled", True),
        min_backoff=s.duration("min_backoff", 300),
        max_backoff=s.duration("max_backoff", 4 * 3600),
        max_age=s.duration("max_age", 5 * 86400),
        lease=s.duration("lease", 600),
    )
    if config.max_backoff < config.min_backoff:
        raise s.error("max_backoff", "must not be shorter than min_backoff")
    s.done()
    return config


def _log(s: _Section) -> LogConfig:
    config = LogConfig(syslog=s.boolean("syslog", True), file=s.string("file"),
                       repeat_limit=s.integer("repeat_limit", 10, 0, 1_000_000),
                       repeat_window=s.duration("repeat_window", 60))
    s.done()
    return config


def _metrics(s: _Section) -> MetricsConfig:
    config = MetricsConfig(listen=_metrics_listen(s),
                           top_customers=s.integer("top_customers", DEFAULT_TOP_CUSTOMERS, 0, MAX_TOP_CUSTOMERS),
                           textfile=_metrics_textfile(s))
    s.done()
    return config


def _abuse(s: _Section, *, present: bool) -> AbuseConfig:
    enabled = s.boolean("enabled", True) and present
    share = s.number("failed_share", 0.5, minimum=0, maximum=1)
    if share <= 0:
        raise s.error("failed_share", f"must be more than 0 and at most 1, not {share:g} (a share: 0.5 is half)")
    config = AbuseConfig(enabled=enabled, failed_share=share, failed_min=s.integer("failed_min", 20, 1),
                         failed_window=_abuse_window(s, "failed_window", 3600),
                         limit_refusals=s.integer("limit_refusals", 50, 1),
                         limit_window=_abuse_window(s, "limit_window", 600))
    s.done()
    return config


def _abuse_window(s: _Section, key: str, default: int) -> int:
    seconds = s.duration(key, default)
    if seconds > MAX_ABUSE_WINDOW:
        raise s.error(key, f"{seconds} s is longer than a day, the longest window the abuse rules count in")
    return seconds


def _metrics_listen(s: _Section) -> str | None:
    """A loopback host:port or an absolute path: the metrics name customers, so never on the network."""
    import ipaddress

    listen = s.string("listen")
    if listen is None or listen.startswith("/"):
        return listen
    parsed = _split_host_port(listen, default_port=None)
    if parsed is None:
        raise s.error("listen", f"{listen!r} is neither an IP address with a port (write e.g. 127.0.0.1:9525 "
                                "or [::1]:9525) nor an absolute path for a UNIX socket")
    if not ipaddress.ip_address(parsed[0]).is_loopback:
        raise s.error("listen", f"{parsed[0]} is not a loopback address: the metrics name customers and "
                                "must not be served to the network; use 127.0.0.1 or ::1 (a Prometheus "
                                "elsewhere scrapes through a proxy or node-exporter's textfile), or a UNIX socket")
    return listen


def _metrics_textfile(s: _Section) -> str | None:
    textfile = s.string("textfile")
    if textfile is not None and (not textfile.startswith("/") or not textfile.endswith(".prom")):
        raise s.error("textfile", f"{textfile!r} must be an absolute path ending in .prom "
                                  "(node-exporter's textfile collector reads only *.prom files)")
    return textfile


def _notify(s: _Section) -> NotifyConfig:
    from .notice_templates import LANGUAGES, TemplateError
    from .notice_templates import load as load_templates  # only with [notify]: a config without it needs none

    sender = _address(s, "from", s.string("from", required=True) or "")
    admin_value = s._get("admin", (str, list), "an address or a list of addresses")
    admins = [admin_value] if isinstance(admin_value, str) else list(admin_value or [])
    warn_at = s.number("warn_at", 0.8, 0, 1)
    if not 0 < warn_at < 1:
        raise s.error("warn_at", f"must be more than 0 and less than 1 (a share of the limit), not {warn_at:g}")
    language = s.choice("language", LANGUAGES)
    directory = s.string("templates")
    if directory is not None and not os.path.isdir(directory):
        raise s.error("templates", f"{directory!r} is not a directory")
    try:
        texts = load_templates(language, directory)
    except TemplateError as exc:
        raise s.error("templates", str(exc)) from None
    config = NotifyConfig(sender=sender, admin=tuple(_address(s, "admin", a) for a in admins), warn_at=warn_at,
                          language=language, templates=directory, texts=texts)
    s.done()
    return config


def _address(s: _Section, key: str, value: object) -> str:
    """A bare address (``post@provider.example``), as notices are sent to and from."""
    from .addresses import AddressError, parse_mailbox

    if not isinstance(value, str) or not value.strip():
        raise s.error(key, "must be an address such as postmaster@provider.example")
    try:
        mailbox = parse_mailbox(value.strip())
    except AddressError as exc:
        raise s.error(key, f"{value!r} is not an address ({exc})") from None
    if mailbox.display_name is not None or "<" in value or "@" not in value:
        raise s.error(key, f"{value!r} is not a bare address (write e.g. postmaster@provider.example)")
    return value.strip()
