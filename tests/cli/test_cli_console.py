"""The installed ``sendmail-shim`` console script, run as an admin or a control panel would."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
from pathlib import Path

from tests.ledger.common import REPO, without_file_privileges, write_config

ADMIN = str(Path(sys.executable).parent / "sendmail-shim")


def run(*args: str, config: Path | None = None,
        prefix: list[str] | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "SENDMAIL_SHIM_CONFIG"}
    if config is not None:
        env["SENDMAIL_SHIM_CONFIG"] = str(config)
    return subprocess.run([*(prefix or []), ADMIN, *args], capture_output=True, text=True,
                          env=env, cwd=REPO, timeout=60, stdin=subprocess.DEVNULL)


def assert_one_line(result: subprocess.CompletedProcess[str], code: int) -> str:
    assert result.returncode == code, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("sendmail-shim: "), result.stderr
    assert "Error:" not in result.stderr and "Traceback" not in result.stderr
    return lines[0]


def test_db_upgrade_creates_a_private_ledger_from_the_environment_config(tmp_path: Path) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path}/lib/sendmail-shim/ledger.db")
    result = run("db", "upgrade", config=config)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines()[:2] == ["applied 0001_initial", "applied 0002_queue"]
    ledger = tmp_path / "lib" / "sendmail-shim" / "ledger.db"
    assert stat.S_IMODE(ledger.stat().st_mode) == 0o600
    assert stat.S_IMODE(ledger.parent.stat().st_mode) == 0o750


def test_a_control_panel_drives_the_cli(tmp_path: Path) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path}/ledger.db")
    for args in (["db", "upgrade"], ["customer", "add", "kunde1", "--unix-user", "web1", "--allow-missing-user"],
                 ["account", "add", "post@kunde.example", "--customer", "kunde1"],
                 ["account", "authenticate", "post@kunde.example"]):
        assert run(*args, "--json", config=config).returncode == 0
    listed = run("--config", str(config), "account", "list", "--json")
    assert json.loads(listed.stdout) == [{"address": "post@kunde.example", "customer": "kunde1",
                                          "authenticated": True, "blocked": False,
                                          "block_reason": None, "blocked_by": None, "blocked_at": None,
                                          "default_sender": False,
                                          "default_sender_unix_users": []}]
    usage = json.loads(run("usage", "--customer", "kunde1", "--json", config=config).stdout)
    assert [(r["metric"], r["limit"], r["used"]) for r in usage["rules"]] == \
        [("messages", 250, 0), ("recipients", 1500, 0)]


def test_usage_errors_are_64_with_one_line(tmp_path: Path) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path}/ledger.db")
    line = assert_one_line(run("account", "add", "post@kunde.example", config=config), 64)
    assert "--customer" in line
    assert_one_line(run("--no-such-option", config=config), 64)


def test_config_problems_are_78(tmp_path: Path) -> None:
    line = assert_one_line(run("account", "list", config=tmp_path / "missing.toml"), 78)
    assert line == (f"sendmail-shim: {tmp_path}/missing.toml: file not found "
                    f"(set SENDMAIL_SHIM_CONFIG or create it)")
    config = write_config(tmp_path, f"sqlite:///{tmp_path}/ledger.db")
    line = assert_one_line(run("usage", "--account", "post@kunde.example", config=config), 78)
    assert line.endswith("does not exist; run: sendmail-shim db upgrade")


def test_unwritable_ledger_is_69(tmp_path: Path) -> None:
    config = write_config(tmp_path, f"sqlite:///{tmp_path}/ledger.db")
    for args in (["db", "upgrade"], ["customer", "add", "kunde1"],
                 ["account", "add", "post@kunde.example", "--customer", "kunde1"]):
        assert run(*args, config=config).returncode == 0
    for leftover in tmp_path.glob("ledger.db-*"):
        leftover.unlink()
    (tmp_path / "ledger.db").chmod(0o444)
    result = run("account", "block", "post@kunde.example", "--reason", "x", "--json",
                 config=config, prefix=without_file_privileges())
    line = assert_one_line(result, 69)
    assert line.startswith(f"sendmail-shim: cannot write the ledger {tmp_path}/ledger.db as uid")
    assert json.loads(result.stdout)["exit_code"] == 69


def test_help_exits_0() -> None:
    result = run("--help")
    assert result.returncode == 0 and result.stdout.startswith("Usage: sendmail-shim")
