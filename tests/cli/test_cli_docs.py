"""Every command is documented, in its help (ending with an example) and in docs/admin-cli.md."""

from __future__ import annotations

from collections.abc import Iterator

import click
import pytest
from click.testing import CliRunner

from sendmail_shim.cli import cli
from tests.ledger.common import REPO

DOCS = (REPO / "docs" / "admin-cli.md").read_text()


def commands(group: click.Group = cli, path: tuple[str, ...] = ()) -> Iterator[tuple[str, ...]]:
    """Every command path a user can run (groups that run on their own included)."""
    for name in sorted(group.commands):
        command = group.commands[name]
        if isinstance(command, click.Group):
            if command.invoke_without_command:
                yield (*path, name)
            yield from commands(command, (*path, name))
        else:
            yield (*path, name)


def all_paths() -> list[tuple[str, ...]]:
    return [(), *commands()]


def test_the_expected_commands_exist() -> None:
    names = {" ".join(path) for path in commands()}
    assert {"db upgrade", "customer add", "customer list", "account add", "account authenticate",
            "account block", "account unblock", "account list", "usage", "usage reset",
            "limits show", "override set", "override list", "override rm", "log",
            "config check"} <= names


@pytest.mark.parametrize("path", list(commands()), ids=" ".join)
def test_every_command_has_a_section_in_the_docs(path: tuple[str, ...]) -> None:
    assert f"\n## sendmail-shim {' '.join(path)}\n" in DOCS


@pytest.mark.parametrize("path", list(commands()), ids=" ".join)
def test_every_documented_example_runs_the_command_it_documents(path: tuple[str, ...]) -> None:
    section = DOCS.split(f"\n## sendmail-shim {' '.join(path)}\n", 1)[1].split("\n## ", 1)[0]
    example = section.split("Example:", 1)[1]
    assert f"sendmail-shim {' '.join(path)}" in example


@pytest.mark.parametrize("path", all_paths(), ids=lambda p: " ".join(p) or "sendmail-shim")
def test_every_help_ends_with_an_example(path: tuple[str, ...]) -> None:
    result = CliRunner().invoke(cli, [*path, "--help"])
    assert result.exit_code == 0
    lines = [line.strip() for line in result.stdout.splitlines() if line.strip()]
    assert lines[-2] == "Example:"
    assert "sendmail-shim " + " ".join(path) in lines[-1]


@pytest.mark.parametrize("path", list(commands()), ids=" ".join)
def test_every_command_takes_json(path: tuple[str, ...]) -> None:
    command: click.Command = cli
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    assert "--json" in [opt for param in command.params for opt in param.opts]
