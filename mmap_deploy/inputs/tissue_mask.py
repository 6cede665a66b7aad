"""A tissue mask: the `Tissue` type, its pieces, outlines and GeoJSON, and the user's own masks.

`Tissue` is what detection (`mmap_deploy.inputs.tissue.detect_tissue`) and the
user's mask (`read_tissue_mask`, ``--tissue-mask FILE``: a binary PNG/TIFF, or
GeoJSON as QuPath and TRIDENT export it) both give: a boolean mask at about
`UM_PER_PX` µm per pixel, its pieces labelled 1..n, the scale to level-0
pixels, outlines in level-0 pixels (`Tissue.polygons`, `Tissue.to_geojson`)
and a record for the output (`Tissue.record`, for ``uns['mmap']['tissue']``).
Outlines and the filling of GeoJSON polygons are `mmap_deploy.inputs.outline`'s.

Pieces
------
Pieces are the 8-connected components of the mask, numbered 1..n by descending
area, ties by the top row and then the left column of their bounding box.
User masks are used as given (no area filter, no hole filling): they are the
user's decision; only empty masks are refused.

GeoJSON is read with `json` and a walk over its objects, not shapely (not in
the runtime; 9.4 MB installed). Checked with shapely 2.2: ``from_geojson``
refuses a bare list of features (QuPath's export without a collection), a
collection with a null geometry, and a ring whose last vertex is not its
first; ``geometry.shape`` reads no FeatureCollection. The walk below would
remain either way, and its rings are numpy arrays at once. Polygons are filled
with `outline.fill_rings` (see there why not a library).
"""

from __future__ import annotations

import io
import json
import math
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from ..errors import UserError
from ..location import as_location, read_input
from ..options import spell
from .outline import Ring, fill_rings
from .outline import outline as _outline

if TYPE_CHECKING:  # pragma: no cover
    from ..location import Location
    from .slide import SlideReader

UM_PER_PX = 8.0  # mask resolution (µm per pixel)
MASK_ASPECT_TOLERANCE = 0.01  # a user mask's aspect ratio may differ this much from the slide's
MAX_MASK_PIXELS = 40_000 * 40_000  # a user mask image larger than this is refused

METHOD_DETECTED = "detected"
METHOD_IMAGE = "mask:image"
METHOD_GEOJSON = "mask:geojson"
GEOJSON_SUFFIXES = (".geojson", ".json")

_PIL_LOCK = threading.Lock()


@dataclass(repr=False)
class Tissue:
    """Tissue of a slide: a boolean mask, its labelled pieces, and how it was made.

    Mask pixel (i, j) covers level-0 x in [j / scale_x, (j + 1) / scale_x) and y in
    [i / scale_y, (i + 1) / scale_y).

    Attributes
    ----------
    mask : numpy.ndarray
        (h, w) bool: True where there is tissue.
    labels : numpy.ndarray
        (h, w) int32: 0 background, 1..`pieces` the pieces, by descending area.
    scale_x, scale_y : float
        Mask pixels per level-0 pixel along x and y.
    method : str
        ``"detected"``, ``"mask:image"`` or ``"mask:geojson"``.
    params : dict
        The parameters it was made with (the detection's, or how a user's mask was read).
    threshold : float
        The texture threshold in grey levels; -1.0 for a user's mask.
    area_mm2 : float
        Tissue area in mm².
    pieces : int
        Number of pieces.
    seconds : float
        Seconds the detection (or reading the mask) took.
    level : int
        The pyramid level read; -1 for a user's mask.
    source : str
        The mask file, or the slide for detection.
    tissue_share : float
        Share of the slide's area that is tissue.
    mpp : float
        The slide's level-0 µm per pixel.
    share_before_filters : float
        Detection: the share that looked like tissue before the filters (-1.0 otherwise).

    Examples
    --------
    >>> tissue = mm.detect_tissue("B4.jpg", mpp=0.69)                  # doctest: +SKIP
    >>> tissue                                                          # doctest: +SKIP
    Tissue (detected) with 1 piece, 11.91 mm² (27.2% of the slide)
        mask: 827 x 773 px at 8.28 µm/px, scale 0.08333 x 0.08333 mask px per level-0 px
        source: B4.jpg
    """

    mask: np.ndarray
    labels: np.ndarray
    scale_x: float
    scale_y: float
    method: str
    params: dict[str, Any]
    threshold: float
    area_mm2: float
    pieces: int
    seconds: float
    level: int
    source: str
    tissue_share: float
    mpp: float
    share_before_filters: float = -1.0
    _rings: list[Ring] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def empty(cls, slide: SlideReader, *, method: str = METHOD_DETECTED) -> Tissue:
        """No tissue on `slide`: no pieces, an empty one-pixel mask over the whole slide.

        What a run goes on with where detection found none (`NoTissueError`):
        every spot's tissue fraction is 0.

        Parameters
        ----------
        slide : SlideReader
            The slide (its size, resolution and path).
        method : str
            How it was found to be empty.

        Returns
        -------
        Tissue
            With ``pieces == 0`` and ``area_mm2 == 0.0``.
        """
        return cls(mask=np.zeros((1, 1), bool), labels=np.zeros((1, 1), np.int32),
                   scale_x=1.0 / max(slide.width, 1), scale_y=1.0 / max(slide.height, 1), method=method,
                   params={}, threshold=-1.0, area_mm2=0.0, pieces=0, seconds=0.0, level=-1,
                   source=str(slide.path), tissue_share=0.0, mpp=float(slide.mpp))

    def __repr__(self) -> str:
        # Short, as AnnData's: what it is, not its arrays (a dataclass repr prints both masks whole).
        h, w = self.mask.shape
        name = Path(self.source).name or self.source
        return (f"Tissue ({self.method}) with {self.pieces} piece{'' if self.pieces == 1 else 's'}, "
                f"{self.area_mm2:.2f} mm² ({self.tissue_share:.1%} of the slide)\n"
                f"    mask: {h} x {w} px at {self.um_per_px:.3g} µm/px, "
                f"scale {self.scale_x:.4g} x {self.scale_y:.4g} mask px per level-0 px\n"
                f"    source: {name}")

    @property
    def um_per_px(self) -> float:
        """The mask's resolution in µm per pixel (geometric mean of the two axes)."""
        return self.mpp / math.sqrt(self.scale_x * self.scale_y)

    def piece_areas_mm2(self) -> list[float]:
        """Area of each piece 1..n in mm².

        Returns
        -------
        list of float
            The areas, piece 1 first.
        """
        px_mm2 = (self.mpp / self.scale_x) * (self.mpp / self.scale_y) / 1e6
        counts = np.bincount(self.labels.ravel(), minlength=self.pieces + 1)[1:]
        return [float(c) * px_mm2 for c in counts]

    def polygons(self) -> list[Ring]:
        """Outlines of the pieces in level-0 pixels: per piece one outer ring, then its holes.

        Traced along the mask's pixel edges (8-connected pieces: a ring passes
        through a corner that joins two pixels), collinear vertices dropped, then
        simplified (Douglas-Peucker, `outline.OUTLINE_TOLERANCE_PX` mask px, doubled
        until the whole slide has at most `outline.MAX_OUTLINE_VERTICES` vertices).
        Ordered by piece, the outer ring first.

        Returns
        -------
        list of Ring
            Each with ``xy`` ((n, 2) float64 x, y in level-0 pixels, the first
            vertex not repeated), ``piece`` (its label) and ``hole``.
        """
        if self._rings is None:
            self._rings = _outline(self.labels, self.scale_x, self.scale_y)
        return [Ring(r.xy.copy(), r.piece, r.hole) for r in self._rings]

    def to_geojson(self) -> dict[str, Any]:
        """A GeoJSON FeatureCollection, one Polygon per piece, in level-0 pixels (what `read_tissue_mask` reads).

        Returns
        -------
        dict
            The FeatureCollection; each Feature's ``properties`` hold its
            ``piece``; coordinates rounded to 0.01 px. ``json.dump`` it to a
            ``.geojson`` file for QuPath or for ``tissue_mask``.
        """
        features = []
        by_piece: dict[int, list[Ring]] = {}
        for ring in self.polygons():
            by_piece.setdefault(ring.piece, []).append(ring)
        for piece, rings in sorted(by_piece.items()):
            coords = []
            for ring in sorted(rings, key=lambda r: r.hole):
                pts = [[round(float(x), 2), round(float(y), 2)] for x, y in ring.xy]
                coords.append(pts + pts[:1])
            features.append({"type": "Feature", "properties": {"piece": piece, "objectType": "annotation"},
                             "geometry": {"type": "Polygon", "coordinates": coords}})
        return {"type": "FeatureCollection", "features": features}

    def record(self) -> dict[str, Any]:
        """What goes into ``uns['mmap']['tissue']``: str/int/float/bool and lists only, never None.

        Returns
        -------
        dict
            The attributes but the arrays (rounded), with ``piece_areas_mm2``,
            ``mask_um_per_px`` and ``mask_shape``; for no tissue (`empty`) only
            ``method`` and ``pieces``.
        """
        if self.pieces == 0:  # no mask, parameters or area worth keeping
            return {"method": self.method, "pieces": 0}
        return {
            "method": self.method,
            "params": _plain(self.params),
            "threshold": float(round(self.threshold, 4)),
            "area_mm2": float(round(self.area_mm2, 4)),
            "piece_areas_mm2": [float(round(a, 4)) for a in self.piece_areas_mm2()],
            "pieces": int(self.pieces),
            "tissue_share": float(round(self.tissue_share, 5)),
            "share_before_filters": float(round(self.share_before_filters, 5)),
            "seconds": float(round(self.seconds, 3)),
            "level": int(self.level),
            "mask_um_per_px": float(round(self.um_per_px, 4)),
            "mask_shape": [int(self.mask.shape[0]), int(self.mask.shape[1])],
            "scale_x": float(self.scale_x),
            "scale_y": float(self.scale_y),
            "source": str(self.source),
        }


def _plain(value: Any) -> Any:
    """Parameters as h5ad stores them: no None, numpy scalars as Python ones."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value if v is not None]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    return str(value)


# -- pieces ---------------------------------------------------------------------------------------
def label_pieces(mask: np.ndarray, min_px: float = 0) -> tuple[np.ndarray, int]:
    """8-connected pieces of at least `min_px` pixels, numbered 1..n by descending area, ties by
    bounding-box top, then left; smaller ones become background."""
    from scipy import ndimage as ndi

    lab, n = ndi.label(mask, structure=np.ones((3, 3), bool))
    if n == 0:
        return lab.astype(np.int32), 0
    areas = np.bincount(lab.ravel(), minlength=n + 1)
    boxes = ndi.find_objects(lab)
    keep = [i for i in range(1, n + 1) if areas[i] >= min_px]
    order = sorted(keep, key=lambda i: (-int(areas[i]), boxes[i - 1][0].start, boxes[i - 1][1].start))
    lut = np.zeros(n + 1, np.int32)
    if order:
        lut[np.array(order)] = np.arange(1, len(order) + 1, dtype=np.int32)
    return lut[lab], len(order)


def area_share(area_mm2: float, slide: SlideReader) -> float:
    """The share of the slide's area that `area_mm2` covers."""
    slide_mm2 = slide.width * slide.height * slide.mpp * slide.mpp / 1e6
    return float(min(1.0, area_mm2 / slide_mm2)) if slide_mm2 > 0 else 0.0


# -- the user's mask ---------------------------------------------------------------------------
def _is_geojson(path: Location, data: bytes) -> bool:
    return path.suffix.lower() in GEOJSON_SUFFIXES or data[:64].lstrip()[:1] in (b"{", b"[")


def read_tissue_mask(path: str | Location, slide: SlideReader, *, um_per_px: float = UM_PER_PX) -> Tissue:
    """The user's tissue mask for `slide` (replaces detection); `UserError` if unusable.

    A binary image (PNG, TIFF, ...; nonzero = tissue, alpha 0 = background) of
    the slide's aspect ratio (within `MASK_ASPECT_TOLERANCE`), any size: it is
    scaled to the slide (images finer than `um_per_px` are reduced to it, by
    majority). Or GeoJSON in level-0 pixels as QuPath and TRIDENT export it: a
    FeatureCollection, Feature, list of features, or bare geometry; Polygon and
    MultiPolygon (holes are not tissue), other geometries ignored; rasterised at
    about `um_per_px`. Pieces are labelled as in detection; no area filter.

    Parameters
    ----------
    path : str, Path or RemotePath
        The mask: an image, or GeoJSON (by its suffix ``.geojson``/``.json``,
        or a file that starts with ``{`` or ``[``); local, or a URL (read whole).
    slide : SlideReader
        The slide the mask is of (its size and resolution).
    um_per_px : float
        The resolution GeoJSON is rasterised at, and finer images reduced to.

    Returns
    -------
    Tissue
        Method ``"mask:image"`` or ``"mask:geojson"``; ``threshold`` and ``level`` -1.

    Raises
    ------
    UserError
        A missing, unreadable, empty or too large mask, an image of another
        aspect ratio, GeoJSON without polygons or with none on the slide.
    """
    t0 = time.perf_counter()
    path = as_location(path)
    if not path.is_file():
        raise UserError(f"{path}: tissue mask not found; check the path given to {spell('tissue_mask')}")
    try:
        data = read_input(path)
    except OSError as exc:
        raise UserError(f"{path}: the tissue mask cannot be read ({exc}); check its permissions") from None
    if _is_geojson(path, data):
        mask, sx, sy, params = _geojson_mask(path, data, slide, um_per_px)
        method = METHOD_GEOJSON
    else:
        mask, sx, sy, params = _image_mask(path, data, slide, um_per_px)
        method = METHOD_IMAGE
    labels, n = label_pieces(mask)
    px_mm2 = (slide.mpp / sx) * (slide.mpp / sy) / 1e6
    area = float(mask.sum()) * px_mm2
    params["um_per_px"] = float(um_per_px)
    return Tissue(
        mask=mask, labels=labels, scale_x=sx, scale_y=sy, method=method, params=params, threshold=-1.0,
        area_mm2=area, pieces=n, seconds=time.perf_counter() - t0, level=-1, source=str(path),
        tissue_share=area_share(area, slide), mpp=float(slide.mpp),
    )


def _mask_from_pixels(image) -> np.ndarray:
    """Nonzero pixels of a PIL image (any channel but alpha); alpha 0 is background."""
    mode = image.mode
    if mode == "P":
        image = image.convert("RGBA")
        mode = "RGBA"
    if mode == "1":
        return np.asarray(image.convert("L")) > 0
    a = np.asarray(image)
    if a.ndim == 2:
        return a != 0
    if mode in ("RGBA", "LA", "PA"):
        return (a[..., :-1] != 0).any(axis=2) & (a[..., -1] != 0)
    return (a != 0).any(axis=2)


def _image_mask(path: Location, data: bytes, slide, um_per_px: float) -> tuple[np.ndarray, float, float, dict]:
    from PIL import Image, UnidentifiedImageError

    with _PIL_LOCK:
        old = Image.MAX_IMAGE_PIXELS
        Image.MAX_IMAGE_PIXELS = None
        try:
            image = Image.open(io.BytesIO(data))
        except UnidentifiedImageError:
            raise UserError(
                f"{path}: not an image or GeoJSON; the tissue mask must be a binary PNG/TIFF "
                "(nonzero = tissue) or GeoJSON polygons in level-0 pixels (QuPath, TRIDENT)"
            ) from None
        except Exception as exc:  # noqa: BLE001 (PIL raises assorted errors on damaged headers)
            raise UserError(f"{path}: cannot read the tissue mask ({exc}); check that the file is complete") from None
        finally:
            Image.MAX_IMAGE_PIXELS = old
    with image:
        mw, mh = image.size
        if mw * mh > MAX_MASK_PIXELS:
            raise UserError(f"{path}: a {mw}x{mh} px tissue mask is too large; save it smaller (e.g. at 8 µm per pixel)")
        ratio = (mw / mh) / (slide.width / slide.height)
        if abs(ratio - 1.0) > MASK_ASPECT_TOLERANCE:
            raise UserError(
                f"{path}: tissue mask is {mw}x{mh} px (aspect {mw / mh:.4f}) but the slide is "
                f"{slide.width}x{slide.height} px (aspect {slide.width / slide.height:.4f}); the mask must cover "
                "the whole slide: export it from the same slide, at any size with the same aspect ratio"
            )
        try:
            mask = _mask_from_pixels(image)
        except Exception as exc:  # noqa: BLE001 (PIL reports corrupt data only when decoding)
            raise UserError(f"{path}: cannot decode the tissue mask ({exc}); re-export it as a binary PNG") from None
    if not mask.any():
        raise UserError(
            f"{path}: the tissue mask is empty (no nonzero pixel); tissue must be nonzero (e.g. 255) "
            "on a zero background"
        )
    # Finer than um_per_px: reduce by majority, so downstream work stays small.
    f = math.floor((um_per_px / slide.mpp) / (slide.width / mw))  # mask px per wanted mask px
    native = (mw, mh)
    if f >= 2:
        from PIL import Image

        w, h = max(1, round(mw / f)), max(1, round(mh / f))
        small = Image.fromarray(mask.astype(np.uint8) * 255).resize((w, h), Image.Resampling.BOX)
        reduced = np.asarray(small) >= 128
        if reduced.any():  # a mask of only thin lines keeps its native resolution
            mask = reduced
    h, w = mask.shape
    return mask, w / slide.width, h / slide.height, {"mask_size": [int(native[0]), int(native[1])]}


def _polygons(obj: Any) -> list[list]:
    """Every polygon (a list of rings) in a GeoJSON object, in file order."""
    out: list[list] = []
    if isinstance(obj, list):
        for item in obj:
            out += _polygons(item)
        return out
    if not isinstance(obj, dict):
        return out
    kind = obj.get("type")
    if kind == "FeatureCollection":
        out += _polygons(obj.get("features") or [])
    elif kind == "Feature":
        out += _polygons(obj.get("geometry"))
    elif kind == "GeometryCollection":
        out += _polygons(obj.get("geometries") or [])
    elif kind == "Polygon":
        out.append(obj.get("coordinates") or [])
    elif kind == "MultiPolygon":
        out += list(obj.get("coordinates") or [])
    return out


def _ring_array(ring: Any) -> np.ndarray | None:
    try:
        a = np.asarray(ring, dtype=np.float64)
    except (TypeError, ValueError):
        return None
    if a.ndim != 2 or a.shape[0] < 3 or a.shape[1] < 2 or not np.isfinite(a[:, :2]).all():
        return None
    return a[:, :2]


def _geojson_mask(path: Location, raw: bytes, slide, um_per_px: float) -> tuple[np.ndarray, float, float, dict]:
    try:
        data = json.loads(raw.decode("utf-8-sig"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UserError(f"{path}: not valid GeoJSON ({exc}); export the tissue from QuPath or TRIDENT as GeoJSON") from None
    polygons = []
    for poly in _polygons(data):
        rings = [_ring_array(r) for r in poly] if isinstance(poly, list) else []
        if rings and rings[0] is not None:
            polygons.append([r for r in rings if r is not None])
    if not polygons:
        raise UserError(
            f"{path}: no Polygon or MultiPolygon in this GeoJSON; the tissue mask needs tissue outlines "
            "(QuPath: export the tissue annotations as GeoJSON; TRIDENT: the contours .geojson)"
        )
    d = um_per_px / slide.mpp
    w, h = max(1, math.ceil(slide.width / d)), max(1, math.ceil(slide.height / d))
    sx, sy = w / slide.width, h / slide.height
    mask = np.zeros((h, w), bool)
    for rings in polygons:
        # Each polygon in its own bounding box: its holes cut only itself, never another polygon.
        pts = [np.column_stack([r[:, 0] * sx, r[:, 1] * sy]) for r in rings]  # mask pixel units
        x0, y0 = np.floor(pts[0].min(axis=0)).astype(int) - 1
        x1, y1 = np.ceil(pts[0].max(axis=0)).astype(int) + 2
        cx0, cy0, cx1, cy1 = max(x0, 0), max(y0, 0), min(x1, w), min(y1, h)
        if cx1 <= cx0 or cy1 <= cy0:
            continue  # outside the slide
        local = [p - np.array([cx0, cy0], dtype=np.float64) for p in pts]
        fill = fill_rings(local, int(cy1 - cy0), int(cx1 - cx0))
        if not fill.any():  # narrower than a mask pixel: the pixel under its middle, if on the slide
            mx, my = (pts[0].min(axis=0) + pts[0].max(axis=0)) / 2.0
            if 0 <= mx < w and 0 <= my < h:
                mask[int(my), int(mx)] = True
            continue
        mask[cy0:cy1, cx0:cx1] |= fill
    if not mask.any():
        raise UserError(
            f"{path}: the GeoJSON polygons cover no part of the {slide.width}x{slide.height} px slide; "
            "coordinates must be level-0 pixels of this slide (QuPath and TRIDENT export them so)"
        )
    return mask, sx, sy, {"polygons": len(polygons)}

