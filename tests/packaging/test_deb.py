"""The Debian package as built by `make deb`: what it holds, what lintian says, and that the
program it ships relays a message with nothing but the libraries it bundles.

Installing it is left to scripts/package_check, which installs, uses and purges it as root.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import time
import tomllib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from sendmail_shim import config
from tests.packaging.conftest import REPO, version
from tests.support.private_root import private_root
from tests.support.shim import dump_toml
from tests.support.upstream import SmtpUpstream

pytestmark = pytest.mark.skipif(not (shutil.which("dpkg-buildpackage") and shutil.which("lintian")),
                                reason="dpkg-dev, debhelper and lintian are needed (scripts/bootstrap)")
FRONT_END = "usr/lib/sendmail-shim/sendmail"  # the Python front end the native sendmail hands calls to


def architecture() -> str:
    return subprocess.run(["dpkg", "--print-architecture"], capture_output=True, text=True,
                          check=True).stdout.strip()


@dataclass
class Built:
    deb: Path
    log: str  # what `make deb` printed, lintian's findings included
    root: Path  # the package's files, unpacked


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> Built:
    out = tmp_path_factory.mktemp("deb")
    proc = subprocess.run(["make", "-s", "deb", f"DEB_OUT={out}"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    deb = out / f"sendmail-shim_{version()}_{architecture()}.deb"
    root = out / "root"
    subprocess.run(["dpkg-deb", "-x", str(deb), str(root)], check=True)
    return Built(deb, proc.stdout + proc.stderr, root)


def field(deb: Path, name: str) -> str:
    return subprocess.run(["dpkg-deb", "-f", str(deb), name], capture_output=True, text=True,
                          check=True).stdout.strip()


def contents(deb: Path) -> dict[str, str]:
    """Path → the `dpkg-deb -c` line (mode, owner, size, link target)."""
    listing = subprocess.run(["dpkg-deb", "-c", str(deb)], capture_output=True, text=True, check=True).stdout
    return {line.split(" ./", 1)[1].split(" -> ")[0].rstrip("/"): line for line in listing.splitlines()}


# --------------------------------------------------------------------------- what it is


def test_lintian_reports_no_error(built: Built) -> None:
    errors = re.findall(r"^E: sendmail-shim.*$", built.log, flags=re.MULTILINE)
    assert errors == []


def test_it_is_a_debian_mta(built: Built) -> None:
    for name in ("Provides", "Conflicts", "Replaces"):
        assert "mail-transport-agent" in field(built.deb, name)
    assert field(built.deb, "Version") == version()
    assert field(built.deb, "Architecture") == architecture()
    assert "python3" in field(built.deb, "Depends") and "libc6" in field(built.deb, "Depends")


def test_it_provides_sendmail_where_programs_look_for_it(built: Built) -> None:
    files = contents(built.deb)
    assert files["usr/sbin/sendmail"].startswith("-rwxr-xr-x root/root")
    assert os.path.realpath(built.root / "usr/lib/sendmail") == str(built.root / "usr/sbin/sendmail")
    assert files["usr/bin/sendmail-shim"].startswith("-rwxr-xr-x root/root")
    for page in ("usr/share/man/man8/sendmail.8.gz", "usr/share/man/man8/sendmail-shim.8.gz",
                 "usr/share/man/man5/sendmail-shim.toml.5.gz"):
        assert page in files
    for guide in ("admin-guide.md", "customer-guide.md"):
        assert {f"usr/share/doc/sendmail-shim/{guide}", f"usr/share/doc/sendmail-shim/{guide}.gz"} & files.keys()


def test_the_launchers_run_isolated_from_the_callers_environment(built: Built) -> None:
    for launcher in (FRONT_END, "usr/bin/sendmail-shim"):
        first = (built.root / launcher).read_text().splitlines()[0]
        assert first == "#!/usr/bin/python3 -IS"


def _elf(path: Path, *what: str) -> str:
    return subprocess.run(["readelf", "-W", *what, str(path)], capture_output=True, text=True, check=True).stdout


def test_sendmail_is_the_native_client_built_hardened(built: Built) -> None:
    binary = built.root / "usr/sbin/sendmail"
    assert binary.read_bytes()[:4] == b"\x7fELF"
    assert "Position-Independent Executable" in _elf(binary, "-h")
    dynamic = _elf(binary, "-d")
    assert re.findall(r"\(NEEDED\)\s+Shared library: \[(.*?)\]", dynamic) == ["libc.so.6"]
    assert "BIND_NOW" in dynamic and "GNU_RELRO" in _elf(binary, "-l")  # full RELRO
    symbols = _elf(binary, "--dyn-syms")
    assert "__stack_chk_fail" in symbols  # -fstack-protector-strong
    assert re.search(r"__\w+_chk\b", symbols.replace("__stack_chk_fail", ""))  # _FORTIFY_SOURCE
    assert not re.search(r"^.*\.symtab", _elf(binary, "-S"), flags=re.MULTILINE)  # stripped


def test_the_native_client_hands_other_calls_to_the_packaged_front_end(built: Built) -> None:
    """The front end's path is in the binary, fixed at build time; the launcher there runs the package."""
    assert f"/{FRONT_END}\0".encode() in (built.root / "usr/sbin/sendmail").read_bytes()
    launcher = (built.root / FRONT_END).read_text()
    assert 'sys.path.append("/usr/lib/sendmail-shim")' in launcher and "sendmail_shim.sendmail import main" in launcher


def test_it_ships_no_bytecode_and_no_build_paths(built: Built) -> None:
    files = contents(built.deb)
    assert not [path for path in files if path.endswith(".pyc") or "__pycache__" in path]
    assert not [path for path in files if path.endswith("direct_url.json")]
    for program in ("usr/sbin/sendmail", FRONT_END, "usr/bin/sendmail-shim"):
        assert str(REPO).encode() not in (built.root / program).read_bytes()


def test_it_ships_the_notices_built_in_texts(built: Built) -> None:
    shipped = {path.name for path in (built.root / "usr/lib/sendmail-shim/sendmail_shim/templates").iterdir()}
    assert shipped == {f"{kind}.{language}.txt" for kind in ("warn", "limit", "block") for language in ("en", "nb")}


def test_the_config_is_a_conffile_that_an_upgrade_keeps(built: Built) -> None:
    listing = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(built.deb)], capture_output=True, check=True)
    conffiles = subprocess.run(["tar", "-xOf", "-", "./conffiles"], input=listing.stdout, capture_output=True,
                               check=True).stdout.decode()
    assert "/etc/sendmail-shim/config.toml" in conffiles.split()


def test_the_log_is_rotated_by_the_rule_the_package_ships_as_a_conffile(built: Built) -> None:
    listing = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(built.deb)], capture_output=True, check=True)
    conffiles = subprocess.run(["tar", "-xOf", "-", "./conffiles"], input=listing.stdout, capture_output=True,
                               check=True).stdout.decode()
    assert "/etc/logrotate.d/sendmail-shim" in conffiles.split()
    rule = (built.root / "etc/logrotate.d/sendmail-shim").read_text()
    # The rule tests/gate/test_logs.py rotates a running gate's log with.
    assert rule == (REPO / "packaging/debian/sendmail-shim.logrotate").read_text()
    assert rule.splitlines()[2] == "/var/log/sendmail-shim/*.log {"


def test_the_egress_rule_is_shipped_as_a_conffile_and_not_loaded(built: Built) -> None:
    shipped = built.root / "etc/sendmail-shim/egress.nft"
    assert shipped.read_bytes() == (REPO / "packaging/nftables/egress.nft").read_bytes()  # as tested in a netns
    listing = subprocess.run(["dpkg-deb", "--ctrl-tarfile", str(built.deb)], capture_output=True, check=True)
    control = {}
    for name in ("conffiles", "postinst"):
        control[name] = subprocess.run(["tar", "-xOf", "-", f"./{name}"], input=listing.stdout,
                                       capture_output=True).stdout.decode()
    assert "/etc/sendmail-shim/egress.nft" in control["conffiles"].split()
    assert "nft" not in control["postinst"]  # installed, not enabled: the admin loads it


def test_the_shipped_config_names_the_gates_user(built: Built) -> None:
    text = (built.root / "etc/sendmail-shim/config.toml").read_text()
    assert tomllib.loads(text)["gate"] == {"socket": "/run/sendmail-shim/gate.sock", "user": "sendmail-shim"}


def test_the_shipped_config_sends_nothing_until_the_upstream_is_set(built: Built) -> None:
    path = built.root / "etc/sendmail-shim/config.toml"
    tomllib.loads(path.read_text())  # valid TOML
    with pytest.raises(config.ConfigError) as caught:
        config.load(str(path))
    assert caught.value.key == "upstream.host"


def test_the_shipped_config_needs_only_the_upstream_and_the_relay_addresses(built: Built, tmp_path: Path) -> None:
    text = (built.root / "etc/sendmail-shim/config.toml").read_text()
    text = text.replace('# host = "smtp.example.net"', 'host = "smtp.example.net"')
    text = text.replace('# relay_ips = ["192.0.2.25", "2001:db8::25"]', 'relay_ips = ["192.0.2.25"]')
    (tmp_path / "config.toml").write_text(text)
    loaded = config.load(str(tmp_path / "config.toml"))
    assert loaded.upstream.host == "smtp.example.net"
    assert loaded.gate.socket == "/run/sendmail-shim/gate.sock"
    assert loaded.ledger.url == config.DEFAULT_LEDGER_URL
    assert loaded.log.file == "/var/log/sendmail-shim/decisions.log"  # in the directory the package makes


def test_the_ledger_and_log_directories_are_made_private_by_the_maintainer_scripts(built: Built) -> None:
    control = built.root.parent / "control"
    subprocess.run(["dpkg-deb", "-e", str(built.deb), str(control)], check=True)
    postinst = (control / "postinst").read_text()
    assert "adduser --system --group" in postinst and "--shell /usr/sbin/nologin" in postinst
    assert "dpkg-statoverride --update --add sendmail-shim sendmail-shim 0700 /var/lib/sendmail-shim" in postinst
    assert "dpkg-statoverride --update --add sendmail-shim sendmail-shim 0750 /var/log/sendmail-shim" in postinst
    assert (built.root / "var/log/sendmail-shim").is_dir()
    postrm = (control / "postrm").read_text()
    assert "deluser" in postrm and "rm -rf /etc/sendmail-shim /var/lib/sendmail-shim /var/log/sendmail-shim" in postrm


def test_the_units_are_shipped_but_not_enabled(built: Built) -> None:
    units = sorted(p.name for p in (built.root / "lib/systemd/system").iterdir())
    expected = sorted(p.name for p in (REPO / "packaging/systemd").iterdir()
                      if p.suffix in (".service", ".socket", ".timer"))
    assert units == expected and "sendmail-shim-queue.timer" in units
    control = built.root.parent / "control-units"
    subprocess.run(["dpkg-deb", "-e", str(built.deb), str(control)], check=True)
    postinst = (control / "postinst").read_text()
    for unit in units:
        if "[Install]" in (built.root / "lib/systemd/system" / unit).read_text():
            # Enabled again only where the admin had enabled it: an upgrade keeps the admin's choice.
            assert f"if deb-systemd-helper debian-installed '{unit}'; then" in postinst
    assert "new installations run enable" not in postinst


def test_every_unit_runs_a_program_the_package_ships(built: Built) -> None:
    for unit in (built.root / "lib/systemd/system").glob("*.service"):
        for command in re.findall(r"^ExecStart=(\S+)", unit.read_text(), flags=re.MULTILINE):
            assert (built.root / command.lstrip("/")).is_file(), f"{unit.name}: {command} is not in the package"


def test_systemd_finds_nothing_wrong_with_the_units(built: Built) -> None:
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is needed")
    units = sorted(str(p) for p in (built.root / "lib/systemd/system").iterdir())
    proc = subprocess.run(["systemd-analyze", "verify", "--man=no", *units], capture_output=True, text=True,
                          timeout=120)
    shipped = {"/" + str(p.relative_to(built.root)) for p in built.root.rglob("*") if p.is_file()}
    problems = []
    for line in proc.stderr.splitlines():
        missing = re.search(r"Command (\S+) is not executable", line)
        if missing and missing[1] in shipped:
            continue  # the package is not installed here; the program is in it
        problems.append(line)
    assert problems == []


# --------------------------------------------------------------------------- what it does


@pytest.fixture
def packaged(built: Built, tmp_path: Path) -> Iterator[dict[str, Path]]:
    """The package's two launchers, pointed at its unpacked libraries."""
    library = built.root / "usr/lib/sendmail-shim"
    launchers = {}
    for name, path in (("sendmail", FRONT_END), ("sendmail-shim", "usr/bin/sendmail-shim")):
        script = tmp_path / "bin" / name
        script.parent.mkdir(exist_ok=True)
        script.write_text((built.root / path).read_text().replace('"/usr/lib/sendmail-shim"', repr(str(library))))
        script.chmod(0o755)
        launchers[name] = script
    yield launchers


def test_the_packaged_program_relays_with_only_its_own_libraries(
        packaged: dict[str, Path], upstream: SmtpUpstream, ca_file: Path, tmp_path: Path) -> None:
    if not Path("/usr/bin/python3").exists():
        pytest.skip("the system python3 runs the package")
    config_path = tmp_path / "config.toml"
    config_path.write_text(dump_toml({
        "upstream": {"host": "127.0.0.1", "port": upstream.port, "ca_file": str(ca_file)},
        "ledger": {"url": f"sqlite:///{tmp_path / 'ledger.db'}"},
        "spf": {"enabled": False},
        "log": {"syslog": False},
    }))
    env = {"PATH": "/usr/bin:/bin", "SENDMAIL_SHIM_CONFIG": str(config_path),
           "PYTHONPATH": str(REPO)}  # ignored: the launchers run isolated
    admin = str(packaged["sendmail-shim"])
    for argv in (["db", "upgrade"], ["customer", "add", "kunde"],
                 ["account", "add", "post@kunde.example", "--customer", "kunde", "--authenticated"]):
        proc = subprocess.run([admin, *argv], capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 0, proc.stderr
    started = time.perf_counter()
    sent = subprocess.run([str(packaged["sendmail"]), "-t", "-i"], capture_output=True, env=env, timeout=60,
                          input=b"From: post@kunde.example\nTo: ola@example.org\nSubject: pakke\n\nhei\n")
    elapsed = time.perf_counter() - started
    assert sent.returncode == 0, sent.stderr
    got = upstream.wait_for(1)
    assert got and got[0].mail_from == "post@kunde.example" and got[0].tls
    print(f"packaged sendmail, in-process, no bytecode: {elapsed * 1000:.0f} ms")


def test_the_packaged_program_refuses_before_it_is_configured(packaged: dict[str, Path], built: Built) -> None:
    # The shipped config names the default socket: the program runs where that place is private,
    # so that a gate running on this machine can never be sent the message.
    env = {"PATH": "/usr/bin:/bin", "SENDMAIL_SHIM_CONFIG": str(built.root / "etc/sendmail-shim/config.toml")}
    refused = subprocess.run([*private_root(), str(packaged["sendmail"]), "-t", "-i"], capture_output=True,
                             text=True, env=env, input="From: post@kunde.example\nTo: ola@example.org\n\nhei\n",
                             timeout=60)
    assert refused.returncode == 78
    assert refused.stderr.startswith("sendmail: not sent: configuration error: ")
    assert "upstream.host" in refused.stderr and len(refused.stderr.splitlines()) == 1


def test_the_packaged_program_keeps_a_fleet_ledger_in_postgresql(
        packaged: dict[str, Path], postgres_cluster: Any, tmp_path: Path) -> None:
    """psycopg's pure-Python driver over the system's libpq, as the package ships it."""
    config_path = tmp_path / "config.toml"
    config_path.write_text(dump_toml({
        "upstream": {"host": "127.0.0.1"},
        "ledger": {"url": postgres_cluster.create_database()},
        "spf": {"enabled": False},
    }))
    env = {"PATH": "/usr/bin:/bin", "SENDMAIL_SHIM_CONFIG": str(config_path)}
    admin = str(packaged["sendmail-shim"])
    for argv in (["db", "upgrade"], ["customer", "add", "kunde"],
                 ["account", "add", "post@kunde.example", "--customer", "kunde"]):
        proc = subprocess.run([admin, *argv], capture_output=True, text=True, env=env, timeout=60)
        assert proc.returncode == 0, proc.stderr
    listed = subprocess.run([admin, "account", "list", "--json"], capture_output=True, text=True, env=env,
                            timeout=60)
    assert [account["address"] for account in json.loads(listed.stdout)] == ["post@kunde.example"]
