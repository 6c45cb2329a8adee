"""The import direction written in docs/architecture.md holds for every module.

The layer of each module and the rank of each store module are read from the
document's tables; the imports are read from the source (every ``import`` and
``from ... import``, in functions and under TYPE_CHECKING too). The test fails
when a module imports upward, when imports form a circle, when a module is in
no table, and when a rule has a second home.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
PACKAGE = REPO / "sendmail_shim"
DOC = REPO / "docs" / "architecture.md"
LAYERS = ("config", "store", "stages", "pipeline", "front ends")  # lowest first


def module_name(path: Path) -> str:
    parts = list(path.relative_to(REPO).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


MODULES = {module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def table_rows(heading: str) -> list[list[str]]:
    """The cells of the first table under ``heading`` in docs/architecture.md."""
    text = DOC.read_text()
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[2:]]


def documented_modules(cell: str, prefix: str) -> list[str]:
    names = []
    for file_name in re.findall(r"`([^`]+)`", cell):
        if file_name.endswith("/"):
            package = prefix + file_name.rstrip("/")
            names += [name for name in MODULES if name == package or name.startswith(package + ".")]
        else:
            names.append(module_name(PACKAGE.joinpath(*prefix.split(".")[1:], file_name)))
    return names


def layer_of() -> dict[str, int]:
    found: dict[str, int] = {}
    for layer, cell in table_rows("Layers"):
        for name in documented_modules(cell, "sendmail_shim."):
            assert name not in found, f"{name} is in two layers of docs/architecture.md"
            found[name] = LAYERS.index(layer)
    return found


def store_rank() -> dict[str, int]:
    found: dict[str, int] = {}
    for rank, cell, _ in table_rows("Inside the store"):
        for name in documented_modules(cell, "sendmail_shim.ledger."):
            found[name] = int(rank)
    return found


def imports_of(name: str) -> set[str]:
    """The program's modules that ``name`` imports (a package's submodule when it names one)."""
    path = MODULES[name]
    tree = ast.parse(path.read_text(), str(path))
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join([*anchor, *([base] if base else [])])
            submodules = {f"{base}.{alias.name}" for alias in node.names} & MODULES.keys()
            found.update(submodules)
            if len(submodules) < len(node.names):  # some names come from the module itself
                found.add(base)
    return {target for target in found if target in MODULES and target != name}


GRAPH = {name: imports_of(name) for name in MODULES}


def test_every_module_is_in_exactly_one_layer_of_the_document() -> None:
    layers = layer_of()
    assert sorted(set(MODULES) - set(layers)) == [], "modules missing from docs/architecture.md"
    assert sorted(set(layers) - set(MODULES)) == [], "docs/architecture.md names modules that do not exist"


def test_every_store_module_has_a_rank() -> None:
    store = {name for name in MODULES if name.startswith("sendmail_shim.ledger")}
    assert set(store_rank()) == store


def test_no_module_imports_a_layer_above_its_own() -> None:
    layers = layer_of()
    upward = sorted(f"{name} ({LAYERS[layers[name]]}) imports {target} ({LAYERS[layers[target]]})"
                    for name, targets in GRAPH.items() for target in targets
                    if layers[target] > layers[name])
    assert upward == []


def test_inside_the_store_no_module_imports_a_higher_rank() -> None:
    ranks = store_rank()
    upward = sorted(f"{name} ({ranks[name]}) imports {target} ({ranks[target]})"
                    for name, targets in GRAPH.items() if name in ranks
                    for target in targets if target in ranks and ranks[target] > ranks[name])
    assert upward == []


def test_every_module_of_the_store_stays_small() -> None:
    sizes = {name: len(path.read_text().splitlines()) for name, path in MODULES.items()
             if name.startswith("sendmail_shim.ledger")}
    assert {name: lines for name, lines in sizes.items() if lines > 500} == {}


def test_the_store_imports_nothing_but_itself_and_the_config_layer() -> None:
    layers = layer_of()
    outside = sorted(f"{name} imports {target}" for name, targets in GRAPH.items()
                     if name.startswith("sendmail_shim.ledger") for target in targets
                     if not target.startswith("sendmail_shim.ledger") and layers[target] != 0)
    assert outside == []


def test_imports_form_no_circle() -> None:
    assert find_cycle(GRAPH) is None


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    """One import circle, as the list of modules around it, or None."""
    state: dict[str, str] = {}
    trail: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = "open"
        trail.append(node)
        for target in sorted(graph.get(node, ())):
            if state.get(target) == "open":
                return [*trail[trail.index(target):], target]
            if target not in state and (cycle := visit(target)) is not None:
                return cycle
        trail.pop()
        state[node] = "done"
        return None

    for start in sorted(graph):
        if start not in state and (cycle := visit(start)) is not None:
            return cycle
    return None


def test_the_checks_would_catch_a_circle_and_an_upward_import() -> None:
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None
    relative = ast.parse("from ..queue import enqueue\nfrom . import windows\n")
    assert [n.level for n in ast.walk(relative) if isinstance(n, ast.ImportFrom)] == [2, 1]


# --------------------------------------------------------------------------- one home per rule


def uses(pattern: str) -> list[str]:
    found = []
    for name, path in MODULES.items():
        for number, line in enumerate(path.read_text().splitlines(), 1):
            if re.search(pattern, line):
                found.append(f"{name}:{number}")
    return found


def test_exit_codes_come_from_exitcodes_alone() -> None:
    # os.EX_OK is plain success; every other code is named in exitcodes.py.
    assert [use for use in uses(r"\bos\.EX_(?!OK\b)") if not use.startswith("sendmail_shim.exitcodes:")] == []
    assert uses(r"^\s+exit_code\s*=") == []


@pytest.mark.parametrize("pattern", [r"S_IRWX[GO]", r"0o077\b", r"st_mode\s*&\s*0o"])
def test_the_secret_file_check_lives_in_config_alone(pattern: str) -> None:
    assert [use for use in uses(pattern) if not use.startswith("sendmail_shim.config:")] == []
