"""A spot grid laid over a slide that has no spatial assay (``--grid``).

`parse_grid` reads the grid's name; `lay_grid` lays its lattice over the
slide and keeps the spots that lie on tissue; `Grid.to_spots` hands them to
the pipeline as `Spots`, like a coordinates table would.

Grids (`GRID_FORMS`), names case-insensitive, surrounding spaces ignored:

- ``visium``: Visium's hexagonal lattice, spots 55 µm in diameter, 100 µm
  centre to centre. ``array_col`` steps by 2 between neighbours of one row
  (50 µm per column step) and rows are 100·√3/2 = 86.6 µm apart;
  ``array_row + array_col`` is always even (Space Ranger's indexing).
- ``st``: the original ST arrays (her2st): spots 100 µm in diameter on a
  square lattice of 200 µm; one array step is 200 µm along either index.
- ``NUMum`` (also ``NUMµm``, ``NUM um``): square bins NUM µm wide, bin width =
  pitch, like Visium HD's ``square_NNNum`` bins; one array step = one bin.
  NUM is ``MIN_BIN_UM`` (2, Visium HD's finest bin) to ``MAX_BIN_UM`` (1000),
  with at most two decimals (``12.5um``); ``016um`` and ``16.0um`` are
  ``16um``.

Ids (`GridSpec.id_format`), fixed width while indices stay below 100 000, so
sorting the ids sorts the spots row-major:

- bins: Visium HD's barcodes ``s_{bin:03d}um_{row:05d}_{col:05d}-1``
  (``s_016um_00012_00034-1``); a non-integer bin keeps its decimals, its
  integer part padded to 3 digits (``s_012.5um_00012_00034-1``);
- ``visium``/``st``: ``visium_{row:05d}_{col:05d}`` / ``st_{row:05d}_{col:05d}``
  (``visium_00012_00034``), array row first as in Visium HD's barcodes.

Origin rule: the lattice is laid in µm from the slide's level-0 pixel (0, 0),
never from the tissue: spot (array_row, array_col) is centred at
``x = origin_x + array_col * um_per_col``, ``y = origin_y + array_row *
um_per_row`` µm, with the origin half a pitch in from the corner (``visium``
(50, 50) µm, ``st`` (100, 100) µm, bins (NUM/2, NUM/2) µm, so bins tile the
slide from its corner exactly), then ``/ mpp`` to level-0 pixels. One slide
always gets the same spots and ids; the same tissue scanned at another
resolution gets the same lattice in µm. Array indices are never negative.

Which spots are kept (`lay_grid`):

- the whole footprint (disc for ``visium``/``st``, square for bins) lies on
  the slide (level-0 area ``[0, width] x [0, height]``);
- at least ``min_tissue`` (default `DEFAULT_MIN_TISSUE` = 0.5) of its area
  is tissue in the mask. The share is an area integral of the mask, taken
  as piecewise constant (mask pixel ``(i, j)`` covers level-0
  ``[j / scale_x, (j+1) / scale_x) x [i / scale_y, (i+1) / scale_y)``), from a
  summed-area table read with bilinear interpolation, which is exact for
  boxes with fractional edges. A bin is one box (its share is exact, also for
  bins of 1-2 mask pixels or less); a disc is `DISC_SLABS` horizontal slabs of
  equal height, each a box as wide as the disc at the slab's middle (exact
  along x, midpoint rule along y), and the share is tissue over the slabs'
  area. Mask area outside the mask's extent counts as no tissue.
- ``tissue_id``: the piece label (``labels``, 0 = none) found most often at a
  fixed set of points of the footprint (a bin: g x g cell centres, g = 2 per
  mask pixel across it, 1 to 4; a disc: 16 points of a sunflower pattern);
  ties go to the smaller label. When none of them is on
  a labelled pixel, the same over a dense grid of points with at least two
  per mask pixel across the footprint; 0 when that finds none either.
  Without ``labels`` every kept spot gets 1 (the tissue as one piece).

Scale: lattice points are enumerated only near tissue: for each lattice row,
the mask rows under its footprints give the runs of tissue columns, widened
by a spot radius; rows are processed in blocks, each with the summed-area
table of its mask strip only (at most `STRIP_PIXELS` mask pixels), and only
the kept spots of a block are stored: memory is O(kept spots + one strip).
Before any of this the spot count is estimated from the tissue area; a count
above ``max_spots`` (default `DEFAULT_MAX_SPOTS`) is a one-line `UserError`
naming the count, the tissue area and the fixes.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UserError
from ..options import Settings, spell
from .coords import Spots
from .geometry import ST, VISIUM, LatticeSpec, visium_hd_lattice

MIN_BIN_UM = 2.0  # Visium HD's finest bin
MAX_BIN_UM = 1000.0
DEFAULT_MIN_TISSUE = Settings.min_tissue  # the options' declared defaults (options.Settings)
DEFAULT_MAX_SPOTS = Settings.max_spots
# An estimate from the tissue area this far above max_spots is refused before any spot is laid.
ESTIMATE_MARGIN = 1.25
DISC_SLABS = 16
STRIP_PIXELS = 1 << 24  # mask pixels per strip (its summed-area table: 4 bytes each)
GRID_FORMS = (
    "'visium' (hexagonal, 55 µm spots, 100 µm pitch), 'st' (square, 100 µm spots, 200 µm pitch) or 'NUMum' "
    f"(square bins of NUM µm, NUM from {MIN_BIN_UM:g} (the minimum) to {MAX_BIN_UM:g}, e.g. 8um, 16um, 12.5um)"
)

if TYPE_CHECKING:  # pragma: no cover
    from .slide import SlideReader
    from .tissue import Tissue

_BINS = re.compile(r"(\d+(?:\.\d{1,2})?|\.\d{1,2})\s*(?:um|µm|μm)", re.IGNORECASE)
_NUMBER_UNIT = re.compile(r"([+-]?[\d.]+(?:e[+-]?\d+)?)\s*(?:um|µm|μm)?", re.IGNORECASE)


@dataclass(frozen=True)
class GridSpec:
    """A grid's geometry. `kind` is "visium", "st" or "bins"; `shape` "circle" or "square"."""

    kind: str
    name: str
    pitch_um: float  # centre-to-centre distance of neighbouring spots
    spot_um: float  # spot diameter (circle) or bin width (square)
    shape: str

    @property
    def um_per_col(self) -> float:
        """µm along x per array_col step (Visium: half the pitch; columns step by 2 within a row)."""
        return self.pitch_um / 2.0 if self.kind == "visium" else self.pitch_um

    @property
    def um_per_row(self) -> float:
        """µm along y per array_row step (Visium: pitch·√3/2)."""
        return self.pitch_um * math.sqrt(3.0) / 2.0 if self.kind == "visium" else self.pitch_um

    @property
    def origin_um(self) -> tuple[float, float]:
        """Centre of spot (array_row 0, array_col 0), µm from level-0 pixel (0, 0): half a pitch in."""
        return (self.pitch_um / 2.0, self.pitch_um / 2.0)

    @property
    def area_per_spot_um2(self) -> float:
        """Lattice area per spot (Visium: only every other (row, col) pair is a spot)."""
        return self.um_per_col * self.um_per_row * (2.0 if self.kind == "visium" else 1.0)

    @property
    def lattice(self) -> LatticeSpec:
        """The geometry module's lattice of this grid (for `fit_lattice` and the checks)."""
        if self.kind == "visium":
            return VISIUM
        if self.kind == "st":
            return ST
        return visium_hd_lattice(self.pitch_um)

    @property
    def id_format(self) -> str:
        if self.kind == "bins":
            return f"s_{_bin_label(self.pitch_um)}um_{{array_row:05d}}_{{array_col:05d}}-1"
        return f"{self.kind}_{{array_row:05d}}_{{array_col:05d}}"

    def record(self) -> dict[str, Any]:
        return {
            "kind": self.kind,
            "name": self.name,
            "shape": self.shape,
            "pitch_um": float(self.pitch_um),
            "spot_um": float(self.spot_um),
            "um_per_array_col": float(self.um_per_col),
            "um_per_array_row": float(self.um_per_row),
            "origin_um": [float(v) for v in self.origin_um],
            "id_format": self.id_format,
        }


VISIUM_GRID = GridSpec("visium", "visium", 100.0, 55.0, "circle")
ST_GRID = GridSpec("st", "st", 200.0, 100.0, "circle")


def _bin_label(um: float) -> str:
    """'016' for 16 µm, '012.5' for 12.5 µm: the integer part padded to 3 digits, decimals kept."""
    whole = int(math.floor(um))
    frac = f"{um - whole:.2f}".rstrip("0").rstrip(".")[1:]  # '.5', '.25' or ''
    return f"{whole:03d}{frac}"


def parse_grid(text: str) -> GridSpec:
    """``visium``, ``st`` or ``NUMum`` (see the module docstring) as a `GridSpec`; else a one-line UserError."""
    raw = str(text)
    value = raw.strip().lower()
    if value == "visium":
        return VISIUM_GRID
    if value == "st":
        return ST_GRID
    m = _BINS.fullmatch(value)
    if m:
        um = round(float(m.group(1)), 2)
        if um < MIN_BIN_UM or um > MAX_BIN_UM:
            limit = f"below the minimum of {MIN_BIN_UM:g} µm (Visium HD's finest bin)" if um < MIN_BIN_UM else \
                f"above the maximum of {MAX_BIN_UM:g} µm"
            raise UserError(f"{spell('grid', raw)}: a bin of {um:g} µm is {limit}; use {GRID_FORMS}")
        return GridSpec("bins", f"{um:g}um", um, um, "square")
    m = _NUMBER_UNIT.fullmatch(value)
    if m:  # a number of a form the bins do not take: negative, exponent, many decimals, no unit
        try:
            num = float(m.group(1))
        except ValueError:
            num = None
        if num is not None and math.isfinite(num):
            why = ("is not a positive size" if num <= 0 else
                   "needs the unit (e.g. 16um)" if not value.endswith(("um", "µm", "μm")) else
                   "write the size as a plain number (e.g. 16um)" if "e" in m.group(1) else
                   "takes at most two decimals")
            raise UserError(f"{spell('grid', raw)}: {why}; use {GRID_FORMS}")
    raise UserError(f"{spell('grid', raw)}: unknown grid; use {GRID_FORMS}")


@dataclass
class Grid:
    """The kept spots of a grid, row-major (array_row, then array_col)."""

    spec: GridSpec
    ids: np.ndarray  # (n,) str
    xy: np.ndarray  # (n, 2) float64, level-0 pixels (x = column, y = row)
    array_row: np.ndarray  # (n,) int64
    array_col: np.ndarray  # (n,) int64
    tissue_fraction: np.ndarray  # (n,) float32, share of the footprint that is tissue
    tissue_id: np.ndarray  # (n,) int32, piece label (0 = none)
    spot_diameter_px: float  # spot_um / mpp, level-0 pixels
    origin_um: tuple[float, float]
    mpp: float
    min_tissue: float
    tissue_area_mm2: float

    def __len__(self) -> int:
        return len(self.ids)

    def record(self) -> dict[str, Any]:
        """For uns['mmap']['grid']: plain values only, no None."""
        out = self.spec.record()
        out.update({
            "origin_um": [float(v) for v in self.origin_um],
            "mpp": float(self.mpp),
            "spot_diameter_px": float(self.spot_diameter_px),
            "count": int(len(self.ids)),
            "min_tissue": float(self.min_tissue),
            "tissue_area_mm2": round(float(self.tissue_area_mm2), 4),
        })
        return out

    def to_spots(self) -> Spots:
        """The grid as the pipeline's `Spots`: ids, xy, source_format ``grid-{name}``, array_xy (col, row)."""
        array_xy = np.stack([self.array_col, self.array_row], axis=1).astype(np.float64)
        return Spots(ids=self.ids, xy=self.xy, source_format=f"grid-{self.spec.name}", array_xy=array_xy)


# -- laying the grid -------------------------------------------------------------------
def _too_many(spec: GridSpec, count: int, approx: bool, area_mm2: float, max_spots: int,
              min_tissue: float) -> UserError:
    fixes = []
    if spec.kind == "bins":
        for b in (8, 16, 32, 64, 128, 256, 512, 1000):
            if b > spec.pitch_um and count * (spec.pitch_um / b) ** 2 <= max_spots:
                fixes.append(f"a coarser {spell('grid')} (e.g. {b}um)")
                break
    elif spec.kind == "visium":
        fixes.append(f"a coarser {spell('grid')} (st)")
    fixes = fixes or [f"a coarser {spell('grid')}"]
    fixes += [spell("max_spots", int(math.ceil(count / 1000.0) * 1000)),
              f"or a {spell('tissue_mask')} that covers only the region to predict"]
    return UserError(
        f"{spell('grid', spec.name)}: {'about ' if approx else ''}{count} spots (each at least {min_tissue:.0%} "
        f"tissue) over {area_mm2:.2f} mm² of tissue, more than {spell('max_spots', max_spots)}; use {', '.join(fixes)}"
    )


def _runs(occ: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Starts and (exclusive) ends of the True runs of a 1-D bool array."""
    d = np.diff(np.concatenate(([0], occ.view(np.int8), [0])))
    return np.flatnonzero(d == 1), np.flatnonzero(d == -1)


def _box_integral(sat: np.ndarray, x0, x1, y0, y1) -> np.ndarray:
    """Integral of the strip's mask over boxes [x0, x1] x [y0, y1] (strip pixel units; clipped)."""
    h, w = sat.shape[0] - 1, sat.shape[1] - 1
    flat = sat.ravel()

    def corner(x, y):
        x = np.clip(x, 0.0, w)
        y = np.clip(y, 0.0, h)
        j = np.minimum(x.astype(np.int64), w - 1)
        i = np.minimum(y.astype(np.int64), h - 1)
        fx, fy = x - j, y - i
        k = i * (w + 1) + j
        s00, s01 = flat[k], flat[k + 1]
        s10, s11 = flat[k + w + 1], flat[k + w + 2]
        return (s00 + (s01 - s00) * fx) * (1.0 - fy) + (s10 + (s11 - s10) * fx) * fy

    return corner(x1, y1) - corner(x0, y1) - corner(x1, y0) + corner(x0, y0)


def _disc_slabs() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Slab top/bottom (unit-disc y) and half-widths at the slab middles."""
    edges = np.linspace(-1.0, 1.0, DISC_SLABS + 1)
    mid = (edges[:-1] + edges[1:]) / 2.0
    return edges[:-1], edges[1:], np.sqrt(1.0 - mid**2)


def _sample_offsets(shape: str, side_px: float) -> np.ndarray:
    """Fixed points of the unit footprint (square [-1, 1]^2 or unit disc), (k, 2) as (x, y).

    A square gets g x g cell centres, g = 2 per mask pixel across its side, 1 to 4 (a bin
    of one mask pixel: its four quarters); a disc 16 points of a sunflower pattern.
    """
    if shape == "square":
        g = int(min(4, max(1, math.ceil(2.0 * side_px - 1e-9))))
        u = (np.arange(g) + 0.5) / g * 2.0 - 1.0
        return np.stack(np.meshgrid(u, u, indexing="ij"), axis=-1).reshape(-1, 2)[:, ::-1]
    k = np.arange(16) + 0.5
    r = np.sqrt(k / 16.0)
    t = k * math.pi * (3.0 - math.sqrt(5.0))  # golden angle
    return np.stack([r * np.cos(t), r * np.sin(t)], axis=1)


def _mode_nonzero(samples: np.ndarray) -> np.ndarray:
    """Per row, the most frequent non-zero value (ties: the smallest); 0 where all are 0."""
    k = samples.shape[1]
    out = samples[:, 0].copy()
    uniform = (samples == samples[:, :1]).all(axis=1)
    rest = np.flatnonzero(~uniform)
    if rest.size:
        s = np.sort(samples[rest], axis=1)
        pos = np.arange(k)
        new = np.ones_like(s, dtype=bool)
        new[:, 1:] = s[:, 1:] != s[:, :-1]
        start = np.maximum.accumulate(np.where(new, pos, 0), axis=1)
        runlen = np.where(s != 0, pos - start + 1, 0)
        best = np.argmax(runlen, axis=1)
        out[rest] = np.where(runlen[np.arange(len(rest)), best] > 0, s[np.arange(len(rest)), best], 0)
    return out


def _tissue_ids(spec: GridSpec, labels: np.ndarray, cx: np.ndarray, cy: np.ndarray, rx: float, ry: float) -> np.ndarray:
    """Piece label per spot; cx, cy: centres in mask pixels, rx, ry: radius / half-width in mask pixels."""
    h, w = labels.shape
    padded = np.zeros((h + 2, w + 2), dtype=np.int32)  # a ring of 0 around: samples off the mask read 0
    padded[1:-1, 1:-1] = labels
    flat = padded.ravel()

    def at(px: np.ndarray, py: np.ndarray) -> np.ndarray:
        j = np.clip(px + 1.0, 0.0, w + 1.0, out=px).astype(np.intp)
        i = np.clip(py + 1.0, 0.0, h + 1.0, out=py).astype(np.intp)
        i *= w + 2
        i += j
        return flat.take(i)

    off = _sample_offsets(spec.shape, 2.0 * max(rx, ry))
    ids = np.empty(len(cx), dtype=np.int32)
    chunk = max(1, (1 << 22) // len(off))
    for s in range(0, len(cx), chunk):
        e = min(len(cx), s + chunk)
        px = cx[s:e, None] + off[None, :, 0] * rx
        py = cy[s:e, None] + off[None, :, 1] * ry
        ids[s:e] = _mode_nonzero(at(px, py))
    missing = np.flatnonzero(ids == 0)
    if missing.size:
        g = int(np.clip(math.ceil(4.0 * max(rx, ry)), 4, 64))  # >= 2 points per mask pixel across
        u = (np.arange(g) + 0.5) / g * 2.0 - 1.0
        dense = np.stack(np.meshgrid(u, u, indexing="ij"), axis=-1).reshape(-1, 2)[:, ::-1]
        if spec.shape == "circle":
            dense = dense[(dense**2).sum(axis=1) <= 1.0]
        chunk = max(1, (1 << 22) // len(dense))
        for s in range(0, len(missing), chunk):
            m = missing[s : s + chunk]
            px = cx[m, None] + dense[None, :, 0] * rx
            py = cy[m, None] + dense[None, :, 1] * ry
            ids[m] = _mode_nonzero(at(px, py))
    return ids


def _format_ids(prefix: str, suffix: str, rows: np.ndarray, cols: np.ndarray) -> np.ndarray:
    """``f"{prefix}{row:05d}_{col:05d}{suffix}"`` for every spot, as a numpy str array, without Python loops."""
    n = len(rows)
    if n == 0:
        return np.array([], dtype="U1")
    if int(max(rows.max(), cols.max())) >= 100_000:  # wider than 5 digits: rare; the plain way
        return np.array([f"{prefix}{r:05d}_{c:05d}{suffix}" for r, c in zip(rows.tolist(), cols.tolist())])
    p, s = prefix.encode(), suffix.encode()
    width = len(p) + 11 + len(s)
    raw = np.empty((n, width), dtype=np.uint8)
    raw[:, : len(p)] = np.frombuffer(p, dtype=np.uint8)
    for start, values in ((len(p), rows), (len(p) + 6, cols)):
        v = values.astype(np.int64)
        for d in range(4, -1, -1):
            raw[:, start + d] = 48 + v % 10
            v = v // 10
    raw[:, len(p) + 5] = ord("_")
    if s:
        raw[:, len(p) + 11 :] = np.frombuffer(s, dtype=np.uint8)
    return raw.view(f"S{width}").ravel().astype(f"U{width}")


@dataclass(frozen=True)
class _Lattice:
    """Where a grid's spots can go on one slide: µm positions, index limits, mask pixels per µm."""

    ox: float
    oy: float
    sx_um: float
    sy_um: float
    rad_um: float
    col_step: int
    row_max: int
    col_max: int
    um_to_mx: float
    um_to_my: float
    rx_m: float  # footprint radius in mask pixels
    ry_m: float

    @classmethod
    def on_slide(cls, spec: GridSpec, width_px: int, height_px: int, mpp: float, scale_x: float,
                 scale_y: float) -> _Lattice:
        ox, oy = spec.origin_um
        sx_um, sy_um = spec.um_per_col, spec.um_per_row
        rad_um = spec.spot_um / 2.0
        w_um, h_um = width_px * mpp, height_px * mpp
        eps = 1e-9 * max(w_um, h_um, 1.0)
        # lattice indices whose footprint lies on the slide
        row_max = int(math.floor((h_um - rad_um - oy + eps) / sy_um))
        col_max = int(math.floor((w_um - rad_um - ox + eps) / sx_um))
        um_to_mx, um_to_my = scale_x / mpp, scale_y / mpp  # mask pixels per µm
        return cls(ox, oy, sx_um, sy_um, rad_um, 2 if spec.kind == "visium" else 1, row_max, col_max,
                   um_to_mx, um_to_my, rad_um * um_to_mx, rad_um * um_to_my)

    def row_columns(self, r: int, occ: np.ndarray, c0: int) -> np.ndarray | None:
        """Lattice row `r`'s columns whose footprint may touch a run of `occ` (tissue columns from `c0`)."""
        starts, ends = _runs(occ)
        # columns whose footprint may touch a run, in units of the row's column step
        s_um = (starts + c0) / self.um_to_mx
        e_um = (ends + c0) / self.um_to_mx
        step = self.col_step
        parity = r % 2 if step == 2 else 0
        lo = np.floor(((s_um - self.rad_um - self.ox) / self.sx_um - parity) / step).astype(np.int64)
        hi = np.ceil(((e_um + self.rad_um - self.ox) / self.sx_um - parity) / step).astype(np.int64)
        lo = np.maximum(lo, 0)
        hi = np.minimum(hi, (self.col_max - parity) // step)
        ok = lo <= hi
        if not ok.any():
            return None
        lo, hi = lo[ok], hi[ok]
        hi = np.maximum.accumulate(hi)
        brk = np.concatenate(([True], lo[1:] > hi[:-1] + 1))
        lo_m = lo[brk]
        hi_m = np.concatenate((hi[np.flatnonzero(brk)[1:] - 1], hi[-1:]))
        lengths = hi_m - lo_m + 1
        total = int(lengths.sum())
        m = np.repeat(lo_m - np.concatenate(([0], np.cumsum(lengths)[:-1])), lengths) + np.arange(total)
        return m * step + parity

    def tissue_share(self, strip: np.ndarray, rows: np.ndarray, cols: np.ndarray, c0: int, s_top: int,
                     slabs: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> np.ndarray:
        """Tissue share over each footprint, from the strip's summed-area table."""
        rx_m, ry_m = self.rx_m, self.ry_m
        big = strip.size >= (1 << 31)
        sat = np.zeros((strip.shape[0] + 1, strip.shape[1] + 1), dtype=np.int64 if big else np.int32)
        np.cumsum(strip, axis=0, dtype=sat.dtype, out=sat[1:, 1:])
        np.cumsum(sat[1:, 1:], axis=1, out=sat[1:, 1:])
        cx = (self.ox + cols * self.sx_um) * self.um_to_mx - c0
        cy = (self.oy + rows * self.sy_um) * self.um_to_my - s_top
        return _footprint_share(sat, cx, cy, rx_m, ry_m, slabs)


def _footprint_share(sat: np.ndarray, cx: np.ndarray, cy: np.ndarray, rx_m: float, ry_m: float,
                     slabs: tuple[np.ndarray, np.ndarray, np.ndarray] | None) -> np.ndarray:
    """Tissue share over footprints centred at (cx, cy) (mask pixels): boxes of half-sides rx_m, ry_m
    (`slabs` None), else discs of those radii as `_disc_slabs` slabs; `sat` the mask's summed-area table."""
    if slabs is None:
        return _box_integral(sat, cx - rx_m, cx + rx_m, cy - ry_m, cy + ry_m) / (4.0 * rx_m * ry_m)
    tops, bots, half = slabs
    tissue = np.zeros(len(cx))
    for t, b, hw in zip(tops, bots, half):
        tissue += _box_integral(sat, cx - hw * rx_m, cx + hw * rx_m, cy + t * ry_m, cy + b * ry_m)
    return tissue / (float((half * (bots - tops)).sum()) * 2.0 * rx_m * ry_m)


def spot_tissue_fraction(mask: np.ndarray, scale_x: float, scale_y: float, xy: np.ndarray,
                         diameter_px: float) -> np.ndarray:
    """Share of each spot's disc (centre `xy` (n, 2) and `diameter_px`, level-0 pixels) that is tissue in
    `mask` (mask pixel (i, j) covers level-0 [j / scale_x, (j + 1) / scale_x) x [i / scale_y, ...)).

    The same area integral as a grid's `tissue_fraction` (disc slabs over a summed-area table); area
    outside the mask counts as no tissue. float32 in [0, 1].
    """
    xy = np.asarray(xy, dtype=np.float64).reshape(-1, 2)
    if not len(xy) or not diameter_px > 0:
        return np.zeros(len(xy), dtype=np.float32)
    sat = np.zeros((mask.shape[0] + 1, mask.shape[1] + 1), dtype=np.int64)
    np.cumsum(mask.astype(np.int64), axis=0, out=sat[1:, 1:])
    np.cumsum(sat[1:, 1:], axis=1, out=sat[1:, 1:])
    r = diameter_px / 2.0
    share = _footprint_share(sat, xy[:, 0] * scale_x, xy[:, 1] * scale_y, r * scale_x, r * scale_y, _disc_slabs())
    return np.clip(share, 0.0, 1.0).astype(np.float32)


def _check_grid_args(mpp: float, mask: np.ndarray, labels: np.ndarray | None, scale_x: float, scale_y: float,
                     width_px: int, height_px: int, min_tissue: float,
                     max_spots: int) -> tuple[np.ndarray, np.ndarray | None]:
    """The arguments of `lay_grid` checked; the mask as bool, the labels as an array (or None)."""
    if not (math.isfinite(mpp) and mpp > 0):
        raise UserError(f"µm per pixel {mpp!r} must be a positive number; pass {spell('mpp')}")
    Settings().replace(min_tissue=min_tissue, max_spots=max_spots)  # the options' own checks
    mask = np.asarray(mask)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D, got shape {mask.shape}")
    if mask.dtype != bool:
        mask = mask != 0
    if labels is not None:
        labels = np.asarray(labels)
        if labels.shape != mask.shape:
            raise ValueError(f"labels shape {labels.shape} differs from mask shape {mask.shape}")
    if not (scale_x > 0 and scale_y > 0 and width_px > 0 and height_px > 0):
        raise ValueError("scale_x, scale_y, width_px and height_px must be positive")
    return mask, labels


def _scan(spec: GridSpec, geo: _Lattice, mask: np.ndarray, min_tissue: float,
          max_spots: int) -> tuple[int, list[np.ndarray], list[np.ndarray], list[np.ndarray]]:
    """The spots kept (their count; rows, columns, tissue shares unless over `max_spots`), block by block."""
    rows_kept: list[np.ndarray] = []
    cols_kept: list[np.ndarray] = []
    frac_kept: list[np.ndarray] = []
    count = 0
    mh = mask.shape[0]
    row_any = mask.any(axis=1)
    cum_rows = np.concatenate(([0], np.cumsum(row_any)))
    cols_any = np.flatnonzero(mask.any(axis=0))
    c0, c1 = int(cols_any[0]), int(cols_any[-1]) + 1  # tissue's column extent
    r_all = np.arange(geo.row_max + 1)
    cy_all = (geo.oy + r_all * geo.sy_um) * geo.um_to_my
    top = np.clip(np.floor(cy_all - geo.ry_m).astype(np.int64), 0, mh)
    bottom = np.clip(np.ceil(cy_all + geo.ry_m).astype(np.int64), 0, mh)
    has = cum_rows[bottom] - cum_rows[top] > 0
    live = np.flatnonzero(has)
    slabs = _disc_slabs() if spec.shape == "circle" else None
    k = 0
    while k < len(live):
        # one block of lattice rows whose mask strip stays within STRIP_PIXELS
        first = k
        s_top = int(top[live[k]])
        while k < len(live) and (k == first or (int(bottom[live[k]]) - s_top) * (c1 - c0) <= STRIP_PIXELS):
            k += 1
        block = live[first:k]
        s_bot = int(bottom[block].max())
        strip = mask[s_top:s_bot, c0:c1]
        b_rows, b_cols = [], []
        for r in block.tolist():
            cols = geo.row_columns(r, strip[top[r] - s_top : bottom[r] - s_top].any(axis=0), c0)
            if cols is not None:
                b_cols.append(cols)
                b_rows.append(np.full(len(cols), r, dtype=np.int64))
        if not b_cols:
            continue
        rows = np.concatenate(b_rows)
        cols = np.concatenate(b_cols)
        share = geo.tissue_share(strip, rows, cols, c0, s_top, slabs)
        keep = share >= min_tissue - 1e-9
        count += int(keep.sum())
        if count <= max_spots:
            rows_kept.append(rows[keep])
            cols_kept.append(cols[keep])
            frac_kept.append(np.minimum(share[keep], 1.0).astype(np.float32))
        else:
            rows_kept, cols_kept, frac_kept = [], [], []  # only the count matters now
    return count, rows_kept, cols_kept, frac_kept


def grid_over_tissue(spec: GridSpec, slide: SlideReader, tissue: Tissue, *, min_tissue: float = DEFAULT_MIN_TISSUE,
                     max_spots: int = DEFAULT_MAX_SPOTS) -> Grid:
    """`lay_grid` over an open slide's `tissue` (detected, or the user's mask): its size, scale and pieces."""
    return lay_grid(spec, width_px=slide.width, height_px=slide.height, mpp=slide.mpp, mask=tissue.mask,
                    scale_x=tissue.scale_x, scale_y=tissue.scale_y, labels=tissue.labels, min_tissue=min_tissue,
                    max_spots=max_spots)


def lay_grid(
    spec: GridSpec,
    *,
    width_px: int,
    height_px: int,
    mpp: float,
    mask: np.ndarray,
    scale_x: float,
    scale_y: float,
    labels: np.ndarray | None = None,
    min_tissue: float = DEFAULT_MIN_TISSUE,
    max_spots: int = DEFAULT_MAX_SPOTS,
) -> Grid:
    """Lay `spec` over a `width_px` x `height_px` level-0 slide of `mpp` µm per pixel; keep spots on tissue.

    `mask` (h, w) bool: tissue, at `scale_x` / `scale_y` mask pixels per level-0 pixel; `labels` (h, w)
    int piece ids (0 = none), optional. A spot is kept when its footprint lies on the slide and at least
    `min_tissue` (0 < min_tissue <= 1) of it is tissue. Raises UserError when more than `max_spots`
    spots would be kept, or none is.
    """
    mask, labels = _check_grid_args(mpp, mask, labels, scale_x, scale_y, width_px, height_px, min_tissue,
                                     max_spots)
    min_tissue, max_spots = float(min_tissue), int(max_spots)
    n_tissue = int(np.count_nonzero(mask))
    area_um2 = n_tissue / (scale_x * scale_y) * mpp * mpp
    area_mm2 = area_um2 / 1e6
    estimate = int(round(area_um2 / spec.area_per_spot_um2))
    if estimate > ESTIMATE_MARGIN * max_spots:
        raise _too_many(spec, estimate, True, area_mm2, max_spots, min_tissue)
    geo = _Lattice.on_slide(spec, width_px, height_px, mpp, scale_x, scale_y)
    count, rows_kept, cols_kept, frac_kept = 0, [], [], []
    if n_tissue and geo.row_max >= 0 and geo.col_max >= 0:
        count, rows_kept, cols_kept, frac_kept = _scan(spec, geo, mask, min_tissue, max_spots)
    if count > max_spots:
        raise _too_many(spec, count, False, area_mm2, max_spots, min_tissue)
    if count == 0:
        raise UserError(
            f"{spell('grid', spec.name)}: no spot has at least {min_tissue:g} of its area on tissue "
            f"({area_mm2:.3f} mm² of tissue found in the mask); check the tissue mask (or pass "
            f"{spell('tissue_mask')}), or use a finer {spell('grid')}"
        )
    array_row = np.concatenate(rows_kept)
    array_col = np.concatenate(cols_kept)
    x_um = geo.ox + array_col * geo.sx_um
    y_um = geo.oy + array_row * geo.sy_um
    xy = np.stack([x_um / mpp, y_um / mpp], axis=1)
    if labels is None:
        tissue_id = np.ones(len(array_row), dtype=np.int32)
    else:
        tissue_id = _tissue_ids(spec, labels, x_um * geo.um_to_mx, y_um * geo.um_to_my, geo.rx_m, geo.ry_m)
    if spec.kind == "bins":
        ids = _format_ids(f"s_{_bin_label(spec.pitch_um)}um_", "-1", array_row, array_col)
    else:
        ids = _format_ids(f"{spec.kind}_", "", array_row, array_col)
    return Grid(spec=spec, ids=ids, xy=xy, array_row=array_row, array_col=array_col,
                tissue_fraction=np.concatenate(frac_kept), tissue_id=tissue_id, spot_diameter_px=spec.spot_um / mpp,
                origin_um=spec.origin_um, mpp=float(mpp), min_tissue=min_tissue, tissue_area_mm2=area_mm2)
