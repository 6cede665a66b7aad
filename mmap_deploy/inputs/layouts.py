"""The COORDS argument as users have it: a table, or a Space Ranger / Visium HD folder.

`read_spot_input` takes any of:

| COORDS | what is read |
|---|---|
| a table (``.csv``, ``.tsv``, ``.parquet``) | `coords.read_coords` |
| Space Ranger ``outs/`` or its ``spatial/`` | ``tissue_positions.csv`` (Space Ranger 2+) or ``tissue_positions_list.csv`` (1.x), ``scalefactors_json.json``, and ``tissue_hires_image.png`` / ``tissue_lowres_image.png`` when there |
| Visium HD ``binned_outputs/square_NNNum/`` or its ``spatial/`` | ``tissue_positions.parquet`` and ``scalefactors_json.json`` (``bin_size_um``, ``microns_per_pixel``), images as above |

A table inside such a ``spatial/`` folder is read with the folder's scale
factors and images too. Space Ranger's files are described in its "Spatial
outputs" documentation (10x Genomics): ``tissue_hires_image.png`` is 2 000 px
on its longest side (4 000 for 11 mm Visium, 6 000 for Visium HD),
``tissue_lowres_image.png`` 600 px, and ``tissue_hires_scalef`` /
``tissue_lowres_scalef`` convert full-resolution pixels to theirs.

Any of these may be remote (`s3://`, `gs://`, `https://`; see
`mmap_deploy.location`): the same files are fetched, and a bucket's folder
is listed for its bin folders. A web server has no listing: a folder URL
ends with `/`, and a Visium HD output must be given as its bin folder.
"""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UserError, first_line
from ..location import Location, RemotePath, as_location, open_input
from ..messages import warn
from .coords import Spots, read_coords
from .geometry import LATTICES, LatticeSpec, visium_hd_lattice

if TYPE_CHECKING:  # pragma: no cover
    from .geometry import LatticeFit
    from .slide import SlideReader

POSITION_FILES = ("tissue_positions.parquet", "tissue_positions.csv", "tissue_positions_list.csv")
SCALEFACTORS_FILE = "scalefactors_json.json"
IMAGE_FILES = {"hires": "tissue_hires_image.png", "lowres": "tissue_lowres_image.png"}
SCALEF_KEYS = {"hires": "tissue_hires_scalef", "lowres": "tissue_lowres_scalef"}
_BIN_FOLDER = re.compile(r"square_(\d+)um")
# Space Ranger rounds its downsampled images' sides; allow this many pixels of difference.
IMAGE_SIZE_SLACK = 2


@dataclass
class SpotInput:
    """Spots plus what came with them: the layout, the lattice, scale factors and Space Ranger's images."""

    spots: Spots
    layout: str  # e.g. "spaceranger-spatial", "visium-hd-bins", or "table"
    table: Location  # a pathlib.Path, or a location.RemotePath
    lattice: LatticeSpec | None = None
    scalefactors: dict[str, float] = field(default_factory=dict)
    images: dict[str, Location] = field(default_factory=dict)  # "hires"/"lowres" -> PNG

    @property
    def hd_mpp(self) -> float | None:
        """Visium HD's own µm per pixel (scalefactors' microns_per_pixel), if any."""
        v = self.scalefactors.get("microns_per_pixel")
        return float(v) if v else None


def _spatial_folder(path: Location) -> Location:
    """The folder holding the positions table, for an outs/, spatial/, square_NNNum/ or binned_outputs/ path."""
    if any((path / f).is_file() for f in POSITION_FILES):
        return path
    if any((path / "spatial" / f).is_file() for f in POSITION_FILES):
        return path / "spatial"
    bins = sorted(p.name for p in path.glob("square_*um") if p.is_dir())
    if not bins and (path / "binned_outputs").is_dir():
        bins = sorted(f"binned_outputs/{p.name}" for p in (path / "binned_outputs").glob("square_*um") if p.is_dir())
    if bins:
        raise UserError(
            f"{path}: a Visium HD output with bins of several sizes; pass one bin folder, "
            f"e.g. {path / bins[-1]} (available: {', '.join(b.split('/')[-1] for b in bins)})"
        )
    raise UserError(
        f"{path}: no spot table found; a Space Ranger folder holds spatial/tissue_positions.csv "
        "(or tissue_positions_list.csv, or Visium HD's tissue_positions.parquet): pass its outs/ or spatial/ "
        "folder, or the table itself"
    )


def _read_scalefactors(path: Location) -> dict[str, float]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: cannot read the scale factors ({exc}); re-copy Space Ranger's file") from None
    if not isinstance(data, dict):
        raise UserError(f"{path}: expected a JSON object of scale factors")
    out = {}
    for key, value in data.items():
        if isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value):
            out[str(key)] = float(value)
    for key in (*SCALEF_KEYS.values(), "microns_per_pixel", "bin_size_um", "spot_diameter_fullres"):
        if key in out and out[key] <= 0:
            raise UserError(f"{path}: {key} = {out[key]:g} must be positive")
    return out


# What a spot table's name ends with, and what a slide's file starts with (TIFF/SVS/NDPI, JPEG, PNG, BMP, JPEG 2000).
TABLE_SUFFIXES = (".csv", ".tsv", ".txt", ".parquet", ".csv.gz", ".tsv.gz", ".txt.gz")
SLIDE_SUFFIXES = (".svs", ".tif", ".tiff", ".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide",
                  ".jpg", ".jpeg", ".png", ".bmp", ".jp2")
_IMAGE_MAGIC = (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+", b"\xff\xd8\xff", b"\x89PNG", b"BM",
                b"\x00\x00\x00\x0cjP")


def _looks_like_slide(path: Location) -> bool:
    if not path.is_file():
        return False
    if path.suffix.lower() in SLIDE_SUFFIXES:
        return True
    if isinstance(path, RemotePath):  # no read of its first bytes: a remote read fetches a whole block
        return False
    try:
        with open(path, "rb") as f:
            head = f.read(12)
    except OSError:
        return False
    return head.startswith(_IMAGE_MAGIC)


def _looks_like_spots(path: Location) -> bool:
    name = path.name.lower()
    return path.is_dir() or name.endswith(TABLE_SUFFIXES)


def swapped_arguments_problem(slide: str | Path | RemotePath, coords: str | Path | RemotePath) -> str | None:
    """The line to say when SLIDE names a spot table (or folder) and COORDS an image: the wrong way round."""
    slide, coords = as_location(slide), as_location(coords)
    if not (_looks_like_slide(coords) and _looks_like_spots(slide)):
        return None
    return (f"SLIDE and COORDS are the wrong way round: {slide} is a spot table and {coords} a slide image; "
            f"the order is mmap-predict SLIDE COORDS -o OUT, here: mmap-predict {coords} {slide} -o OUT")


def read_spot_input(path: str | Path | RemotePath, all_spots: bool = False) -> SpotInput:
    """Read COORDS, a table or a Space Ranger / Visium HD folder, local or remote (see the module docstring)."""
    path = as_location(path)
    if not path.exists():
        raise UserError(f"{path}: coordinates file or folder not found; check the path")
    if path.is_dir():
        folder = _spatial_folder(path)
        table = next(folder / f for f in POSITION_FILES if (folder / f).is_file())
    else:
        folder, table = path.parent, path
    spots = read_coords(table, all_spots=all_spots)
    in_folder = table.name in POSITION_FILES and (folder / SCALEFACTORS_FILE).is_file()
    if path.is_dir() and not in_folder:
        raise UserError(f"{folder}: has {table.name} but no {SCALEFACTORS_FILE}; copy the whole spatial/ folder")
    scalefactors = _read_scalefactors(folder / SCALEFACTORS_FILE) if in_folder else {}
    lattice = LATTICES.get(spots.source_format)
    layout = "table"
    if spots.source_format == "visium-hd":
        lattice = visium_hd_lattice(_bin_size(table, scalefactors, spots))
        layout = "visium-hd-bins" if in_folder else "table"
    elif in_folder:
        layout = "spaceranger-spatial"
    images = {}
    if in_folder:
        for name, file in IMAGE_FILES.items():
            if (folder / file).is_file() and SCALEF_KEYS[name] in scalefactors:
                images[name] = folder / file
    return SpotInput(spots, layout, table, lattice, scalefactors, images)


def _bin_size(table: Location, scalefactors: dict[str, float], spots: Spots) -> float:
    """Visium HD's bin size in µm: scalefactors' bin_size_um, else the folder or barcode name."""
    if "bin_size_um" in scalefactors:
        return scalefactors["bin_size_um"]
    for part in reversed(table.parts):
        m = _BIN_FOLDER.fullmatch(part)
        if m:
            return float(m.group(1))
    m = re.match(r"s_(\d+)um_", str(spots.ids[0])) if len(spots) else None
    if m:
        return float(m.group(1))
    raise UserError(
        f"{table}: cannot tell the Visium HD bin size; keep the table in its binned_outputs/square_NNNum/spatial/ "
        f"folder next to {SCALEFACTORS_FILE}"
    )


def load_images(spot_input: SpotInput, slide_width: int, slide_height: int) -> tuple[dict[str, np.ndarray], list[str]]:
    """Space Ranger's hires/lowres images that match this slide, and a warning for each that does not.

    An image matches when its size is the slide's times its scale factor (to
    within `IMAGE_SIZE_SLACK` px): otherwise it belongs to another image,
    and neither it nor its scale factor would line up with the spots.
    """
    from PIL import Image

    out, warnings = {}, []
    for name, png in spot_input.images.items():
        scalef = spot_input.scalefactors[SCALEF_KEYS[name]]
        want = (round(slide_width * scalef), round(slide_height * scalef))
        try:
            with open_input(png) as fh, Image.open(fh) as im:
                size = im.size
                if abs(size[0] - want[0]) > IMAGE_SIZE_SLACK or abs(size[1] - want[1]) > IMAGE_SIZE_SLACK:
                    warnings.append(
                        f"{png}: {size[0]}x{size[1]} px, but this slide times {SCALEF_KEYS[name]} = {scalef:g} "
                        f"gives {want[0]}x{want[1]}: Space Ranger made it from another image; not used"
                    )
                    continue
                rgb = np.asarray(im.convert("RGB"))
        except (OSError, UserError) as exc:  # UserError: a remote image that could not be fetched
            warnings.append(f"{png}: cannot read it ({exc}); not used")
            continue
        out[name] = np.ascontiguousarray(rgb, dtype=np.uint8)
    return out, warnings


def spatial_scalefactors(spot_input: SpotInput, images: dict[str, np.ndarray]) -> dict[str, float]:
    """Space Ranger's scale factors for uns['spatial']: all of its numbers, less those of images not used."""
    out = dict(spot_input.scalefactors)
    for name, key in SCALEF_KEYS.items():
        if name not in images:
            out.pop(key, None)
    return out


def check_spot_geometry(spot_input: SpotInput, lattice: LatticeFit | None, slide: SlideReader, patch_um: float,
                        coords_path: Location, mpp_source: str, skip: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """Space Ranger's images that fit the slide, and the geometry checks' qc record (see geometry.py).

    Refusals raise UserError; warnings (and, with `skip`, the refusals) are `MMAPWarning`s (`messages.warn`).

    The tissue mask comes from Space Ranger's lowres image when it fits the
    slide, else from a small thumbnail; a slide too damaged for one skips it.
    """
    from .geometry import MASK_MAX_SIDE, check_geometry, tissue_mask
    from .slide import PatchReadError

    images, warnings = load_images(spot_input, slide.width, slide.height)
    for w in warnings:
        warn(w)
    mask = None
    if "lowres" in images:
        mask = tissue_mask(images["lowres"], spot_input.scalefactors["tissue_lowres_scalef"],
                           "Space Ranger's tissue_lowres_image.png")
    else:
        try:
            small, scale = slide.thumbnail(MASK_MAX_SIDE)
            mask = tissue_mask(small, scale, f"slide thumbnail, longest side {max(small.shape[:2])} px")
        except PatchReadError as e:
            warn(f"no tissue check: {first_line(e)}")
    report = check_geometry(spot_input.spots, lattice, slide, mask, patch_um, coords_path, mpp_source, skip)
    for w in report.warnings + (report.problems if skip else []):
        warn(w)
    qc = dict(report.qc)
    if spot_input.hd_mpp:
        qc["scalefactors_microns_per_pixel"] = float(spot_input.hd_mpp)
    return images, qc
