"""The OpenSlide backend: vendor formats (SVS, NDPI, MRXS, SCN, ...), generic pyramidal TIFF, DICOM WSI.

Slides are never held in memory whole: each region is decoded tile by tile
from the pyramid level it is asked of. The resolution comes from OpenSlide's
properties (`openslide.mpp-x` and `mpp-y`, `aperio.MPP`, `tiff.XResolution`).
"""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np

from ...errors import UserError
from .base import (
    PatchReadError,
    SlideReader,
    UnreadableFormat,
    _composite_on_white,
    _parse_float,
    _resolution_to_mpp,
    resolve_mpp,
)


def _mpp_from_openslide_properties(props) -> tuple[float, str] | None:
    """The first resolution found in OpenSlide's properties, with its source name."""
    mx = _parse_float(props.get("openslide.mpp-x"))
    my = _parse_float(props.get("openslide.mpp-y"))
    if mx is not None and mx > 0:
        # Square pixels are the norm; if a scanner reports two values, use their mean.
        if my is not None and my > 0 and abs(mx - my) > 1e-6 * mx:
            return (mx + my) / 2.0, "openslide.mpp-x/mpp-y"
        return mx, "openslide.mpp-x"
    aperio = _parse_float(props.get("aperio.MPP"))
    if aperio is not None and aperio > 0:
        return aperio, "aperio.MPP"
    xres = _parse_float(props.get("tiff.XResolution"))
    mpp = _resolution_to_mpp(xres, props.get("tiff.ResolutionUnit", ""))
    if mpp is not None:
        return mpp, "tiff.XResolution"
    return None


class OpenSlideReader(SlideReader):
    """A whole-slide image read through OpenSlide, tile by tile.

    OpenSlide errors are sticky: after one undecodable tile, the handle refuses
    every later call, from every thread. So a failed read retires the shared
    handle (closed once no thread uses it; later reads get a fresh one) and
    retries once on a private handle, which no other thread's failure can
    spoil. A region that fails twice raises `PatchReadError`.
    """

    backend = "openslide"

    def __init__(self, path: Path, handle, mpp: float, mpp_source: str):
        self.path = path
        self._lock = threading.Lock()
        self._handle = handle
        self._users: dict[int, int] = {id(handle): 0}  # reads in flight per handle
        self._retired: list = []  # failed handles, closed when their last read returns
        self._closed = False
        self.mpp = mpp
        self.mpp_source = mpp_source
        self.width, self.height = handle.dimensions
        self.level_downsamples = tuple(float(d) for d in handle.level_downsamples)
        self.level_dimensions = tuple(handle.level_dimensions)
        tiles = [[_parse_float(handle.properties.get(f"openslide.level[{lv}].tile-{k}")) for k in ("width", "height")]
                 for lv in range(handle.level_count)]
        self._tiles = [(int(w), int(h)) if w and h else (1, 1) for w, h in tiles]
        self.format = f"openslide:{handle.properties.get('openslide.vendor', 'unknown')}"

    def _acquire(self):
        """The shared handle, counted as in use; None if it could not be reopened after a failure."""
        with self._lock:
            if self._closed:
                raise RuntimeError(f"{self.path}: slide is closed")
            handle = self._handle
            if handle is not None:
                self._users[id(handle)] += 1
            return handle

    def _release(self, handle, failed: bool) -> None:
        """End one read on `handle`; a failed handle is replaced and closed when idle."""
        import openslide

        to_close = []
        with self._lock:
            if self._closed:
                return
            self._users[id(handle)] -= 1
            if failed and handle is self._handle:
                self._retired.append(handle)
                try:
                    self._handle = openslide.OpenSlide(str(self.path))
                    self._users[id(self._handle)] = 0
                except Exception:
                    self._handle = None  # later reads fail with a clear error below
            for h in [h for h in self._retired if self._users[id(h)] == 0]:
                self._retired.remove(h)
                del self._users[id(h)]
                to_close.append(h)
        for h in to_close:
            h.close()

    def _read_rgba(self, location: tuple[int, int], level: int, size: tuple[int, int]) -> np.ndarray:
        """read_region with one retry on a private handle; PatchReadError if both fail."""
        import openslide

        handle = self._acquire()
        if handle is not None:
            failed = True
            try:
                rgba = np.asarray(handle.read_region(location, level, size))
                failed = False
                return rgba
            except Exception:  # openslide.OpenSlideError; the retry below reports it
                pass
            finally:
                self._release(handle, failed)
        try:
            private = openslide.OpenSlide(str(self.path))
        except Exception as exc:
            raise PatchReadError(f"{self.path}: cannot reopen the slide after a read error: {exc}") from None
        try:
            return np.asarray(private.read_region(location, level, size))
        except Exception as exc:
            raise PatchReadError(
                f"{self.path}: cannot decode the region at x={location[0]}, y={location[1]} "
                f"({size[0]}x{size[1]} px at level {level}): {exc}; the file may be corrupt or "
                "truncated: re-copy or re-export it"
            ) from None
        finally:
            private.close()

    def _read_region(self, left: int, top: int, level: int, size: int) -> np.ndarray:
        # OpenSlide takes the corner in level-0 pixels and shifts a region that
        # starts between two pixels of a coarser level itself.
        return _composite_on_white(self._read_rgba((left, top), level, (size, size)))

    def read_level_region(self, level: int, left: int, top: int, width: int, height: int) -> np.ndarray:
        d = self.level_downsamples[level]
        return _composite_on_white(self._read_rgba((round(left * d), round(top * d)), level, (width, height)))

    def _close_backend(self) -> None:
        with self._lock:
            handles = self._retired + ([self._handle] if self._handle is not None else [])
            self._handle, self._retired, self._users, self._closed = None, [], {}, True
        for h in handles:
            h.close()


def openslide_vendor(path: Path) -> str | None:
    """The format OpenSlide recognises `path` as ("aperio", "generic-tiff", "dicom", ...), else None."""
    import openslide

    try:
        return openslide.OpenSlide.detect_format(str(path))
    except Exception:  # detect_format raises on unreadable files: not a format OpenSlide knows
        return None


def open_openslide(path: Path, mpp: float | None, fallback_mpp: tuple[float, str] | None) -> OpenSlideReader:
    """`path` through OpenSlide.

    `UnreadableFormat` when OpenSlide does not recognise or support its format;
    a file it recognises but cannot open is truncated or corrupt: `UserError`.
    """
    import openslide

    vendor = openslide_vendor(path)
    if vendor is None:
        raise UnreadableFormat("OpenSlide does not recognise the format")
    try:
        handle = openslide.OpenSlide(str(path))
    except openslide.OpenSlideUnsupportedFormatError as exc:
        raise UnreadableFormat(f"OpenSlide recognises it as {vendor} but does not support it ({exc})") from None
    except Exception as exc:
        raise UserError(
            f"{path}: OpenSlide cannot open this {vendor} slide ({exc}); the file may be truncated "
            "or corrupt: re-copy or re-export it"
        ) from None
    try:
        found = _mpp_from_openslide_properties(handle.properties)
        resolved = resolve_mpp(path, found, mpp, fallback_mpp)
        reader = OpenSlideReader(path, handle, resolved[0], resolved[1])
        reader.metadata_mpp = found
        return reader
    except BaseException:
        handle.close()
        raise
