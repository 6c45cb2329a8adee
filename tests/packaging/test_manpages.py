"""The man pages tell the truth about the code, and render cleanly.

The committed pages must be what scripts/manpages.py makes of the code now; every admin
command, every option and every config key must be in them; what sendmail(8) says about
options and exit codes must be what the program does; and man shows them without a warning.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tomllib
from pathlib import Path
from typing import Any

import click
import pytest

from sendmail_shim import config, exitcodes, invocation
from sendmail_shim.cli import cli
from tests.packaging.conftest import MAN_DIR, PAGES, render, section_of, version
from tests.support.shim import SENDMAIL

# --------------------------------------------------------------------------- in step with the code


@pytest.mark.parametrize("page", PAGES)
def test_the_committed_page_is_what_the_code_renders(page: str, regenerated: Path) -> None:
    committed = (MAN_DIR / page).read_text()
    assert committed == (regenerated / page).read_text(), f"man/{page} is out of date: run make man"


@pytest.mark.parametrize("page", PAGES)
def test_the_page_renders_without_a_warning(page: str, shown: dict[str, str]) -> None:
    proc = render(MAN_DIR / page)
    assert proc.returncode == 0
    assert proc.stderr == ""
    groff = subprocess.run(["groff", "-t", "-man", "-Tutf8", "-ww", "-z", str(MAN_DIR / page)],
                           capture_output=True, text=True, timeout=60)
    assert groff.returncode == 0 and groff.stderr == ""
    assert "NAME" in shown[page] and f"sendmail-shim {version()}" in shown[page]


def test_a_broken_page_would_be_caught(tmp_path: Path) -> None:
    broken = tmp_path / "broken.8"
    broken.write_text('.TH BROKEN 8\n.SH NAME\nbroken \\- x\n.BOGUS macro\n\\f(XXoops\n')
    if not shutil.which("groff"):
        pytest.skip("groff is needed")
    groff = subprocess.run(["groff", "-man", "-Tutf8", "-ww", "-z", str(broken)],
                           capture_output=True, text=True, timeout=60)
    assert groff.stderr != ""


# --------------------------------------------------------------------------- sendmail-shim(8)


def command_paths(group: click.Group = cli, path: tuple[str, ...] = ()) -> list[tuple[str, ...]]:
    found: list[tuple[str, ...]] = []
    for name in sorted(group.commands):
        command = group.commands[name]
        if isinstance(command, click.Group):
            if command.invoke_without_command:
                found.append((*path, name))
            found += command_paths(command, (*path, name))
        else:
            found.append((*path, name))
    return found


def command_at(path: tuple[str, ...]) -> click.Command:
    command: click.Command = cli
    for name in path:
        assert isinstance(command, click.Group)
        command = command.commands[name]
    return command


@pytest.mark.parametrize("path", command_paths(), ids=" ".join)
def test_every_command_has_its_section_with_every_option(path: tuple[str, ...], shown: dict[str, str]) -> None:
    name = "sendmail-shim " + " ".join(path)
    section = section_of(shown["sendmail-shim.8"], name)
    assert section.strip().startswith(name), "the section opens with the command's synopsis"
    for param in command_at(path).params:
        for opt in param.opts if isinstance(param, click.Option) else []:
            assert opt in section, f"{name}: {opt} is not documented"
    assert re.search(rf"Example:\s+(\S+=\S+ )?{re.escape(name)}\b", section), f"{name}: no example"


def test_the_expected_commands_are_documented(shown: dict[str, str]) -> None:
    headings = {line.strip() for line in shown["sendmail-shim.8"].splitlines()}
    for name in ("db upgrade", "customer add", "account add", "account authenticate", "account block",
                 "account unblock", "account list", "usage", "limits show", "override set", "override list",
                 "override rm", "log", "spf check", "config check"):
        assert f"sendmail-shim {name}" in headings


def test_the_global_options_are_documented(shown: dict[str, str]) -> None:
    section = section_of(shown["sendmail-shim.8"], "GLOBAL OPTIONS")
    for param in cli.params:
        for opt in param.opts:
            assert opt in section


# --------------------------------------------------------------------------- sendmail-shim.toml(5)

MINIMAL: dict[str, Any] = {"upstream": {"host": "smtp.example.net"}, "spf": {"enabled": False}}
WITH_SPF: dict[str, Any] = {"upstream": {"host": "smtp.example.net"}, "spf": {"relay_ips": ["192.0.2.25"]}}
# [abuse] is off without the section: its keys' defaults are those of an [abuse] table left empty.
WITH_ABUSE: dict[str, Any] = {**MINIMAL, "abuse": {}}


def config_keys() -> list[tuple[str, str]]:
    import dataclasses

    keys = []
    for section in dataclasses.fields(config.Config):
        kind = getattr(config, str(section.type), None)
        if kind is not None and dataclasses.is_dataclass(kind):
            keys += [(section.name, field.name) for field in dataclasses.fields(kind)]
    return keys


def documented(shown: dict[str, str], section: str, key: str) -> str:
    """The entry of one key in the config page: its line and its description."""
    text = section_of(shown["sendmail-shim.toml.5"], "SECTIONS")
    part = section_of(text, f"[{section}]")
    entry = section_of(part, next(line.strip() for line in part.splitlines()
                                  if line.strip().startswith(f"{key} = ")))
    return next(line.strip() for line in part.splitlines() if line.strip().startswith(f"{key} = ")) + "\n" + entry


def loaded(data: dict[str, Any]) -> config.Config:
    return config.from_mapping(data, "test.toml")


def test_the_config_has_the_contract_keys() -> None:
    keys = set(config_keys())
    for key in [("upstream", "host"), ("upstream", "port"), ("upstream", "ca_file"), ("ledger", "url"),
                ("spf", "relay_ips"), ("spf", "nameservers"), ("limits", "account"), ("limits", "customer"),
                ("gate", "socket")]:
        assert key in keys


@pytest.mark.parametrize(("section", "key"), config_keys(), ids=lambda v: str(v))
def test_every_config_key_is_documented_with_the_default_the_parser_uses(
        section: str, key: str, shown: dict[str, str]) -> None:
    entry = " ".join(documented(shown, section, key).split())
    base = WITH_SPF if (section, key) == ("spf", "enabled") else WITH_ABUSE if section == "abuse" else MINIMAL
    without_it = getattr(getattr(loaded(base), section), key)
    default = re.search(r"Default: (.+?)\.$", entry)
    if default is None:
        assert "Required." in entry or ("Unset:" in entry and without_it is None), entry
        return
    if default[1] == "unset":
        assert without_it is None
        return
    data = {name: dict(table) for name, table in base.items()}
    data.setdefault(section, {})[key] = tomllib.loads(f"value = {default[1]}")["value"]
    assert getattr(getattr(loaded(data), section), key) == without_it


def test_a_misspelt_key_is_refused_as_the_page_says() -> None:
    with pytest.raises(config.ConfigError) as caught:
        loaded({**MINIMAL, "upstream": {"host": "smtp.example.net", "prot": 25}})
    assert caught.value.key == "upstream.prot" and caught.value.problem == "unknown key"


# --------------------------------------------------------------------------- sendmail(8)


def option_forms(heading: str) -> list[str]:
    """The option forms listed under one subsection of sendmail(8)'s OPTIONS, e.g. '-f ADDR'.

    Read from the page's source: each term follows a .TP request.
    """
    source = (MAN_DIR / "sendmail.8").read_text()
    part = source.split(f".SS {heading}\n", 1)[1].split("\n.S", 1)[0]
    terms = re.findall(r"^\.TP\n(.+)$", part, flags=re.MULTILINE)
    plain = [re.sub(r"\\f[BIR]", "", term).replace("\\-", "-").replace("\\&", "") for term in terms]
    return [form.strip() for term in plain if term.startswith("-") for form in term.split(", ")]


def test_every_option_of_the_tables_is_listed() -> None:
    honoured = option_forms("Honoured options")
    ignored = option_forms("Accepted and ignored")
    refused = option_forms("Refused options")
    assert {"-t", "-i", "-oi", "-f ADDR", "-fADDR", "-r ADDR", "-bm", "-bs", "--"} <= set(honoured)
    assert {f"-{letter}" for letter, _, _ in invocation.IGNORED_OPTIONS} <= {form.split()[0][:2] for form in ignored}
    assert {f"-{letter}" for letter in invocation.REFUSED_OPTIONS} <= set(refused)


def sample_argv(form: str) -> list[str]:
    """An argv a client would pass for a documented option form, with a recipient."""
    words = form.split()
    values = {"ADDR": "post@kunde.example", "NAME": "Kunde AS", "7BIT|8BITMIME": "8BITMIME",
              "NOTIFY": "success,failure", "RET": "hdrs", "ENVID": "abc123", "tag": "php",
              "N": "3", "option=value": "DeliveryMode=b"}
    argv = [values.get(word, word) for word in words]
    if re.fullmatch(r"-f[A-Z]+", words[0]):
        argv = ["-fpost@kunde.example"]
    if argv[0] == "-oX":
        argv = ["-oem"]
    if argv[0] == "-bs":
        return argv
    return [*argv, "ola@example.org"]


def test_every_honoured_option_is_taken() -> None:
    for form in option_forms("Honoured options"):
        parsed = invocation.parse_argv(sample_argv(form))
        assert parsed.mode in ("deliver", "smtp"), form


def test_every_ignored_option_is_accepted_and_changes_nothing() -> None:
    plain = invocation.parse_argv(["ola@example.org"])
    for form in option_forms("Accepted and ignored"):
        parsed = invocation.parse_argv(sample_argv(form))
        assert parsed.ignored, form
        assert (parsed.mode, parsed.recipients, parsed.sender) == (plain.mode, plain.recipients, plain.sender)


@pytest.mark.parametrize("argv", [["-C/etc/passwd"], ["-X", "/var/www/shell.php"], ["-q15m"], ["-d0.1"],
                                  ["-I"], ["-be"], ["-bd"], ["-bi"], ["-bp"], ["-bt"], ["-bv"], ["-Z"]],
                         ids=" ".join)
def test_every_refused_option_is_refused_with_64(argv: list[str], tmp_path: Path) -> None:
    refused = option_forms("Refused options")
    if argv[0][:2] in {f"-{letter}" for letter in invocation.REFUSED_OPTIONS}:
        assert argv[0][:2] in refused
    elif argv[0].startswith("-b"):
        assert argv[0] in refused
    proc = subprocess.run([SENDMAIL, *argv, "ola@example.org"], input=b"Subject: x\n\nx\n",
                          capture_output=True, timeout=60, cwd=tmp_path,
                          env=dict(os.environ, SENDMAIL_SHIM_CONFIG=str(tmp_path / "none.toml")))
    assert proc.returncode == 64
    assert len(proc.stderr.decode().strip().splitlines()) == 1


def test_the_exit_status_table_is_every_code_the_program_uses(shown: dict[str, str]) -> None:
    part = section_of(shown["sendmail.8"], "EXIT STATUS")
    listed = {int(code) for code in re.findall(r"^ +(\d+) EX_[A-Z]+", part, flags=re.MULTILINE)}
    assert listed == {code for _, code in exitcodes.EXIT_CODES} | {0, os.EX_SOFTWARE}
    assert 75 not in listed
