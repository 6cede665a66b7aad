"""Whole-slide test images: real tissue laid on glass at scanner resolution, as a JPEG-tiled pyramid.

`whole_slide` writes what a 40x scanner writes (a tiled TIFF with levels at
downsamples 1, 4, 16 and 64, JPEG tiles, the resolution in its tags) without
ever holding a level in memory: every tile is cut and resampled from the
source sections when it is written. Sections are placed in µm, so the same
layout can be written at 0.25 and at 0.7 µm per pixel (the same tissue
scanned at two resolutions).

The same pixels can be written as the other TIFF pyramids slides come in:
levels as SubIFDs of level 0 or as separate OME images (`layout`), OME-XML
with the pixel size in any unit (`ome`, `unit`), big-endian (`byteorder`),
BigTIFF or not, any tile compression tifffile writes, resolution tags or none
(`tags`). `qupath_export` is what QuPath and Bio-Formats write.

Used by the grid, tissue and reader tests and by `benchmarks/run.py --suite grid` and `--suite read`.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

GLASS = (236, 234, 238)  # the light grey of empty glass in a brightfield scan
TILE = 256


@dataclass
class Section:
    """A tissue image of `mpp` µm per pixel, its top-left corner at `at_um` (x, y) on the slide."""

    rgb: np.ndarray
    mpp: float
    at_um: tuple[float, float]

    @property
    def size_um(self) -> tuple[float, float]:
        return self.rgb.shape[1] * self.mpp, self.rgb.shape[0] * self.mpp


def load_section(path: Path, mpp: float, at_um: tuple[float, float], crop: tuple[int, int, int, int] | None = None
                 ) -> Section:
    """A section from an image file (optionally its `crop` box in its own pixels)."""
    Image.MAX_IMAGE_PIXELS = None  # her2st images are 92 MP: trusted test input
    with Image.open(path) as im:
        if crop is not None:
            im = im.crop(crop)
        return Section(np.asarray(im.convert("RGB")), mpp, at_um)


def _tile(sections: list[Section], x0: float, y0: float, px_um: float, w: int, h: int) -> np.ndarray:
    """The (h, w) RGB tile whose top-left pixel starts at (x0, y0) µm, pixels of px_um µm."""
    out = np.empty((h, w, 3), np.uint8)
    out[:] = GLASS
    for s in sections:
        sx0, sy0 = (x0 - s.at_um[0]) / s.mpp, (y0 - s.at_um[1]) / s.mpp  # tile corner in section px
        step = px_um / s.mpp
        sw, sh = s.rgb.shape[1], s.rgb.shape[0]
        if sx0 >= sw or sy0 >= sh or sx0 + w * step <= 0 or sy0 + h * step <= 0:
            continue
        # output pixels whose centres fall inside the section
        cx = sx0 + (np.arange(w) + 0.5) * step
        cy = sy0 + (np.arange(h) + 0.5) * step
        cols = np.flatnonzero((cx >= 0) & (cx < sw))
        rows = np.flatnonzero((cy >= 0) & (cy < sh))
        if not len(cols) or not len(rows):
            continue
        c0, c1, r0, r1 = cols[0], cols[-1] + 1, rows[0], rows[-1] + 1
        bx0, by0 = max(0.0, sx0 + c0 * step), max(0.0, sy0 + r0 * step)
        bx1, by1 = min(float(sw), sx0 + c1 * step), min(float(sh), sy0 + r1 * step)
        left, top = int(np.floor(bx0)), int(np.floor(by0))
        src = Image.fromarray(s.rgb[top:int(np.ceil(by1)), left:int(np.ceil(bx1))])
        box = (bx0 - left, by0 - top, bx1 - left, by1 - top)
        out[r0:r1, c0:c1] = np.asarray(src.resize((c1 - c0, r1 - r0), Image.Resampling.BILINEAR, box=box))
    return out


def _tiles(sections: list[Section], width: int, height: int, px_um: float) -> Iterator[np.ndarray]:
    glass = np.empty((TILE, TILE, 3), np.uint8)
    glass[:] = GLASS
    boxes = [(s.at_um[0], s.at_um[1], s.at_um[0] + s.size_um[0], s.at_um[1] + s.size_um[1]) for s in sections]
    for ty in range(0, height, TILE):
        for tx in range(0, width, TILE):
            x0, y0 = tx * px_um, ty * px_um
            x1, y1 = x0 + TILE * px_um, y0 + TILE * px_um
            if any(x0 < bx1 and x1 > bx0 and y0 < by1 and y1 > by0 for bx0, by0, bx1, by1 in boxes):
                yield _tile(sections, x0, y0, px_um, TILE, TILE)
            else:
                yield glass


# µm per unit of the OME-XML pixel sizes the tests write
UNIT_UM = {"µm": 1.0, "nm": 1e-3, "mm": 1e3, "cm": 1e4}


def whole_slide(path: Path, sections: list[Section], size_um: tuple[float, float], mpp: float,
                downsamples: tuple[int, ...] = (1, 4, 16, 64), quality: int = 90, *, compression: str = "jpeg",
                layout: str = "pages", ome: bool = False, unit: str = "µm", byteorder: str = "<",
                bigtiff: bool = True, tags: bool = True) -> Path:
    """Write a tiled pyramidal TIFF of `size_um` at `mpp` µm per level-0 pixel; returns `path`.

    `layout`: "pages" (one IFD per level, reduced-resolution pages: what
    OpenSlide reads), "subifds" (the levels as SubIFDs of level 0: bfconvert,
    QuPath, tifffile) or "series" (one OME image per level). `ome` writes the
    OME-XML with PhysicalSizeX/Y in `unit`; `tags` the XResolution tags.
    """
    import tifffile

    width, height = int(round(size_um[0] / mpp)), int(round(size_um[1] / mpp))
    args = {"jpeg": {"level": quality}, "jpeg2000": {"level": quality}}.get(compression)
    with tifffile.TiffWriter(path, bigtiff=bigtiff, byteorder=byteorder, ome=ome) as tw:
        for i, d in enumerate(downsamples):
            w, h = max(1, width // d), max(1, height // d)
            kw = {}
            if tags:
                res = 1e4 / (mpp * d)  # pixels per centimetre
                kw.update(resolution=(res, res), resolutionunit="CENTIMETER")
            else:
                kw.update(resolutionunit="NONE")
            if ome and (i == 0 or layout == "series"):
                size = mpp * d / UNIT_UM[unit]
                kw["metadata"] = {"Name": f"level {i}" if layout == "series" else "slide", "PhysicalSizeX": size,
                                  "PhysicalSizeY": size, "PhysicalSizeXUnit": unit, "PhysicalSizeYUnit": unit}
            if layout == "subifds" and i == 0:
                kw["subifds"] = len(downsamples) - 1
            tw.write(_tiles(sections, w, h, mpp * d), shape=(h, w, 3), dtype=np.uint8, tile=(TILE, TILE),
                     compression=compression, compressionargs=args, photometric="rgb",
                     subfiletype=1 if i and layout != "series" else 0, **kw)
    return path


def qupath_export(path: Path, sections: list[Section], size_um: tuple[float, float], mpp: float,
                  downsamples: tuple[int, ...] = (1, 4, 16)) -> Path:
    """An OME-TIFF as QuPath (Bio-Formats) exports a slide: big-endian, JPEG tiles, the levels in
    SubIFDs, the pixel size in the OME-XML only (no resolution tags)."""
    return whole_slide(path, sections, size_um, mpp, downsamples, layout="subifds", ome=True, byteorder=">",
                       bigtiff=False, tags=False)


def dicom_series(folder: Path, tif: Path, *, extra_images: tuple[str, ...] = ()) -> list[Path]:
    """The pyramid `tif` as a DICOM WSI series in `folder` (wsidicomizer: one VOLUME file per level), plus
    one image of each of `extra_images` ("LABEL", "OVERVIEW") in the same series; returns the new files."""
    import pydicom
    from pydicom.uid import generate_uid
    from wsidicomizer import WsiDicomizer

    folder.mkdir(parents=True, exist_ok=True)
    before = set(folder.iterdir())
    WsiDicomizer.convert(tif, folder, tile_size=TILE, include_label=False, include_overview=False,
                         include_thumbnail=False)
    volumes = sorted(set(folder.iterdir()) - before)
    smallest = min(volumes, key=lambda p: pydicom.dcmread(p, stop_before_pixels=True).TotalPixelMatrixColumns)
    for flavor in extra_images:  # the smallest level's pixels, typed as the series' label or overview
        ds = pydicom.dcmread(smallest)
        ds.ImageType = ["ORIGINAL", "PRIMARY", flavor, "NONE"]
        ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = generate_uid()
        ds.save_as(folder / f"{flavor.lower()}.dcm")
    return sorted(set(folder.iterdir()) - before)
