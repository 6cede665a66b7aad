"""Spot positions in µm for cached sections, and the neighbour smoothing chosen inside training folds.

Positions: a section's spot centres (level-0 pixels, from its spot table) times
its µm per pixel, found as `mmap-predict` finds it: the slide's own resolution
(or the manifest's mpp) when there is a slide, else the manifest's mpp, else
the spot lattice's (`geometry.fit_lattice`; her2st's A sections are imaged at
~0.92 µm/px, B-H at ~0.69). The smoothing itself is the runtime's
(`mmap_deploy.model.neighbours`).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from mmap_deploy.errors import UserError
from mmap_deploy.model.neighbours import Neighbours, NeighbourSmoothing

from .datasets import Section
from .metrics import evaluate

log = logging.getLogger(__name__)

# The grid the smoothing is chosen from. On ST's 200 µm square lattice, 250 µm
# reaches the 4 nearest neighbours, 300 µm the 8 (diagonals at 283 µm), 450 µm
# two rings (400 and 447 µm). Weight 0 is no smoothing.
RADII_UM = (250.0, 300.0, 450.0)
WEIGHTS = (0.0, 0.25, 0.5, 1.0, 2.0)
# Phase 2's default (`mmap-train phase2 --smooth-radius-um --smooth-weight`): what `choose_smoothing` picks
# with all 8 her2st training patients (mmap-train cv, benchmarks/RESULTS_training.md; issue 21).
DEFAULT_SMOOTHING = NeighbourSmoothing(radius_um=250.0, weight=1.0)


@dataclass
class SectionPositions:
    """Spot centres of one section in µm, and where its resolution came from."""

    section: str
    ids: list[str]
    xy_um: np.ndarray  # (N, 2) float64
    mpp: float
    mpp_source: str

    def xy_for(self, spot_ids: list[str]) -> np.ndarray:
        """(n, 2) positions of `spot_ids`, in that order; UserError naming the first unknown spot."""
        index = {s: i for i, s in enumerate(self.ids)}
        missing = [s for s in spot_ids if s not in index]
        if missing:
            raise UserError(f"section {self.section}: spot '{missing[0]}' has no position in its spot table "
                            f"({len(missing)} such spots)")
        return self.xy_um[np.array([index[s] for s in spot_ids], dtype=np.int64)]


def section_positions(section: Section) -> SectionPositions | None:
    """Every spot of the section (in-tissue or not) in µm; see the module docstring for the resolution.

    None when nothing gives the section's µm per pixel (no slide, no mpp, no spot lattice).
    """
    from .datasets import lattice_mpp, resolve_section_mpp, section_spots

    if section.coords is None:
        raise UserError(f"section {section.name}: no spot table, so no positions for its neighbours; "
                        "pass --spots (or a manifest with coordinates)")
    every = section_spots(section, all_spots=True)
    if section.has_image:
        mpp, source = resolve_section_mpp(section), "the slide (checked against the spot lattice)"
    elif section.mpp is not None:
        mpp, source = float(section.mpp), "the manifest's mpp column"
    else:
        mpp = lattice_mpp(section.coords, section.positions)
        if mpp is None:  # no slide, no mpp, no lattice: the caller says so and scores without neighbours
            return None
        source = "the spot lattice"
    return SectionPositions(section.name, list(every.ids), np.asarray(every.xy, np.float64) * mpp, float(mpp),
                            source)


def neighbour_means(pred: np.ndarray, labels: np.ndarray, xy_um: np.ndarray, radius_um: float) -> np.ndarray:
    """(n, G) float64: each spot's neighbours' mean of `pred` within its own section (own value without any)."""
    labels = np.asarray(labels)
    out = np.empty(pred.shape, dtype=np.float64)
    for s in dict.fromkeys(labels.tolist()):
        rows = np.flatnonzero(labels == s)
        out[rows] = Neighbours(xy_um[rows], radius_um).means(pred[rows])
    return out


def smooth_sections(pred: np.ndarray, labels: np.ndarray, xy_um: np.ndarray,
                    smoothing: NeighbourSmoothing) -> np.ndarray:
    """`pred` smoothed within each section (float32), as the runtime smooths one slide."""
    if not smoothing.active:
        return np.asarray(pred, dtype=np.float32)
    m = neighbour_means(pred, labels, xy_um, smoothing.radius_um)
    return ((pred.astype(np.float64) + smoothing.weight * m) / (1.0 + smoothing.weight)).astype(np.float32)


def choose_smoothing(folds: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]],
                     radii=RADII_UM, weights=WEIGHTS, select: str = "pcc_per_slide"
                     ) -> tuple[NeighbourSmoothing, dict[str, float]]:
    """The (radius, weight) with the best mean `select` over `folds` of (pred, target, labels, xy_um).

    The folds are out-of-fold predictions on the training patients (e.g. the
    ridge probe's inner leave-one-patient-out): nothing of the held-out
    patient. Ties go to the smaller weight, then the smaller radius; weight 0
    (no smoothing) is one of the choices. Returns the choice and every
    grid point's score ("R:w").
    """
    scores: dict[tuple[float, float], list[float]] = {(r, w): [] for r in radii for w in weights}
    for pred, target, labels, xy in folds:
        for r in radii:
            m = neighbour_means(pred, labels, xy, r)
            for w in weights:
                y = (pred.astype(np.float64) + w * m) / (1.0 + w)
                scores[(r, w)].append(evaluate(y, target, labels)[select])
    means = {k: float(np.nanmean(v)) if v else float("nan") for k, v in scores.items()}
    best = max(sorted(means, key=lambda k: (k[1], k[0])),
               key=lambda k: means[k] if np.isfinite(means[k]) else -np.inf)
    return NeighbourSmoothing(best[0], best[1]), {f"{r:g}:{w:g}": v for (r, w), v in means.items()}
