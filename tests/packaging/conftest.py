"""Shared fixtures of the packaging tests: the repository, the man pages as a reader sees them."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
MAN_DIR = REPO / "man"
PAGES = ("sendmail.8", "sendmail-shim.8", "sendmail-shim.toml.5")


def version() -> str:
    import tomllib

    return str(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"])


def render(page: Path) -> subprocess.CompletedProcess[str]:
    """The page as `man -l` shows it: wide enough that no heading or key wraps."""
    env = dict(os.environ, MANWIDTH="200", MANPAGER="cat", LC_ALL="C.UTF-8")
    return subprocess.run(["man", "--warnings", "-l", str(page)], capture_output=True, text=True,
                          env=env, timeout=60)


@pytest.fixture(scope="session")
def shown() -> dict[str, str]:
    """Each committed page, rendered."""
    if not shutil.which("man") or not shutil.which("groff"):
        pytest.skip("man and groff are needed (apt-get install man-db groff-base)")
    return {name: render(MAN_DIR / name).stdout for name in PAGES}


@pytest.fixture(scope="session")
def regenerated(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The pages as scripts/manpages.py renders them from the code now."""
    out = tmp_path_factory.mktemp("man")
    proc = subprocess.run([sys.executable, str(REPO / "scripts" / "manpages.py"), "--output", str(out)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return out


def section_of(text: str, heading: str) -> str:
    """The text under one heading of a rendered page, up to the next heading of its level."""
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.strip() == heading)
    indent = len(lines[start]) - len(lines[start].lstrip())
    end = next((i for i in range(start + 1, len(lines))
                if lines[i].strip() and len(lines[i]) - len(lines[i].lstrip()) <= indent), len(lines))
    return "\n".join(lines[start + 1:end])
