"""Config errors name the file, the key and what is wrong."""

from __future__ import annotations

from pathlib import Path

import pytest

from sendmail_shim.config import ConfigError, from_mapping, load
from sendmail_shim.limits import Rule

BASE = {"upstream": {"host": "smtp.example.net"}, "spf": {"relay_ips": ["192.0.2.25"]}}


def test_defaults_are_the_published_limits():
    config = from_mapping(BASE)
    assert config.upstream.port == 25 and config.upstream.ca_file is None
    assert config.ledger.url == "sqlite:////var/lib/sendmail-shim/ledger.db"
    assert config.limits.account == (
        Rule("messages", 25, 300), Rule("recipients", 250, 300), Rule("recipients", 1000, 86400),
        Rule("recipients", 5000, 30 * 86400))
    assert config.limits.customer == (Rule("messages", 250, 3600), Rule("recipients", 1500, 3600))


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
