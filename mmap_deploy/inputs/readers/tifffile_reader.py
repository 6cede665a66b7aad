"""The tifffile backend: OME-TIFF and other TIFF pyramids, tile by tile, through tifffile and imagecodecs.

What OpenSlide misreads or refuses: an OME-TIFF pyramid in SubIFDs (what
Bio-Formats' bfconvert, QuPath and tifffile write; OpenSlide sees level 0
only, without its resolution), an OME-TIFF whose levels are separate images
(series), big-endian TIFFs (QuPath's exports), BigTIFF; tiles or strips in
JPEG, JPEG 2000, LZW, Deflate or none. Levels are the file's real pyramid
levels, with OpenSlide's downsamples (the mean of the width and height
ratios), so patches and tissue detection read the level they need.

The resolution comes from the OME-XML (`PhysicalSizeX`/`Y` with their unit:
µm, nm, mm, cm, ...), else an Aperio description's `MPP`, else the TIFF
`XResolution` tag. The file is a local path or any binary file object with
`seek` and `read` (an fsspec file reads byte ranges): tiles are read by their
offsets, the tiles a region needs in one sorted pass, and decoded tiles are
kept in a small cache shared by the reading threads.
"""

from __future__ import annotations

import logging
import re
import threading
import xml.etree.ElementTree as ET
from collections import OrderedDict
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import numpy as np

from ...errors import UserError, first_line
from .base import PatchReadError, SlideReader, _composite_on_white, _parse_float, resolve_mpp

EXTRA = "pip install 'mmap-deploy[tiff]'"
# Decoded tiles kept for reuse (a spot's patch and its neighbours' share tiles):
# 64 MiB is 340 RGB tiles of 256 x 256, OpenSlide's cache is 32 MiB.
CACHE_BYTES = 64 * 2**20
# µm per OME length unit (ome.xsd's UnitsLength); others (pixel, reference frame) carry no scale.
OME_UNITS_UM = {"m": 1e6, "dm": 1e5, "cm": 1e4, "mm": 1e3, "µm": 1.0, "μm": 1.0, "um": 1.0, "micron": 1.0,
                "nm": 1e-3, "pm": 1e-6, "Å": 1e-4, "in": 25400.0, "thou": 25.4}
# Series names of a slide's associated images ("Label", "macro image", "CMU-1 - overview"), never read as
# the slide or one of its levels: the name's last word (a slide named "Label_3_HE" is not one).
ASSOCIATED = re.compile(r"(?:.*[\s_#:-])?(?:label|macro|overview|thumbnail)(?:\s+image)?\s*", re.IGNORECASE)
# OpenSlide's vendor names for what tifffile recognises, so `format` reads alike from both backends.
VENDORS = (("ome", "ome-tiff"), ("svs", "aperio"), ("ndpi", "hamamatsu"), ("philips", "philips"),
           ("scn", "leica"), ("bif", "ventana"))


class _KeepLog(logging.Filter):
    """tifffile logs what it finds wrong in a damaged file (to stderr, where no logging is set up).
    While this thread opens a slide, those records are kept for the one-line error instead."""

    def __init__(self):
        super().__init__()
        self.local = threading.local()

    def filter(self, record: logging.LogRecord) -> bool:
        kept = getattr(self.local, "records", None)
        if kept is None:
            return True
        kept.append(record.getMessage())
        return False


_KEEP_LOG = _KeepLog()


@contextmanager
def _tifffile_log() -> Iterator[list[str]]:
    """The messages tifffile logs in this thread within the block, kept from being printed."""
    logger = logging.getLogger("tifffile")
    if _KEEP_LOG not in logger.filters:
        logger.addFilter(_KEEP_LOG)
    _KEEP_LOG.local.records = []
    try:
        yield _KEEP_LOG.local.records
    finally:
        _KEEP_LOG.local.records = None


def _tifffile(name: Path | str):
    try:
        import imagecodecs  # noqa: F401  (JPEG, JPEG 2000, LZW: what tifffile decodes with)
        import tifffile
    except ImportError as exc:
        raise UserError(f"{name}: this slide is read by the tifffile reader, which needs tifffile and imagecodecs "
                        f"({exc}): {EXTRA}") from None
    return tifffile


@dataclass(frozen=True)
class _Level:
    """One pyramid level: its first page (tiles or strips) and geometry."""

    page: Any  # tifffile.TiffPage
    width: int
    height: int
    tile: tuple[int, int]  # (width, height) of a tile, or (width, rows per strip)
    across: int  # tiles per row (1 for strips)
    samples: int


def _level(page) -> _Level:
    height, width = int(page.imagelength), int(page.imagewidth)
    if page.is_tiled:
        tile = (int(page.tilewidth), int(page.tilelength))
    else:
        tile = (width, max(1, min(int(page.rowsperstrip or height), height)))
    return _Level(page, width, height, tile, -(-width // tile[0]), int(page.samplesperpixel))


def _check_rgb(name: str, page) -> None:
    """Refuse what is not an 8-bit brightfield image (RGB, grey, RGBA), saying what it is."""
    if page.planarconfig != 1 and page.samplesperpixel > 1:
        raise UserError(f"{name}: colour planes stored apart (PlanarConfiguration 2) are not supported; "
                        "convert it with `vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg`")
    if page.bitspersample != 8 or page.samplesperpixel not in (1, 3, 4):
        raise UserError(f"{name}: {page.samplesperpixel} samples of {page.bitspersample} bits per pixel: not an "
                        "8-bit RGB brightfield image (a fluorescence or 16-bit image); save it as 8-bit RGB")


def _main_series(tf, name: str):
    """The slide's own series: the largest one that is not a label, macro or thumbnail image."""
    candidates = [s for s in tf.series if not ASSOCIATED.fullmatch(s.name or "") and len(s.shape) >= 2]
    if not candidates:
        raise UserError(f"{name}: no image series in this TIFF but label/macro images; it is not a slide")
    return max(candidates, key=lambda s: _size(s.levels[0].keyframe)[0] * _size(s.levels[0].keyframe)[1])


def _size(page) -> tuple[int, int]:
    return int(page.imagewidth), int(page.imagelength)


def _is_reduction(page, base) -> bool:
    """`page` is `base` downsampled: smaller, the same pixel type, both sides by one factor (to a pixel)."""
    (w0, h0), (w, h) = _size(base), _size(page)
    if not (0 < w < w0 and 0 < h < h0) or page.samplesperpixel != base.samplesperpixel:
        return False
    if page.bitspersample != base.bitspersample or not page.is_tiled:
        return False
    d = (w0 / w + h0 / h) / 2.0
    return abs(w - w0 / d) <= 1.0 and abs(h - h0 / d) <= 1.0


def _pyramid(tf, name: str) -> tuple[list[_Level], str]:
    """The levels, largest first, and how they were found.

    `series.levels` holds the levels tifffile recognises (SubIFDs, an SVS or
    NDPI pyramid, reduced pages). Where the slide's series has one level but
    other series are its reductions (an OME-TIFF written one image per level),
    those are its levels.
    """
    series = _main_series(tf, name)
    pages = [lv.keyframe for lv in series.levels]
    how = "SubIFDs" if any(getattr(p, "is_subifd", False) for p in pages) else "pages"
    if len(pages) == 1:
        base = pages[0]
        more = [s.levels[0].keyframe for s in tf.series if s is not series
                and not ASSOCIATED.fullmatch(s.name or "") and _is_reduction(s.levels[0].keyframe, base)]
        if more:
            pages += sorted(more, key=lambda p: -_size(p)[0])
            how = "separate series"
    if len(pages) == 1:
        how = "one level"
    for page in pages:
        _check_rgb(name, page)
    return [_level(p) for p in pages], how


def _ome_mpp(tf, width: int, height: int) -> tuple[float, str] | None:
    """PhysicalSizeX/Y of the OME image whose Pixels are level 0's size, in µm."""
    try:
        root = ET.fromstring(tf.ome_metadata)
    except Exception:  # an OME-XML that does not parse: no resolution from it
        return None
    for pixels in root.iter():
        if not pixels.tag.endswith("}Pixels") and pixels.tag != "Pixels":
            continue
        if (pixels.get("SizeX"), pixels.get("SizeY")) != (str(width), str(height)):
            continue
        sizes = []
        for axis in ("X", "Y"):
            value = _parse_float(pixels.get(f"PhysicalSize{axis}"))
            scale = OME_UNITS_UM.get(pixels.get(f"PhysicalSize{axis}Unit", "µm"))
            sizes.append(value * scale if value is not None and value > 0 and scale else None)
        mx, my = sizes
        if mx is None:
            return None
        # Rounded to 1e-9 µm: 227 nm should read back as 0.227, not 0.22700000000000004.
        if my is not None and abs(mx - my) > 1e-6 * mx:
            return round((mx + my) / 2.0, 9), "ome.PhysicalSizeX/Y"
        return round(mx, 9), "ome.PhysicalSizeX"
    return None


def _tag_mpp(page) -> tuple[float, str] | None:
    """µm per pixel from XResolution and ResolutionUnit (inch, cm, and tifffile's mm and µm)."""
    tag = page.tags.get(282)
    unit = page.tags.get(296)
    if tag is None or unit is None:
        return None
    try:
        num, den = tag.value
        res = num / den
    except (TypeError, ValueError, ZeroDivisionError):
        return None
    um = {2: 25400.0, 3: 1e4, 4: 1e3, 5: 1.0}.get(int(unit.value))
    if not um or not res > 0:
        return None
    return round(um / res, 6), "tiff.XResolution"


def _slide_mpp(tf, level0: _Level) -> tuple[float, str] | None:
    """The resolution chain: OME-XML, Aperio's MPP, the TIFF resolution tags."""
    if tf.is_ome:
        found = _ome_mpp(tf, level0.width, level0.height)
        if found is not None:
            return found
    if tf.is_svs:
        m = re.search(r"\bMPP\s*=\s*([0-9.eE+-]+)", tf.pages[0].description or "")
        mpp = _parse_float(m.group(1)) if m else None
        if mpp is not None and mpp > 0:
            return mpp, "aperio.MPP"
    return _tag_mpp(level0.page)


def _vendor(tf) -> str:
    return next((fmt for flag, fmt in VENDORS if getattr(tf, f"is_{flag}", False)), "generic-tiff")


class TiffFileReader(SlideReader):
    """A TIFF slide read through tifffile: each region decoded from the tiles (or strips) it covers."""

    backend = "tifffile"
    levels_from = ""  # where the levels were found: SubIFDs, pages, separate series, one level

    def __init__(self, path: Path | str, tf, levels: list[_Level], mpp: float, mpp_source: str, fmt: str):
        self.path = path
        self._tf = tf
        self._levels = levels
        self._io = threading.Lock()  # one seek + read at a time on the shared file handle
        self._lock = threading.Lock()  # the cache
        self._cache: OrderedDict[tuple[int, int], np.ndarray] = OrderedDict()
        self._cached_bytes = 0
        self.mpp, self.mpp_source = mpp, mpp_source
        self.width, self.height = levels[0].width, levels[0].height
        self.level_dimensions = tuple((lv.width, lv.height) for lv in levels)
        self.level_downsamples = tuple(
            (self.width / lv.width + self.height / lv.height) / 2.0 if i else 1.0 for i, lv in enumerate(levels))
        self._tiles = [lv.tile for lv in levels]
        self.format = f"tifffile:{fmt}"

    def read_level_region(self, level: int, left: int, top: int, width: int, height: int) -> np.ndarray:
        lv = self._levels[level]
        out = np.full((height, width, 3), 255, np.uint8)
        x0, y0 = max(left, 0), max(top, 0)
        x1, y1 = min(left + width, lv.width), min(top + height, lv.height)
        if x1 <= x0 or y1 <= y0:
            return out
        tw, th = lv.tile
        keys = [(r, c) for r in range(y0 // th, (y1 - 1) // th + 1) for c in range(x0 // tw, (x1 - 1) // tw + 1)]
        for (r, c), tile in zip(keys, self._decoded(level, keys)):
            # the part of tile (r, c) inside the region, in level pixels
            ty0, tx0 = r * th, c * tw
            a0, a1 = max(y0, ty0), min(y1, ty0 + tile.shape[0])
            b0, b1 = max(x0, tx0), min(x1, tx0 + tile.shape[1])
            if a1 > a0 and b1 > b0:
                out[a0 - top : a1 - top, b0 - left : b1 - left] = tile[a0 - ty0 : a1 - ty0, b0 - tx0 : b1 - tx0]
        return out

    def _decoded(self, level: int, keys: list[tuple[int, int]]) -> list[np.ndarray]:
        """The decoded tiles (RGB uint8, read-only) at `keys` (row, column) of `level`."""
        lv = self._levels[level]
        found: dict[int, np.ndarray] = {}
        with self._lock:
            if self._tf is None:
                raise RuntimeError(f"{self.path}: slide is closed")
            for r, c in keys:
                tile = self._cache.get((level, r * lv.across + c))
                if tile is not None:
                    self._cache.move_to_end((level, r * lv.across + c))
                    found[r * lv.across + c] = tile
        missing = sorted({r * lv.across + c for r, c in keys} - set(found))
        if missing:
            found.update(self._decode(level, missing))
        return [found[r * lv.across + c] for r, c in keys]

    def _decode(self, level: int, indices: list[int]) -> dict[int, np.ndarray]:
        """Read and decode segments `indices` of `level` (one retry: a remote read may fail once)."""
        lv = self._levels[level]
        page = lv.page
        for attempt in (0, 1):
            try:
                with self._io:
                    raw = list(page.parent.filehandle.read_segments(
                        [page.dataoffsets[i] for i in indices], [page.databytecounts[i] for i in indices],
                        indices=indices, sort=True))
                tiles = {i: self._rgb(lv, data, i) for data, i in raw}
                break
            except Exception as exc:  # tifffile and imagecodecs raise assorted errors on damaged data
                if attempt:
                    r, c = divmod(indices[0], lv.across)
                    raise PatchReadError(
                        f"{self.path}: cannot decode the tile at x={c * lv.tile[0]}, y={r * lv.tile[1]} of level "
                        f"{level} ({first_line(exc, with_type=True)}); the file may be corrupt or truncated: "
                        "re-copy or re-export it") from None
        with self._lock:
            for i, tile in tiles.items():
                if (level, i) not in self._cache:
                    self._cache[(level, i)] = tile
                    self._cached_bytes += tile.nbytes
            while self._cached_bytes > CACHE_BYTES and len(self._cache) > 1:
                self._cached_bytes -= self._cache.popitem(last=False)[1].nbytes
        return tiles

    def _rgb(self, lv: _Level, data: bytes | None, index: int) -> np.ndarray:
        """One segment as (h, w, 3) uint8 RGB (white where the file has no data for it)."""
        page = lv.page
        r, c = divmod(index, lv.across)
        h, w = min(lv.tile[1], lv.height - r * lv.tile[1]), min(lv.tile[0], lv.width - c * lv.tile[0])
        if data is None or not len(data):  # a sparse file: a tile never written
            tile = np.full((h, w, 3), 255, np.uint8)
        else:
            segment = page.decode(data, index, jpegtables=page.jpegtables, jpegheader=page.jpegheader)[0]
            seg = segment.reshape(segment.shape[-3:])[:h, :w]  # (depth 1,) rows, columns, samples
            if lv.samples == 1:
                tile = np.repeat(seg, 3, axis=2)
            elif lv.samples == 4:
                tile = np.ascontiguousarray(_composite_on_white(seg))
            else:
                tile = np.ascontiguousarray(seg)
        tile.setflags(write=False)
        return tile

    def _close_backend(self) -> None:
        with self._lock:
            tf, self._tf = self._tf, None
            self._cache.clear()
            self._cached_bytes = 0
        if tf is not None:
            tf.close()


def open_tifffile(source: Path | BinaryIO, name: Path | str, mpp: float | None,
                  fallback_mpp: tuple[float, str] | None) -> TiffFileReader:
    """Open a TIFF slide (a path or a binary file object) through tifffile; `name` names it in messages.

    `UserError` when the extra is missing, the file is not a TIFF tifffile can
    read (truncated, corrupt), not an 8-bit brightfield image, or its tiles use
    a compression that cannot be decoded here.
    """
    tifffile = _tifffile(name)
    with _tifffile_log() as logged:
        try:
            tf = tifffile.TiffFile(source)
        except Exception as exc:  # tifffile raises assorted errors on damaged headers
            raise UserError(f"{name}: tifffile cannot read this TIFF ({first_line(exc)}); the file may be "
                            "truncated or corrupt: re-copy or re-export it") from None
        try:
            return _reader(tifffile, tf, name, mpp, fallback_mpp, logged)
        except BaseException:
            tf.close()
            raise


def _reader(tifffile, tf, name: Path | str, mpp: float | None, fallback_mpp: tuple[float, str] | None,
            logged: list[str]) -> TiffFileReader:
    try:
        levels, how = _pyramid(tf, str(name))
        found = _slide_mpp(tf, levels[0])
        fmt = _vendor(tf)
        size = tf.filehandle.size
        end = max(int(o) + int(n) for lv in levels for o, n in zip(lv.page.dataoffsets, lv.page.databytecounts))
    except UserError:
        raise
    except Exception as exc:  # a damaged IFD chain, OME-XML or tag
        raise UserError(f"{name}: tifffile cannot read this TIFF's structure ({first_line(exc)}); the file "
                        "may be truncated or corrupt: re-copy or re-export it") from None
    if end > size:
        said = f"; {logged[0]}" if logged else ""
        raise UserError(f"{name}: the TIFF is truncated (its tiles reach byte {end}, the file has {size}{said}); "
                        "re-copy or re-export it")
    for lv in levels:
        compression = lv.page.compression
        if compression != 1 and compression not in tifffile.TIFF.DECOMPRESSORS:
            raise UserError(f"{name}: tiles compressed as {getattr(compression, 'name', compression)} cannot "
                            f"be decoded here; install the codecs ({EXTRA}) or convert the slide")
    resolved = resolve_mpp(name, found, mpp, fallback_mpp)
    reader = TiffFileReader(name, tf, levels, resolved[0], resolved[1], fmt)
    reader.metadata_mpp = found
    reader.levels_from = how
    return reader
