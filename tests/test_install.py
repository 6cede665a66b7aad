"""The runtime stays light: no torch (nor training/export code) behind `import mmap_deploy`."""

import subprocess
import sys
from pathlib import Path

import tomllib

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
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    names = [d.split(">")[0].split("=")[0].split("[")[0].strip().lower() for d in project["dependencies"]]
    assert not {"torch", "torchvision", "timm", "peft"} & set(names)
    assert any(d.startswith("torch==") for d in project["optional-dependencies"]["train"])
    scripts = project["scripts"]
    assert scripts["mmap-train"].startswith("mmap_train.") and scripts["mmap-export"].startswith("mmap_export.")
