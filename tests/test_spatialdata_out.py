"""The SpatialData output (`-o out.zarr`): read back with spatialdata, equal to the .h5ad, atomic, and
a one-line error naming the extra where spatialdata is not installed."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import spatialdata_or_skip

from mmap_deploy.cli import main

sd = spatialdata_or_skip()

LIBRARY = "her2st B4 (crop)"  # spaces and brackets: not allowed in SpatialData element names
ELEMENT = "her2st_B4__crop_"


def predict(*args, expect: int = 0):
    r = CliRunner().invoke(main, ["-q", *map(str, args)])
    assert r.exit_code == expect, f"exit {r.exit_code}\n{r.stderr}\n{r.exception!r}"
    return r


@pytest.fixture(scope="module")
def demo_outputs(tiny_bundle, tmp_path_factory) -> tuple[Path, Path]:
    """The built-in sample predicted twice through the CLI: as .h5ad and as .zarr."""
    d = tmp_path_factory.mktemp("sdata")
    for name in ("demo.h5ad", "demo.zarr"):
        predict("--demo", "--model", tiny_bundle, "--library-id", LIBRARY, "-o", d / name)
    return d / "demo.h5ad", d / "demo.zarr"


def test_store_round_trips_with_image_circles_and_table(demo_outputs):
    from spatialdata import join_spatialelement_table
    from spatialdata.models import get_table_keys
    from spatialdata.transformations import Identity, Scale, get_transformation

    h5ad, zarr = demo_outputs
    a = ad.read_h5ad(h5ad)
    s = sd.read_zarr(zarr)
    lib = a.uns["spatial"][LIBRARY]
    scalef = lib["scalefactors"]["tissue_hires_scalef"]

    # the image: the thumbnail, (c, y, x), scaled into full-resolution pixels
    assert list(s.images) == [f"{ELEMENT}_hires_image"]
    image = s.images[f"{ELEMENT}_hires_image"]
    assert image.dims == ("c", "y", "x") and list(image.coords["c"].values) == ["r", "g", "b"]
    np.testing.assert_array_equal(np.moveaxis(image.values, 0, -1), lib["images"]["hires"])
    to_fullres = get_transformation(image, get_all=True)
    assert list(to_fullres) == ["global"] and isinstance(to_fullres["global"], Scale)
    np.testing.assert_allclose(to_fullres["global"].to_scale_vector(("y", "x")), [1 / scalef, 1 / scalef])

    # the spots: one circle per spot at obsm['spatial'], radius half the spot diameter, full-res pixels
    circles = s.shapes[ELEMENT]
    assert len(circles) == a.n_obs > 0
    assert list(circles.index) == list(a.obs_names)
    np.testing.assert_array_equal(np.stack([circles.geometry.x, circles.geometry.y], axis=1), a.obsm["spatial"])
    np.testing.assert_array_equal(circles["radius"], lib["scalefactors"]["spot_diameter_fullres"] / 2)
    assert isinstance(get_transformation(circles, "global"), Identity)

    # the table: the same AnnData, bit for bit, annotating the circles
    t = s.tables["table"]
    assert t.X.dtype == a.X.dtype == np.float32
    np.testing.assert_array_equal(t.X.view(np.uint32), a.X.view(np.uint32))
    assert list(t.obs_names) == list(a.obs_names) and list(t.var_names) == list(a.var_names)
    assert list(t.obs["mmap_cluster"]) == list(a.obs["mmap_cluster"])
    for key in ("spatial", "mmap_embedding"):
        np.testing.assert_array_equal(t.obsm[key], a.obsm[key])
    assert t.uns["mmap"]["bundle_sha256"] == a.uns["mmap"]["bundle_sha256"]
    np.testing.assert_array_equal(t.uns["spatial"][LIBRARY]["images"]["hires"], lib["images"]["hires"])
    assert get_table_keys(t) == (ELEMENT, "region", "spot_id")
    assert set(t.obs["region"]) == {ELEMENT} and list(t.obs["spot_id"]) == list(a.obs_names)
    circles_joined, table_joined = join_spatialelement_table(
        sdata=s, spatial_element_names=ELEMENT, table_name="table", how="inner")
    assert table_joined.n_obs == a.n_obs and list(circles_joined[ELEMENT].index) == list(a.obs_names)


def _layout(store: Path) -> list[str]:
    """The store's files, less the run's timings: zarr writes no chunk for a 0-d value equal to its fill
    value, so a timing of exactly 0.0 (a thumbnail that was ready before it was waited for) has no chunk."""
    return sorted(str(p.relative_to(store)) for p in store.rglob("*") if "/uns/mmap/timings/" not in str(p))


def test_existing_store_is_refused_without_overwrite_and_replaced_with_it(demo_outputs, tiny_bundle, tmp_path):
    out = tmp_path / "o.zarr"
    shutil.copytree(demo_outputs[1], out)
    before = _layout(out)
    stamp = (out / "zarr.json").stat().st_mtime_ns
    r = predict("--demo", "--model", tiny_bundle, "-o", out, expect=2)
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {out}: already exists; pass --overwrite to replace it, or choose another output")
    assert "engines:" not in r.stderr  # refused before any work
    assert (out / "zarr.json").stat().st_mtime_ns == stamp
    predict("--demo", "--model", tiny_bundle, "--library-id", LIBRARY, "-o", out, "--overwrite")
    assert _layout(out) == before
    assert (out / "zarr.json").stat().st_mtime_ns != stamp
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.zarr"]  # no temporary folder left
    np.testing.assert_array_equal(sd.read_zarr(out).tables["table"].X, ad.read_h5ad(demo_outputs[0]).X)


def test_overwrite_never_replaces_what_is_not_a_store(tiny_bundle, tmp_path):
    folder = tmp_path / "results.zarr"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    r = predict("--demo", "--model", tiny_bundle, "-o", folder, "--overwrite", expect=2)
    assert "results.zarr: exists and is not a zarr store" in r.stderr.strip().splitlines()[-1]
    assert (folder / "notes.txt").read_text() == "mine"
    file = tmp_path / "file.zarr"
    file.write_text("x")
    r = predict("--demo", "--model", tiny_bundle, "-o", file, "--overwrite", expect=2)
    assert "file.zarr: exists and is not a folder" in r.stderr.strip().splitlines()[-1]


def _adata(n: int = 50, genes: int = 7, side: int = 64):
    """A small AnnData in the .h5ad layout, without running a model."""
    from mmap_deploy.outputs.adata import build_anndata
    from mmap_deploy.outputs.prediction import SlidePrediction

    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 1000, (n, 2))
    pred = SlidePrediction(
        spot_ids=[f"s{i}" for i in range(n)], xy=xy,
        prediction=rng.standard_normal((n, genes)).astype(np.float32),
        embedding=rng.standard_normal((n, 4)).astype(np.float32), clusters=np.arange(n) % 3, n_prototypes=3,
        bank_size=1, genes=[f"G{i}" for i in range(genes)], dropped=[], timings={}, engines={},
    )
    thumb = rng.integers(0, 255, (side, side, 3), dtype=np.uint8)
    return build_anndata(pred, thumb, side / 1000, library_id="S1", slide_mpp=0.5, patch_um=160.0,
                         provenance={"mpp": 0.5})


def test_every_image_in_uns_spatial_becomes_an_element_with_its_own_scale(tmp_path):
    """Space Ranger's hires and lowres images (as squidpy reads them) each land in full-res pixels."""
    from spatialdata.transformations import get_transformation

    from mmap_deploy.outputs.sdata import write_spatialdata

    a = _adata()
    lib = a.uns["spatial"]["S1"]
    lowres = np.arange(20 * 30 * 3, dtype=np.uint8).reshape(20, 30, 3)
    lib["images"]["lowres"] = lowres
    lib["scalefactors"]["tissue_lowres_scalef"] = 0.03
    s = sd.read_zarr(write_spatialdata(a, tmp_path / "o.zarr"))
    assert sorted(s.images) == ["S1_hires_image", "S1_lowres_image"]
    np.testing.assert_array_equal(np.moveaxis(s.images["S1_lowres_image"].values, 0, -1), lowres)
    for key, scalef in (("hires", 64 / 1000), ("lowres", 0.03)):
        scale = get_transformation(s.images[f"S1_{key}_image"], "global").to_scale_vector(("y", "x"))
        np.testing.assert_allclose(scale, [1 / scalef, 1 / scalef])


def test_failed_write_leaves_nothing_and_keeps_the_old_store(tmp_path):
    from mmap_deploy.outputs.sdata import write_spatialdata

    bad = _adata()
    bad.uns["unwritable"] = object()  # fails in the table, after the image and the circles are on disk
    out = tmp_path / "o.zarr"
    with pytest.raises(Exception):
        write_spatialdata(bad, out)
    assert list(tmp_path.iterdir()) == []
    write_spatialdata(_adata(), out)
    before = sorted((str(p.relative_to(out)), p.stat().st_mtime_ns) for p in out.rglob("*"))
    with pytest.raises(Exception):
        write_spatialdata(bad, out, overwrite=True)
    assert sorted((str(p.relative_to(out)), p.stat().st_mtime_ns) for p in out.rglob("*")) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.zarr"]


def test_a_killed_write_leaves_no_store_and_the_next_write_cleans_up(tmp_path):
    """SIGKILL once the store is written but before it is renamed into place: no o.zarr, only a temporary
    folder, removed by the next write. A hook kills the writer at that point, whatever the machine's speed."""
    out = tmp_path / "o.zarr"
    code = (
        "import os, signal, sys; sys.path.insert(0, sys.argv[1])\n"
        "from test_spatialdata_out import _adata\n"
        "import mmap_deploy.outputs.sdata as sdata\n"
        "atomic_folder = sdata.atomic_folder\n"
        "def write_then_die(tmp, write):\n"
        "    write(tmp)\n"
        "    assert (tmp / 'images').is_dir() and (tmp / 'tables').is_dir()\n"
        "    os.kill(os.getpid(), signal.SIGKILL)\n"
        "sdata.atomic_folder = lambda path, write: atomic_folder(path, lambda tmp: write_then_die(tmp, write))\n"
        "sdata.write_spatialdata(_adata(), sys.argv[2])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code, str(Path(__file__).parent), str(out)],
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == -signal.SIGKILL, proc.stderr
    assert not out.exists()
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".o.zarr.") and left[0].endswith(".tmp")
    assert (tmp_path / left[0] / "o.zarr" / "images").is_dir()  # the whole store was there, under its temporary name
    from mmap_deploy.outputs.sdata import write_spatialdata

    write_spatialdata(_adata(), out)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o.zarr"]
    assert sd.read_zarr(out).tables["table"].n_obs == 50


# -- without the extra ---------------------------------------------------------
_BLOCK = """
import importlib.abc, sys
class Block(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == {blocked!r} or name.startswith({blocked!r} + "."):
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)
sys.meta_path.insert(0, Block())
from mmap_deploy.cli import main
sys.argv = ["mmap-predict", "-q"] + sys.argv[1:]
main()
"""


def _run_without(blocked: str, *args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", _BLOCK.format(blocked=blocked), *map(str, args)],
                          capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("mode", ["single", "batch"])
def test_without_spatialdata_zarr_output_is_a_one_line_error_naming_the_extra(mode, tmp_path):
    if mode == "single":
        out = tmp_path / "x.zarr"
        r = _run_without("spatialdata", "--demo", "-o", out)
        what = str(out)
    else:
        manifest = tmp_path / "slides.csv"
        manifest.write_text("slide,coords\na.png,a.csv\n")
        out = tmp_path / "out"
        r = _run_without("spatialdata", "--manifest", manifest, "-o", out, "--format", "zarr")
        what = "--format zarr"
    assert r.returncode == 2, r.stderr
    # one line, before any work: not even the demo model's note
    assert r.stderr.strip().splitlines() == [
        f"error: {what}: writing SpatialData (.zarr) needs the optional spatialdata package: "
        "pip install 'mmap-deploy[spatialdata]' (or write an .h5ad)"]
    assert not out.exists()


def test_a_broken_spatialdata_install_is_named_too(tmp_path):
    r = _run_without("dask", "--demo", "-o", tmp_path / "x.zarr")  # spatialdata imports dask
    assert r.returncode == 2, r.stderr
    (line,) = r.stderr.strip().splitlines()
    assert "spatialdata is installed but does not import (No module named 'dask')" in line
    assert "pip install 'mmap-deploy[spatialdata]'" in line


# -- batch ----------------------------------------------------------------------
def test_batch_writes_one_store_per_slide_and_skips_finished_ones(tiny_bundle, tmp_path):
    from test_batch import MPP, write_slide, write_spots

    for i in range(2):
        write_slide(tmp_path / f"s{i}.png", seed=i)
        write_spots(tmp_path / f"s{i}.csv", offset=10.0 * i)
    manifest = tmp_path / "slides.csv"
    manifest.write_text(f"slide,coords,mpp\ns0.png,s0.csv,{MPP}\ns1.png,s1.csv,{MPP}\n")
    out = tmp_path / "out"
    r = predict("--manifest", manifest, "-o", out, "--model", tiny_bundle, "--format", "zarr")
    assert "batch: 2 done, 0 skipped" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["s0.zarr", "s1.zarr"]
    s = sd.read_zarr(out / "s1.zarr")
    assert len(s.shapes["s1"]) == s.tables["table"].n_obs == 16 and list(s.images) == ["s1_hires_image"]
    stamps = {p.name: (p / "zarr.json").stat().st_mtime_ns for p in out.iterdir()}

    r = predict("--manifest", manifest, "-o", out, "--model", tiny_bundle, "--format", "zarr")
    assert "batch: 0 done, 2 skipped (already done), 0 failed of 2" in r.stderr
    assert {p.name: (p / "zarr.json").stat().st_mtime_ns for p in out.iterdir()} == stamps

    # the same cohort as .h5ad: the default format, the same values
    predict("--manifest", manifest, "-o", out, "--model", tiny_bundle)
    assert sorted(p.name for p in out.iterdir()) == ["s0.h5ad", "s0.zarr", "s1.h5ad", "s1.zarr"]
    np.testing.assert_array_equal(ad.read_h5ad(out / "s1.h5ad").X, s.tables["table"].X)


def test_format_and_output_arguments(tiny_bundle, tmp_path):
    manifest = tmp_path / "slides.csv"
    manifest.write_text("slide,coords\na.png,a.csv\n")
    r = predict("--manifest", manifest, "-o", tmp_path / "out.zarr", "--format", "zarr", expect=2)
    assert "with --manifest, -o is an output folder" in r.stderr
    r = predict("--demo", "-o", tmp_path / "x.zarr", "--format", "zarr", expect=2)
    assert "--format only applies with --manifest" in r.stderr
    r = predict("--demo", "-o", tmp_path / "x.zarr", "--library-id", "B4/crop", expect=2)
    assert "--library-id B4/crop: cannot contain '/'" in r.stderr.strip().splitlines()[-1]
    r = predict("--demo", "-o", tmp_path / "x.tiff", expect=2)
    assert r.stderr.strip().splitlines()[-1] == (
        f"error: {tmp_path / 'x.tiff'}: the output must end in .h5ad (AnnData) or .zarr (SpatialData), "
        "or .geojson (QuPath detections), e.g. -o x.h5ad")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["slides.csv"]


def test_element_names_are_valid_for_any_library_id():
    from spatialdata._core.validation import check_valid_name

    from mmap_deploy.outputs.sdata import element_name

    for library_id in ("B4", "her2st B4/crop", ".hidden", "__x", "", "é-1.2"):
        name = element_name(library_id)
        check_valid_name(name)
        check_valid_name(f"{name}_hires_image")
    assert element_name("B4_crop-1.2") == "B4_crop-1.2"


def test_spatialdata_is_an_optional_extra_that_the_tests_install():
    from conftest import pyproject

    project = pyproject()["project"]
    assert not any(d.lower().startswith("spatialdata") for d in project["dependencies"])
    extras = project["optional-dependencies"]
    assert any(d.startswith("spatialdata") for d in extras["spatialdata"])
    assert any(d.startswith("mmap-deploy[") and "spatialdata" in d for d in extras["test"])
