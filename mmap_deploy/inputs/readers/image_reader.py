"""The plain-image backend: JPEG, PNG, BMP, WebP and single-page untiled TIFF, decoded once into memory.

The her2st images are ~9 300 x 9 900 px JPEGs. The resolution comes from the
TIFF tags, EXIF `XResolution` or the image's dpi, when plausible (plain images
usually carry a 72 or 96 dpi placeholder that says nothing of the microscope).
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import BinaryIO

import numpy as np

from ...errors import UserError
from ...options import spell
from .base import (
    _PIL_LOCK,
    SlideReader,
    UnreadableFormat,
    _composite_on_white,
    _parse_float,
    _pil_resize,
    _plausible,
    _resolution_to_mpp,
    resolve_mpp,
)

# The plain-image reader decodes the whole image (3 bytes per pixel). Above this
# the user should convert to a pyramidal TIFF, which is read tile by tile.
MAX_PLAIN_IMAGE_PIXELS = 25_000 * 25_000
# Plain-image formats the fallback reader accepts (PIL format names).
PLAIN_FORMATS = ("JPEG", "PNG", "TIFF", "BMP", "WEBP")


class ImageReader(SlideReader):
    """A plain image (JPEG, PNG, non-pyramidal TIFF) decoded once into memory: level 0 only."""

    backend = "image"

    def __init__(self, path: Path | str, pixels: np.ndarray, mpp: float, mpp_source: str, fmt: str):
        self.path = path
        pixels.setflags(write=False)
        self._pixels = pixels
        self.mpp = mpp
        self.mpp_source = mpp_source
        self.height, self.width = pixels.shape[:2]
        self.level_downsamples = (1.0,)
        self.level_dimensions = ((self.width, self.height),)
        self._tiles = [(1, 1)]
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
        # The pixels are in memory: one antialiased resize of all of them, no box-averaging first.
        if self._pixels is None:
            raise RuntimeError(f"{self.path}: slide is closed")
        w, h = self._thumbnail_size(max_side)
        image = _pil_resize(self._pixels, w, h)
        return image, image.shape[1] / self.width

    def _close_backend(self) -> None:
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


def _check_plain_tiff(path: Path | str, image) -> None:
    """Refuse tiled or multi-page TIFFs: this reader would decode one page whole; the tifffile
    and OpenSlide readers read those tile by tile (a damaged file lands here too)."""
    try:
        tiled = 322 in image.tag_v2  # TileWidth
        pages = image.n_frames
    except Exception:  # PIL raises assorted errors on a broken IFD chain
        tiled, pages = True, 0
    if tiled or pages != 1:
        raise UserError(
            f"{path}: the plain-image reader cannot open this tiled or multi-page TIFF: it is truncated or "
            f"corrupt, or it is a pyramid for the tifffile reader ({spell('reader', 'tifffile')}); re-copy it, or "
            "convert it with `vips tiffsave IN OUT.tif --tile --pyramid --compression jpeg`"
        )


def open_plain_image(source: Path | BinaryIO, mpp: float | None, fallback_mpp: tuple[float, str] | None = None,
                     name: Path | str | None = None) -> ImageReader:
    """Open `source` (a path or binary file object; `name` names it in messages) with PIL.

    `UnreadableFormat` if PIL does not recognise it as an image, `UserError`
    for a damaged, unsupported, too large or unresolved one.
    """
    path = source if name is None else name
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
            image = Image.open(source)
        except UnidentifiedImageError:
            raise UnreadableFormat("PIL does not recognise it as an image") from None
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
            resolved = resolve_mpp(path, found, mpp, fallback_mpp)
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
