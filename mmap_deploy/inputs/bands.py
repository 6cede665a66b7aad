"""Reading many spots at once: each slide tile decoded once, views cut from memory.

`read_patch` + `make_views` read and resample every spot on its own. Spots
overlap (a 163 µm patch at Visium's 100 µm pitch shares most of its pixels
with its neighbours; at Visium HD's 16 µm bins each pixel lies under about a
hundred patches), so that path decodes the same tiles again and again, and it
spends most of its time in two dense resizes.

The band reader walks the slide in horizontal bands of the pyramid level that
`read_patch` would read. Each band is decoded once (tile-aligned; the rows that
the next band shares are carried over, not decoded again; `workers` threads
decode runs of its tile rows at once where that is exact), and every spot of
the band gets its views from memory. Memory is one band (plus the one being
prefetched), whatever the number of spots.

Views are not resampled from a band-wide resampled image: a spot's sampling
grid depends on where its patch starts (a quarter-pixel shift changes H&E views
by 2-3 grey levels on average), so a shared grid cannot reproduce the per-spot
views. Nor are the two resizes composed into one map: that skips the rounding
of the patch to uint8 (views within 0.2 grey levels), and a slide's k-means
prototypes flip on changes of the embeddings that small (her2st B4: every gene
r >= 0.98 only). So each spot goes through exactly the maps of `read_patch`
and `make_views` (`preprocess.resize_weights`; plus OpenSlide's bilinear shift
for a region that starts between level pixels), rounded where they round:
at level 0 the views equal the per-spot path's (not one value differs over
her2st B4's 284 spots; sums in another order could flip a rounding at exactly
.5), at a coarser level within a fraction of a grey level (OpenSlide rounds
its shifted region; the shift here is not rounded). What is shared is the
work: the maps are the same for every spot and banded, so they are applied
block by block to a batch of spots as a few large matrix products, instead of
dense per-spot products that multiply mostly zeros.

Where spots are few and far apart, decoding whole bands costs more than it
saves: a band is read whole only if its spots' patches cover at least
`MIN_COVERAGE` of its area; other spots go through the per-spot path. A band
whose read fails (a corrupt tile, after the slide reader's own retry) falls
back to the per-spot path too, so only spots that touch the bad tile fail.
"""

from __future__ import annotations

import time
from collections import deque
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Callable, Iterator

import numpy as np

from ..model.preprocess import ViewSpec, make_views, patch_region, resize_weights
from .slide import PHASES, PatchReadError, SlideReader, subpixel_start

# Level pixels of one band (rows x the spots' x-extent), beyond one patch of
# overlap: 16 Mpx is 48 MiB of RGB (64 MiB while OpenSlide hands out RGBA).
BAND_PIXELS = 16 * 2**20
# Spots resampled together: a chunk's float32 planes (224 x 224 x 3 per spot
# at the demo geometry, 0.6 MB) should stay near the core's L2 cache: chunks of
# a few spots read fastest, larger ones spill out of it (benchmarks/RESULTS.md,
# "Chunks of 8 spots"). The views do not depend on it (bit-identical).
CHUNK_SPOTS = 8
# Spots in flight per reader slot (2 * workers + 1 slots run ahead of the consumer).
WINDOW_SPOTS = 32
# A band of a tiled slide is decoded whole only where its spots' patches cover
# at least this share of its area (patch area x spots / band area); sparser
# bands go spot by spot: OpenSlide's decoding is slow, so decoding area no
# spot needs costs more than the resampling saves; at coverage 1 the two paths
# break even (`benchmarks/run.py --suite read`, tile_read_coverage rows:
# benchmarks/RESULTS.md, "Coverage sweep"). Visium's 100 µm grid is ~3, a
# 16 µm grid ~100. A plain image is in memory already: always whole bands.
MIN_COVERAGE = 1.0
# Output rows resampled per matrix product: A is banded, so a block of rows
# touches only a narrow range of input rows.
BLOCK_ROWS = 16

READERS = ("auto", "per_spot", "tile_once")


# -- the linear maps ---------------------------------------------------------------
@dataclass(frozen=True)
class _Operator:
    """One output axis of one view: out = A @ region[first : first + width] (rows or columns)."""

    first: int
    width: int
    blocks: tuple[tuple[int, int, int, int, np.ndarray], ...]  # (row0, row1, col0, col1, A[row0:row1, col0:col1])
    size: int  # output pixels
    # the same blocks for interleaved RGB columns, transposed: kron(A_block, I_3).T, column ranges x 3
    rgb_blocks: tuple[tuple[int, int, int, int, np.ndarray], ...] = ()


def _shift_matrix(n: int, phase: float) -> np.ndarray:
    """(n, n + 1): pixel i of a region that starts `phase` of a level pixel to the right (bilinear)."""
    m = np.zeros((n, n + 1))
    idx = np.arange(n)
    m[idx, idx] = 1.0 - phase
    m[idx, idx + 1] = phase
    return m


def _banded(a: np.ndarray, first: int) -> _Operator:
    nz = np.flatnonzero(np.any(a != 0, axis=0))
    c0, c1 = int(nz[0]), int(nz[-1]) + 1
    a = a[:, c0:c1].astype(np.float32)
    blocks, rgb = [], []
    for r0 in range(0, a.shape[0], BLOCK_ROWS):
        r1 = min(r0 + BLOCK_ROWS, a.shape[0])
        cols = np.flatnonzero(np.any(a[r0:r1] != 0, axis=0))
        b0, b1 = int(cols[0]), int(cols[-1]) + 1
        block = np.ascontiguousarray(a[r0:r1, b0:b1])
        kron = np.ascontiguousarray(np.kron(block, np.eye(3, dtype=np.float32)).T)
        block.setflags(write=False)
        kron.setflags(write=False)
        blocks.append((r0, r1, b0, b1, block))
        rgb.append((3 * r0, 3 * r1, 3 * (first + c0 + b0), 3 * (first + c0 + b1), kron))
    return _Operator(first + c0, c1 - c0, tuple(blocks), a.shape[0], tuple(rgb))


@lru_cache(maxsize=1024)
def _patch_operator(spec: ViewSpec, n: int, phase: int) -> _Operator:
    """One axis of read_patch's resample: a region of `n` level pixels that starts `phase / PHASES`
    of a pixel past an integer position -> the patch's `patch_px` pixels."""
    p = spec.patch_px
    w1 = resize_weights(n, p).astype(np.float64) if n != p else np.eye(p)
    if phase:
        w1 = w1 @ _shift_matrix(n, phase / PHASES)
    return _banded(w1, 0)


@lru_cache(maxsize=64)
def _view_operators(spec: ViewSpec) -> tuple[_Operator | None, ...]:
    """One axis of make_views: patch -> each view (None where the view is a plain crop)."""
    out = []
    for v, (o, _) in enumerate(spec.centre_offsets()):
        k = spec.crop_px(v)
        out.append(_banded(resize_weights(k, spec.input_size).astype(np.float64), o) if k != spec.input_size else None)
    return tuple(out)


def _resample_rounded(regions: np.ndarray, op_y: _Operator, op_x: _Operator) -> np.ndarray:
    """(H, N, W, 3) float32 regions -> (op_y.size, N, op_x.size, 3) float32, A_y @ R @ A_x.T per spot and
    channel, rounded to integers (the uint8 values, still as floats, in the layout this function takes).

    The rows pass multiplies the leading axis, the columns pass the trailing
    (interleaved RGB) one: each block of either pass is one large matrix
    product over every spot, and no float array is ever transposed.
    """
    _, n, w, _ = regions.shape
    rows = regions[op_y.first : op_y.first + op_y.width].reshape(op_y.width, -1)
    y = np.empty((op_y.size, rows.shape[1]), np.float32)
    for r0, r1, c0, c1, a in op_y.blocks:
        np.matmul(a, rows[c0:c1], out=y[r0:r1])
    y = y.reshape(op_y.size * n, w * 3)
    z = np.empty((y.shape[0], op_x.size * 3), np.float32)
    for r0, r1, c0, c1, k in op_x.rgb_blocks:
        np.matmul(y[:, c0:c1], k, out=z[:, r0:r1])
    # Weights are non-negative and each row sums to one: no clipping needed.
    np.rint(z, out=z)
    return z.reshape(op_y.size, n, op_x.size, 3)


def _to_spots(planes: np.ndarray, out: np.ndarray) -> None:
    """(Sy, N, Sx, 3) rounded floats -> out (N, Sy, Sx, 3) uint8."""
    out[...] = planes.astype(np.uint8).transpose(1, 0, 2, 3)


# -- the plan ------------------------------------------------------------------------
@dataclass
class _Band:
    rows: tuple[int, int]  # level rows [r0, r1) read for this band
    spots: np.ndarray  # input indices, in reading order
    whole: bool  # read the band (True) or each spot on its own (False)


@dataclass
class ReadPlan:
    """Where every spot's region lies on the pyramid level, and the bands that cover them."""

    level: int
    downsample: float
    n: int  # region side in level pixels (what read_patch reads)
    origin: np.ndarray  # (N, 2) int64 level (row, col) of each spot's first region pixel
    phase: np.ndarray  # (N, 2) int64 sub-pixel start of each region, in 1/PHASES
    cols: tuple[int, int]  # level columns [c0, c1) of every band
    bands: list[_Band] = field(default_factory=list)

    @property
    def coverage(self) -> float:
        """Patch area of the band-read spots over the area of the bands read whole (0 if none)."""
        whole = [b for b in self.bands if b.whole]
        area = sum((b.rows[1] - b.rows[0]) * (self.cols[1] - self.cols[0]) for b in whole)
        return sum(len(b.spots) for b in whole) * self.n**2 / area if area else 0.0


def plan_reads(slide: SlideReader, xy: np.ndarray, spec: ViewSpec, *, reader: str = "auto",
               min_coverage: float | None = None, band_pixels: int | None = None) -> ReadPlan:
    """Sort spots into horizontal bands of the level `read_patch` reads, and choose per band
    whether to decode it whole (`reader`: "auto" by `min_coverage`, or forced)."""
    if reader not in READERS:
        raise ValueError(f"reader must be one of {READERS}, got {reader!r}")
    min_coverage = MIN_COVERAGE if min_coverage is None else min_coverage
    band_pixels = BAND_PIXELS if band_pixels is None else band_pixels
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    side = patch_region(0.0, 0.0, slide.mpp, spec)[2]
    level, d, n = slide.patch_level(side, spec.patch_px)
    left = np.floor(xy[:, 0] - side / 2.0 + 0.5)  # patch_region's rounding, for all spots at once
    top = np.floor(xy[:, 1] - side / 2.0 + 0.5)
    origin, phase = subpixel_start(np.stack([top, left], axis=1) / d)  # read_patch's split of each corner
    extent = n + 1  # one more pixel for a shifted region
    tile_w, tile_h = slide.tile_size(level)
    if (tile_w, tile_h) == (1, 1):
        min_coverage = 0.0  # a plain image is decoded already: bands cost nothing to read
    plan = ReadPlan(level, d, n, origin, phase, (0, 0))
    if len(xy) == 0:
        return plan
    c0 = int(origin[:, 1].min()) // tile_w * tile_w
    c1 = -(-int(origin[:, 1].max() + extent) // tile_w) * tile_w
    plan.cols = (c0, c1)
    step = max(tile_h, (band_pixels // max(1, c1 - c0) - extent) // tile_h * tile_h)
    order = np.lexsort((origin[:, 1], origin[:, 0]))
    rows = origin[order, 0]
    i = 0
    while i < len(order):
        r0 = int(rows[i]) // tile_h * tile_h
        j = int(np.searchsorted(rows, r0 + step, side="left"))
        r1 = -(-int(rows[j - 1] + extent) // tile_h) * tile_h
        spots = order[i:j]
        cover = len(spots) * n * n / ((r1 - r0) * (c1 - c0))
        whole = reader == "tile_once" or (reader == "auto" and cover >= min_coverage)
        plan.bands.append(_Band((r0, r1), spots, whole))
        i = j
    return plan


# -- reading -------------------------------------------------------------------------
@dataclass
class ViewChunk:
    """Views of some spots, in reading order: `rows` are input indices; `failed` the spots
    whose region could not be decoded (input index, error)."""

    rows: np.ndarray
    views: np.ndarray  # (len(rows), V, S, S, 3) uint8 (or (len(rows), P, P, 3) patches)
    failed: list[tuple[int, PatchReadError]] = field(default_factory=list)
    scores: np.ndarray | None = None  # what `read_spot_views(score=...)` made of `views`, one row per spot


class _BandSource:
    """Reads the whole bands of a plan in order, carrying the rows two bands share.

    A band's new rows are decoded by `decoders` threads at once, each a run of
    whole tile rows, into one buffer. That is exact where the level's
    downsample is a whole number: each run starts on a level pixel, so its
    pixels are the ones one read of the band would give. At other levels a run
    would start between level pixels (OpenSlide shifts such a region), so the
    band is read in one piece there, as before.
    """

    def __init__(self, slide: SlideReader, plan: ReadPlan, decoders: int = 1):
        self.slide, self.plan = slide, plan
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmap-band")
        self._tail: tuple[int, np.ndarray] | None = None  # (first row, pixels) of the last band read
        # Only decoded tiles are worth carrying or splitting; a plain image is in memory already.
        self._tiled = slide.tile_size(plan.level) != (1, 1)
        d = float(plan.downsample)
        self._decoders = max(1, decoders) if self._tiled and d == round(d) else 1
        self._tile_h = slide.tile_size(plan.level)[1]
        self._split = (ThreadPoolExecutor(max_workers=self._decoders - 1, thread_name_prefix="mmap-decode")
                       if self._decoders > 1 else None)

    def submit(self, band: _Band) -> Future:
        return self._pool.submit(self._read, band)

    def _runs(self, start: int, stop: int) -> list[tuple[int, int]]:
        """[start, stop) as up to `decoders` runs of whole tile rows (start is tile-aligned)."""
        tiles = -(-(stop - start) // self._tile_h)
        k = min(self._decoders, tiles)
        cuts = [start + (tiles * i // k) * self._tile_h for i in range(k)] + [stop]
        return [(a, min(b, stop)) for a, b in zip(cuts, cuts[1:]) if a < min(b, stop)]

    def _read(self, band: _Band) -> np.ndarray:
        (r0, r1), (c0, c1) = band.rows, self.plan.cols
        level, width = self.plan.level, c1 - c0
        tail, self._tail = self._tail, None
        kept = None
        if tail is not None and tail[0] <= r0 < tail[0] + len(tail[1]):
            kept = tail[1][r0 - tail[0] : r1 - tail[0]]
        if not self._tiled:  # a plain image: a view of its pixels
            pixels = self.slide.read_level_region(level, c0, r0, width, r1 - r0)
        else:  # one contiguous buffer (OpenSlide's RGB is a strided view of RGBA; each pixel is read many times)
            start = r0 + (len(kept) if kept is not None else 0)
            runs = self._runs(start, r1) if start < r1 else []
            pixels = np.empty((r1 - r0, width, 3), np.uint8)
            if kept is not None:
                pixels[: len(kept)] = kept

            def read(run: tuple[int, int]) -> None:
                a, b = run
                pixels[a - r0 : b - r0] = self.slide.read_level_region(level, c0, a, width, b - a)

            later = [self._split.submit(read, run) for run in runs[1:]] if self._split else []
            try:
                for run in runs[:1]:
                    read(run)
            finally:
                errors = [f.exception() for f in later]  # every run has ended before the band is used
            for e in errors:
                if e is not None:
                    raise e
        self._tail = (r0, pixels) if self._tiled else None
        return pixels

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        if self._split is not None:
            self._split.shutdown(wait=True, cancel_futures=True)
        self._tail = None


def _band_views(pixels: np.ndarray, plan: ReadPlan, spots: np.ndarray, r0: int, spec: ViewSpec,
                patches: bool) -> np.ndarray:
    """Views (or patches) of `spots` from a band's pixels (level rows from r0, columns from plan.cols).

    Two steps, as read_patch + make_views: the patch, rounded to uint8, then
    its views. Composing both into one map would skip that rounding, and the
    prototypes of a slide (k-means) are sensitive to the smallest change of
    the embeddings: the views must equal the per-spot path's, not merely be close.
    """
    n, c0, p = plan.n, plan.cols[0], spec.patch_px
    planes = None  # the patches, (P, N, P, 3): exactly read_patch's uint8 values, as floats
    keys = plan.phase[spots]
    for key in sorted({(int(a), int(b)) for a, b in keys}):
        sel = np.flatnonzero((keys[:, 0] == key[0]) & (keys[:, 1] == key[1]))
        h, w = n + (key[0] > 0), n + (key[1] > 0)
        regions = np.empty((h, len(sel), w, 3), np.float32)
        for j, s in enumerate(spots[sel]):
            y, x = plan.origin[s, 0] - r0, plan.origin[s, 1] - c0
            regions[:, j] = pixels[y : y + h, x : x + w]
        part = _resample_rounded(regions, _patch_operator(spec, n, key[0]), _patch_operator(spec, n, key[1]))
        if len(sel) == len(spots):
            planes = part
        else:
            if planes is None:
                planes = np.empty((p, len(spots), p, 3), np.float32)
            planes[:, sel] = part
    if patches:
        out = np.empty((len(spots), p, p, 3), np.uint8)
        _to_spots(planes, out)
        return out
    s_ = spec.input_size
    views = np.empty((len(spots), spec.n_views, s_, s_, 3), np.uint8)
    for v, (op, (o, _)) in enumerate(zip(_view_operators(spec), spec.centre_offsets())):
        if op is None:  # a crop of the input size: make_views copies it
            _to_spots(planes[o : o + s_, :, o : o + s_], views[:, v])
        else:
            _to_spots(_resample_rounded(planes, op, op), views[:, v])
    return views


def _spot_views(slide: SlideReader, spots: np.ndarray, xy: np.ndarray, spec: ViewSpec, patches: bool) -> ViewChunk:
    """The per-spot path: read_patch (with its own retry) and make_views, spot by spot."""
    shape = (spec.patch_px, spec.patch_px, 3) if patches else (spec.n_views, spec.input_size, spec.input_size, 3)
    views = np.empty((len(spots),) + shape, np.uint8)
    ok, failed = [], []
    for s in spots:
        try:
            patch = slide.read_patch(float(xy[s, 0]), float(xy[s, 1]), spec)
            views[len(ok)] = patch if patches else make_views(patch, spec)
            ok.append(s)
        except PatchReadError as e:
            failed.append((int(s), e))
    return ViewChunk(np.asarray(ok, np.int64), views[: len(ok)], failed)


def read_spot_views(slide: SlideReader, xy: np.ndarray, spec: ViewSpec, *, workers: int = 2, reader: str = "auto",
                    patches: bool = False, chunk: int = CHUNK_SPOTS,
                    spent: list[float] | None = None,
                    score: Callable[[np.ndarray], np.ndarray] | None = None) -> Iterator[ViewChunk]:
    """Every spot's views (`patches=True`: its patch), in chunks, in a fixed reading order.

    Spots of a band read whole come band by band; each chunk's views are
    computed by `workers` threads, a bounded window ahead of the consumer.
    The order depends only on the spots and the slide, never on `workers`.
    `spent` collects the seconds each chunk took on its worker thread.
    `score(views)`, when given, runs on the same thread right after the
    chunk's views are made, while they are in cache (the spots' image QC,
    `spot_qc`); its result is the chunk's `scores`.
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    plan = plan_reads(slide, xy, spec, reader=reader)
    source = _BandSource(slide, plan, decoders=workers)
    pool = ThreadPoolExecutor(max_workers=max(1, workers), thread_name_prefix="mmap-read")
    # chunks in flight: WINDOW_SPOTS per slot, 2 * workers + 1 slots (the consumer's batches stay fed)
    window = (2 * max(1, workers) + 1) * max(1, WINDOW_SPOTS // max(1, chunk))
    band_reads: dict[int, Future] = {}

    def band_pixels(b: int) -> Future:
        if b not in band_reads:
            band_reads[b] = source.submit(plan.bands[b])
        return band_reads[b]

    def work(b: int, spots: np.ndarray, read: Future | None) -> ViewChunk:
        t = time.perf_counter()
        out = None
        try:
            band = plan.bands[b]
            if read is not None:
                try:
                    pixels = read.result()
                except PatchReadError:
                    pixels = None  # a corrupt tile in the band: only spots that touch it should fail
                if pixels is not None:
                    out = ViewChunk(spots, _band_views(pixels, plan, spots, band.rows[0], spec, patches))
            if out is None:
                out = _spot_views(slide, spots, xy, spec, patches)
            if score is not None:
                out.scores = score(out.views)
            return out
        finally:
            if spent is not None:
                spent.append(time.perf_counter() - t)

    def tasks() -> Iterator[tuple[int, np.ndarray]]:
        for b, band in enumerate(plan.bands):
            for s in range(0, len(band.spots), chunk):
                yield b, band.spots[s : s + chunk]

    pending: deque[tuple[int, Future]] = deque()
    try:
        todo = tasks()
        while True:
            while len(pending) < window:
                nxt = next(todo, None)
                if nxt is None:
                    break
                b, spots = nxt
                read = None
                if plan.bands[b].whole:
                    read = band_pixels(b)
                    # prefetch the next band read whole while this one is resampled
                    ahead = next((k for k in range(b + 1, len(plan.bands)) if plan.bands[k].whole), None)
                    if ahead is not None:
                        band_pixels(ahead)
                pending.append((b, pool.submit(work, b, spots, read)))
                for old in [k for k in band_reads if k < b]:
                    del band_reads[old]  # the futures of chunks in flight keep what they need
            if not pending:
                return
            _, fut = pending.popleft()
            yield fut.result()
    finally:
        for _, fut in pending:
            fut.cancel()
        pool.shutdown(wait=True, cancel_futures=True)
        source.close()
