"""A DICOM WSI slide given as its folder: which file OpenSlide should open.

A DICOM whole-slide image is a series of files in one folder (what PACS
exports and the Imaging Data Commons deliver): one file per pyramid level
(image type VOLUME), and maybe a LABEL, an OVERVIEW and a THUMBNAIL image.
OpenSlide (4 and later) reads the whole series given any one of its files,
taking the VOLUME images as the levels. A folder is therefore resolved to its
series' largest VOLUME file; a folder with several series (slides) is refused
with the list of them, and a label or overview image is never the slide.
Reading the headers needs pydicom (the `[dicom]` extra); one .dcm file needs
nothing beyond OpenSlide.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ...errors import UserError

EXTRA = "pip install 'mmap-deploy[dicom]'"
WSI_SOP_CLASS = "1.2.840.10008.5.1.4.1.1.77.1.6"  # VL Whole Slide Microscopy Image Storage
# The header fields read from each file: SOP class, image type, series, size, and names to list slides by.
TAGS = ("SOPClassUID", "ImageType", "SeriesInstanceUID", "TotalPixelMatrixColumns", "TotalPixelMatrixRows",
        "ContainerIdentifier", "SeriesDescription")


@dataclass(frozen=True)
class _Instance:
    """One file of a DICOM WSI series."""

    path: Path
    series: str
    flavor: str  # ImageType's third value: VOLUME, LABEL, OVERVIEW, THUMBNAIL
    width: int
    height: int
    name: str  # the slide's ContainerIdentifier or the SeriesDescription, for a listing


def is_dicom_file(path: Path) -> bool:
    """A DICOM Part 10 file: "DICM" after its 128-byte preamble."""
    try:
        with open(path, "rb") as f:
            head = f.read(132)
    except OSError:
        return False
    return len(head) == 132 and head[128:] == b"DICM"


def _instance(path: Path) -> _Instance | None:
    """The file's header fields; None when it is not a WSI image (another SOP class, DICOMDIR, damaged)."""
    import pydicom

    try:
        ds = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=list(TAGS))
        if str(ds.get("SOPClassUID", "")) != WSI_SOP_CLASS:
            return None
        image_type = [str(v).upper() for v in (ds.get("ImageType") or [])]
        return _Instance(path, str(ds.SeriesInstanceUID), image_type[2] if len(image_type) > 2 else "",
                         int(ds.get("TotalPixelMatrixColumns") or 0), int(ds.get("TotalPixelMatrixRows") or 0),
                         str(ds.get("ContainerIdentifier") or ds.get("SeriesDescription") or ""))
    except Exception:  # pydicom raises assorted errors on files that only look like DICOM
        return None


def _pydicom_or_refuse(folder: Path) -> None:
    try:
        import pydicom  # noqa: F401
    except ImportError:
        raise UserError(f"{folder}: reading a DICOM series folder needs pydicom ({EXTRA}); or pass one .dcm "
                        "file of the slide") from None


def dicom_slide_file(folder: Path) -> tuple[Path, str]:
    """(the file OpenSlide opens, why) for a folder holding one DICOM WSI series.

    `UserError` for a folder with no DICOM file, no WSI image, several series (listed,
    each with its size and a file to pass), or with a series that has no VOLUME
    image (only a label or overview).
    """
    files = sorted(p for p in folder.iterdir() if p.is_file() and is_dicom_file(p))
    if not files:
        raise UserError(f"{folder}: is a directory, not a slide; pass the slide file (e.g. .svs, .tif, .ndpi, "
                        ".mrxs), or the folder of a DICOM WSI series")
    _pydicom_or_refuse(folder)
    instances = [i for i in map(_instance, files) if i is not None]
    if not instances:
        raise UserError(f"{folder}: no DICOM whole-slide images (VL Whole Slide Microscopy) in this folder "
                        f"({len(files)} DICOM files); pass the folder of one slide's series, or the slide file")
    series: dict[str, list[_Instance]] = {}
    for inst in instances:
        series.setdefault(inst.series, []).append(inst)
    volumes = {uid: [i for i in group if i.flavor == "VOLUME"] for uid, group in series.items()}
    slides = {uid: vs for uid, vs in volumes.items() if vs}
    if not slides:
        kinds = sorted({i.flavor or "unknown" for i in instances})
        raise UserError(f"{folder}: holds only {'/'.join(kinds)} images, no VOLUME image (the slide itself); "
                        "pass the folder that holds the slide's pyramid")
    if len(slides) > 1:
        listed = "; ".join(_describe(uid, vs, len(series[uid])) for uid, vs in sorted(slides.items()))
        raise UserError(f"{folder}: holds {len(slides)} slides (DICOM series): {listed}; pass one .dcm file of the "
                        "slide you want, or a folder holding one series")
    (uid, vs), = slides.items()
    base = max(vs, key=lambda i: (i.width * i.height, i.path.name))
    left = len(series[uid]) - len(vs)
    beside = f" ({left} label/overview/thumbnail image(s) beside them)" if left else ""
    return base.path, (f"a DICOM WSI series folder: OpenSlide reads its {len(vs)} VOLUME image(s) from "
                       f"{base.path.name}{beside}")


def _describe(uid: str, volumes: list[_Instance], files: int) -> str:
    base = max(volumes, key=lambda i: i.width * i.height)
    name = f" '{base.name}'" if base.name else ""
    return f"series {uid}{name}, {base.width}x{base.height} px, {files} files, e.g. {base.path.name}"
