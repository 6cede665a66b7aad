"""Reading H&E slides: one `SlideReader` interface, a backend chosen per file.

`open_slide` returns a `SlideReader` (`readers/base.py`): level-0 size, the
pyramid levels, the resolution in µm per pixel (`mpp`) and where it came from
(`mpp_source`), `read_patch` for one spot's patch at the model's resolution,
and `thumbnail` for the output's `hires` image; `backend`, `format` and
`reason` say which reader reads it and why. Backends (`readers/`):

- `openslide`: vendor formats (SVS, NDPI, MRXS, SCN, ...), generic pyramidal
  TIFF, DICOM WSI (one .dcm file, or the series folder);
- `tifffile` (the `[tiff]` extra): OME-TIFF, pyramids in SubIFDs or as
  separate series, big-endian TIFF, other TIFFs OpenSlide does not recognise;
  also reads binary file objects (remote slides read by byte range);
- `image`: plain JPEG/PNG/TIFF images, decoded once into memory.

Slides are never held in memory whole: each patch is read from the pyramid
level nearest the needed resolution (never a coarser one).

`reader="auto"` ranks the backends by what the file is (its first bytes, a
TIFF's first IFD, the format OpenSlide recognises), as wsidata ranks its
readers, but never falls through silently: a backend that does not read the
file says why, and that is kept in `reason` (or in the error when none
does); a backend that recognises the file but cannot read it (truncated,
corrupt, no resolution) stops there with its error. `reader="openslide"`,
`"tifffile"` or `"image"` forces one.

The mpp comes from `--mpp` when given, else from the slide's metadata through a
fallback chain (OpenSlide: `openslide.mpp-x` and `mpp-y`, `aperio.MPP`,
`tiff.XResolution`; tifffile: the OME-XML `PhysicalSizeX`, `aperio.MPP`,
`tiff.XResolution`; plain images: the TIFF tags, EXIF `XResolution` and the
image's dpi); without either, opening fails with `NoResolutionError`, which says
to pass `--mpp`. The name of the source is recorded as `mpp_source`.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from ..errors import UserError
from ..location import RemotePath, as_location, local_copy, open_input
from ..location.transfer import MULTI_FILE_FORMATS
from ..options import SLIDE_READERS, spell
from .readers.base import (
    GIVEN_MPP,
    MPP_RANGE,
    PHASES,
    NoResolutionError,
    PatchReadError,
    SlideReader,
    UnreadableFormat,
    _box_reduce,
    _check_mpp,
    _composite_on_white,
    _pil_resize,
    subpixel_start,
)
from .readers.image_reader import MAX_PLAIN_IMAGE_PIXELS, PLAIN_FORMATS, ImageReader, open_plain_image
from .readers.openslide_reader import (
    OpenSlideReader,
    _mpp_from_openslide_properties,
    open_openslide,
    openslide_vendor,
)
from .readers.sniff import file_kind, tiff_header

__all__ = [
    "GIVEN_MPP", "MAX_PLAIN_IMAGE_PIXELS", "MPP_RANGE", "PHASES", "PLAIN_FORMATS", "READERS", "ImageReader",
    "NoResolutionError", "OpenSlideReader", "PatchReadError", "SlideReader", "open_slide", "subpixel_start",
    # shared with tissue detection and the tests
    "_box_reduce", "_composite_on_white", "_mpp_from_openslide_properties", "_pil_resize",
]

# `open_slide(reader=...)` and the `reader` option: "auto" chooses per file, the others force a backend.
READERS = SLIDE_READERS
SUPPORTED = ("supported: whole-slide formats OpenSlide reads (SVS, pyramidal TIFF, NDPI, MRXS, SCN, DICOM, ...), "
             "OME-TIFF and other TIFF pyramids, and plain JPEG/PNG/TIFF images")


@dataclass(frozen=True)
class _Choice:
    """A backend to try on `target` (a DICOM folder's chosen file, else the slide) and why."""

    backend: str
    reason: str
    target: Path | BinaryIO


def _open(choice: _Choice, name: Path | str, mpp: float | None,
          fallback_mpp: tuple[float, str] | None) -> SlideReader:
    if choice.backend == "openslide":
        if not isinstance(choice.target, Path):
            raise UnreadableFormat("OpenSlide reads local files only")
        return open_openslide(choice.target, mpp, fallback_mpp)
    if choice.backend == "tifffile":
        from .readers.tifffile_reader import open_tifffile

        return open_tifffile(choice.target, name, mpp, fallback_mpp)
    return open_plain_image(choice.target, mpp, fallback_mpp, name=name)


def _ranked(path: Path) -> list[_Choice]:
    """The backends to try on a local file or folder, best first, each with the reason it is tried."""
    if path.is_dir():
        from .readers.dicom_folder import dicom_slide_file

        target, why = dicom_slide_file(path)
        return [_Choice("openslide", why, target)]
    with open(path, "rb") as f:
        kind = file_kind(f)
        header = tiff_header(f) if kind == "tiff" else None
    vendor = openslide_vendor(path)
    if kind == "dicom":
        return [_Choice("openslide", "a DICOM WSI file: OpenSlide reads its series' VOLUME images from the folder",
                        path)]
    if kind != "tiff":
        if vendor is not None:
            return [_Choice("openslide", f"OpenSlide recognises it as {vendor}", path),
                    _Choice("image", "read as a plain image", path)]
        return [_Choice("image", "not a TIFF, DICOM or a format OpenSlide recognises: a plain image, decoded "
                                 "once into memory", path)]
    if header is not None and header.ome:
        return [_Choice("tifffile", f"an OME-TIFF ({header.describe()}): OpenSlide reads neither its OME-XML "
                                    "resolution nor a pyramid in SubIFDs", path)]
    if header is not None and header.subifds:
        return [_Choice("tifffile", f"a TIFF ({header.describe()}): OpenSlide does not see a pyramid in SubIFDs",
                        path)]
    if vendor is not None:
        return [_Choice("openslide", f"OpenSlide recognises it as {vendor}", path),
                _Choice("tifffile", "read through tifffile", path)]
    if header is None:
        raise UserError(f"{path}: the TIFF's first image directory cannot be read: the file is truncated or "
                        "corrupt; re-copy or re-export it")
    if header.tiled or header.more_pages:
        return [_Choice("tifffile", f"a TIFF that OpenSlide does not recognise ({header.describe()})", path)]
    if header.width * header.height > MAX_PLAIN_IMAGE_PIXELS:
        return [_Choice("tifffile", f"a single-page TIFF too large to decode in memory ({header.width}x"
                                    f"{header.height} px): read strip by strip", path)]
    return [_Choice("image", "a single-page TIFF in strips: decoded once into memory", path)]


def _forced(source: Path | BinaryIO, reader: str) -> list[_Choice]:
    why = f"chosen by the caller (reader '{reader}')"
    if reader == "openslide" and isinstance(source, Path) and source.is_dir():
        from .readers.dicom_folder import dicom_slide_file

        target, folder_why = dicom_slide_file(source)
        return [_Choice("openslide", f"{why}; {folder_why}", target)]
    return [_Choice(reader, why, source)]


# Single-file formats that OpenSlide reads and the tifffile reader does not take for its own: a remote one
# is copied to local disk whole (location.local_copy); multi-file formats (MIRAX, VMS, DICOM) are refused there.
COPIED_FOR_OPENSLIDE = (".ndpi", ".scn", ".bif", ".svslide", ".vsf")


def _open_remote(loc: RemotePath, mpp: float | None, fallback_mpp: tuple[float, str] | None,
                 reader: str) -> SlideReader:
    """A slide in a bucket or on a web server (`location`): TIFFs and plain images read by byte range
    through a block cache; a format only OpenSlide reads copied to local disk first (its size bounded,
    the copy removed with the slide); a DICOM series refused with the fix. The remote file (and the
    copy) close with the slide."""
    dicom = (f"{loc}: a DICOM WSI is a series of files, which OpenSlide reads only from a local folder; copy "
             "the series folder to local disk and pass that folder")
    if loc.url.endswith("/"):
        raise UserError(dicom)
    stack = contextlib.ExitStack()
    try:
        f = stack.enter_context(open_input(loc))
        if file_kind(f) == "dicom":
            raise UserError(dicom)
        suffix = loc.suffix.lower()
        if reader == "openslide" or suffix in COPIED_FOR_OPENSLIDE or suffix in MULTI_FILE_FORMATS:
            local = stack.enter_context(local_copy(loc, stats=f.stats))
            slide = open_slide(local, mpp, fallback_mpp, reader)
            slide.reason += "; copied to local disk whole: OpenSlide reads local files only"
        else:
            slide = open_slide(f, mpp, fallback_mpp, reader, name=str(loc))
        slide.path = loc
        slide._owned = stack
        return slide
    except BaseException:
        stack.close()
        raise


def _ranked_object(f: BinaryIO) -> list[_Choice]:
    """The backend for a binary file object (a remote slide): tifffile for a TIFF, else a plain image."""
    kind = file_kind(f)
    if kind == "tiff":
        return [_Choice("tifffile", "a TIFF in a file object (read by byte range)", f)]
    if kind == "dicom":
        raise UnreadableFormat("DICOM is read by OpenSlide, from local files only")
    return [_Choice("image", "a file object that is not a TIFF: a plain image, decoded once into memory", f)]


def open_slide(path: str | Path | BinaryIO, mpp: float | None = None,
               fallback_mpp: tuple[float, str] | None = None, reader: str = "auto", *,
               name: str | None = None) -> SlideReader:
    """Open a slide or plain image with the backend that reads it, and resolve its resolution.

    Parameters
    ----------
    path
        A slide file, a DICOM WSI series folder, or a binary file object with
        `seek` and `read` (e.g. an fsspec file of an s3:// slide: TIFFs through
        tifffile, by byte range; plain images decoded whole).
    mpp
        The CLI's `--mpp`: overrides the metadata.
    fallback_mpp
        (value, source), e.g. the spot lattice's: used when neither gives one.
    reader
        One of `READERS`: "auto" (chosen per file, see the module docstring) or
        a backend to force.
    name
        How messages name a file object (e.g. its URL); a path names itself.

    Returns
    -------
    SlideReader
        With `backend`, `format` ("tifffile:ome-tiff") and `reason` (why this backend).

    Raises
    ------
    UserError
        A missing file, a file that is not a slide/image, a truncated or corrupt
        file, a forced backend that does not read it, a missing extra, an
        implausible resolution; `NoResolutionError` (a `UserError`) when there
        is no resolution anywhere.
    """
    if reader not in READERS:
        raise UserError(f"reader must be one of {', '.join(READERS)}, not {reader!r}")
    if not (hasattr(path, "read") and hasattr(path, "seek")):
        loc = as_location(path)
        if isinstance(loc, RemotePath):
            return _open_remote(loc, mpp, fallback_mpp, reader)
    if hasattr(path, "read") and hasattr(path, "seek"):
        source: Path | BinaryIO = path
        label: Path | str = name or str(getattr(path, "path", None) or getattr(path, "name", None) or "<file>")
    else:
        source = label = Path(path)
        if not source.exists():
            raise UserError(f"{source}: slide file not found; check the path")
    if mpp is not None:
        mpp = _check_mpp(label, float(mpp), GIVEN_MPP)
    try:
        if reader != "auto":
            choices = _forced(source, reader)
        else:
            choices = _ranked(source) if isinstance(source, Path) else _ranked_object(source)
    except UnreadableFormat as exc:
        raise UserError(f"{label}: {exc}; {SUPPORTED}") from None
    passed: list[str] = []  # why each backend tried before did not read the file
    for choice in choices:
        try:
            slide = _open(choice, label, mpp, fallback_mpp)
        except UnreadableFormat as exc:
            passed.append(f"{choice.backend}: {exc}")
            continue
        slide.reason = choice.reason + "".join(f"; {p}" for p in passed)
        return slide
    if reader != "auto":
        raise UserError(f"{label}: the {reader} reader cannot open it ({'; '.join(passed)}); try "
                        f"{spell('reader', 'auto')}")
    raise UserError(f"{label}: not a slide or image this tool can read ({'; '.join(passed)}); {SUPPORTED}")
