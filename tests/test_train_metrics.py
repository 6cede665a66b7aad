"""Metrics against scipy.stats.pearsonr, computed the slow obvious way."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from scipy.stats import pearsonr

from mmap_train.metrics import evaluate, pearson_per_gene


def _scipy_per_gene(pred, target):
    out = []
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy warns on constant input and returns NaN
        for j in range(pred.shape[1]):
            out.append(pearsonr(np.float64(pred[:, j]), np.float64(target[:, j]))[0])
    return np.array(out, dtype=np.float64)


def _data(seed=0, n=60, g=9):
    rng = np.random.default_rng(seed)
    target = rng.gamma(1.0, 1.0, size=(n, g)).astype(np.float32)
    pred = (0.5 * target + rng.normal(size=(n, g))).astype(np.float32)
    return pred, target


def test_pearson_per_gene_matches_scipy():
    pred, target = _data()
    np.testing.assert_allclose(pearson_per_gene(pred, target), _scipy_per_gene(pred, target), rtol=1e-10, atol=1e-12)


def test_constant_genes_are_nan_like_scipy():
    pred, target = _data()
    target[:, 2] = 0.0  # a gene never expressed
    pred[:, 5] = 1.25  # a constant prediction
    r = pearson_per_gene(pred, target)
    ref = _scipy_per_gene(pred, target)
    assert np.isnan(r[2]) and np.isnan(r[5])
    np.testing.assert_array_equal(np.isnan(r), np.isnan(ref))
    ok = ~np.isnan(ref)
    np.testing.assert_allclose(r[ok], ref[ok], rtol=1e-10)


def test_evaluate_pooled_per_slide_mse_mae():
    pred, target = _data(seed=3, n=90)
    sections = np.array(["A"] * 30 + ["B"] * 50 + ["C"] * 10)
    # gene 4 is constant inside section C only: NaN there, fine pooled
    target[80:, 4] = 0.0
    m = evaluate(pred, target, sections)
    pooled = _scipy_per_gene(pred, target)
    assert m["pcc_pooled"] == pytest.approx(np.nanmean(pooled), rel=1e-10)
    per = []
    for s in "ABC":
        r = _scipy_per_gene(pred[sections == s], target[sections == s])
        per.append(np.nanmean(r))
        assert m["per_section"][s]["pcc"] == pytest.approx(np.nanmean(r), rel=1e-10)
    assert m["pcc_per_slide"] == pytest.approx(np.mean(per), rel=1e-10)
    assert m["n_constant_genes_pooled"] == 0
    assert m["n_constant_genes_per_slide"] == 1
    assert m["per_section"]["C"]["n_constant_genes"] == 1
    err = pred.astype(np.float64) - target
    assert m["mse"] == pytest.approx((err ** 2).mean(), rel=1e-12)
    assert m["mae"] == pytest.approx(np.abs(err).mean(), rel=1e-12)
    assert (m["n_spots"], m["n_genes"], m["n_sections"]) == (90, 9, 3)


def test_constant_gene_left_out_of_mean_and_counted():
    pred, target = _data(seed=5)
    target[:, 0] = 3.0
    m = evaluate(pred, target, ["S"] * len(pred))
    r = _scipy_per_gene(pred, target)
    assert m["n_constant_genes_pooled"] == 1
    assert m["pcc_pooled"] == pytest.approx(np.mean(r[1:]), rel=1e-10)


def test_perfect_and_anti_predictions():
    _, target = _data(seed=7)
    assert evaluate(target, target, ["S"] * len(target))["pcc_pooled"] == pytest.approx(1.0)
    assert evaluate(-target, target, ["S"] * len(target))["pcc_pooled"] == pytest.approx(-1.0)
    assert evaluate(target, target, ["S"] * len(target))["mse"] == 0.0
