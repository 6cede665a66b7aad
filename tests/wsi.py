"""Whole-slide test images: real tissue laid on glass at scanner resolution, as a JPEG-tiled pyramid.

`whole_slide` writes what a 40x scanner writes (a tiled TIFF with levels at
downsamples 1, 4, 16 and 64, JPEG tiles, the resolution in its tags) without
ever holding a level in memory: every tile is cut and resampled from the
source sections when it is written. Sections are placed in µm, so the same
layout can be written at 0.25 and at 0.7 µm per pixel (the same tissue
scanned at two resolutions).

Used by the grid and tissue tests and by `benchmarks/run.py --suite grid`.
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


def whole_slide(path: Path, sections: list[Section], size_um: tuple[float, float], mpp: float,
                downsamples: tuple[int, ...] = (1, 4, 16, 64), quality: int = 90) -> Path:
    """Write a JPEG-tiled pyramidal TIFF of `size_um` at `mpp` µm per level-0 pixel; returns `path`."""
    import tifffile

    width, height = int(round(size_um[0] / mpp)), int(round(size_um[1] / mpp))
    with tifffile.TiffWriter(path, bigtiff=True) as tw:
        for i, d in enumerate(downsamples):
            w, h = max(1, width // d), max(1, height // d)
            res = 1e4 / (mpp * d)  # pixels per centimetre
            tw.write(_tiles(sections, w, h, mpp * d), shape=(h, w, 3), dtype=np.uint8, tile=(TILE, TILE),
                     compression="jpeg", compressionargs={"level": quality}, photometric="rgb",
                     resolution=(res, res), resolutionunit="CENTIMETER", subfiletype=1 if i else 0)
    return path
