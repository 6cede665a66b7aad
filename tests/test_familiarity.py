"""Familiarity: the training summary, its place in the bundle's hash chain, the runtime's column and line,
and the train -> export path."""

from __future__ import annotations

import hashlib
import shutil
import warnings

import anndata as ad
import numpy as np
import pytest
from conftest import TINY_GENES, make_tiny_model, run_cli

from mmap_deploy.errors import BundleError, UserError
from mmap_deploy.model import familiarity as fam
from mmap_deploy.model.bundle import default_bundle_path, load_bundle


def _mixture(n: int, dim: int, seed: int, n_clusters: int = 8) -> np.ndarray:
    """Spots from a fixed mixture of clusters (the same centres for every seed), off the origin as f is."""
    centres = np.random.default_rng(123).normal(size=(n_clusters, dim)) + 2.0
    rng = np.random.default_rng(seed)
    return (centres[rng.integers(n_clusters, size=n)] + 0.3 * rng.normal(size=(n, dim))).astype(np.float32)


def test_familiarity_is_a_calibrated_share_in_0_1_and_monotone_in_similarity():
    train = _mixture(1200, 16, seed=0)
    sections = np.array([f"S{i % 10}" for i in range(len(train))])
    s = fam.fit_summary(train, sections)
    assert s.meta["calibration_held_out"] == "section" and s.meta["n_centroids"] == 60
    fresh = _mixture(3000, 16, seed=1)
    v = s.familiarity(fresh)
    assert v.dtype == np.float32 and v.shape == (3000,) and v.min() >= 0 and v.max() <= 1
    # spots like the training ones: half are below the median held-out spot, about 5% below the 5th percentile
    assert 0.4 < np.median(v) < 0.6
    assert 0.02 < np.mean(v < fam.UNFAMILIAR_BELOW) < 0.1
    sim = s.similarity(fresh)
    order = np.argsort(sim, kind="stable")
    assert np.all(np.diff(v[order].astype(np.float64)) >= 0)  # monotone in the similarity
    assert v[np.argmax(sim)] > v[np.argmin(sim)]
    # spots in directions the training never took: unfamiliar, every one
    far = np.random.default_rng(2).normal(size=(200, 16)).astype(np.float32) * 5 - 2.0
    assert np.all(s.familiarity(far) < fam.UNFAMILIAR_BELOW)
    # the training spots themselves are more familiar than fresh ones (the centroids were fitted on them)
    assert np.median(s.familiarity(train)) > np.median(v)


def test_calibration_is_the_empirical_share_with_flat_stretches_in_the_middle():
    q = np.array([0.1, 0.2, 0.2, 0.2, 0.6])  # levels 0, .25, .5, .75, 1: a flat stretch at 0.2
    got = fam.calibrate(np.array([0.0, 0.1, 0.15, 0.2, 0.4, 0.6, 0.9]), q)
    np.testing.assert_allclose(got, [0.0, 0.0, 0.25, 0.5, 0.75, 1.0, 1.0], atol=1e-7)


def test_calibration_folds_hold_out_patients_then_sections_then_spots():
    n = 40
    patients = np.array([f"P{i % 6}" for i in range(n)])
    folds, kind, units = fam.calibration_folds({"patient": patients, "section": patients}, n)
    assert (kind, units) == ("patient", 6)
    for p in set(patients):  # a patient's spots share one fold
        assert len(set(folds[patients == p])) == 1
    assert sorted(set(folds)) == [0, 1, 2, 3, 4]
    few = np.array([f"P{i % 2}" for i in range(n)])
    sections = np.array([f"S{i % 7}" for i in range(n)])
    assert fam.calibration_folds({"patient": few, "section": sections}, n)[1:] == ("section", 7)
    folds, kind, _ = fam.calibration_folds({"patient": few, "section": few}, n)
    assert kind == "spot" and np.bincount(folds).tolist() == [8] * 5


def test_k_is_capped_and_the_file_stays_small(tmp_path):
    assert (fam.n_centroids(10**6), fam.n_centroids(100), fam.n_centroids(10)) == (256, 16, 10)
    s = fam.fit_summary(_mixture(6000, 8, seed=0), [f"S{i % 5}" for i in range(6000)])
    assert s.centroids.shape == (256, 8)
    # the largest summary: 256 centroids of a 1024-d model (UNI's width)
    c = fam.unit_rows(np.random.default_rng(0).normal(size=(fam.K_MAX, 1024)))
    big = fam.FamiliaritySummary(c, np.linspace(0.1, 0.9, fam.N_QUANTILES), dict(s.meta, embed_dim=1024))
    size = fam.write_summary(tmp_path / "big.npz", big).stat().st_size
    assert 256 * 1024 * 4 < size < 1.1e6  # 1 MB: well inside the "few MB" a bundle may grow by


def test_same_training_spots_give_the_same_file_byte_for_byte(tmp_path):
    f = _mixture(400, 12, seed=3)
    sections = [f"S{i % 6}" for i in range(400)]
    a = fam.write_summary(tmp_path / "a.npz", fam.fit_summary(f, sections))
    b = fam.write_summary(tmp_path / "b.npz", fam.fit_summary(f, sections))
    assert a.read_bytes() == b.read_bytes()
    r = fam.read_summary(a, 12)
    fresh = _mixture(50, 12, seed=4)
    assert r.familiarity(fresh).tobytes() == fam.fit_summary(f, sections).familiarity(fresh).tobytes()


@pytest.mark.parametrize("damage", ["not a zip", "wrong width", "not ours", "decreasing quantiles"])
def test_a_bad_summary_file_is_one_line(tmp_path, damage):
    path = tmp_path / "familiarity.npz"
    good = fam.fit_summary(_mixture(100, 12, seed=0), [f"S{i % 5}" for i in range(100)])
    if damage == "not a zip":
        path.write_bytes(b"PK\x03\x04 truncated")
    elif damage == "wrong width":
        fam.write_summary(path, good)
    elif damage == "not ours":
        fam.write_summary(path, fam.FamiliaritySummary(good.centroids, good.quantiles, {"format": "other"}))
    else:
        fam.write_summary(path, fam.FamiliaritySummary(good.centroids, good.quantiles[::-1].copy(), good.meta))
    with pytest.raises(BundleError) as e:
        fam.read_summary(path, 96)
    assert str(path) in str(e.value) and "\n" not in str(e.value)


# -- the bundle ------------------------------------------------------------------------
def _export_cli(*args):
    from click.testing import CliRunner
    from mmap_export.cli import main

    return CliRunner().invoke(main, [str(a) for a in args])


@pytest.fixture()
def summary_bundle(tiny_bundle, tmp_path):
    """A copy of the tiny bundle with a training summary added by `mmap-export -o B --familiarity FILE`."""
    b = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, b)
    src = fam.write_summary(tmp_path / "summary.npz",
                            fam.fit_summary(_mixture(300, 96, seed=0), [f"S{i % 5}" for i in range(300)]))
    r = _export_cli("-o", b, "--familiarity", src)
    assert r.exit_code == 0, r.output
    assert "familiarity: familiarity.npz" in r.output
    return b, src


def test_export_adds_the_summary_to_the_manifests_hash_chain(summary_bundle):
    b, src = summary_bundle
    bundle = load_bundle(b)
    sf = bundle.manifest.familiarity
    assert sf.path == "familiarity.npz" and sf.about["method"] == fam.METHOD
    assert sf.sha256 == hashlib.sha256((b / "familiarity.npz").read_bytes()).hexdigest()
    assert (b / "familiarity.npz").read_bytes() == src.read_bytes()
    s = bundle.familiarity()
    assert bundle.hashed == ["familiarity.npz"] and bundle.familiarity() is s  # hashed and read once
    np.testing.assert_array_equal(s.centroids, fam.read_summary(src).centroids)


def test_a_bundle_without_a_summary_has_none(tiny_bundle):
    bundle = load_bundle(tiny_bundle)
    assert bundle.manifest.familiarity is None and bundle.familiarity() is None
    import json

    assert "familiarity" not in json.loads((tiny_bundle / "manifest.json").read_text())


def test_a_tampered_summary_is_refused_in_one_line_before_any_output(summary_bundle, tmp_path):
    from mmap_deploy.demo import sample_paths

    b, _ = summary_bundle
    data = bytearray((b / "familiarity.npz").read_bytes())
    data[-40] ^= 0xFF
    (b / "familiarity.npz").write_bytes(bytes(data))
    img, spots, mpp = sample_paths()
    out = tmp_path / "out.h5ad"
    r = run_cli(img, spots, "--mpp", mpp, "-o", out, "--model", b, expect=2)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "familiarity.npz" in errors[0] and "does not match the manifest" in errors[0]
    assert not out.exists()
    (b / "familiarity.npz").unlink()
    with pytest.raises(BundleError, match="lists familiarity.npz but"):
        load_bundle(b)


def test_a_summary_of_another_width_is_refused_by_export(tiny_bundle, tmp_path):
    b = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, b)
    src = fam.write_summary(tmp_path / "s.npz", fam.fit_summary(_mixture(100, 12, seed=0),
                                                                 [f"S{i % 5}" for i in range(100)]))
    r = _export_cli("-o", b, "--familiarity", src)
    assert r.exit_code == 2 and "12-d but the model's embeddings are 96-d" in r.output
    assert load_bundle(b).manifest.familiarity is None


# -- the runtime -------------------------------------------------------------------------
def _run(bundle, img, spots, mpp, out, *extra):
    r = run_cli(img, spots, "--mpp", mpp, "-o", out, "--model", bundle, *extra, expect=0)
    return r, ad.read_h5ad(out)


def test_an_old_bundle_runs_with_one_note_and_no_column(tiny_bundle, tmp_path):
    from mmap_deploy.demo import sample_paths

    img, spots, mpp = sample_paths()
    r, a = _run(tiny_bundle, img, spots, mpp, tmp_path / "old.h5ad")
    notes = [ln for ln in r.stderr.splitlines() if "no training summary" in ln]
    assert len(notes) == 1 and notes[0].startswith("note: ")
    assert "mmap_familiarity" not in a.obs and "familiarity" not in a.uns["mmap"]["qc"]
    assert a.n_obs == 120


@pytest.mark.parametrize("as_warning", [True, False])
def test_the_slide_line_fires_on_unfamiliar_tissue_and_not_on_familiar(tmp_path, monkeypatch, as_warning):
    """The demo bundle's own summary: its training section B4 is familiar; the same crop colour-inverted is not."""
    from PIL import Image

    from mmap_deploy.demo import sample_paths

    monkeypatch.setattr(fam, "SLIDE_WARNING", as_warning)
    img, spots, mpp = sample_paths()
    bundle = default_bundle_path()
    r, a = _run(bundle, img, spots, mpp, tmp_path / "b4.h5ad")
    v = a.obs["mmap_familiarity"].to_numpy()
    assert v.dtype == np.float32 and 0 <= v.min() and v.max() <= 1 and np.median(v) > 0.5
    rec = a.uns["mmap"]["qc"]["familiarity"]
    assert rec["far_from_training"] is False or rec["far_from_training"] == 0
    assert not [ln for ln in r.stderr.splitlines() if "unfamiliar" in ln]
    assert rec["n_spots"] == 120 and rec["share_unfamiliar"] == pytest.approx(np.mean(v < 0.05))
    inverted = tmp_path / "inverted.jpg"
    Image.fromarray(255 - np.asarray(Image.open(img).convert("RGB"))).save(inverted, quality=95)
    r2, a2 = _run(bundle, inverted, spots, mpp, tmp_path / "inv.h5ad", "--skip-geometry-checks")
    lines = [ln for ln in r2.stderr.splitlines() if "unfamiliar" in ln]
    assert len(lines) == 1 and lines[0].startswith("warning: " if as_warning else "note: ")
    assert "% of its 120 spots are unfamiliar" in lines[0] and str(inverted) in lines[0]
    rec2 = a2.uns["mmap"]["qc"]["familiarity"]
    assert bool(rec2["far_from_training"]) and rec2["share_unfamiliar"] >= fam.SLIDE_SHARE
    assert rec2["said_as"] == ("warning" if as_warning else "note")
    assert np.median(a2.obs["mmap_familiarity"]) < np.median(v)


def test_familiarity_is_deterministic_and_leaves_the_predictions_alone(tmp_path):
    from mmap_deploy.demo import sample_paths

    img, spots, mpp = sample_paths()
    _, a = _run(default_bundle_path(), img, spots, mpp, tmp_path / "a.h5ad")
    _, b = _run(default_bundle_path(), img, spots, mpp, tmp_path / "b.h5ad")
    assert a.obs["mmap_familiarity"].to_numpy().tobytes() == b.obs["mmap_familiarity"].to_numpy().tobytes()
    # the column is the summary applied to the written embeddings
    s = load_bundle(default_bundle_path()).familiarity()
    np.testing.assert_array_equal(a.obs["mmap_familiarity"].to_numpy(), s.familiarity(a.obsm["mmap_embedding"]))


# -- train -> export ---------------------------------------------------------------------
def _cache(n_sections: int = 6, n: int = 30):
    from mmap_train.datasets import Targets
    from mmap_train.features import SectionFeatures

    rng = np.random.default_rng(0)
    feats, targets = {}, {}
    for i in range(n_sections):
        name = f"{'ABC'[i % 3]}{i + 1}"
        ids = [f"{x}x{i}" for x in range(n)]
        f = _mixture(n, 96, seed=i)
        feats[name] = SectionFeatures(name, ids, f, rng.random((n, len(TINY_GENES))).astype(np.float32))
        targets[name] = Targets(ids, rng.random((n, len(TINY_GENES))).astype(np.float32))
    return feats, targets


def test_phase2_writes_the_summary_and_export_carries_it(tmp_path):
    from mmap_export.bundle_writer import export_bundle
    from mmap_train.model import read_checkpoint
    from mmap_train.phase2 import Phase2Recipe, train_phase2

    feats, targets = _cache()
    init = make_tiny_model()
    train = sorted(feats)[:5]
    res = train_phase2(init.config, feats, targets, train, [sorted(feats)[5]], tmp_path / "p2",
                       Phase2Recipe(epochs=1, threads=1, keep="best", average_last=0), init=init, progress=False)
    written = tmp_path / "p2" / "familiarity.npz"
    record = read_checkpoint(res["checkpoint"])["familiarity"]
    assert record["sha256"] == hashlib.sha256(written.read_bytes()).hexdigest()
    # the training spots only (5 sections x 30), calibrated by section (3 patients: A, B, C)
    assert (record["n_train_spots"], record["calibration_held_out"]) == (150, "section")
    f_train = np.concatenate([feats[n].f for n in train])
    np.testing.assert_array_equal(fam.read_summary(written).centroids,
                                  fam.fit_summary(f_train, np.repeat(train, 30)).centroids)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        export_bundle(res["checkpoint"], tmp_path / "bundle")
    bundle = load_bundle(tmp_path / "bundle")
    assert bundle.manifest.familiarity.sha256 == record["sha256"]
    assert (tmp_path / "bundle" / "familiarity.npz").read_bytes() == written.read_bytes()
    assert bundle.familiarity().meta["n_train_spots"] == 150
    # a checkpoint whose summary is not beside it, or is another run's, is not exported
    other = fam.write_summary(tmp_path / "other.npz", fam.fit_summary(_mixture(60, 96, seed=9),
                                                                        [f"S{i % 5}" for i in range(60)]))
    shutil.copyfile(other, written)
    with pytest.raises(UserError, match="not the training summary written with checkpoint.pt") as e:
        export_bundle(res["checkpoint"], tmp_path / "b2")
    assert "\n" not in str(e.value)
    written.unlink()
    with pytest.raises(UserError, match="its training summary familiarity.npz is not beside it"):
        export_bundle(res["checkpoint"], tmp_path / "b3")
    # unless another summary is given in its place
    export_bundle(res["checkpoint"], tmp_path / "b4", familiarity=other)
    assert load_bundle(tmp_path / "b4").manifest.familiarity.sha256 == hashlib.sha256(other.read_bytes()).hexdigest()
