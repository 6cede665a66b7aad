"""The band reader: the views the per-spot path makes, on real H&E through OpenSlide and the
plain-image reader, every spot once in a fixed order, a corrupt tile
dropping only the spots that touch it, each tile decoded once, and memory bounded by a band."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from conftest import write_pyramid
from test_predict_cli import corrupt_tiles, tissue_like_image
from threadpoolctl import threadpool_limits

from mmap_deploy.inputs import bands
from mmap_deploy.inputs.bands import plan_reads, read_spot_views
from mmap_deploy.inputs.slide import open_slide
from mmap_deploy.model.preprocess import ViewSpec, make_views, patch_region

SPEC = ViewSpec(patch_um=154.0, mpp=0.6875)  # the demo bundle's geometry
HER2ST_MPP = 0.69  # about B4's lattice (~290 px per 200 µm step); not the model's 0.6875, so patches are resampled
CROP = (2000, 3300, 3400, 4700)  # left, top, right, bottom in B4.jpg


def per_spot(slide, xy, spec=SPEC, patches=False) -> np.ndarray:
    with threadpool_limits(1, user_api="blas"):
        out = [slide.read_patch(float(x), float(y), spec) for x, y in xy]
        return np.stack(out if patches else [make_views(p, spec) for p in out])


def band_read(slide, xy, spec=SPEC, **kw) -> tuple[np.ndarray, list]:
    """Views in input order, and the reading order of the spots."""
    order, out = [], None
    with threadpool_limits(1, user_api="blas"):
        for chunk in read_spot_views(slide, xy, spec, **kw):
            assert not chunk.failed
            if out is None:
                out = np.zeros((len(xy),) + chunk.views.shape[1:], np.uint8)
            out[chunk.rows] = chunk.views
            order += chunk.rows.tolist()
    return out, order


def mad(a: np.ndarray, b: np.ndarray, axis=None) -> np.ndarray:
    return np.abs(a.astype(np.int16) - b.astype(np.int16)).mean(axis=axis)


def assert_same_views(a: np.ndarray, b: np.ndarray) -> None:
    """The same views, up to a rounding at .5 that a sum in another order flips (BLAS kernels
    differ between CPUs: on some, resampling a band and resampling a patch round a few values apart)."""
    assert a.shape == b.shape
    diff = np.abs(a.astype(np.int16) - b)
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-4, mad(a, b, axis=(0, 2, 3, 4))


@pytest.fixture(scope="module")
def her2st(real_data, tmp_path_factory) -> tuple[Path, Path, np.ndarray]:
    """A crop of the real B4 image as JPEG and as a JPEG-tiled pyramidal TIFF, and a dense spot grid on it."""
    from PIL import Image

    d = tmp_path_factory.mktemp("bands")
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(real_data / "her2st" / "images" / "B4.jpg") as im:
        crop = im.crop(CROP)
        crop.save(d / "crop.jpg", quality=92)
        rgb = np.asarray(crop.convert("RGB"))
    tif = write_pyramid(d / "crop.tif", rgb, levels=(1, 2, 4), resolution=1e4 / HER2ST_MPP, compression="jpeg")
    g = np.arange(130.0, 1270.0, 97.3)  # a Visium-like pitch, off the pixel grid
    xy = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2) + np.random.default_rng(0).uniform(-3, 3, (len(g) ** 2, 2))
    return d / "crop.jpg", tif, xy


@pytest.mark.parametrize("fmt", ["jpeg", "openslide"])
def test_views_match_the_per_spot_reader_on_real_tissue(her2st, fmt):
    jpg, tif, xy = her2st
    with open_slide(jpg if fmt == "jpeg" else tif, mpp=HER2ST_MPP) as slide:
        assert slide.format.startswith("openslide" if fmt == "openslide" else "image")
        ref = per_spot(slide, xy)
        new, _ = band_read(slide, xy, reader="tile_once")
    # the same maps, rounded where read_patch and make_views round: the same views
    assert_same_views(ref, new)


def test_coarse_level_with_sub_pixel_starts_matches(tmp_path):
    """Model mpp ~5x the slide's: both read pyramid level 2, where OpenSlide interpolates regions
    that start between level pixels; the band reader applies the same shift."""
    slide_path = write_pyramid(tmp_path / "s.tif", tissue_like_image(1600, seed=7), levels=(1, 2, 4),
                               resolution=1e4 / 0.25)
    spec = ViewSpec(patch_um=163.52, mpp=1.2)
    rng = np.random.default_rng(1)
    xy = rng.uniform(300, 1300, (40, 2))
    with open_slide(slide_path) as slide:
        plan = plan_reads(slide, xy, spec)
        assert plan.level == 2 and len(set(map(tuple, plan.phase.tolist()))) > 4
        ref = per_spot(slide, xy, spec)
        new, _ = band_read(slide, xy, spec, reader="tile_once")
    assert mad(ref, new) <= 0.5


def test_patches_for_training_equal_read_patch(her2st):
    jpg, _, xy = her2st
    with open_slide(jpg, mpp=HER2ST_MPP) as slide:
        ref = per_spot(slide, xy, patches=True)
        new, _ = band_read(slide, xy, reader="tile_once", patches=True)
    assert new.shape == ref.shape
    # the same resize, summed in another order: at most one grey level on a few pixels
    assert np.abs(ref.astype(int) - new.astype(int)).max() <= 1 and mad(ref, new) < 0.01


def test_every_spot_once_in_an_order_independent_of_threads(her2st):
    _, tif, xy = her2st
    xy = xy[np.random.default_rng(2).permutation(len(xy))]  # input order unrelated to position
    with open_slide(tif, mpp=HER2ST_MPP) as slide:
        one, order1 = band_read(slide, xy, workers=1, chunk=5)
        two, order2 = band_read(slide, xy, workers=2, chunk=5)
        again, order3 = band_read(slide, xy, workers=2, chunk=5)
    assert sorted(order1) == list(range(len(xy)))
    assert order1 == order2 == order3
    # reading order is by band (top to bottom), not by input
    tops = [patch_region(*xy[i], HER2ST_MPP, SPEC)[1] for i in order1]
    assert tops != sorted(tops) or order1 != list(range(len(xy)))
    np.testing.assert_array_equal(one, two)
    np.testing.assert_array_equal(two, again)


def test_corrupt_tile_drops_only_the_spots_that_touch_it(tmp_path):
    clean = write_pyramid(tmp_path / "clean.tif", tissue_like_image(1400, seed=3), levels=(1, 2, 4),
                          resolution=1e4 / 0.5)
    bad = corrupt_tiles(clean, tmp_path / "bad.tif", [7])  # level 0: 6 tiles of 256 px a row; row 1, column 1
    g = np.arange(200.0, 1250.0, 100.0)
    xy = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    with open_slide(clean) as slide:
        ref, _ = band_read(slide, xy, reader="tile_once")
        side = patch_region(0, 0, slide.mpp, SPEC)[2]
    expected = []
    for i, (x, y) in enumerate(xy):
        left, top, _ = patch_region(x, y, 0.5, SPEC)
        if left < 512 and left + side > 256 and top < 512 and top + side > 256:
            expected.append(i)
    assert 0 < len(expected) < len(xy) // 2
    failed, got = [], {}
    with threadpool_limits(1, user_api="blas"), open_slide(bad) as slide:
        plan = plan_reads(slide, xy, SPEC, reader="tile_once")
        assert any(b.whole and set(expected) <= set(b.spots.tolist()) for b in plan.bands)
        for chunk in read_spot_views(slide, xy, SPEC, reader="tile_once", workers=2):
            failed += [i for i, e in chunk.failed if "cannot decode" in str(e)]
            got.update(zip(chunk.rows.tolist(), chunk.views))
    assert sorted(failed) == expected
    assert sorted(got) == [i for i in range(len(xy)) if i not in expected]
    # the rest of the failed band came through the per-spot path: the same views
    assert_same_views(np.stack([got[i] for i in sorted(got)]), ref[sorted(got)])


class Spy:
    """Records every region the band reader asks the real slide reader for."""

    def __init__(self, slide):
        self.slide, self.reads = slide, []
        self._read = slide.read_level_region

    def __enter__(self):
        def read(level, left, top, width, height):
            out = self._read(level, left, top, width, height)
            self.reads.append((level, left, top, width, height, out.nbytes))
            return out

        self.slide.read_level_region = read
        return self

    def __exit__(self, *exc):
        del self.slide.read_level_region


def test_each_tile_decoded_once_and_memory_bounded_by_a_band(her2st, monkeypatch):
    _, tif, _ = her2st
    monkeypatch.setattr(bands, "BAND_PIXELS", 1400 * 400)  # several bands on this small slide
    g = np.arange(60.0, 1340.0, 23.2)  # a 16 µm (Visium HD) bin grid: ~3 000 bins
    xy = np.stack(np.meshgrid(g, g), -1).reshape(-1, 2)
    with open_slide(tif, mpp=HER2ST_MPP) as slide:
        plan = plan_reads(slide, xy, SPEC, band_pixels=bands.BAND_PIXELS)
        tile_w, tile_h = slide.tile_size(plan.level)
        width = plan.cols[1] - plan.cols[0]
        assert len(plan.bands) >= 3 and all(b.whole for b in plan.bands)
        assert plan.coverage > 20  # every pixel lies under dozens of patches
        with Spy(slide) as spy:
            views, _ = band_read(slide, xy, workers=2)
    rows = sorted((top, top + h) for _, _, top, _, h, _ in spy.reads)  # runs of one band are read at once
    assert all(w == width for _, _, _, w, _, _ in spy.reads)
    # consecutive reads abut: no row (so no tile) is decoded twice, and they are tile-aligned
    assert all(a[1] == b[0] for a, b in zip(rows, rows[1:])) and all(r[0] % tile_h == 0 for r in rows)
    # memory: one band, whatever the number of spots
    band_bytes = max(nb for *_, nb in spy.reads)
    assert band_bytes <= (bands.BAND_PIXELS + (plan.n + 1 + 2 * tile_h) * width) * 3
    assert band_bytes < views.nbytes / 20
    with open_slide(tif, mpp=HER2ST_MPP) as slide:
        some = np.arange(0, len(xy), 97)
        assert_same_views(per_spot(slide, xy[some]), views[some])


def test_sparse_spots_take_the_per_spot_path(her2st):
    _, tif, xy = her2st
    with open_slide(tif, mpp=HER2ST_MPP) as slide:
        dense = plan_reads(slide, xy, SPEC)
        sparse = plan_reads(slide, xy[[0, -1]], SPEC)  # two spots at opposite corners
        forced = plan_reads(slide, xy[[0, -1]], SPEC, reader="tile_once")
        assert all(b.whole for b in dense.bands) and dense.coverage >= bands.MIN_COVERAGE
        assert not any(b.whole for b in sparse.bands)
        assert all(b.whole for b in forced.bands)
        ref = per_spot(slide, xy[[0, -1]])
        new, _ = band_read(slide, xy[[0, -1]])
        np.testing.assert_array_equal(ref, new)  # the per-spot path is today's, exactly
    with pytest.raises(ValueError, match="reader must be one of"):
        plan_reads(slide, xy, SPEC, reader="fast")


def test_predictions_keep_input_order_and_do_not_depend_on_threads(her2st, tiny_bundle):
    from mmap_deploy.engines import open_engines
    from mmap_deploy.inputs.coords import Spots
    from mmap_deploy.model.bundle import load_bundle
    from mmap_deploy.run.pipeline import predict_slide

    _, tif, xy = her2st
    perm = np.random.default_rng(3).permutation(len(xy))
    spots = Spots(ids=[f"s{i}" for i in perm], xy=xy[perm], source_format="xy")
    bundle = load_bundle(tiny_bundle)
    with open_slide(tif, mpp=HER2ST_MPP) as slide, open_engines("onnxruntime", bundle, threads=1) as engines:
        one = predict_slide(slide, spots, bundle, engines, batch_size=8, read_workers=1)
        three = predict_slide(slide, spots, bundle, engines, batch_size=8, read_workers=3)
    assert one.spot_ids == three.spot_ids == spots.ids
    np.testing.assert_array_equal(one.prediction, three.prediction)
    np.testing.assert_array_equal(one.embedding, three.embedding)


@pytest.mark.parametrize("size", [1400, 1401])  # level downsamples 2.0 and 4.0, or 1.9993 and 3.9943
def test_band_decoded_in_parallel_runs_is_the_band_read_whole(tmp_path, size):
    """Runs of whole tile rows decoded at once give the band's pixels exactly where each run starts on
    a level pixel (a whole-number downsample); elsewhere the band is read in one piece, as before."""
    path = write_pyramid(tmp_path / "s.tif", tissue_like_image(size, seed=5), levels=(1, 2, 4),
                         resolution=1e4 / 0.25, tile=64)
    rng = np.random.default_rng(4)
    with open_slide(path) as slide:
        for level, mpp in enumerate((0.3, 0.6, 1.2)):
            spec = ViewSpec(patch_um=60.0, mpp=mpp)
            width = slide.level_dimensions[slide.patch_level(240, spec.patch_px)[0]][0]
            plan = plan_reads(slide, rng.uniform(100, size - 100, (300, 2)), spec, reader="tile_once",
                              band_pixels=width * 200)
            assert len(plan.bands) >= 2 and plan.level == level
            exact = plan.downsample == round(plan.downsample)
            assert exact == (level == 0 or size % 4 == 0)
            got = {}
            for decoders in (1, 2, 3):
                source = bands._BandSource(slide, plan, decoders=decoders)
                with Spy(slide) as spy:
                    got[decoders] = [source.submit(b).result() for b in plan.bands]
                source.close()
                runs = len(spy.reads)
                assert runs > len(plan.bands) if exact and decoders > 1 else runs == len(plan.bands)
            for decoders in (2, 3):
                for a, b in zip(got[1], got[decoders]):
                    assert a.flags.c_contiguous and b.flags.c_contiguous
                    np.testing.assert_array_equal(a, b)
            # and each band is what one read of its rows gives
            for band, pixels in zip(plan.bands, got[3]):
                (r0, r1), (c0, c1) = band.rows, plan.cols
                whole = slide.read_level_region(plan.level, c0, r0, c1 - c0, r1 - r0)
                if exact:
                    np.testing.assert_array_equal(pixels, whole)


def test_encoder_calls_in_flight_at_once_give_the_same_predictions(her2st, tiny_bundle):
    """On the CPU two encoder batches run at once (each on half the threads); the outputs are those
    of one call at a time, bit for bit, and both calls really overlap."""
    import threading

    from mmap_deploy.engines import open_engines
    from mmap_deploy.engines.select import cpu_encoder_streams
    from mmap_deploy.inputs.coords import Spots
    from mmap_deploy.model.bundle import load_bundle
    from mmap_deploy.run.pipeline import predict_slide

    _, tif, xy = her2st
    spots = Spots(ids=[f"s{i}" for i in range(len(xy))], xy=xy, source_format="xy")
    bundle = load_bundle(tiny_bundle)
    assert cpu_encoder_streams(1) == 1 and cpu_encoder_streams(2) == 2 and cpu_encoder_streams(16) == 2
    with open_slide(tif, mpp=HER2ST_MPP) as slide:
        with open_engines("onnxruntime", bundle, threads=1) as engines:
            assert engines.encoder.streams == 1
            one = predict_slide(slide, spots, bundle, engines, batch_size=4, read_workers=2)
        with open_engines("onnxruntime", bundle, threads=2) as engines:
            assert engines.encoder.streams == 2 and engines.fusion.streams == 1
            assert engines.encoder._session.get_session_options().intra_op_num_threads == 1
            run, lock, now, most = engines.encoder.infer, threading.Lock(), [0], [0]
            both_in = threading.Event()  # set once two calls have been in flight at the same time

            def counted(feeds):
                with lock:
                    now[0] += 1
                    most[0] = max(most[0], now[0])
                    if now[0] == 2:
                        both_in.set()
                try:
                    # the first call waits for the second to start, however fast or slow the reading is
                    # (the timeout only bounds a failure: a second call that never comes)
                    both_in.wait(timeout=120)
                    return run(feeds)
                finally:
                    with lock:
                        now[0] -= 1

            engines.encoder.infer = counted
            two = predict_slide(slide, spots, bundle, engines, batch_size=4, read_workers=2)
    assert most[0] == 2
    assert one.spot_ids == two.spot_ids
    np.testing.assert_array_equal(one.embedding, two.embedding)
    np.testing.assert_array_equal(one.prediction, two.prediction)
    np.testing.assert_array_equal(one.clusters, two.clusters)
    assert 0 < two.timings["encoder"] <= two.timings["total"]
