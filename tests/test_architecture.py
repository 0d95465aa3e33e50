"""The package's floors: imports only go down, and nothing imports in a circle.

The table below *is* the architecture (README "Architecture"): a module may import
modules of its own floor or of a lower one. A new top-level module or package has to be
placed in the table, which makes every new dependency a conscious choice. Imports inside
functions count too: a lazy import still ties the two modules together.
"""

from __future__ import annotations

import ast
from pathlib import Path

import simsteer

PACKAGE = Path(simsteer.__file__).parent

#: Floor of every top-level module or package of ``simsteer``, lowest first.
FLOORS: dict[str, int] = {
    # ground floor: errors, I/O, instruments; nothing here knows about the loop
    "_version": 0,
    "errors": 0,
    "io": 1,
    "schema": 1,  # the one checker of every file read back (imports only errors)
    "prompts": 1,
    "stats": 1,
    "architecture": 1,
    "models": 2,
    "tokens": 3,
    "hooks": 4,
    "functions": 5,
    "steering": 5,
    "policy": 6,
    # generation: every engine (torch, llama.cpp, vLLM) behind one generate()
    "generation": 7,
    "export": 7,
    "activations": 7,
    "fluency": 7,
    # plug-ins
    "learners": 8,
    "oracles": 8,
    # where the loop's model work runs (this process or Ray actors)
    "workers": 8.5,
    # the algorithm
    "loop": 9,
    # studies of runs
    "evaluation": 10,
    # faces
    "serve": 11,
    "integrations": 11,
    "cli": 12,
    # the package root and ``python -m simsteer``: imported by nobody inside
    "__init__": 13,
    "__main__": 13,
}


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(PACKAGE.parent).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


def _modules() -> dict[str, Path]:
    return {_module_name(p): p for p in sorted(PACKAGE.rglob("*.py"))}


def _imports(name: str, path: Path, known: set[str]) -> set[str]:
    """The ``simsteer`` modules that ``name`` imports (resolving relative imports)."""
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names if a.name.split(".")[0] == "simsteer")
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".")
                if not is_package:
                    base = base[:-1]
                base = base[: len(base) - (node.level - 1)]
                target = ".".join([*base, *([node.module] if node.module else [])])
            else:
                target = node.module or ""
            if target.split(".")[0] != "simsteer":
                continue
            found.add(target)
            # ``from pkg import submodule`` imports the submodule too
            found.update(f"{target}.{a.name}" for a in node.names if f"{target}.{a.name}" in known)
    return {m for m in found if m in known and m != name}


def _graph() -> dict[str, set[str]]:
    modules = _modules()
    known = set(modules)
    return {name: _imports(name, path, known) for name, path in modules.items()}


def _component(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_top_level_module_has_a_floor():
    components = {_component(m) for m in _modules()}
    unplaced = sorted(components - set(FLOORS))
    assert not unplaced, f"place these in FLOORS (tests/test_architecture.py): {unplaced}"


def test_imports_only_go_down():
    upward = [
        f"{src} (floor {FLOORS[_component(src)]}) imports {dst} (floor {FLOORS[_component(dst)]})"
        for src, targets in _graph().items()
        for dst in sorted(targets)
        if FLOORS.get(_component(dst), -1) > FLOORS.get(_component(src), -1)
    ]
    assert not upward, "upward imports:\n" + "\n".join(upward)


def test_nothing_inside_imports_the_package_root():
    importers = sorted(src for src, targets in _graph().items() if "simsteer" in targets)
    assert not importers, f"import from the module that defines it, not the package root: {importers}"


def test_no_import_cycles():
    graph = _graph()
    # Tarjan's strongly connected components: any component of size > 1 is a cycle.
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    cycles: list[list[str]] = []

    def visit(node: str) -> None:
        index[node] = low[node] = len(index)
        stack.append(node)
        on_stack.add(node)
        for nxt in graph[node]:
            if nxt not in index:
                visit(nxt)
                low[node] = min(low[node], low[nxt])
            elif nxt in on_stack:
                low[node] = min(low[node], index[nxt])
        if low[node] == index[node]:
            component = []
            while True:
                member = stack.pop()
                on_stack.discard(member)
                component.append(member)
                if member == node:
                    break
            if len(component) > 1:
                cycles.append(sorted(component))

    for node in sorted(graph):
        if node not in index:
            visit(node)
    assert not cycles, f"import cycles: {cycles}"


def test_the_checker_sees_a_planted_cycle_and_an_upward_import(tmp_path, monkeypatch):
    """The checks above can fail: a fake package with a cycle and an upward import."""
    pkg = tmp_path / "simsteer"
    (pkg / "loop").mkdir(parents=True)
    (pkg / "__init__.py").write_text("")
    (pkg / "errors.py").write_text("from .loop import sims\n")  # floor 0 -> floor 9
    (pkg / "loop" / "__init__.py").write_text("")
    (pkg / "loop" / "sims.py").write_text("from ..errors import x\n")
    monkeypatch.setattr(f"{__name__}.PACKAGE", pkg)
    graph = _graph()
    assert graph["simsteer.errors"] == {"simsteer.loop", "simsteer.loop.sims"}
    assert graph["simsteer.loop.sims"] == {"simsteer.errors"}
    try:
        test_imports_only_go_down()
    except AssertionError as exc:
        assert "simsteer.errors (floor 0) imports simsteer.loop" in str(exc)
    else:
        raise AssertionError("the upward import was not reported")
    try:
        test_no_import_cycles()
    except AssertionError as exc:
        assert "simsteer.errors" in str(exc)
    else:
        raise AssertionError("the cycle was not reported")
