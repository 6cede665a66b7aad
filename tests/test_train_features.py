"""The feature cache: round trip, the published names, checks, and computing it from a checkpoint."""

from __future__ import annotations

import numpy as np
import pytest
from mmap_train.features import SectionFeatures, cached_sections, read_cache, read_section, write_section

from mmap_deploy.errors import UserError


def _section(name="S1", n=5, d=8, g=3, seed=0):
    rng = np.random.default_rng(seed)
    return SectionFeatures(name, [f"{i}x{i + 1}" for i in range(n)], rng.normal(size=(n, d)).astype(np.float32),
                           rng.normal(size=(n, g)).astype(np.float32))


def test_round_trip(tmp_path):
    a, b = _section("A1"), _section("B2", n=7, seed=1)
    write_section(tmp_path, a)
    write_section(tmp_path, b)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "A1_f.npy", "A1_spots.txt", "A1_y1.npy", "B2_f.npy", "B2_spots.txt", "B2_y1.npy"]
    assert cached_sections(tmp_path) == ["A1", "B2"]
    back = read_cache(tmp_path)
    for s in (a, b):
        r = back[s.section]
        assert r.spot_ids == s.spot_ids
        np.testing.assert_array_equal(r.f, s.f)
        np.testing.assert_array_equal(r.y1, s.y1)
        assert r.f.dtype == np.float32


def test_published_names_are_read(tmp_path):
    s = _section()
    np.save(tmp_path / "S1_clss.npy", s.f)
    np.save(tmp_path / "S1_outs.npy", s.y1)
    (tmp_path / "S1_spots.txt").write_text("\n".join(s.spot_ids) + "\n")
    np.testing.assert_array_equal(read_section(tmp_path, "S1").f, s.f)


def test_inconsistent_cache_is_a_user_error(tmp_path):
    s = _section()
    write_section(tmp_path, s)
    (tmp_path / "S1_spots.txt").write_text("\n".join(s.spot_ids[:-1]) + "\n")
    with pytest.raises(UserError, match="one row per spot"):
        read_section(tmp_path, "S1")
    with pytest.raises(UserError, match="not in the cache"):
        read_cache(tmp_path, ["Z9"])
    with pytest.raises(UserError, match="not found"):
        read_cache(tmp_path / "absent")


def test_published_cache_reads(real_data):
    c = read_cache(real_data / "mmap_features" / "train", ["B2"])
    assert c["B2"].f.shape == (76, 1024) and c["B2"].y1.shape == (76, 785)
    assert c["B2"].spot_ids[0] == "10x17"


def test_compute_from_a_checkpoint(tmp_path, tiny_checkpoint):
    """The cache of the demo sample equals the encoder's output on centre-crop views of the same patches."""
    import torch
    from mmap_train.datasets import Section, read_section_patches
    from mmap_train.features import compute_features
    from mmap_train.model import load_checkpoint

    from mmap_deploy.demo import sample_paths
    from mmap_deploy.inputs.coords import read_coords
    from mmap_deploy.model.preprocess import make_views, normalise

    image, coords, mpp = sample_paths()
    sec = Section("B4crop", counts=coords, slide=image, coords=coords, mpp=mpp)
    assert compute_features(tiny_checkpoint, [sec], tmp_path) == ["B4crop"]
    got = read_section(tmp_path, "B4crop")
    spots = read_coords(coords)
    assert got.spot_ids == spots.ids and len(got.spot_ids) == 120
    model, _ = load_checkpoint(tiny_checkpoint)
    spec = model.config.view_spec
    patches = read_section_patches(sec, spots.xy[[0, 77]], spec)
    views = np.stack([make_views(p, spec) for p in patches])
    with torch.no_grad():
        f, y1, _ = model.eval().encoder(torch.from_numpy(normalise(views, spec)))
    np.testing.assert_allclose(got.f[[0, 77]], f.numpy(), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(got.y1[[0, 77]], y1.numpy(), rtol=1e-4, atol=1e-5)
    # a rerun skips the finished section
    assert compute_features(tiny_checkpoint, [sec], tmp_path) == []
