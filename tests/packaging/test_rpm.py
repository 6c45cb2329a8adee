"""The RPM as built by `make rpm`: /usr/sbin/sendmail through alternatives (mta), as Fedora's
MTAs register it, and the same files and modes as the Debian package."""

from __future__ import annotations

import re
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.packaging.conftest import REPO, version

pytestmark = pytest.mark.skipif(not shutil.which("rpmbuild"), reason="rpmbuild is needed (apt-get install rpm)")


@pytest.fixture(scope="module")
def rpm(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rpm")
    proc = subprocess.run(["make", "-s", "rpm", f"RPM_OUT={out}"], cwd=REPO, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    arch = subprocess.run(["rpm", "--eval", "%{_arch}"], capture_output=True, text=True, check=True).stdout.strip()
    return out / "RPMS" / arch / f"sendmail-shim-{version()}-1.{arch}.rpm"


def query(rpm: Path, *what: str) -> str:
    return subprocess.run(["rpm", "-qp", *what, str(rpm)], capture_output=True, text=True, check=True).stdout


def test_sendmail_is_registered_with_alternatives_as_mta(rpm: Path) -> None:
    scripts = " ".join(query(rpm, "--scripts").split())
    install = re.search(r"alternatives --install /usr/sbin/sendmail mta (\S+) (\d+)(.*?)(?:#|$)", scripts)
    assert install, scripts
    files = set(query(rpm, "-l").split())
    assert install[1] == "/usr/sbin/sendmail.sendmail-shim" and install[1] in files
    slaves = re.findall(r"--slave (\S+) (\S+) (\S+)", install[3])
    assert ("/usr/lib/sendmail", "mta-sendmail") in {(link, name) for link, name, _ in slaves}
    for _, _, target in slaves:
        assert target in files, f"the alternatives link points at {target}, which the package lacks"
    assert "alternatives --remove mta /usr/sbin/sendmail.sendmail-shim" in scripts
    assert "/usr/sbin/sendmail" not in files  # alternatives owns the link, not the package


def test_it_provides_what_packages_needing_an_mta_ask_for(rpm: Path) -> None:
    provides = set(query(rpm, "--provides").split("\n"))
    assert {"MTA", "smtpdaemon", "/usr/sbin/sendmail"} <= {line.strip() for line in provides}


def test_the_config_is_kept_on_upgrade_and_the_ledger_and_log_directories_are_private(rpm: Path) -> None:
    dump = {line.split()[0]: line.split() for line in query(rpm, "--dump").splitlines()}
    assert "/etc/sendmail-shim/config.toml" in query(rpm, "--configfiles").split()
    config_flags = subprocess.run(["rpm", "-qp", "--qf", "[%{FILENAMES} %{FILEFLAGS:fflags}\n]", str(rpm)],
                                  capture_output=True, text=True, check=True).stdout
    assert re.search(r"^/etc/sendmail-shim/config.toml \S*n", config_flags, flags=re.MULTILINE)
    mode, owner, group = dump["/var/lib/sendmail-shim"][4:7]
    assert (mode[-4:], owner, group) == ("0700", "sendmail-shim", "sendmail-shim")
    mode, owner, group = dump["/var/log/sendmail-shim"][4:7]  # [log] file of the shipped config is in it
    assert (mode[-4:], owner, group) == ("0750", "sendmail-shim", "sendmail-shim")
    # The Debian package's rotation rule (tests/gate/test_logs.py rotates a running gate's log with it).
    assert re.search(r"^/etc/logrotate.d/sendmail-shim \S*n", config_flags, flags=re.MULTILINE)
    cpio = subprocess.run(["rpm2cpio", str(rpm)], capture_output=True, check=True).stdout
    rule = subprocess.run(["cpio", "-i", "--quiet", "--to-stdout", "./etc/logrotate.d/sendmail-shim"], input=cpio,
                          capture_output=True, check=True).stdout.decode()
    assert rule == (REPO / "packaging/debian/sendmail-shim.logrotate").read_text()


def test_the_service_user_is_created_before_the_files(rpm: Path) -> None:
    scripts = query(rpm, "--scripts")
    pre = scripts.split("preinstall scriptlet", 1)[1].split("scriptlet", 1)[0]
    assert "useradd -r" in pre and "/sbin/nologin" in pre and "/var/lib/sendmail-shim" in pre


def test_sendmail_is_the_native_client_and_hands_other_calls_to_the_front_end(rpm: Path, tmp_path: Path) -> None:
    assert "libc.so.6" in query(rpm, "--requires")  # found by rpm's dependency scan of the binary
    cpio = subprocess.run(["rpm2cpio", str(rpm)], capture_output=True, check=True).stdout
    subprocess.run(["cpio", "-idm", "--quiet"], input=cpio, cwd=tmp_path, check=True)
    binary = (tmp_path / "usr/sbin/sendmail.sendmail-shim").read_bytes()
    assert binary[:4] == b"\x7fELF" and b"/usr/lib/sendmail-shim/sendmail\0" in binary
    assert (tmp_path / "usr/lib/sendmail-shim/sendmail").read_text().startswith("#!/usr/bin/python3 -IS\n")


def test_it_ships_the_units_man_pages_and_launchers(rpm: Path) -> None:
    files = set(query(rpm, "-l").split())
    for path in ("/usr/bin/sendmail-shim", "/usr/lib/sendmail-shim/sendmail",
                 "/usr/lib/systemd/system/sendmail-shim-queue.timer",
                 "/usr/lib/systemd/system/sendmail-shim-queue.service",
                 "/usr/share/man/man8/sendmail.sendmail-shim.8.gz", "/usr/share/man/man8/sendmail-shim.8.gz",
                 "/usr/share/man/man5/sendmail-shim.toml.5.gz", "/usr/lib/sendmail-shim/sendmail_shim/cli.py",
                 "/usr/lib/sendmail-shim/sendmail_shim/templates/warn.nb.txt",
                 "/usr/lib/sendmail-shim/sendmail_shim/templates/block.en.txt"):
        assert path in files
