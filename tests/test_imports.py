"""The runtime's module graph: no import cycles, every module importable on its own, nothing from train/export.

The cycle check reads the source (module-level and function-level imports
alike; imports under `if TYPE_CHECKING:` never run and are left out), so a
lazy import that closes a cycle is caught too.
"""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import pytest

import mmap_deploy

PACKAGE_DIR = Path(mmap_deploy.__file__).resolve().parent


def _modules() -> dict[str, Path]:
    out = {}
    for path in sorted(PACKAGE_DIR.rglob("*.py")):
        parts = list(path.relative_to(PACKAGE_DIR.parent).with_suffix("").parts)
        if parts[-1] == "__init__":
            parts = parts[:-1]
        out[".".join(parts)] = path
    return out


MODULES = _modules()


def _is_type_checking(node: ast.If) -> bool:
    test = node.test
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING")


def _imports(module: str, path: Path) -> set[str]:
    """Every module this one imports (absolute names), wherever in the file the import is."""
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    found: set[str] = set()

    def visit(node: ast.AST) -> None:
        if isinstance(node, ast.If) and _is_type_checking(node):
            for child in node.orelse:
                visit(child)
            return
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                target = ".".join(base + ([node.module] if node.module else []))
            else:
                target = node.module or ""
            found.add(target)
            for alias in node.names:  # `from . import demo` imports the module demo
                found.add(f"{target}.{alias.name}")
        for child in ast.iter_child_nodes(node):
            visit(child)

    visit(ast.parse(path.read_text(), filename=str(path)))
    return found


def _graph() -> dict[str, set[str]]:
    return {m: {i for i in _imports(m, p) if i in MODULES and i != m} for m, p in MODULES.items()}


def _find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def dfs(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state:
                found = dfs(nxt)
                if found:
                    return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state:
            found = dfs(node)
            if found:
                return found
    return None


def test_the_checker_finds_a_lazy_cycle():
    assert _find_cycle({"a": {"b"}, "b": {"a"}}) == ["a", "b", "a"]
    assert _find_cycle({"a": {"b"}, "b": {"c"}, "c": set()}) is None


def test_no_import_cycle_in_the_runtime():
    graph = _graph()
    assert "mmap_deploy.engines.select" in graph and graph["mmap_deploy.engines.select"]  # the graph is real
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)


def test_the_runtime_never_imports_training_or_export_code():
    for module, path in MODULES.items():
        heavy = {i for i in _imports(module, path) if i.split(".")[0] in ("mmap_train", "mmap_export", "torch")}
        assert not heavy, f"{module} imports {sorted(heavy)}"


@pytest.mark.parametrize("module", sorted(MODULES))
def test_each_module_imports_first_in_a_fresh_interpreter(module):
    proc = subprocess.run([sys.executable, "-c", f"import {module}"], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


# The runtime's parts, lowest first: a module imports its own part and the parts below it, never one
# above (readers know no engines, writers know no pipeline; see docs/architecture.md).
LAYERS = [("errors", "_version"), ("atomic", "messages", "options", "location"), ("model",),
          ("inputs", "outputs", "engines"), ("demo",), ("run",), ("api",), ("__init__",), ("cli",)]
RANK = {part: i for i, parts in enumerate(LAYERS) for part in parts}


def _part(module: str) -> str:
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else "__init__"


def test_every_part_has_a_layer():
    assert {_part(m) for m in MODULES} <= set(RANK), sorted({_part(m) for m in MODULES} - set(RANK))


def test_imports_go_down_the_layers():
    upward = sorted(f"{a} -> {b}" for a, bs in _graph().items() for b in bs
                    if _part(a) != _part(b) and RANK[_part(b)] > RANK[_part(a)])
    assert not upward, upward


def test_no_import_cycle_in_training():
    """The same check over train/ (mmap_train): its modules, module- and function-level imports."""
    import mmap_train

    root = Path(mmap_train.__file__).resolve().parent
    modules = {}
    for path in sorted(root.glob("*.py")):
        modules["mmap_train" + ("" if path.stem == "__init__" else "." + path.stem)] = path
    graph = {m: {i for i in _imports(m, p) if i in modules and i != m} for m, p in modules.items()}
    assert "mmap_train.phase2" in graph and graph["mmap_train.phase2"]
    cycle = _find_cycle(graph)
    assert cycle is None, " -> ".join(cycle)
