"""`mmap-predict` end to end: real OpenSlide pyramids, a real her2st JPEG, every coords format,
the output read back with anndata and plotted with scanpy, errors, faults and determinism."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
import tifffile
from click.testing import CliRunner
from conftest import TINY_GENES, write_pyramid

from mmap_deploy.cli import main
from mmap_deploy.model.preprocess import ViewSpec, patch_region


TIFF_MPP = 0.5  # µm per pixel written into the synthetic pyramid's resolution tags
TIFF_SIDE = 1400
TILE = 256
PITCH = 200  # spot centre-to-centre distance in level-0 px (100 µm, Visium-like)
HER2ST_CROP = (2000, 3300, 3600, 4900)  # left, top, right, bottom in B4.jpg


# -- inputs ------------------------------------------------------------------
def tissue_like_image(side: int, seed: int = 0) -> np.ndarray:
    """A deterministic pink/purple texture: blobs at several scales plus fine noise."""
    rng = np.random.default_rng(seed)
    img = np.zeros((side, side), np.float32)
    for cells, weight in ((8, 0.5), (40, 0.3), (175, 0.2)):
        coarse = rng.random((cells, cells)).astype(np.float32)
        reps = -(-side // cells)
        img += weight * np.kron(coarse, np.ones((reps, reps), np.float32))[:side, :side]
    img += 0.05 * rng.standard_normal((side, side)).astype(np.float32)
    t = np.clip(img, 0, 1)[..., None]
    pink, purple = np.array([235, 170, 210], np.float32), np.array([90, 40, 140], np.float32)
    return (pink * (1 - t) + purple * t).astype(np.uint8)


def write_pyramidal_tiff(path: Path, image: np.ndarray, mpp: float, levels: int = 3) -> Path:
    """A tiled, deflate-compressed pyramid with resolution tags at `mpp` µm per pixel."""
    return write_pyramid(path, image, levels=tuple(2**i for i in range(levels)), resolution=1e4 / mpp)


def corrupt_tiles(src: Path, dst: Path, tiles: list[int] | None, level: int = 0) -> Path:
    """Copy `src` with the tiles `tiles` (None: all) of pyramid `level` overwritten by garbage."""
    data = bytearray(src.read_bytes())
    with tifffile.TiffFile(src) as tf:
        page = tf.pages[level]
        offsets, counts = page.dataoffsets, page.databytecounts
    for t in range(len(offsets)) if tiles is None else tiles:
        data[offsets[t] : offsets[t] + counts[t]] = b"\xff" * counts[t]
    dst.write_bytes(bytes(data))
    return dst


def grid_spots(layout: str = "visium") -> list[tuple[str, int, int, float, float, int]]:
    """(barcode, in_tissue, array_row, array_col, x, y) on the layout's true lattice, the last column out of tissue.

    Visium: 6x6 spots of a hexagonal lattice, 100 µm apart (odd rows shifted
    by half a pitch, array_col in steps of 2); her2st (ST): 4x4 spots of a
    square grid, 200 µm apart.
    """
    rows = []
    if layout == "her2st":
        for r in range(4):
            for c in range(4):
                rows.append((f"{c}x{r}", int(c < 3), r, c, 100.0 + 2 * PITCH * c + 0.25, 100.0 + 2 * PITCH * r + 0.75))
        return rows
    for r in range(6):
        for c in range(6):
            x, y = 200.0 + PITCH * (c + (r % 2) / 2) + 0.25, 200.0 + PITCH * np.sqrt(3) / 2 * r + 0.75
            rows.append((f"AC{r}{c}-1", int(c < 5), r, 2 * c + r % 2, x, y))
    return rows


def write_coords(path: Path, layout: str) -> tuple[Path, list[str], np.ndarray]:
    """The grid in one coords layout; returns (path, expected in-tissue ids, their (x, y))."""
    spots = grid_spots(layout)
    lines = []
    if layout == "visium":
        lines.append("barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres")
    if layout in ("visium", "visium-list"):
        lines += [f"{b},{t},{r},{c},{y},{x}" for b, t, r, c, x, y in spots]
        kept = [s for s in spots if s[1]]
        ids = [s[0] for s in kept]
    elif layout == "her2st":
        lines.append("x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\tselected")
        lines += [f"{c}\t{r}\t{c + 0.01}\t{r - 0.02}\t{x}\t{y}\t{t}" for b, t, r, c, x, y in spots]
        kept = [s for s in spots if s[1]]
        ids = [f"{s[3]}x{s[2]}" for s in kept]
    else:  # plain x,y with barcodes: every row is a spot
        lines.append("x,y,barcode")
        lines += [f"{x},{y},{b}" for b, t, r, c, x, y in spots]
        kept = spots
        ids = [s[0] for s in kept]
    path.write_text("\n".join(lines) + "\n")
    return path, ids, np.array([[s[4], s[5]] for s in kept])


@pytest.fixture(scope="module")
def pyramid(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pyramid")
    return write_pyramidal_tiff(d / "slide.tif", tissue_like_image(TIFF_SIDE), TIFF_MPP)


@pytest.fixture(scope="module")
def her2st_crop(real_data, tmp_path_factory) -> tuple[Path, Path]:
    """A crop of the real her2st B4 JPEG and its spots (her2st layout, shifted into the crop)."""
    from PIL import Image

    d = tmp_path_factory.mktemp("her2st")
    left, top, right, bottom = HER2ST_CROP
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(real_data / "her2st" / "images" / "B4.jpg") as im:
        im.crop(HER2ST_CROP).save(d / "B4_crop.jpg", quality=92)
    lines = (real_data / "her2st" / "spots" / "B4_selection.tsv").read_text().splitlines()
    out = [lines[0]]
    for line in lines[1:]:
        v = line.split("\t")
        px, py = float(v[4]), float(v[5])
        if left + 120 < px < right - 120 and top + 120 < py < bottom - 120:
            v[4], v[5] = f"{px - left:.2f}", f"{py - top:.2f}"
            out.append("\t".join(v))
    (d / "B4_crop_selection.tsv").write_text("\n".join(out) + "\n")
    return d / "B4_crop.jpg", d / "B4_crop_selection.tsv"


def predict(*args, expect: int = 0):
    """Run mmap-predict in-process; check the exit code; return the click result."""
    result = CliRunner().invoke(main, ["-q", *map(str, args)])
    if result.exit_code != expect:
        raise AssertionError(f"exit {result.exit_code} (expected {expect})\nstderr:\n{result.stderr}\n{result.exception!r}")
    return result


def assert_one_line_error(result, *fragments: str) -> None:
    lines = result.stderr.strip().splitlines()
    assert lines[-1].startswith("error: "), result.stderr
    assert "Traceback" not in result.stderr
    for f in fragments:
        assert f in lines[-1], lines[-1]


# -- every coords format on a real OpenSlide pyramid ---------------------------
@pytest.mark.parametrize("layout", ["visium", "visium-list", "her2st", "xy"])
def test_each_coords_format_on_a_pyramidal_tiff(layout, pyramid, tiny_bundle, tmp_path):
    coords, ids, xy = write_coords(tmp_path / f"coords_{layout}.csv", layout)
    out = tmp_path / "out.h5ad"
    predict(pyramid, coords, "-o", out, "--model", tiny_bundle)
    a = ad.read_h5ad(out)
    assert list(a.obs_names) == ids  # in the order of the file, in-tissue only
    np.testing.assert_array_equal(a.obsm["spatial"], xy)
    assert a.X.shape == (len(ids), len(TINY_GENES)) and a.X.dtype == np.float32
    m = a.uns["mmap"]
    assert m["coords_format"] == layout
    assert m["mpp"] == pytest.approx(TIFF_MPP) and m["mpp_source"] == "openslide.mpp-x"
    assert m["slide_format"].startswith("openslide:") and m["slide_width"] == TIFF_SIDE


def test_all_spots_keeps_out_of_tissue_spots(pyramid, tiny_bundle, tmp_path):
    coords, ids, _ = write_coords(tmp_path / "tissue_positions.csv", "visium")
    out = tmp_path / "out.h5ad"
    predict(pyramid, coords, "-o", out, "--model", tiny_bundle, "--all-spots")
    a = ad.read_h5ad(out)
    assert a.n_obs == 36 > len(ids) and a.uns["mmap"]["all_spots"]


def test_mpp_that_contradicts_the_slide_is_used_with_a_warning(pyramid, tiny_bundle, tmp_path):
    coords, ids, _ = write_coords(tmp_path / "c.csv", "xy")
    out = tmp_path / "o.h5ad"
    r = predict(pyramid, coords, "-o", out, "--model", tiny_bundle, "--mpp", "0.6")
    assert "warning: " in r.stderr and "--mpp 0.6 overrides the slide's own 0.5" in r.stderr
    m = ad.read_h5ad(out).uns["mmap"]
    assert m["mpp"] == 0.6 and m["mpp_source"] == "--mpp"


def test_console_script_in_a_subprocess(pyramid, tiny_bundle, tmp_path):
    """The installed `mmap-predict` entry point, as a user runs it."""
    exe = Path(sys.executable).parent / "mmap-predict"
    assert exe.exists(), f"mmap-predict is not installed next to {sys.executable}: pip install -e '.[test]'"
    coords, ids, _ = write_coords(tmp_path / "tissue_positions.csv", "visium")
    out = tmp_path / "pred.h5ad"
    env = dict(os.environ, MPLBACKEND="Agg")
    proc = subprocess.run([str(exe), str(pyramid), str(coords), "-o", str(out), "--model", str(tiny_bundle),
                           "--plot", "GENE0,GENE3", "--threads", "2", "--batch-size", "8"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "engines: picked ONNX Runtime" in proc.stderr or "engines: picked" in proc.stderr
    assert f"wrote {out}: {len(ids)} spots" in proc.stderr and "spots/s" in proc.stderr
    assert proc.stdout == ""  # everything a user reads goes to stderr; stdout stays clean
    assert ad.read_h5ad(out).n_obs == len(ids)
    for gene in ("GENE0", "GENE3"):
        png = tmp_path / f"pred.{gene}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_pipeline_matches_the_whole_slide_reference(pyramid, tiny_bundle, tmp_path):
    """Streaming (batches of 7, banks gathered per batch) = encoder on all spots + prototypes + fusion."""
    from threadpoolctl import threadpool_limits

    from mmap_deploy.engines import open_engines
    from mmap_deploy.inputs.bands import read_spot_views
    from mmap_deploy.inputs.coords import read_coords
    from mmap_deploy.inputs.slide import open_slide
    from mmap_deploy.model.bundle import load_bundle
    from mmap_deploy.model.prototypes import KMEANS_SEED, kmeans, top_l_banks
    from mmap_deploy.run.pipeline import predict_slide

    coords, ids, _ = write_coords(tmp_path / "c.csv", "xy")
    bundle = load_bundle(tiny_bundle)
    spec = bundle.manifest.view
    spots = read_coords(coords)
    done = []
    with open_slide(pyramid) as slide, open_engines("onnxruntime", bundle, threads=1) as engines:
        pred = predict_slide(slide, spots, bundle, engines, batch_size=7, read_workers=3, progress=done.append)
        with threadpool_limits(1, user_api="blas"):  # as the pipeline does: tiny GEMMs, no BLAS threads
            views = np.empty((len(ids), spec.n_views, spec.input_size, spec.input_size, 3), np.uint8)
            for chunk in read_spot_views(slide, spots.xy, spec, workers=1):  # the pipeline's reader, in input order
                views[chunk.rows] = chunk.views
        enc = engines.encoder.infer({"views": views})
        rule = bundle.manifest.prototypes  # the method by hand: K rule, k-means, L rule, top-L
        km = kmeans(enc["f"], rule.n_prototypes(len(enc["f"])), seed=KMEANS_SEED)
        bank = km.centroids[top_l_banks(enc["f"], km.centroids, rule.bank_size(len(km.centroids)))]
        mask = np.ones(bank.shape[:2], bool)
        ref = engines.fusion.infer({"f": enc["f"], "bank": bank, "mask": mask, "y1": enc["y1"]})["prediction"]
    assert sum(done) == len(ids) and pred.spot_ids == ids
    np.testing.assert_allclose(pred.embedding, enc["f"], rtol=1e-5, atol=1e-6)
    np.testing.assert_array_equal(pred.clusters, km.labels)
    assert pred.n_prototypes == len(km.centroids) and pred.bank_size == mask.shape[1]
    # the runtime clips at the scale's floor, 0, and counts what it clipped
    np.testing.assert_allclose(pred.prediction, np.maximum(ref, 0), rtol=1e-5, atol=1e-5)
    assert pred.n_clipped == int((ref < 0).sum()) and pred.prediction.min() >= 0
    assert set(pred.timings) >= {"read_wait", "read_threads", "encoder", "kmeans", "banks", "fusion", "total"}


# -- a real her2st JPEG ----------------------------------------------------------
@pytest.fixture(scope="module")
def her2st_output(her2st_crop, tiny_bundle, tmp_path_factory) -> Path:
    image, coords = her2st_crop
    out = tmp_path_factory.mktemp("her2st_out") / "B4_crop.h5ad"
    predict(image, coords, "-o", out, "--model", tiny_bundle, "--mpp", "0.69", "--library-id", "B4",
            "--batch-size", "16")
    return out


def test_her2st_output_has_every_field(her2st_output, her2st_crop, tiny_bundle):
    from mmap_deploy.inputs.coords import read_coords
    from mmap_deploy.model.bundle import load_bundle

    spots = read_coords(her2st_crop[1])
    a = ad.read_h5ad(her2st_output)
    n = len(spots)
    assert n >= 10
    # X: float32 predictions on the training log scale, finite, not constant
    assert a.X.dtype == np.float32 and a.X.shape == (n, len(TINY_GENES))
    # (the random tiny model predicts some genes below 0 everywhere: clipped to the floor, 0)
    assert np.isfinite(a.X).all() and a.X.min() >= 0 and a.X.std(axis=0).max() > 0
    assert a.uns["mmap"]["prediction_floor"] == 0 and a.uns["mmap"]["n_clipped_below_floor"] == (a.X == 0).sum()
    assert list(a.var_names) == TINY_GENES
    assert list(a.obs_names) == spots.ids and all("x" in i for i in spots.ids)
    np.testing.assert_array_equal(a.obsm["spatial"], spots.xy)
    assert a.obsm["mmap_embedding"].shape == (n, 96) and a.obsm["mmap_embedding"].dtype == np.float32
    # clusters: K = clip(n // 5, 32, 80) capped at n, as the manifest rule says
    k = load_bundle(tiny_bundle).manifest.prototypes.n_prototypes(n)
    cl = a.obs["mmap_cluster"]
    assert cl.dtype == "category" and len(cl.cat.categories) == k
    assert a.uns["mmap"]["n_prototypes"] == k
    # spatial: hires thumbnail, longest side 2000 (the crop is 1600 px: not upscaled) and scale factors
    lib = a.uns["spatial"]["B4"]
    hires = lib["images"]["hires"]
    assert hires.dtype == np.uint8 and hires.shape == (1600, 1600, 3)
    sf = lib["scalefactors"]
    assert sf["tissue_hires_scalef"] == pytest.approx(1.0)
    # her2st: 200 µm pitch, ~270-290 px; about half of it is the plotting diameter (100 µm spots)
    assert 125 < sf["spot_diameter_fullres"] < 150
    m = a.uns["mmap"]
    assert m["project"] == "mmap-deploy" and m["project_version"]
    assert m["bundle_sha256"] == load_bundle(tiny_bundle).sha256()
    assert m["backend"] == "onnxruntime" and "CPUExecutionProvider" in m["providers"]
    assert m["precision"] == "fp32"
    assert m["mpp"] == 0.69 and m["mpp_source"] == "--mpp"
    assert m["coords_format"] == "her2st" and m["slide_format"] == "image:JPEG"
    assert m["n_dropped"] == 0 and len(m["dropped_spots"]) == 0
    t = m["timings"]
    for key in ("read_wait", "read_threads", "encoder", "kmeans", "banks", "fusion", "total", "thumbnail"):
        assert t[key] >= 0, key
    assert t["encoder"] > 0 and t["total"] >= t["encoder"] + t["fusion"]


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::PendingDeprecationWarning")
def test_her2st_output_plots_in_scanpy(her2st_output):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc

    a = ad.read_h5ad(her2st_output)
    axes = sc.pl.spatial(a, color=[TINY_GENES[0], "mmap_cluster"], show=False)
    assert len(axes) == 2
    # scanpy drew the hires image and one marker per spot
    assert axes[0].images and axes[0].collections
    plt.close("all")


def test_same_run_twice_and_other_batch_sizes_give_identical_x(her2st_output, her2st_crop, tiny_bundle, tmp_path):
    image, coords = her2st_crop
    ref = ad.read_h5ad(her2st_output)
    for bs in ("16", "5"):
        out = tmp_path / f"bs{bs}.h5ad"
        predict(image, coords, "-o", out, "--model", tiny_bundle, "--mpp", "0.69", "--library-id", "B4",
                "--batch-size", bs)
        a = ad.read_h5ad(out)
        # bit-identical on CPU (ONNX Runtime's CPU kernels here do not depend on the batch size)
        np.testing.assert_array_equal(a.X, ref.X)
        np.testing.assert_array_equal(a.obsm["mmap_embedding"], ref.obsm["mmap_embedding"])
        assert (a.obs["mmap_cluster"] == ref.obs["mmap_cluster"]).all()


def test_existing_output_is_refused_without_overwrite(her2st_crop, tiny_bundle, tmp_path):
    image, coords = her2st_crop
    out = tmp_path / "o.h5ad"
    out.write_bytes(b"finished work")
    r = predict(image, coords, "-o", out, "--model", tiny_bundle, "--mpp", "0.69", expect=2)
    assert_one_line_error(r, f"{out}: already exists; pass --overwrite")
    assert out.read_bytes() == b"finished work"
    predict(image, coords, "-o", out, "--model", tiny_bundle, "--mpp", "0.69", "--overwrite")
    assert ad.read_h5ad(out).n_obs > 0


def test_jpeg_without_mpp_says_to_pass_mpp(her2st_crop, tiny_bundle, tmp_path):
    """Without a lattice to derive it from (a plain x,y table), a slide without resolution is an error."""
    image, coords = her2st_crop
    lines = coords.read_text().splitlines()
    xy = tmp_path / "xy.csv"
    xy.write_text("x,y\n" + "".join(f"{v.split()[4]},{v.split()[5]}\n" for v in lines[1:]))
    out = tmp_path / "o.h5ad"
    r = predict(image, xy, "-o", out, "--model", tiny_bundle, expect=2)
    assert_one_line_error(r, "no resolution", "pass --mpp")
    assert not out.exists()


# -- bad input: one line, exit 2, no output --------------------------------------
def test_missing_slide(tiny_bundle, tmp_path):
    coords, _, _ = write_coords(tmp_path / "c.csv", "xy")
    out = tmp_path / "o.h5ad"
    r = predict(tmp_path / "nope.svs", coords, "-o", out, "--model", tiny_bundle, expect=2)
    assert_one_line_error(r, "nope.svs: slide file not found")
    assert not out.exists() and list(tmp_path.iterdir()) == [coords]
    assert "engines:" not in r.stderr  # said only once the inputs have passed their checks


def test_engines_line_follows_the_input_checks(pyramid, tiny_bundle, tmp_path):
    outside = tmp_path / "outside.csv"
    outside.write_text("x,y\n300,300\n90000,300\n")
    r = predict(pyramid, outside, "-o", tmp_path / "o.h5ad", "--model", tiny_bundle, expect=2)
    assert_one_line_error(r, "outside.csv")
    assert "engines:" not in r.stderr
    coords, _, _ = write_coords(tmp_path / "c.csv", "xy")
    r = predict(pyramid, coords, "-o", tmp_path / "o.h5ad", "--model", tiny_bundle)
    assert sum(line.startswith("engines: ") for line in r.stderr.splitlines()) == 1


def test_unknown_plot_gene_fails_before_any_work(pyramid, tiny_bundle, tmp_path):
    coords, _, _ = write_coords(tmp_path / "c.csv", "xy")
    out = tmp_path / "o.h5ad"
    r = predict(pyramid, coords, "-o", out, "--model", tiny_bundle, "--plot", "GENE1,ERBB2", expect=2)
    assert_one_line_error(r, "--plot: gene(s) ERBB2 not predicted")
    assert not out.exists()


def test_missing_bundle_and_bad_arguments(pyramid, tmp_path):
    coords, _, _ = write_coords(tmp_path / "c.csv", "xy")
    r = predict(pyramid, coords, "-o", tmp_path / "o.h5ad", "--model", tmp_path / "nobundle", expect=2)
    assert_one_line_error(r, "model bundle directory not found")
    r = predict("-o", tmp_path / "o.h5ad", expect=2)
    assert_one_line_error(r, "give either SLIDE COORDS, or --demo, or --manifest")
    r = predict(pyramid, "-o", tmp_path / "o.h5ad", expect=2)
    assert_one_line_error(r, "no spot coordinates given: pass COORDS", "--grid visium")
    r = predict(pyramid, coords, "-o", tmp_path / "o.csv", expect=2)
    assert_one_line_error(r, "must end in .h5ad (AnnData) or .zarr (SpatialData)")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c.csv"]


def test_default_model_is_the_demo_bundle_or_a_clear_error(pyramid, tmp_path):
    from mmap_deploy.model.bundle import default_bundle_path

    coords, ids, _ = write_coords(tmp_path / "c.csv", "xy")
    out = tmp_path / "o.h5ad"
    if (default_bundle_path() / "manifest.json").is_file():
        r = predict(pyramid, coords, "-o", out)
        assert "DEMO model" in r.stderr
        assert ad.read_h5ad(out).uns["mmap"]["bundle_demo"]
    else:
        r = predict(pyramid, coords, "-o", out, expect=2)
        assert_one_line_error(r, "no --model given and the demo bundle is not installed", "--model DIR")
        assert not out.exists()


def test_demo_sample_runs(tiny_bundle, tmp_path):
    """--demo reads the embedded her2st sample (mpp from its EXIF tags)."""
    out = tmp_path / "demo.h5ad"
    predict("--demo", "--model", tiny_bundle, "-o", out)
    a = ad.read_h5ad(out)
    assert a.n_obs > 0 and a.uns["mmap"]["coords_format"] == "her2st"
    assert a.uns["mmap"]["mpp_source"] != "--mpp"


# -- faults: unreadable tiles ------------------------------------------------------
def _spots_touching_tile0(xy: np.ndarray, ids: list[str]) -> list[str]:
    spec = ViewSpec()  # the tiny bundle's geometry (the defaults)
    out = []
    for (x, y), i in zip(xy, ids):
        left, top, side = patch_region(x, y, TIFF_MPP, spec)
        if left < TILE and top < TILE:
            out.append(i)
    return out


def test_corrupt_tile_drops_and_lists_its_spots(pyramid, tiny_bundle, tmp_path):
    bad = corrupt_tiles(pyramid, tmp_path / "bad.tif", [0])
    coords, ids, xy = write_coords(tmp_path / "c.csv", "xy")
    expected = _spots_touching_tile0(xy, ids)
    assert 1 <= len(expected) < len(ids)
    out = tmp_path / "o.h5ad"
    r = predict(bad, coords, "-o", out, "--model", tiny_bundle)
    assert f"{len(expected)} unreadable spot(s) dropped" in r.stderr
    a = ad.read_h5ad(out)
    m = a.uns["mmap"]
    assert list(m["dropped_spots"]) == expected and m["n_dropped"] == len(expected)
    assert all("cannot decode" in e for e in m["dropped_errors"])
    assert list(a.obs_names) == [i for i in ids if i not in expected]
    # the hires image is still there: from the slide, a coarser level, or blank if both fail
    assert a.uns["spatial"]["bad"]["images"]["hires"].ndim == 3
    assert m["thumbnail"].startswith(("longest side", "blank"))

    strict_out = tmp_path / "strict.h5ad"
    r = predict(bad, coords, "-o", strict_out, "--model", tiny_bundle, "--strict", expect=2)
    assert_one_line_error(r, f"spot {expected[0]}", "cannot decode", "run without --strict")
    assert not strict_out.exists()


def test_unreadable_thumbnail_leaves_a_blank_hires_image(pyramid, tiny_bundle, tmp_path):
    """Damage away from the spots (last level-0 tile, all coarser levels): predictions are kept."""
    bad = corrupt_tiles(pyramid, tmp_path / "bad0.tif", [-1])
    bad = corrupt_tiles(bad, tmp_path / "bad1.tif", None, level=1)
    bad = corrupt_tiles(bad, tmp_path / "bad.tif", None, level=2)
    coords = tmp_path / "c.csv"
    coords.write_text("x,y\n300,300\n500,300\n300,500\n500,500\n")
    out = tmp_path / "o.h5ad"
    r = predict(bad, coords, "-o", out, "--model", tiny_bundle)
    assert "warning: " in r.stderr and "hires image is left blank" in r.stderr
    a = ad.read_h5ad(out)
    assert a.n_obs == 4 and a.uns["mmap"]["n_dropped"] == 0
    assert a.uns["mmap"]["thumbnail"].startswith("blank: the slide could not be read")
    hires = a.uns["spatial"]["bad"]["images"]["hires"]
    assert hires.shape == (TIFF_SIDE, TIFF_SIDE, 3) and (hires == 255).all()


def test_slide_where_no_spot_can_be_read_fails_like_bad_input(pyramid, tiny_bundle, tmp_path):
    bad = corrupt_tiles(pyramid, tmp_path / "bad.tif", None)
    coords, ids, _ = write_coords(tmp_path / "c.csv", "xy")
    out = tmp_path / "o.h5ad"
    r = predict(bad, coords, "-o", out, "--model", tiny_bundle, expect=2)
    assert_one_line_error(r, f"none of the {len(ids)} spots could be read")
    assert not out.exists()
    assert not [p for p in tmp_path.iterdir() if p.suffix == ".tmp"]


# -- start-up ------------------------------------------------------------------------
def test_cli_import_is_light():
    code = ("import sys, mmap_deploy.cli; "
            "print(','.join(m for m in ('torch', 'onnxruntime', 'anndata', 'openslide', 'numpy', 'pandas') "
            "if m in sys.modules))")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == ""


def test_a_whole_run_never_imports_torch(pyramid, tiny_bundle, tmp_path):
    coords, _, _ = write_coords(tmp_path / "c.csv", "xy")
    code = (
        "import sys\n"
        "from mmap_deploy.cli import main\n"
        f"sys.argv = ['mmap-predict', {str(pyramid)!r}, {str(coords)!r}, '-o', {str(tmp_path / 'o.h5ad')!r},"
        f" '--model', {str(tiny_bundle)!r}, '-q', '--plot', 'GENE1']\n"
        "try:\n    main()\nexcept SystemExit as e:\n    code = e.code\n"
        "print(code, [m for m in ('torch', 'mmap_train', 'mmap_export', 'timm') if m in sys.modules])\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, MPLBACKEND="Agg"))
    assert proc.stdout.strip().splitlines()[-1] == "0 []", proc.stdout + proc.stderr


def test_cpu_engines_get_cpu_batch_and_reader_defaults(tiny_bundle):
    from mmap_deploy.engines import default_threads, open_engines
    from mmap_deploy.model.bundle import load_bundle
    from mmap_deploy.run.predict import engine_defaults

    with open_engines("onnxruntime", load_bundle(tiny_bundle), providers=["cpu"]) as engines:
        assert engine_defaults(engines, None, 0) == (32, max(1, min(4, default_threads())))
        assert engine_defaults(engines, 5, 1) == (5, 1)  # an explicit --batch-size and --threads win


def test_help_lists_the_options():
    r = CliRunner().invoke(main, ["--help"])
    assert r.exit_code == 0
    for opt in ("--model", "--mpp", "--backend", "--precision", "--batch-size", "--threads", "--all-spots",
                "--overwrite", "--plot", "--strict", "--library-id", "--demo", "--manifest", "--shard", "--format"):
        assert opt in r.output
