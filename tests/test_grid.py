"""The spot grid laid over a slide without a spatial assay (mmap_deploy.inputs.grid).

Masks are drawn by hand here: a disc of tissue, a half-plane, two pieces, a
random pattern; the slide is only its size and resolution.
"""

from __future__ import annotations

import json
import math
import re
import time
import warnings

import numpy as np
import pytest

from mmap_deploy.errors import UserError
from mmap_deploy.inputs.coords import Spots
from mmap_deploy.inputs.geometry import ST, VISIUM, fit_lattice, visium_hd_lattice
from mmap_deploy.inputs.grid import (DEFAULT_MAX_SPOTS, DEFAULT_MIN_TISSUE, MIN_BIN_UM, GridSpec, lay_grid,
                                     parse_grid)
from mmap_deploy.options import CLI, caller


def full_slide(spec: GridSpec, size_um: float = 2000.0, mpp: float = 0.5, mask_um: float = 8.0, **kw):
    """A square slide covered in tissue."""
    side = int(round(size_um / mpp))
    scale = mpp / mask_um
    n = int(math.ceil(side * scale))
    return lay_grid(spec, width_px=side, height_px=side, mpp=mpp, mask=np.ones((n, n), bool),
                    scale_x=scale, scale_y=scale, **kw)


def disc_mask(size_um: float, mask_um: float, centres_um, radius_um: float) -> tuple[np.ndarray, np.ndarray]:
    """Mask and labels of discs (label k+1 for centre k), mask pixel = mask_um µm."""
    n = int(math.ceil(size_um / mask_um))
    c = (np.arange(n) + 0.5) * mask_um
    mask = np.zeros((n, n), bool)
    labels = np.zeros((n, n), np.int32)
    for k, (x, y) in enumerate(centres_um):
        inside = (c[None, :] - x) ** 2 + (c[:, None] - y) ** 2 <= radius_um**2
        mask |= inside
        labels[inside] = k + 1
    return mask, labels


def lay_on(spec, mask, size_um, mpp, mask_um, **kw):
    side = int(round(size_um / mpp))
    return lay_grid(spec, width_px=side, height_px=side, mpp=mpp, mask=mask,
                    scale_x=mpp / mask_um, scale_y=mpp / mask_um, **kw)


# -- parse_grid ------------------------------------------------------------------------
@pytest.mark.parametrize("text, kind, name, pitch, spot, shape", [
    ("visium", "visium", "visium", 100.0, 55.0, "circle"),
    (" Visium ", "visium", "visium", 100.0, 55.0, "circle"),
    ("ST", "st", "st", 200.0, 100.0, "circle"),
    ("16um", "bins", "16um", 16.0, 16.0, "square"),
    ("16UM", "bins", "16um", 16.0, 16.0, "square"),
    ("016um", "bins", "16um", 16.0, 16.0, "square"),
    ("16.0um", "bins", "16um", 16.0, 16.0, "square"),
    ("16 µm", "bins", "16um", 16.0, 16.0, "square"),
    ("8um", "bins", "8um", 8.0, 8.0, "square"),
    ("2um", "bins", "2um", 2.0, 2.0, "square"),
    ("32um", "bins", "32um", 32.0, 32.0, "square"),
    ("12.5um", "bins", "12.5um", 12.5, 12.5, "square"),
])
def test_parse_grid(text, kind, name, pitch, spot, shape):
    g = parse_grid(text)
    assert (g.kind, g.name, g.pitch_um, g.spot_um, g.shape) == (kind, name, pitch, spot, shape)
    rec = g.record()
    assert rec["kind"] == kind and rec["name"] == name and None not in rec.values()
    json.dumps(rec)


@pytest.mark.parametrize("text", ["0um", "1um", "1.99um", "-5um", "abc", "", "16", "visium2", "hd", "5000um",
                                  "1e3um", "12.345um", "nanum", "16 mm", "-0um"])
def test_parse_grid_errors(text):
    with pytest.raises(UserError) as e:
        parse_grid(text)
    msg = str(e.value)
    assert "\n" not in msg
    assert repr(text) in msg
    assert "'visium'" in msg and "'st'" in msg and "NUMum" in msg and f"from {MIN_BIN_UM:g} (the minimum)" in msg
    if text in ("1um", "1.99um", "0um"):
        assert "minimum of 2 µm" in msg


# -- lattice geometry and ids ----------------------------------------------------------
def _rows(grid):
    for r in np.unique(grid.array_row):
        sel = np.flatnonzero(grid.array_row == r)
        yield r, sel


def test_visium_indexing():
    mpp = 0.5
    g = full_slide(parse_grid("visium"), mpp=mpp)
    assert ((g.array_row + g.array_col) % 2 == 0).all()
    for r, sel in _rows(g):
        assert np.all(np.diff(g.array_col[sel]) == 2)
        assert np.allclose(np.diff(g.xy[sel, 0]) * mpp, 100.0)
        assert np.allclose(g.xy[sel, 1] * mpp, 50.0 + r * 100.0 * math.sqrt(3) / 2)
    ys = np.unique(np.round(g.xy[:, 1] * mpp, 6))
    assert np.allclose(np.diff(ys), 86.60254, atol=1e-4)
    # every neighbour on the hexagonal lattice is 100 µm away
    d = np.hypot(*(g.xy[:, None, :] - g.xy[None, :, :]).transpose(2, 0, 1)) * mpp
    np.fill_diagonal(d, np.inf)
    assert np.allclose(d.min(axis=1), 100.0)
    assert np.isclose(g.spot_diameter_px, 55.0 / mpp)
    assert g.ids[0] == "visium_00000_00000"
    assert all(re.fullmatch(r"visium_\d{5}_\d{5}", i) for i in g.ids)
    assert list(g.ids) == [f"visium_{r:05d}_{c:05d}" for r, c in zip(g.array_row, g.array_col)]


def test_st_and_bins_indexing():
    mpp = 0.5
    for text, pitch in (("st", 200.0), ("16um", 16.0), ("8um", 8.0), ("12.5um", 12.5)):
        g = full_slide(parse_grid(text), mpp=mpp)
        for r, sel in _rows(g):
            assert np.all(np.diff(g.array_col[sel]) == 1)
            assert np.allclose(np.diff(g.xy[sel, 0]) * mpp, pitch)
            assert np.allclose(g.xy[sel, 1] * mpp, pitch / 2 + r * pitch)
        assert np.all(np.diff(np.unique(g.array_row)) == 1)
        assert g.array_row.min() == 0 and g.array_col.min() == 0
        assert np.allclose(g.xy[0] * mpp, pitch / 2)  # half a pitch in from the slide's corner


def test_visium_hd_barcodes():
    g = full_slide(parse_grid("16um"), size_um=1000.0)
    assert g.ids[0] == "s_016um_00000_00000-1"
    for i, r, c in zip(g.ids, g.array_row, g.array_col):
        assert i == f"s_016um_{r:05d}_{c:05d}-1"
    m = re.fullmatch(r"s_(\d{3})um_(\d{5})_(\d{5})-1", str(g.ids[-1]))
    assert m and (int(m.group(2)), int(m.group(3))) == (g.array_row[-1], g.array_col[-1])
    assert full_slide(parse_grid("2um"), size_um=100.0).ids[1] == "s_002um_00000_00001-1"
    assert full_slide(parse_grid("12.5um"), size_um=200.0).ids[1] == "s_012.5um_00000_00001-1"
    # ids sort row-major, like the spots
    assert list(np.sort(g.ids)) == list(g.ids)


def test_footprints_inside_the_slide():
    mpp = 0.5
    for text in ("visium", "st", "16um"):
        spec = parse_grid(text)
        g = full_slide(spec, size_um=1990.0, mpp=mpp)
        r = spec.spot_um / 2 / mpp
        side = round(1990.0 / mpp)
        assert (g.xy - r >= -1e-6).all() and (g.xy + r <= side + 1e-6).all()
    # bins tile the slide from its corner: a 2000 µm slide holds 125 x 125 16 µm bins
    assert len(full_slide(parse_grid("16um"), size_um=2000.0)) == 125 * 125


@pytest.mark.parametrize("text, lattice", [("visium", VISIUM), ("st", ST), ("16um", visium_hd_lattice(16)),
                                           ("8um", visium_hd_lattice(8))])
@pytest.mark.parametrize("mpp", [0.2631, 0.5, 0.7])
def test_fit_lattice_recovers_mpp(text, lattice, mpp):
    spec = parse_grid(text)
    g = full_slide(spec, size_um=3000.0, mpp=mpp)
    spots = g.to_spots()
    fit = fit_lattice(spots.xy, spots.array_xy, lattice)
    assert fit is not None and abs(fit.mpp / mpp - 1) < 0.005
    assert not fit.transposed
    fit2 = fit_lattice(spots.xy, spots.array_xy, spec.lattice)
    assert abs(fit2.mpp / mpp - 1) < 0.005


@pytest.mark.parametrize("text, n_neighs, expected", [("visium", 6, 6), ("st", 4, 4), ("16um", 4, 4)])
def test_squidpy_reads_the_grid(text, n_neighs, expected):
    import anndata as ad
    import squidpy as sq
    spec = parse_grid(text)
    g = full_slide(spec, size_um=40 * spec.pitch_um, mpp=0.5)
    adata = ad.AnnData(np.zeros((len(g), 1), np.float32))
    adata.obs_names = list(g.ids)
    adata.obsm["spatial"] = g.xy
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # squidpy 1.8 deprecates the generic entry point
        sq.gr.spatial_neighbors(adata, coord_type="grid", n_neighs=n_neighs)
    degree = np.asarray((adata.obsp["spatial_connectivities"] > 0).sum(axis=1)).ravel()
    lo, hi = g.xy.min(axis=0), g.xy.max(axis=0)
    margin = 1.5 * spec.pitch_um / 0.5
    interior = ((g.xy > lo + margin) & (g.xy < hi - margin)).all(axis=1)
    assert interior.sum() > 50
    assert (degree[interior] == expected).all()


# -- the same tissue, the same spots ---------------------------------------------------
def test_same_slide_same_spots():
    mask, labels = disc_mask(8000.0, 10.0, [(4000.0, 4000.0)], 3000.0)
    for text in ("visium", "16um"):
        a = lay_on(parse_grid(text), mask, 8000.0, 0.5, 10.0, labels=labels)
        b = lay_on(parse_grid(text), mask.copy(), 8000.0, 0.5, 10.0, labels=labels.copy())
        assert np.array_equal(a.ids, b.ids) and np.array_equal(a.xy, b.xy)
        assert np.array_equal(a.tissue_fraction, b.tissue_fraction) and np.array_equal(a.tissue_id, b.tissue_id)


@pytest.mark.parametrize("text", ["visium", "st", "16um", "32um"])
def test_resolution_does_not_change_the_grid(text):
    spec = parse_grid(text)
    size, centre, radius = 8000.0, (4000.0, 4000.0), 3000.0
    grids = []
    for mpp, mask_um in ((0.25, 8.0), (0.7, 11.2)):  # the tissue module's thumbnails differ too
        mask, _ = disc_mask(size, mask_um, [centre], radius)
        grids.append(lay_on(spec, mask, size, mpp, mask_um))
    a, b = grids
    assert abs(len(a) / len(b) - 1) < 0.03
    expected = math.pi * radius**2 / spec.area_per_spot_um2
    assert abs(len(a) / expected - 1) < 0.03
    # the lattice in µm is the slide's: shared ids sit at the same place in µm
    common, ia, ib = np.intersect1d(a.ids, b.ids, return_indices=True)
    assert len(common) > 0.97 * min(len(a), len(b))
    assert np.allclose(a.xy[ia] * 0.25, b.xy[ib] * 0.7)


# -- tissue share ----------------------------------------------------------------------
@pytest.mark.parametrize("mask_um", [1.0, 8.0])
def test_min_tissue_on_a_half_plane_bins(mask_um):
    spec, mpp, size = parse_grid("16um"), 0.5, 800.0
    n = int(size / mask_um)
    mask = np.zeros((n, n), bool)
    mask[:, int(104 / mask_um):] = True  # tissue from x = 104 µm: bin column 6 ([96, 112) µm) is half tissue
    g = lay_on(spec, mask, size, mpp, mask_um, min_tissue=0.5)
    assert g.array_col.min() == 6
    assert np.allclose(g.tissue_fraction[g.array_col == 6], 0.5)
    assert np.allclose(g.tissue_fraction[g.array_col > 6], 1.0)
    assert lay_on(spec, mask, size, mpp, mask_um, min_tissue=0.51).array_col.min() == 7
    assert DEFAULT_MIN_TISSUE == 0.5
    assert lay_on(spec, mask, size, mpp, mask_um).array_col.min() == 6


@pytest.mark.parametrize("text", ["visium", "st"])
def test_min_tissue_on_a_half_plane_discs(text):
    spec, mpp, size, mask_um = parse_grid(text), 0.5, 3000.0, 1.0
    g_all = full_slide(spec, size_um=size, mpp=mpp)
    r = spec.spot_um / 2
    xs = np.unique(np.round(g_all.xy[:, 0] * mpp, 6))
    xc = float(xs[np.argmin(abs(xs - 1000.0))])  # one column of spot centres, in µm
    x0 = xc + 0.3 * r  # a chord 0.3 r right of their centres
    n = int(size / mask_um)
    mask = np.zeros((n, n), bool)
    mask[:, int(round(x0 / mask_um)):] = True
    cut = np.isclose(g_all.xy[:, 0] * mpp, xc)
    assert cut.sum() > 5
    d = 0.3
    share = (math.acos(d) - d * math.sqrt(1 - d * d)) / math.pi  # the disc's part right of the chord
    g = lay_on(spec, mask, size, mpp, mask_um, min_tissue=0.3)
    on_cut = np.isclose(g.xy[:, 0] * mpp, xc)
    assert on_cut.sum() == cut.sum()
    assert np.allclose(g.tissue_fraction[on_cut], share, atol=0.01)
    assert (g.xy[:, 0] * mpp >= xc - 1e-6).all()
    g = lay_on(spec, mask, size, mpp, mask_um, min_tissue=0.5)
    assert (g.xy[:, 0] * mpp > xc + 1e-6).all()


@pytest.mark.parametrize("mask_um", [0.7, 1.0, 3.0, 4.0, 5.3])
def test_bin_share_is_the_exact_area(mask_um):
    """Bins of 2 µm at masks of 0.7-5.3 µm per pixel: the share is the area-weighted mean of the mask."""
    spec, mpp, size = parse_grid("2um"), 0.25, 120.0
    n = int(math.ceil(size / mask_um))
    rng = np.random.default_rng(1)
    mask = rng.random((n, n)) < 0.6
    g = lay_on(spec, mask, size, mpp, mask_um, min_tissue=1e-6)
    edges = np.arange(n + 1) * mask_um

    def overlap(a, b):  # (k,) lengths of [a, b] on each mask pixel
        return np.clip(np.minimum(b, edges[1:]) - np.maximum(a, edges[:-1]), 0, None)

    expected = {}
    for r in range(int(size / 2)):
        wy = overlap(2.0 * r, 2.0 * r + 2)
        for c in range(int(size / 2)):
            wx = overlap(2.0 * c, 2.0 * c + 2)
            expected[(r, c)] = float(wy @ mask @ wx) / 4.0
    got = {(r, c): f for r, c, f in zip(g.array_row.tolist(), g.array_col.tolist(), g.tissue_fraction.tolist())}
    assert set(got) == {k for k, v in expected.items() if v >= 1e-6}
    assert np.allclose([got[k] for k in got], [expected[k] for k in got], atol=1e-5)


def test_tissue_id_follows_the_pieces():
    size, mask_um = 6000.0, 10.0
    centres = [(1500.0, 3000.0), (4500.0, 3000.0)]
    mask, labels = disc_mask(size, mask_um, centres, 1200.0)
    for text in ("visium", "16um"):
        g = lay_on(parse_grid(text), mask, size, 0.5, mask_um, labels=labels)
        x_um = g.xy[:, 0] * 0.5
        assert set(np.unique(g.tissue_id)) == {1, 2}
        assert (g.tissue_id[x_um < 3000] == 1).all() and (g.tissue_id[x_um > 3000] == 2).all()
    # labels that cover only part of the tissue: spots off every label get 0; without labels, 1
    partial = labels.copy()
    partial[partial == 2] = 0
    g = lay_on(parse_grid("visium"), mask, size, 0.5, mask_um, labels=partial)
    assert set(np.unique(g.tissue_id)) == {0, 1}
    g = lay_on(parse_grid("visium"), mask, size, 0.5, mask_um)
    assert (g.tissue_id == 1).all()


def test_tissue_id_majority_at_a_border():
    """A bin on the border of two touching pieces takes the label of most of its tissue."""
    spec, mpp, size, mask_um = parse_grid("16um"), 0.5, 320.0, 1.0
    n = int(size / mask_um)
    mask = np.ones((n, n), bool)
    labels = np.ones((n, n), np.int32)
    labels[:, 100:] = 2  # bin column 6 covers x 96-112 µm: a quarter of it is piece 1
    g = lay_on(spec, mask, size, mpp, mask_um, labels=labels)
    assert (g.tissue_id[g.array_col <= 5] == 1).all()
    assert (g.tissue_id[g.array_col >= 6] == 2).all()


# -- limits ----------------------------------------------------------------------------
def test_max_spots_message():
    mask, _ = disc_mask(8000.0, 10.0, [(4000.0, 4000.0)], 3000.0)
    spec = parse_grid("16um")
    exact = len(lay_on(spec, mask, 8000.0, 0.5, 10.0))
    area = mask.sum() * 100.0 / 1e6
    with pytest.raises(UserError) as e, caller(CLI):  # the estimate alone is far over
        lay_on(spec, mask, 8000.0, 0.5, 10.0, max_spots=1000)
    msg = str(e.value)
    assert "\n" not in msg and "about " in msg and f"{area:.2f} mm²" in msg and "--max-spots 1000" in msg
    assert "--grid" in msg and "--tissue-mask" in msg and "(e.g. 256um)" in msg
    with pytest.raises(UserError) as e:  # from Python, the parameters
        lay_on(spec, mask, 8000.0, 0.5, 10.0, max_spots=1000)
    assert "max_spots=1000" in str(e.value) and "tissue_mask=" in str(e.value) and "--" not in str(e.value)
    with pytest.raises(UserError) as e:  # the estimate passes; the exact count does not
        lay_on(spec, mask, 8000.0, 0.5, 10.0, max_spots=exact - 1)
    msg = str(e.value)
    assert f"{exact} spots" in msg and "about" not in msg and f"{area:.2f} mm²" in msg
    assert len(lay_on(spec, mask, 8000.0, 0.5, 10.0, max_spots=exact)) == exact
    assert DEFAULT_MAX_SPOTS == 2_000_000


def test_bad_arguments_and_no_tissue():
    spec = parse_grid("16um")
    mask = np.zeros((100, 100), bool)
    with pytest.raises(UserError, match="no spot"):
        lay_on(spec, mask, 1000.0, 0.5, 10.0)
    mask[40:60, 40:60] = True
    for kw in ({"min_tissue": 0.0}, {"min_tissue": 1.5}, {"max_spots": 0}):
        with pytest.raises(UserError):
            lay_on(spec, mask, 1000.0, 0.5, 10.0, **kw)
    with pytest.raises(UserError):
        lay_on(spec, mask, 1000.0, -1.0, 10.0)


def test_record_and_spots():
    mask, labels = disc_mask(3000.0, 10.0, [(1500.0, 1500.0)], 1000.0)
    g = lay_on(parse_grid("visium"), mask, 3000.0, 0.5, 10.0, labels=labels)
    rec = g.record()
    json.dumps(rec)
    assert None not in rec.values()
    assert rec["kind"] == "visium" and rec["name"] == "visium" and rec["count"] == len(g)
    assert rec["pitch_um"] == 100.0 and rec["spot_um"] == 55.0 and rec["origin_um"] == [50.0, 50.0]
    assert rec["min_tissue"] == 0.5 and rec["tissue_area_mm2"] > 3.0
    assert g.xy.dtype == np.float64 and g.array_row.dtype == np.int64 and g.array_col.dtype == np.int64
    assert g.tissue_fraction.dtype == np.float32 and g.tissue_id.dtype == np.int32
    s = g.to_spots()
    assert isinstance(s, Spots) and len(s) == len(g) and s.source_format == "grid-visium"
    assert np.array_equal(s.array_xy, np.stack([g.array_col, g.array_row], axis=1))
    assert s.xy is g.xy and len(set(s.ids.tolist())) == len(g)


def test_a_million_bins():
    """8 µm bins over 8 mm x 8 mm of tissue: exactly 1 000 000 bins, laid in seconds."""
    mpp, mask_um, size = 0.5, 8.0, 10000.0
    n = int(size / mask_um)
    mask = np.zeros((n, n), bool)
    mask[125:1125, 125:1125] = True
    labels = mask.astype(np.int32)
    t0 = time.perf_counter()
    g = lay_on(parse_grid("8um"), mask, size, mpp, mask_um, labels=labels)
    elapsed = time.perf_counter() - t0
    print(f"1 000 000 bins laid in {elapsed:.2f} s")
    assert len(g) == 1_000_000
    assert g.array_row.min() == 125 and g.array_row.max() == 1124
    assert (g.tissue_fraction == 1.0).all() and (g.tissue_id == 1).all()
    assert g.ids[0] == "s_008um_00125_00125-1" and g.ids[-1] == "s_008um_01124_01124-1"
    assert np.all(np.diff(g.array_row * 10_000 + g.array_col) > 0)  # row-major


@pytest.mark.parametrize("text", ["visium", "st", "8um"])
def test_strips_do_not_change_the_result(monkeypatch, text):
    """Laying the grid strip by strip (a small STRIP_PIXELS) gives the same spots as in one strip."""
    import mmap_deploy.inputs.grid as grid_module

    centres = [(1500.0, 1500.0), (3500.0, 2500.0)]
    mask, labels = disc_mask(5000.0, 7.0, centres, 1100.0)
    whole = lay_on(parse_grid(text), mask, 5000.0, 0.5, 7.0, labels=labels)
    monkeypatch.setattr(grid_module, "STRIP_PIXELS", 1000)
    strips = lay_on(parse_grid(text), mask, 5000.0, 0.5, 7.0, labels=labels)
    assert np.array_equal(whole.ids, strips.ids) and np.array_equal(whole.xy, strips.xy)
    assert np.array_equal(whole.tissue_fraction, strips.tissue_fraction)
    assert np.array_equal(whole.tissue_id, strips.tissue_id)
