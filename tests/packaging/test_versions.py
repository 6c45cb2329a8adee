"""One version everywhere, and libraries in the packages that the code accepts."""

from __future__ import annotations

import re
import tomllib

from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.packaging.conftest import REPO, version

PINS = REPO / "packaging" / "debian" / "python-requirements.txt"


def pins() -> dict[str, str]:
    text = PINS.read_text().replace("\\\n", " ")
    found: dict[str, str] = {}
    for line in text.splitlines():
        match = re.match(r"^([A-Za-z0-9_.-]+)==(\S+)\s+--hash=sha256:[0-9a-f]{64}\b", line.strip())
        if match:
            found[str(canonicalize_name(match[1]))] = match[2]
    return found


def test_the_packages_carry_the_project_version() -> None:
    changelog = (REPO / "packaging" / "debian" / "changelog").read_text().splitlines()[0]
    assert changelog.startswith(f"sendmail-shim ({version()}) ")
    spec = (REPO / "packaging" / "rpm" / "sendmail-shim.spec").read_text()
    assert re.search(rf"^Version:\s+{re.escape(version())}$", spec, flags=re.MULTILINE)


def test_every_pin_has_a_hash() -> None:
    lines = [line for line in PINS.read_text().replace("\\\n", " ").splitlines()
             if line.strip() and not line.lstrip().startswith("#")]
    assert len(lines) == len(pins())


def test_the_bundled_libraries_satisfy_the_project_dependencies() -> None:
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    bundled = pins()
    for text in project["dependencies"] + project["optional-dependencies"]["postgresql"]:
        requirement = Requirement(text)
        if requirement.marker is not None and not requirement.marker.evaluate({"python_version": "3.11"}):
            continue
        name = str(canonicalize_name(requirement.name))
        assert name in bundled, f"{requirement.name} is not bundled"
        assert requirement.specifier.contains(bundled[name]), f"{name} {bundled[name]} does not satisfy {text}"
