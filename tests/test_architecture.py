"""The import rules of docs/ARCHITECTURE.md hold: every import of `leaf_ray/`, `jobs/` and `scripts/` (lazy and
TYPE_CHECKING ones included) goes to its own unit or to a unit on a lower layer of the table there, so no import
runs back up and no units import each other in a circle."""

from __future__ import annotations

import ast
import functools
import re
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SOURCES = ("leaf_ray", "jobs", "scripts")
# Package faces that only hand names on: they belong to no unit and must import nothing of leaf_ray.
FACES = {"leaf_ray/__init__.py", "leaf_ray/experiments/__init__.py"}


def layer_table() -> dict[str, int]:
    """unit path ("leaf_ray/data/", "leaf_ray/cli.py") -> layer, read from the table in docs/ARCHITECTURE.md."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text(encoding="utf-8")
    section = text.split("## What may import what", 1)[1].split("\n## ", 1)[0]
    units = {}
    for row in re.finditer(r"^\| (\d+) \| (.+?) \|", section, flags=re.MULTILINE):
        for unit in re.findall(r"`([^`]+)`", row.group(2)):
            units[unit] = int(row.group(1))
    return units


def unit_of(path: str, units: dict[str, int]) -> str | None:
    """The unit a repository path belongs to: the longest unit path that is the file or a folder above it."""
    best = None
    for unit in units:
        if (path == unit or (unit.endswith("/") and path.startswith(unit))) and len(unit) > len(best or ""):
            best = unit
    return best


def module_path(module: str) -> str | None:
    """`leaf_ray.detect.pipeline` -> "leaf_ray/detect/pipeline.py" (or the package's __init__.py)."""
    base = REPO / Path(*module.split("."))
    for candidate in (base.with_suffix(".py"), base / "__init__.py"):
        if candidate.is_file():
            return candidate.relative_to(REPO).as_posix()
    return None


def imported_modules(tree: ast.AST):
    """(line, module) of every import of leaf_ray in a parsed file; `from leaf_ray import x` names leaf_ray.x."""
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "leaf_ray":
                    yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            if node.module == "leaf_ray":
                for alias in node.names:
                    yield node.lineno, f"leaf_ray.{alias.name}"
            elif node.module.split(".")[0] == "leaf_ray":
                yield node.lineno, node.module


@functools.lru_cache(maxsize=1)
def import_edges() -> tuple[tuple[str, int, str, str], ...]:
    """(source file, line, source unit, target unit) of every import that crosses units (read once)."""
    return tuple(_walk(layer_table()))


def _walk(units: dict[str, int]):
    for root in SOURCES:
        for file in sorted((REPO / root).rglob("*.py")):
            rel = file.relative_to(REPO).as_posix()
            tree = ast.parse(file.read_text(encoding="utf-8"), filename=rel)
            source = unit_of(rel, units)
            for line, module in imported_modules(tree):
                target_path = module_path(module)
                assert target_path is not None, f"{rel}:{line} imports {module}, which is no file of the repository"
                target = unit_of(target_path, units)
                if rel in FACES:
                    raise AssertionError(f"{rel}:{line}: a package face imports {module}")
                assert source is not None, f"{rel} belongs to no unit of docs/ARCHITECTURE.md's layer table"
                if target_path in FACES:
                    continue
                assert target is not None, f"{target_path} belongs to no unit of docs/ARCHITECTURE.md's layer table"
                if source != target:
                    yield rel, line, source, target


def test_the_layer_table_names_real_paths_and_every_file_has_a_unit():
    units = layer_table()
    assert len(units) >= 15 and set(units.values()) == set(range(1, 12))
    missing = [u for u in units if not (REPO / u).exists()]
    assert not missing, f"docs/ARCHITECTURE.md's layer table names paths that do not exist: {missing}"
    homeless = [f.relative_to(REPO).as_posix() for root in SOURCES for f in (REPO / root).rglob("*.py")
                if unit_of(f.relative_to(REPO).as_posix(), units) is None
                and f.relative_to(REPO).as_posix() not in FACES]
    assert not homeless, f"files in no unit of docs/ARCHITECTURE.md's layer table: {homeless}"


def test_imports_only_run_down_the_layers():
    units = layer_table()
    edges = import_edges()
    pairs = {(s, t) for _, _, s, t in edges}
    # The walk reads lazy imports too: these are function-local imports of today's code.
    assert ("leaf_ray/pipeline.py", "leaf_ray/detect/") in pairs
    assert ("leaf_ray/cli.py", "leaf_ray/experiments/focus/") in pairs
    upward = [f"{rel}:{line}: {s} (layer {units[s]}) imports {t} (layer {units[t]})"
              for rel, line, s, t in edges if units[t] >= units[s]]
    assert not upward, "imports that do not run down the layers:\n" + "\n".join(upward)


def test_no_circle_between_units():
    # Implied by the layers; checked on its own so a change to the table cannot hide a circle.
    graph: dict[str, set[str]] = {}
    for _, _, s, t in import_edges():
        graph.setdefault(s, set()).add(t)
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in sorted(graph.get(node, ())):
            assert state.get(nxt) != 1, "import circle: " + " -> ".join(trail + [node, nxt])
            if nxt not in state:
                visit(nxt, trail + [node])
        state[node] = 2

    for node in sorted(graph):
        if node not in state:
            visit(node, [])
