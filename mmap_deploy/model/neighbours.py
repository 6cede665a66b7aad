"""Spatial neighbours in µm, and the smoothing of a slide's predictions over them.

A spot's neighbours are the other spots whose centres lie within `radius_um`
of its own (distance <= R, Euclidean, on positions in µm = level-0 pixels x
the slide's µm per pixel). The smoothing replaces each spot's prediction by

    y_s(i) = (y(i) + w * mean_{j neighbour of i} y(j)) / (1 + w),

and leaves a spot without neighbours as it is. The neighbours' mean, not their
sum, so the step means the same on ST (200 µm pitch), Visium (100 µm), Visium
HD bins and `--grid` lattices: only the radius is physical, the weight is the
share of the neighbourhood whatever its density.

Two exact ways to the neighbours' sums, one set of neighbours:

- a KD-tree (`scipy.spatial.cKDTree`) pair list, for slides with few
  neighbours per spot (ST, Visium, grids at spot pitch) and any layout;
- for 20 000+ spots on a lattice (Visium HD bins: about a thousand 16 µm
  bins within 300 µm, where a pair list takes gigabytes), a disc kernel on the
  index grid (the table's array indices, or indices read off the positions),
  convolved by FFT (cost per spot independent of R). The disc comes from the
  lattice fitted in µm; index offsets whose fitted length lies within twice
  the spots' deviation from the fit of R are checked pair by pair on the real
  positions, so the neighbours are the KD-tree's. The sums agree with the
  pair list's to float64 rounding (1e-12).

Sums are float64 and deterministic (a fixed summation order; FFTs whose result
does not depend on the number of threads), so a repeat is bit-identical. Genes
are smoothed a block at a time and written back in place: the step needs a few
blocks of working memory, not a second prediction matrix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import numpy as np

from ..errors import UserError

# Working memory for one block of genes (float64 copies of the block), bytes.
BLOCK_BYTES = 32 * 2**20
# The lattice path serves slides of at least this many spots (below, the KD-tree's pair list is small).
LATTICE_FROM_SPOTS = 20_000
# ... whose index grid has at most this many cells per spot (Visium's hexagonal lattice fills half of them).
LATTICE_MAX_CELLS_PER_SPOT = 4


@dataclass(frozen=True)
class NeighbourSmoothing:
    """The smoothing step of a bundle: radius in µm and the neighbours' weight (0: no smoothing)."""

    radius_um: float
    weight: float

    def validate(self) -> None:
        if not (math.isfinite(self.radius_um) and self.radius_um > 0):
            raise UserError(f"neighbour radius must be a positive number of µm, got {self.radius_um}")
        if not (math.isfinite(self.weight) and self.weight >= 0):
            raise UserError(f"neighbour weight must be 0 or more, got {self.weight}")

    @property
    def active(self) -> bool:
        return self.weight > 0

    def to_dict(self) -> dict[str, float]:
        return {"radius_um": float(self.radius_um), "weight": float(self.weight)}


class Neighbours:
    """The neighbour structure of one slide's spots: built once, applied to any (N, G) values.

    `xy_um` (N, 2): spot centres in µm. `array_xy` (N, 2), optional: the spots'
    lattice indices (column, row). Slides of `LATTICE_FROM_SPOTS` spots or more
    take the lattice path (see the module docstring) with these indices, or
    without them with indices read off the spots' nearest-neighbour vectors;
    when the spots are not on a lattice, the KD-tree path. `method="kdtree"`
    takes the KD-tree path whatever the slide (for comparisons).
    """

    def __init__(self, xy_um: np.ndarray, radius_um: float, array_xy: np.ndarray | None = None,
                 method: str = "auto"):
        if method not in ("auto", "kdtree"):
            raise ValueError(f"method must be 'auto' or 'kdtree', got {method!r}")
        xy = np.ascontiguousarray(xy_um, dtype=np.float64)
        if xy.ndim != 2 or xy.shape[1] != 2:
            raise ValueError(f"xy_um must be (N, 2), got {xy.shape}")
        if not np.isfinite(xy).all():
            raise UserError("spot positions must be finite to find their neighbours")
        self.n, self.radius_um = len(xy), float(radius_um)
        self._lattice = None
        if method == "auto" and self.n >= LATTICE_FROM_SPOTS:
            # the given indices, else indices read off the spots' own lattice (a plain x,y table of bins)
            self._lattice = _LatticeDisc.build(xy, self.radius_um, array_xy) if array_xy is not None else None
            if self._lattice is None:
                derived = _derived_indices(xy)
                self._lattice = _LatticeDisc.build(xy, self.radius_um, derived) if derived is not None else None
        self._pairs = None if self._lattice is not None else _pair_matrix(xy, self.radius_um)
        self.counts = self._lattice.counts if self._lattice is not None else np.diff(self._pairs.indptr)

    @property
    def method(self) -> str:
        return "lattice" if self._lattice is not None else "kdtree"

    def sums(self, values: np.ndarray) -> np.ndarray:
        """(N, g) float64: each spot's sum of its neighbours' `values` (N, g)."""
        v = np.asarray(values, dtype=np.float64)
        if self._lattice is not None:
            return self._lattice.sums(v)
        return np.asarray(self._pairs @ v)

    def means(self, values: np.ndarray) -> np.ndarray:
        """(N, g) float64: the neighbours' mean of `values`; a spot without neighbours gets its own value."""
        s = self.sums(values)
        has = self.counts > 0
        s[has] /= self.counts[has, None]
        s[~has] = np.asarray(values, dtype=np.float64)[~has]
        return s

    def smooth(self, values: np.ndarray, weight: float, out: np.ndarray | None = None) -> np.ndarray:
        """`(y + w * neighbour mean) / (1 + w)`, a block of genes at a time; `out=values` works in place."""
        values = np.asarray(values)
        if out is None:
            out = np.empty_like(values)
        if values.shape[0] != self.n:
            raise ValueError(f"values have {values.shape[0]} rows, the neighbours {self.n} spots")
        block = max(1, BLOCK_BYTES // max(1, 8 * 4 * self.n))
        for g0 in range(0, values.shape[1], block):
            y = values[:, g0:g0 + block].astype(np.float64)
            m = self.means(y)
            out[:, g0:g0 + block] = (y + weight * m) / (1.0 + weight)
        return out


def smooth_predictions(values: np.ndarray, xy_um: np.ndarray, smoothing: NeighbourSmoothing | None, *,
                       array_xy: np.ndarray | None = None, out: np.ndarray | None = None) -> np.ndarray:
    """One slide's predictions smoothed over their neighbours (`NeighbourSmoothing`); None or weight 0: unchanged."""
    if smoothing is None or not smoothing.active or len(values) == 0:
        if out is not None and out is not values:
            out[...] = values
            return out
        return values
    return Neighbours(xy_um, smoothing.radius_um, array_xy).smooth(values, smoothing.weight, out=out)


def _pair_matrix(xy: np.ndarray, radius: float) -> Any:
    """CSR (N, N) of ones at every pair of distinct spots within `radius` (rows and columns sorted)."""
    import scipy.sparse as sp
    from scipy.spatial import cKDTree

    n = len(xy)
    if n < 2:
        return sp.csr_matrix((n, n), dtype=np.float64)
    pairs = cKDTree(xy).query_pairs(radius, output_type="ndarray")
    rows = np.concatenate([pairs[:, 0], pairs[:, 1]])
    cols = np.concatenate([pairs[:, 1], pairs[:, 0]])
    m = sp.csr_matrix((np.ones(len(rows)), (rows, cols)), shape=(n, n))
    m.sort_indices()
    return m


def _derived_indices(xy: np.ndarray) -> np.ndarray | None:
    """Integer lattice indices for spots that lie on a lattice, or None.

    From one central spot's two shortest non-parallel neighbour vectors, the
    lattice is refitted (least squares) on the spots within a disc that
    doubles each round, so that the errors of the first guess never grow
    across the slide. `_LatticeDisc.build` then checks that the spots fit.
    """
    from scipy.spatial import cKDTree

    tree = cKDTree(xy)
    centre = xy[tree.query(np.median(xy, axis=0))[1]]
    dist, near = tree.query(centre, k=min(9, len(xy)))
    vecs = [xy[j] - centre for d, j in zip(dist[1:], near[1:]) if d > 0]
    if len(vecs) < 2:
        return None
    first = vecs[0]
    second = next((v for v in vecs[1:] if abs(first[0] * v[1] - first[1] * v[0]) > 0.5 * np.hypot(*first)
                   * np.hypot(*v)), None)
    if second is None:
        return None
    basis, origin = np.column_stack([first, second]), centre
    offset = np.hypot(*(xy - centre).T)
    reach = 3.0 * float(np.hypot(*second))
    try:
        while True:
            near_centre = offset <= reach
            ij = np.rint(np.linalg.solve(basis, (xy[near_centre] - origin).T).T)
            coef, *_ = np.linalg.lstsq(np.column_stack([ij, np.ones(len(ij))]), xy[near_centre], rcond=None)
            basis, origin = coef[:2].T, coef[2]
            if near_centre.all():
                return np.rint(np.linalg.solve(basis, (xy - origin).T).T)
            reach *= 2.0
    except np.linalg.LinAlgError:  # a degenerate fit: not a lattice
        return None


class _LatticeDisc:
    """Disc sums on a lattice of spots; see the module docstring. `build` returns None where it does not apply.

    The spots' array indices (i, j) place them on a grid; an affine fit maps
    indices to µm, and `deviation` is the largest distance of a spot from its
    fitted place. An index offset whose fitted length is below R - 2 deviation
    joins every spot to its partner (a disc kernel, summed by FFT convolution,
    cost independent of R); one above R + 2 deviation joins none; the few in
    between (none on an exact lattice unless R is one of its distances) are
    checked pair by pair on the real positions.
    """

    def __init__(self, cell: np.ndarray, shape: tuple[int, int], kernel: np.ndarray,
                 border: list[tuple[int, int]], xy: np.ndarray, radius: float):
        self.cell, self.shape, self.kernel, self.xy, self.radius = cell, shape, kernel, xy, radius
        self._kernel_f = None
        self.index = np.full(shape[0] * shape[1], -1, dtype=np.int64)
        self.index[cell] = np.arange(len(cell))
        self.border = [(dj, di, *self._partners(dj, di)) for dj, di in border]
        self.counts = np.rint(self._disc(np.ones((len(cell), 1)))[:, 0]).astype(np.int64)
        for _, _, rows, _ in self.border:
            self.counts[rows] += 1  # one partner per spot and offset

    @classmethod
    def build(cls, xy: np.ndarray, radius: float, array_xy: np.ndarray) -> "_LatticeDisc | None":
        n = len(xy)
        ij = np.asarray(array_xy, dtype=np.float64)
        if ij.shape != (n, 2) or not np.isfinite(ij).all() or not np.array_equal(ij, np.round(ij)):
            return None
        ij = ij.astype(np.int64) - ij.astype(np.int64).min(axis=0)
        w, h = int(ij[:, 0].max()) + 1, int(ij[:, 1].max()) + 1
        if w * h > LATTICE_MAX_CELLS_PER_SPOT * n:
            return None
        cell = ij[:, 1] * w + ij[:, 0]
        if len(np.unique(cell)) != n:
            return None
        a = np.column_stack([ij.astype(np.float64), np.ones(n)])
        coef, *_ = np.linalg.lstsq(a, xy, rcond=None)
        step_i, step_j = coef[0], coef[1]  # µm per index step
        area = abs(step_i[0] * step_j[1] - step_i[1] * step_j[0])
        if area == 0:
            return None
        gap_j, gap_i = area / np.hypot(*step_i), area / np.hypot(*step_j)  # distance between lattice lines
        deviation = float(np.hypot(*(xy - a @ coef).T).max())
        if deviation > 0.25 * min(gap_i, gap_j):
            return None
        margin = 2 * deviation + 1e-9 * (radius + 1.0)
        reach_j, reach_i = int((radius + margin) // gap_j), int((radius + margin) // gap_i)
        dj, di = np.meshgrid(np.arange(-reach_j, reach_j + 1), np.arange(-reach_i, reach_i + 1), indexing="ij")
        length = np.hypot(di * step_i[0] + dj * step_j[0], di * step_i[1] + dj * step_j[1])
        kernel = (length <= radius - margin).astype(np.float64)
        kernel[reach_j, reach_i] = 0.0  # the spot itself
        between = (length > radius - margin) & (length <= radius + margin)
        between[reach_j, reach_i] = False
        border = [(int(a_), int(b_)) for a_, b_ in zip(dj[between], di[between])]
        return cls(cell, (h, w), kernel, border, xy, radius)

    def _partners(self, dj: int, di: int) -> tuple[np.ndarray, np.ndarray]:
        """Spots and their partners at index offset (dj, di) that lie within the radius on the real positions."""
        h, w = self.shape
        j, i = self.cell // w + dj, self.cell % w + di
        inside = (j >= 0) & (j < h) & (i >= 0) & (i < w)
        rows = np.flatnonzero(inside)
        partners = self.index[j[inside] * w + i[inside]]
        ok = partners >= 0
        rows, partners = rows[ok], partners[ok]
        near = np.hypot(*(self.xy[partners] - self.xy[rows]).T) <= self.radius
        return rows[near], partners[near]

    def _disc(self, values: np.ndarray) -> np.ndarray:
        """(N, g) sums of `values` over the kernel's offsets: one FFT convolution of the grid per gene."""
        from scipy import fft

        h, w = self.shape
        kh, kw = self.kernel.shape
        size = (fft.next_fast_len(h + kh - 1, real=True), fft.next_fast_len(w + kw - 1, real=True))
        if self._kernel_f is None or self._kernel_f[0] != size:
            self._kernel_f = (size, fft.rfft2(self.kernel, s=size))
        grid = np.zeros((values.shape[1], h * w), dtype=np.float64)
        grid[:, self.cell] = values.T
        # all cores (the engines are done by now); each 1-D transform runs on one thread, so the result
        # does not depend on their number
        spectrum = fft.rfft2(grid.reshape(-1, h, w), s=size, workers=-1) * self._kernel_f[1]
        full = fft.irfft2(spectrum, s=size, workers=-1)
        # the "same" part of the full convolution: output (y, x) is centred on grid cell (y, x)
        same = full[:, kh // 2:kh // 2 + h, kw // 2:kw // 2 + w].reshape(-1, h * w)
        return np.ascontiguousarray(same[:, self.cell].T)

    def sums(self, values: np.ndarray) -> np.ndarray:
        out = self._disc(values)
        for _, _, rows, partners in self.border:
            out[rows] += values[partners]
        return out
