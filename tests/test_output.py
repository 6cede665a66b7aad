"""The .h5ad output: layout, no None in uns, atomic writes, overwrite refusal, gene maps."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest

from mmap_deploy.errors import UserError
from mmap_deploy.outputs.adata import (
    build_anndata,
    check_no_none,
    check_output_path,
    check_plot_genes,
    plot_paths,
    spot_diameter_fullres,
    write_gene_plots,
    write_h5ad,
)
from mmap_deploy.outputs.prediction import DroppedSpot, SlidePrediction


def _prediction(n: int = 20, genes: int = 5, dim: int = 8, k: int = 4, dropped: int = 1) -> SlidePrediction:
    rng = np.random.default_rng(0)
    gx, gy = np.meshgrid(np.arange(5), np.arange(4))
    xy = np.stack([100.0 + 200.0 * gx.ravel(), 150.0 + 200.0 * gy.ravel()], axis=1)[:n]
    return SlidePrediction(
        spot_ids=[f"{int(x)}x{int(y)}" for x, y in xy],
        xy=xy,
        prediction=rng.standard_normal((n, genes)).astype(np.float32),
        embedding=rng.standard_normal((n, dim)).astype(np.float32),
        clusters=np.arange(n) % k,
        n_prototypes=k,
        bank_size=k // 2,
        genes=[f"G{i}" for i in range(genes)],
        dropped=[DroppedSpot(f"bad{i}", 1.0, 2.0, "cannot decode") for i in range(dropped)],
        timings={"encoder": 1.5, "fusion": 0.25},
        engines={"backend": "onnxruntime", "encoder_providers": "CPUExecutionProvider"},
    )


def _adata(pred=None, thumb_side=100):
    pred = pred or _prediction()
    thumb = np.full((thumb_side, thumb_side, 3), 200, np.uint8)
    return build_anndata(pred, thumb, 0.1, library_id="S1", slide_mpp=0.5, patch_um=160.0,
                         provenance={"mpp": 0.5, "mpp_source": "--mpp", "bundle_sha256": "ab" * 32})


def test_spot_diameter_is_half_the_pitch_capped_by_the_patch():
    gx, gy = np.meshgrid(np.arange(30), np.arange(30))
    grid = np.stack([gx.ravel() * 200.0, gy.ravel() * 200.0], axis=1)
    assert spot_diameter_fullres(grid, patch_side_fullres=300.0) == pytest.approx(100.0)
    assert spot_diameter_fullres(grid, patch_side_fullres=60.0) == pytest.approx(60.0)
    assert spot_diameter_fullres(grid[:1], patch_side_fullres=60.0) == 60.0
    # all spots on one point: no pitch to measure
    assert spot_diameter_fullres(np.zeros((5, 2)), patch_side_fullres=42.0) == 42.0


def test_check_no_none_names_the_key():
    check_no_none({"a": [1, "x", {"b": 2.0}]})
    with pytest.raises(ValueError, match=r"uns\['a'\]\[2\]\['b'\] is None"):
        check_no_none({"a": [1, "x", {"b": None}]})


def test_anndata_layout_round_trips(tmp_path):
    pred = _prediction()
    out = write_h5ad(_adata(pred), tmp_path / "out.h5ad")
    a = ad.read_h5ad(out)
    assert a.X.dtype == np.float32
    np.testing.assert_array_equal(a.X, pred.prediction)
    assert list(a.var_names) == pred.genes
    assert list(a.obs_names) == pred.spot_ids
    np.testing.assert_array_equal(a.obsm["spatial"], pred.xy)
    np.testing.assert_array_equal(a.obsm["mmap_embedding"], pred.embedding)
    cl = a.obs["mmap_cluster"]
    assert cl.dtype == "category" and list(cl.cat.categories) == ["0", "1", "2", "3"]
    assert list(cl.astype(int)) == list(pred.clusters)
    lib = a.uns["spatial"]["S1"]
    assert lib["images"]["hires"].shape == (100, 100, 3) and lib["images"]["hires"].dtype == np.uint8
    assert lib["scalefactors"]["tissue_hires_scalef"] == pytest.approx(0.1)
    # 200 px pitch -> 100 px plotting diameter (patch side is 160 um / 0.5 = 320 px)
    assert lib["scalefactors"]["spot_diameter_fullres"] == pytest.approx(100.0)
    m = a.uns["mmap"]
    assert m["n_spots"] == 20 and m["n_dropped"] == 1
    assert list(m["dropped_spots"]) == ["bad0"] and list(m["dropped_errors"]) == ["cannot decode"]
    assert m["timings"]["encoder"] == 1.5 and m["engines"]["backend"] == "onnxruntime"
    assert m["mpp_source"] == "--mpp" and m["n_prototypes"] == 4 and m["bank_size"] == 2


def test_no_dropped_spots_writes_empty_lists(tmp_path):
    a = ad.read_h5ad(write_h5ad(_adata(_prediction(dropped=0)), tmp_path / "out.h5ad"))
    assert len(a.uns["mmap"]["dropped_spots"]) == 0 and a.uns["mmap"]["n_dropped"] == 0


def test_none_in_provenance_is_refused_before_writing():
    with pytest.raises(ValueError, match="checkpoint.*is None"):
        build_anndata(_prediction(), np.zeros((4, 4, 3), np.uint8), 1.0, library_id="S1", slide_mpp=0.5,
                      patch_um=160.0, provenance={"checkpoint": None})


def test_existing_output_is_refused_without_overwrite(tmp_path):
    out = tmp_path / "out.h5ad"
    out.write_bytes(b"precious")
    with pytest.raises(UserError, match=r"out.h5ad: already exists; pass overwrite="):
        write_h5ad(_adata(), out)
    assert out.read_bytes() == b"precious"
    write_h5ad(_adata(), out, overwrite=True)
    assert ad.read_h5ad(out).n_obs == 20


def test_output_path_checks(tmp_path):
    with pytest.raises(UserError, match=r"must end in .h5ad \(AnnData\) or .zarr \(SpatialData\), or .geojson "
                       r"\(QuPath detections\), e.g. -o out.h5ad"):
        check_output_path(tmp_path / "out.csv", overwrite=False)
    (tmp_path / "d.h5ad").mkdir()
    with pytest.raises(UserError, match="is a directory"):
        check_output_path(tmp_path / "d.h5ad", overwrite=True)


def test_failed_write_leaves_nothing_behind(tmp_path):
    """A write that fails half-way leaves neither a partial output nor its temporary file."""
    a = _adata()
    a.uns["unwritable"] = object()  # anndata raises while writing this, after X is on disk
    out = tmp_path / "out.h5ad"
    with pytest.raises(Exception):
        write_h5ad(a, out)
    assert list(tmp_path.iterdir()) == []
    # and an existing output survives a failed overwrite untouched
    write_h5ad(_adata(), out)
    before = out.read_bytes()
    with pytest.raises(Exception):
        write_h5ad(a, out, overwrite=True)
    assert out.read_bytes() == before and sorted(p.name for p in tmp_path.iterdir()) == ["out.h5ad"]


def test_the_thumbnail_is_stored_compressed_and_reads_back_identical(tmp_path):
    import h5py

    rng = np.random.default_rng(2)
    thumb = np.full((600, 500, 3), 245, np.uint8)  # white glass around a noisy "tissue" block
    thumb[100:400, 150:350] = rng.integers(120, 220, (300, 200, 3), dtype=np.uint8)
    a = build_anndata(_prediction(), thumb, 0.1, library_id="S1", slide_mpp=0.5, patch_um=160.0, provenance={})
    out = write_h5ad(a, tmp_path / "out.h5ad")
    assert a.uns["spatial"]["S1"]["images"]["hires"] is not None  # the caller's AnnData is left whole
    with h5py.File(out) as f:
        d = f["uns/spatial/S1/images/hires"]
        assert d.compression == "gzip" and d.chunks == (128, 500, 3)
        assert d.attrs["encoding-type"] == "array"
        assert f["X"].compression is None  # only the images: predictions stay fast to write and read
    back = ad.read_h5ad(out)
    hires = back.uns["spatial"]["S1"]["images"]["hires"]
    assert hires.dtype == np.uint8 and np.array_equal(hires, thumb)
    assert back.uns["spatial"]["S1"]["scalefactors"] == a.uns["spatial"]["S1"]["scalefactors"]
    np.testing.assert_array_equal(back.X, a.X)
    assert out.stat().st_size < thumb.nbytes / 2


def test_a_killed_runs_temporary_file_is_cleaned_up(tmp_path):
    stale = tmp_path / ".out.h5ad.k3x9_q.tmp"  # what a run killed while writing leaves
    stale.write_bytes(b"half")
    other = tmp_path / ".other.h5ad.abc.tmp"
    other.write_bytes(b"another output's")
    write_h5ad(_adata(), tmp_path / "out.h5ad")
    assert sorted(p.name for p in tmp_path.iterdir()) == [".other.h5ad.abc.tmp", "out.h5ad"]


def test_plot_gene_checks(tmp_path):
    check_plot_genes(["G1"], ["G0", "G1"], tmp_path)
    with pytest.raises(UserError, match=r"--plot: gene\(s\) NOPE not predicted by the model .*2 genes: G0, G1.*spelling"):
        check_plot_genes(["G1", "NOPE"], ["G0", "G1"], tmp_path)


def test_gene_maps_are_pngs_next_to_the_output(tmp_path):
    from PIL import Image

    a = _adata(thumb_side=1500)
    out = tmp_path / "slide.h5ad"
    written = write_gene_plots(a, ["G0", "G3"], out, "S1")
    assert written == plot_paths(out, ["G0", "G3"]) == [tmp_path / "slide.G0.png", tmp_path / "slide.G3.png"]
    for p in written:
        with Image.open(p) as im:
            assert im.format == "PNG"
            assert max(im.size) <= 1200  # capped, not the full 1500 px thumbnail
            colours = np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)
            assert len(colours) > 10  # spots in a colour map over the grey thumbnail, plus a colour bar
    assert plot_paths(tmp_path / "x.h5ad", ["HLA-A/B"]) == [tmp_path / "x.HLA-A_B.png"]


def test_gene_maps_say_demo_model_and_their_unit(tmp_path):
    """A map from the demo model says so in its title; the colour bar names the training scale."""
    from mmap_deploy.outputs.adata import COLOUR_BAR_UNIT, gene_map_title

    adata = type("A", (), {"uns": {"mmap": {"bundle_demo": True}}})()
    assert gene_map_title(adata, "FASN") == "FASN (predicted) · DEMO model, not biology"
    adata.uns["mmap"]["bundle_demo"] = False
    assert gene_map_title(adata, "FASN") == "FASN (predicted)"
    assert COLOUR_BAR_UNIT.startswith("log10(1 + ")


# -- per-spot columns on the pictures: --plot qc_blur, the overview's marks ----------------------
def _qc_adata(n_fail: int = 3, thumb_side: int = 400):
    pred = _prediction()
    qc = np.zeros((len(pred.spot_ids), 3), np.float32)
    qc[:, 0] = np.linspace(0.3, 1.2, len(qc))
    qc[:n_fail, 0] = 2.5  # blurred
    pred.qc = qc
    pred.qc_record = {"blur_max": 1.6}
    a = build_anndata(pred, np.full((thumb_side, thumb_side, 3), 200, np.uint8), thumb_side / 1000.0,
                      library_id="S1", slide_mpp=0.5, patch_um=160.0, provenance={"mpp": 0.5})
    return a


def test_plot_takes_per_spot_columns_beside_genes(tmp_path):
    assert check_plot_genes(["QC_BLUR", "g1", "qc_pass", "mmap_familiarity"], ["G0", "G1"], tmp_path) == [
        "qc_blur", "G1", "qc_pass", "mmap_familiarity"]
    with pytest.raises(UserError, match=r"--plot: gene\(s\) qc_blurr not predicted by the model .*; qc_blurr: did "
                                        r"you mean .*; per-spot columns: qc_blur, qc_ink") as e:
        check_plot_genes(["qc_blurr"], ["G0", "G1", "qc_blurb"], tmp_path)
    assert "\n" not in str(e.value)


def test_column_maps_are_written_and_a_missing_column_is_said(tmp_path):
    from PIL import Image

    from mmap_deploy.errors import MMAPWarning

    a = _qc_adata()
    assert a.uns["mmap"]["qc"]["image"] == {"blur_max": 1.6} and a.obs["qc_pass"].sum() == a.n_obs - 3
    out = tmp_path / "slide.h5ad"
    with pytest.warns(MMAPWarning, match="--plot mmap_familiarity: this output has no such column"):
        written = write_gene_plots(a, ["qc_blur", "G0", "mmap_familiarity", "qc_pass"], out, "S1")
    assert written == [tmp_path / "slide.qc_blur.png", tmp_path / "slide.G0.png", tmp_path / "slide.qc_pass.png"]
    for p in written:
        with Image.open(p) as im:
            assert im.format == "PNG" and len(np.unique(np.asarray(im.convert("RGB")).reshape(-1, 3), axis=0)) > 10


def _red_pixels(path) -> int:
    from PIL import Image

    with Image.open(path) as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    return int(((rgb[..., 0] > 200) & (rgb[..., 1] < 80) & (rgb[..., 2] < 80)).sum())


def test_the_overview_rings_spots_failing_qc_and_crosses_low_familiarity(tmp_path):
    from PIL import Image

    from mmap_deploy.outputs.overview import LOW_FAMILIARITY_COLOUR, flagged_spots, overview_title, write_overview

    clean, failing = _qc_adata(n_fail=0), _qc_adata(n_fail=3)
    assert "image QC failed: 3" in overview_title(failing) and "image QC failed: 0" in overview_title(clean)
    write_overview(clean, tmp_path / "clean.png", "S1", overview_title(clean))
    write_overview(failing, tmp_path / "failing.png", "S1", overview_title(failing))
    assert _red_pixels(tmp_path / "clean.png") == 0 < _red_pixels(tmp_path / "failing.png")
    failing.obs["mmap_familiarity"] = np.linspace(0, 1, failing.n_obs)
    failing.uns["mmap"]["qc"] = {**failing.uns["mmap"].get("qc", {}), "familiarity": {"unfamiliar_below": 0.2}}
    marks = flagged_spots(failing)
    assert marks["low familiarity"].sum() == 4 and marks["image QC failed"].sum() == 3
    write_overview(failing, tmp_path / "both.png", "S1", overview_title(failing))
    amber = tuple(int(LOW_FAMILIARITY_COLOUR[i:i + 2], 16) for i in (1, 3, 5))
    with Image.open(tmp_path / "both.png") as im:
        rgb = np.asarray(im.convert("RGB")).astype(int)
    assert (np.abs(rgb - np.array(amber)).sum(axis=-1) < 30).sum() > 0
