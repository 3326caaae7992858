"""The house keeps its floors (ARCHITECTURE.md): every file of the package imports only its own
floor or lower ones, the Pruner and the attributions never import each other, nothing imports the
package's own modules inside a function to dodge a circle, and the import graph has no circle."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "torchpruner"

#: floor of each top-level room; a file may import rooms of its floor or lower ones
FLOORS = {
    "_ops": 0,
    "_state": 0,
    "rules": 1,
    "graph": 2,
    "pruner": 3,
    "attributions": 3,
    "schedule": 4,
    "masking": 4,
    "regularize": 4,
    "distributed": 4,
    "utils": 4,
    "integrations": 5,
}
#: rooms of one floor that must not import each other
SIBLINGS_APART = {frozenset({"pruner", "attributions"})}


def module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def room(module: str) -> str | None:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else None


def imports_of(path: Path) -> list[tuple[str, bool, int]]:
    """``(imported torchpruner module, at module level, line)`` for every import in ``path``."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    top_level = {id(node) for node in tree.body}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            targets = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - node.level + 1]
                prefix = ".".join(base + ([node.module] if node.module else []))
            else:
                prefix = node.module or ""
            # "from . import attention" imports a submodule; "from .x import name" the module x
            targets = [prefix] if node.module else [f"{prefix}.{alias.name}" for alias in node.names]
        else:
            continue
        for target in targets:
            if target == "torchpruner" or target.startswith("torchpruner."):
                found.append((target, id(node) in top_level, node.lineno))
    return found


FILES = sorted(p for p in PACKAGE.rglob("*.py"))
EDGES = {module_name(p): imports_of(p) for p in FILES}


def test_every_room_has_a_floor():
    rooms = {room(module_name(p)) for p in FILES} - {None}
    assert rooms <= set(FLOORS), f"rooms without a floor in FLOORS: {sorted(rooms - set(FLOORS))}"


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_imports_go_down_or_sideways(path):
    source = module_name(path)
    source_room = room(source)
    if source_room is None:  # torchpruner/__init__.py: lazy re-exports only
        assert all(not top for _, top, _ in EDGES[source]), "the package root must not import its rooms eagerly"
        return
    for target, _, line in EDGES[source]:
        target_room = room(target)
        assert target_room is not None, f"{source}:{line} imports the package root (a circle through it)"
        assert FLOORS[target_room] <= FLOORS[source_room], (
            f"{source}:{line} imports {target} (floor {FLOORS[target_room]}) from floor {FLOORS[source_room]}"
        )
        assert frozenset({source_room, target_room}) not in SIBLINGS_APART or source_room == target_room, (
            f"{source}:{line} imports {target}: {source_room} and {target_room} never import each other"
        )


@pytest.mark.parametrize("path", FILES, ids=lambda p: str(p.relative_to(PACKAGE.parent)))
def test_no_function_level_import_of_the_package(path):
    late = [(target, line) for target, top, line in EDGES[module_name(path)] if not top]
    if module_name(path) == "torchpruner":
        return  # lazy re-exports by design (import torchpruner stays cheap)
    assert not late, f"imports of the package's own modules inside functions: {late}"


def test_no_import_circle():
    modules = set(EDGES)

    def resolve(target: str) -> str | None:
        while target and target not in modules:
            target = target.rpartition(".")[0]
        return target or None

    graph = {m: {resolve(t) for t, top, _ in EDGES[m] if top} - {None, m} for m in modules if m != "torchpruner"}
    # a package __init__ importing its own submodules is not a circle: drop parent -> child edges
    graph = {m: {t for t in targets if not t.startswith(m + ".")} for m, targets in graph.items()}
    state: dict[str, int] = {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = 1
        for nxt in graph.get(node, ()):
            if state.get(nxt) == 1:
                cycle = trail[trail.index(nxt) :] + [nxt] if nxt in trail else [node, nxt]
                raise AssertionError("import circle: " + " -> ".join(cycle))
            if nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = 2

    for module in sorted(graph):
        if module not in state:
            visit(module, [module])
