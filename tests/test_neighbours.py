"""Neighbour smoothing in µm (mmap_deploy.model.neighbours): exact, deterministic, neutral where alone."""

from __future__ import annotations

import numpy as np
import pytest

from mmap_deploy.errors import UserError
from mmap_deploy.model.neighbours import Neighbours, NeighbourSmoothing, smooth_predictions


def _brute_means(xy, values, radius):
    d = np.hypot(*(xy[:, None, :] - xy[None, :, :]).transpose(2, 0, 1))
    adj = (d <= radius) & ~np.eye(len(xy), dtype=bool)
    out = values.astype(np.float64).copy()
    for i in range(len(xy)):
        if adj[i].any():
            out[i] = values[adj[i]].astype(np.float64).mean(axis=0)
    return out


def test_small_example_by_hand():
    # three spots 200 µm apart on a line and one 1 mm away: with R = 250 µm the middle one has two
    # neighbours, the ends one each, the far spot none
    xy = np.array([[0.0, 0.0], [200.0, 0.0], [400.0, 0.0], [1400.0, 0.0]])
    y = np.array([[1.0, 0.0], [2.0, 4.0], [4.0, 8.0], [7.0, 1.0]], dtype=np.float32)
    out = smooth_predictions(y, xy, NeighbourSmoothing(250.0, 0.5))
    expect = np.array([
        [(1 + 0.5 * 2) / 1.5, (0 + 0.5 * 4) / 1.5],
        [(2 + 0.5 * 2.5) / 1.5, (4 + 0.5 * 4) / 1.5],  # neighbours' mean (1 + 4) / 2, (0 + 8) / 2
        [(4 + 0.5 * 2) / 1.5, (8 + 0.5 * 4) / 1.5],
        [7.0, 1.0],  # no neighbour within 250 µm: unchanged
    ], dtype=np.float32)
    np.testing.assert_allclose(out, expect, rtol=1e-6)
    assert out.dtype == np.float32 and out[3].tobytes() == y[3].tobytes()
    np.testing.assert_array_equal(Neighbours(xy, 250.0).counts, [1, 2, 1, 0])


def test_radius_is_inclusive_and_in_the_units_given():
    # the same spots in µm on an ST-like 200 µm lattice: 8 neighbours within 300 µm (diagonals at 283),
    # 4 within 250 µm; scaled to pixels at 0.5 µm/px, the same spots have no neighbour within "300"
    ix, iy = np.meshgrid(np.arange(3), np.arange(3))
    xy_um = np.stack([ix.ravel(), iy.ravel()], axis=1) * 200.0
    assert Neighbours(xy_um, 300.0).counts[4] == 8
    assert Neighbours(xy_um, 250.0).counts[4] == 4
    assert Neighbours(xy_um, 200.0).counts[4] == 4  # d <= R
    assert Neighbours(xy_um / 0.5, 300.0).counts.max() == 0


def test_matches_brute_force_and_repeats_bit_identically():
    rng = np.random.default_rng(0)
    xy = rng.uniform(0, 2000, size=(300, 2))
    y = rng.normal(size=(300, 7)).astype(np.float32)
    nb = Neighbours(xy, 180.0)
    np.testing.assert_allclose(nb.means(y), _brute_means(xy, y, 180.0), rtol=1e-12, atol=1e-12)
    a = smooth_predictions(y, xy, NeighbourSmoothing(180.0, 1.0))
    b = smooth_predictions(y.copy(), xy.copy(), NeighbourSmoothing(180.0, 1.0))
    assert a.tobytes() == b.tobytes()
    # in place, a few genes at a time: the same bytes
    import mmap_deploy.model.neighbours as nbmod

    z = y.copy()
    old = nbmod.BLOCK_BYTES
    try:
        nbmod.BLOCK_BYTES = 8 * 4 * 300 * 2  # blocks of 2 genes
        smooth_predictions(z, xy, NeighbourSmoothing(180.0, 1.0), out=z)
    finally:
        nbmod.BLOCK_BYTES = old
    assert z.tobytes() == a.tobytes()


def test_weight_zero_or_none_is_no_smoothing_and_bad_settings_are_refused():
    y = np.arange(6, dtype=np.float32).reshape(3, 2)
    xy = np.array([[0.0, 0.0], [10.0, 0.0], [20.0, 0.0]])
    assert smooth_predictions(y, xy, None) is y
    assert smooth_predictions(y, xy, NeighbourSmoothing(300.0, 0.0)) is y
    for bad in (NeighbourSmoothing(0.0, 1.0), NeighbourSmoothing(300.0, -1.0), NeighbourSmoothing(float("nan"), 1)):
        with pytest.raises(UserError):
            bad.validate()


# -- the bundle and the runtime ---------------------------------------------------------
def _bundle_with(tiny_bundle, tmp_path, smoothing):
    import json
    import shutil

    from mmap_deploy.model.bundle import MANIFEST_NAME

    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    path = dst / MANIFEST_NAME
    data = json.loads(path.read_text())
    if smoothing is not None:
        data["neighbour_smoothing"] = smoothing
    path.write_text(json.dumps(data))
    return dst


def test_manifest_round_trip_and_old_manifests_have_none(tiny_bundle, tmp_path):
    from mmap_deploy.errors import BundleError
    from mmap_deploy.model.bundle import MANIFEST_NAME, load_bundle, parse_manifest

    old = load_bundle(tiny_bundle).manifest
    assert old.neighbours is None and "neighbour_smoothing" not in old.to_dict()  # written as before
    m = load_bundle(_bundle_with(tiny_bundle, tmp_path, {"radius_um": 300, "weight": 0.5})).manifest
    assert m.neighbours == NeighbourSmoothing(300.0, 0.5)
    again = parse_manifest(m.to_dict(), tmp_path / MANIFEST_NAME)
    assert again.neighbours == m.neighbours and again.to_dict() == m.to_dict()
    for bad, message in (({"radius_um": 0, "weight": 1}, "radius_um' must be a positive"),
                         ({"radius_um": 300, "weight": -1}, "weight' must be 0"),
                         ({"radius_um": 300}, "missing field 'neighbour_smoothing.weight'"),
                         ([300, 1], "'neighbour_smoothing' has the wrong type")):
        with pytest.raises(BundleError, match=message):
            load_bundle(_bundle_with(tiny_bundle, tmp_path / str(len(message)), bad))


def test_export_writes_the_training_configs_smoothing(tmp_path):
    from conftest import make_tiny_model
    from mmap_export.bundle_writer import manifest_for

    model = make_tiny_model(neighbour_smoothing=NeighbourSmoothing(250.0, 1.0))
    assert manifest_for(model, {}).neighbours == NeighbourSmoothing(250.0, 1.0)
    assert manifest_for(make_tiny_model(), {}).neighbours is None


def test_the_pipeline_smooths_in_um_after_fusion(tiny_bundle, tmp_path):
    """predict_slide with a bundle's smoothing = the same run without it, then smooth_predictions in µm."""
    from conftest import write_pyramid

    from mmap_deploy.engines import open_engines
    from mmap_deploy.inputs.coords import Spots
    from mmap_deploy.inputs.slide import open_slide
    from mmap_deploy.model.bundle import load_bundle
    from mmap_deploy.run.pipeline import predict_slide

    rng = np.random.default_rng(0)
    img = rng.integers(60, 220, (1400, 1400, 3), dtype=np.uint8)
    tif = write_pyramid(tmp_path / "s.tif", img, resolution=1e4 / 0.5)  # 0.5 µm per pixel
    ij = np.stack(np.meshgrid(np.arange(5), np.arange(5)), -1).reshape(-1, 2).astype(np.float64)
    spots = Spots(ids=[f"s{i}" for i in range(len(ij))], xy=300.0 + ij * 200.0, source_format="xy", array_xy=ij)
    plain = load_bundle(tiny_bundle)
    smoothed = load_bundle(_bundle_with(tiny_bundle, tmp_path, {"radius_um": 150.0, "weight": 1.0}))
    with open_slide(tif) as slide, open_engines("onnxruntime", plain, threads=1) as engines:
        assert slide.mpp == pytest.approx(0.5)
        a = predict_slide(slide, spots, plain, engines, batch_size=8, read_workers=1)
        b = predict_slide(slide, spots, smoothed, engines, batch_size=8, read_workers=1)
        c = predict_slide(slide, spots, smoothed, engines, batch_size=8, read_workers=1)
    # 100 µm apart: within 150 µm, the 4 nearest neighbours (diagonals at 141 µm too)
    want = smooth_predictions(a.prediction.copy(), spots.xy * 0.5, NeighbourSmoothing(150.0, 1.0))
    np.testing.assert_array_equal(b.prediction, want)
    assert b.prediction.tobytes() == c.prediction.tobytes()  # bit-identical repeat
    assert "neighbours" in b.timings and "neighbours" not in a.timings
    np.testing.assert_array_equal(a.embedding, b.embedding)


def test_lattice_path_is_the_kdtree_definition(monkeypatch):
    """On a lattice (array indices given), the FFT disc sums find the KD-tree's neighbours: tilted square bins,
    radii on and off the lattice's own distances, a hexagonal Visium lattice and a jittered ST one."""
    import mmap_deploy.model.neighbours as nb

    monkeypatch.setattr(nb, "LATTICE_FROM_SPOTS", 10)
    rng = np.random.default_rng(1)
    ii, jj = np.meshgrid(np.arange(40), np.arange(30))
    ij = np.stack([ii.ravel(), jj.ravel()], 1)[rng.random(1200) < 0.8].astype(np.float64)
    th = np.deg2rad(2.0)
    square = (ij * 8.0) @ np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]]).T + 500.0
    hex_ij = np.array([(c, r) for r in range(20) for c in range(r % 2, 40, 2)], np.float64)
    hexagonal = np.stack([hex_ij[:, 0] * 50.0, hex_ij[:, 1] * 50.0 * np.sqrt(3)], 1)
    st_ij = np.stack(np.meshgrid(np.arange(20), np.arange(20)), -1).reshape(-1, 2).astype(np.float64)
    st = st_ij * 200.0 + rng.normal(scale=5.0, size=st_ij.shape)
    for xy, idx, radii in ((square, ij, (40.0, 56.0, 100.0)), (hexagonal, hex_ij, (100.0, 300.0)),
                           (st, st_ij, (250.0, 300.0, 450.0))):
        y = rng.normal(size=(len(xy), 4)).astype(np.float32)
        for r in radii:
            tree = nb.Neighbours(xy, r, method="kdtree")
            # with the table's indices, and with indices read off the positions (a plain x,y table)
            for lattice in (nb.Neighbours(xy, r, idx), nb.Neighbours(xy, r)):
                assert (lattice.method, tree.method) == ("lattice", "kdtree")
                np.testing.assert_array_equal(lattice.counts, tree.counts)
                np.testing.assert_allclose(lattice.means(y), tree.means(y), rtol=0, atol=1e-12)
            assert lattice.means(y).tobytes() == nb.Neighbours(xy, r).means(y).tobytes()  # repeat: same bytes
    # indices that are not a lattice's (duplicates): read off the positions instead
    assert nb.Neighbours(square, 40.0, np.zeros_like(ij)).method == "lattice"
    # spots on no lattice, or too few spots: the KD-tree
    assert nb.Neighbours(rng.uniform(0, 1000, (500, 2)), 40.0).method == "kdtree"
    monkeypatch.setattr(nb, "LATTICE_FROM_SPOTS", 10**6)
    assert nb.Neighbours(square, 40.0, ij).method == "kdtree"
