"""Config errors name the file, the key and what is wrong."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from sendmail_shim.config import ConfigError, check_private_file, from_mapping, load
from sendmail_shim.limits import Rule

REPO = Path(__file__).resolve().parents[2]
BASE = {"upstream": {"host": "smtp.example.net"}, "spf": {"relay_ips": ["192.0.2.25"]}}


def test_defaults_are_the_published_limits():
    config = from_mapping(BASE)
    assert config.upstream.port == 25 and config.upstream.ca_file is None
    assert config.ledger.url == "sqlite:////var/lib/sendmail-shim/ledger.db"
    assert config.limits.account == (
        Rule("messages", 25, 300), Rule("recipients", 250, 300), Rule("recipients", 1000, 86400),
        Rule("recipients", 5000, 30 * 86400))
    assert config.limits.customer == (Rule("messages", 250, 3600), Rule("recipients", 1500, 3600))
    assert (config.log.repeat_limit, config.log.repeat_window) == (10, 60)


def test_stage_timeouts_default_to_rfc_5321_and_the_sync_budget_to_timeout():
    upstream = from_mapping(BASE).upstream
    waits = (upstream.greeting_timeout, upstream.mail_timeout, upstream.rcpt_timeout, upstream.data_timeout,
             upstream.block_timeout, upstream.dot_timeout)
    assert waits == (300, 300, 300, 120, 180, 600)  # RFC 5321 section 4.5.3.2, in seconds
    assert (upstream.timeout, upstream.sync_budget) == (30, 30)
    tuned = from_mapping({**BASE, "upstream": {"host": "x", "timeout": 10, "sync_timeout": 3, "dot_timeout": 60}})
    assert (tuned.upstream.sync_budget, tuned.upstream.dot_timeout, tuned.upstream.timeout) == (3, 60, 10)
    with pytest.raises(ConfigError, match="upstream.dot_timeout: must be between 0.1 and 3600, not 0"):
        from_mapping({**BASE, "upstream": {"host": "x", "dot_timeout": 0}})


@pytest.mark.parametrize(("data", "key", "needle"), [
    ({"spf": {"relay_ips": ["192.0.2.25"]}}, "upstream.host", "required"),
    ({"upstream": {"host": "x", "hots": "y"}, "spf": {"enabled": False}}, "upstream.hots", "unknown key"),
    ({"upstream": {"host": "x", "port": "25"}}, "upstream.port", "integer"),
    ({"upstream": {"host": "x", "port": 70000}}, "upstream.port", "between"),
    ({"upstream": {"host": "x", "username": "u"}}, "upstream.password_file", "0600"),
    ({"upstream": {"host": "x"}, "spf": {"relay_ips": ["not-an-ip"]}}, "spf.relay_ips", "not an IP"),
    ({"upstream": {"host": "x"}, "spf": {}}, "spf.relay_ips", "missing"),
    ({"upstream": {"host": "x"}, "spf": {"relay_ips": ["192.0.2.1"], "nameservers": ["dns"]}},
     "spf.nameservers", "not an address"),
    ({"upstream": {"host": "x"}, "spf": {"enabled": False}, "limits": {"account": ["25 mails / 5m"]}},
     "limits.account", "not a limit rule"),
    ({"upstream": {"host": "x"}, "spf": {"enabled": False}, "ledger": {"url": "ledger.db"}},
     "ledger.url", "SQLAlchemy URL"),
    ({"upstream": {"host": "x"}, "spf": {"enabled": False}, "gate": {"socket": "gate.sock"}},
     "gate.socket", "absolute"),
    ({"upstream": {"host": "x"}, "spf": {"enabled": False}, "queue": {"max_age": "forever"}},
     "queue.max_age", "duration"),
    ({"upstream": {"host": "x"}, "spf": {"enabled": False}, "smtp": {}}, "smtp", "unknown section"),
    ({"upstream": {"host": "x"}, "spf": {"enabled": False}, "log": {"repeat_limit": -1}},
     "log.repeat_limit", "between"),
    ({"upstream": {"host": "x"}, "spf": {"enabled": False}, "log": {"repeat_window": "a while"}},
     "log.repeat_window", "duration"),
])
def test_errors_name_the_key(data, key, needle):
    with pytest.raises(ConfigError) as info:
        from_mapping(data, "/etc/sendmail-shim/config.toml")
    assert info.value.key == key
    assert needle in str(info.value) and str(info.value).startswith("/etc/sendmail-shim/config.toml: ")


def test_missing_and_broken_files(tmp_path: Path):
    with pytest.raises(ConfigError, match="file not found"):
        load(str(tmp_path / "nope.toml"))
    broken = tmp_path / "broken.toml"
    broken.write_text("[upstream\nhost = 1\n")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load(str(broken))


def test_sendmail_exits_78_with_the_file_and_key(tmp_path: Path):
    import os
    import subprocess

    from tests.support.shim import SENDMAIL

    path = tmp_path / "config.toml"
    path.write_text('[upstream]\nhost = "x"\ntimeout = "soon"\n[spf]\nenabled = false\n')
    proc = subprocess.run([SENDMAIL, "-t"], input=b"To: a@b.example\n\nx\n", capture_output=True,
                          env=dict(os.environ, SENDMAIL_SHIM_CONFIG=str(path)))
    assert proc.returncode == 78
    assert f"{path}: upstream.timeout: must be a number" in proc.stderr.decode()


# --------------------------------------------------------------------------- secret files

CHECK_AS_OTHER = """
import sys
from sendmail_shim.config import ConfigError, check_private_file
try:
    check_private_file("/etc/sendmail-shim/config.toml", "upstream.password_file", sys.argv[1])
except ConfigError as exc:
    print(exc)
else:
    print("ok")
"""


@pytest.mark.parametrize("mode", [0o600, 0o400])
def test_a_secret_file_of_the_owner_alone_passes(tmp_path: Path, mode: int):
    secret = tmp_path / "relay.pass"
    secret.write_text("pw\n")
    secret.chmod(mode)
    check_private_file("/etc/sendmail-shim/config.toml", "upstream.password_file", str(secret))


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o660, 0o610])
def test_a_secret_file_others_can_reach_is_refused_with_the_fix(tmp_path: Path, mode: int):
    secret = tmp_path / "relay.pass"
    secret.write_text("pw\n")
    secret.chmod(mode)
    with pytest.raises(ConfigError) as info:
        check_private_file("/etc/sendmail-shim/config.toml", "upstream.password_file", str(secret))
    assert info.value.key == "upstream.password_file"
    assert str(info.value) == (f"/etc/sendmail-shim/config.toml: upstream.password_file: {secret} is open to "
                               f"other users (mode {mode:04o}, must be 0600); run: chmod 600 {secret}")


def test_a_missing_secret_file_is_named(tmp_path: Path):
    with pytest.raises(ConfigError, match=r"ledger.url: cannot read .*/none \(No such file or directory\)"):
        check_private_file("/c.toml", "ledger.url", str(tmp_path / "none"))


@pytest.mark.skipif(os.geteuid() != 0, reason="only root can give a file to another user")
def test_a_0600_secret_file_of_another_user_is_refused():
    """Mode 0600 protects nothing when the file belongs to someone else: that user can read it."""
    place = Path(tempfile.mkdtemp(prefix="secret-owner-"))
    try:
        place.chmod(0o755)
        secret = place / "relay.pass"
        secret.write_text("pw\n")
        secret.chmod(0o600)
        os.chown(secret, 1, 1)  # daemon: neither root nor the reader below
        owner, reader = pwd.getpwuid(1).pw_name, pwd.getpwuid(65534).pw_name
        assert run_as(65534, secret) == (
            f"/etc/sendmail-shim/config.toml: upstream.password_file: {secret} belongs to {owner}, "
            f"not to the user reading it ({reader}) or root; run: chown {reader} {secret}")
        assert run_as(1, secret) == "ok"  # its owner may use it
    finally:
        shutil.rmtree(place)


def run_as(uid: int, path: Path) -> str:
    """The check run by another user, with a system interpreter that user may execute."""
    python = shutil.which("python3", path="/usr/bin:/usr/local/bin")
    if python is None:
        pytest.skip("a system python3 is needed to run as another user")
    done = subprocess.run([python, "-I", "-c", f"import sys; sys.path.insert(0, {str(REPO)!r})\n" + CHECK_AS_OTHER,
                           str(path)], capture_output=True, text=True, timeout=60, user=uid,
                          group=pwd.getpwuid(uid).pw_gid, extra_groups=[], cwd="/")
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def test_metrics_are_off_by_default_and_name_at_most_ten_customers():
    metrics = from_mapping(BASE).metrics
    assert (metrics.listen, metrics.top_customers, metrics.textfile) == (None, 10, None)
    tcp = from_mapping({**BASE, "metrics": {"listen": "[::1]:9525", "top_customers": 3}}).metrics
    assert (tcp.address, tcp.unix_socket, tcp.top_customers) == (("::1", 9525), None, 3)
    unix = from_mapping({**BASE, "metrics": {"listen": "/run/sendmail-shim/metrics.sock"}}).metrics
    assert (unix.address, unix.unix_socket) == (None, "/run/sendmail-shim/metrics.sock")


@pytest.mark.parametrize(("listen", "needle"), [
    ("0.0.0.0:9525", "0.0.0.0 is not a loopback address"),
    ("192.0.2.10:9525", "192.0.2.10 is not a loopback address"),
    ("[::]:9525", ":: is not a loopback address"),
    ("localhost:9525", "neither an IP address with a port"),
    ("127.0.0.1", "neither an IP address with a port"),
    ("127.0.0.1:99999", "neither an IP address with a port"),
    ("metrics.sock", "neither an IP address with a port"),
])
def test_metrics_listen_refuses_anything_but_loopback_or_a_path(listen, needle):
    with pytest.raises(ConfigError) as info:
        from_mapping({**BASE, "metrics": {"listen": listen}}, "/etc/sendmail-shim/config.toml")
    assert info.value.key == "metrics.listen" and needle in str(info.value)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(("values", "key", "needle"), [
    ({"top_customers": 101}, "metrics.top_customers", "between 0 and 100"),
    ({"top_customers": -1}, "metrics.top_customers", "between 0 and 100"),
    ({"textfile": "sendmail-shim.prom"}, "metrics.textfile", "absolute path ending in .prom"),
    ({"textfile": "/var/lib/node-exporter/sendmail-shim.txt"}, "metrics.textfile", "ending in .prom"),
    ({"port": 9525}, "metrics.port", "unknown key"),
])
def test_metrics_keys_are_checked(values, key, needle):
    with pytest.raises(ConfigError) as info:
        from_mapping({**BASE, "metrics": values})
    assert info.value.key == key and needle in str(info.value)


def test_abuse_is_off_without_the_section_and_has_the_documented_defaults():
    assert from_mapping(BASE).abuse.enabled is False
    assert from_mapping({**BASE, "abuse": {"enabled": False, "failed_min": 5}}).abuse.enabled is False
    abuse = from_mapping({**BASE, "abuse": {}}).abuse
    assert (abuse.enabled, abuse.failed_share, abuse.failed_min, abuse.failed_window) == (True, 0.5, 20, 3600)
    assert (abuse.limit_refusals, abuse.limit_window) == (50, 600)
    tuned = from_mapping({**BASE, "abuse": {"failed_share": 1, "failed_window": "30m", "limit_window": 120}}).abuse
    assert (tuned.failed_share, tuned.failed_window, tuned.limit_window) == (1.0, 1800, 120)


@pytest.mark.parametrize(("values", "key", "needle"), [
    ({"failed_share": 0}, "abuse.failed_share", "more than 0 and at most 1"),
    ({"failed_share": 1.5}, "abuse.failed_share", "between 0 and 1"),
    ({"failed_share": "half"}, "abuse.failed_share", "must be a number"),
    ({"failed_min": 0}, "abuse.failed_min", "at least 1"),
    ({"failed_window": "1w"}, "abuse.failed_window", "is not a duration"),
    ({"limit_window": "2d"}, "abuse.limit_window", "longer than a day"),
    ({"limit_refusals": 0}, "abuse.limit_refusals", "at least 1"),
    ({"share": 0.5}, "abuse.share", "unknown key"),
])
def test_abuse_keys_are_checked(values, key, needle):
    with pytest.raises(ConfigError) as info:
        from_mapping({**BASE, "abuse": values})
    assert info.value.key == key and needle in str(info.value)
