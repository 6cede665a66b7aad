"""The one-liner in docs/cohorts.md that merges a batch's outputs into one AnnData, run on a real batch."""

from __future__ import annotations

import re
import shutil

import anndata as ad
import numpy as np
import pytest
import scanpy as sc
from conftest import REPO, run_cli

SAMPLE = REPO / "mmap_deploy" / "demo" / "sample"


def _doc_snippet() -> str:
    text = (REPO / "docs" / "cohorts.md").read_text()
    section = text.split("## One AnnData for a whole batch", 1)[1]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_the_documented_merge_runs_on_a_batch(tmp_path, monkeypatch):
    import matplotlib

    matplotlib.use("Agg", force=True)
    shutil.copy(SAMPLE / "B4_crop.jpg", tmp_path / "b4.jpg")
    shutil.copy(SAMPLE / "B4_crop_selection.tsv", tmp_path / "b4.tsv")
    (tmp_path / "m.csv").write_text("slide,coords,id\nb4.jpg,b4.tsv,spots\nb4.jpg,,grid\n")
    run_cli("--manifest", tmp_path / "m.csv", "-o", tmp_path / "results", "--grid", "st", expect=0)
    monkeypatch.chdir(tmp_path)
    scope: dict = {}
    exec(_doc_snippet(), scope)
    cohort = scope["cohort"]
    parts = {name: ad.read_h5ad(tmp_path / "results" / f"{name}.h5ad") for name in ("grid", "spots")}
    assert cohort.n_obs == sum(a.n_obs for a in parts.values())
    assert sorted(cohort.uns["spatial"]) == ["grid", "spots"]
    assert cohort.obs_names.is_unique
    for name, a in parts.items():
        rows = cohort[cohort.obs.library_id == name]
        np.testing.assert_array_equal(rows.X, a.X)
    spots_rows = cohort.obs.library_id == "spots"
    assert "array_row" in cohort.obs and cohort.obs.loc[spots_rows, "array_row"].isna().all()  # --grid rows only
    fraction = cohort.obs.loc[spots_rows, "tissue_fraction"]  # every run has it (COORDS runs too)
    assert fraction.notna().all() and fraction.between(0, 1).all()
