"""A full disk is not a bug: one line naming the folder, the space needed and free, checked before work."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from conftest import demo_output_bytes, leave_free
from conftest import run_cli as run

from mmap_deploy.run.storage import OutputStorageError, expected_output_bytes, output_storage_guard

MPP = 0.6


def write_cohort(folder, n: int = 3):
    """n small PNG slides (900 px: a 2.4 MB thumbnail each) with 16 spots, and their manifest."""
    from PIL import Image

    lines = ["slide,coords,mpp"]
    for i in range(n):
        rng = np.random.default_rng(i)
        img = np.kron(rng.integers(60, 240, (30, 30, 3), dtype=np.uint8), np.ones((30, 30, 1), np.uint8))
        Image.fromarray(img).save(folder / f"s{i}.png")
        (folder / f"s{i}.csv").write_text("x,y\n" + "".join(f"{150 + 200 * c},{150 + 200 * r}\n"
                                                           for r in range(4) for c in range(4)))
        lines.append(f"s{i}.png,s{i}.csv,{MPP}")
    manifest = folder / "slides.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest


def test_single_slide_into_a_full_folder_is_one_line_before_any_work(small_filesystem):
    out_dir = small_filesystem("2m")
    r = run("--demo", "-o", out_dir / "demo.h5ad", expect=2)
    err = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(err) == 1 and "Traceback" not in r.stderr, r.stderr
    assert f"error: {out_dir}: no room for demo.h5ad: it needs about 15.5 MB" in err[0]
    assert "MB, 2.1 MB free there" in err[0]
    assert "wrote" not in r.stderr and list(out_dir.iterdir()) == []  # stopped before predicting, nothing left


def test_local_batch_stops_at_the_first_full_disk_and_says_what_remains(small_filesystem, tmp_path):
    manifest = write_cohort(tmp_path)
    out_dir = small_filesystem("8m")
    # room for one output's estimate (4.1 MB, the thumbnail counted uncompressed) and a little more: the first
    # slide's real output (about 0.2 MB, its thumbnail gzip-compressed) leaves less than the next one's estimate
    ballast = leave_free(out_dir, demo_output_bytes(16, 900, 900) + (64 << 10))
    r = run("--manifest", manifest, "-o", out_dir, expect=1)
    assert "[1/3] s0: wrote s0.h5ad" in r.stderr
    assert f"[2/3] s1: error: {out_dir}: no room for s1.h5ad: it needs about 4.1 MB" in r.stderr
    assert "[3/3]" not in r.stderr  # not even started
    assert "batch: 1 done, 0 skipped (already done), 1 failed of 3 slide(s)" in r.stderr
    assert "batch stopped at the first output-folder failure: 1 slide(s) not started" in r.stderr
    assert sorted(p.name for p in out_dir.iterdir() if p != ballast) == ["s0.h5ad"]  # no temp or claim files
    assert "Traceback" not in r.stderr


def test_a_write_that_runs_out_of_space_is_one_line_and_leaves_nothing(small_filesystem):
    """The second line of defence: the disk fills during the write (h5py's real ENOSPC)."""
    from mmap_deploy.outputs.adata import write_h5ad

    out_dir = small_filesystem("2m")
    adata = ad.AnnData(X=np.random.default_rng(0).random((2000, 785), dtype=np.float32))
    with pytest.raises(OutputStorageError) as e:
        with output_storage_guard(out_dir, 6_500_000, "big.h5ad"):
            write_h5ad(adata, out_dir / "big.h5ad")
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{out_dir}: no room for big.h5ad: it needs about 6.5 MB, ")
    assert list(out_dir.iterdir()) == []  # the temporary file is gone


def test_expected_size_is_an_upper_bound_close_to_real_files(tmp_path):
    r = run("--demo", "-o", tmp_path / "demo.h5ad", expect=0)
    a = ad.read_h5ad(tmp_path / "demo.h5ad")
    real = (tmp_path / "demo.h5ad").stat().st_size
    thumb = a.uns["spatial"]["B4_crop"]["images"]["hires"].shape[:2]
    est = expected_output_bytes(a.n_obs, a.n_vars, a.obsm["mmap_embedding"].shape[1], thumb)
    assert real <= est <= 1.6 * real, (real, est)  # the thumbnail counts uncompressed: an upper bound
    assert "wrote" in r.stderr


def test_a_batch_into_a_read_only_folder_stops_at_once(small_filesystem, tmp_path):
    manifest = write_cohort(tmp_path)
    out_dir = small_filesystem("1m", read_only=True)
    r = run("--manifest", manifest, "-o", out_dir, expect=1)
    assert (f"[1/3] s0: error: {out_dir}: cannot write the claim file .s0.h5ad.claim there (Read-only file system); "
            "it needs about 4.1 KB, ") in r.stderr
    assert "batch stopped at the first output-folder failure: 2 slide(s) not started" in r.stderr
    assert "[2/3]" not in r.stderr and "Traceback" not in r.stderr
