"""Unattended cohort runs: every bad input is one actionable line through the real CLI, with a
non-zero exit and no output; a killed run leaves no half-written file and a rerun finishes the rest."""

from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from test_predict_cli import (
    assert_one_line_error,
    predict,
    tissue_like_image,
    write_coords,
    write_pyramidal_tiff,
)


@pytest.fixture(scope="module")
def slide(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("rel_slide")
    return write_pyramidal_tiff(d / "slide.tif", tissue_like_image(1400, seed=3), 0.5)


@pytest.fixture
def bundle(tiny_bundle, tmp_path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


def expect_refusal(tmp_path: Path, args: list, *fragments: str) -> None:
    """The run fails with exit 2, one `error:` line holding `fragments`, and writes no output."""
    out = tmp_path / "out.h5ad"
    before = set(tmp_path.rglob("*"))
    r = predict(*args, "-o", out, expect=2)
    assert_one_line_error(r, *fragments)
    assert not out.exists()
    assert set(tmp_path.rglob("*")) == before, "a refused run must leave nothing behind"


# -- slides ------------------------------------------------------------------------
def test_file_that_is_not_a_slide(tmp_path, bundle):
    coords, _, _ = write_coords(tmp_path / "c.csv", "xy")
    fake = tmp_path / "slide.svs"
    fake.write_text("this is a text file, not a scan\n" * 20)
    expect_refusal(tmp_path, [fake, coords, "--model", bundle], str(fake))


@pytest.mark.parametrize("keep", [0.02, 0.5])
def test_truncated_slide(tmp_path, bundle, slide, keep):
    coords, _, _ = write_coords(tmp_path / "c.csv", "xy")
    cut = tmp_path / "cut.tif"
    data = slide.read_bytes()
    cut.write_bytes(data[: int(len(data) * keep)])
    out = tmp_path / "out.h5ad"
    r = predict(cut, coords, "-o", out, "--model", bundle, expect=2)
    assert_one_line_error(r, str(cut))
    assert not out.exists()


def test_plain_image_without_mpp(tmp_path, bundle):
    from PIL import Image

    img = tmp_path / "he.png"
    Image.fromarray(tissue_like_image(1400, seed=4)).save(img)
    coords, _, _ = write_coords(tmp_path / "c.csv", "xy")
    expect_refusal(tmp_path, [img, coords, "--model", bundle], str(img), "pass --mpp")


@pytest.mark.parametrize("mpp", ["500", "0.001", "-1", "nan"])
def test_implausible_mpp(tmp_path, bundle, slide, mpp):
    coords, _, _ = write_coords(tmp_path / "c.csv", "xy")
    expect_refusal(tmp_path, [slide, coords, "--model", bundle, "--mpp", mpp], "µm per pixel")


# -- coordinates ------------------------------------------------------------------------
COORDS_CASES = {
    "empty": ("", ["c.csv"]),
    "header only": ("x,y,barcode\n", ["c.csv", "no spots"]),
    "unknown columns": ("col_a,col_b\n1,2\n", ["c.csv", "col_a"]),
    "non-numeric": ("x,y,barcode\n10,20,a\n30,abc,b\n", ["c.csv", "line 3", "abc"]),
    "nan": ("x,y,barcode\n10,20,a\nnan,40,b\n", ["c.csv", "line 3"]),
    "duplicate ids": ("x,y,barcode\n10,20,a\n30,40,a\n", ["c.csv", "duplicate", "a"]),
}


@pytest.mark.parametrize("case", list(COORDS_CASES))
def test_bad_coords(tmp_path, bundle, slide, case):
    text, fragments = COORDS_CASES[case]
    coords = tmp_path / "c.csv"
    coords.write_text(text)
    expect_refusal(tmp_path, [slide, coords, "--model", bundle], *fragments)


def test_points_outside_the_slide_hint_at_swapped_xy(tmp_path, bundle):
    # a wide slide; the coords have x and y swapped, so some x fall past its right edge
    wide = write_pyramidal_tiff(tmp_path / "wide.tif", tissue_like_image(1400, seed=5)[:600], 0.5)
    coords = tmp_path / "c.csv"
    coords.write_text("x,y,barcode\n" + "".join(f"{y},{x},s{i}\n" for i, (x, y) in
                                               enumerate([(300, 100), (1300, 500), (1350, 300), (200, 200)])))
    r = predict(wide, coords, "-o", tmp_path / "o.h5ad", "--model", bundle, expect=2)
    assert_one_line_error(r, "outside", "swapped")
    assert not (tmp_path / "o.h5ad").exists()


def test_hires_coordinates_on_a_full_resolution_slide_are_explained(tmp_path, bundle, slide):
    coords = tmp_path / "c.csv"
    # full-res coordinates of a 28 000 px slide given against a 1 400 px image
    coords.write_text("x,y,barcode\n" + "".join(f"{x},{y},s{x}\n" for x, y in [(5000, 7000), (20000, 21000)]))
    r = predict(slide, coords, "-o", tmp_path / "o.h5ad", "--model", bundle, expect=2)
    assert_one_line_error(r, "outside")


# -- bundles ------------------------------------------------------------------------
def _edit_manifest(bundle: Path, fn) -> None:
    p = bundle / "manifest.json"
    data = json.loads(p.read_text())
    fn(data)
    p.write_text(json.dumps(data))


def test_bundle_file_fails_its_hash(tmp_path, bundle, slide):
    coords, _, _ = write_coords(tmp_path / "c.csv", "xy")
    with open(bundle / "encoder.onnx", "r+b") as fh:
        fh.seek(1000)
        fh.write(b"\x00\x01\x02")
    expect_refusal(tmp_path, [slide, coords, "--model", bundle], "encoder.onnx", "sha256", "does not match")


def test_bundle_of_an_unknown_version(tmp_path, bundle, slide):
    coords, _, _ = write_coords(tmp_path / "c.csv", "xy")
    _edit_manifest(bundle, lambda d: d.update(format_version=99))
    expect_refusal(tmp_path, [slide, coords, "--model", bundle], "format version 99", "upgrade mmap-deploy")


def test_bundle_path_leaving_the_bundle(tmp_path, bundle, slide):
    coords, _, _ = write_coords(tmp_path / "c.csv", "xy")
    _edit_manifest(bundle, lambda d: d["files"][0].update(path="../../etc/passwd"))
    expect_refusal(tmp_path, [slide, coords, "--model", bundle], "leaves the bundle")


# -- killed runs ------------------------------------------------------------------------
# A run is killed at a stage the test names, never after a sleep: `_run_killed_at` starts
# mmap-predict in a fresh interpreter whose hook SIGKILLs the process itself when the run
# reaches that stage for the n-th time. The result does not depend on the machine's speed.
KILL_STAGES = {
    # all spots encoded, k-means about to run: the middle of the prediction
    "predict": ("mmap_deploy.run.pipeline", "slide_prototypes"),
    # the .h5ad's temporary file holds everything but the images: the middle of the write
    "write": ("mmap_deploy.outputs.adata", "write_images_compressed"),
}
_KILL_HOOK = """
import importlib, os, signal, sys
module, name, nth = sys.argv[1], sys.argv[2], int(sys.argv[3])
target = importlib.import_module(module)
original, calls = getattr(target, name), [0]
def killed_here(*args, **kwargs):
    calls[0] += 1
    if calls[0] == nth:
        os.kill(os.getpid(), signal.SIGKILL)
    return original(*args, **kwargs)
setattr(target, name, killed_here)
from mmap_deploy.cli import main
main(args=sys.argv[4:], prog_name="mmap-predict")
"""


def _run_killed_at(stage: str, nth: int, *args) -> None:
    """mmap-predict ARGS, SIGKILLed when it reaches `stage` (see KILL_STAGES) for the `nth` time."""
    module, name = KILL_STAGES[stage]
    proc = subprocess.run([sys.executable, "-c", _KILL_HOOK, module, name, str(nth), *map(str, args)],
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, timeout=600, check=False)
    assert proc.returncode == -signal.SIGKILL, f"the run was not killed at {stage} #{nth}:\n{proc.stderr}"


def _cli() -> list[str]:
    exe = Path(sys.executable).parent / "mmap-predict"
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "mmap_deploy.cli"]


def _dense_coords(path: Path, n: int, side: int = 1400) -> Path:
    rng = np.random.default_rng(0)
    xy = rng.uniform(150, side - 150, (n, 2))
    path.write_text("x,y,barcode\n" + "".join(f"{x:.1f},{y:.1f},b{i}\n" for i, (x, y) in enumerate(xy)))
    return path


@pytest.mark.parametrize("stage", list(KILL_STAGES))
def test_killed_run_leaves_no_output(tmp_path, bundle, slide, stage):
    coords = _dense_coords(tmp_path / "c.csv", 40)
    out = tmp_path / "o.h5ad"
    _run_killed_at(stage, 1, slide, coords, "-o", out, "--model", bundle, "-q", "--threads", "1")
    assert not out.exists()
    assert not list(tmp_path.glob("*.h5ad"))
    left = sorted(p.name for p in tmp_path.glob(".o.h5ad.*.tmp"))
    assert len(left) == (1 if stage == "write" else 0), left  # killed mid-write: only the temporary file
    # the next run replaces the leftover temporary file with the output
    subprocess.run([*_cli(), str(slide), str(coords), "-o", str(out), "--model", str(bundle), "-q"],
                   check=True, capture_output=True, timeout=600)
    assert ad.read_h5ad(out).n_obs == 40
    assert not list(tmp_path.glob(".o.h5ad.*"))


def test_killed_batch_rerun_finishes_the_rest(tmp_path, bundle, slide):
    coords = _dense_coords(tmp_path / "c.csv", 40)
    rows = ["slide,coords,id"] + [f"{slide},{coords},s{i}" for i in range(3)]
    manifest = tmp_path / "slides.csv"
    manifest.write_text("\n".join(rows) + "\n")
    out_dir = tmp_path / "out"
    # killed while writing the second slide: s0 is done, s1 half-written (and claimed), s2 not started
    _run_killed_at("write", 2, "--manifest", manifest, "-o", out_dir, "--model", bundle, "-q")
    assert sorted(p.name for p in out_dir.glob("*.h5ad")) == ["s0.h5ad"]
    assert ad.read_h5ad(out_dir / "s0.h5ad").n_obs == 40
    assert [p.name for p in out_dir.glob(".s1.h5ad.*.tmp")] and (out_dir / ".s1.h5ad.claim").exists()
    rerun = subprocess.run([*_cli(), "--manifest", str(manifest), "-o", str(out_dir), "--model", str(bundle), "-q"],
                           capture_output=True, text=True, timeout=600, check=False)
    assert rerun.returncode == 0, rerun.stderr
    assert "[1/3] s0: skipped" in rerun.stderr
    assert "batch: 2 done, 1 skipped (already done), 0 failed of 3" in rerun.stderr
    assert sorted(p.name for p in out_dir.glob("*.h5ad")) == ["s0.h5ad", "s1.h5ad", "s2.h5ad"]
    assert not [p for p in out_dir.iterdir() if not p.name.endswith(".h5ad")]  # no temporary or claim files
    x = [ad.read_h5ad(out_dir / f"s{i}.h5ad").X for i in range(3)]
    np.testing.assert_array_equal(x[0], x[1])
    np.testing.assert_array_equal(x[0], x[2])
