"""Familiarity methods compared beside the shipped one, and (a) of the rules on the cross-validation folds.

    python benchmarks/familiarity_methods.py --cv benchmarks/results/familiarity_cv.json \
        --features ../shared/data/mmap_features/train --json benchmarks/results/familiarity_methods_cv.json

Every method is calibrated as the shipped `centroid-cosine` is
(`mmap_deploy.model.familiarity`: cross-fitted folds by patient, section or
spot; 1 001 quantiles; the same interpolation), so only the similarity
differs (benchmarks/RESULTS_training.md, "Familiarity", the rules):

- `centroid-cosine`: the shipped summary (`fit_summary`), as it runs;
- `centroid-cosine-centred`: the same on f minus the training mean;
- `knn-cosine`: mean cosine to the 5 nearest of a seeded subsample of at most
  2 048 training spots (L2-normalised f);
- `pca-mahalanobis`: minus (the Mahalanobis distance in the top 32 principal
  components of the training f + the residual's squared norm over its
  training mean).

With `--cv`, for each fold of `mmap-train cv`'s JSON (its per-spot error of
the default model, and the spots' order), every method is fitted on the
training patients' f and scored on the held-out patient's: the Spearman
correlation of familiarity with the per-spot error.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Callable

import numpy as np

from mmap_deploy.model import familiarity as fam

Scorer = Callable[[np.ndarray], np.ndarray]
KNN_K, KNN_MAX_SPOTS, PCA_COMPONENTS = 5, 2048, 32


def _centred_centroids(f: np.ndarray) -> Scorer:
    mu = f.mean(axis=0)
    c = fam.fit_centroids(fam.unit_rows(f - mu))
    return lambda g: (fam.unit_rows(g - mu) @ c.T).max(axis=1)


def _knn(f: np.ndarray) -> Scorer:
    z = fam.unit_rows(f)
    if len(z) > KNN_MAX_SPOTS:
        z = z[np.sort(np.random.default_rng(fam.SEED).choice(len(z), KNN_MAX_SPOTS, replace=False))]
    k = min(KNN_K, len(z))
    return lambda g: -np.sort(-(fam.unit_rows(g) @ z.T), axis=1)[:, :k].mean(axis=1)


def _pca_mahalanobis(f: np.ndarray) -> Scorer:
    f = f.astype(np.float64)
    mu = f.mean(axis=0)
    _, s, vt = np.linalg.svd(f - mu, full_matrices=False)
    p = min(PCA_COMPONENTS, len(s))
    v, lam = vt[:p].T, np.maximum(s[:p] ** 2 / max(len(f) - 1, 1), 1e-12)

    def parts(g):
        x = np.asarray(g, np.float64) - mu
        proj = x @ v
        return proj, ((x - proj @ v.T) ** 2).sum(axis=1)

    resid_mean = max(float(parts(f)[1].mean()), 1e-12)

    def score(g):
        proj, resid = parts(g)
        return -((proj ** 2 / lam).sum(axis=1) + resid / resid_mean)
    return score


ALTERNATIVES: dict[str, Callable[[np.ndarray], Scorer]] = {
    "centroid-cosine-centred": _centred_centroids, "knn-cosine": _knn, "pca-mahalanobis": _pca_mahalanobis}
METHODS = ("centroid-cosine", *ALTERNATIVES)


def fit(method: str, f: np.ndarray, sections, patients) -> Scorer:
    """Familiarity (0-1) of new spots by `method`, fitted on training `f` and calibrated as the runtime's."""
    f = np.asarray(f, np.float32)
    if method == "centroid-cosine":
        return fam.fit_summary(f, sections, patients).familiarity
    make = ALTERNATIVES[method]
    folds, _, _ = fam.calibration_folds({"patient": np.asarray(patients), "section": np.asarray(sections)}, len(f))
    held = np.empty(len(f))
    for k in range(fam.CALIBRATION_FOLDS):
        test = folds == k
        if test.any():
            held[test] = make(f[~test])(f[test])
    quantiles = np.quantile(held, np.linspace(0.0, 1.0, fam.N_QUANTILES))
    final = make(f)
    return lambda g: fam.calibrate(final(np.asarray(g, np.float32)), quantiles)


def summary_bytes(method: str, dim: int = 1024, n: int = 100_000) -> int:
    """What the method would store for a 1024-d model trained on many spots (float32 arrays + quantiles)."""
    q = fam.N_QUANTILES * 8
    return q + 4 * dim * {"centroid-cosine": fam.K_MAX, "centroid-cosine-centred": fam.K_MAX + 1,
                          "knn-cosine": min(KNN_MAX_SPOTS, n), "pca-mahalanobis": PCA_COMPONENTS + 1}[method]


def _cv(cv_json: Path, features: Path, model: str) -> dict:
    from scipy.stats import spearmanr

    from mmap_train.features import read_cache

    res = json.loads(cv_json.read_text())
    feats = read_cache(features)
    patient_of = {s: p for p, ss in res["patients"].items() for s in ss}
    out = {}
    for patient, fold in res["folds"].items():
        record = fold["familiarity"]
        train = [s for s in sorted(patient_of) if patient_of[s] != patient and len(feats[s].spot_ids)]
        held = [s for s in fold["held_out"] if len(feats[s].spot_ids)]
        f_train = np.concatenate([feats[s].f for s in train])
        secs = np.concatenate([[s] * len(feats[s].f) for s in train])
        f_held = np.concatenate([feats[s].f for s in held])
        if [i for s in held for i in feats[s].spot_ids] != record["spot_ids"]:
            raise SystemExit(f"fold {patient}: the cache's spots differ from the cv JSON's")
        err = np.asarray(record["error"][model])
        out[patient] = {}
        for method in METHODS:
            values = fit(method, f_train, secs, [patient_of[s] for s in secs])(f_held)
            out[patient][method] = {"spearman_error": float(spearmanr(values, err).statistic),
                                    "share_unfamiliar": float(np.mean(values < fam.UNFAMILIAR_BELOW))}
        print(patient, {m: round(v["spearman_error"], 3) for m, v in out[patient].items()}, file=sys.stderr)
    means = {m: float(np.mean([v[m]["spearman_error"] for v in out.values()])) for m in METHODS}
    return {"model": model, "folds": out, "mean_spearman_error": means,
            "summary_bytes_1024d": {m: summary_bytes(m) for m in METHODS}}


def main() -> None:
    from mmap_train.cv import CURRENT_DEFAULT

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cv", type=Path, required=True, help="mmap-train cv's JSON (with its familiarity records)")
    ap.add_argument("--features", type=Path, required=True, help="the feature cache the cv ran on")
    ap.add_argument("--model", default=CURRENT_DEFAULT, help="whose per-spot error (default: the default model)")
    ap.add_argument("--json", type=Path, required=True)
    a = ap.parse_args()
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        res = _cv(a.cv, a.features, a.model)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    a.json.write_text(json.dumps({**res, "cpu": cpu, "command": " ".join(sys.argv)}, indent=1) + "\n")
    print(json.dumps(res["mean_spearman_error"], indent=1))


if __name__ == "__main__":
    main()
