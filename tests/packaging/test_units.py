"""The timers' units: a oneshot `sendmail-shim queue run` every minute and `db prune` every hour, as the service
user, running a command the admin CLI really has."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner

from sendmail_shim.cli import cli
from tests.packaging.conftest import REPO

UNITS = REPO / "packaging" / "systemd"


def unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((UNITS / name).read_text())
    return parser


def test_the_queue_runner_is_a_oneshot_run_as_the_service_user() -> None:
    service = unit("sendmail-shim-queue.service")["Service"]
    assert service["Type"] == "oneshot"
    assert service["User"] == service["Group"] == "sendmail-shim"
    assert shlex.split(service["ExecStart"]) == ["/usr/bin/sendmail-shim", "queue", "run"]
    assert service.get("NoNewPrivileges") == "yes"


def test_the_timer_fires_every_minute_once_enabled() -> None:
    timer = unit("sendmail-shim-queue.timer")
    assert timer["Install"]["WantedBy"] == "timers.target"
    calendar = timer["Timer"]["OnCalendar"]
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is needed")
    shown = subprocess.run(["systemd-analyze", "calendar", "--iterations=3", calendar],
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert "Normalized form: *-*-* *:*:00" in shown


@pytest.mark.parametrize("name", sorted(p.name for p in UNITS.glob("*.service")))
def test_every_service_runs_a_command_the_admin_cli_has(name: str) -> None:
    for line in re.findall(r"^ExecStart=(.+)$", (UNITS / name).read_text(), flags=re.MULTILINE):
        argv = shlex.split(line)
        assert Path(argv[0]).name == "sendmail-shim", line
        result = CliRunner().invoke(cli, [*argv[1:], "--help"])
        assert result.exit_code == 0, f"{name}: `{line}` is not a sendmail-shim command: {result.output}"


def test_the_ledger_is_pruned_every_hour_by_a_timer_as_the_service_user() -> None:
    service = unit("sendmail-shim-prune.service")["Service"]
    assert service["Type"] == "oneshot"
    assert service["User"] == service["Group"] == "sendmail-shim"
    assert shlex.split(service["ExecStart"]) == ["/usr/bin/sendmail-shim", "db", "prune"]
    timer = unit("sendmail-shim-prune.timer")
    assert timer["Install"]["WantedBy"] == "timers.target"
    assert timer["Timer"]["Persistent"] == "true"  # a server that was off prunes when it is back
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is needed")
    shown = subprocess.run(["systemd-analyze", "calendar", timer["Timer"]["OnCalendar"]],
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert "Normalized form: *-*-* *:00:00" in shown


def test_reloading_the_gate_sends_it_sighup() -> None:
    """`systemctl reload sendmail-shim-gate` is the gate's SIGHUP (tests/gate/test_reload.py shows what it does)."""
    service = unit("sendmail-shim-gate.service")["Service"]
    assert shlex.split(service["ExecReload"]) == ["/bin/kill", "-HUP", "$MAINPID"]


def test_the_metrics_textfile_is_written_every_minute_by_a_timer_as_the_service_user() -> None:
    service = unit("sendmail-shim-metrics.service")["Service"]
    assert service["Type"] == "oneshot"
    assert service["User"] == service["Group"] == "sendmail-shim"
    assert shlex.split(service["ExecStart"]) == ["/usr/bin/sendmail-shim", "metrics", "write"]
    assert service["UMask"] == "0022"  # node-exporter, another user, must read the file
    timer = unit("sendmail-shim-metrics.timer")
    assert timer["Install"]["WantedBy"] == "timers.target"
    spec = (REPO / "packaging/rpm/sendmail-shim.spec").read_text()
    assert "sendmail-shim-metrics.service sendmail-shim-metrics.timer" in spec  # enabled by neither package
    if not shutil.which("systemd-analyze"):
        pytest.skip("systemd-analyze is needed")
    shown = subprocess.run(["systemd-analyze", "calendar", timer["Timer"]["OnCalendar"]],
                           capture_output=True, text=True, timeout=60, check=True).stdout
    assert "Normalized form: *-*-* *:*:00" in shown
