from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from click.testing import CliRunner, Result

from sendmail_shim.cli import cli
from tests.ledger.common import write_config

Invoke = Callable[..., Result]


@pytest.fixture
def ledger_url(tmp_path: Path) -> str:
    return f"sqlite:///{tmp_path}/state/ledger.db"


@pytest.fixture
def config_file(tmp_path: Path, ledger_url: str) -> Path:
    return write_config(tmp_path, ledger_url)


@pytest.fixture
def invoke(config_file: Path) -> Invoke:
    """Run ``sendmail-shim --config <test config> ARGS...`` in-process."""
    runner = CliRunner()

    def run(*args: str, config: Path | None = None) -> Result:
        return runner.invoke(cli, ["--config", str(config or config_file), "--actor", "tester",
                                   *args], catch_exceptions=False)

    return run


@pytest.fixture
def ready(invoke: Invoke) -> Invoke:
    """A ledger with customer kunde1 (Unix user web1) and account post@kunde.example."""
    for args in (["db", "upgrade"], ["customer", "add", "kunde1", "--unix-user", "web1", "--allow-missing-user"],
                 ["account", "add", "post@kunde.example", "--customer", "kunde1",
                  "--authenticated"]):
        result = invoke(*args)
        assert result.exit_code == 0, result.output
    return invoke
