"""`mmap-predict SLIDE --grid ...` end to end, for real: OpenSlide on JPEG-tiled pyramids written from real
her2st tissue, tissue detection, the grid, ONNX Runtime (the built-in demo model), the .h5ad / .zarr read back.

One 40x-style pyramid (a ~3 x 3 mm crop of her2st C6 on 6.4 x 6.4 mm of glass at 0.25 µm/px: 25 600 px a
side at level 0, levels 1/4/16/64) is written once per module and predicted once with ``--grid visium``
(and twice with ``--grid st``); everything else runs on small crops (1 500 px JPEGs of C6, 1 mm at
0.69 µm/px), so the module stays within a few minutes on two cores.
"""

from __future__ import annotations

import csv
import json
import math
import re
import threading
from pathlib import Path

import numpy as np
import pytest
from conftest import run_cli, spatialdata_or_skip
from PIL import Image
from wsi import GLASS, load_section, whole_slide

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

HER2ST_MPP = 0.69
VISIUM_SPOT_UM, VISIUM_PITCH_UM = 55.0, 100.0
C6_CROP = (1500, 2600, 5850, 6950)  # 4 350 px = 3.0 mm of C6: tissue, glass, printed dots, pink haze
SMALL_CROP = (2500, 3500, 4000, 5000)  # 1 500 px = 1.03 mm of C6, all tissue
GLASS_UM = (6400.0, 6400.0)
AT_UM = (1700.0, 1700.0)


def anndata_read(path: Path):
    import anndata

    return anndata.read_h5ad(path)


def error_line(result) -> str:
    """The run's one `error:` line (notes may come before it; no traceback)."""
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1, result.stderr
    assert "Traceback" not in result.stderr, result.stderr
    assert lines[-1] == errors[0], result.stderr
    return errors[0]


class LevelRecorder:
    """Wraps `OpenSlideReader._read_rgba` (every OpenSlide read goes through it): records (level, w, h)."""

    def __init__(self, monkeypatch):
        from mmap_deploy.inputs.slide import OpenSlideReader

        self.reads: list[tuple[int, int, int]] = []
        self.patch_levels: set[int] = set()  # what `patch_level` chose for the spots' patches
        lock = threading.Lock()
        real, real_patch_level = OpenSlideReader._read_rgba, OpenSlideReader.patch_level
        reads, patch_levels = self.reads, self.patch_levels

        def recording(reader, location, level, size):
            with lock:
                reads.append((int(level), int(size[0]), int(size[1])))
            return real(reader, location, level, size)

        def recording_patch_level(reader, side, out_px):
            level, d, n = real_patch_level(reader, side, out_px)
            with lock:
                patch_levels.add(int(level))
            return level, d, n

        monkeypatch.setattr(OpenSlideReader, "_read_rgba", recording)
        monkeypatch.setattr(OpenSlideReader, "patch_level", recording_patch_level)

    def area(self, level: int) -> int:
        return sum(w * h for lv, w, h in self.reads if lv == level)

    def levels(self) -> set[int]:
        return {lv for lv, _, _ in self.reads}


# -- slides ------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def her2st_images(real_data) -> Path:
    p = real_data / "her2st" / "images"
    if not (p / "C6.jpg").is_file():
        pytest.skip(f"her2st images not found in {p}")
    return p


@pytest.fixture(scope="module")
def c6_section(her2st_images):
    return load_section(her2st_images / "C6.jpg", HER2ST_MPP, AT_UM, crop=C6_CROP)


@pytest.fixture(scope="module")
def slide40x(c6_section, tmp_path_factory) -> Path:
    """25 600 x 25 600 px at 0.25 µm/px (levels 1/4/16/64), the C6 crop at (1.7, 1.7) mm."""
    return whole_slide(tmp_path_factory.mktemp("wsi") / "c6_40x.tif", [c6_section], GLASS_UM, 0.25)


@pytest.fixture(scope="module")
def small_dir(her2st_images, tmp_path_factory) -> Path:
    """small.jpg: 1 500 x 1 500 px of C6 tissue (no resolution in it: --mpp 0.69); blank.tif: glass only."""
    d = tmp_path_factory.mktemp("small")
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(her2st_images / "C6.jpg") as im:
        crop = im.crop(SMALL_CROP)
    crop.save(d / "small.jpg", quality=92)
    crop.save(d / "small.png")
    whole_slide(d / "blank.tif", [], (2000.0, 2000.0), 0.5)
    return d


@pytest.fixture(scope="module")
def visium40x(slide40x, tmp_path_factory):
    """`--grid visium --overview --plot GENE` on the 40x pyramid, every OpenSlide read recorded."""
    from mmap_deploy.model.bundle import default_bundle_path, load_bundle

    gene = load_bundle(default_bundle_path()).manifest.genes[0]
    out = tmp_path_factory.mktemp("visium") / "c6.h5ad"
    with pytest.MonkeyPatch.context() as mp:
        rec = LevelRecorder(mp)
        r = run_cli(slide40x, "--grid", "visium", "-o", out, "--overview", "--plot", gene, expect=0)
    return {"out": out, "adata": anndata_read(out), "reads": rec, "stderr": r.stderr, "gene": gene}


@pytest.fixture(scope="module")
def st40x(slide40x, tmp_path_factory):
    out = tmp_path_factory.mktemp("st") / "c6_st.h5ad"
    run_cli(slide40x, "--grid", "st", "-o", out, expect=0)
    return out


# -- 1. --grid visium on a 40x pyramid ---------------------------------------------------------------
def test_visium_grid_on_a_40x_pyramid(visium40x, slide40x):
    from mmap_deploy.inputs.geometry import VISIUM, fit_lattice

    a = visium40x["adata"]
    mpp = 0.25
    assert a.n_obs > 500 and a.n_vars > 0
    assert "warning:" not in visium40x["stderr"], visium40x["stderr"]
    obs = a.obs
    for col in ("array_row", "array_col", "in_tissue", "tissue_fraction", "tissue_id"):
        assert col in obs, col
    assert ((obs["array_row"] + obs["array_col"]) % 2 == 0).all()
    assert (obs["array_row"] >= 0).all() and (obs["array_col"] >= 0).all()
    assert (obs["in_tissue"] == 1).all()
    assert (obs["tissue_fraction"] >= 0.5).all() and (obs["tissue_fraction"] <= 1.0).all()
    assert (obs["tissue_id"] >= 1).all()
    ids = [f"visium_{r:05d}_{c:05d}" for r, c in zip(obs["array_row"], obs["array_col"])]
    assert list(a.obs_names) == ids

    lib = a.uns["spatial"]["c6_40x"]
    sf = lib["scalefactors"]
    assert sf["spot_diameter_fullres"] == pytest.approx(VISIUM_SPOT_UM / mpp)
    mm = a.uns["mmap"]
    grid = mm["grid"]
    assert grid["kind"] == "visium" and grid["pitch_um"] == VISIUM_PITCH_UM and grid["spot_um"] == VISIUM_SPOT_UM
    assert grid["count"] in (a.n_obs, a.n_obs + int(mm["n_dropped"]))
    assert grid["mpp"] == pytest.approx(mpp)
    tissue = mm["tissue"]
    assert tissue["method"] == "detected"
    assert 4.0 < tissue["area_mm2"] < 9.1  # the crop is 3 x 3 mm, its tissue ~2/3 of it
    assert tissue["pieces"] >= 1 and tissue["level"] > 0
    outline = mm["tissue_outline"]
    xy, start = np.asarray(outline["xy"]), np.asarray(outline["ring_start"])
    assert xy.ndim == 2 and xy.shape[1] == 2 and len(xy) >= 4
    assert start[0] == 0 and start[-1] == len(xy) and len(start) == len(outline["ring_piece"]) + 1
    assert len(outline["ring_hole"]) == len(outline["ring_piece"])
    # the outline lies on the section, in level-0 px
    lo, hi = np.array(AT_UM) / mpp, (np.array(AT_UM) + 3001.5) / mpp
    assert (xy.min(axis=0) >= lo - 50).all() and (xy.max(axis=0) <= hi + 50).all()
    # every spot centre on the section (the glass around it has no tissue)
    sp = np.asarray(a.obsm["spatial"], dtype=float)
    assert (sp.min(axis=0) >= lo).all() and (sp.max(axis=0) <= hi).all()
    # the spots are laid in µm from the slide's corner: (50 + 50 col, 50 + 86.6 row) µm
    assert np.allclose(sp[:, 0] * mpp, 50.0 + 50.0 * obs["array_col"].to_numpy())
    assert np.allclose(sp[:, 1] * mpp, 50.0 + 50.0 * math.sqrt(3) * obs["array_row"].to_numpy())

    fit = fit_lattice(sp, np.column_stack([obs["array_col"], obs["array_row"]]).astype(float), VISIUM)
    assert fit is not None and fit.mpp == pytest.approx(mpp, rel=0.005)


def test_visium_output_works_in_scanpy_and_squidpy(visium40x):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scanpy as sc
    import squidpy as sq

    a = visium40x["adata"].copy()
    gene = visium40x["gene"]
    try:
        sc.pl.spatial(a, color=gene, show=False, library_id="c6_40x")
    finally:
        plt.close("all")
    sq.gr.spatial_neighbors(a, coord_type="grid", n_neighs=6)
    degree = np.asarray(a.obsp["spatial_connectivities"].sum(axis=1)).ravel()
    have = set(zip(a.obs["array_row"], a.obs["array_col"]))
    interior = np.array([all((r + dr, c + dc) in have for dr, dc in
                             ((0, 2), (0, -2), (1, 1), (1, -1), (-1, 1), (-1, -1)))
                         for r, c in zip(a.obs["array_row"], a.obs["array_col"])])
    assert interior.sum() > 300
    assert (degree[interior] == 6).mean() > 0.95


def test_40x_reads_level0_only_for_patches(visium40x, slide40x):
    """Detection reads a coarse level (never level 0); level 0 is read only where spots are (the patches)."""
    import openslide

    rec: LevelRecorder = visium40x["reads"]
    a = visium40x["adata"]
    level = int(a.uns["mmap"]["tissue"]["level"])
    with openslide.OpenSlide(str(slide40x)) as osr:
        assert osr.dimensions[0] >= 25_000 and osr.dimensions[1] >= 25_000
        assert [round(d) for d in osr.level_downsamples] == [1, 4, 16, 64]
        assert osr.level_downsamples[level] * 0.25 <= 8.0  # not coarser than the mask's 8 µm
    assert level == 2 and level in rec.levels()
    # The demo model samples at 0.73 µm/px: level 1 (1 µm/px) is coarser, so patches come from level 0.
    assert rec.patch_levels == {0} and 0 in rec.levels()
    side = a.uns["mmap"]["patch_um"] / 0.25  # a patch: 654 level-0 px
    assert all((w, h) == (654, 654) or w <= 12_800 for lv, w, h in rec.reads if lv == 0)
    # at most one patch's worth per spot (bands decode shared pixels once), a fraction of the level
    assert rec.area(0) <= a.n_obs * (side + 1) ** 2
    assert rec.area(0) < 0.4 * 25_600**2


# -- 2. determinism ---------------------------------------------------------------------------------
def test_same_command_twice_is_bit_identical(st40x, slide40x, tmp_path):
    again = tmp_path / st40x.name
    run_cli(slide40x, "--grid", "st", "-o", again, expect=0)
    a, b = anndata_read(st40x), anndata_read(again)
    assert np.array_equal(np.asarray(a.X), np.asarray(b.X))
    assert a.obs.equals(b.obs) and list(a.obs_names) == list(b.obs_names)
    assert set(a.obsm) == set(b.obsm)
    for k in a.obsm:
        assert np.array_equal(np.asarray(a.obsm[k]), np.asarray(b.obsm[k])), k
    ta, tb = a.uns["mmap"]["tissue_outline"], b.uns["mmap"]["tissue_outline"]
    assert np.array_equal(ta["xy"], tb["xy"])


# -- 3. the same tissue at two resolutions ----------------------------------------------------------
def test_same_tissue_two_resolutions_same_bins(slide40x, c6_section, tmp_path):
    from mmap_deploy.options import Settings
    from mmap_deploy.run.predict import open_spots

    low = whole_slide(tmp_path / "c6_07.tif", [c6_section], GLASS_UM, 0.7)
    grids = {}
    for name, path in (("0.25", slide40x), ("0.7", low)):
        slide, source = open_spots(path, None, Settings(grid="32um"))
        with slide:
            assert slide.format.startswith("openslide")
            grids[name] = (source.grid, source.tissue, slide.mpp)
    (g25, t25, m25), (g07, t07, m07) = grids["0.25"], grids["0.7"]
    assert m25 == pytest.approx(0.25) and m07 == pytest.approx(0.7)
    assert t25.level > 0 and t07.level > 0
    assert len(g25) > 3000 and abs(len(g25) - len(g07)) <= 0.03 * len(g25)
    assert t07.area_mm2 == pytest.approx(t25.area_mm2, rel=0.03)
    # the same lattice in µm: the same ids, at the same places
    common = np.intersect1d(g25.ids, g07.ids)
    assert len(common) >= 0.97 * min(len(g25), len(g07))
    i25 = {s: i for i, s in enumerate(g25.ids)}
    i07 = {s: i for i, s in enumerate(g07.ids)}
    a = np.array([g25.xy[i25[s]] * 0.25 for s in common[:200]])
    b = np.array([g07.xy[i07[s]] * 0.7 for s in common[:200]])
    assert np.allclose(a, b)


# -- 4. --grid st and --grid 16um ------------------------------------------------------------------
def test_st_grid_basics(st40x):
    a = anndata_read(st40x)
    assert a.n_obs > 50
    assert all(re.fullmatch(r"st_\d{5}_\d{5}", s) for s in a.obs_names)
    g = a.uns["mmap"]["grid"]
    assert g["kind"] == "st" and g["pitch_um"] == 200.0 and g["spot_um"] == 100.0
    assert g["um_per_array_col"] == 200.0 and g["um_per_array_row"] == 200.0
    sf = a.uns["spatial"]["c6_40x"]["scalefactors"]
    assert sf["spot_diameter_fullres"] == pytest.approx(100.0 / 0.25)
    sp = np.asarray(a.obsm["spatial"], dtype=float)
    assert np.allclose(sp[:, 0] * 0.25, 100.0 + 200.0 * a.obs["array_col"].to_numpy())
    assert np.allclose(sp[:, 1] * 0.25, 100.0 + 200.0 * a.obs["array_row"].to_numpy())
    assert (a.obs["tissue_fraction"] >= 0.5).all()


def _square_geojson(path: Path, x0, y0, x1, y1, hole=None) -> Path:
    rings = [[[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]]
    if hole is not None:
        hx0, hy0, hx1, hy1 = hole
        rings.append([[hx0, hy0], [hx0, hy1], [hx1, hy1], [hx1, hy0], [hx0, hy0]])
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"objectType": "annotation"},
         "geometry": {"type": "Polygon", "coordinates": rings}}]}))
    return path


def test_bins_16um_basics(small_dir, tmp_path):
    # a 0.14 mm square of tissue (GeoJSON): ~80 bins
    mask = _square_geojson(tmp_path / "roi.geojson", 600, 600, 800, 800)
    out = tmp_path / "bins.h5ad"
    run_cli(small_dir / "small.jpg", "--grid", "16um", "--mpp", HER2ST_MPP, "--tissue-mask", mask, "-o", out,
            expect=0)
    a = anndata_read(out)
    assert 40 <= a.n_obs <= 120
    assert all(re.fullmatch(r"s_016um_\d{5}_\d{5}-1", s) for s in a.obs_names)
    assert a.obs_names[0] == f"s_016um_{a.obs['array_row'].iloc[0]:05d}_{a.obs['array_col'].iloc[0]:05d}-1"
    g = a.uns["mmap"]["grid"]
    assert g["kind"] == "bins" and g["pitch_um"] == 16.0 and g["shape"] == "square"
    assert g["id_format"] == "s_016um_{array_row:05d}_{array_col:05d}-1"
    sf = a.uns["spatial"]["small"]["scalefactors"]
    assert sf["spot_diameter_fullres"] == pytest.approx(16.0 / HER2ST_MPP)
    sp = np.asarray(a.obsm["spatial"], dtype=float) * HER2ST_MPP
    assert np.allclose(sp[:, 0], 8.0 + 16.0 * a.obs["array_col"].to_numpy())
    assert np.allclose(sp[:, 1], 8.0 + 16.0 * a.obs["array_row"].to_numpy())


# -- 5. bad input --------------------------------------------------------------------------------
def _mask_files(d: Path) -> dict[str, Path]:
    Image.new("L", (300, 200), 255).save(d / "aspect.png")
    Image.new("L", (300, 300), 0).save(d / "empty.png")
    (d / "points.geojson").write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [10, 20]}},
        {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [100, 100]]}}]}))
    (d / "coords.csv").write_text("x,y\n700,700\n900,700\n")
    return {p.stem: p for p in (d / "aspect.png", d / "empty.png", d / "points.geojson", d / "coords.csv")}


BAD = {
    "coords_and_grid": (["{small}", "{coords}", "--grid", "visium", "--mpp", "0.69"], "not both"),
    "jpeg_without_mpp": (["{small}", "--grid", "visium"], "--mpp"),
    "png_without_mpp": (["{png}", "--grid", "visium"], "--mpp"),
    "grid_0um": (["{small}", "--grid", "0um", "--mpp", "0.69"], "minimum of 2"),
    "grid_1um": (["{small}", "--grid", "1um", "--mpp", "0.69"], "minimum of 2"),
    "grid_hexagon": (["{small}", "--grid", "hexagon", "--mpp", "0.69"], "unknown grid"),
    "blank_slide": (["{blank}", "--grid", "visium"], "no tissue found"),
    "max_spots": (["{small}", "--grid", "visium", "--mpp", "0.69", "--max-spots", "10"], "--max-spots 10"),
    "mask_aspect": (["{small}", "--grid", "visium", "--mpp", "0.69", "--tissue-mask", "{aspect}"], "aspect"),
    "mask_empty": (["{small}", "--grid", "visium", "--mpp", "0.69", "--tissue-mask", "{empty}"], "empty"),
    "geojson_no_polygon": (["{small}", "--grid", "visium", "--mpp", "0.69", "--tissue-mask", "{points}"],
                           "no Polygon"),
    "mask_without_grid": (["{small}", "{coords}", "--mpp", "0.69", "--tissue-mask", "{empty}"], "only applies"),
    "min_tissue_without_grid": (["{small}", "{coords}", "--mpp", "0.69", "--min-tissue", "0.3"], "only applies"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_bad_input_is_one_error_line(case, small_dir, tmp_path):
    files = _mask_files(tmp_path)
    names = {"small": small_dir / "small.jpg", "png": small_dir / "small.png", "blank": small_dir / "blank.tif",
             **files}
    args, needle = BAD[case]
    out = tmp_path / "out" / "o.h5ad"
    out.parent.mkdir()
    r = run_cli(*[a.format(**names) for a in args], "-o", out, expect=2)
    line = error_line(r)
    assert needle in line, line
    assert not out.exists() and list(out.parent.iterdir()) == []
    assert not (tmp_path / "out" / "o.overview.png").exists()
    if case == "blank_slide":
        assert re.search(r"\d+(\.\d+)?% of the slide looked like tissue", line) and "--tissue-mask" in line
    if case == "max_spots":
        m = re.search(r"(\d+) spots .* over (\d+\.\d+) mm² of tissue", line)
        assert m, line
        assert 50 < int(m.group(1)) < 200 and 0.5 < float(m.group(2)) < 1.2


def test_overview_without_matplotlib_is_one_line_before_any_work(small_dir, tmp_path, monkeypatch):
    """--overview in a runtime-only install (no [plot] extra): said before the slide runs, nothing written."""
    import sys

    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError
    out = tmp_path / "out" / "o.h5ad"
    out.parent.mkdir()
    r = run_cli(small_dir / "small.jpg", "--grid", "visium", "--mpp", "0.69", "--overview", "-o", out, expect=2)
    assert "--overview needs matplotlib" in error_line(r) and list(out.parent.iterdir()) == []


# -- 6. the user's tissue mask ---------------------------------------------------------------------
def test_png_mask_replaces_detection(small_dir, tmp_path):
    """A 500 x 500 px mask of the 1 500 x 1 500 px slide: tissue only in its left 40%."""
    m = np.zeros((500, 500), np.uint8)
    m[:, :200] = 255
    Image.fromarray(m).save(tmp_path / "mask.png")
    out = tmp_path / "masked.h5ad"
    run_cli(small_dir / "small.jpg", "--grid", "visium", "--mpp", HER2ST_MPP, "--tissue-mask", tmp_path / "mask.png",
            "-o", out, expect=0)
    a = anndata_read(out)
    t = a.uns["mmap"]["tissue"]
    assert t["method"] == "mask:image" and t["level"] == -1 and t["pieces"] == 1
    assert t["area_mm2"] == pytest.approx(0.4 * (1500 * HER2ST_MPP / 1000) ** 2, rel=0.03)
    x = np.asarray(a.obsm["spatial"], dtype=float)[:, 0]
    r = VISIUM_SPOT_UM / 2 / HER2ST_MPP
    assert a.n_obs > 30 and (x <= 600 + r / 2).all() and x.max() > 600 - 2 * r
    assert (a.obs["tissue_id"] == 1).all()


def test_geojson_mask_with_a_hole(small_dir, tmp_path):
    outer = (150, 150, 1350, 1350)  # 828 µm square ...
    hole = (600, 600, 900, 900)  # ... with a 207 µm square hole
    mask = _square_geojson(tmp_path / "tissue.geojson", *outer, hole=hole)
    out = tmp_path / "holed.h5ad"
    run_cli(small_dir / "small.jpg", "--grid", "visium", "--mpp", HER2ST_MPP, "--tissue-mask", mask, "-o", out,
            expect=0)
    a = anndata_read(out)
    t = a.uns["mmap"]["tissue"]
    assert t["method"] == "mask:geojson" and t["level"] == -1
    expected = ((1200 * HER2ST_MPP) ** 2 - (300 * HER2ST_MPP) ** 2) / 1e6
    assert t["area_mm2"] == pytest.approx(expected, rel=0.05)
    xy = np.asarray(a.obsm["spatial"], dtype=float)
    r = VISIUM_SPOT_UM / 2 / HER2ST_MPP  # spot radius, px
    px = 8.0 / HER2ST_MPP  # one mask pixel
    # inside the polygon: a spot with half its area on tissue has its centre at most a radius outside
    assert (xy >= outer[0] - px).all() and (xy <= outer[2] + px).all()
    # not in the hole: no centre deeper in it than a spot radius (a centre at a corner has 3/4 outside)
    inner = (xy > hole[0] + r + px) & (xy < hole[2] - r - px)
    assert not inner.all(axis=1).any()
    # and spots all around it
    near = (np.abs(xy - 750).max(axis=1) < 150 + 2 * r)
    assert near.sum() >= 8
    # the outline has the hole
    assert bool(np.asarray(a.uns["mmap"]["tissue_outline"]["ring_hole"]).any())


def test_geojson_mask_is_not_shifted(small_dir, tmp_path):
    """Rasterised GeoJSON: the mask pixels whose centres are inside, on every side alike (no half-pixel shift)."""
    from mmap_deploy.inputs.slide import open_slide
    from mmap_deploy.inputs.tissue import read_tissue_mask

    rng = np.random.default_rng(7)
    area_err, shift = [], []
    with open_slide(small_dir / "small.jpg", mpp=HER2ST_MPP) as slide:
        for k in range(20):
            x0, y0 = rng.uniform(50, 500, 2)
            x1, y1 = x0 + rng.uniform(150, 900), y0 + rng.uniform(150, 900)
            path = _square_geojson(tmp_path / f"r{k}.geojson", x0, y0, x1, y1)
            t = read_tissue_mask(path, slide)
            px = 1.0 / t.scale_x  # level-0 px per mask px (~11.6)
            area_err.append(t.area_mm2 / ((x1 - x0) * (y1 - y0) * HER2ST_MPP**2 / 1e6) - 1.0)
            i, j = np.nonzero(t.mask)
            shift.append((((j.mean() + 0.5) / t.scale_x - (x0 + x1) / 2) / px,
                          ((i.mean() + 0.5) / t.scale_y - (y0 + y1) / 2) / px))
    assert abs(np.mean(area_err)) < 0.01, np.mean(area_err)
    assert np.all(np.abs(np.mean(shift, axis=0)) < 0.15), np.mean(shift, axis=0)


# -- 7. SpatialData ---------------------------------------------------------------------------------
def test_zarr_output_has_the_tissue_shapes(small_dir, tmp_path):
    spatialdata = spatialdata_or_skip()
    out = tmp_path / "small_st.zarr"
    run_cli(small_dir / "small.jpg", "--grid", "st", "--mpp", HER2ST_MPP, "-o", out, expect=0)
    sdata = spatialdata.read_zarr(out)
    assert "small" in sdata.shapes and "small_tissue" in sdata.shapes
    table = sdata.tables["table"]
    shapes = sdata.shapes["small_tissue"]
    assert len(shapes) == table.uns["mmap"]["tissue"]["pieces"]
    assert set(shapes["tissue_id"]) >= {int(v) for v in table.obs["tissue_id"]}
    # level-0 px: the polygons cover the (all tissue) 1 500 x 1 500 px slide, their area is the tissue's
    minx, miny, maxx, maxy = shapes.total_bounds
    assert -1 <= minx < 100 and -1 <= miny < 100 and 1400 < maxx <= 1501 and 1400 < maxy <= 1501
    area_mm2 = float(shapes.geometry.area.sum()) * HER2ST_MPP**2 / 1e6
    assert area_mm2 == pytest.approx(table.uns["mmap"]["tissue"]["area_mm2"], rel=0.05)
    # the spots' circles are the table's rows
    circles = sdata.shapes["small"]
    assert len(circles) == table.n_obs and set(circles.index) == set(table.obs_names)


# -- 8. --overview and --plot ----------------------------------------------------------------------
def test_overview_and_gene_map(visium40x):
    out = visium40x["out"]
    overview = out.with_name(f"{out.stem}.overview.png")
    gene_map = out.with_name(f"{out.stem}.{visium40x['gene']}.png")
    for png in (overview, gene_map):
        assert png.is_file(), png
        with Image.open(png) as im:
            im.load()
            assert min(im.size) >= 300, im.size
            pixels = np.asarray(im.convert("RGB"))
        assert pixels.std() > 10  # not blank
    assert f"wrote {overview}" in visium40x["stderr"] and f"wrote {gene_map}" in visium40x["stderr"]


def test_overview_redraws_from_the_file(visium40x, tmp_path):
    """The overview needs only the output: drawn again from the .h5ad read back."""
    from mmap_deploy.outputs.overview import overview_title, write_overview

    a = visium40x["adata"]
    title = overview_title(a)
    assert f"{a.n_obs} spots" in title and "--grid visium" in title and "(detected)" in title
    png = write_overview(a, tmp_path / "again.png", "c6_40x", title)
    with Image.open(png) as im, Image.open(visium40x["out"].with_name("c6.overview.png")) as first:
        assert im.size == first.size


# -- 9. batch ---------------------------------------------------------------------------------------
def test_batch_grid_rows_and_coords_rows(small_dir, tmp_path):
    import shutil

    for name in ("a.jpg", "b.jpg"):
        shutil.copy(small_dir / "small.jpg", tmp_path / name)
    (tmp_path / "coords.csv").write_text("x,y\n600,600\n800,600\n700,800\n900,900\n")
    manifest = tmp_path / "m.csv"
    with open(manifest, "w", newline="") as fh:
        w = csv.writer(fh)
        w.writerows([["slide", "coords", "mpp"], ["a.jpg", "coords.csv", HER2ST_MPP], ["b.jpg", "", HER2ST_MPP]])

    out = tmp_path / "out"
    r = run_cli("--manifest", manifest, "-o", out, "--grid", "visium", expect=0)
    a, b = anndata_read(out / "a.h5ad"), anndata_read(out / "b.h5ad")
    assert a.n_obs == 4 and "grid" not in a.uns["mmap"]  # the row with coords: its own spots
    assert b.n_obs > 50 and b.uns["mmap"]["grid"]["kind"] == "visium"
    assert "2 done" in r.stderr and "0 failed" in r.stderr

    out2 = tmp_path / "out2"
    r = run_cli("--manifest", manifest, "-o", out2, expect=1)
    assert (out2 / "a.h5ad").is_file() and not (out2 / "b.h5ad").exists()
    assert "1 done" in r.stderr and "1 failed" in r.stderr and "--grid" in r.stderr


# -- 10. the her2st authors' spots ------------------------------------------------------------------
def test_her2st_spots_have_a_grid_spot_nearby(real_data, her2st_images):
    import pandas as pd
    from scipy.spatial import cKDTree

    from mmap_deploy.inputs.grid import lay_grid, parse_grid
    from mmap_deploy.inputs.slide import open_slide
    from mmap_deploy.inputs.tissue import detect_tissue

    with open_slide(her2st_images / "B4.jpg", mpp=HER2ST_MPP) as slide:
        tissue = detect_tissue(slide)
        grid = lay_grid(parse_grid("visium"), width_px=slide.width, height_px=slide.height, mpp=slide.mpp,
                        mask=tissue.mask, scale_x=tissue.scale_x, scale_y=tissue.scale_y, labels=tissue.labels)
    spots = pd.read_csv(real_data / "her2st" / "spots" / "B4_selection.tsv", sep="\t")
    xy = spots[["pixel_x", "pixel_y"]].to_numpy(float)
    dist, _ = cKDTree(grid.xy).query(xy)
    assert (dist * HER2ST_MPP <= VISIUM_PITCH_UM).mean() >= 0.9
    # and the grid is not the whole slide: about the tissue's area in spots
    assert len(grid) < 1.2 * tissue.area_mm2 * 1e6 / (VISIUM_PITCH_UM**2 * math.sqrt(3) / 2)


# -- the model's resolution picks the level ------------------------------------------------------------
def test_patches_come_from_the_level_nearest_the_model(her2st_images, tmp_path, monkeypatch):
    """At 0.125 µm/px the demo model (0.73 µm/px) reads level 1 (0.5 µm/px), never level 0."""
    section = load_section(her2st_images / "C6.jpg", HER2ST_MPP, (200.0, 200.0), crop=SMALL_CROP)  # 1 mm
    path = whole_slide(tmp_path / "c6_80x.tif", [section], (1440.0, 1440.0), 0.125)
    rec = LevelRecorder(monkeypatch)
    out = tmp_path / "c6_80x.h5ad"
    run_cli(path, "--grid", "visium", "-o", out, expect=0)
    a = anndata_read(out)
    assert a.n_obs > 50 and a.uns["mmap"]["mpp"] == pytest.approx(0.125)
    assert 0 not in rec.levels(), sorted(rec.levels())
    # a patch is 163.52 µm = 1 308 level-0 px -> 224 px: downsample 5.8 wanted, level 1 (4) the nearest not coarser
    assert rec.patch_levels == {1}
    assert a.uns["mmap"]["tissue"]["level"] >= 2


# -- a grid is never "coordinates at the wrong scale" ---------------------------------------------------
def test_tissue_in_a_corner_gives_no_coordinate_warning(her2st_images, tmp_path):
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(her2st_images / "C6.jpg") as im:
        tissue = np.asarray(im.crop((2500, 3500, 3400, 4400)).convert("RGB"))
    img = np.empty((4000, 4000, 3), np.uint8)
    img[:] = GLASS
    img[100:1000, 100:1000] = tissue
    Image.fromarray(img).save(tmp_path / "corner.jpg", quality=92)
    out = tmp_path / "corner.h5ad"
    r = run_cli(tmp_path / "corner.jpg", "--grid", "st", "--mpp", HER2ST_MPP, "-o", out, expect=0)
    assert "warning:" not in r.stderr, r.stderr
    assert anndata_read(out).n_obs >= 4
