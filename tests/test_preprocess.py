"""Patch geometry, views and normalisation (numpy, shared by training and runtime)."""

import numpy as np
import pytest

from mmap_deploy.model.preprocess import ViewSpec, make_views, normalise, patch_region, resize, resize_weights


def test_geometry_is_physical():
    spec = ViewSpec(patch_um=112.0, mpp=0.5, input_size=112)
    assert spec.patch_px == 224
    assert [spec.crop_px(v) for v in range(3)] == [224, 112, 56]
    assert spec.centre_offsets() == [(0, 0), (56, 56), (84, 84)]
    # the same physical patch on a slide scanned at 0.25 µm/px covers twice the pixels
    assert patch_region(1000, 2000, 0.25, spec) == (776, 1776, 448)
    assert patch_region(1000, 2000, 0.5, spec) == (888, 1888, 224)


def test_resize_weights_rows_sum_to_one_and_identity():
    for n_in, n_out in [(224, 112), (56, 112), (112, 112), (300, 7), (7, 300)]:
        w = resize_weights(n_in, n_out)
        assert w.shape == (n_out, n_in)
        np.testing.assert_allclose(w.sum(axis=1), 1.0, rtol=1e-6)
    np.testing.assert_array_equal(resize_weights(9, 9), np.eye(9, dtype=np.float32))


def test_resize_keeps_constant_and_linear_images():
    flat = np.full((64, 48, 3), 137, np.uint8)
    np.testing.assert_array_equal(resize(flat, 20, 30), np.full((20, 30, 3), 137, np.uint8))
    ramp = np.repeat(np.repeat(np.arange(0, 256, 2, dtype=np.uint8)[None, :, None], 16, 0), 3, 2)  # (16,128,3)
    up = resize(ramp, 16, 256)
    # interior of an upsampled linear ramp stays linear (edges are clamped)
    diffs = np.diff(up[0, 8:-8, 0].astype(int))
    assert set(np.unique(diffs)) <= {0, 1, 2}
    assert up[0, -1, 0] >= 250 and up[0, 0, 0] <= 2


def test_views_are_centred_crops():
    spec = ViewSpec(patch_um=128 * 0.5, mpp=0.5, input_size=32)
    p = spec.patch_px  # 128
    patch = np.zeros((p, p, 3), np.uint8)
    patch[:, :, 2] = 255  # blue everywhere
    c = p // 2
    patch[c - 16 : c + 16, c - 16 : c + 16] = (255, 0, 0)  # red centre quarter (1/4 side)
    views = make_views(patch, spec)
    assert views.shape == (3, 32, 32, 3) and views.dtype == np.uint8
    np.testing.assert_array_equal(views[2], np.broadcast_to(np.array([255, 0, 0], np.uint8), (32, 32, 3)))
    # the whole-patch view shows the red centre only in its middle
    assert views[0][16, 16, 0] == 255 and views[0][0, 0, 0] == 0
    assert views[1][0, 0, 2] == 255 and views[1][16, 16, 0] == 255


def test_random_offsets_stay_inside_and_are_seeded():
    spec = ViewSpec(patch_um=100, mpp=1.0, input_size=16)
    a = spec.random_offsets(np.random.default_rng(3))
    b = spec.random_offsets(np.random.default_rng(3))
    assert a == b
    for v, (r, c) in enumerate(a):
        assert 0 <= r <= spec.patch_px - spec.crop_px(v)
        assert 0 <= c <= spec.patch_px - spec.crop_px(v)


def test_make_views_rejects_wrong_patch():
    spec = ViewSpec(input_size=32)
    with pytest.raises(ValueError, match="patch must be"):
        make_views(np.zeros((10, 10, 3), np.uint8), spec)


def test_normalise_matches_definition():
    spec = ViewSpec(input_size=4)
    views = np.random.default_rng(0).integers(0, 256, (2, 3, 4, 4, 3), dtype=np.uint8)
    out = normalise(views, spec)
    assert out.shape == (2, 3, 3, 4, 4) and out.dtype == np.float32
    expect = (views[0, 1, 2, 3, 1] / 255.0 - spec.mean[1]) / spec.std[1]
    assert out[0, 1, 1, 2, 3] == pytest.approx(expect, rel=1e-6)


def test_views_are_deterministic():
    spec = ViewSpec(input_size=112)
    patch = np.random.default_rng(1).integers(0, 256, (spec.patch_px, spec.patch_px, 3), dtype=np.uint8)
    np.testing.assert_array_equal(make_views(patch, spec), make_views(patch.copy(), spec))
