"""Reading H&E slides: OpenSlide for whole-slide formats, a plain-image reader otherwise.

`open_slide` returns a `SlideReader`: level-0 size, the resolution in µm per
pixel (`mpp`) and where it came from (`mpp_source`), `read_patch` for one
spot's patch at the model's resolution, and `thumbnail` for the output's
`hires` image.

Whole-slide formats (SVS, pyramidal TIFF, NDPI, MRXS, ...) go through OpenSlide
and are never held in memory whole: each patch is read from the pyramid level
nearest the needed resolution (never a coarser one). Plain JPEG/PNG/TIFF images
(the her2st images are ~9 300 x 9 900 px JPEGs) are decoded once into memory.

The mpp comes from `--mpp` when given, else from the slide's metadata through a
fallback chain (`openslide.mpp-x` and `mpp-y`, `aperio.MPP`, `tiff.XResolution`,
then for plain images the TIFF tags, EXIF `XResolution` and the image's dpi);
without either, opening fails and says to pass `--mpp`. The name of the source
is recorded as `mpp_source`.
"""

from __future__ import annotations

import math
import threading
import warnings
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..model.preprocess import ViewSpec, patch_region, resize

# Microscope scans lie between ~0.1 µm/px (100x) and a few µm/px (1.25x); these
# bounds reject placeholders such as 72 dpi (352.8 µm/px) without rejecting a
# low-power scan.
MPP_RANGE = (0.05, 20.0)
# The plain-image reader decodes the whole image (3 bytes per pixel). Above this
# the user should convert to a pyramidal TIFF, which OpenSlide reads tile by tile.
MAX_PLAIN_IMAGE_PIXELS = 25_000 * 25_000
# Plain-image formats the fallback reader accepts (PIL format names).
PLAIN_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "WEBP")
MPP_HINT = "pass --mpp, e.g. --mpp 0.5 for a 20x scan or --mpp 0.25 for a 40x scan"
# Relative tolerance when choosing a pyramid level: a level whose downsample is
# within 0.1% of the needed one counts as "not coarser".
LEVEL_TOLERANCE = 1e-3
# Thumbnails are read in blocks of about this many level pixels a side (16 MiB as RGBA).
THUMBNAIL_BLOCK_PX = 2048
# Rows blended at a time where a region is not opaque (see _composite_on_white).
COMPOSITE_ROWS = 64

_PIL_LOCK = threading.Lock()


class PatchReadError(UserError):
    """A region of the slide could not be decoded (corrupt tile), even after a retry."""


def _plausible(mpp: float) -> bool:
    return math.isfinite(mpp) and MPP_RANGE[0] <= mpp <= MPP_RANGE[1]


def _check_mpp(path: Path, mpp: float, source: str) -> float:
    if not _plausible(mpp):
        why = f"expected {MPP_RANGE[0]}..{MPP_RANGE[1]}"
        if source != "--mpp" and mpp > MPP_RANGE[1]:
            why += "; a value like this is a screen-resolution placeholder such as 72 dpi"
        raise UserError(f"{path}: implausible resolution {mpp:g} µm per pixel from {source} ({why}); {MPP_HINT}")
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


class SlideReader:
    """An open slide: level-0 geometry, resolution, and patch/thumbnail reading.

    Attributes: `path`, `mpp` (level-0 µm per pixel), `mpp_source`, `width`,
    `height` (level-0 pixels), `format` ("openslide:<vendor>" or "image:<FORMAT>"),
    `metadata_mpp` (the slide's own (mpp, source) even when `--mpp` overrides it;
    None when it has none). Thread-safe: the pipeline reads patches from a thread pool.
    """

    path: Path
    mpp: float
    mpp_source: str
    width: int
    height: int
    format: str
    metadata_mpp: tuple[float, str] | None = None
    _tiles: list[tuple[int, int]] = [(1, 1)]

    def mpp_warning(self, tolerance: float = 0.05) -> str | None:
        """A warning when `--mpp` contradicts the slide's own plausible resolution, else None."""
        if self.mpp_source != "--mpp" or self.metadata_mpp is None:
            return None
        own, source = self.metadata_mpp
        if not _plausible(own) or abs(self.mpp - own) <= tolerance * own:
            return None
        return (
            f"{self.path}: --mpp {self.mpp:g} overrides the slide's own {own:g} µm per pixel ({source}); "
            "patches cover the wrong area if --mpp is wrong"
        )

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

        Plain images have level 0 only (`patch_level`), where level and level-0 pixels are one.
        """
        return self.read_level_region(level, left, top, size, size)

    def patch_level(self, side: int, out_px: int) -> tuple[int, float, int]:
        """(level, downsample, side in level px) that `read_patch` reads for a level-0 `side` -> `out_px`."""
        return 0, 1.0, side

    def tile_size(self, level: int) -> tuple[int, int]:
        """(width, height) of the storage tiles of `level`; (1, 1) when pixels are not tiled."""
        return self._tiles[level]

    def read_level_region(self, level: int, left: int, top: int, width: int, height: int) -> np.ndarray:
        """(height, width, 3) uint8 RGB of `level` from level pixel (left, top), white outside (may be a view)."""
        raise NotImplementedError

    def thumbnail(self, max_side: int = 2000) -> tuple[np.ndarray, float]:
        """An RGB uint8 image of the whole slide, longest side <= max_side, and its scale.

        The scale is thumbnail pixels per level-0 pixel (along x), e.g. the
        `tissue_hires_scalef` of a Visium-style output.
        """
        raise NotImplementedError

    def close(self) -> None:
        """Release the slide's file handles and memory."""

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


class OpenSlideReader(SlideReader):
    """A whole-slide image read through OpenSlide, tile by tile.

    OpenSlide errors are sticky: after one undecodable tile, the handle refuses
    every later call, from every thread. So a failed read retires the shared
    handle (closed once no thread uses it; later reads get a fresh one) and
    retries once on a private handle, which no other thread's failure can
    spoil. A region that fails twice raises `PatchReadError`.
    """

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

    def level_for_downsample(self, downsample: float) -> int:
        """The coarsest pyramid level that is not coarser than `downsample` (level-0 px per output px)."""
        best = 0
        for level, d in enumerate(self.level_downsamples):
            if d <= downsample * (1.0 + LEVEL_TOLERANCE) and d >= self.level_downsamples[best]:
                best = level
        return best

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

    def patch_level(self, side: int, out_px: int) -> tuple[int, float, int]:
        level = self.level_for_downsample(side / out_px)
        d = self.level_downsamples[level]
        # Rounded, not ceiled: the read covers the region to within half a level pixel.
        return level, d, max(1, int(round(side / d)))

    def _read_region(self, left: int, top: int, level: int, size: int) -> np.ndarray:
        return _composite_on_white(self._read_rgba((left, top), level, (size, size)))

    def read_level_region(self, level: int, left: int, top: int, width: int, height: int) -> np.ndarray:
        d = self.level_downsamples[level]
        return _composite_on_white(self._read_rgba((round(left * d), round(top * d)), level, (width, height)))

    def thumbnail(self, max_side: int = 2000) -> tuple[np.ndarray, float]:
        # Streams the chosen pyramid level in blocks, box-averaging each by an
        # integer factor, so memory stays bounded even for a huge single-level
        # TIFF (openslide-python's get_thumbnail reads the whole level at once).
        w, h = self._thumbnail_size(max_side)
        level = self.level_for_downsample(self.width / w)
        d = self.level_downsamples[level]
        lw, lh = self.level_dimensions[level]
        k = max(1, lw // w)  # box factor: the reduced level is 1-2x the thumbnail
        block = k * max(1, THUMBNAIL_BLOCK_PX // k)
        reduced = np.empty((-(-lh // k), -(-lw // k), 3), np.uint8)
        for top in range(0, lh, block):
            for left in range(0, lw, block):
                size = (min(block, lw - left), min(block, lh - top))
                rgba = self._read_rgba((round(left * d), round(top * d)), level, size)
                reduced[top // k : (top + size[1] + k - 1) // k, left // k : (left + size[0] + k - 1) // k] = (
                    _box_reduce(_composite_on_white(rgba), k)
                )
        # reduced pixel i covers level-0 pixels [i*k*d, (i+1)*k*d): resize to the
        # thumbnail's scale, then cut off the overhang of the last partial block.
        scale = w / self.width
        rw = max(w, int(round(reduced.shape[1] * k * d * scale)))
        rh = max(h, int(round(reduced.shape[0] * k * d * scale)))
        image = np.ascontiguousarray(_pil_resize(reduced, rw, rh)[:h, :w])
        return image, scale

    def close(self) -> None:
        with self._lock:
            handles = self._retired + ([self._handle] if self._handle is not None else [])
            self._handle, self._retired, self._users, self._closed = None, [], {}, True
        for h in handles:
            h.close()


def _box_reduce(rgb: np.ndarray, k: int) -> np.ndarray:
    """Average k x k pixel blocks (edge pixels repeated to fill the last partial block)."""
    if k == 1:
        return rgb
    h, w = rgb.shape[:2]
    ph, pw = -h % k, -w % k
    if ph or pw:
        rgb = np.pad(rgb, ((0, ph), (0, pw), (0, 0)), mode="edge")
    sums = rgb.reshape(rgb.shape[0] // k, k, rgb.shape[1] // k, k, 3).sum(axis=(1, 3), dtype=np.uint32)
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


class ImageReader(SlideReader):
    """A plain image (JPEG, PNG, non-pyramidal TIFF) decoded once into memory."""

    def __init__(self, path: Path, pixels: np.ndarray, mpp: float, mpp_source: str, fmt: str):
        self.path = path
        pixels.setflags(write=False)
        self._pixels = pixels
        self.mpp = mpp
        self.mpp_source = mpp_source
        self.height, self.width = pixels.shape[:2]
        self.format = f"image:{fmt}"

    def read_level_region(self, level: int, left: int, top: int, width: int, height: int) -> np.ndarray:
        pixels = self._pixels
        if pixels is None:
            raise RuntimeError(f"{self.path}: slide is closed")
        x0, y0 = max(left, 0), max(top, 0)
        x1, y1 = min(left + width, self.width), min(top + height, self.height)
        if x0 == left and y0 == top and x1 == left + width and y1 == top + height:
            return pixels[y0:y1, x0:x1]
        out = np.full((height, width, 3), 255, dtype=np.uint8)
        if x1 > x0 and y1 > y0:
            out[y0 - top : y1 - top, x0 - left : x1 - left] = pixels[y0:y1, x0:x1]
        return out

    def thumbnail(self, max_side: int = 2000) -> tuple[np.ndarray, float]:
        if self._pixels is None:
            raise RuntimeError(f"{self.path}: slide is closed")
        w, h = self._thumbnail_size(max_side)
        image = _pil_resize(self._pixels, w, h)
        return image, image.shape[1] / self.width

    def close(self) -> None:
        self._pixels = None


def _exif_mpp(image) -> float | None:
    """µm per pixel from EXIF XResolution + ResolutionUnit (2 = inch, 3 = cm)."""
    try:
        exif = image.getexif()
        res, unit = exif.get(282), exif.get(296, 2)
    except Exception:
        return None
    res = _parse_float(res)
    return _resolution_to_mpp(res, str(unit)) if res else None


def _plain_image_mpp(image) -> tuple[float, str] | None:
    """A plausible resolution from a plain image's own metadata, if any.

    Plain images usually carry a placeholder (72 or 96 dpi) that says nothing
    about the microscope, so only plausible values are used.
    """
    fmt = image.format
    if fmt == "TIFF":
        tags = getattr(image, "tag_v2", {})
        res = _parse_float(tags.get(282))
        mpp = _resolution_to_mpp(res, str(tags.get(296, 2))) if res else None
        if mpp is not None and _plausible(mpp):
            return mpp, "tiff.XResolution"
    mpp = _exif_mpp(image)
    if mpp is not None and _plausible(mpp):
        return mpp, "exif.XResolution"
    dpi = image.info.get("dpi")
    if dpi:
        res = _parse_float(dpi[0])
        mpp = _resolution_to_mpp(res, "inch") if res else None
        if mpp is not None and _plausible(mpp):
            return mpp, "image.dpi"
    return None


def _check_plain_tiff(path: Path, image) -> None:
    """Refuse tiled or multi-page TIFFs: OpenSlide reads every intact one of those,
    so reaching the plain-image reader means a damaged file or a layout to convert."""
    try:
        tiled = 322 in image.tag_v2  # TileWidth
        pages = image.n_frames
    except Exception:  # PIL raises assorted errors on a broken IFD chain
        tiled, pages = True, 0
    if tiled or pages != 1:
        raise UserError(
            f"{path}: OpenSlide cannot open this tiled or multi-page TIFF: it is truncated or corrupt, "
            "or its layout is not supported; re-copy it, or convert it with "
            "`vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg`"
        )


def _open_plain_image(path: Path, mpp: float | None,
                      fallback_mpp: tuple[float, str] | None = None) -> ImageReader | None:
    """Open `path` with PIL; None if PIL does not recognise it as an image."""
    from PIL import Image, UnidentifiedImageError

    with _PIL_LOCK, warnings.catch_warnings():
        # PIL warns (e.g. "Corrupt EXIF data") on the damaged files that the
        # checks below turn into one clear error.
        warnings.filterwarnings("ignore", module=r"PIL\.")
        old_limit = Image.MAX_IMAGE_PIXELS
        # PIL's decompression-bomb guard (89 Mpx) is below a her2st image; this
        # reader applies its own, higher limit below.
        Image.MAX_IMAGE_PIXELS = None
        try:
            image = Image.open(path)
        except UnidentifiedImageError:
            return None
        except Exception as exc:  # PIL raises assorted errors on damaged headers
            raise UserError(f"{path}: cannot read the image ({exc}); check that the file is complete") from None
        finally:
            Image.MAX_IMAGE_PIXELS = old_limit
        with image:
            fmt = image.format or "unknown"
            if fmt not in PLAIN_FORMATS:
                raise UserError(f"{path}: {fmt} images are not supported; convert it to a pyramidal TIFF, JPEG or PNG")
            if fmt == "TIFF":
                _check_plain_tiff(path, image)
            w, h = image.size
            if w * h > MAX_PLAIN_IMAGE_PIXELS:
                raise UserError(
                    f"{path}: a {w}x{h} px plain image is too large to decode in memory; convert it to a "
                    "pyramidal tiled TIFF (e.g. `vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg`)"
                )
            if image.mode not in _PLAIN_MODES:
                raise UserError(
                    f"{path}: {image.mode} pixels are not supported; save the image as 8-bit RGB (JPEG, PNG or TIFF)"
                )
            found = _plain_image_mpp(image)
            if mpp is not None:
                resolved = (_check_mpp(path, mpp, "--mpp"), "--mpp")
            elif found is None and fallback_mpp is not None:
                resolved = (_check_mpp(path, *fallback_mpp), fallback_mpp[1])
            else:
                if found is None:
                    raise UserError(f"{path}: no resolution (µm per pixel) in the slide's metadata; {MPP_HINT}")
                resolved = found
            try:
                pixels = _decode_rgb(image)
            except Exception as exc:  # PIL reports truncated or corrupt data only when decoding
                raise UserError(
                    f"{path}: the image is truncated or corrupt ({exc}); re-copy or re-export the file"
                ) from None
    reader = ImageReader(path, pixels, resolved[0], resolved[1], fmt)
    reader.metadata_mpp = found
    return reader


# 8-bit modes the plain-image reader turns into RGB; 16-bit and float images are refused.
_PLAIN_MODES = ("RGB", "RGBA", "RGBX", "L", "LA", "P", "PA", "CMYK", "YCbCr", "1")


def _decode_rgb(image) -> np.ndarray:
    """Decode a PIL image to contiguous RGB uint8; transparent pixels become white."""
    image.load()
    if image.mode == "RGB":
        return np.ascontiguousarray(np.asarray(image))
    has_alpha = image.mode in ("RGBA", "LA", "PA") or (image.mode == "P" and "transparency" in image.info)
    if has_alpha:
        return np.ascontiguousarray(_composite_on_white(np.asarray(image.convert("RGBA"))))
    return np.ascontiguousarray(np.asarray(image.convert("RGB")))


def open_slide(path: str | Path, mpp: float | None = None,
               fallback_mpp: tuple[float, str] | None = None) -> SlideReader:
    """Open a slide or plain image and resolve its resolution (µm per pixel).

    `mpp` (the CLI's `--mpp`) overrides the metadata; `fallback_mpp` (value,
    source), e.g. the spot lattice's, is used when neither gives one. Raises `UserError` for a
    missing file, a file that is not a slide/image, a truncated or corrupt file,
    no resolution anywhere, or an implausible one.
    """
    import openslide

    path = Path(path)
    if not path.exists():
        raise UserError(f"{path}: slide file not found; check the path")
    if path.is_dir():
        raise UserError(
            f"{path}: is a directory, not a slide; pass the slide file (e.g. .svs, .tif, .ndpi, .mrxs; "
            "for DICOM, one .dcm file of the slide)"
        )
    if mpp is not None:
        mpp = _check_mpp(path, float(mpp), "--mpp")

    try:
        vendor = openslide.OpenSlide.detect_format(str(path))
    except Exception:
        vendor = None
    if vendor is not None:
        try:
            handle = openslide.OpenSlide(str(path))
        except openslide.OpenSlideUnsupportedFormatError:
            handle = None
        except Exception as exc:
            raise UserError(
                f"{path}: OpenSlide cannot open this {vendor} slide ({exc}); the file may be truncated "
                "or corrupt: re-copy or re-export it"
            ) from None
        if handle is not None:
            try:
                found = _mpp_from_openslide_properties(handle.properties)
                if mpp is not None:
                    resolved = (mpp, "--mpp")
                elif found is None and fallback_mpp is not None:
                    resolved = (_check_mpp(path, *fallback_mpp), fallback_mpp[1])
                else:
                    if found is None:
                        raise UserError(
                            f"{path}: no resolution (µm per pixel) in the slide's metadata; {MPP_HINT}"
                        )
                    resolved = (_check_mpp(path, found[0], found[1]), found[1])
                reader = OpenSlideReader(path, handle, resolved[0], resolved[1])
                reader.metadata_mpp = found
                return reader
            except BaseException:
                handle.close()
                raise

    reader = _open_plain_image(path, mpp, fallback_mpp)
    if reader is None:
        raise UserError(
            f"{path}: not a slide or image this tool can read; supported: whole-slide formats "
            "OpenSlide reads (SVS, pyramidal TIFF, NDPI, MRXS, SCN, ...) and plain JPEG/PNG/TIFF images"
        )
    return reader

