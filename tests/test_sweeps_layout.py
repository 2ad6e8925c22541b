"""The shape of ``sweeps/``: dependencies point one way (nothing imports the entry points, no import
cycle, counting imports inside functions too), no module over 400 lines, no function over 80 lines."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

SWEEPS = Path(__file__).resolve().parent.parent / "sweeps"
ENTRY_POINTS = {"sweeps.cli", "sweeps.runner", "sweeps.report", "sweeps.run", "sweeps.cache_cli", "sweeps.evaluate"}
"""Modules only a user (or the ``sweeps.run`` shim, for ``cli``) starts; no other module imports them."""
MAX_MODULE_LINES = 400
MAX_FUNCTION_LINES = 80


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(SWEEPS.rglob("*.py")):
        rel = path.relative_to(SWEEPS.parent).with_suffix("")
        parts = list(rel.parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


def _imports(path: Path, modules: set[str]) -> set[str]:
    """Every ``sweeps`` module that ``path`` imports, anywhere in the file."""
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found |= {n for n in names if n in modules and n != "sweeps"}
    return found


def _graph() -> dict[str, set[str]]:
    mods = _modules()
    return {name: _imports(path, set(mods)) - {name} for name, path in mods.items()}


def test_nothing_imports_the_entry_points() -> None:
    graph = _graph()
    allowed = {("sweeps.run", "sweeps.cli"), ("sweeps.cli", "sweeps.runner"), ("sweeps.cli", "sweeps.evaluate")}  # the shim; flags -> the runner, the final evaluation
    bad = sorted((m, d) for m, deps in graph.items() for d in deps if d in ENTRY_POINTS and (m, d) not in allowed)
    assert not bad, f"entry points imported by other modules: {bad}"


def test_no_import_cycle_in_sweeps() -> None:
    graph = _graph()
    state: dict[str, int] = {}
    stack: list[str] = []

    def visit(m: str) -> None:
        state[m] = 1
        stack.append(m)
        for d in sorted(graph.get(m, ())):
            if state.get(d) == 1:
                raise AssertionError("import cycle: " + " -> ".join(stack[stack.index(d):] + [d]))
            if d not in state:
                visit(d)
        stack.pop()
        state[m] = 2

    for m in sorted(graph):
        if m not in state:
            visit(m)


def test_the_optuna_storage_imports_no_ray() -> None:
    graph = _graph()
    text = (SWEEPS / "optuna_storage.py").read_text()
    assert "import ray" not in text and "from ray" not in text
    assert graph["sweeps.optuna_storage"] <= {"sweeps.ray_compat"}


def test_module_and_function_sizes() -> None:
    too_long = []
    for name, path in _modules().items():
        lines = len(path.read_text().splitlines())
        if lines > MAX_MODULE_LINES:
            too_long.append(f"{name}: {lines} lines")
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
                n = (node.end_lineno or node.lineno) - node.lineno + 1
                if n > MAX_FUNCTION_LINES:
                    too_long.append(f"{name}.{node.name}: {n} lines")
    assert not too_long, too_long

