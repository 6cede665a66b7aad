"""The Python that pyproject.toml declares (`requires-python`) is the oldest that the code runs on.

Every source is parsed at that version here, and, where an interpreter of that
version is found ($MMAP_FLOOR_PYTHON, which .ci/run sets, else pyenv's or one on
PATH), compiled by it and checked for standard-library names it lacks
(`typing.Self` and `tomllib` came with 3.11). .ci/run also installs the runtime
on it and runs `mmap-predict --demo`.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO, pyproject

SOURCE_DIRS = ("mmap_deploy", "train", "export", "tests", "benchmarks")


def declared_floor() -> tuple[int, int]:
    spec = pyproject()["project"]["requires-python"]
    m = re.fullmatch(r">=\s*3\.(\d+)", spec.strip())
    assert m, f"requires-python is {spec!r}; this test reads a plain '>=3.N'"
    return 3, int(m.group(1))


def sources() -> list[Path]:
    return sorted(p for d in SOURCE_DIRS for p in (REPO / d).rglob("*.py"))


def _guarded(tree: ast.Module) -> set[int]:
    """Line numbers of imports inside `try: ... except ImportError` (a fallback for an older Python)."""
    lines = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Try) and any(
                isinstance(h.type, ast.Name) and h.type.id in ("ImportError", "ModuleNotFoundError")
                for h in node.handlers):
            lines |= {n.lineno for stmt in node.body for n in ast.walk(stmt) if isinstance(n, (ast.Import, ast.ImportFrom))}
    return lines


def stdlib_names(path: Path) -> set[tuple[str, str]]:
    """(module, name) for each standard-library module a source imports and each name it takes from one
    (`from typing import Self`, `typing.Self`); name '' for the module itself."""
    tree = ast.parse(path.read_text(encoding="utf-8"), str(path))
    guarded, bound, out = _guarded(tree), {}, set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import) and node.lineno not in guarded:
            for a in node.names:
                if a.name.split(".")[0] in sys.stdlib_module_names:
                    out.add((a.name, ""))
                    bound[a.asname or a.name.split(".")[0]] = a.name if a.asname else a.name.split(".")[0]
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.lineno not in guarded:
            if node.module.split(".")[0] in sys.stdlib_module_names:
                out |= {(node.module, a.name) for a in node.names if a.name != "*"}
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id in bound:
            out.add((bound[node.value.id], node.attr))
    return out


def _resolves(module: str, name: str) -> bool:
    import importlib
    import importlib.util

    try:
        mod = importlib.import_module(module)
    except ImportError:
        return False
    return not name or hasattr(mod, name) or (
        hasattr(mod, "__path__") and importlib.util.find_spec(f"{module}.{name}") is not None)


# Run by the floor interpreter: compile each source, resolve each name; print what fails, as JSON.
_CHECK = """
import importlib, importlib.util, json, sys
job = json.load(sys.stdin)
bad = []
for path in job["files"]:
    try:
        compile(open(path, encoding="utf-8").read(), path, "exec")
    except SyntaxError as e:
        bad.append(f"{path}:{e.lineno}: {e.msg}")
for module, name in job["names"]:
    try:
        mod = importlib.import_module(module)
    except ImportError:
        bad.append(f"import {module}")
        continue
    if name and not hasattr(mod, name) and not (
            hasattr(mod, "__path__") and importlib.util.find_spec(f"{module}.{name}") is not None):
        bad.append(f"{module}.{name}")
print(json.dumps(bad))
"""


def floor_python(floor: tuple[int, int]) -> str | None:
    """An interpreter of the `floor` version: $MMAP_FLOOR_PYTHON, else pyenv's, else `python3.N` on PATH."""
    given = os.environ.get("MMAP_FLOOR_PYTHON")
    name = f"python{floor[0]}.{floor[1]}"
    pyenv = Path(os.environ.get("PYENV_ROOT", Path.home() / ".pyenv")) / "versions"
    candidates = [given] if given else [
        *(str(p / "bin" / name) for p in sorted(pyenv.glob(f"{floor[0]}.{floor[1]}.*"), reverse=True)),
        shutil.which(name)]
    for exe in filter(None, candidates):
        r = subprocess.run([exe, "-c", "import sys; print(*sys.version_info[:2])"], capture_output=True, text=True)
        if r.returncode == 0 and tuple(map(int, r.stdout.split())) == floor:
            return exe
        assert not given, f"MMAP_FLOOR_PYTHON={given} is not a working Python {floor[0]}.{floor[1]}: {r.stderr.strip()}"
    return None


def test_every_source_parses_at_the_declared_minimum():
    floor = declared_floor()
    failed = []
    for path in sources():
        try:
            ast.parse(path.read_text(encoding="utf-8"), str(path), feature_version=floor)
        except SyntaxError as e:
            failed.append(f"{path.relative_to(REPO)}:{e.lineno}: {e.msg}")
    assert failed == []


def test_the_scan_finds_names_newer_than_the_floor(tmp_path):
    """`from typing import Self`, `typing.Self` and `import tomllib` are seen; a guarded fallback is not."""
    probe = tmp_path / "probe.py"
    probe.write_text("import typing\nimport tomllib\nfrom typing import Self, NamedTuple\nx: typing.Self\n"
                     "try:\n    import tomllib as toml\nexcept ModuleNotFoundError:\n    import tomli as toml\n")
    assert stdlib_names(probe) == {("typing", ""), ("tomllib", ""), ("typing", "Self"), ("typing", "NamedTuple")}
    assert not _resolves("typing", "NoSuchName") and _resolves("typing", "NamedTuple")


def test_sources_compile_and_find_their_stdlib_names_on_the_declared_minimum():
    floor = declared_floor()
    exe = floor_python(floor)
    if exe is None:
        pytest.skip(f"no Python {floor[0]}.{floor[1]} interpreter here (set MMAP_FLOOR_PYTHON, or pyenv install it)")
    files = sources()
    # only what this (newer) Python has: a platform's own module (msvcrt) is no version's business
    names = sorted(n for n in {n for p in files for n in stdlib_names(p)} if _resolves(*n))
    r = subprocess.run([exe, "-c", _CHECK], input=json.dumps({"files": list(map(str, files)), "names": names}),
                       capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert json.loads(r.stdout) == [], f"not in Python {floor[0]}.{floor[1]} (requires-python)"
