"""The `Tissue` type (its repr, an empty one, the run's tissue) and the user's own masks (PNG/TIFF, GeoJSON).

Slides and masks are written by the tests: a plain glass image, a textured blob
of tissue on it, masks drawn with Pillow, GeoJSON as QuPath writes it.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from conftest import write_pyramid
from PIL import Image, ImageDraw

from mmap_deploy.errors import MMAPWarning, UserError
from mmap_deploy.inputs.slide import open_slide
from mmap_deploy.inputs.tissue import NoTissueError, Tissue, detect_tissue, read_tissue_mask, tissue_for


def _inside(tissue: Tissue, x: float, y: float) -> bool:
    """Whether the level-0 point (x, y) is on the tissue's mask."""
    return bool(tissue.mask[int(y * tissue.scale_y), int(x * tissue.scale_x)])


@pytest.fixture()
def plain_slide(tmp_path):
    """A 3 x 2 mm slide of bare glass (2 µm/px)."""
    Image.fromarray(np.full((1000, 1500, 3), 235, np.uint8)).save(tmp_path / "slide.png")
    with open_slide(tmp_path / "slide.png", mpp=2.0) as slide:
        yield slide


# -- the type ------------------------------------------------------------------------------------------
def test_repr_is_short(plain_slide, tmp_path):
    m = Image.new("L", (600, 400), 0)
    ImageDraw.Draw(m).rectangle([60, 60, 200, 160], fill=255)
    ImageDraw.Draw(m).ellipse([300, 200, 500, 350], fill=255)
    m.save(tmp_path / "two.png")
    tissue = read_tissue_mask(tmp_path / "two.png", plain_slide)
    text = repr(tissue)
    lines = text.split("\n")
    assert len(lines) == 3 and len(text) < 300, text  # a dataclass repr printed both arrays whole
    assert "[" not in text and "array" not in text
    assert lines[0] == (f"Tissue (mask:image) with 2 pieces, {tissue.area_mm2:.2f} mm² "
                        f"({tissue.tissue_share:.1%} of the slide)")
    assert lines[1] == "    mask: 400 x 600 px at 5 µm/px, scale 0.4 x 0.4 mask px per level-0 px"
    assert lines[2] == "    source: two.png"
    assert str(tissue) == text


def test_empty_tissue(plain_slide):
    tissue = Tissue.empty(plain_slide)
    assert isinstance(tissue, Tissue) and tissue.pieces == 0 and tissue.area_mm2 == 0.0
    assert not tissue.mask.any() and tissue.mask.shape == tissue.labels.shape == (1, 1)
    assert tissue.scale_x * plain_slide.width == 1.0 and tissue.scale_y * plain_slide.height == 1.0  # the whole slide
    assert tissue.record() == {"method": "detected", "pieces": 0}
    assert tissue.polygons() == [] and tissue.to_geojson() == {"type": "FeatureCollection", "features": []}
    assert tissue.piece_areas_mm2() == []
    assert repr(tissue).startswith("Tissue (detected) with 0 pieces, 0.00 mm²")


def test_a_run_without_tissue_goes_on_with_an_empty_tissue(plain_slide):
    """A COORDS run on a slide without tissue: a real, empty `Tissue`, found by the error's type."""
    from mmap_deploy.inputs.grid import spot_tissue_fraction
    from mmap_deploy.run.predict import _spot_tissue

    with pytest.raises(NoTissueError):
        detect_tissue(plain_slide)
    timings: dict[str, float] = {}
    tissue, note = _spot_tissue(plain_slide, timings)
    assert type(tissue) is Tissue and tissue.pieces == 0 and tissue.record() == {"method": "detected", "pieces": 0}
    assert note.startswith("no tissue found: ") and "slide.png" in note and timings["tissue"] >= 0
    xy = np.array([[100.0, 100.0], [750.0, 500.0], [1400.0, 900.0]])
    fraction = spot_tissue_fraction(tissue.mask, tissue.scale_x, tissue.scale_y, xy, 50.0)
    assert fraction.dtype == np.float32 and (fraction == 0).all()


def test_a_slide_that_cannot_be_read_gives_no_tissue(tmp_path):
    """Tile data damaged after the slide was opened: detection fails, the run gets None (NaN) and a warning."""
    import tifffile

    from mmap_deploy.run.predict import _spot_tissue

    pixels = np.random.default_rng(0).integers(200, 240, (600, 800, 3), dtype=np.uint8)
    path = write_pyramid(tmp_path / "damaged.tif", pixels, levels=(1, 4), resolution=1e4 / 2.0)
    with tifffile.TiffFile(path) as tif:
        tiles = [(o, n) for page in tif.pages for o, n in zip(page.dataoffsets, page.databytecounts)]
    with open_slide(path) as slide:
        with open(path, "r+b") as fh:
            for offset, size in tiles:
                fh.seek(offset)
                fh.write(b"\xff" * size)
        with pytest.warns(MMAPWarning, match=r"no tissue_fraction \(tissue detection failed: .*NaN"):
            tissue, note = _spot_tissue(slide, {})
    assert tissue is None and note.startswith("tissue detection failed: ") and "damaged.tif" in note


def test_tissue_for_reads_the_mask_or_detects(plain_slide, tmp_path):
    """The user's mask when given (as `read_tissue_mask` reads it), else detection (glass: none)."""
    m = Image.new("L", (600, 400), 0)
    ImageDraw.Draw(m).rectangle([120, 80, 240, 160], fill=255)
    m.save(tmp_path / "mask.png")
    given, read = tissue_for(plain_slide, tmp_path / "mask.png"), read_tissue_mask(tmp_path / "mask.png", plain_slide)
    assert given.method == "mask:image" and given.source == str(tmp_path / "mask.png")
    assert np.array_equal(given.labels, read.labels) and given.area_mm2 == read.area_mm2
    assert _inside(given, 450.0, 300.0) and not _inside(given, 1000.0, 300.0)
    with pytest.raises(NoTissueError):  # no mask: detected, and bare glass has no tissue
        tissue_for(plain_slide)
    with pytest.raises(UserError, match="nowhere.png"):
        tissue_for(plain_slide, tmp_path / "nowhere.png")


# -- the user's masks --------------------------------------------------------------------------------
def test_png_mask_other_size_same_aspect(plain_slide, tmp_path):
    for size, expect_shape in (((600, 400), (400, 600)), ((1500, 1000), (250, 375)), ((3000, 2000), (250, 375))):
        m = Image.new("L", size, 0)
        w, h = size
        ImageDraw.Draw(m).rectangle([w * 0.2, h * 0.3, w * 0.6, h * 0.7], fill=255)
        path = tmp_path / f"mask_{w}.png"
        m.save(path)
        tissue = read_tissue_mask(path, plain_slide)
        assert tissue.method == "mask:image" and tissue.level == -1 and tissue.threshold == -1.0
        assert tissue.mask.shape == expect_shape
        assert tissue.pieces == 1 and tissue.source == str(path)
        assert _inside(tissue, 600.0, 500.0)  # inside (0.4, 0.5) of the slide
        assert not _inside(tissue, 1200.0, 500.0)
        expected = 0.4 * 0.4 * 3.0 * 2.0
        assert abs(tissue.area_mm2 - expected) < 0.03 * expected
        assert abs(tissue.tissue_share - 0.16) < 0.01
        json.dumps(tissue.record())


def test_mask_within_one_percent_aspect_accepted(plain_slide, tmp_path):
    m = np.zeros((400, 603), np.uint8)  # aspect 0.5% off
    m[100:200, 100:300] = 1
    Image.fromarray(m).save(tmp_path / "m.tif")
    tissue = read_tissue_mask(tmp_path / "m.tif", plain_slide)
    assert tissue.pieces == 1 and abs(tissue.scale_x - 603 / 1500) < 1e-12


def test_mask_aspect_mismatch_is_a_user_error(plain_slide, tmp_path):
    Image.new("L", (640, 400), 255).save(tmp_path / "wide.png")  # 6.7% wider
    with pytest.raises(UserError) as exc:
        read_tissue_mask(tmp_path / "wide.png", plain_slide)
    msg = str(exc.value)
    assert "wide.png" in msg and "aspect" in msg and "\n" not in msg


def test_empty_mask_is_a_user_error(plain_slide, tmp_path):
    Image.new("L", (600, 400), 0).save(tmp_path / "empty.png")
    with pytest.raises(UserError, match=r"empty\.png.*empty"):
        read_tissue_mask(tmp_path / "empty.png", plain_slide)


def test_geojson_polygons_holes_multipolygons(plain_slide, tmp_path):
    def sq(x0, y0, x1, y1):
        return [[x0, y0], [x1, y0], [x1, y1], [x0, y1], [x0, y0]]

    fc = {"type": "FeatureCollection", "features": [
        {"type": "Feature", "properties": {"classification": {"name": "Tissue"}},
         "geometry": {"type": "Polygon", "coordinates": [sq(100, 100, 700, 700), sq(300, 300, 500, 500)]}},
        {"type": "Feature", "properties": {},
         "geometry": {"type": "MultiPolygon", "coordinates": [[sq(900, 100, 1400, 400)],
                                                              [sq(900, 600, 1400, 900), sq(1000, 700, 1100, 800)]]}},
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [50, 50]}},
        {"type": "Feature", "geometry": {"type": "LineString", "coordinates": [[0, 0], [1500, 1000]]}},
    ]}
    path = tmp_path / "tissue.geojson"
    path.write_text(json.dumps(fc))
    tissue = read_tissue_mask(path, plain_slide)
    assert tissue.method == "mask:geojson" and tissue.pieces == 3
    inside = {(200, 200): True, (400, 400): False, (1100, 250): True, (1200, 650): True, (1050, 750): False,
              (800, 500): False, (50, 50): False, (1450, 950): False}
    for (x, y), want in inside.items():
        assert _inside(tissue, x, y) == want, (x, y)
    expected = (600**2 - 200**2 + 500 * 300 + 500 * 300 - 100**2) * 4.0 / 1e6  # mm² at 2 µm/px
    assert abs(tissue.area_mm2 - expected) < 0.03 * expected
    assert sum(r.hole for r in tissue.polygons()) == 2
    # Bare geometry, a single Feature and a list of features (QuPath without a collection) work too.
    for variant in (fc["features"][0]["geometry"], fc["features"][0], fc["features"][:2]):
        p = tmp_path / "v.json"
        p.write_text(json.dumps(variant))
        assert read_tissue_mask(p, plain_slide).mask[int(200 * 0.25), int(200 * 0.25)]


def test_geojson_without_polygons_is_a_user_error(plain_slide, tmp_path):
    path = tmp_path / "points.geojson"
    path.write_text(json.dumps({"type": "FeatureCollection", "features": [
        {"type": "Feature", "geometry": {"type": "Point", "coordinates": [5, 5]}}]}))
    with pytest.raises(UserError) as exc:
        read_tissue_mask(path, plain_slide)
    msg = str(exc.value)
    assert "points.geojson" in msg and "Polygon" in msg and "\n" not in msg
    (tmp_path / "bad.geojson").write_text("{not json")
    with pytest.raises(UserError, match="bad.geojson"):
        read_tissue_mask(tmp_path / "bad.geojson", plain_slide)
    # Polygons that miss the slide (e.g. in µm or normalised): said so.
    (tmp_path / "off.geojson").write_text(json.dumps(
        {"type": "Polygon", "coordinates": [[[-900, -900], [-500, -900], [-500, -500], [-900, -900]]]}))
    with pytest.raises(UserError, match="level-0 pixels"):
        read_tissue_mask(tmp_path / "off.geojson", plain_slide)
