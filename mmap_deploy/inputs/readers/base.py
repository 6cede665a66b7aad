"""The `SlideReader` interface every backend implements, and what the backends share.

A backend opens a slide (its path, its resolution, the level-0 `width` and
`height`, `level_downsamples`, `level_dimensions`, the storage tiles of each
level, `format`) and implements `read_level_region` and `close`. Everything
else is here, written once against those attributes: which pyramid level a
patch is read from (`patch_level`), reading a patch (`read_patch`), reading a
whole level box-averaged in blocks (`read_level_reduced`, for the thumbnail
and tissue detection) and the thumbnail.
"""

from __future__ import annotations

import contextlib
import math
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ...errors import UserError
from ...options import spell
from ...model.preprocess import ViewSpec, patch_region, resize

# Microscope scans lie between ~0.1 µm/px (100x) and a few µm/px (1.25x); these
# bounds reject placeholders such as 72 dpi (352.8 µm/px) without rejecting a
# low-power scan.
MPP_RANGE = (0.05, 20.0)
GIVEN_MPP = "--mpp"  # the mpp_source of a resolution the caller gave (messages spell it as the caller does)


def mpp_hint() -> str:
    """How to give the resolution, as the caller spells it (`--mpp 0.5` or `mpp=0.5`)."""
    return (f"pass {spell('mpp')}, e.g. {spell('mpp', 0.5)} for a 20x scan or {spell('mpp', 0.25)} "
            "for a 40x scan")


def _source_text(source: str) -> str:
    return spell("mpp") if source == GIVEN_MPP else source
# Relative tolerance when choosing a pyramid level: a level whose downsample is
# within 0.1% of the needed one counts as "not coarser".
LEVEL_TOLERANCE = 1e-3
# Thumbnails are read in blocks of about this many level pixels a side (16 MiB as RGBA).
THUMBNAIL_BLOCK_PX = 2048
# Rows blended at a time where a region is not opaque (see _composite_on_white).
COMPOSITE_ROWS = 64
# A patch whose corner falls between two pixels of a coarser level is shifted
# there by a bilinear blend with weights in steps of 1/PHASES: OpenSlide's
# (pixman's) 7-bit weights, so every backend reads such a patch alike and the
# band reader (bands.py) reproduces it.
PHASES = 128
_PIL_LOCK = threading.Lock()


class PatchReadError(UserError):
    """A region of the slide could not be decoded (corrupt tile), even after a retry."""


class NoResolutionError(UserError):
    """The slide's metadata holds no resolution (µm per pixel) and none was given."""


class UnreadableFormat(Exception):
    """A backend does not read this kind of file (another may): `open_slide` notes why and goes on.

    Not a `UserError`: a file a backend recognises but cannot read (truncated,
    corrupt, no resolution) raises `UserError` and stops the choice there.
    """


def _plausible(mpp: float) -> bool:
    return math.isfinite(mpp) and MPP_RANGE[0] <= mpp <= MPP_RANGE[1]


def _check_mpp(path: Path, mpp: float, source: str) -> float:
    if not _plausible(mpp):
        why = f"expected {MPP_RANGE[0]}..{MPP_RANGE[1]}"
        if source != GIVEN_MPP and mpp > MPP_RANGE[1]:
            why += "; a value like this is a screen-resolution placeholder such as 72 dpi"
        raise UserError(f"{path}: implausible resolution {mpp:g} µm per pixel from {_source_text(source)} ({why}); "
                        f"{mpp_hint()}")
    return float(mpp)


def _parse_float(value) -> float | None:
    try:
        v = float(value)
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    return v if math.isfinite(v) else None


def _resolution_to_mpp(resolution: float, unit: str) -> float | None:
    """Pixels per unit -> µm per pixel; None for a missing or unitless resolution."""
    if resolution is None or resolution <= 0:
        return None
    unit = unit.lower()
    # Rounded to 1e-6 µm: resolution tags are rationals, and 1e4 / (1e6 / 73)
    # should read back as 0.73, not 0.7300000000000001.
    if unit in ("centimeter", "cm", "3"):
        return round(1e4 / resolution, 6)
    if unit in ("inch", "in", "2"):
        return round(25400.0 / resolution, 6)
    return None


def resolve_mpp(path: Path, found: tuple[float, str] | None, mpp: float | None,
                fallback_mpp: tuple[float, str] | None) -> tuple[float, str]:
    """The run's (mpp, source): `mpp` (--mpp), else the slide's own `found`, else `fallback_mpp`.

    Raises `NoResolutionError` when there is none, `UserError` for an implausible one.
    """
    if mpp is not None:
        return _check_mpp(path, mpp, GIVEN_MPP), GIVEN_MPP
    if found is None and fallback_mpp is not None:
        return _check_mpp(path, *fallback_mpp), fallback_mpp[1]
    if found is None:
        raise NoResolutionError(f"{path}: no resolution (µm per pixel) in the slide's metadata; {mpp_hint()}")
    return _check_mpp(path, found[0], found[1]), found[1]


def subpixel_start(start: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Level coordinates -> (first whole pixel, phase in 1/PHASES of a pixel), a phase that rounds
    up to a whole pixel carried over: how `read_patch` and the band reader split a corner alike."""
    start = np.asarray(start, dtype=np.float64)
    origin = np.floor(start).astype(np.int64)
    phase = np.rint((start - origin) * PHASES).astype(np.int64)
    carry = phase == PHASES
    return np.where(carry, origin + 1, origin), np.where(carry, 0, phase)


def _shift(region: np.ndarray, phase_y: int, phase_x: int) -> np.ndarray:
    """A region one pixel taller (phase_y > 0) and wider (phase_x > 0) than wanted -> the wanted one,
    resampled `phase / PHASES` of a pixel down and right (bilinear, float32), rounded to uint8."""
    out = region.astype(np.float32)
    if phase_y:
        p = np.float32(phase_y / PHASES)
        out = out[:-1] * (np.float32(1) - p) + out[1:] * p
    if phase_x:
        p = np.float32(phase_x / PHASES)
        out = out[:, :-1] * (np.float32(1) - p) + out[:, 1:] * p
    return np.rint(out).astype(np.uint8)


class SlideReader:
    """An open slide: level-0 geometry, resolution, pyramid levels, and patch/thumbnail reading.

    Attributes: `path` (for a file object, the name it was opened with, e.g. its
    URL), `mpp` (level-0 µm per pixel), `mpp_source`, `width`,
    `height` (level-0 pixels), `level_downsamples` and `level_dimensions` (one
    per pyramid level, level 0 first), `format` ("<backend>:<format>", e.g.
    "openslide:aperio", "tifffile:ome-tiff", "image:JPEG"), `backend` (the
    reader's name), `reason` (why `open_slide` chose it), `metadata_mpp` (the
    slide's own (mpp, source) even when `--mpp` overrides it; None when it has
    none). Thread-safe: the pipeline reads patches from a thread pool.

    A backend sets those attributes and `_tiles` (each level's storage tile
    size) when it opens the slide, and implements `read_level_region` and
    `close`; the rest is written here once.
    """

    path: Path | str
    mpp: float
    mpp_source: str
    width: int
    height: int
    format: str
    backend: str = ""
    reason: str = ""
    metadata_mpp: tuple[float, str] | None = None
    level_downsamples: tuple[float, ...] = (1.0,)
    level_dimensions: tuple[tuple[int, int], ...] = ()
    _tiles: list[tuple[int, int]] = [(1, 1)]
    _owned: contextlib.ExitStack | None = None  # closed with the slide: see `close`

    @property
    def level_count(self) -> int:
        """Number of pyramid levels (1 for a plain image)."""
        return len(self.level_downsamples)

    def mpp_warning(self, tolerance: float = 0.05) -> str | None:
        """A warning when `--mpp` contradicts the slide's own plausible resolution, else None."""
        if self.mpp_source != GIVEN_MPP or self.metadata_mpp is None:
            return None
        own, source = self.metadata_mpp
        if not _plausible(own) or abs(self.mpp - own) <= tolerance * own:
            return None
        return (
            f"{self.path}: {spell('mpp', self.mpp)} overrides the slide's own {own:g} µm per pixel ({source}); "
            f"patches cover the wrong area if {spell('mpp')} is wrong"
        )

    def level_for_downsample(self, downsample: float) -> int:
        """The coarsest pyramid level that is not coarser than `downsample` (level-0 px per output px)."""
        best = 0
        for level, d in enumerate(self.level_downsamples):
            if d <= downsample * (1.0 + LEVEL_TOLERANCE) and d >= self.level_downsamples[best]:
                best = level
        return best

    def patch_level(self, side: int, out_px: int) -> tuple[int, float, int]:
        """(level, downsample, side in level px) that `read_patch` reads for a level-0 `side` -> `out_px`."""
        level = self.level_for_downsample(side / out_px)
        d = self.level_downsamples[level]
        # Rounded, not ceiled: the read covers the region to within half a level pixel.
        return level, d, max(1, int(round(side / d)))

    def tile_size(self, level: int) -> tuple[int, int]:
        """(width, height) of the storage tiles of `level`; (1, 1) when pixels are not tiled."""
        return self._tiles[level]

    def read_patch(self, x: float, y: float, spec: ViewSpec) -> np.ndarray:
        """The (patch_px, patch_px, 3) uint8 RGB patch centred on level-0 pixel (x, y).

        It covers `spec.patch_um` µm of tissue, resampled to `spec.patch_px`
        pixels; areas outside the slide are white.
        """
        left, top, side = patch_region(x, y, self.mpp, spec)
        level, _, size = self.patch_level(side, spec.patch_px)
        region = self._read_region(left, top, level, size)
        patch = resize(region, spec.patch_px)
        # resize returns its input when no resampling is needed: never hand out a
        # view of the slide's own pixels.
        return patch.copy() if patch is region else patch

    def _read_region(self, left: int, top: int, level: int, size: int) -> np.ndarray:
        """The (size, size) RGB region of `level` whose top-left corner is level-0 pixel (left, top).

        At a coarser level the corner may fall between level pixels: the region
        is then shifted there (`_shift`), as OpenSlide does.
        """
        d = self.level_downsamples[level]
        if d == 1.0:
            return self.read_level_region(level, left, top, size, size)
        (y0, x0), (py, px) = (v.tolist() for v in subpixel_start([top / d, left / d]))
        region = self.read_level_region(level, x0, y0, size + (px > 0), size + (py > 0))
        return _shift(region, py, px) if px or py else region

    def read_level_region(self, level: int, left: int, top: int, width: int, height: int) -> np.ndarray:
        """(height, width, 3) uint8 RGB of `level` from level pixel (left, top), white outside (may be a view)."""
        raise NotImplementedError

    def read_level_reduced(self, level: int, k: int, *, block_px: int = THUMBNAIL_BLOCK_PX,
                           threads: int = 1) -> np.ndarray:
        """The whole of `level` averaged over k x k pixel blocks (`_box_reduce`), uint8 RGB.

        Read in blocks of about `block_px` level pixels a side (a multiple of k,
        so the result does not depend on it), by up to `threads` threads:
        memory stays bounded even for a huge single-level TIFF.
        """
        lw, lh = (int(v) for v in self.level_dimensions[level])
        block = k * max(1, block_px // k)
        out = np.empty((-(-lh // k), -(-lw // k), 3), np.uint8)
        jobs = [(top, left) for top in range(0, lh, block) for left in range(0, lw, block)]

        def read(job: tuple[int, int]) -> None:
            top, left = job
            w, h = min(block, lw - left), min(block, lh - top)
            region = self.read_level_region(level, left, top, w, h)
            out[top // k : top // k + -(-h // k), left // k : left // k + -(-w // k)] = _box_reduce(region, k)

        workers = max(1, min(threads, os.cpu_count() or 1, len(jobs)))
        if workers == 1:
            for job in jobs:
                read(job)
        else:
            with ThreadPoolExecutor(max_workers=workers) as pool:
                list(pool.map(read, jobs))
        return out

    def thumbnail(self, max_side: int = 2000) -> tuple[np.ndarray, float]:
        """An RGB uint8 image of the whole slide, longest side <= max_side, and its scale.

        The scale is thumbnail pixels per level-0 pixel (along x), e.g. the
        `tissue_hires_scalef` of a Visium-style output. Read from the coarsest
        level not coarser than the thumbnail, box-averaged by an integer factor
        (`read_level_reduced`), then resized.
        """
        w, h = self._thumbnail_size(max_side)
        level = self.level_for_downsample(self.width / w)
        d = self.level_downsamples[level]
        k = max(1, int(self.level_dimensions[level][0]) // w)  # box factor: the reduced level is 1-2x the thumbnail
        reduced = self.read_level_reduced(level, k, block_px=THUMBNAIL_BLOCK_PX)
        # reduced pixel i covers level-0 pixels [i*k*d, (i+1)*k*d): resize to the
        # thumbnail's scale, then cut off the overhang of the last partial block.
        scale = w / self.width
        rw = max(w, int(round(reduced.shape[1] * k * d * scale)))
        rh = max(h, int(round(reduced.shape[0] * k * d * scale)))
        image = np.ascontiguousarray(_pil_resize(reduced, rw, rh)[:h, :w])
        return image, scale

    def close(self) -> None:
        """Release the slide's file handles and memory, and what it was opened from (a remote file, a
        local copy of one: `owned`)."""
        self._close_backend()
        owned, self._owned = self._owned, None
        if owned is not None:
            owned.close()

    def _close_backend(self) -> None:
        """What a backend releases: its handles and memory."""

    def __enter__(self) -> SlideReader:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self.path)!r}, {self.width}x{self.height} px, "
            f"mpp={self.mpp:g} from {self.mpp_source})"
        )

    def _thumbnail_size(self, max_side: int) -> tuple[int, int]:
        scale = min(1.0, max_side / max(self.width, self.height))
        return max(1, int(round(self.width * scale))), max(1, int(round(self.height * scale)))


def _composite_on_white(rgba: np.ndarray) -> np.ndarray:
    """RGBA (straight alpha, as openslide-python returns) -> RGB over a white background.

    Only runs of columns that hold a pixel that is not opaque are blended,
    block by block of rows: an opaque pixel blends to itself
    ((c * 255 + 127) // 255 == c), and a band that reaches past the slide's
    edges is opaque but for a strip on either side (blending all of it costs
    a large share of the band's read: benchmarks/RESULTS.md).
    """
    rgb = rgba[..., :3]
    alpha = rgba[..., 3]
    clear = alpha != 255
    if not clear.any():
        return rgb  # a view: callers copy or reduce it anyway
    out = rgb.copy()
    rows = np.flatnonzero(clear.any(axis=1))
    for r0 in range(int(rows[0]), int(rows[-1]) + 1, COMPOSITE_ROWS):
        r1 = r0 + COMPOSITE_ROWS
        cols = np.flatnonzero(clear[r0:r1].any(axis=0))
        if not len(cols):
            continue
        breaks = np.flatnonzero(np.diff(cols) > 1)
        for c0, c1 in zip(cols[np.r_[0, breaks + 1]], cols[np.r_[breaks, len(cols) - 1]] + 1):
            a = alpha[r0:r1, c0:c1, None].astype(np.uint16)
            out[r0:r1, c0:c1] = (rgb[r0:r1, c0:c1].astype(np.uint16) * a + 255 * (255 - a) + 127) // 255
    return out


def _box_reduce(rgb: np.ndarray, k: int) -> np.ndarray:
    """Mean of k x k blocks (edge pixels repeated to fill the last partial block), uint8."""
    if k == 1:
        return np.ascontiguousarray(rgb)
    h, w = rgb.shape[:2]
    ph, pw = -h % k, -w % k
    if ph or pw:
        rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode="edge")
    hh, ww = rgb.shape[0] // k, rgb.shape[1] // k
    # Rows of each block first (contiguous memory), then columns: 2-7x faster than
    # one 4-d sum (benchmarks/RESULTS.md), and the same integer sums.
    rows = rgb.reshape(hh, k, rgb.shape[1], 3).sum(axis=1, dtype=np.uint32)
    sums = rows.reshape(hh, ww, k, 3).sum(axis=2, dtype=np.uint32)
    return ((sums + (k * k) // 2) // (k * k)).astype(np.uint8)


def _pil_resize(rgb: np.ndarray, width: int, height: int) -> np.ndarray:
    """Antialiased downscale for thumbnails (PIL, deterministic)."""
    from PIL import Image

    if rgb.shape[1] == width and rgb.shape[0] == height:
        return np.ascontiguousarray(rgb)
    with _PIL_LOCK:
        im = Image.fromarray(np.ascontiguousarray(rgb))
        out = im.resize((width, height), Image.Resampling.LANCZOS, reducing_gap=3.0)
        return np.asarray(out)
