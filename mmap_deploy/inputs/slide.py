"""Reading H&E slides: OpenSlide for whole-slide formats, a plain-image reader otherwise.

`open_slide` returns a `SlideReader` (`readers/base.py`): level-0 size, the
pyramid levels, the resolution in µm per pixel (`mpp`) and where it came from
(`mpp_source`), `read_patch` for one spot's patch at the model's resolution,
and `thumbnail` for the output's `hires` image. The backends live in
`readers/`.

Whole-slide formats (SVS, pyramidal TIFF, NDPI, MRXS, ...) go through OpenSlide
and are never held in memory whole: each patch is read from the pyramid level
nearest the needed resolution (never a coarser one). Plain JPEG/PNG/TIFF images
(the her2st images are ~9 300 x 9 900 px JPEGs) are decoded once into memory.

The mpp comes from `--mpp` when given, else from the slide's metadata through a
fallback chain (`openslide.mpp-x` and `mpp-y`, `aperio.MPP`, `tiff.XResolution`,
then for plain images the TIFF tags, EXIF `XResolution` and the image's dpi);
without either, opening fails with `NoResolutionError`, which says to pass
`--mpp`. The name of the source is recorded as `mpp_source`.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import UserError
from .readers.base import (
    MPP_HINT,
    MPP_RANGE,
    NoResolutionError,
    PatchReadError,
    SlideReader,
    _box_reduce,
    _check_mpp,
    _composite_on_white,
    _pil_resize,
)
from .readers.image_reader import MAX_PLAIN_IMAGE_PIXELS, PLAIN_FORMATS, ImageReader, open_plain_image
from .readers.openslide_reader import OpenSlideReader, _mpp_from_openslide_properties, open_openslide

__all__ = [
    "MAX_PLAIN_IMAGE_PIXELS", "MPP_HINT", "MPP_RANGE", "PLAIN_FORMATS", "ImageReader", "NoResolutionError",
    "OpenSlideReader", "PatchReadError", "SlideReader", "open_slide",
    # shared with tissue detection and the tests
    "_box_reduce", "_composite_on_white", "_mpp_from_openslide_properties", "_pil_resize",
]


def open_slide(path: str | Path, mpp: float | None = None,
               fallback_mpp: tuple[float, str] | None = None) -> SlideReader:
    """Open a slide or plain image and resolve its resolution (µm per pixel).

    `mpp` (the CLI's `--mpp`) overrides the metadata; `fallback_mpp` (value,
    source), e.g. the spot lattice's, is used when neither gives one. Raises `UserError` for a
    missing file, a file that is not a slide/image, a truncated or corrupt file,
    or an implausible resolution, and `NoResolutionError` (a `UserError`) when
    there is no resolution anywhere.
    """
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
    reader = open_openslide(path, mpp, fallback_mpp)
    if reader is None:
        reader = open_plain_image(path, mpp, fallback_mpp)
    if reader is None:
        raise UserError(
            f"{path}: not a slide or image this tool can read; supported: whole-slide formats "
            "OpenSlide reads (SVS, pyramidal TIFF, NDPI, MRXS, SCN, ...) and plain JPEG/PNG/TIFF images"
        )
    return reader
