"""Image QC per spot (inputs/spot_qc.py): the scores on real and drawn views, determinism, the pipeline's columns."""

from __future__ import annotations

import numpy as np
import pytest

from mmap_deploy.inputs import artefacts, tissue
from mmap_deploy.inputs.spot_qc import (
    DEFAULT_THRESHOLDS,
    QC_COLUMNS,
    QCThresholds,
    blur_view,
    qc_columns,
    qc_pass,
    qc_record,
    spot_qc,
    whole_view,
)
from mmap_deploy.model.preprocess import ViewSpec, make_views

DEMO_SPEC = ViewSpec()  # the demo's geometry: 154 µm at 0.6875 µm/px, 3 views of 112 px
UNI_224 = ViewSpec(input_size=224)  # a geometry whose whole patch is at the model's resolution


@pytest.fixture(scope="module")
def sample_views():
    """The demo sample's first 24 spots, views as the band reader makes them, and the slide's pixels."""
    from mmap_deploy.demo import sample_paths
    from mmap_deploy.inputs.bands import read_spot_views
    from mmap_deploy.inputs.coords import read_coords
    from mmap_deploy.inputs.slide import open_slide

    image, coords, mpp = sample_paths()
    xy = np.asarray(read_coords(coords).xy, dtype=np.float64)[:24]
    with open_slide(image, mpp=mpp) as slide:
        chunks = list(read_spot_views(slide, xy, DEMO_SPEC, workers=1))
        pixels = slide.read_level_region(0, 0, 0, slide.width, slide.height)
    views = np.concatenate([c.views for c in chunks])
    order = np.concatenate([c.rows for c in chunks])
    return views[np.argsort(order)], xy, pixels, mpp


def _views_of(pixels: np.ndarray, xy: np.ndarray, mpp: float, spec: ViewSpec) -> np.ndarray:
    """Each spot's views cut from an image in memory (the per-spot path: patch, then make_views)."""
    from mmap_deploy.model.preprocess import patch_region, resize

    out = []
    for x, y in xy:
        left, top, side = patch_region(x, y, mpp, spec)
        out.append(make_views(resize(pixels[top:top + side, left:left + side], spec.patch_px), spec))
    return np.stack(out)


def test_the_views_measured():
    assert (blur_view(DEMO_SPEC), whole_view(DEMO_SPEC)) == (1, 0)  # the central half is not resampled
    assert (blur_view(UNI_224), whole_view(UNI_224)) == (0, 0)
    assert blur_view(ViewSpec(input_size=448)) == 0  # every view upsampled: the largest crop
    record = qc_record(DEMO_SPEC)
    assert record["blur_um_per_px"] == pytest.approx(0.6875) and record["area_um_per_px"] == pytest.approx(1.375)
    assert qc_record(UNI_224)["area_um_per_px"] == pytest.approx(1.375)  # box-averaged by 2
    assert None not in record.values() and record["blur_max"] == DEFAULT_THRESHOLDS.blur_max


def test_scores_are_per_spot_and_bit_identical_in_any_chunk(sample_views):
    views = sample_views[0]
    whole = spot_qc(views, DEMO_SPEC)
    one_by_one = np.concatenate([spot_qc(views[i:i + 1], DEMO_SPEC) for i in range(len(views))])
    odd_chunks = np.concatenate([spot_qc(views[i:i + 5], DEMO_SPEC) for i in range(0, len(views), 5)])
    assert whole.dtype == np.float32 and whole.shape == (len(views), 3)
    assert np.array_equal(whole, one_by_one) and np.array_equal(whole, odd_chunks)
    assert spot_qc(views[:0], DEMO_SPEC).shape == (0, 3)


def test_real_tissue_passes_and_blur_is_seen_whatever_the_stain(sample_views):
    """The sample (her2st B4, sharp) passes; the same slide blurred by 2 µm fails on blur; a darker stain
    (the grey levels' distance from white x 1.4, clipped at black) moves qc_blur by at most 0.15."""
    from scipy import ndimage as ndi

    views, xy, pixels, mpp = sample_views
    sharp = spot_qc(views, DEMO_SPEC)
    assert qc_pass(sharp).all()
    sigma = 2.0 / mpp
    blurred = np.stack([ndi.gaussian_filter(pixels[..., c].astype(np.float32), sigma, mode="nearest")
                        for c in range(3)], axis=-1)
    blurred = np.clip(np.rint(blurred), 0, 255).astype(np.uint8)
    soft = spot_qc(_views_of(blurred, xy, mpp, DEMO_SPEC), DEMO_SPEC)
    assert (soft[:, 0] > sharp[:, 0] + 0.5).all() and (soft[:, 0] > DEFAULT_THRESHOLDS.blur_max).all()
    assert not qc_pass(soft).any()
    dark = np.clip(np.rint(255.0 - (255.0 - views.astype(np.float32)) * 1.4), 0, 255).astype(np.uint8)
    assert np.abs(spot_qc(dark, DEMO_SPEC)[:, 0] - sharp[:, 0]).max() < 0.15


def _drawn_views(fill) -> np.ndarray:
    """One spot: a 224 px patch at 0.6875 µm/px drawn by `fill(patch)`, made into the demo's views."""
    rng = np.random.default_rng(0)
    patch = np.empty((224, 224, 3), np.uint8)
    fill(patch, rng)
    return make_views(patch, DEMO_SPEC)[None]


def _tissue(patch, rng):
    """Pink stroma with purple nuclei: textured, stained."""
    patch[:] = (215, 150, 190)
    ys, xs = np.mgrid[0:224, 0:224]
    for cy, cx in rng.integers(4, 220, (160, 2)):
        patch[(ys - cy) ** 2 + (xs - cx) ** 2 <= 9] = (90, 50, 140)
    patch[:] = np.clip(patch.astype(np.int16) + rng.integers(-6, 7, patch.shape), 0, 255).astype(np.uint8)


def test_ink_share_by_the_tissue_detections_colour_rules():
    def half_blue(patch, rng):
        _tissue(patch, rng)
        patch[:, :112] = (40, 90, 200)  # blue ink: B - R >= 100

    def black_block(patch, rng):
        _tissue(patch, rng)
        patch[:56] = (20, 20, 24)

    qc_blue = spot_qc(_drawn_views(half_blue), DEMO_SPEC)[0]
    qc_black = spot_qc(_drawn_views(black_block), DEMO_SPEC)[0]
    qc_clean = spot_qc(_drawn_views(_tissue), DEMO_SPEC)[0]
    assert qc_blue[1] == pytest.approx(0.5, abs=0.01) and qc_black[1] == pytest.approx(0.25, abs=0.01)
    assert qc_clean[1] == 0.0  # dark nuclei are smaller than INK_MIN_AREA_UM2
    assert not qc_pass(np.stack([qc_blue, qc_black]), DEFAULT_THRESHOLDS).any()
    # one definition of the rules: tissue detection uses the same functions and constants
    assert tissue.ink_coloured is artefacts.ink_coloured and tissue.WHITE_MIN == artefacts.WHITE_MIN
    r, g, b = (np.array([v], np.float32) for v in (40, 90, 200))
    assert artefacts.ink_coloured(r, g, b)[0] and not artefacts.black(r, g, b)[0]


def test_background_is_bright_smooth_glass_not_pale_tissue():
    def glass(patch, rng):  # her2st's lilac glass, with a little noise
        patch[:] = np.clip(np.array([216, 210, 222]) + rng.normal(0, 0.4, patch.shape), 0, 255).astype(np.uint8)

    def half_glass(patch, rng):
        _tissue(patch, rng)
        glass(patch[:, 112:], rng)

    def white(patch, rng):
        patch[:] = 250

    assert spot_qc(_drawn_views(glass), DEMO_SPEC)[0, 2] == pytest.approx(1.0)
    assert spot_qc(_drawn_views(white), DEMO_SPEC)[0, 2] == 1.0
    assert spot_qc(_drawn_views(half_glass), DEMO_SPEC)[0, 2] == pytest.approx(0.5, abs=0.03)
    assert spot_qc(_drawn_views(_tissue), DEMO_SPEC)[0, 2] == 0.0
    flat = spot_qc(_drawn_views(white), DEMO_SPEC)[0, 0]
    assert flat == 0.0  # no contrast at all: not blurred, and not NaN


def test_pass_rule_at_its_thresholds():
    t = QCThresholds(blur_max=1.0, ink_max=0.1, background_max=0.5)
    scores = np.array([[1.0, 0.1, 0.5], [1.01, 0, 0], [0, 0.11, 0], [0, 0, 0.51], [np.nan, 0, 0]], np.float32)
    assert qc_pass(scores, t).tolist() == [True, False, False, False, False]
    cols = qc_columns(scores, t)
    assert list(cols) == [*QC_COLUMNS, "qc_pass"] and cols["qc_pass"].dtype == bool
    assert cols["qc_ink"].dtype == np.float32 and np.array_equal(cols["qc_ink"], scores[:, 1])


def test_the_pipeline_writes_the_columns_from_the_views_the_encoder_read(tiny_bundle, tmp_path):
    """A real run: obs holds spot_qc of the very views each reader path made; thresholds in uns."""
    import anndata as ad

    import mmap_deploy as mm
    from mmap_deploy.demo import sample_paths
    from mmap_deploy.engines import open_engines
    from mmap_deploy.inputs.coords import read_coords
    from mmap_deploy.inputs.slide import open_slide
    from mmap_deploy.model.bundle import load_bundle
    from mmap_deploy.run.pipeline import predict_slide

    from mmap_deploy.inputs.bands import read_spot_views

    image, coords, mpp = sample_paths()
    bundle = load_bundle(tiny_bundle)
    spec = bundle.manifest.view
    spots = read_coords(coords)
    xy = np.asarray(spots.xy, dtype=np.float64)
    with open_engines("onnxruntime", bundle, "fp32", threads=1) as engines, open_slide(image, mpp=mpp) as slide:
        runs = {r: predict_slide(slide, spots, bundle, engines, batch_size=8, read_workers=2, reader=r) for r in ("per_spot", "tile_once")}
        for r, run in runs.items():
            direct = np.empty_like(run.qc)
            for chunk in read_spot_views(slide, xy, spec, workers=1, reader=r):
                direct[chunk.rows] = spot_qc(chunk.views, spec)
            assert np.array_equal(run.qc, direct), r
    # the two paths' views differ by a rounding here and there (bands.py), the scores hardly
    assert np.abs(runs["per_spot"].qc - runs["tile_once"].qc).max() < 0.01
    with mm.Predictor(tiny_bundle, threads=1) as p:
        adata = p.predict(image, coords)
    mm.write(adata, tmp_path / "o.h5ad")
    back = ad.read_h5ad(tmp_path / "o.h5ad")
    assert back.obs["qc_pass"].dtype == bool and back.obs["qc_blur"].dtype == np.float32
    assert np.array_equal(back.obs[list(QC_COLUMNS)].to_numpy(), runs["tile_once"].qc)  # a plain image: whole bands
    image_qc = back.uns["mmap"]["qc"]["image"]
    assert image_qc["blur_max"] == DEFAULT_THRESHOLDS.blur_max and image_qc["blur_view"] == 1
    assert "lattice" in back.uns["mmap"]["qc"]  # the geometry checks are still there, beside it
    assert back.uns["mmap"]["timings"]["qc_threads"] > 0


def test_a_run_warns_only_when_enough_spots_fail():
    from mmap_deploy.inputs.spot_qc import WARN_SHARE, qc_warning

    scores = np.zeros((200, 3), np.float32)
    assert qc_warning(scores) == ""
    scores[0, 2] = 0.9  # one blank spot at an edge: under WARN_SHARE of the spots
    assert WARN_SHARE == 0.01 and qc_warning(scores) == ""
    scores[1:3, 0] = 2.0
    scores[3, 1] = 0.5
    assert qc_warning(scores) == ("4 of 200 spots (2%) fail the image QC: 2 blurred (qc_blur > 1.6), 1 under pen ink "
                                  "(qc_ink > 0.05), 1 mostly blank (qc_background > 0.75); obs['qc_pass'] marks them")


def test_the_qc_benchmarks_auroc_and_drawn_ink():
    """benchmarks/qc_artefacts.py: its AUROC (ties half) is scikit-learn's; the strokes cover half the left half."""
    import importlib.util
    from pathlib import Path

    import sklearn.metrics as sklearn_metrics

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "qc_artefacts.py"
    spec = importlib.util.spec_from_file_location("qc_artefacts", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    rng = np.random.default_rng(3)
    neg, pos = rng.integers(0, 5, 40).astype(float), rng.integers(1, 7, 30).astype(float)  # many ties
    y = np.r_[np.zeros(len(neg)), np.ones(len(pos))]
    assert bench.auroc(neg, pos) == pytest.approx(sklearn_metrics.roc_auc_score(y, np.r_[neg, pos]))
    xy = np.array([[1000.0, 1000.0], [3000.0, 3000.0]])
    strokes = bench.ink_strokes((4000, 4000), xy, mpp=0.5)
    half = bench.PATCH_UM / 0.5 / 2
    left = strokes[int(1000 - half):int(3000 + half), int(1000 - half):2000]
    assert (strokes[:, 2001:] == -1).all() and abs((left >= 0).mean() - 0.5) < 0.02
    assert set(np.unique(left)) == {-1, 0, 1, 2}
