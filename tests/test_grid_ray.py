"""`--manifest ... --grid ... --ray`: rows without coords get their grid on Ray workers, as in the local batch."""

from __future__ import annotations

import shutil
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from conftest import run_cli as run
from test_cohort_ray import local_ray  # noqa: F401  (the module's private local Ray, a fixture)

SAMPLE = Path(__file__).resolve().parents[1] / "mmap_deploy" / "demo" / "sample"


def test_grid_rows_on_ray_equal_the_local_batch(local_ray, tmp_path):  # noqa: F811  (the imported fixture)
    """The demo sample twice: once at its own spots, once with an empty coords cell (a --grid visium row)."""
    shutil.copy(SAMPLE / "B4_crop.jpg", tmp_path / "b4.jpg")  # its resolution is in its EXIF tags
    shutil.copy(SAMPLE / "B4_crop_selection.tsv", tmp_path / "b4.tsv")
    manifest = tmp_path / "slides.csv"
    manifest.write_text("slide,coords,id\nb4.jpg,b4.tsv,spots\nb4.jpg,,grid\n")
    run("--manifest", manifest, "-o", tmp_path / "local", "--grid", "visium", expect=0)
    r = run("--manifest", manifest, "-o", tmp_path / "ray", "--grid", "visium", "--ray", "--ray-workers", "2", expect=0)
    assert "batch: 2 done" in r.stderr
    for name in ("spots", "grid"):
        a = ad.read_h5ad(tmp_path / "local" / f"{name}.h5ad")
        b = ad.read_h5ad(tmp_path / "ray" / f"{name}.h5ad")
        np.testing.assert_array_equal(a.X, b.X)  # bit for bit
        assert list(a.obs_names) == list(b.obs_names)
        assert ("grid" in a.uns["mmap"]) == (name == "grid")
    grid = ad.read_h5ad(tmp_path / "ray" / "grid.h5ad")
    assert grid.obs_names[0].startswith("visium_") and (grid.obs["in_tissue"] == 1).all()
    assert (grid.obs["array_row"] + grid.obs["array_col"]).mod(2).eq(0).all()
    assert grid.uns["mmap"]["grid"]["count"] >= grid.n_obs > 100
