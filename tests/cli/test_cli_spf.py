"""`sendmail-shim spf check` against a real DNS server on loopback."""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.dnsserver import DnsServer
from tests.support.shim import ADMIN, dump_toml

ZONE = {
    "kunde.example": [{"TXT": "v=spf1 include:_spf.provider.example -all"}],
    "_spf.provider.example": [{"TXT": "v=spf1 ip4:192.0.2.25 -all"}],
    "slow.example": ["TIMEOUT"],
}


@pytest.fixture
def env(tmp_path: Path) -> Iterator[dict[str, str]]:
    with DnsServer(ZONE) as dns:
        config = tmp_path / "config.toml"
        config.write_text(dump_toml({
            "upstream": {"host": "smtp.example.net"},
            "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"},
            "spf": {"relay_ips": ["192.0.2.25"], "nameservers": [dns.nameserver], "timeout": 1},
        }))
        yield dict(os.environ, SENDMAIL_SHIM_CONFIG=str(config))


def admin(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([ADMIN, *args], capture_output=True, text=True, env=env, timeout=30)


def test_pass_with_a_trace(env: dict[str, str]):
    proc = admin(env, "spf", "check", "kunde.example")
    assert proc.returncode == 0, proc.stderr
    assert "relay 192.0.2.25: pass (matched include:_spf.provider.example in kunde.example)" in proc.stdout
    assert "ip4:192.0.2.25: match: pass" in proc.stdout


def test_fail_for_another_ip_as_json(env: dict[str, str]):
    proc = admin(env, "spf", "check", "kunde.example", "--ip", "198.51.100.1", "--json")
    assert proc.returncode == 77
    document = json.loads(proc.stdout)
    (result,) = document["results"]
    assert (result["ip"], result["result"]) == ("198.51.100.1", "fail")
    assert result["lookups"] == 1 and result["trace"]


def test_dns_timeout_is_69(env: dict[str, str]):
    proc = admin(env, "spf", "check", "slow.example")
    assert proc.returncode == 69 and "temperror" in proc.stdout


def test_bad_ip_is_a_usage_error(env: dict[str, str]):
    proc = admin(env, "spf", "check", "kunde.example", "--ip", "nope")
    assert proc.returncode == 64 and "not an IP address" in proc.stderr
