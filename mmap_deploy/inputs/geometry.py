"""Checks that the spot coordinates fit the slide, before any patch is read.

Three things a tool that predicts from pixel geometry can see for itself:

- **Resolution from the spot lattice.** Visium, Visium HD and the original ST
  arrays (her2st) put their spots on a lattice of known pitch, and their
  tables carry each spot's array indices. A least-squares fit of pixel
  position on array index gives pixels per lattice step, hence µm per pixel
  (`fit_lattice`). A fit, not the nearest-neighbour distance: detection jitter
  biases a minimum distance low (her2st: ~273 px nearest neighbour against
  ~290 px per step from the fit). The run uses this value when the slide has
  no resolution of its own, and refuses a slide or ``--mpp`` value more than
  `MPP_TOLERANCE` away from it.
- **Swapped axes.** A lattice whose array columns run along the pixel rows,
  with the handedness flipped, is the lattice transposed: x and y swapped.
- **Spots on tissue.** An Otsu threshold on the saturation of a small
  thumbnail separates stained tissue from bright glass (`tissue_mask`). Few
  spots on tissue as given, and many more with x and y swapped, is a swap;
  few either way is a warning.

Vendor facts (`LATTICES`):
- Visium: spots 55 µm in diameter, 100 µm centre to centre, on a hexagonal
  lattice; ``array_col`` steps by 2 between neighbours of one row (so one
  column step is 50 µm) and rows are 100·√3/2 µm apart (10x Genomics, "What
  is the spatial resolution and configuration of the capture area of the
  Visium v1 Gene Expression Slide?"; Space Ranger, "Spatial outputs").
- Visium HD: square bins of ``bin_size_um`` (2, 8, 16 µm), one array step per
  bin; ``scalefactors_json.json`` records ``bin_size_um`` and
  ``microns_per_pixel`` (Space Ranger, Visium HD outputs, ``binned_outputs``).
- ST arrays (her2st): spots 100 µm in diameter, 200 µm centre to centre on a
  square grid (Ståhl et al., Science 353, 2016; Andersson et al., Nature
  Communications 12, 2021). Fitted on all 36 her2st sections: ~290 px per
  step for B1-H3 (0.69 µm/px), ~218 px for A1-A6.

Every refusal is one line that names the skip option (`--skip-geometry-checks`); with it, refusals become
warnings and the run goes on with the slide's (or ``--mpp``'s) resolution.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UserError
from ..options import spell

if TYPE_CHECKING:  # pragma: no cover
    from .coords import Spots
    from .slide import SlideReader

# The slide's (or --mpp's) resolution may differ this much from the lattice's.
MPP_TOLERANCE = 0.10
# Beyond this (and within MPP_TOLERANCE), the run goes on with a warning.
MPP_WARN_TOLERANCE = 0.05
# Tissue check: a spot is on tissue if at least this share of its patch is tissue.
PATCH_TISSUE_SHARE = 0.05
# Fewer spots than this share on tissue is "few".
FEW_ON_TISSUE = 0.5
# A swap is called when the swapped positions put at least this share on
# tissue, and this much more than the given ones (real tables give ~100%).
SWAPPED_ON_TISSUE = 0.9
SWAP_MARGIN = 0.1
# The mask is trusted only if the background class looks like bare glass:
# low saturation and bright.
GLASS_MAX_SATURATION = 0.15
GLASS_MIN_VALUE = 0.6
MASK_MAX_SIDE = 512
# A lattice fit needs this many spots, and drops spots this far off the fit
# (in multiples of the median residual) before fitting again.
MIN_LATTICE_SPOTS = 6
OUTLIER_FACTOR = 4.0


@dataclass(frozen=True)
class LatticeSpec:
    """A spot array's geometry: µm per step of the array's column and row index."""

    name: str
    um_per_col: float
    um_per_row: float
    pitch_um: float  # centre-to-centre distance of neighbouring spots

    def describe(self) -> str:
        return f"{self.name}, {self.pitch_um:g} µm pitch"


VISIUM = LatticeSpec("Visium hexagonal lattice", 50.0, 50.0 * math.sqrt(3.0), 100.0)
ST = LatticeSpec("ST array (her2st)", 200.0, 200.0, 200.0)


def visium_hd_lattice(bin_size_um: float) -> LatticeSpec:
    return LatticeSpec(f"Visium HD {bin_size_um:g} µm bins", bin_size_um, bin_size_um, bin_size_um)


# The lattice of each coordinates layout with array indices (Visium HD: see visium_hd_lattice).
LATTICES = {"visium": VISIUM, "visium-list": VISIUM, "her2st": ST}


@dataclass
class LatticeFit:
    """Pixels per array step along the array's column and row index, and what follows."""

    spec: LatticeSpec
    per_col: np.ndarray  # (2,) pixel (x, y) change per column-index step
    per_row: np.ndarray  # (2,) pixel (x, y) change per row-index step
    n_spots: int
    residual_px: float  # median distance of a spot from the fitted lattice

    @property
    def mpp_col(self) -> float:
        return self.spec.um_per_col / float(np.hypot(*self.per_col))

    @property
    def mpp_row(self) -> float:
        return self.spec.um_per_row / float(np.hypot(*self.per_row))

    @property
    def mpp(self) -> float:
        """µm per pixel: the geometric mean of the two axes' values."""
        return math.sqrt(self.mpp_col * self.mpp_row)

    @property
    def pitch_px(self) -> float:
        return self.spec.pitch_um / self.mpp

    @property
    def transposed(self) -> bool:
        """Array columns along pixel rows and array rows along pixel columns, handedness flipped:
        the lattice as x and y swapped would show it (a rotated image keeps its handedness)."""
        crossed = abs(self.per_col[1]) > abs(self.per_col[0]) and abs(self.per_row[0]) > abs(self.per_row[1])
        det = self.per_col[0] * self.per_row[1] - self.per_col[1] * self.per_row[0]
        return bool(crossed and det < 0)

    def source(self) -> str:
        return f"spot lattice ({self.spec.describe()}: {self.pitch_px:.1f} px per pitch)"

    def record(self) -> dict[str, Any]:
        return {
            "lattice": self.spec.name,
            "lattice_pitch_um": float(self.spec.pitch_um),
            "lattice_pitch_px": round(self.pitch_px, 3),
            "lattice_mpp": round(self.mpp, 5),
            "lattice_mpp_col": round(self.mpp_col, 5),
            "lattice_mpp_row": round(self.mpp_row, 5),
            "lattice_px_per_col_step": [round(float(v), 3) for v in self.per_col],
            "lattice_px_per_row_step": [round(float(v), 3) for v in self.per_row],
            "lattice_spots": int(self.n_spots),
            "lattice_residual_px": round(self.residual_px, 3),
            "lattice_transposed": self.transposed,
        }


def fit_lattice(xy: np.ndarray, array_xy: np.ndarray | None, spec: LatticeSpec | None) -> LatticeFit | None:
    """Least-squares fit of pixel position on array index; None without indices or enough spread.

    `xy` (N, 2) pixels, `array_xy` (N, 2) (column index, row index). Spots
    more than `OUTLIER_FACTOR` median residuals off the first fit are left out
    of the second.
    """
    if array_xy is None or spec is None or len(xy) < MIN_LATTICE_SPOTS:
        return None
    a = np.column_stack([array_xy, np.ones(len(xy))])
    if np.ptp(array_xy[:, 0]) == 0 or np.ptp(array_xy[:, 1]) == 0 or np.linalg.matrix_rank(a) < 3:
        return None
    keep = np.ones(len(xy), dtype=bool)
    for _ in range(2):
        coef, *_ = np.linalg.lstsq(a[keep], xy[keep], rcond=None)
        residual = np.hypot(*(xy - a @ coef).T)
        median = float(np.median(residual[keep]))
        refit = residual <= max(OUTLIER_FACTOR * median, 1e-9)
        if refit.sum() < MIN_LATTICE_SPOTS or np.linalg.matrix_rank(a[refit]) < 3:
            break
        keep = refit
    per_col, per_row = coef[0], coef[1]
    if np.hypot(*per_col) == 0 or np.hypot(*per_row) == 0:
        return None
    return LatticeFit(spec, per_col, per_row, int(keep.sum()), median)


def fallback_mpp(fit: LatticeFit | None, hd_mpp: float | None) -> tuple[float, str] | None:
    """(µm per pixel, its source) for a slide without its own: the spot lattice's, else the
    `microns_per_pixel` of a Visium HD bin folder's scale factors; None without either."""
    if fit is not None:
        return fit.mpp, fit.source()
    if hd_mpp:
        return hd_mpp, "scalefactors_json.json microns_per_pixel"
    return None


def resolution_problem(fit: LatticeFit, mpp: float, mpp_source: str, coords_path: Path,
                       fix: str = "") -> str | None:
    """The refusal line when the run's mpp is more than MPP_TOLERANCE from the lattice's, else None.

    `fix` ends the line: what the user can do (default: fix it, or skip the geometry checks).
    """
    ratio = mpp / fit.mpp
    if abs(ratio - 1.0) <= MPP_TOLERANCE:
        return None
    fix = fix or f"fix it, or pass {spell('skip_geometry_checks')} to run anyway"
    causes = []
    if mpp_source == spell("mpp") or "mpp column" in mpp_source:  # a resolution the user gave
        causes.append(f"a wrong {mpp_source} (the lattice says {fit.mpp:.3f})")
    if ratio < 1.0:
        causes.append(
            f"coordinates in the pixels of a downscaled image (spots are {ratio:.2f}x as far apart as this "
            "resolution predicts; use full-resolution coordinates, e.g. pxl_col/pxl_row_in_fullres)"
        )
    else:
        causes.append(f"a slide that is a {1 / ratio:.2f}x downscaled copy of the image the coordinates belong to")
    causes.append(f"a wrong array type (this table reads as {fit.spec.describe()})")
    return (
        f"{coords_path}: the spot lattice gives {fit.mpp:.3f} µm per pixel ({fit.spec.describe()} = "
        f"{fit.pitch_px:.1f} px), but the run's resolution is {mpp:.3f} µm per pixel from {mpp_source}, "
        f"{ratio:.2f}x the lattice's; likely {' or '.join(causes)}; {fix}"
    )


def resolution_warning(fit: LatticeFit, mpp: float, mpp_source: str, coords_path: Path) -> str | None:
    """A warning line when the run's mpp is more than MPP_WARN_TOLERANCE (but at most MPP_TOLERANCE)
    from the lattice's, else None."""
    off = mpp / fit.mpp - 1.0
    if abs(off) <= MPP_WARN_TOLERANCE or abs(off) > MPP_TOLERANCE:
        return None
    return (
        f"{coords_path}: the run's resolution, {mpp:.3f} µm per pixel from {mpp_source}, is {abs(off):.1%} "
        f"{'above' if off > 0 else 'below'} the spot lattice's {fit.mpp:.3f} ({fit.spec.describe()} = "
        f"{fit.pitch_px:.1f} px); the run goes on with {mpp:.3f}; check {mpp_source} (over "
        f"{MPP_TOLERANCE:.0%} off is refused)"
    )


def transposed_problem(fit: LatticeFit, coords_path: Path) -> str:
    return (
        f"{coords_path}: x and y look swapped: the spot array's columns run along the image's rows and its rows "
        f"along the image's columns ({fit.spec.name}); take x from the pixel-column field and y from the "
        f"pixel-row field (x = pxl_col_in_fullres / pixel_x), or pass {spell('skip_geometry_checks')} if the image is really "
        "transposed"
    )


# -- tissue -------------------------------------------------------------------------
def _otsu(values: np.ndarray, bins: int = 256) -> float:
    """Otsu's threshold of values in [0, 1] (maximises the between-class variance)."""
    hist, _ = np.histogram(values, bins=bins, range=(0.0, 1.0))
    p = hist.astype(np.float64) / max(1, hist.sum())
    w = np.cumsum(p)
    mu = np.cumsum(p * np.arange(bins))
    between = (mu[-1] * w - mu) ** 2 / np.maximum(w * (1.0 - w), 1e-12)
    return (int(np.argmax(between)) + 1.0) / bins


@dataclass
class TissueMask:
    """Tissue pixels of a small image of the slide; `scale` = mask pixels per level-0 pixel."""

    mask: np.ndarray  # (h, w) bool
    scale: float
    threshold: float
    source: str
    informative: bool  # False: no glass-like background, so every spot counts as on tissue
    reason: str = ""

    def record(self) -> dict[str, Any]:
        out = {"tissue_mask": self.source, "tissue_mask_informative": self.informative,
               "tissue_saturation_threshold": round(self.threshold, 4),
               "tissue_fraction": round(float(self.mask.mean()), 4) if self.informative else 1.0}
        if self.reason:
            out["tissue_mask_note"] = self.reason
        return out


def tissue_mask(rgb: np.ndarray, scale: float, source: str) -> TissueMask:
    """Otsu on HSV saturation; trusted only when the background class looks like glass."""
    img = np.asarray(rgb, dtype=np.float32) / 255.0
    value = img.max(axis=2)
    saturation = (value - img.min(axis=2)) / np.maximum(value, 1e-6)
    threshold = _otsu(saturation.ravel())
    mask = saturation >= threshold
    background = ~mask
    informative, reason = True, ""
    if not background.any() or not mask.any():
        informative, reason = False, "one class only"
    else:
        bg_s, bg_v = float(saturation[background].mean()), float(value[background].mean())
        if bg_s > GLASS_MAX_SATURATION or bg_v < GLASS_MIN_VALUE:
            informative = False
            reason = f"no glass-like background (background saturation {bg_s:.2f}, value {bg_v:.2f})"
    return TissueMask(mask, scale, threshold, source, informative, reason)


def _box_share(mask: np.ndarray, radius: int) -> np.ndarray:
    """Share of tissue in the (2r+1)^2 window around each mask pixel (summed-area table)."""
    m = np.pad(mask.astype(np.float32), ((radius + 1, radius), (radius + 1, radius)))
    c = m.cumsum(axis=0, dtype=np.float64).cumsum(axis=1)
    k = 2 * radius + 1
    return (c[k:, k:] - c[:-k, k:] - c[k:, :-k] + c[:-k, :-k]) / (k * k)


def tissue_shares(tm: TissueMask, xy: np.ndarray, patch_px: float, width: int, height: int) -> tuple[float, float]:
    """Share of spots whose patch is on tissue, as given and with x and y swapped."""
    if not tm.informative:
        return 1.0, 1.0
    radius = max(1, int(round(patch_px * tm.scale / 2)))
    share = _box_share(tm.mask, radius) >= PATCH_TISSUE_SHARE
    h, w = share.shape

    def on(x: np.ndarray, y: np.ndarray) -> float:
        inside = (x >= 0) & (y >= 0) & (x < width) & (y < height)
        cx = np.clip((x * tm.scale).astype(np.int64), 0, w - 1)
        cy = np.clip((y * tm.scale).astype(np.int64), 0, h - 1)
        return float((share[cy, cx] & inside).mean())

    return on(xy[:, 0], xy[:, 1]), on(xy[:, 1], xy[:, 0])


# -- all checks -----------------------------------------------------------------------
@dataclass
class GeometryReport:
    """What the checks found: `qc` goes to uns['mmap']['qc']; `warnings` to stderr."""

    qc: dict[str, Any] = field(default_factory=dict)
    warnings: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)  # refusals (warnings when skipped)


def check_geometry(spots: Spots, fit: LatticeFit | None, slide: SlideReader, mask: TissueMask | None, patch_um: float,
                   coords_path: Path, mpp_source: str, skip: bool = False) -> GeometryReport:
    """Run every check; raise UserError on the first problem unless `skip`.

    `mpp_source` names where the run's mpp came from (for the message);
    a lattice-derived mpp is not checked against itself.
    """
    report = GeometryReport()
    qc = report.qc
    qc["checks"] = f"skipped ({spell('skip_geometry_checks')})" if skip else "done"
    if fit is not None:
        qc.update(fit.record())
        if not mpp_source.startswith("spot lattice"):
            problem = resolution_problem(fit, float(slide.mpp), mpp_source, coords_path)
            qc["mpp_vs_lattice"] = round(float(slide.mpp) / fit.mpp, 4)
            if problem:
                report.problems.append(problem)
            else:
                warning = resolution_warning(fit, float(slide.mpp), mpp_source, coords_path)
                if warning:
                    report.warnings.append(warning)
        if abs(fit.mpp_col / fit.mpp_row - 1.0) > MPP_TOLERANCE:
            report.warnings.append(
                f"{coords_path}: the lattice's two axes disagree ({fit.mpp_col:.3f} vs {fit.mpp_row:.3f} µm "
                f"per pixel): is this table really a {fit.spec.name}?"
            )
    on = swapped = None
    if mask is not None:
        qc.update(mask.record())
        patch_px = patch_um / float(slide.mpp)
        on, swapped = tissue_shares(mask, spots.xy, patch_px, slide.width, slide.height)
        qc["on_tissue"] = round(on, 4)
        qc["on_tissue_if_swapped"] = round(swapped, 4)
    if fit is not None and fit.transposed:
        # a transposed lattice is a swap, unless the tissue clearly says the given orientation is right
        if on is None or not mask.informative or on < swapped + SWAP_MARGIN:
            report.problems.append(transposed_problem(fit, coords_path))
    if on is not None and mask.informative:
        if swapped >= SWAPPED_ON_TISSUE and swapped - on >= SWAP_MARGIN and on < SWAPPED_ON_TISSUE:
            report.problems.append(
                f"{coords_path}: x and y look swapped: {on:.0%} of the spots lie on tissue as given, "
                f"{swapped:.0%} with x and y swapped; x is the column and y the row (pxl_col_in_fullres is x), "
                f"fix the coordinates or pass {spell('skip_geometry_checks')} to run anyway"
            )
        elif on < FEW_ON_TISSUE:
            report.warnings.append(
                f"{coords_path}: only {on:.0%} of the spots lie on tissue ({swapped:.0%} with x and y swapped): "
                "check that the coordinates belong to this slide and are full-resolution pixels"
            )
    qc["problems"] = np.asarray(report.problems, dtype=str)
    if report.problems and not skip:
        raise UserError(report.problems[0])
    return report
