"""The runtime stays light: no torch (nor training/export code) behind `import mmap_deploy`."""

import subprocess
import sys
from pathlib import Path

from conftest import pyproject

HEAVY = ("torch", "timm", "peft", "onnx", "onnxruntime", "anndata", "openslide", "tensorrt", "mmap_train", "mmap_export")
REPO = Path(__file__).resolve().parents[1]


def _imported_after(code: str) -> list[str]:
    probe = f"{code}\nimport sys\nprint(','.join(m for m in {HEAVY!r} if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True).stdout
    return [m for m in out.strip().split(",") if m]


def test_import_mmap_deploy_is_light():
    assert _imported_after("import mmap_deploy, mmap_deploy.model.bundle, mmap_deploy.model.preprocess, mmap_deploy.model.prototypes") == []


def test_cli_module_imports_no_torch():
    loaded = _imported_after("import mmap_deploy.cli")
    assert "torch" not in loaded and "mmap_train" not in loaded and "mmap_export" not in loaded


def test_runtime_dependencies_have_no_torch():
    project = pyproject()["project"]
    names = [d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in project["dependencies"]]
    assert not {"torch", "torchvision", "timm", "peft"} & set(names)
    assert any(d.startswith("torch==") for d in project["optional-dependencies"]["train"])
    scripts = project["scripts"]
    assert scripts["mmap-train"].startswith("mmap_train.") and scripts["mmap-export"].startswith("mmap_export.")


def test_plot_extra_installs_what_the_package_draws_with():
    """[plot] is matplotlib, what --plot and --overview draw with; no package code imports scanpy,
    so it is not in [plot] (the tests, which read the output with it, install it through [test])."""
    import re

    extras = pyproject()["project"]["optional-dependencies"]
    assert [re.split(r"[<>=\[]", d)[0] for d in extras["plot"]] == ["matplotlib"]
    assert any(d.startswith("scanpy") for d in extras["test"])
    importing = [str(f.relative_to(REPO)) for pkg in ("mmap_deploy", "train", "export") for f in (REPO / pkg).rglob("*.py")
                 if re.search(r"^\s*(import|from)\s+scanpy\b", f.read_text(), re.M)]
    assert importing == []


def _installed_by_the_tests() -> set[str]:
    """Distribution names (normalised) that `pip install .[test]` brings: the runtime's and [test]'s, with the
    extras [test] names (`mmap-deploy[train,...]`) expanded."""
    import re

    project = pyproject()["project"]
    extras = project["optional-dependencies"]
    names, todo = set(), [*project["dependencies"], *extras["test"]]
    while todo:
        req = todo.pop()
        name = re.split(r"[\s;<>=!~\[]", req, maxsplit=1)[0].lower().replace("_", "-")
        if name == "mmap-deploy":
            todo += [d for e in re.search(r"\[(.*)\]", req).group(1).split(",") for d in extras[e.strip()]]
        else:
            names.add(name)
    return names


def test_no_test_skips_on_what_the_tests_install():
    """A package of the runtime or of [test] that is missing is a broken install: the test must fail, not skip.
    Only stated, expected absences skip (no GPU, no TensorRT, no real data, spatialdata on Python 3.10)."""
    import ast
    from importlib.metadata import packages_distributions

    installed = _installed_by_the_tests()
    assert {"anndata", "onnxruntime", "torch", "spatialdata", "scanpy", "tifffile"} <= installed
    dists = packages_distributions()
    skipping = []
    for path in sorted((REPO / "tests").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "importorskip"
                    and node.args and isinstance(node.args[0], ast.Constant)):
                module = node.args[0].value.split(".")[0]
                names = {d.lower().replace("_", "-") for d in dists.get(module, [module])}
                if names & installed:
                    skipping.append(f"{path.name}:{node.lineno}: importorskip({node.args[0].value!r})")
    assert skipping == []


def test_every_runtime_package_is_installed():
    """`pip install .` installs the packages pyproject.toml lists: a new subpackage left off that list is
    missing from every installed copy (ModuleNotFoundError at run time) though the tests, run from the
    checkout, import it."""
    listed = set(pyproject()["tool"]["setuptools"]["packages"])
    on_disk = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "mmap_deploy").rglob("__init__.py")}
    assert on_disk - listed == set()
