"""Space Ranger and Visium HD folders as COORDS, and the geometry checks, on real her2st images.

The folders are built here as Space Ranger writes them, over a real her2st
section (C2, read at a quarter of its resolution through OpenSlide as a
pyramidal TIFF), with spots on a true Visium lattice (hexagonal, 100 µm) or
Visium HD bins (square, 16 µm); in-tissue spots are those near the section's
own her2st spots (the published annotation, not this project's mask).
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from conftest import write_pyramid
from test_predict_cli import assert_one_line_error, predict


HER2ST_MPP = 0.69  # µm per pixel of the her2st B-H images (lattice fit; HEST-1k: 0.689-0.698)
SHRINK = 4  # the test slide is C2 at a quarter of its resolution
SLIDE_MPP = HER2ST_MPP * SHRINK
CROP = (1400, 4800, 4600, 8600)  # full-resolution window of C2: the tissue's lower-left edge and glass
SECTIONS = ("B4", "C2", "C3", "C4", "C5", "C6")


def _her2st(real_data: Path, section: str) -> dict[str, np.ndarray]:
    return np.genfromtxt(real_data / "her2st" / "spots" / f"{section}_selection.tsv", names=True, delimiter="\t")


@pytest.fixture(scope="module")
def c2_slide(real_data, tmp_path_factory) -> tuple[Path, np.ndarray, np.ndarray]:
    """The C2 crop as a pyramidal TIFF at SLIDE_MPP; its pixels; the her2st spots in its pixels."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(real_data / "her2st" / "images" / "C2.jpg") as im:
        im.draft("RGB", (im.width // SHRINK, im.height // SHRINK))  # JPEG decodes at 1/4 directly
        assert im.width * SHRINK <= 9300
        left, top, right, bottom = (v // SHRINK for v in CROP)
        rgb = np.ascontiguousarray(np.asarray(im.convert("RGB"))[top:bottom, left:right])
    path = write_pyramid(tmp_path_factory.mktemp("c2") / "C2_crop.tif", rgb, levels=(1, 2), resolution=1e4 / SLIDE_MPP)
    d = _her2st(real_data, "C2")
    her2st_xy = np.stack([d["pixel_x"] / SHRINK - left, d["pixel_y"] / SHRINK - top], axis=1)
    return path, rgb, her2st_xy


def _near_her2st(xy: np.ndarray, her2st_xy: np.ndarray, um: float = 120.0) -> np.ndarray:
    d = np.hypot(xy[:, None, 0] - her2st_xy[None, :, 0], xy[:, None, 1] - her2st_xy[None, :, 1])
    return d.min(axis=1) <= um / SLIDE_MPP


def _images(folder: Path, rgb: np.ndarray, hires: float = 0.5, lowres: float = 0.2) -> dict[str, float]:
    from PIL import Image

    h, w = rgb.shape[:2]
    for name, sf in (("hires", hires), ("lowres", lowres)):
        Image.fromarray(rgb).resize((round(w * sf), round(h * sf)), Image.Resampling.BOX).save(
            folder / f"tissue_{name}_image.png")
    return {"tissue_hires_scalef": hires, "tissue_lowres_scalef": lowres}


def spaceranger_outs(root: Path, rgb: np.ndarray, her2st_xy: np.ndarray, *, swap: bool = False,
                     scale: float = 1.0) -> Path:
    """A Space Ranger outs/ folder: spots on a Visium lattice (100 µm pitch), in_tissue near her2st spots."""
    spatial = root / "outs" / "spatial"
    spatial.mkdir(parents=True)
    h, w = rgb.shape[:2]
    pitch = 100.0 / SLIDE_MPP
    jitter = np.random.default_rng(0)
    rows = []
    for r in range(int((h - 40) / (pitch * np.sqrt(3) / 2))):
        for c in range(r % 2, int((w - 40) / (pitch / 2)), 2):  # array_col steps by 2 along a row
            x = 20 + c * pitch / 2 + jitter.normal(0, 0.5)
            y = 20 + r * pitch * np.sqrt(3) / 2 + jitter.normal(0, 0.5)
            rows.append((f"{'ACGT'[r % 4]}{r:03d}{c:03d}-1", r, c, x, y))
    xy = np.array([(x, y) for *_, x, y in rows])
    tissue = _near_her2st(xy, her2st_xy)
    lines = ["barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres"]
    for (b, r, c, x, y), t in zip(rows, tissue):
        px_row, px_col = (x, y) if swap else (y, x)
        lines.append(f"{b},{int(t)},{r},{c},{px_row * scale:.2f},{px_col * scale:.2f}")
    (spatial / "tissue_positions.csv").write_text("\n".join(lines) + "\n")
    sf = _images(spatial, rgb)
    sf.update(spot_diameter_fullres=55.0 / SLIDE_MPP, fiducial_diameter_fullres=85.0 / SLIDE_MPP)
    (spatial / "scalefactors_json.json").write_text(json.dumps(sf))
    return root / "outs"


def visium_hd_bins(root: Path, rgb: np.ndarray, her2st_xy: np.ndarray, bin_um: float = 16.0) -> Path:
    """binned_outputs/square_016um/ over a 20 x 20 block of bins on tissue (plus one 8 µm folder)."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    h, w = rgb.shape[:2]
    inside = her2st_xy[(her2st_xy > 150).all(axis=1) & (her2st_xy[:, 0] < w - 150) & (her2st_xy[:, 1] < h - 150)]
    centre = inside[np.argmin(np.abs(inside - inside.mean(axis=0)).sum(axis=1))]
    pitch = bin_um / SLIDE_MPP
    r, c = np.divmod(np.arange(400), 20)
    x, y = centre[0] + (c - 10) * pitch, centre[1] + (r - 10) * pitch
    table = pa.table({
        "barcode": [f"s_{int(bin_um):03d}um_{i:05d}_{j:05d}-1" for i, j in zip(r, c)],
        "in_tissue": pa.array((c % 10 != 9).astype(np.int32)),  # some bins out of tissue
        "array_row": pa.array(r), "array_col": pa.array(c),
        "pxl_row_in_fullres": pa.array(y), "pxl_col_in_fullres": pa.array(x),
    })
    for size in (8, int(bin_um)):
        (root / "binned_outputs" / f"square_{size:03d}um" / "spatial").mkdir(parents=True, exist_ok=True)
    spatial = root / "binned_outputs" / f"square_{int(bin_um):03d}um" / "spatial"
    pq.write_table(table, spatial / "tissue_positions.parquet")
    sf = _images(spatial, rgb, hires=0.25, lowres=0.1)
    sf.update(bin_size_um=bin_um, microns_per_pixel=SLIDE_MPP, spot_diameter_fullres=bin_um / SLIDE_MPP)
    (spatial / "scalefactors_json.json").write_text(json.dumps(sf))
    return spatial.parent


# -- the lattice on all 36 real her2st tables ---------------------------------------
def test_lattice_fit_gives_each_her2st_sections_resolution(real_data):
    from mmap_deploy.inputs.coords import read_coords
    from mmap_deploy.inputs.geometry import ST, fit_lattice

    for table in sorted((real_data / "her2st" / "spots").glob("*_selection.tsv")):
        spots = read_coords(table)
        fit = fit_lattice(spots.xy, spots.array_xy, ST)
        # ~290 px per 200 µm step for B-H (0.69 µm/px), ~218 px for A1-A6 (0.92 µm/px)
        lo, hi = (0.88, 0.95) if table.name.startswith("A") else (0.67, 0.71)
        assert lo < fit.mpp < hi, (table.name, fit.mpp)
        assert abs(fit.mpp_col / fit.mpp_row - 1) < 0.02 and not fit.transposed
        swapped = fit_lattice(spots.xy[:, ::-1], spots.array_xy, ST)
        assert swapped.transposed and swapped.mpp == pytest.approx(fit.mpp)


def test_lattice_fit_is_not_biased_by_jitter_and_sees_rotation_and_swap():
    from mmap_deploy.inputs.geometry import VISIUM, fit_lattice

    rng = np.random.default_rng(1)
    rows, cols = np.divmod(np.arange(900), 30)
    cols = 2 * cols + rows % 2
    mpp = 0.5
    xy = np.stack([cols * 50 / mpp, rows * 50 * np.sqrt(3) / mpp], axis=1) + rng.normal(0, 8, (900, 2))
    fit = fit_lattice(xy, np.stack([cols, rows], axis=1).astype(float), VISIUM)
    assert fit.mpp == pytest.approx(mpp, rel=0.005) and fit.pitch_px == pytest.approx(200, rel=0.005)
    rotated = fit_lattice(np.stack([-xy[:, 1], xy[:, 0]], axis=1), np.stack([cols, rows], axis=1).astype(float), VISIUM)
    assert not rotated.transposed  # a 90° rotated image keeps its handedness: not a swap
    assert fit_lattice(xy[:, ::-1], np.stack([cols, rows], axis=1).astype(float), VISIUM).transposed


# -- tissue: no false alarm on the six real images ------------------------------------
@pytest.mark.parametrize("section", SECTIONS)
def test_tissue_check_passes_each_real_her2st_image_and_refuses_its_swap(section, real_data):
    from types import SimpleNamespace

    from PIL import Image

    from mmap_deploy.errors import UserError
    from mmap_deploy.inputs.coords import read_coords
    from mmap_deploy.inputs.geometry import MASK_MAX_SIDE, ST, check_geometry, fit_lattice, tissue_mask

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(real_data / "her2st" / "images" / f"{section}.jpg") as im:
        w, h = im.size
        im.draft("RGB", (w // 8, h // 8))
        side = MASK_MAX_SIDE / max(w, h)
        small = np.asarray(im.convert("RGB").resize((round(w * side), round(h * side)), Image.Resampling.BOX))
    table = real_data / "her2st" / "spots" / f"{section}_selection.tsv"
    spots = read_coords(table)
    mask = tissue_mask(small, small.shape[1] / w, "test")
    assert mask.informative and 0.05 < mask.mask.mean() < 0.4
    fit = fit_lattice(spots.xy, spots.array_xy, ST)
    slide = SimpleNamespace(width=w, height=h, mpp=fit.mpp)
    report = check_geometry(spots, fit, slide, mask, 163.52, table, "openslide.mpp-x")
    assert report.problems == [] and report.warnings == []
    assert report.qc["on_tissue"] >= 0.95 and report.qc["on_tissue"] > report.qc["on_tissue_if_swapped"]
    swapped = SimpleNamespace(xy=spots.xy[:, ::-1].copy())
    with pytest.raises(UserError, match=r"x and y look swapped.*skip_geometry_checks="):
        check_geometry(swapped, fit_lattice(swapped.xy, spots.array_xy, ST), slide, mask, 163.52, table,
                       "openslide.mpp-x")


def test_swap_without_a_lattice_is_refused_by_the_tissue_and_few_spots_warn(real_data):
    from types import SimpleNamespace

    from mmap_deploy.errors import UserError
    from mmap_deploy.inputs.geometry import TissueMask, check_geometry

    mask = np.zeros((100, 100), bool)
    mask[10:40, 10:90] = True  # a wide band of tissue in the top half
    tm = TissueMask(mask, 0.1, 0.2, "test", True)
    slide = SimpleNamespace(width=1000, height=1000, mpp=1.0)
    on = SimpleNamespace(xy=np.stack(np.meshgrid(np.arange(150, 850, 50.0), np.arange(150, 350, 50.0)), -1).reshape(-1, 2))
    assert check_geometry(on, None, slide, tm, 20, Path("c.csv"), "x").qc["on_tissue"] == 1.0
    with pytest.raises(UserError, match=r"c\.csv: x and y look swapped: \d+% of the spots lie on tissue as given, 100%"):
        check_geometry(SimpleNamespace(xy=on.xy[:, ::-1].copy()), None, slide, tm, 20, Path("c.csv"), "x")
    off = SimpleNamespace(xy=np.array([[900.0, 900.0], [950.0, 900.0], [900.0, 950.0]]))
    report = check_geometry(off, None, slide, tm, 20, Path("c.csv"), "x")
    assert not report.problems and "only 0% of the spots lie on tissue" in report.warnings[0]


# -- Space Ranger outs/ end to end ---------------------------------------------------------
def test_spaceranger_outs_folder_gives_its_images_and_scalefactors(c2_slide, tiny_bundle, tmp_path):
    slide, rgb, her2st_xy = c2_slide
    outs = spaceranger_outs(tmp_path / "run", rgb, her2st_xy)
    out = tmp_path / "sr.h5ad"
    predict(slide, outs, "-o", out, "--model", tiny_bundle, "--library-id", "C2")
    a = ad.read_h5ad(out)
    table = (outs / "spatial" / "tissue_positions.csv").read_text().splitlines()[1:]
    in_tissue = [line.split(",")[0] for line in table if line.split(",")[1] == "1"]
    assert list(a.obs_names) == in_tissue and 40 < len(in_tissue) < len(table)
    lib = a.uns["spatial"]["C2"]
    sf = json.loads((outs / "spatial" / "scalefactors_json.json").read_text())
    from PIL import Image

    for name in ("hires", "lowres"):
        np.testing.assert_array_equal(lib["images"][name], np.asarray(Image.open(outs / "spatial" / f"tissue_{name}_image.png")))
    assert dict(lib["scalefactors"]) == pytest.approx(sf)
    m = a.uns["mmap"]
    assert m["coords_layout"] == "spaceranger-spatial" and m["coords_format"] == "visium"
    assert m["mpp_source"] == "openslide.mpp-x" and m["mpp"] == pytest.approx(SLIDE_MPP)
    qc = m["qc"]
    assert qc["lattice"] == "Visium hexagonal lattice" and qc["lattice_mpp"] == pytest.approx(SLIDE_MPP, rel=0.01)
    assert qc["tissue_mask"] == "Space Ranger's tissue_lowres_image.png" and qc["on_tissue"] > 0.95
    assert a.X.min() >= 0 and m["prediction_floor"] == 0
    # the spatial/ folder and the table inside it read the same
    for coords in (outs / "spatial", outs / "spatial" / "tissue_positions.csv"):
        predict(slide, coords, "-o", tmp_path / "b.h5ad", "--model", tiny_bundle, "--overwrite", "--library-id", "C2")
        b = ad.read_h5ad(tmp_path / "b.h5ad")
        np.testing.assert_array_equal(b.X, a.X)
        assert set(b.uns["spatial"]["C2"]["images"]) == {"hires", "lowres"}


@pytest.mark.parametrize("case, args, fragments", [
    ("swapped", {"swap": True}, ["x and y look swapped"]),
    ("scaled", {"scale": 0.6}, ["the spot lattice gives 4.6", "0.60x the lattice's",
                                "coordinates in the pixels of a downscaled image"]),
    ("wrong-mpp", {}, ["the run's resolution is 5.520 µm per pixel from --mpp, 2.00x the lattice's",
                       "a wrong --mpp (the lattice says 2.7"]),
])
def test_wrong_geometry_is_refused_and_the_flag_overrides(case, args, fragments, c2_slide, tiny_bundle, tmp_path):
    slide, rgb, her2st_xy = c2_slide
    outs = spaceranger_outs(tmp_path / case, rgb, her2st_xy, **args)
    extra = ["--mpp", str(2 * SLIDE_MPP)] if case == "wrong-mpp" else []
    out = tmp_path / "o.h5ad"
    r = predict(slide, outs, "-o", out, "--model", tiny_bundle, *extra, expect=2)
    assert_one_line_error(r, *fragments, "pass --skip-geometry-checks")
    assert not out.exists()
    r = predict(slide, outs, "-o", out, "--model", tiny_bundle, *extra, "--skip-geometry-checks")
    assert fragments[0] in r.stderr and "warning: " in r.stderr
    qc = ad.read_h5ad(out).uns["mmap"]["qc"]
    assert qc["checks"] == "skipped (--skip-geometry-checks)" and fragments[0] in qc["problems"][0]


# -- Visium HD ----------------------------------------------------------------------------
def test_visium_hd_bin_folder(c2_slide, tiny_bundle, tmp_path):
    slide, rgb, her2st_xy = c2_slide
    square = visium_hd_bins(tmp_path / "hd", rgb, her2st_xy)
    out = tmp_path / "hd.h5ad"
    predict(slide, square, "-o", out, "--model", tiny_bundle)
    a = ad.read_h5ad(out)
    assert a.n_obs == 360 and a.obs_names[0] == "s_016um_00000_00000-1"  # bins become obs_names, in file order
    m = a.uns["mmap"]
    assert m["coords_format"] == "visium-hd" and m["coords_layout"] == "visium-hd-bins"
    assert m["qc"]["lattice"] == "Visium HD 16 µm bins" and m["qc"]["lattice_mpp"] == pytest.approx(SLIDE_MPP)
    assert m["qc"]["scalefactors_microns_per_pixel"] == pytest.approx(SLIDE_MPP)
    lib = next(iter(a.uns["spatial"].values()))
    assert lib["scalefactors"]["bin_size_um"] == 16 and lib["images"]["hires"].shape[1] == round(rgb.shape[1] / 4)
    # the whole binned_outputs/ holds two bin sizes: pick one, the message says which exist
    r = predict(slide, tmp_path / "hd" / "binned_outputs", "-o", tmp_path / "x.h5ad", "--model", tiny_bundle, expect=2)
    assert_one_line_error(r, "several sizes; pass one bin folder", "square_008um, square_016um")


def test_visium_hd_without_pyarrow_names_the_extra(c2_slide, tmp_path, monkeypatch):
    from mmap_deploy.errors import UserError
    from mmap_deploy.inputs.layouts import read_spot_input

    slide, rgb, her2st_xy = c2_slide
    square = visium_hd_bins(tmp_path / "hd", rgb, her2st_xy)
    monkeypatch.setitem(sys.modules, "pyarrow.parquet", None)  # as if pyarrow were not installed
    with pytest.raises(UserError, match=r"tissue_positions\.parquet: reading Visium HD .*needs pyarrow: "
                                        r"pip install 'mmap-deploy\[visium-hd\]'"):
        read_spot_input(square)


def test_batch_manifest_takes_folders_and_lattice_gives_the_mpp(real_data, c2_slide, tiny_bundle, tmp_path):
    """A manifest's coords column holds a Space Ranger folder; a her2st JPEG without mpp runs on the lattice's."""
    from PIL import Image

    slide, rgb, her2st_xy = c2_slide
    outs = spaceranger_outs(tmp_path / "run", rgb, her2st_xy)
    # a crop of the real B4 JPEG (no resolution of its own) with its her2st spots
    d = _her2st(real_data, "B4")
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(real_data / "her2st" / "images" / "B4.jpg") as im:
        im.crop((1200, 5500, 3400, 7700)).save(tmp_path / "B4.jpg", quality=90)
    keep = (d["pixel_x"] > 1350) & (d["pixel_x"] < 3250) & (d["pixel_y"] > 5650) & (d["pixel_y"] < 7550)
    rows = [f"{int(x)}\t{int(y)}\t{x}\t{y}\t{px - 1200:.2f}\t{py - 5500:.2f}\t1"
            for x, y, px, py in zip(d["x"][keep], d["y"][keep], d["pixel_x"][keep], d["pixel_y"][keep])]
    (tmp_path / "B4.tsv").write_text("x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\tselected\n" + "\n".join(rows) + "\n")
    (tmp_path / "m.csv").write_text(f"slide,coords,id\n{slide},{outs},c2\nB4.jpg,B4.tsv,b4\n")
    predict("--manifest", tmp_path / "m.csv", "-o", tmp_path / "res", "--model", tiny_bundle)
    assert ad.read_h5ad(tmp_path / "res" / "c2.h5ad").uns["mmap"]["coords_layout"] == "spaceranger-spatial"
    m = ad.read_h5ad(tmp_path / "res" / "b4.h5ad").uns["mmap"]
    assert m["mpp_source"].startswith("spot lattice (ST array (her2st), 200 µm pitch") and 0.67 < m["mpp"] < 0.71


def test_a_thumbnail_error_without_a_message_still_warns(tmp_path):
    """A slide whose thumbnail fails with an empty message: the tissue check is skipped with a warning
    naming the error's type (the warning used to raise IndexError itself)."""
    from mmap_deploy.errors import MMAPWarning
    from mmap_deploy.inputs.layouts import check_spot_geometry, read_spot_input
    from mmap_deploy.inputs.slide import PatchReadError

    spatial = tmp_path / "outs" / "spatial"
    spatial.mkdir(parents=True)
    (spatial / "tissue_positions_list.csv").write_text(
        "".join(f"B{r}{c}-1,1,{r},{2 * c + r % 2},{100 + 86.6 * r:.1f},{100 + 100 * c + 50 * (r % 2):.1f}\n"
                for r in range(4) for c in range(4)))
    (spatial / "scalefactors_json.json").write_text(json.dumps({"tissue_hires_scalef": 0.5}))

    class Slide:  # no Space Ranger lowres image: the mask would come from the thumbnail
        width, height, mpp = 600, 400, 0.5

        def thumbnail(self, max_side):
            raise PatchReadError("")

    with pytest.warns(MMAPWarning) as record:
        images, qc = check_spot_geometry(read_spot_input(tmp_path / "outs"), None, Slide(), 55.0,
                                         spatial / "tissue_positions_list.csv", "--mpp", False)
    warned = [str(w.message) for w in record if issubclass(w.category, MMAPWarning)]
    assert images == {} and "no tissue check: PatchReadError" in warned and qc["checks"] == "done"


# -- folder mistakes: one line each ----------------------------------------------------------
def test_folder_mistakes_and_images_of_another_size(tmp_path):
    from PIL import Image

    from mmap_deploy.errors import UserError
    from mmap_deploy.inputs.layouts import load_images, read_spot_input

    with pytest.raises(UserError, match=r"empty: no spot table found; a Space Ranger folder holds spatial/"):
        read_spot_input((tmp_path / "empty").mkdir() or tmp_path / "empty")
    spatial = tmp_path / "outs" / "spatial"
    spatial.mkdir(parents=True)
    (spatial / "tissue_positions_list.csv").write_text(
        "".join(f"B{r}{c}-1,1,{r},{2 * c + r % 2},{100 + 86.6 * r:.1f},{100 + 100 * c + 50 * (r % 2):.1f}\n"
                for r in range(4) for c in range(4)))
    with pytest.raises(UserError, match=r"spatial: has tissue_positions_list\.csv but no scalefactors_json\.json"):
        read_spot_input(tmp_path / "outs")
    (spatial / "scalefactors_json.json").write_text("{not json")
    with pytest.raises(UserError, match=r"scalefactors_json\.json: cannot read the scale factors"):
        read_spot_input(tmp_path / "outs")
    (spatial / "scalefactors_json.json").write_text(json.dumps({"tissue_hires_scalef": 0.5, "tissue_lowres_scalef": 0.1}))
    Image.new("RGB", (300, 200), "white").save(spatial / "tissue_hires_image.png")  # of a 600 x 400 image
    Image.new("RGB", (61, 40), "white").save(spatial / "tissue_lowres_image.png")
    si = read_spot_input(tmp_path / "outs")
    assert si.layout == "spaceranger-spatial" and si.spots.source_format == "visium-list" and len(si.spots) == 16
    assert si.spots.array_xy[:, 1].tolist() == [r for r in range(4) for _ in range(4)]
    images, warnings = load_images(si, 600, 400)
    assert set(images) == {"hires", "lowres"} and images["hires"].shape == (200, 300, 3) and not warnings
    images, warnings = load_images(si, 900, 600)  # another slide: Space Ranger's images do not fit it
    assert images == {} and "tissue_hires_image.png: 300x200 px, but this slide times tissue_hires_scalef" in warnings[0]
