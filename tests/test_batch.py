"""Batch mode: `mmap-predict --manifest slides.csv -o OUT_DIR` with resume, shards and bad slides."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from conftest import run_cli as batch

from mmap_deploy.options import CLI, Settings, caller
from mmap_deploy.run.manifest import read_manifest
from mmap_deploy.errors import UserError

MPP = 0.6


def write_slide(path, seed: int):
    """A plain PNG slide (no mpp in it: the manifest's mpp column supplies it)."""
    from PIL import Image

    rng = np.random.default_rng(seed)
    coarse = rng.integers(60, 240, (30, 30, 3), dtype=np.uint8)
    img = np.kron(coarse, np.ones((30, 30, 1), np.uint8))
    img = np.clip(img.astype(np.int16) + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path)
    return path


def write_spots(path, n_side: int = 4, offset: float = 0.0):
    lines = ["x,y"]
    for r in range(n_side):
        for c in range(n_side):
            lines.append(f"{150 + 200 * c + offset},{150 + 200 * r + offset}")
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture()
def cohort(tmp_path):
    """Four slides in slides/, a manifest with relative paths, one row pointing at a missing file
    (a batch refuses it before any slide starts: the tests that run the batch put a file there)."""
    d = tmp_path / "slides"
    d.mkdir()
    for i in range(3):
        write_slide(d / f"s{i}.png", seed=i)
        write_spots(d / f"s{i}.csv", offset=10.0 * i)
    write_spots(d / "missing.csv")
    manifest = tmp_path / "slides.csv"
    manifest.write_text(
        "slide,coords,mpp,id\n"
        f"slides/s0.png,slides/s0.csv,{MPP},first\n"
        f"slides/missing.png,slides/missing.csv,{MPP},\n"
        f"slides/s1.png,slides/s1.csv,{MPP},\n"
        f"slides/s2.png,slides/s2.csv,{MPP},third\n"
    )
    return manifest


def test_missing_paths_are_listed_in_one_go_before_any_slide_starts(cohort, tiny_bundle, tmp_path):
    slides = cohort.parent / "slides"
    (slides / "s2.csv").unlink()
    cohort.write_text(cohort.read_text() + "slides/s0.png,,,gridrow\n")  # an empty coords cell: a --grid row
    out = tmp_path / "out"
    r = batch("--manifest", cohort, "-o", out, "--model", tiny_bundle, expect=2)
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {cohort}: 2 path(s) not found, no slide was started: "), line
    assert f"line 3: slide {slides / 'missing.png'}; line 5: coords {slides / 's2.csv'}" in line
    assert "gridrow" not in line and "line 6" not in line and "Traceback" not in r.stderr
    assert not out.exists()
    # --shard checks only its own rows: shard 0/2 runs lines 2 and 4 (first, s1), whose paths are there
    cohort.write_text("".join(cohort.read_text().splitlines(keepends=True)[:-1]))
    r = batch("--manifest", cohort, "-o", out, "--model", tiny_bundle, "--shard", "0/2", expect=0)
    assert "[1/2] first: wrote first.h5ad, 16 spots" in r.stderr
    assert "0.600 µm/px from slides.csv mpp column, engine onnxruntime (CPUExecutionProvider, fp32)" in r.stderr


def test_one_bad_slide_does_not_stop_the_others_and_reruns_skip_finished(cohort, tiny_bundle, tmp_path):
    (cohort.parent / "slides" / "missing.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")  # there, but damaged
    out = tmp_path / "out"
    r = batch("--manifest", cohort, "-o", out, "--model", tiny_bundle, expect=1)
    assert sorted(p.name for p in out.iterdir()) == ["first.h5ad", "s1.h5ad", "third.h5ad"]
    assert f"batch: 3 done, 0 skipped (already done), 1 failed of 4 slide(s) in {cohort}" in r.stderr
    assert f"failed: missing ({cohort} line 3):" in r.stderr
    a = ad.read_h5ad(out / "first.h5ad")
    assert a.n_obs == 16 and "first" in a.uns["spatial"]
    assert a.uns["mmap"]["mpp"] == MPP and a.uns["mmap"]["mpp_source"] == "slides.csv mpp column"
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}

    # rerun: finished slides are skipped, the bad one fails again, nothing is rewritten
    r = batch("--manifest", cohort, "-o", out, "--model", tiny_bundle, expect=1)
    assert "batch: 0 done, 3 skipped (already done), 1 failed of 4" in r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps

    # the user fixes the bad row; the rerun does only that slide
    write_slide(cohort.parent / "slides" / "missing.png", seed=9)
    r = batch("--manifest", cohort, "-o", out, "--model", tiny_bundle, expect=0)
    assert "batch: 1 done, 3 skipped (already done), 0 failed of 4" in r.stderr
    assert (out / "missing.h5ad").is_file()
    # --overwrite redoes everything, with identical predictions
    before = ad.read_h5ad(out / "s1.h5ad").X
    r = batch("--manifest", cohort, "-o", out, "--model", tiny_bundle, "--overwrite", expect=0)
    assert "batch: 4 done, 0 skipped" in r.stderr
    np.testing.assert_array_equal(ad.read_h5ad(out / "s1.h5ad").X, before)


def test_shards_split_the_manifest_without_overlap(cohort, tiny_bundle, tmp_path):
    write_slide(cohort.parent / "slides" / "missing.png", seed=9)
    out = tmp_path / "out"
    r0 = batch("--manifest", cohort, "-o", out, "--model", tiny_bundle, "--shard", "0/2", expect=0)
    assert sorted(p.name for p in out.iterdir()) == ["first.h5ad", "s1.h5ad"]  # rows 0 and 2
    assert "batch (shard 0/2): 2 done" in r0.stderr
    batch("--manifest", cohort, "-o", out, "--model", tiny_bundle, "--shard", "1/2", expect=0)
    assert sorted(p.name for p in out.iterdir()) == ["first.h5ad", "missing.h5ad", "s1.h5ad", "third.h5ad"]


def test_bad_slide_content_is_reported_per_slide(cohort, tiny_bundle, tmp_path):
    (cohort.parent / "slides" / "missing.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    out = tmp_path / "out"
    r = batch("--manifest", cohort, "-o", out, "--model", tiny_bundle, expect=1)
    assert "[2/4] missing: error: " in r.stderr and "Traceback" not in r.stderr
    assert len(list(out.glob("*.h5ad"))) == 3 and not list(out.glob(".*"))


@pytest.mark.parametrize("text, fragment", [
    ("", "empty manifest"),
    ("slide,coord\na.png,a.csv\n", "missing column(s) coords; unknown column(s) coord"),
    ("slide,coords\n", "lists no slides"),
    ("slide,coords,mpp\na.png,a.csv,abc\n", "line 2: mpp 'abc': must be a number, above 0"),
    ("slide,coords,mpp\na.png,a.csv,-1\n", "line 2: mpp '-1': must be a number, above 0"),
    ("slide,coords,id\na.png,a.csv,x\nb.png,b.csv,x\n", "line 3: output name 'x' is already used on line 2"),
    ("slide,coords\nd1/a.png,a.csv\nd2/a.png,b.csv\n", "line 3: output name 'a' is already used on line 2"),
    ("slide,coords\na.png\n", "line 2: 1 fields, the header has 2"),
    ("slide,coords,id\na.png,a.csv,../up\n", "line 2: id '../up': cannot contain '/'"),
])
def test_bad_manifests_are_one_line_errors(text, fragment, tiny_bundle, tmp_path):
    m = tmp_path / "slides.csv"
    m.write_text(text)
    r = batch("--manifest", m, "-o", tmp_path / "out", "--model", tiny_bundle, expect=2)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: {m}: ") and fragment in last, last
    assert not (tmp_path / "out").exists()


def test_manifest_mode_argument_errors(cohort, tiny_bundle, tmp_path):
    r = batch("--manifest", cohort, "-o", tmp_path / "out.h5ad", "--model", tiny_bundle, expect=2)
    assert "with --manifest, -o is an output folder" in r.stderr
    r = batch("--manifest", cohort, "-o", tmp_path / "out", "--mpp", "0.5", expect=2)
    assert "with --manifest, give --mpp per slide in the manifest's mpp column" in r.stderr
    r = batch("--manifest", cohort, "-o", tmp_path / "out", "--shard", "2/2", expect=2)
    assert "--shard 2/2: needs 0 <= i < n" in r.stderr
    r = batch("x.png", "x.csv", "-o", tmp_path / "o.h5ad", "--shard", "0/2", expect=2)
    assert "--shard only applies with --manifest" in r.stderr


def test_parse_shard_and_manifest_paths(cohort):
    with caller(CLI):
        assert Settings().replace(shard="3/4").shard == (3, 4) and Settings().shard is None
        for bad in ("1", "a/b", "1/0", "-1/3", "1/2/3"):
            with pytest.raises(UserError, match="--shard"):
                Settings().replace(shard=bad)
    rows = read_manifest(cohort)
    assert [r.name for r in rows] == ["first", "missing", "s1", "third"]
    assert rows[0].slide == cohort.parent / "slides" / "s0.png" and rows[0].mpp == MPP  # relative to the CSV
    assert [r.line for r in rows] == [2, 3, 4, 5]
