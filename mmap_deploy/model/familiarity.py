"""Familiarity: how close each spot's embedding is to the spots the model was trained on.

A bundle may carry a compact summary of its training spots' fused phase-1
embeddings `f` (`familiarity.npz`, listed and hashed in the manifest):

- `centroids` (K, D): k-means centroids of the L2-normalised training `f`,
  normalised again; a spot's **similarity** is its largest cosine to one;
- `quantiles` (Q,): the similarities of held-out training spots (each scored
  by centroids fitted without its patient, section or fold: cross-fitted) at
  the levels 0, 1/(Q-1), ..., 1.

A spot's **familiarity** is the level at its similarity, interpolated
linearly between the quantiles: the share of held-out training spots that are
less similar to the summary than it is. 0.5 is a typical training-like spot,
a value near 0 is farther from the training data than nearly all of it.
**Unfamiliar**: familiarity < `UNFAMILIAR_BELOW`. A slide with at least
`SLIDE_SHARE` of its spots unfamiliar is said in one line.

`fit_summary` makes a summary from training embeddings (used by `mmap-train`
and `mmap-export`); `read_summary` / `write_summary` are the file's one
definition; `slide_familiarity` is the runtime's step. numpy only.
"""

from __future__ import annotations

import io
import json
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import BundleError
from ..messages import note, warn
from .prototypes import kmeans

SUMMARY_NAME = "familiarity.npz"
SUMMARY_FORMAT = "mmap-familiarity"
SUMMARY_VERSION = 1
METHOD = "centroid-cosine"
N_QUANTILES = 1001
# K = clip(n // SPOTS_PER_CENTROID, K_MIN, K_MAX): local averages of ~20 spots; 256 x 1024-d float32 is 1 MB
SPOTS_PER_CENTROID = 20
K_MIN, K_MAX = 16, 256
MAX_FIT_SPOTS = 20_000  # k-means on a seeded subsample beyond this (training cost stays bounded)
CALIBRATION_FOLDS = 5
KMEANS_MAX_ITER = 100
SEED = 0
UNFAMILIAR_BELOW = 0.05
SLIDE_SHARE = 0.25  # five times the share of unfamiliar spots a training-like slide should have
# Whether a slide with SLIDE_SHARE unfamiliar spots is said as a warning (True) or a note (False). The product
# rule (benchmarks/RESULTS_training.md, "Familiarity"): a warning only if familiarity separates, AUROC >= 0.9 on
# unseen tissue and a higher PCC on the familiar half in most folds; measured: 0.86, and 3 of 8 folds.
SLIDE_WARNING = False
_CHUNK = 8192  # spots per similarity block: (8192, K) floats at a time


@dataclass
class FamiliaritySummary:
    """The training spots' summary: unit centroids, held-out similarity quantiles and what made them."""

    centroids: np.ndarray  # (K, D) float32, unit rows
    quantiles: np.ndarray  # (Q,) float64, non-decreasing
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def embed_dim(self) -> int:
        return int(self.centroids.shape[1])

    def similarity(self, f: np.ndarray) -> np.ndarray:
        """(N,) float32: each spot's largest cosine to a centroid (blocks of spots, bounded memory).

        On one BLAS thread, whoever calls: a product's float32 sums depend on how BLAS splits it
        between threads, and the same spots must get the same bits on any machine.
        """
        from threadpoolctl import threadpool_limits

        f = np.asarray(f, dtype=np.float32)
        if f.ndim != 2 or f.shape[1] != self.embed_dim:
            raise ValueError(f"embeddings must be (spots, {self.embed_dim}), got {f.shape}")
        out = np.empty(len(f), dtype=np.float32)
        ct = np.ascontiguousarray(self.centroids.T)
        with threadpool_limits(limits=1, user_api="blas"):
            for s in range(0, len(f), _CHUNK):
                block = unit_rows(f[s:s + _CHUNK])
                out[s:s + len(block)] = (block @ ct).max(axis=1) if len(block) else 0
        return out

    def familiarity(self, f: np.ndarray) -> np.ndarray:
        """(N,) float32 in [0, 1]: the share of held-out training spots less similar than each spot."""
        return calibrate(self.similarity(f), self.quantiles)


def unit_rows(x: np.ndarray) -> np.ndarray:
    """Rows scaled to unit L2 norm (a zero row stays zero)."""
    x = np.asarray(x, dtype=np.float32)
    return x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), np.float32(1e-12))


def calibrate(score: np.ndarray, quantiles: np.ndarray) -> np.ndarray:
    """The level of each score within the held-out quantiles: the empirical CDF, linear between quantiles.

    Ties among quantiles (a flat stretch of the distribution) take the middle
    of their levels, so the result is well defined and non-decreasing in `score`.
    """
    q = np.asarray(quantiles, dtype=np.float64)
    levels = np.linspace(0.0, 1.0, len(q))
    uq, first, counts = np.unique(q, return_index=True, return_counts=True)
    mid = (levels[first] + levels[first + counts - 1]) / 2
    if len(uq) == 1:
        return np.where(np.asarray(score) < uq[0], 0.0, np.where(np.asarray(score) > uq[0], 1.0, 0.5)).astype(np.float32)
    # the ends stay 0 and 1 (below the lowest, above the highest held-out spot)
    mid[0], mid[-1] = 0.0, 1.0
    return np.interp(np.asarray(score, dtype=np.float64), uq, mid, left=0.0, right=1.0).astype(np.float32)


# -- fitting ---------------------------------------------------------------------
def n_centroids(n: int) -> int:
    """K for `n` training spots: clip(n // SPOTS_PER_CENTROID, K_MIN, K_MAX), at most n."""
    return max(1, min(n, max(K_MIN, min(K_MAX, n // SPOTS_PER_CENTROID))))


def fit_centroids(z: np.ndarray, seed: int = SEED) -> np.ndarray:
    """Unit k-means centroids of unit rows `z` (a seeded subsample of MAX_FIT_SPOTS when there are more)."""
    if len(z) > MAX_FIT_SPOTS:
        z = z[np.sort(np.random.default_rng(seed).choice(len(z), MAX_FIT_SPOTS, replace=False))]
    km = kmeans(z, n_centroids(len(z)), seed=seed, max_iter=KMEANS_MAX_ITER)
    return unit_rows(km.centroids)


def calibration_folds(groups: dict[str, np.ndarray], n: int, seed: int = SEED) -> tuple[np.ndarray, str, int]:
    """Each spot's calibration fold (0..4), the kind of unit held out together, and how many units.

    `groups` maps "patient" and "section" to one label per spot. Whole
    patients are held out when there are at least 5, else whole sections when
    there are at least 5, else single spots (a seeded shuffle). Units are
    dealt to folds in a seeded order, so the folds are balanced in units.
    """
    rng = np.random.default_rng(seed)
    for kind in ("patient", "section"):
        labels = groups.get(kind)
        if labels is None:
            continue
        labels = np.asarray(labels).astype(str)
        names = np.unique(labels)
        if len(names) >= CALIBRATION_FOLDS:
            order = rng.permutation(len(names))
            fold_of = {names[j]: i % CALIBRATION_FOLDS for i, j in enumerate(order)}
            return np.array([fold_of[s] for s in labels], dtype=np.int64), kind, len(names)
    folds = np.empty(n, dtype=np.int64)
    folds[rng.permutation(n)] = np.arange(n) % CALIBRATION_FOLDS
    return folds, "spot", n


def fit_summary(f: np.ndarray, sections: np.ndarray | list[str] | None = None,
                patients: np.ndarray | list[str] | None = None, seed: int = SEED) -> FamiliaritySummary:
    """The summary of training embeddings `f` (N, D), with one section and patient label per spot.

    Cross-fitted calibration (see `calibration_folds`): every spot is scored by
    centroids fitted on the other folds; the pooled scores give the quantiles.
    The shipped centroids are then fitted on every spot. BLAS runs on one
    thread: a multi-threaded matrix product may add in another order, and the
    same training spots must give the same file on any machine's core count.
    """
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=1, user_api="blas"):
        return _fit_summary(f, sections, patients, seed)


def _fit_summary(f, sections, patients, seed: int) -> FamiliaritySummary:
    f = np.asarray(f, dtype=np.float32)
    if f.ndim != 2 or len(f) < 2 * CALIBRATION_FOLDS:
        raise ValueError(f"a familiarity summary needs at least {2 * CALIBRATION_FOLDS} training spots, "
                         f"got {len(f)}")
    if not np.isfinite(f).all():
        raise ValueError("training embeddings hold non-finite values")
    z = unit_rows(f)
    groups = {k: v for k, v in (("patient", patients), ("section", sections)) if v is not None}
    folds, kind, n_units = calibration_folds(groups, len(z), seed)
    held = np.empty(len(z), dtype=np.float32)
    for k in range(CALIBRATION_FOLDS):
        test = folds == k
        if not test.any():
            continue
        c = fit_centroids(z[~test], seed)
        held[test] = (z[test] @ c.T).max(axis=1)
    quantiles = np.quantile(held.astype(np.float64), np.linspace(0.0, 1.0, N_QUANTILES))
    centroids = fit_centroids(z, seed)
    meta = {"format": SUMMARY_FORMAT, "version": SUMMARY_VERSION, "method": METHOD, "embed_dim": int(f.shape[1]),
            "n_centroids": int(len(centroids)), "n_train_spots": int(len(f)),
            "n_fit_spots": int(min(len(f), MAX_FIT_SPOTS)), "calibration_held_out": kind,
            "calibration_units": int(n_units), "calibration_folds": CALIBRATION_FOLDS, "seed": int(seed),
            "definition": "familiarity = share of held-out training spots whose largest cosine to a centroid "
                          "is lower than the spot's"}
    return FamiliaritySummary(centroids.astype(np.float32), np.asarray(quantiles, dtype=np.float64), meta)


# -- the file --------------------------------------------------------------------
def write_summary(path: str | Path, summary: FamiliaritySummary) -> Path:
    """Write `summary` as an .npz that numpy reads without pickle; same summary, same bytes.

    The zip entries carry a fixed date (numpy's `savez` stamps the time of
    writing), so a summary's sha256 depends on its content only.
    """
    from ..atomic import atomic_path

    path = Path(path)
    arrays = {"centroids": np.ascontiguousarray(summary.centroids, dtype=np.float32),
              "quantiles": np.ascontiguousarray(summary.quantiles, dtype=np.float64),
              "meta": np.array(json.dumps(summary.meta, sort_keys=True))}
    with atomic_path(path) as tmp, zipfile.ZipFile(tmp, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, arr, allow_pickle=False)
            zf.writestr(zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0)), buf.getvalue())
    return path


def read_summary(path: str | Path, embed_dim: int | None = None) -> FamiliaritySummary:
    """Read and check a summary file; BundleError naming the file and the problem."""
    path = Path(path)

    def bad(what: str) -> BundleError:
        return BundleError(f"{path}: {what}; re-export the bundle with mmap-export")

    try:
        with np.load(path, allow_pickle=False) as z:
            centroids, quantiles, meta_text = z["centroids"], z["quantiles"], str(z["meta"][()])
    except (OSError, ValueError, KeyError, zipfile.BadZipFile) as e:
        raise bad(f"not a familiarity summary ({type(e).__name__})") from None
    try:
        meta = json.loads(meta_text)
    except json.JSONDecodeError:
        raise bad("its 'meta' is not JSON") from None
    if not isinstance(meta, dict) or meta.get("format") != SUMMARY_FORMAT:
        raise bad("not a familiarity summary (no 'format': 'mmap-familiarity')")
    if meta.get("version") != SUMMARY_VERSION or meta.get("method") != METHOD:
        raise bad(f"summary version {meta.get('version')!r}, method {meta.get('method')!r}: this mmap-deploy "
                  f"reads version {SUMMARY_VERSION}, {METHOD}; upgrade mmap-deploy")
    if centroids.ndim != 2 or not len(centroids) or centroids.dtype != np.float32 or not np.isfinite(centroids).all():
        raise bad(f"'centroids' must be a non-empty finite (K, D) float32 array, got {centroids.dtype}{centroids.shape}")
    if quantiles.ndim != 1 or len(quantiles) < 2 or not np.isfinite(quantiles).all() or np.any(np.diff(quantiles) < 0):
        raise bad("'quantiles' must be at least 2 finite non-decreasing numbers")
    if embed_dim is not None and centroids.shape[1] != embed_dim:
        raise bad(f"its centroids are {centroids.shape[1]}-d but the model's embeddings are {embed_dim}-d")
    return FamiliaritySummary(centroids, quantiles.astype(np.float64), meta)


# -- the runtime step --------------------------------------------------------------
@dataclass
class SlideFamiliarity:
    """One slide's familiarity: the value per spot and what `uns['mmap']['qc']['familiarity']` records."""

    values: np.ndarray  # (N,) float32 in [0, 1]
    unfamiliar_below: float = UNFAMILIAR_BELOW
    slide_share: float = SLIDE_SHARE
    method: str = METHOD

    @property
    def share_unfamiliar(self) -> float:
        return float(np.mean(self.values < self.unfamiliar_below)) if len(self.values) else 0.0

    @property
    def far_from_training(self) -> bool:
        return bool(len(self.values)) and self.share_unfamiliar >= self.slide_share

    def record(self) -> dict[str, Any]:
        """The slide's summary for uns (no None: anndata cannot write it)."""
        v = self.values
        return {"method": self.method, "unfamiliar_below": float(self.unfamiliar_below),
                "share_unfamiliar": round(self.share_unfamiliar, 6),
                "n_unfamiliar": int(np.count_nonzero(v < self.unfamiliar_below)), "n_spots": int(len(v)),
                "median": float(np.median(v)) if len(v) else 0.0,
                "quantile_05": float(np.quantile(v, 0.05)) if len(v) else 0.0,
                "slide_share": float(self.slide_share), "far_from_training": self.far_from_training,
                "said_as": "warning" if SLIDE_WARNING else "note"}

    def message(self, slide: str) -> str:
        return (f"{slide}: {self.share_unfamiliar:.0%} of its {len(self.values)} spots are unfamiliar to the model "
                f"(familiarity < {self.unfamiliar_below:g}: less like its training spots than "
                f"{1 - self.unfamiliar_below:.0%} of held-out training spots); the tissue, stain, focus or scan may "
                "differ from the training data: see obs['mmap_familiarity'] before trusting these predictions")


def slide_familiarity(summary: FamiliaritySummary | None, f: np.ndarray, slide: str,
                      bundle: str) -> SlideFamiliarity | None:
    """Familiarity of one slide's spots, and its one line: a note for a bundle without a summary,
    the slide's line when it is far from the training data (a warning or a note: `SLIDE_WARNING`)."""
    if summary is None:
        note(f"{bundle}: the bundle has no training summary (exported without one), so obs['mmap_familiarity'] "
             "is not written for this slide; re-export it from a model trained by mmap-train to add one")
        return None
    result = SlideFamiliarity(summary.familiarity(f))
    if result.far_from_training:
        (warn if SLIDE_WARNING else note)(result.message(slide))
    return result
