"""Image QC of each spot, from the views the encoder reads: blur, pen ink, blank glass.

A prediction is a number whatever the patch holds: a blurred strip, a fold of
ink or bare glass give values as clean as the rest. HistoQC and GrandQC flag
such regions on whole slides; here each spot is scored on exactly the pixels
its prediction came from, in the reader threads that make its views (no second
pass over the slide). Three scores per spot and one flag:

- ``qc_blur``: how out of focus the spot is, ``log10(var(grey) / var(L))``
  where L is the 4-neighbour Laplacian of the grey image (its interior pixels),
  on the view sampled at the model's own resolution (`blur_view`: the most
  magnified view that is not upsampled; the demo's central half, a UNI
  bundle's whole patch). The variance of the Laplacian is the classic focus
  measure (Pech-Pacheco et al. 2000, as HistoQC uses it); dividing by the
  grey variance makes it a ratio of fine detail to contrast, so a darker or
  paler stain (any gain and offset of the grey levels) does not move it. Higher
  is blurrier; +1 is ten times less fine detail for the same contrast. A
  uniform view (no contrast at all) scores 0.
- ``qc_ink``: the share of the whole patch (`whole_view`, box-averaged to about
  `QC_UM_PER_PX`) covered by pen ink: blue, green or black by the colour rules
  of tissue detection (`artefacts.py`), in regions of at least
  `INK_MIN_AREA_UM2` (dark nuclei are smaller).
- ``qc_background``: the share of the whole patch that is blank: near-white
  (`artefacts.blank`), or bright and smooth (grey at least
  `BACKGROUND_MIN_GREY`, local texture under `BACKGROUND_MAX_TEXTURE`: glass,
  with its stain haze). The empty inside of fat cells and lumens is blank too:
  this says how much of the patch shows no cells, not where the tissue ends
  (that is `obs['tissue_fraction']`).
- ``qc_pass``: every score within `QCThresholds` (`DEFAULT_THRESHOLDS`).

Everything is computed per spot from its own views, in float32 with per-spot
sums in float64: the same views give the same scores, bit for bit, whatever
the chunk they were read in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import numpy as np

from ..model.preprocess import ViewSpec
from .artefacts import black, blank, ink_coloured

QC_COLUMNS = ("qc_blur", "qc_ink", "qc_background")
PASS_COLUMN = "qc_pass"
# Ink and background are judged on the whole patch at about this resolution (the
# demo's view 0 is 1.375 µm/px; a UNI bundle's, 0.6875, is box-averaged by 2).
QC_UM_PER_PX = 1.375
INK_MIN_AREA_UM2 = 200.0  # ink/black regions smaller than this are not ink (a large nucleus is ~80 µm²)
BACKGROUND_MIN_GREY = 190.0  # blank glass is at least this bright (her2st glass: 208+, Aperio: 243+) ...
BACKGROUND_MAX_TEXTURE = 1.0  # ... and smoother than this: RMS of grey minus its 3 x 3 mean, over 5 x 5 px
TEXTURE_WINDOW_PX = 5
# Variances below this (grey levels²) are nothing: a flat view's ratio is 0, not 0/0.
VARIANCE_FLOOR = 1e-2
# A run warns when at least this share of its spots fails (a few blank spots at a tissue edge are not news).
WARN_SHARE = 0.01


@dataclass(frozen=True)
class QCThresholds:
    """Where a spot stops passing: `qc_pass` is True when every score is at or under its maximum.

    Set on the demo's training sections only (B4, C2-C5; benchmarks/RESULTS_training.md,
    "Image QC"): `blur_max` their 99.5th percentile rounded up, `ink_max` 5% of the
    patch, `background_max` a quarter of the patch showing cells.
    """

    blur_max: float = 1.6
    ink_max: float = 0.05
    background_max: float = 0.75

    def record(self) -> dict[str, float | str]:
        """The thresholds and the rule, for ``uns['mmap']['qc']['image']`` (no None)."""
        return {**{k: float(v) for k, v in asdict(self).items()},
                "rule": "qc_pass = qc_blur <= blur_max and qc_ink <= ink_max and qc_background <= background_max"}


DEFAULT_THRESHOLDS = QCThresholds()


def blur_view(spec: ViewSpec) -> int:
    """The view `qc_blur` is measured on: the most magnified one sampled at the model's mpp or coarser.

    A view whose crop is at least `input_size` patch pixels is not upsampled;
    of those, the smallest crop (ties: the first). When every view is
    upsampled, the largest crop.
    """
    crops = [spec.crop_px(v) for v in range(spec.n_views)]
    native = [v for v, c in enumerate(crops) if c >= spec.input_size]
    if native:
        return min(native, key=lambda v: (crops[v], v))
    return max(range(spec.n_views), key=lambda v: (crops[v], -v))


def whole_view(spec: ViewSpec) -> int:
    """The view ink and background are measured on: the largest crop (the whole patch; ties: the first)."""
    return max(range(spec.n_views), key=lambda v: (spec.crop_px(v), -v))


def _view_um(spec: ViewSpec, view: int) -> float:
    """µm per pixel of view `view`."""
    return spec.crop_px(view) * spec.mpp / spec.input_size


def _box_factor(spec: ViewSpec) -> int:
    return max(1, int(round(QC_UM_PER_PX / _view_um(spec, whole_view(spec)))))


def qc_record(spec: ViewSpec, thresholds: QCThresholds = DEFAULT_THRESHOLDS) -> dict[str, float | int | str]:
    """How the scores were made and judged, for ``uns['mmap']['qc']['image']``: views, scale, thresholds."""
    k = _box_factor(spec)
    return {
        **thresholds.record(),
        "blur_view": int(blur_view(spec)),
        "blur_um_per_px": float(_view_um(spec, blur_view(spec))),
        "area_view": int(whole_view(spec)),
        "area_um_per_px": float(k * _view_um(spec, whole_view(spec))),
        "ink_min_area_um2": float(INK_MIN_AREA_UM2),
        "background_min_grey": float(BACKGROUND_MIN_GREY),
        "background_max_texture": float(BACKGROUND_MAX_TEXTURE),
        "blur": "log10(var(grey) / var(Laplacian of grey)) on blur_view; higher is blurrier",
    }


def _per_spot_mean(x: np.ndarray) -> np.ndarray:
    """Mean of each spot's values (axis 0 is the spot), summed row by row (the same whatever the batch)."""
    flat = x.reshape(len(x), -1)
    return flat.sum(axis=1, dtype=np.float64) / flat.shape[1]


def _variance(x: np.ndarray) -> np.ndarray:
    """(N, ...) float32 -> (N,) variance of each spot's values (two passes, float32 sums row by row)."""
    flat = x.reshape(len(x), -1)
    d = flat - (flat.sum(axis=1) / np.float32(flat.shape[1]))[:, None]
    np.square(d, out=d)
    return d.sum(axis=1).astype(np.float64) / flat.shape[1]


def _blur(views: np.ndarray) -> np.ndarray:
    """(N, S, S, 3) uint8 -> (N,) log10(var(grey) / var(Laplacian)), over the Laplacian's interior."""
    # The channel sum, not the mean: the ratio does not depend on the scale (the floor is scaled to match).
    # Plane by plane: a numpy reduction over a last axis of 3 is several times slower.
    grey = views[..., 0].astype(np.float32)
    grey += views[..., 1]
    grey += views[..., 2]
    inner = grey[:, 1:-1, 1:-1]
    lap = 4.0 * inner
    lap -= grey[:, :-2, 1:-1]
    lap -= grey[:, 2:, 1:-1]
    lap -= grey[:, 1:-1, :-2]
    lap -= grey[:, 1:-1, 2:]
    floor = 9.0 * VARIANCE_FLOOR
    return np.log10(_variance(inner) + floor) - np.log10(_variance(lap) + floor)


def _box_planes(views: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(N, S, S, 3) uint8 -> the R, G, B planes, (N, S // k, S // k) float32 means of k x k blocks
    (rows and columns past the last whole block dropped)."""
    n, s = views.shape[0], views.shape[1] // k
    planes = []
    for c in range(3):
        x = views[..., c].astype(np.float32)
        if k > 1:
            x = x[:, : s * k, : s * k].reshape(n, s, k, s, k).mean(axis=(2, 4), dtype=np.float32)
        planes.append(np.ascontiguousarray(x))
    return planes[0], planes[1], planes[2]


def _ink(r: np.ndarray, g: np.ndarray, b: np.ndarray, min_px: float) -> np.ndarray:
    """(N, H, W) bool: ink pixels in 8-connected regions of at least `min_px` pixels, per spot."""
    from scipy import ndimage as ndi

    ink = ink_coloured(r, g, b) | black(r, g, b)
    if not ink.any():
        return ink
    structure = np.zeros((3, 3, 3), bool)
    structure[1] = True  # 8-connected within a spot, never across spots
    labels, n = ndi.label(ink, structure=structure)
    sizes = np.bincount(labels.ravel(), minlength=n + 1)
    keep = sizes >= min_px
    keep[0] = False
    return keep[labels]


def _smooth(grey: np.ndarray) -> np.ndarray:
    """(N, H, W) bool: local texture (RMS of grey minus its 3 x 3 mean, over a 5 x 5 window) under the maximum."""
    from scipy import ndimage as ndi

    detail = grey - ndi.uniform_filter(grey, size=(1, 3, 3), mode="nearest")
    energy = ndi.uniform_filter(detail * detail, size=(1, TEXTURE_WINDOW_PX, TEXTURE_WINDOW_PX), mode="nearest")
    return energy < np.float32(BACKGROUND_MAX_TEXTURE**2)


def spot_qc(views: np.ndarray, spec: ViewSpec) -> np.ndarray:
    """The image QC scores of a batch of spots, from their views.

    Parameters
    ----------
    views : numpy.ndarray
        (N, V, S, S, 3) uint8: each spot's views as `make_views` (or the band
        reader) makes them for `spec`.
    spec : ViewSpec
        The bundle's view definition.

    Returns
    -------
    numpy.ndarray
        (N, 3) float32: ``qc_blur``, ``qc_ink`` and ``qc_background`` per spot
        (the order of `QC_COLUMNS`; see the module docstring).
    """
    views = np.asarray(views)
    out = np.empty((len(views), len(QC_COLUMNS)), np.float32)
    if not len(views):
        return out
    out[:, 0] = _blur(views[:, blur_view(spec)])
    k = _box_factor(spec)
    r, g, b = _box_planes(views[:, whole_view(spec)], k)
    um_per_px = k * _view_um(spec, whole_view(spec))
    ink = _ink(r, g, b, INK_MIN_AREA_UM2 / um_per_px**2)
    grey = (r + g + b) / np.float32(3.0)
    background = ~ink & (blank(r, g, b) | ((grey >= np.float32(BACKGROUND_MIN_GREY)) & _smooth(grey)))
    out[:, 1] = _per_spot_mean(ink)
    out[:, 2] = _per_spot_mean(background)
    return out


def qc_pass(scores: np.ndarray, thresholds: QCThresholds = DEFAULT_THRESHOLDS) -> np.ndarray:
    """(N,) bool: every score of each spot at or under its threshold (a NaN score fails).

    Parameters
    ----------
    scores : numpy.ndarray
        (N, 3) as `spot_qc` returns them.
    thresholds : QCThresholds
        The maxima.

    Returns
    -------
    numpy.ndarray
        True where the spot passes.
    """
    # in float32, as the scores are stored: `adata.obs.qc_ink <= 0.05` gives the same answer
    s = np.asarray(scores, dtype=np.float32)
    t = np.asarray([thresholds.blur_max, thresholds.ink_max, thresholds.background_max], dtype=np.float32)
    return (s[:, 0] <= t[0]) & (s[:, 1] <= t[1]) & (s[:, 2] <= t[2])


def qc_columns(scores: np.ndarray, thresholds: QCThresholds = DEFAULT_THRESHOLDS) -> dict[str, np.ndarray]:
    """The obs columns: ``qc_blur``, ``qc_ink``, ``qc_background`` (float32) and ``qc_pass`` (bool).

    Parameters
    ----------
    scores : numpy.ndarray
        (N, 3) as `spot_qc` returns them.
    thresholds : QCThresholds
        What `qc_pass` checks.

    Returns
    -------
    dict
        Column name to (N,) array, in that order.
    """
    scores = np.asarray(scores, dtype=np.float32)
    out = {name: np.ascontiguousarray(scores[:, i]) for i, name in enumerate(QC_COLUMNS)}
    out[PASS_COLUMN] = qc_pass(scores, thresholds)
    return out


def qc_warning(scores: np.ndarray, thresholds: QCThresholds = DEFAULT_THRESHOLDS) -> str:
    """The line a run warns with (without the slide's name) when at least `WARN_SHARE` of its spots fail:
    how many, and on which score; '' when fewer fail. `scores` as `spot_qc` returns them."""
    s = np.asarray(scores, dtype=np.float32)
    failed = ~qc_pass(s, thresholds)
    n, k = len(s), int(failed.sum())
    if n == 0 or k < WARN_SHARE * n:
        return ""
    limits = np.asarray([thresholds.blur_max, thresholds.ink_max, thresholds.background_max], dtype=np.float32)
    over = [int((s[:, i] > limits[i]).sum()) for i in range(3)]
    reasons = [(over[0], f"blurred (qc_blur > {thresholds.blur_max:g})"),
               (over[1], f"under pen ink (qc_ink > {thresholds.ink_max:g})"),
               (over[2], f"mostly blank (qc_background > {thresholds.background_max:g})")]
    why = ", ".join(f"{c} {text}" for c, text in reasons if c)
    return f"{k} of {n} spots ({k / n:.0%}) fail the image QC: {why}; obs['qc_pass'] marks them"
