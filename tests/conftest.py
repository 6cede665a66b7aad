"""Shared fixtures: a tiny MMAP model, its checkpoint and exported bundle, and the real data."""

from __future__ import annotations

import os
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[1]


def pyproject() -> dict:
    """The project's pyproject.toml, parsed (tomllib; the tomli package on Python 3.10, which lacks it)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10: the [test] extra installs tomli, the same parser
        import tomli as tomllib
    return tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))


def spatialdata_or_skip():
    """spatialdata, which the [test] extra installs from Python 3.11 on (spatialdata >= 0.6 needs it):
    missing there, the import fails the test; on 3.10 the test is skipped, saying so."""
    if sys.version_info < (3, 11):
        pytest.skip("the [spatialdata] extra needs Python >= 3.11 (spatialdata >= 0.6 does); "
                    "[test] leaves it out on this Python", allow_module_level=True)
    import spatialdata

    return spatialdata


def data_dir() -> Path | None:
    """The real data (her2st, published features): $MMAP_DATA_DIR, else ../shared/data if present."""
    env = os.environ.get("MMAP_DATA_DIR")
    p = Path(env) if env else REPO.parent / "shared" / "data"
    return p if p.is_dir() else None


@pytest.fixture(scope="session")
def real_data() -> Path:
    p = data_dir()
    if p is None:
        pytest.skip("real data not found: set MMAP_DATA_DIR to the folder holding her2st/ and mmap_features/")
    return p


TINY_GENES = [f"GENE{i}" for i in range(12)]


def make_tiny_model(seed: int = 0, **overrides):
    """A tiny randomly initialised MMAP with non-zero LoRA weights (so merging matters)."""
    import torch
    from mmap_train.config import MMAPConfig
    from mmap_train.model import MMAP

    cfg = MMAPConfig(genes=list(TINY_GENES), backbone="tiny", lora_last_blocks=2, **overrides)
    torch.manual_seed(seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = MMAP(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.05)
    return model.eval()


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory) -> Path:
    from mmap_train.model import save_checkpoint

    path = tmp_path_factory.mktemp("ckpt") / "tiny.pt"
    save_checkpoint(path, make_tiny_model(), phase=2)
    return path


@pytest.fixture(scope="session")
def tiny_bundle(tiny_checkpoint, tmp_path_factory) -> Path:
    """An exported bundle of the tiny model (session-wide; do not modify: copy it first)."""
    from mmap_export.bundle_writer import export_bundle

    out = tmp_path_factory.mktemp("bundles") / "tiny"
    export_bundle(tiny_checkpoint, out)
    return out


def random_views(n: int, size: int = 112, n_views: int = 3, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, n_views, size, size, 3), dtype=np.uint8)


# -- test slides ------------------------------------------------------------------
def downsample(img: np.ndarray, factor: int) -> np.ndarray:
    h, w = img.shape[0] // factor, img.shape[1] // factor
    sums = img[: h * factor, : w * factor].reshape(h, factor, w, factor, 3).sum(axis=(1, 3), dtype=np.uint32)
    return ((sums + factor * factor // 2) // (factor * factor)).astype(np.uint8)


def write_pyramid(path: Path, img: np.ndarray, levels=(1, 2, 4), resolution=None, unit="CENTIMETER",
                  description=None, tile=256, compression="zlib") -> Path:
    """A tiled pyramidal TIFF, one level per IFD (what OpenSlide's generic-tiff and aperio drivers read).

    `resolution` is pixels per `unit` at level 0 (None: no resolution tags); zlib
    keeps pixels exact, "jpeg" (quality 95) is what real scans hold.
    """
    import tifffile

    with tifffile.TiffWriter(path) as tw:
        for i, factor in enumerate(levels):
            kwargs = {}
            if resolution is not None:
                kwargs.update(resolution=(resolution / factor, resolution / factor), resolutionunit=unit)
            else:
                kwargs.update(resolutionunit="NONE")
            if description is not None:
                kwargs.update(description=description[i], metadata=None)
            if compression == "jpeg":
                kwargs.update(compressionargs={"level": 95})
            tw.write(downsample(img, factor) if factor > 1 else img, tile=(tile, tile), compression=compression,
                     photometric="rgb", subfiletype=1 if i else 0, **kwargs)
    return path


# -- a small filesystem that fills up ---------------------------------------------------
@pytest.fixture()
def small_filesystem(tmp_path):
    """`make(size, read_only=False)`: a folder on a tmpfs of `size` (e.g. "4m"), unmounted at teardown.

    A full disk made real: needs root or CAP_SYS_ADMIN to mount; skipped, saying so, elsewhere.
    """
    import subprocess

    mounted: list[Path] = []

    def make(size: str, read_only: bool = False) -> Path:
        d = tmp_path / f"fs{len(mounted)}"
        d.mkdir()
        opts = f"size={size},mode=0777" + (",ro" if read_only else "")
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(d)],
                           capture_output=True, text=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a size-limited tmpfs here ({(r.stderr or r.stdout).strip()}); "
                        "the full-disk tests need root or CAP_SYS_ADMIN")
        mounted.append(d)
        return d

    yield make
    for d in reversed(mounted):
        subprocess.run(["umount", "-l", str(d)], check=False)


def leave_free(folder: Path, nbytes: int) -> Path:
    """Fill `folder`'s filesystem with a ballast file until about `nbytes` stay free (page-rounded)."""
    import shutil

    ballast = folder / ".ballast"
    fill = shutil.disk_usage(folder).free - nbytes
    if fill > 0:
        with open(ballast, "wb") as fh:
            fh.write(bytes(fill))
    return ballast


def demo_output_bytes(n_spots: int, width: int, height: int) -> int:
    """The free space mmap-predict asks for one slide's .h5ad with the built-in demo bundle."""
    from mmap_deploy.model.bundle import default_bundle_path, load_bundle
    from mmap_deploy.run.storage import slide_output_bytes

    return slide_output_bytes(n_spots, load_bundle(default_bundle_path()).manifest, width, height)


def run_cli(*args, expect: int):
    """`mmap-predict -q ARGS` in-process; assert the exit code; return click's result (stderr in `.stderr`)."""
    from click.testing import CliRunner

    from mmap_deploy.cli import main

    r = CliRunner().invoke(main, ["-q", *map(str, args)])
    assert r.exit_code == expect, f"exit {r.exit_code}\n{r.stderr}\n{r.exception!r}"
    return r
