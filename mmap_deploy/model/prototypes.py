"""Phase-2 prototypes: the K and L rules, numpy k-means, and cosine top-L banks.

One implementation, shared by training (`mmap_train`), export parity and the
runtime: `slide_prototypes` turns one slide's embeddings and the manifest's
rule into its prototypes (K, k-means centroids and labels, L) and each spot's
top-L bank, always with the same seed, so a slide gets the same prototypes
wherever it is computed.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# Seed of the per-slide k-means: fixed, so a slide always gets the same prototypes.
KMEANS_SEED = 0


@dataclass(frozen=True)
class PrototypeRule:
    """How many prototypes a slide gets (K) and how many each spot attends to (L).

    K = clip(n_spots // k_divisor, k_min, k_max), never more than n_spots.
    L = floor(l_ratio * K) (adaptive, the default), or `l_fixed` when > 0;
    always between 1 and K.
    """

    k_min: int = 32
    k_max: int = 80
    k_divisor: int = 5
    l_ratio: float = 0.5
    l_fixed: int = 0

    def n_prototypes(self, n_spots: int) -> int:
        if n_spots < 1:
            raise ValueError("a slide needs at least one spot for k-means")
        k = min(max(n_spots // self.k_divisor, self.k_min), self.k_max)
        return max(1, min(k, n_spots))

    def bank_size(self, k: int) -> int:
        l = self.l_fixed if self.l_fixed > 0 else int(np.floor(self.l_ratio * k))
        return max(1, min(l, k))

    @property
    def max_bank(self) -> int:
        """The longest bank any slide can need: the padding length for training."""
        return self.bank_size(self.k_max)


@dataclass
class KMeansResult:
    centroids: np.ndarray  # (K, D) float32
    labels: np.ndarray  # (N,) int64
    inertia: float
    n_iter: int


def _sq_distances(x: np.ndarray, x_sq: np.ndarray, c: np.ndarray) -> np.ndarray:
    """Squared Euclidean distances (N, K) via ||x||^2 - 2 x.c + ||c||^2 (one GEMM)."""
    d = x @ c.T
    d *= -2.0
    d += x_sq[:, None]
    d += np.einsum("ij,ij->i", c, c)[None, :]
    np.maximum(d, 0.0, out=d)
    return d


def _kmeans_pp(x: np.ndarray, x_sq: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """Greedy k-means++ seeding (2 + log k local trials per centre), as scikit-learn does."""
    n = x.shape[0]
    n_trials = 2 + int(np.log(k))
    centres = np.empty((k, x.shape[1]), dtype=x.dtype)
    first = int(rng.integers(n))
    centres[0] = x[first]
    closest = _sq_distances(x, x_sq, centres[:1])[:, 0].astype(np.float64)
    pot = closest.sum()
    for c in range(1, k):
        if pot <= 0:  # fewer distinct points than k: repeat an existing point
            centres[c] = x[int(rng.integers(n))]
            continue
        cand = np.searchsorted(np.cumsum(closest), rng.random(n_trials) * pot)
        cand = np.minimum(cand, n - 1)
        d_cand = _sq_distances(x, x_sq, x[cand]).astype(np.float64)  # (N, trials)
        d_cand = np.minimum(closest[:, None], d_cand)
        pots = d_cand.sum(axis=0)
        best = int(np.argmin(pots))
        centres[c] = x[cand[best]]
        closest = d_cand[:, best]
        pot = pots[best]
    return centres


def kmeans(
    x: np.ndarray,
    k: int,
    *,
    seed: int = 0,
    n_init: int = 1,
    max_iter: int = 300,
    tol: float = 1e-4,
) -> KMeansResult:
    """Lloyd's k-means with k-means++ seeding; deterministic for a given seed.

    `tol` is relative to the mean per-feature variance of `x`, as in
    scikit-learn: iteration stops once the centres move less than that.
    Empty clusters are re-seeded with the point farthest from its centre.
    """
    x = np.ascontiguousarray(x, dtype=np.float32)
    n = x.shape[0]
    if not 1 <= k <= n:
        raise ValueError(f"k must be between 1 and the number of points ({n}), got {k}")
    x_sq = np.einsum("ij,ij->i", x, x)
    abs_tol = float(tol * np.mean(np.var(x, axis=0, dtype=np.float64)))
    rng = np.random.default_rng(seed)
    best: KMeansResult | None = None
    for _ in range(n_init):
        centres = _kmeans_pp(x, x_sq, k, rng)
        for it in range(1, max_iter + 1):
            d = _sq_distances(x, x_sq, centres)
            labels = np.argmin(d, axis=1)
            counts = np.bincount(labels, minlength=k)
            sums = _cluster_sums(x, labels, k).astype(np.float64)
            new = centres.copy()
            nz = counts > 0
            new[nz] = (sums[nz] / counts[nz, None]).astype(np.float32)
            if not nz.all():
                far = np.argsort(-d[np.arange(n), labels], kind="stable")
                new[~nz] = x[far[: int((~nz).sum())]]
            shift = float(((new - centres) ** 2).sum())
            centres = new
            if shift <= abs_tol:
                break
        d = _sq_distances(x, x_sq, centres)
        labels = np.argmin(d, axis=1)
        inertia = float(d[np.arange(n), labels].sum(dtype=np.float64))
        if best is None or inertia < best.inertia:
            best = KMeansResult(centres, labels.astype(np.int64), inertia, it)
    assert best is not None
    return best


def _cluster_sums(x: np.ndarray, labels: np.ndarray, k: int) -> np.ndarray:
    """(K, D) float32: row k is the sum of the rows of `x` labelled k, added in spot order.

    Memory is O(N + K·D), not a K×N one-hot matrix. Each cluster's rows are
    added one after the other in float32, the order a BLAS GEMM of the one-hot
    matrix uses within one panel of its inner dimension, so the results equal
    that GEMM's wherever it does not split the spots into panels (a few hundred
    spots with OpenBLAS); beyond, they differ from it at most in the last bits,
    and, unlike it, do not depend on the BLAS library or the CPU.
    """
    order = np.argsort(labels, kind="stable")  # stable: spot order within each cluster
    bounds = np.searchsorted(labels[order], np.arange(k + 1))
    sums = np.zeros((k, x.shape[1]), dtype=np.float32)
    for c in np.flatnonzero(np.diff(bounds)):
        # a sum over axis 0 of a C-ordered block adds whole rows in turn: sequential per column
        np.sum(x[order[bounds[c]:bounds[c + 1]]], axis=0, out=sums[c])
    return sums


def top_l_banks(f: np.ndarray, centroids: np.ndarray, l: int) -> np.ndarray:
    """Indices (N, L) of each spot's L most cosine-similar centroids, most similar first."""
    fn = f / np.maximum(np.linalg.norm(f, axis=1, keepdims=True), 1e-12)
    cn = centroids / np.maximum(np.linalg.norm(centroids, axis=1, keepdims=True), 1e-12)
    sim = fn.astype(np.float32) @ cn.T.astype(np.float32)
    # stable sort on the negated similarity: ties resolve by centroid index
    return np.argsort(-sim, axis=1, kind="stable")[:, :l]


@dataclass
class SlidePrototypes:
    """One slide's prototypes: K k-means centroids of its spots' embeddings, and L, the bank size.

    `bank_indices(f)` and `banks(f)` give spots their top-L banks; they take
    rows of the same slide's embeddings, so a caller can gather banks a batch
    at a time instead of holding the whole (N, L, D) bank.
    """

    centroids: np.ndarray  # (K, D) float32
    labels: np.ndarray  # (N,) int64: each spot's nearest centroid
    k: int
    l: int
    inertia: float
    n_iter: int

    def bank_indices(self, f: np.ndarray) -> np.ndarray:
        """(n, L) indices into `centroids`: each spot's L most cosine-similar prototypes, most similar first."""
        return top_l_banks(f, self.centroids, self.l)

    def banks(self, f: np.ndarray, pad_to: int | None = None) -> tuple[np.ndarray, np.ndarray]:
        """The fusion head's inputs for spots `f`: bank (n, L', D) float32 and mask (n, L') bool.

        L' is L, or `pad_to` with the padding zero and masked out (False).
        """
        l = self.l
        width = l if pad_to is None else pad_to
        if width < l:
            raise ValueError(f"pad_to={pad_to} is shorter than the bank size {l}")
        bank = np.zeros((f.shape[0], width, f.shape[1]), dtype=np.float32)
        bank[:, :l] = self.centroids[self.bank_indices(f)]
        mask = np.zeros((f.shape[0], width), dtype=bool)
        mask[:, :l] = True
        return bank, mask


def slide_prototypes(f: np.ndarray, rule: PrototypeRule, *, seed: int = KMEANS_SEED) -> SlidePrototypes:
    """The prototype step of MMAP for one slide: K from the rule, k-means on `f`, L from K."""
    k = rule.n_prototypes(f.shape[0])
    km = kmeans(f, k, seed=seed)
    return SlidePrototypes(km.centroids, km.labels, k, rule.bank_size(k), km.inertia, km.n_iter)
