"""``sendmail-shim doctor``: each misconfiguration is made, found, fixed and found fixed."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
import trustme

from tests.gate.conftest import needs_users
from tests.gate.deployment import Deployment, message
from tests.support.dnsserver import DnsServer
from tests.support.upstream import SmtpUpstream

pytestmark = needs_users


def doctor(dep: Deployment) -> tuple[int, dict[str, list[dict[str, str]]], str]:
    """Exit code, the checks by name, and the text report."""
    as_json = dep.admin("doctor", "--json")
    document = json.loads(as_json.stdout)
    assert document["ok"] is (as_json.code == 0)
    assert document["checked_at"].endswith("Z")
    found: dict[str, list[dict[str, str]]] = {}
    for check in document["checks"]:
        assert set(check) == {"name", "status", "found", "fix"} and check["status"] in ("ok", "warn", "fail")
        found.setdefault(check["name"], []).append(check)
    text = dep.admin("doctor")
    assert text.code == as_json.code
    assert len(text.stdout.decode().splitlines()) == len(document["checks"])
    return as_json.code, found, text.stdout.decode()


def status_of(found: dict[str, list[dict[str, str]]], name: str) -> str:
    statuses = {check["status"] for check in found[name]}
    return "fail" if "fail" in statuses else "warn" if "warn" in statuses else "ok"


def test_a_sound_installation_has_no_failure(gate: Deployment, relay: SmtpUpstream) -> None:
    code, found, text = doctor(gate)
    assert code == 0, text
    for name in ("relay bypass", "relay certificate", "ledger and queue", "relay password", "decision log",
                 "config file", "socket directory", "gate", "gate trust", "gate config", "bindings"):
        assert status_of(found, name) == "ok", (name, found[name])
    assert "ok    relay bypass: the relay 127.0.0.1:" in text and "refuses MAIL without AUTH" in text
    assert relay.received == []  # doctor sends nothing


def test_doctor_finds_a_relay_any_site_can_use_without_auth(gate: Deployment, open_relay: SmtpUpstream,
                                                             relay: SmtpUpstream) -> None:
    gate.configure("upstream", port=open_relay.port)
    code, found, text = doctor(gate)
    assert code == 78 and status_of(found, "relay bypass") == "fail"
    (check,) = found["relay bypass"]
    assert check["found"].startswith("nobody (uid ") and "without AUTH (it answered MAIL with 250" in check["found"]
    assert "require AUTH at the relay" in check["fix"] and "egress.nft" in check["fix"]
    assert open_relay.received == []
    gate.configure("upstream", port=relay.port)
    assert status_of(doctor(gate)[1], "relay bypass") == "ok"


@pytest.mark.parametrize(("name", "target", "bad_mode"), [
    ("ledger and queue", "ledger_path", 0o644),
    ("relay password", "password_path", 0o640),
    ("decision log", "log_path", 0o666),
    ("ledger directory", "state", 0o777),
    ("config file", "config_path", 0o666),
])
def test_doctor_finds_what_others_can_read_or_change(gate: Deployment, name: str, target: str,
                                                     bad_mode: int) -> None:
    assert gate.sendmail("-t", "-i", input=message()).code == 0  # the log exists
    path: Path = getattr(gate, target)
    good_mode = os.stat(path).st_mode & 0o777
    os.chmod(path, bad_mode)
    code, found, text = doctor(gate)
    assert code == 78 and status_of(found, name) == "fail", found[name]
    assert f"fail  {name}: {path} " in text
    os.chmod(path, good_mode)
    assert status_of(doctor(gate)[1], name) == "ok"


def test_doctor_finds_a_ledger_owned_by_a_site(gate: Deployment) -> None:
    os.chown(gate.ledger_path, gate.users.a.uid, gate.users.a.gid)
    code, found, _ = doctor(gate)
    assert code == 78 and found["ledger and queue"][0]["found"].endswith(
        f"belongs to {gate.users.a.name}, not to the gate's user {gate.users.gate.name}")
    gate.give_to_gate(gate.ledger_path)
    assert status_of(doctor(gate)[1], "ledger and queue") == "ok"


def test_doctor_finds_a_socket_directory_under_a_parent_others_can_change(gate: Deployment) -> None:
    os.chmod(gate.base, 0o777)
    code, found, _ = doctor(gate)
    assert code == 78 and status_of(found, "socket directory") == "fail"
    assert found["socket directory"][0]["found"].startswith(f"{gate.base}, above the socket's directory")
    os.chmod(gate.base, 0o755)
    assert status_of(doctor(gate)[1], "socket directory") == "ok"


def test_doctor_finds_a_stopped_gate_and_one_running_an_old_config(deployment: Deployment) -> None:
    code, found, _ = doctor(deployment)
    assert code == 78 and status_of(found, "gate") == "fail"
    assert "the mail gate is not running" in found["gate"][0]["found"]
    deployment.start_gate()
    code, found, _ = doctor(deployment)
    assert status_of(found, "gate") == status_of(found, "gate config") == "ok"
    deployment.configure("gate", request_timeout=11)  # changed on disk, not reloaded
    code, found, _ = doctor(deployment)
    assert code == 78 and status_of(found, "gate config") == "fail"
    assert "changed after the gate loaded it" in found["gate config"][0]["found"]
    deployment.stop_gate()
    deployment.start_gate()
    assert status_of(doctor(deployment)[1], "gate config") == "ok"


def test_doctor_finds_a_binding_to_a_user_that_does_not_exist(gate: Deployment) -> None:
    assert gate.admin("customer", "bind", "ka", "web-gone", "--allow-missing-user").code == 0
    code, found, _ = doctor(gate)
    assert code == 78 and found["bindings"][0]["found"] == \
        "bound Unix users that do not exist: web-gone (customer ka)"
    assert gate.admin("customer", "unbind", "web-gone").code == 0
    assert status_of(doctor(gate)[1], "bindings") == "ok"


def test_doctor_lists_the_domains_whose_spf_will_be_refused(gate: Deployment) -> None:
    zone: dict[str, Any] = {"a.example": [{"TXT": "v=spf1 ip4:192.0.2.25 -all"}],
                            "b.example": [{"TXT": "v=spf1 ip4:198.51.100.9 -all"}]}
    with DnsServer(zone) as dns:
        gate.configure("spf", enabled=True, relay_ips=["192.0.2.25"], nameservers=[dns.nameserver],
                       hint="include:_spf.provider.example")
        code, found, _ = doctor(gate)
        assert code == 78 and found["spf"][0]["found"] == "1 of 2 domains will be refused: b.example (fail)"
        assert found["spf"][0]["fix"] == "the customers must add include:_spf.provider.example to their SPF records"
        dns.set_records("b.example", "TXT", ["v=spf1 ip4:192.0.2.0/24 -all"])
        assert status_of(doctor(gate)[1], "spf") == "ok"


def test_doctor_finds_a_relay_certificate_that_does_not_verify(gate: Deployment) -> None:
    ca_file = gate.etc / "ca.pem"
    good = ca_file.read_bytes()
    ca_file.write_bytes(trustme.CA().cert_pem.bytes())  # some other authority
    code, found, _ = doctor(gate)
    assert code == 78 and status_of(found, "relay certificate") == "fail"
    assert "certificate" in found["relay certificate"][0]["found"]
    ca_file.write_bytes(good)
    assert status_of(doctor(gate)[1], "relay certificate") == "ok"
