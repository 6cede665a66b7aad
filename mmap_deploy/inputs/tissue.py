"""Where the tissue is: detection on a low-resolution image of the slide, or the user's own mask.

`detect_tissue(slide)` finds the tissue of an H&E slide; `tissue_for(slide,
tissue_mask)` is the step a run takes: the user's mask if given
(`read_tissue_mask`, ``--tissue-mask FILE``: a binary PNG/TIFF, or GeoJSON as
QuPath and TRIDENT export it), else detection. Both give a `Tissue`: a boolean
mask at about `UM_PER_PX` µm per pixel, its pieces labelled 1..n, outlines and a
record; the type, its outlines and the user's masks live in
`mmap_deploy.inputs.tissue_mask`, and are importable from here too.

Method (detection)
------------------
What the field does: CLAM (Lu et al. 2021) thresholds the HSV saturation of a
low-resolution level (fixed or Otsu), median-blurs it, and keeps contours above an
area (``a_t``) with holes above an area (``a_h``); HistomicsTK and histolab
threshold a greyscale or deconvolved thumbnail with Otsu and remove small objects
and holes; histolab and LazySlide add RGB rules for blue, green and red pen ink.
Colour and brightness alone fail on slides like the her2st spatial-transcriptomics
scans: their glass carries the printed ST spot array and a pink stain haze as
saturated as pale, fat-rich tissue (glass saturation up to 0.21, fat-rich tissue
from 0.13: Otsu on saturation cuts such tissue into lace and picks up haze and
out-of-focus dust). What separates tissue from glass on all six her2st sections
is fine texture: at 8 µm per pixel, the RMS of grey minus its 3 x 3 mean, over a
40 µm window, is under 2 (of 255) on 99% of glass, haze and printed dots and over
7.5 on 99% of tissue (2.7 in the fattiest section, whose gaps the hole filling
closes). Smooth things (haze, dust out of focus, vignetting, uniform scanner
blocks, ink) have none.

So a pixel is tissue when its 40 µm window is textured (the RMS at least the
*threshold*) and stained (mean chroma, max(R,G,B) - min(R,G,B), at least
`MIN_CHROMA`: grey dust, scratches and black/grey edges are not). The threshold
adapts to the scan's noise: `TEXTURE_NOISE_FACTOR` times the
`NOISE_PERCENTILE`-th percentile of the texture over the slide (its glass),
clipped to [`TEXTURE_MIN`, `TEXTURE_MAX`]. Artefacts are first taken out of every
window, so their edges make no texture: ink by colour (H&E is pink to purple with
little green over red, G - R <= 26 and B - R <= 80 on her2st; blue and green ink
has G - R >= `INK_GREEN_RED` (or `INK_GREEN_RED_SHARE` of max(R,G,B) where dark)
or B - R >= `INK_BLUE_RED`; black ink and black out-of-field blocks are dark and
unsaturated), in regions of at least
`INK_MIN_AREA_MM2`; near-white out-of-field blocks (min channel >= `WHITE_MIN`);
each with a margin of `ARTEFACT_MARGIN_PX` for pixels that mix them with their
surroundings. Then, as in CLAM: an opening (a square of 2 x `OPEN_UM` + 1 px)
removes thin lines (printed frames, edges of strokes) and specks; the glass that
the window adds around the tissue's edge is trimmed (edge pixels within
`EDGE_MIN_DIFF` of the local glass colour); holes (fat, lumens) under
`MAX_HOLE_MM2` are filled and stay tissue; ink is cut out of the mask
(tissue under ink shows ink, not tissue); pieces under `MIN_AREA_MM2` are
dropped. The area defaults follow CLAM's presets at 20x (biopsy ``a_t = 1``:
0.066 mm²; ``a_h = 16``: 1 mm²).

The image is read from the coarsest pyramid level not coarser than `UM_PER_PX`
and box-averaged to about `UM_PER_PX` (a 100 000 x 100 000 px 40x slide: its
4 µm level, 6 250 px a side, never level 0); plain JPEG/PNG images are
box-averaged in memory. Everything is deterministic: the same slide gives the
same mask, bit for bit.

Pieces are the mask's 8-connected components (`tissue_mask.label_pieces`).

Limits: red ink looks like eosin and stays tissue; dark navy ink looks like dense
haematoxylin and is left out only where it is smooth (on glass); a stroke across
a section cuts it into pieces, and fat lobules it opens to the glass are no
longer holes (ink counts as glass when holes are filled, so that glass between
a stroke and the tissue never becomes a "hole"); smooth tissue (no texture at
8 µm) larger than `MAX_HOLE_MM2` and not enclosed by textured tissue is missed;
edges may lie up to ~1 mask pixel (8 µm) outside the tissue.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..options import spell
from .artefacts import (  # the colour rules, shared with the spots' image QC (spot_qc.py)
    BLACK_MAX_SATURATION,
    BLACK_MAX_VALUE,
    DARK_MAX_VALUE,
    INK_BLUE_RED,
    INK_GREEN_RED,
    INK_GREEN_RED_SHARE,
    WHITE_MIN,
    black,
    blank,
    ink_coloured,
)
from .outline import Ring
from .slide import SlideReader, _box_reduce  # noqa: F401 (_box_reduce: named here by the tests)
from .tissue_mask import (
    METHOD_DETECTED,
    UM_PER_PX,
    Tissue,
    area_share,
    label_pieces,
    read_tissue_mask,
)

__all__ = ["NoTissueError", "Ring", "Tissue", "UM_PER_PX", "detect_tissue", "read_tissue_mask", "tissue_for"]

# -- resolution and areas ------------------------------------------------------------
MIN_AREA_MM2 = 0.05  # pieces smaller than this are debris (CLAM biopsy preset a_t = 1: 0.066 mm² at 20x)
MAX_HOLE_MM2 = 1.0  # holes smaller than this are filled (CLAM a_h = 16: 1.05 mm² at 20x)
# -- tissue: texture and stain -------------------------------------------------------
TEXTURE_WINDOW_UM = 40.0  # side of the window for texture and chroma (5 px at 8 µm/px)
TEXTURE_NOISE_FACTOR = 6.0  # threshold = factor x the slide's low-percentile texture (its glass noise) ...
NOISE_PERCENTILE = 20.0
TEXTURE_MIN = 3.0  # ... clipped to these grey levels (0-255)
TEXTURE_MAX = 8.0
MIN_CHROMA = 10.0  # mean max(R,G,B) - min(R,G,B) a tissue window needs (0-255)
OPEN_UM = 24.0  # opening: structures narrower than ~2 x this are removed
EDGE_BACKGROUND_UM = 120.0  # window for the local glass colour next to the tissue's edge
EDGE_MIN_DIFF = 8.0  # an edge pixel within this of the local glass, in every channel, is glass (0-255)
# -- artefacts -------------------------------------------------------------------------
INK_MIN_AREA_MM2 = 0.01  # ink/black regions smaller than this are ignored (dark nuclei, specks)
ARTEFACT_MARGIN_PX = 1  # pixels around an artefact that mix it with its neighbours
# -- reading --------------------------------------------------------------------------
BLOCK_PX = 2048  # level pixels read at a time
READ_THREADS = 4


class NoTissueError(UserError):
    """Detection found no tissue on the slide (a `UserError`: the fix is a mask of the user's).

    A run that needs no tissue goes on with `Tissue.empty`.
    """


def no_tissue_error(source: str | Path, share_before: float, min_area_mm2: float) -> NoTissueError:
    """The one-line error for a slide where detection kept no tissue."""
    return NoTissueError(
        f"{source}: no tissue found: {share_before:.1%} of the slide looked like tissue before the filters "
        f"(ink, out-of-field blocks, pieces under {min_area_mm2:g} mm²); pass {spell('tissue_mask')} "
        "(a PNG/TIFF mask, or GeoJSON from QuPath or TRIDENT) with the tissue, or check that the slide "
        "is an H&E scan with tissue on it"
    )


# -- reading a low-resolution image ------------------------------------------------------
def _read_low_res(slide: SlideReader, um_per_px: float) -> tuple[np.ndarray, int, int, float, float]:
    """(rgb, level, k, scale_x, scale_y): `level` box-averaged by k to about `um_per_px`.

    The level is the coarsest one not coarser than `um_per_px`; plain images have
    level 0 only. Read in blocks of about `BLOCK_PX` level pixels, a few at a time.
    """
    target = um_per_px / slide.mpp  # level-0 px per mask px
    level = slide.level_for_downsample(target)
    lw, lh = (int(v) for v in slide.level_dimensions[level])
    k = max(1, math.floor(target / slide.level_downsamples[level] + 0.5))
    out = slide.read_level_reduced(level, k, block_px=BLOCK_PX, threads=READ_THREADS)
    return out, level, k, lw / (k * slide.width), lh / (k * slide.height)


# -- detection -----------------------------------------------------------------------------
def _odd(n: float) -> int:
    n = max(3, round(n))
    return n if n % 2 else n + 1


def _remove_small(mask: np.ndarray, min_px: float, structure: np.ndarray) -> np.ndarray:
    """`mask` without its connected components under `min_px` pixels."""
    from scipy import ndimage as ndi

    lab, n = ndi.label(mask, structure=structure)
    if n == 0:
        return mask
    areas = np.bincount(lab.ravel(), minlength=n + 1)
    keep = areas >= min_px
    keep[0] = False
    return keep[lab]


def _fill_holes(mask: np.ndarray, max_px: float) -> np.ndarray:
    """`mask` with its holes (4-connected background not touching the border) under `max_px` filled."""
    from scipy import ndimage as ndi

    lab, n = ndi.label(~mask)  # 4-connected background: the complement of 8-connected pieces
    if n == 0:
        return mask
    areas = np.bincount(lab.ravel(), minlength=n + 1)
    fill = areas < max_px
    fill[0] = False
    border = np.unique(np.concatenate([lab[0], lab[-1], lab[:, 0], lab[:, -1]]))
    fill[border] = False
    return mask | fill[lab]


def _planes(rgb: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The R, G and B planes as contiguous float32 (per-plane arithmetic is far faster than axis=2 reductions)."""
    return tuple(np.ascontiguousarray(rgb[..., i], dtype=np.float32) for i in range(3))


def _artefacts(r: np.ndarray, g: np.ndarray, b: np.ndarray, min_px: float) -> tuple[np.ndarray, np.ndarray]:
    """(ink, blank): ink-coloured or black regions of at least `min_px` pixels; near-white pixels."""
    ink = ink_coloured(r, g, b) | black(r, g, b)
    if ink.any():
        ink = _remove_small(ink, min_px, np.ones((3, 3), bool))
    return ink, blank(r, g, b)


def _window_mean(values: np.ndarray, valid: np.ndarray | None, norm: np.ndarray | None, size: int) -> np.ndarray:
    """Mean of `values` over the valid pixels of each size x size window (all pixels when `valid` is None)."""
    from scipy import ndimage as ndi

    if valid is None:
        return ndi.uniform_filter(values, size, mode="nearest")
    return ndi.uniform_filter(values * valid, size, mode="nearest") / norm


def _candidates(r: np.ndarray, g: np.ndarray, b: np.ndarray, excluded: np.ndarray, core: np.ndarray,
                window: int) -> tuple[np.ndarray, float, float]:
    """(candidate mask, texture threshold, noise level): pixels outside `core` whose window's pixels
    outside `excluded` are textured and stained."""
    from scipy import ndimage as ndi

    grey = (r + g + b) / np.float32(3.0)
    chroma = np.maximum(np.maximum(r, g), b) - np.minimum(np.minimum(r, g), b)
    if excluded.any():
        valid = (~excluded).astype(np.float32)
        n3 = np.maximum(ndi.uniform_filter(valid, 3, mode="nearest"), np.float32(1e-6))
        n = ndi.uniform_filter(valid, window, mode="nearest")
        enough = n >= 0.5  # at least half of the window is valid
        nn = np.where(enough, n, np.float32(1.0))
    else:
        valid = n3 = nn = None
        enough = np.ones(r.shape, bool)
    # High-pass: grey minus the mean of its valid 3 x 3 neighbours; smooth gradients
    # (out-of-focus dust, haze, vignetting) leave next to nothing.
    detail = grey - _window_mean(grey, valid, n3, 3)
    if valid is not None:
        detail *= valid
    rms = np.sqrt(np.maximum(_window_mean(detail * detail, None, None, window) / (1 if nn is None else nn), 0))
    cm = _window_mean(chroma, valid, nn, window)
    usable = enough & ~excluded
    sample = rms[::2, ::2][usable[::2, ::2]]  # every 4th pixel: plenty for a percentile
    noise = float(np.percentile(sample, NOISE_PERCENTILE)) if sample.size else 0.0
    threshold = float(min(max(TEXTURE_NOISE_FACTOR * noise, TEXTURE_MIN), TEXTURE_MAX))
    return enough & ~core & (rms >= threshold) & (cm >= MIN_CHROMA), threshold, noise


def _trim_edges(planes, mask: np.ndarray, excluded: np.ndarray, spread: int, window: int) -> np.ndarray:
    """`mask` without the glass that the texture window adds around tissue.

    In the band of `spread` pixels inside the mask's edges, a pixel stays only if
    its colour differs from the local glass (the mean of the valid non-mask pixels
    in a `window` around it) by at least `EDGE_MIN_DIFF` in some channel.
    """
    from scipy import ndimage as ndi

    band = mask & ~ndi.minimum_filter(mask.view(np.uint8), 2 * spread + 1, mode="nearest").view(bool)
    if not band.any():
        return mask
    # Only the rows and columns around the band matter.
    rows, cols = np.flatnonzero(band.any(axis=1)), np.flatnonzero(band.any(axis=0))
    m = window // 2 + 1
    y0, y1 = max(0, rows[0] - m), min(mask.shape[0], rows[-1] + m + 1)
    x0, x1 = max(0, cols[0] - m), min(mask.shape[1], cols[-1] + m + 1)
    box = (slice(y0, y1), slice(x0, x1))
    glass = (~mask[box] & ~excluded[box]).astype(np.float32)
    n = ndi.uniform_filter(glass, window, mode="nearest")
    known = n > 0.05
    nn = np.where(known, n, np.float32(1.0))
    diff = np.zeros(glass.shape, np.float32)
    for plane in planes:
        ch = plane[box]
        np.maximum(diff, np.abs(ch - ndi.uniform_filter(ch * glass, window, mode="nearest") / nn), out=diff)
    out = mask.copy()
    out[box] &= ~(band[box] & known & (diff < EDGE_MIN_DIFF))
    return out


def _open(mask: np.ndarray, radius: int) -> np.ndarray:
    """Binary opening with a (2r+1)-square (separable min/max filters; the image's edges extend the mask)."""
    from scipy import ndimage as ndi

    if radius < 1:
        return mask
    size = 2 * radius + 1
    m = ndi.minimum_filter(mask.view(np.uint8), size, mode="nearest")
    return ndi.maximum_filter(m, size, mode="nearest").view(bool)


def detect_tissue(slide, *, min_area_mm2: float = MIN_AREA_MM2, max_hole_mm2: float = MAX_HOLE_MM2,
                  um_per_px: float = UM_PER_PX) -> Tissue:
    """Find the tissue of an H&E slide (see the module docstring).

    Reads one pyramid level at about `um_per_px`, never level 0 when a coarser
    level will do. Deterministic: the same slide gives the same mask, bit for bit.

    Parameters
    ----------
    slide : SlideReader
        The open slide (`open_slide`); it needs a resolution (``slide.mpp``).
    min_area_mm2 : float
        Pieces smaller than this are dropped (debris).
    max_hole_mm2 : float
        Holes smaller than this are filled (fat, lumens).
    um_per_px : float
        The mask's resolution in µm per pixel.

    Returns
    -------
    Tissue
        Method ``"detected"``, with the parameters and the texture threshold used.

    Raises
    ------
    NoTissueError
        No tissue was found (the message gives the share that looked like tissue).
    UserError
        `um_per_px` not a positive number.
    """
    if not (um_per_px > 0 and math.isfinite(um_per_px)):
        raise UserError(f"tissue detection: um_per_px must be a positive number, not {um_per_px!r}")
    t0 = time.perf_counter()
    rgb, level, k, sx, sy = _read_low_res(slide, um_per_px)
    px_mm2 = (slide.mpp / sx) * (slide.mpp / sy) / 1e6  # area of one mask pixel
    res = slide.mpp / math.sqrt(sx * sy)  # µm per mask pixel
    window = _odd(TEXTURE_WINDOW_UM / res)
    radius = max(1, round(OPEN_UM / res))

    planes = _planes(rgb)
    ink, blank = _artefacts(*planes, INK_MIN_AREA_MM2 / px_mm2)
    core = ink | blank
    excluded = core
    if ARTEFACT_MARGIN_PX > 0 and core.any():
        excluded = _dilate(core, ARTEFACT_MARGIN_PX)
    candidate, threshold, noise = _candidates(*planes, excluded, core, window)
    share_before = float(candidate.mean())
    mask = _open(candidate, radius)
    mask = _trim_edges(planes, mask, excluded, spread=1 + window // 2, window=_odd(EDGE_BACKGROUND_UM / res))
    mask = _fill_holes(mask, max_hole_mm2 / px_mm2) & ~ink
    labels, n = label_pieces(mask, min_area_mm2 / px_mm2)
    mask = labels > 0
    if n == 0:
        raise no_tissue_error(slide.path, _slide_share(share_before, mask.shape, sx, sy, slide), min_area_mm2)
    area = float(mask.sum()) * px_mm2
    params = {
        "um_per_px": float(um_per_px), "min_area_mm2": float(min_area_mm2), "max_hole_mm2": float(max_hole_mm2),
        "texture_window_um": TEXTURE_WINDOW_UM, "texture_window_px": window, "texture_noise": round(noise, 4),
        "texture_noise_factor": TEXTURE_NOISE_FACTOR, "noise_percentile": NOISE_PERCENTILE,
        "texture_min": TEXTURE_MIN, "texture_max": TEXTURE_MAX, "min_chroma": MIN_CHROMA,
        "open_um": OPEN_UM, "open_radius_px": radius, "edge_background_um": EDGE_BACKGROUND_UM,
        "edge_min_diff": EDGE_MIN_DIFF, "ink_green_red": INK_GREEN_RED, "ink_blue_red": INK_BLUE_RED,
        "ink_green_red_share": INK_GREEN_RED_SHARE,
        "black_max_value": BLACK_MAX_VALUE, "black_max_saturation": BLACK_MAX_SATURATION,
        "dark_max_value": DARK_MAX_VALUE, "white_min": WHITE_MIN, "ink_min_area_mm2": INK_MIN_AREA_MM2,
        "artefact_margin_px": ARTEFACT_MARGIN_PX, "box_factor": k,
        "ink_share": round(float(ink.mean()), 6), "blank_share": round(float(blank.mean()), 6),
    }
    return Tissue(
        mask=mask, labels=labels, scale_x=sx, scale_y=sy, method=METHOD_DETECTED, params=params,
        threshold=threshold, area_mm2=area, pieces=n, seconds=time.perf_counter() - t0, level=level,
        source=str(slide.path), tissue_share=area_share(area, slide),
        mpp=float(slide.mpp), share_before_filters=_slide_share(share_before, mask.shape, sx, sy, slide),
    )


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    from scipy import ndimage as ndi

    return ndi.maximum_filter(mask.view(np.uint8), 2 * radius + 1, mode="nearest").view(bool)


def _slide_share(mask_share: float, shape: tuple[int, int], sx: float, sy: float, slide) -> float:
    """A share of the mask's pixels as a share of the slide's area (the mask overhangs by < 1 px)."""
    mask_area = shape[0] * shape[1] / (sx * sy)
    return float(min(1.0, mask_share * mask_area / (slide.width * slide.height)))


# -- the run's tissue --------------------------------------------------------------------------
def tissue_for(slide, tissue_mask: str | Path | None = None) -> Tissue:
    """The tissue of `slide`: the user's mask if `tissue_mask` is given, else detected.

    The step every run takes before it lays a grid (``--tissue-mask FILE`` or none).

    Parameters
    ----------
    slide : SlideReader
        The open slide (`open_slide`).
    tissue_mask : str or Path, optional
        A binary PNG/TIFF or GeoJSON in level-0 pixels (`read_tissue_mask`);
        None: `detect_tissue`.

    Returns
    -------
    Tissue
        The mask, its pieces and how it was made (``method``).

    Raises
    ------
    NoTissueError
        Detection found no tissue.
    UserError
        An unusable mask, or a resolution detection cannot work at.
    """
    if tissue_mask is not None:
        return read_tissue_mask(tissue_mask, slide)
    return detect_tissue(slide)
