"""K and L rules, numpy k-means (against scikit-learn), cosine top-L banks and padding."""

import numpy as np
import pytest

from mmap_deploy.model.prototypes import (
    KMEANS_SEED,
    PrototypeRule,
    _cluster_sums,
    kmeans,
    slide_prototypes,
    top_l_banks,
)


@pytest.mark.parametrize("n, k", [(1, 1), (10, 10), (31, 31), (100, 32), (300, 60), (1000, 80), (5000, 80)])
def test_k_rule(n, k):
    assert PrototypeRule().n_prototypes(n) == k


def test_l_rule_adaptive_and_fixed():
    rule = PrototypeRule()
    assert [rule.bank_size(k) for k in (1, 2, 32, 61, 80)] == [1, 1, 16, 30, 40]
    assert rule.max_bank == 40
    fixed = PrototypeRule(l_fixed=8)
    assert [fixed.bank_size(k) for k in (3, 32, 80)] == [3, 8, 8]
    assert fixed.max_bank == 8


def _blobs(n=2000, d=32, k=12, seed=0):
    rng = np.random.default_rng(seed)
    centres = rng.normal(0, 5, (k, d))
    return (centres[rng.integers(k, size=n)] + rng.normal(0, 1, (n, d))).astype(np.float32)


def _sklearn_inertia(x, k, seed=0):
    from sklearn.cluster import KMeans

    return KMeans(n_clusters=k, init="k-means++", n_init=1, random_state=seed).fit(x).inertia_


def test_kmeans_matches_sklearn_on_blobs():
    x = _blobs()
    ours = kmeans(x, 12, seed=0)
    assert ours.centroids.shape == (12, 32) and ours.labels.shape == (2000,)
    ref = _sklearn_inertia(x, 12)
    assert ours.inertia <= ref * 1.01
    # labels are the nearest centroid
    d = ((x[:, None, :] - ours.centroids[None]) ** 2).sum(-1)
    np.testing.assert_array_equal(ours.labels, d.argmin(1))


def test_kmeans_inertia_within_one_percent_on_real_features(real_data):
    feats = sorted((real_data / "mmap_features" / "train").glob("*_f.npy"))
    x = np.concatenate([np.load(p) for p in feats])[:3000]
    rule = PrototypeRule()
    k = rule.n_prototypes(len(x))
    ours = [kmeans(x, k, seed=s).inertia for s in range(3)]
    ref = [_sklearn_inertia(x, k, seed=s) for s in range(3)]
    assert np.mean(ours) <= np.mean(ref) * 1.01, (ours, ref)


def test_kmeans_is_deterministic_and_handles_duplicates():
    x = _blobs(500, 8, 5)
    a, b = kmeans(x, 7, seed=4), kmeans(x, 7, seed=4)
    np.testing.assert_array_equal(a.centroids, b.centroids)
    np.testing.assert_array_equal(a.labels, b.labels)
    same = np.ones((20, 4), np.float32)  # fewer distinct points than k
    res = kmeans(same, 5)
    assert res.inertia == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError):
        kmeans(same, 21)


def test_top_l_is_cosine_order():
    rng = np.random.default_rng(0)
    f, c = rng.normal(size=(50, 6)), rng.normal(size=(9, 6))
    idx = top_l_banks(f, c, 4)
    cos = (f / np.linalg.norm(f, axis=1, keepdims=True)) @ (c / np.linalg.norm(c, axis=1, keepdims=True)).T
    for i in range(50):
        np.testing.assert_array_equal(idx[i], np.argsort(-cos[i])[:4])


def test_slide_prototypes_follow_the_rules_and_pad_and_mask():
    x = _blobs(300, 16, 6)
    rule = PrototypeRule()
    p = slide_prototypes(x, rule)
    k = rule.n_prototypes(300)  # 60
    l = rule.bank_size(k)  # 30
    assert (p.k, p.l) == (k, l) and p.centroids.shape == (k, 16) and p.labels.shape == (300,)
    km = kmeans(x, k, seed=KMEANS_SEED)  # the step is k-means with the fixed seed
    np.testing.assert_array_equal(p.centroids, km.centroids)
    np.testing.assert_array_equal(p.labels, km.labels)
    bank, mask = p.banks(x, pad_to=rule.max_bank)
    assert bank.shape == (300, 40, 16) and mask.shape == (300, 40)
    assert mask[:, :l].all() and not mask[:, l:].any()
    assert not bank[:, l:].any()
    unpadded, umask = p.banks(x)
    np.testing.assert_array_equal(unpadded, bank[:, :l])
    np.testing.assert_array_equal(unpadded, p.centroids[top_l_banks(x, p.centroids, l)])
    assert umask.all()
    # banks gathered a batch at a time are the whole slide's banks
    np.testing.assert_array_equal(np.concatenate([p.bank_indices(x[s:s + 7]) for s in range(0, 300, 7)]),
                                  p.bank_indices(x))
    with pytest.raises(ValueError):
        p.banks(x, pad_to=l - 1)


def test_cluster_sums_add_each_clusters_rows_in_spot_order():
    rng = np.random.default_rng(1)
    x = rng.normal(size=(500, 24)).astype(np.float32)
    labels = rng.integers(0, 9, 500)
    labels[labels == 4] = 5  # cluster 4 is empty
    sums = _cluster_sums(x, labels, 9)
    assert sums.dtype == np.float32 and sums.shape == (9, 24)
    sequential = np.zeros((9, 24), np.float32)
    np.add.at(sequential, labels, x)  # unbuffered: row by row, in spot order
    np.testing.assert_array_equal(sums, sequential)
    assert not sums[4].any()
    exact = np.stack([x[labels == c].sum(axis=0, dtype=np.float64) for c in range(9)])
    np.testing.assert_allclose(sums, exact, rtol=1e-5, atol=1e-5)
