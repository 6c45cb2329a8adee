"""Run the installed ``sendmail`` (and PHP) as a user would, against a test config."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from sendmail_shim.ledger import Ledger

BIN = Path(sys.executable).parent
SENDMAIL = str(BIN / "sendmail")
ADMIN = str(BIN / "sendmail-shim")


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(toml_value(v) for v in value) + "]"
    text = str(value).replace("\\", "\\\\").replace('"', '\\"')
    return f'"{text}"'


def update_section(sections: dict[str, dict[str, Any]], section: str, values: dict[str, Any]) -> None:
    """Set keys of one config table; a value of None removes the key."""
    table = sections.setdefault(section, {})
    for key, value in values.items():
        if value is None:
            table.pop(key, None)
        else:
            table[key] = value


def dump_toml(sections: dict[str, dict[str, Any]]) -> str:
    out = []
    for name, table in sections.items():
        out.append(f"[{name}]")
        out.extend(f"{key} = {toml_value(value)}" for key, value in table.items() if value is not None)
        out.append("")
    return "\n".join(out)


@dataclass
class Result:
    code: int
    stdout: bytes
    stderr: str

    @property
    def line(self) -> str:
        return self.stderr.strip()


SENDING_ACCOUNTS = ("post@kunde.example", "bounce@kunde.example", "root@web1.kunde.example")


class Shim:
    """A test installation: its config file, its ledger with customer "kunde" and its
    authenticated accounts, its log file, and ways to call it."""

    def __init__(self, directory: Path, upstream_port: int, ca_file: Path,
                 accounts: tuple[str, ...] = SENDING_ACCOUNTS) -> None:
        self.dir = directory
        self.config_path = directory / "config.toml"
        self.log_path = directory / "decisions.log"
        self.sections: dict[str, dict[str, Any]] = {
            "upstream": {"host": "127.0.0.1", "port": upstream_port, "ca_file": str(ca_file), "timeout": 10},
            "ledger": {"url": f"sqlite:///{directory / 'ledger.db'}"},
            "spf": {"enabled": False},
            "log": {"syslog": False, "file": str(self.log_path)},
        }
        self.write()
        self.ledger = Ledger(self.sections["ledger"]["url"])
        self.ledger.upgrade()
        if accounts:
            self.ledger.add_customer("kunde")
        for address in accounts:
            self.ledger.add_account(address, "kunde", authenticated=True)

    def configure(self, section: str, **values: Any) -> None:
        update_section(self.sections, section, values)
        self.write()

    def write(self) -> None:
        self.config_path.write_text(dump_toml(self.sections))

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        env["SENDMAIL_SHIM_CONFIG"] = str(self.config_path)
        return env

    def sendmail(self, *args: str, input: bytes = b"", timeout: float = 60) -> Result:
        proc = subprocess.run([SENDMAIL, *args], input=input, capture_output=True, env=self.env,
                              timeout=timeout, cwd=self.dir)
        return Result(proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace"))

    def admin(self, *args: str, timeout: float = 60) -> Result:
        proc = subprocess.run([ADMIN, *args], capture_output=True, env=self.env, timeout=timeout, cwd=self.dir)
        return Result(proc.returncode, proc.stdout, proc.stderr.decode("utf-8", "replace"))

    def php(self, code: str, sendmail_args: str = "-t -i", timeout: float = 60,
            extra_ini: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        php = shutil.which("php")
        assert php, "php-cli is required (apt-get install php-cli)"
        ini = ["-d", f"sendmail_path={SENDMAIL} {sendmail_args}".strip(), "-d", "display_errors=stderr"]
        for key, value in (extra_ini or {}).items():
            ini += ["-d", f"{key}={value}"]
        return subprocess.run([php, *ini, "-r", code], capture_output=True, text=True, env=self.env,
                              timeout=timeout, cwd=self.dir)

    def log_lines(self) -> list[str]:
        return self.log_path.read_text().splitlines() if self.log_path.exists() else []
