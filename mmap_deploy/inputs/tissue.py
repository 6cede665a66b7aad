"""Where the tissue is: detection on a low-resolution image of the slide, or the user's own mask.

`detect_tissue(slide)` finds the tissue of an H&E slide; `read_tissue_mask(path,
slide)` reads the user's own (``--tissue-mask FILE``: a binary PNG/TIFF, or GeoJSON
as QuPath and TRIDENT export it). Both return a `Tissue`: a boolean mask at about
`UM_PER_PX` µm per pixel, its pieces labelled 1..n, the scale to level-0 pixels,
outlines in level-0 pixels (`Tissue.polygons`, `Tissue.to_geojson`) and a record
for the output (`Tissue.record`, for ``uns['mmap']['tissue']``).

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

Pieces
------
Pieces are the 8-connected components of the mask, numbered 1..n by descending
area, ties by the top row and then the left column of their bounding box.
User masks are used as given (no area filter, no hole filling): they are the
user's decision; only empty masks are refused.

Limits: red ink looks like eosin and stays tissue; dark navy ink looks like dense
haematoxylin and is left out only where it is smooth (on glass); a stroke across
a section cuts it into pieces, and fat lobules it opens to the glass are no
longer holes (ink counts as glass when holes are filled, so that glass between
a stroke and the tissue never becomes a "hole"); smooth tissue (no texture at
8 µm) larger than `MAX_HOLE_MM2` and not enclosed by textured tissue is missed;
edges may lie up to ~1 mask pixel (8 µm) outside the tissue.
"""

from __future__ import annotations

import json
import math
import os
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UserError
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

# -- resolution and areas ------------------------------------------------------------
UM_PER_PX = 8.0  # mask resolution (µm per pixel)
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
# -- reading and outlines -------------------------------------------------------------
BLOCK_PX = 2048  # level pixels read at a time
READ_THREADS = 4
MASK_ASPECT_TOLERANCE = 0.01  # a user mask's aspect ratio may differ this much from the slide's
MAX_MASK_PIXELS = 40_000 * 40_000  # a user mask image larger than this is refused
OUTLINE_TOLERANCE_PX = 0.75  # Douglas-Peucker tolerance (mask px); doubled until ...
MAX_OUTLINE_VERTICES = 4000  # ... the outline of the whole slide has at most this many vertices

METHOD_DETECTED = "detected"
METHOD_IMAGE = "mask:image"
METHOD_GEOJSON = "mask:geojson"
TISSUE_MASK_FLAG = "--tissue-mask FILE"
GEOJSON_SUFFIXES = (".geojson", ".json")

_PIL_LOCK = threading.Lock()


class NoTissueError(UserError):
    """Detection found no tissue on the slide."""


def no_tissue_error(source: str | Path, share_before: float, min_area_mm2: float) -> NoTissueError:
    """The one-line error for a slide where detection kept no tissue."""
    return NoTissueError(
        f"{source}: no tissue found: {share_before:.1%} of the slide looked like tissue before the filters "
        f"(ink, out-of-field blocks, pieces under {min_area_mm2:g} mm²); pass {TISSUE_MASK_FLAG} "
        "(a PNG/TIFF mask, or GeoJSON from QuPath or TRIDENT) with the tissue, or check that the slide "
        "is an H&E scan with tissue on it"
    )


@dataclass
class Ring:
    """One closed outline in level-0 pixels: (n, 2) float64 x, y (not repeating the first vertex)."""

    xy: np.ndarray
    piece: int  # the piece's label (1..n)
    hole: bool  # True: a hole of the piece; False: its outer boundary


@dataclass
class Tissue:
    """Tissue of a slide: a boolean mask, its labelled pieces, and how it was made.

    Mask pixel (i, j) covers level-0 x in [j / scale_x, (j + 1) / scale_x) and y in
    [i / scale_y, (i + 1) / scale_y).

    Attributes
    ----------
    mask : numpy.ndarray
        (h, w) bool: True where there is tissue.
    labels : numpy.ndarray
        (h, w) int32: 0 background, 1..`pieces` the pieces, by descending area.
    scale_x, scale_y : float
        Mask pixels per level-0 pixel along x and y.
    method : str
        ``"detected"``, ``"mask:image"`` or ``"mask:geojson"``.
    params : dict
        The parameters it was made with (the detection's, or how a user's mask was read).
    threshold : float
        The texture threshold in grey levels; -1.0 for a user's mask.
    area_mm2 : float
        Tissue area in mm².
    pieces : int
        Number of pieces.
    seconds : float
        Seconds the detection (or reading the mask) took.
    level : int
        The pyramid level read; -1 for a user's mask.
    source : str
        The mask file, or the slide for detection.
    tissue_share : float
        Share of the slide's area that is tissue.
    mpp : float
        The slide's level-0 µm per pixel.
    share_before_filters : float
        Detection: the share that looked like tissue before the filters (-1.0 otherwise).
    """

    mask: np.ndarray
    labels: np.ndarray
    scale_x: float
    scale_y: float
    method: str
    params: dict[str, Any]
    threshold: float
    area_mm2: float
    pieces: int
    seconds: float
    level: int
    source: str
    tissue_share: float
    mpp: float
    share_before_filters: float = -1.0
    _rings: list[Ring] | None = field(default=None, repr=False, compare=False)

    @property
    def um_per_px(self) -> float:
        """The mask's resolution in µm per pixel (geometric mean of the two axes)."""
        return self.mpp / math.sqrt(self.scale_x * self.scale_y)

    def piece_areas_mm2(self) -> list[float]:
        """Area of each piece 1..n in mm².

        Returns
        -------
        list of float
            The areas, piece 1 first.
        """
        px_mm2 = (self.mpp / self.scale_x) * (self.mpp / self.scale_y) / 1e6
        counts = np.bincount(self.labels.ravel(), minlength=self.pieces + 1)[1:]
        return [float(c) * px_mm2 for c in counts]

    def polygons(self) -> list[Ring]:
        """Outlines of the pieces in level-0 pixels: per piece one outer ring, then its holes.

        Traced along the mask's pixel edges (8-connected pieces: a ring passes
        through a corner that joins two pixels), collinear vertices dropped, then
        simplified (Douglas-Peucker, `OUTLINE_TOLERANCE_PX` mask px, doubled until
        the whole slide has at most `MAX_OUTLINE_VERTICES` vertices). Ordered by
        piece, the outer ring first.

        Returns
        -------
        list of Ring
            Each with ``xy`` ((n, 2) float64 x, y in level-0 pixels, the first
            vertex not repeated), ``piece`` (its label) and ``hole``.
        """
        if self._rings is None:
            self._rings = _outline(self.labels, self.scale_x, self.scale_y)
        return [Ring(r.xy.copy(), r.piece, r.hole) for r in self._rings]

    def to_geojson(self) -> dict[str, Any]:
        """A GeoJSON FeatureCollection, one Polygon per piece, in level-0 pixels (what `read_tissue_mask` reads).

        Returns
        -------
        dict
            The FeatureCollection; each Feature's ``properties`` hold its
            ``piece``; coordinates rounded to 0.01 px. ``json.dump`` it to a
            ``.geojson`` file for QuPath or for ``tissue_mask``.
        """
        features = []
        by_piece: dict[int, list[Ring]] = {}
        for ring in self.polygons():
            by_piece.setdefault(ring.piece, []).append(ring)
        for piece, rings in sorted(by_piece.items()):
            coords = []
            for ring in sorted(rings, key=lambda r: r.hole):
                pts = [[round(float(x), 2), round(float(y), 2)] for x, y in ring.xy]
                coords.append(pts + pts[:1])
            features.append({"type": "Feature", "properties": {"piece": piece, "objectType": "annotation"},
                             "geometry": {"type": "Polygon", "coordinates": coords}})
        return {"type": "FeatureCollection", "features": features}

    def record(self) -> dict[str, Any]:
        """What goes into ``uns['mmap']['tissue']``: str/int/float/bool and lists only, never None.

        Returns
        -------
        dict
            The attributes but the arrays (rounded), with ``piece_areas_mm2``,
            ``mask_um_per_px`` and ``mask_shape``.
        """
        return {
            "method": self.method,
            "params": _plain(self.params),
            "threshold": float(round(self.threshold, 4)),
            "area_mm2": float(round(self.area_mm2, 4)),
            "piece_areas_mm2": [float(round(a, 4)) for a in self.piece_areas_mm2()],
            "pieces": int(self.pieces),
            "tissue_share": float(round(self.tissue_share, 5)),
            "share_before_filters": float(round(self.share_before_filters, 5)),
            "seconds": float(round(self.seconds, 3)),
            "level": int(self.level),
            "mask_um_per_px": float(round(self.um_per_px, 4)),
            "mask_shape": [int(self.mask.shape[0]), int(self.mask.shape[1])],
            "scale_x": float(self.scale_x),
            "scale_y": float(self.scale_y),
            "source": str(self.source),
        }


def _plain(value: Any) -> Any:
    """Parameters as h5ad stores them: no None, numpy scalars as Python ones."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value if v is not None]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return str(value)


# -- reading a low-resolution image ------------------------------------------------------
def _box_reduce(rgb: np.ndarray, k: int) -> np.ndarray:
    """Mean of k x k blocks (edge pixels repeated to fill the last partial block), uint8."""
    if k == 1:
        return np.ascontiguousarray(rgb)
    h, w = rgb.shape[:2]
    ph, pw = -h % k, -w % k
    if ph or pw:
        rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode="edge")
    hh, ww = rgb.shape[0] // k, rgb.shape[1] // k
    # Rows of each block first (contiguous memory), then columns: faster than one 4-d sum, same result.
    rows = rgb.reshape(hh, k, rgb.shape[1], 3).sum(axis=1, dtype=np.uint32)
    sums = rows.reshape(hh, ww, k, 3).sum(axis=2, dtype=np.uint32)
    return ((sums + (k * k) // 2) // (k * k)).astype(np.uint8)


def _read_low_res(slide, um_per_px: float) -> tuple[np.ndarray, int, int, float, float]:
    """(rgb, level, k, scale_x, scale_y): `level` box-averaged by k to about `um_per_px`.

    The level is the coarsest one not coarser than `um_per_px`; plain images have
    level 0 only. Read in blocks of about `BLOCK_PX` level pixels, a few at a time.
    """
    target = um_per_px / slide.mpp  # level-0 px per mask px
    downsamples = tuple(getattr(slide, "level_downsamples", (1.0,)))
    dims = tuple(getattr(slide, "level_dimensions", ((slide.width, slide.height),)))
    level = slide.level_for_downsample(target) if hasattr(slide, "level_for_downsample") else 0
    lw, lh = (int(v) for v in dims[level])
    k = max(1, math.floor(target / downsamples[level] + 0.5))
    block = k * max(1, BLOCK_PX // k)
    out = np.empty((-(-lh // k), -(-lw // k), 3), np.uint8)
    jobs = [(top, left) for top in range(0, lh, block) for left in range(0, lw, block)]

    def read(job: tuple[int, int]) -> None:
        top, left = job
        w, h = min(block, lw - left), min(block, lh - top)
        region = slide.read_level_region(level, left, top, w, h)
        out[top // k : top // k + -(-h // k), left // k : left // k + -(-w // k)] = _box_reduce(region, k)

    if len(jobs) == 1:
        read(jobs[0])
    else:
        with ThreadPoolExecutor(max_workers=max(1, min(READ_THREADS, os.cpu_count() or 1, len(jobs)))) as pool:
            list(pool.map(read, jobs))
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


def _label_pieces(mask: np.ndarray, min_px: float = 0) -> tuple[np.ndarray, int]:
    """8-connected pieces of at least `min_px` pixels, numbered 1..n by descending area, ties by
    bounding-box top, then left; smaller ones become background."""
    from scipy import ndimage as ndi

    lab, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return lab.astype(np.int32), 0
    areas = np.bincount(lab.ravel(), minlength=n + 1)
    boxes = ndi.find_objects(lab)
    keep = [i for i in range(1, n + 1) if areas[i] >= min_px]
    order = sorted(keep, key=lambda i: (-int(areas[i]), boxes[i - 1][0].start, boxes[i - 1][1].start))
    lut = np.zeros(n + 1, np.int32)
    if order:
        lut[np.array(order)] = np.arange(1, len(order) + 1, dtype=np.int32)
    return lut[lab], len(order)


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
    """Find the tissue of an H&E slide (see the module docstring); `NoTissueError` if there is none.

    `slide` is a `SlideReader` (`open_slide`). Reads one pyramid level at about
    `um_per_px`, never level 0 when a coarser level will do.
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
    labels, n = _label_pieces(mask, min_area_mm2 / px_mm2)
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
        source=str(slide.path), tissue_share=_tissue_share(area, slide),
        mpp=float(slide.mpp), share_before_filters=_slide_share(share_before, mask.shape, sx, sy, slide),
    )


def _dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    from scipy import ndimage as ndi

    return ndi.maximum_filter(mask.view(np.uint8), 2 * radius + 1, mode="nearest").view(bool)


def _slide_share(mask_share: float, shape: tuple[int, int], sx: float, sy: float, slide) -> float:
    """A share of the mask's pixels as a share of the slide's area (the mask overhangs by < 1 px)."""
    mask_area = shape[0] * shape[1] / (sx * sy)
    return float(min(1.0, mask_share * mask_area / (slide.width * slide.height)))


def _tissue_share(area_mm2: float, slide) -> float:
    slide_mm2 = slide.width * slide.height * slide.mpp * slide.mpp / 1e6
    return float(min(1.0, area_mm2 / slide_mm2)) if slide_mm2 > 0 else 0.0


# -- the user's mask ---------------------------------------------------------------------------
def _is_geojson(path: Path) -> bool:
    if path.suffix.lower() in GEOJSON_SUFFIXES:
        return True
    try:
        with open(path, "rb") as fh:
            head = fh.read(64).lstrip()
    except OSError:
        return False
    return head[:1] in (b"{", b"[")


def read_tissue_mask(path: str | Path, slide, *, um_per_px: float = UM_PER_PX) -> Tissue:
    """The user's tissue mask for `slide` (replaces detection); `UserError` if unusable.

    A binary image (PNG, TIFF, ...; nonzero = tissue, alpha 0 = background) of
    the slide's aspect ratio (within `MASK_ASPECT_TOLERANCE`), any size: it is
    scaled to the slide (images finer than `um_per_px` are reduced to it, by
    majority). Or GeoJSON in level-0 pixels as QuPath and TRIDENT export it: a
    FeatureCollection, Feature, list of features, or bare geometry; Polygon and
    MultiPolygon (holes are not tissue), other geometries ignored; rasterised at
    about `um_per_px`. Pieces are labelled as in detection; no area filter.
    """
    t0 = time.perf_counter()
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: tissue mask not found; check the path given to {TISSUE_MASK_FLAG.split()[0]}")
    if _is_geojson(path):
        mask, sx, sy, params = _geojson_mask(path, slide, um_per_px)
        method = METHOD_GEOJSON
    else:
        mask, sx, sy, params = _image_mask(path, slide, um_per_px)
        method = METHOD_IMAGE
    labels, n = _label_pieces(mask)
    px_mm2 = (slide.mpp / sx) * (slide.mpp / sy) / 1e6
    area = float(mask.sum()) * px_mm2
    params["um_per_px"] = float(um_per_px)
    return Tissue(
        mask=mask, labels=labels, scale_x=sx, scale_y=sy, method=method, params=params, threshold=-1.0,
        area_mm2=area, pieces=n, seconds=time.perf_counter() - t0, level=-1, source=str(path),
        tissue_share=_tissue_share(area, slide), mpp=float(slide.mpp),
    )


def _mask_from_pixels(image) -> np.ndarray:
    """Nonzero pixels of a PIL image (any channel but alpha); alpha 0 is background."""
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode == "1":
        return np.asarray(image.convert("L")) > 0
    a = np.asarray(image)
    if a.ndim == 2:
        return a != 0
    if mode in ("RGBA", "LA", "PA"):
        return (a[..., :-1] != 0).any(axis=2) & (a[..., -1] != 0)
    return (a != 0).any(axis=2)


def _image_mask(path: Path, slide, um_per_px: float) -> tuple[np.ndarray, float, float, dict]:
    from PIL import Image, UnidentifiedImageError

    with _PIL_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            image = Image.open(path)
        except UnidentifiedImageError:
            raise UserError(
                f"{path}: not an image or GeoJSON; the tissue mask must be a binary PNG/TIFF "
                "(nonzero = tissue) or GeoJSON polygons in level-0 pixels (QuPath, TRIDENT)"
            ) from None
        except Exception as exc:  # noqa: BLE001 (PIL raises assorted errors on damaged headers)
            raise UserError(f"{path}: cannot read the tissue mask ({exc}); check that the file is complete") from None
        finally:
            Image.MAX_IMAGE_PIXELS = old
    with image:
        mw, mh = image.size
        if mw * mh > MAX_MASK_PIXELS:
            raise UserError(f"{path}: a {mw}x{mh} px tissue mask is too large; save it smaller (e.g. at 8 µm per pixel)")
        ratio = (mw / mh) / (slide.width / slide.height)
        if abs(ratio - 1.0) > MASK_ASPECT_TOLERANCE:
            raise UserError(
                f"{path}: tissue mask is {mw}x{mh} px (aspect {mw / mh:.4f}) but the slide is "
                f"{slide.width}x{slide.height} px (aspect {slide.width / slide.height:.4f}); the mask must cover "
                "the whole slide: export it from the same slide, at any size with the same aspect ratio"
            )
        try:
            mask = _mask_from_pixels(image)
        except Exception as exc:  # noqa: BLE001 (PIL reports corrupt data only when decoding)
            raise UserError(f"{path}: cannot decode the tissue mask ({exc}); re-export it as a binary PNG") from None
    if not mask.any():
        raise UserError(
            f"{path}: the tissue mask is empty (no nonzero pixel); tissue must be nonzero (e.g. 255) "
            "on a zero background"
        )
    # Finer than um_per_px: reduce by majority, so downstream work stays small.
    f = math.floor((um_per_px / slide.mpp) / (slide.width / mw))  # mask px per wanted mask px
    native = (mw, mh)
    if f >= 2:
        from PIL import Image

        w, h = max(1, round(mw / f)), max(1, round(mh / f))
        small = Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.BOX)
        reduced = np.asarray(small) >= 128
        if reduced.any():  # a mask of only thin lines keeps its native resolution
            mask = reduced
    h, w = mask.shape
    return mask, w / slide.width, h / slide.height, {"mask_size": [int(native[0]), int(native[1])]}


def _polygons(obj: Any) -> list[list]:
    """Every polygon (a list of rings) in a GeoJSON object, in file order."""
    out: list[list] = []
    if isinstance(obj, list):
        for item in obj:
            out += _polygons(item)
        return out
    if not isinstance(obj, dict):
        return out
    kind = obj.get("type")
    if kind == "FeatureCollection":
        out += _polygons(obj.get("features") or [])
    elif kind == "Feature":
        out += _polygons(obj.get("geometry"))
    elif kind == "GeometryCollection":
        out += _polygons(obj.get("geometries") or [])
    elif kind == "Polygon":
        out.append(obj.get("coordinates") or [])
    elif kind == "MultiPolygon":
        out += list(obj.get("coordinates") or [])
    return out


def _ring_array(ring: Any) -> np.ndarray | None:
    try:
        a = np.asarray(ring, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if a.ndim != 2 or a.shape[0] < 3 or a.shape[1] < 2 or not np.isfinite(a[:, :2]).all():
        return None
    return a[:, :2]


def _fill_rings(rings: list[np.ndarray], h: int, w: int) -> np.ndarray:
    """(h, w) bool: the pixels whose centres lie inside `rings` (even-odd rule: a hole's ring cuts it out).

    Rings are (n, 2) x, y in pixel units, pixel (i, j) spanning [j, j+1) x [i, i+1); closed or
    not. A scanline fill: every edge crossing a row's centre line (half-open in y, so a vertex on
    it counts once) gives an x; each row's sorted crossings pair up into the spans [x_a, x_b),
    and a pixel is inside when its centre j + 0.5 lies in one. Exact, and symmetric on every
    side (Pillow's polygon fill takes every pixel an edge passes through on its left and top
    edges and not on the others: half a pixel up and left, and larger by that).
    """
    rows_all, xs_all = [], []
    for ring in rings:
        x1, y1 = ring[:, 0], ring[:, 1]
        x2, y2 = np.roll(x1, -1), np.roll(y1, -1)
        # rows i whose centre line y = i + 0.5 lies in [min(y1, y2), max(y1, y2))
        i0 = np.clip(np.ceil(np.minimum(y1, y2) - 0.5), 0, h).astype(np.int64)
        i1 = np.clip(np.ceil(np.maximum(y1, y2) - 0.5), 0, h).astype(np.int64)
        n = i1 - i0
        edges = np.flatnonzero(n > 0)
        if not len(edges):
            continue
        counts = n[edges]
        e = np.repeat(edges, counts)
        rows = i0[e] + (np.arange(int(counts.sum())) - np.repeat(np.cumsum(counts) - counts, counts))
        t = (rows + 0.5 - y1[e]) / (y2[e] - y1[e])
        rows_all.append(rows)
        xs_all.append(x1[e] + t * (x2[e] - x1[e]))
    mask = np.zeros((h, w), bool)
    if not rows_all:
        return mask
    rows, xs = np.concatenate(rows_all), np.concatenate(xs_all)
    order = np.lexsort((xs, rows))
    rows, xs = rows[order], xs[order]
    # crossings of a row pair up (closed rings cross every row an even number of times)
    if len(rows) % 2 or np.any(rows[0::2] != rows[1::2]):
        raise AssertionError("unpaired ring crossings")  # pragma: no cover (closed rings cannot give these)
    r = rows[0::2]
    j0 = np.clip(np.ceil(xs[0::2] - 0.5), 0, w).astype(np.int64)  # first pixel with centre >= x_a
    j1 = np.clip(np.ceil(xs[1::2] - 0.5), 0, w).astype(np.int64)  # first pixel with centre >= x_b
    spans = j1 > j0
    diff = np.zeros((h, w + 1), np.int8)
    np.add.at(diff, (r[spans], j0[spans]), 1)
    np.add.at(diff, (r[spans], j1[spans]), -1)
    np.cumsum(diff, axis=1, out=diff)
    return diff[:, :w] > 0


def _geojson_mask(path: Path, slide, um_per_px: float) -> tuple[np.ndarray, float, float, dict]:
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not valid GeoJSON ({exc}); export the tissue from QuPath or TRIDENT as GeoJSON") from None
    polygons = []
    for poly in _polygons(data):
        rings = [_ring_array(r) for r in poly] if isinstance(poly, list) else []
        if rings and rings[0] is not None:
            polygons.append([r for r in rings if r is not None])
    if not polygons:
        raise UserError(
            f"{path}: no Polygon or MultiPolygon in this GeoJSON; the tissue mask needs tissue outlines "
            "(QuPath: export the tissue annotations as GeoJSON; TRIDENT: the contours .geojson)"
        )
    d = um_per_px / slide.mpp
    w, h = max(1, math.ceil(slide.width / d)), max(1, math.ceil(slide.height / d))
    sx, sy = w / slide.width, h / slide.height
    mask = np.zeros((h, w), bool)
    for rings in polygons:
        # Each polygon in its own bounding box: its holes cut only itself, never another polygon.
        pts = [np.column_stack([r[:, 0] * sx, r[:, 1] * sy]) for r in rings]  # mask pixel units
        x0, y0 = np.floor(pts[0].min(axis=0)).astype(int) - 1
        x1, y1 = np.ceil(pts[0].max(axis=0)).astype(int) + 2
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if cx1 <= cx0 or cy1 <= cy0:
            continue  # outside the slide
        local = [p - np.array([cx0, cy0], dtype=np.float64) for p in pts]
        fill = _fill_rings(local, int(cy1 - cy0), int(cx1 - cx0))
        if not fill.any():  # narrower than a mask pixel: the pixel under its middle, if on the slide
            mx, my = (pts[0].min(axis=0) + pts[0].max(axis=0)) / 2.0
            if 0 <= mx < w and 0 <= my < h:
                mask[int(my), int(mx)] = True
            continue
        mask[cy0:cy1, cx0:cx1] |= fill
    if not mask.any():
        raise UserError(
            f"{path}: the GeoJSON polygons cover no part of the {slide.width}x{slide.height} px slide; "
            "coordinates must be level-0 pixels of this slide (QuPath and TRIDENT export them so)"
        )
    return mask, sx, sy, {"polygons": len(polygons)}


# -- outlines ----------------------------------------------------------------------------------
def _trace(mask: np.ndarray) -> list[np.ndarray]:
    """Closed rings along the pixel edges of `mask`, as (n, 2) int vertex arrays (x, y) of pixel corners.

    The foreground is on the left of each ring as drawn on screen (y down):
    outer boundaries have negative shoelace area, holes positive. Where two
    pixels meet only at a corner, the ring turns right, joining them
    (8-connected foreground).
    """
    p = np.pad(mask, 1)
    fg = p[1:-1, 1:-1]
    starts, dirs = [], []
    for (dr, dc), (sx, sy), d in (
        ((-1, 0), (1, 0), (-1, 0)),  # top edge: (c+1, r) -> (c, r)
        ((1, 0), (0, 1), (1, 0)),  # bottom edge: (c, r+1) -> (c+1, r+1)
        ((0, -1), (0, 0), (0, 1)),  # left edge: (c, r) -> (c, r+1)
        ((0, 1), (1, 1), (0, -1)),  # right edge: (c+1, r+1) -> (c+1, r)
    ):
        nb = p[1 + dr : p.shape[0] - 1 + dr, 1 + dc : p.shape[1] - 1 + dc]
        r, c = np.nonzero(fg & ~nb)
        starts.append(np.column_stack([c + sx, r + sy]))
        dirs.append(np.tile(np.array(d), (len(r), 1)))
    start = np.concatenate(starts).astype(np.int64)
    direction = np.concatenate(dirs).astype(np.int64)
    if not len(start):
        return []
    order = np.lexsort((start[:, 0], start[:, 1]))  # deterministic: raster order of start vertices
    start, direction = start[order], direction[order]
    W = int(mask.shape[1]) + 2
    key = start[:, 1] * W + start[:, 0]
    end = start + direction
    end_key = end[:, 1] * W + end[:, 0]
    out: dict[int, list[int]] = {}
    for i, kk in enumerate(key.tolist()):
        out.setdefault(kk, []).append(i)
    used = np.zeros(len(start), bool)
    dx, dy = direction[:, 0].tolist(), direction[:, 1].tolist()
    ends = end_key.tolist()
    rings = []
    for first in range(len(start)):
        if used[first]:
            continue
        idx = []
        cur = first
        while not used[cur]:
            used[cur] = True
            idx.append(cur)
            options = out[ends[cur]]
            if len(options) == 1:
                cur = options[0]
            else:  # a corner joining two pixels: turn right, (dx, dy) -> (-dy, dx)
                want = (-dy[cur], dx[cur])
                cur = next((o for o in options if (dx[o], dy[o]) == want and not used[o]),
                           next((o for o in options if not used[o]), first))
        pts = start[idx]
        turn = np.any(direction[idx] != np.roll(direction[idx], 1, axis=0), axis=1)  # drop collinear vertices
        rings.append(pts[turn])
    return rings


def _shoelace(xy: np.ndarray) -> float:
    x, y = xy[:, 0].astype(np.float64), xy[:, 1].astype(np.float64)
    return 0.5 * float(np.dot(x, np.roll(y, -1)) - np.dot(np.roll(x, -1), y))


def _douglas_peucker(xy: np.ndarray, tol: float) -> np.ndarray:
    """A closed ring simplified: split at the vertex farthest from the first, then DP on both halves."""
    n = len(xy)
    if n <= 4 or tol <= 0:
        return xy
    pts = xy.astype(np.float64)
    far = int(np.argmax(((pts - pts[0]) ** 2).sum(axis=1)))
    keep = np.zeros(n + 1, bool)
    keep[[0, far, n]] = True
    closed = np.vstack([pts, pts[:1]])
    stack = [(0, far), (far, n)]
    while stack:
        a, b = stack.pop()
        if b - a < 2:
            continue
        seg = closed[b] - closed[a]
        rel = closed[a + 1 : b] - closed[a]
        length = math.hypot(seg[0], seg[1])
        if length == 0:
            dist = np.hypot(rel[:, 0], rel[:, 1])
        else:
            dist = np.abs(seg[0] * rel[:, 1] - seg[1] * rel[:, 0]) / length
        i = int(np.argmax(dist))
        if dist[i] > tol:
            m = a + 1 + i
            keep[m] = True
            stack += [(a, m), (m, b)]
    out = closed[keep[:n].nonzero()[0]]
    return out if len(out) >= 3 else xy.astype(np.float64)


def _outline(labels: np.ndarray, scale_x: float, scale_y: float) -> list[Ring]:
    raw = _trace(labels > 0)
    info = []
    for ring in raw:
        area = _shoelace(ring)
        # The pixel left of the ring's first edge (screen coordinates) is foreground.
        (x0, y0), (x1, y1) = ring[0], ring[1 % len(ring)]
        ddx, ddy = int(np.sign(x1 - x0)), int(np.sign(y1 - y0))
        # Foreground lies to the left (screen): for direction (dx, dy) that is the pixel at offset (dy, -dx)/2.
        cx, cy = x0 + 0.5 * ddx + 0.5 * ddy, y0 + 0.5 * ddy - 0.5 * ddx
        piece = int(labels[math.floor(cy), math.floor(cx)])
        info.append((piece, area > 0, ring))
    tol = OUTLINE_TOLERANCE_PX
    while True:
        simplified = [(piece, hole, _douglas_peucker(ring, tol)) for piece, hole, ring in info]
        total = sum(len(r) for _, _, r in simplified)
        if total <= MAX_OUTLINE_VERTICES or tol > 64:
            break
        tol *= 2
    scale = np.array([1.0 / scale_x, 1.0 / scale_y])
    order = sorted(range(len(simplified)), key=lambda i: (simplified[i][0], simplified[i][1], i))
    return [Ring(simplified[i][2] * scale, simplified[i][0], simplified[i][1]) for i in order]
