"""Issue 23: the CLI says what it did (the summary line, the lattice warning, swapped arguments,
--list-genes, --plot's spelling), and every run has a per-spot tissue share."""

from __future__ import annotations

import re
from pathlib import Path
from types import SimpleNamespace

import anndata as ad
import numpy as np
import pytest
from conftest import TINY_GENES, run_cli
from test_predict_cli import assert_one_line_error, pyramid, write_coords  # noqa: F401  (a fixture)


# -- the summary line ------------------------------------------------------------------------
def test_the_run_says_resolution_source_spots_engine_and_output(pyramid, tiny_bundle, tmp_path):  # noqa: F811
    coords, ids, _ = write_coords(tmp_path / "c.csv", "xy")
    out = tmp_path / "o.h5ad"
    r = run_cli(pyramid, coords, "-o", out, "--model", tiny_bundle, expect=0)
    line = next(x for x in r.stderr.splitlines() if x.startswith("wrote "))
    assert re.fullmatch(
        rf"wrote {re.escape(str(out))}: {len(ids)} spots in [\d.]+ s \([\d.]+ spots/s\); "
        r"0\.500 µm/px from openslide\.mpp-x; engine onnxruntime \(CPUExecutionProvider, fp32\)", line), line
    r = run_cli(pyramid, coords, "-o", out, "--model", tiny_bundle, "--mpp", "0.6", "--overwrite", expect=0)
    assert "; 0.600 µm/px from --mpp; engine onnxruntime" in r.stderr


def test_the_demo_says_its_exif_resolution(tiny_bundle, tmp_path):
    r = run_cli("--demo", "--model", tiny_bundle, "-o", tmp_path / "d.h5ad", expect=0)
    assert "120 spots in " in r.stderr and "; 0.688 µm/px from exif.XResolution; engine onnxruntime" in r.stderr


# -- the resolution against the spot lattice ----------------------------------------------------
def _visium_fit(mpp: float):
    from mmap_deploy.inputs.geometry import VISIUM, fit_lattice

    rows, cols = np.divmod(np.arange(100), 10)
    cols = 2 * cols + rows % 2
    xy = np.stack([cols * 50 / mpp, rows * 50 * np.sqrt(3) / mpp], axis=1)
    return fit_lattice(xy, np.stack([cols, rows], axis=1).astype(float), VISIUM)


@pytest.mark.parametrize(("ratio", "warned", "refused"), [(1.04, False, False), (1.064, True, False),
                                                          (0.94, True, False), (1.11, False, True)])
def test_more_than_5_percent_off_the_lattice_warns_more_than_10_refuses(ratio, warned, refused):
    from mmap_deploy.errors import UserError
    from mmap_deploy.inputs.geometry import check_geometry

    fit = _visium_fit(0.5)
    slide = SimpleNamespace(width=4000, height=4000, mpp=0.5 * ratio)
    spots = SimpleNamespace(xy=np.zeros((0, 2)))
    if refused:
        with pytest.raises(UserError, match="1.11x the lattice's"):
            check_geometry(spots, fit, slide, None, 163.52, Path("c.csv"), "openslide.mpp-x")
        return
    report = check_geometry(spots, fit, slide, None, 163.52, Path("c.csv"), "openslide.mpp-x")
    assert not report.problems
    lattice = [w for w in report.warnings if "spot lattice's" in w]
    assert bool(lattice) == warned, report.warnings
    if warned:
        off = f"{abs(ratio - 1):.1%}"
        assert lattice[0].startswith(f"c.csv: the run's resolution, {0.5 * ratio:.3f} µm per pixel from "
                                     f"openslide.mpp-x, is {off} {'above' if ratio > 1 else 'below'} the spot "
                                     "lattice's 0.500"), lattice[0]


def test_mpp_6_percent_off_the_lattice_runs_with_a_warning_11_percent_is_refused(pyramid, tiny_bundle, tmp_path):  # noqa: F811
    coords, _, _ = write_coords(tmp_path / "tissue_positions.csv", "visium")  # a 100 µm lattice at 0.5 µm/px
    out = tmp_path / "o.h5ad"
    r = run_cli(pyramid, coords, "-o", out, "--model", tiny_bundle, "--mpp", "0.532", expect=0)
    assert "warning: " + str(coords) + ": the run's resolution, 0.532 µm per pixel from --mpp, is 6.4% above" in r.stderr
    assert "(over 10% off is refused)" in r.stderr and out.is_file()
    r = run_cli(pyramid, coords, "-o", tmp_path / "p.h5ad", "--model", tiny_bundle, "--mpp", "0.556", expect=2)
    assert_one_line_error(r, "1.11x the lattice's")


# -- SLIDE and COORDS the wrong way round -----------------------------------------------------
def test_slide_and_coords_the_wrong_way_round_are_said_with_the_order(pyramid, tiny_bundle, tmp_path):  # noqa: F811
    coords, _, _ = write_coords(tmp_path / "c.csv", "xy")
    out = tmp_path / "o.h5ad"
    r = run_cli(coords, pyramid, "-o", out, "--model", tiny_bundle, expect=2)
    assert_one_line_error(r, "SLIDE and COORDS are the wrong way round", f"{coords} is a spot table",
                          f"mmap-predict {pyramid} {coords} -o OUT")
    assert "UTF-8" not in r.stderr and not out.exists()
    # an image named like anything is still seen by its first bytes
    renamed = tmp_path / "slide.data"
    renamed.write_bytes(pyramid.read_bytes())
    r = run_cli(coords, renamed, "-o", out, "--model", tiny_bundle, expect=2)
    assert_one_line_error(r, "wrong way round")


def test_swapped_arguments_check_leaves_real_mistakes_alone(tmp_path):
    from mmap_deploy.inputs.layouts import swapped_arguments_problem

    table = tmp_path / "c.csv"
    table.write_text("x,y\n1,2\n")
    binary = tmp_path / "c2.csv"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    image = tmp_path / "s.png"
    image.write_bytes(b"\x89PNG\r\n\x1a\n....")
    assert swapped_arguments_problem(table, image)
    assert swapped_arguments_problem(tmp_path, image)  # a Space Ranger folder as SLIDE
    assert swapped_arguments_problem(image, table) is None  # the right order
    assert swapped_arguments_problem(image, binary) is None  # a damaged table keeps its own message
    assert swapped_arguments_problem(table, tmp_path / "nope.png") is None


# -- --list-genes ----------------------------------------------------------------------------
def test_list_genes_prints_the_bundles_genes_on_stdout(tiny_bundle):
    r = run_cli("--list-genes", "--model", tiny_bundle, expect=0)
    assert r.stdout.splitlines() == TINY_GENES
    assert f"{len(TINY_GENES)} genes predicted by the model {tiny_bundle}" in r.stderr


def test_list_genes_of_the_demo_model_and_its_mistakes(tiny_bundle, tmp_path):
    from mmap_deploy.model.bundle import default_bundle_path, load_bundle

    if (default_bundle_path() / "manifest.json").is_file():
        r = run_cli("--list-genes", expect=0)
        assert r.stdout.splitlines() == list(load_bundle(default_bundle_path()).manifest.genes)
        assert "DEMO model" in r.stderr
    r = run_cli("--list-genes", "--model", tmp_path / "nobundle", expect=2)
    assert_one_line_error(r, "model bundle directory not found")
    r = run_cli("--list-genes", "--demo", "--model", tiny_bundle, expect=2)
    assert_one_line_error(r, "--list-genes only reads the model", "drop --demo")
    r = run_cli("--demo", expect=2)  # -o stays required for a run
    assert "Missing option '-o' / '--output'" in r.stderr


# -- --plot's gene names ---------------------------------------------------------------------
def test_plot_genes_match_case_insensitively_and_a_miss_names_near_genes(tmp_path):
    from mmap_deploy.errors import UserError
    from mmap_deploy.outputs.adata import check_plot_genes

    genes = ["ERBB2", "FASN", "IGKC", "GAPDH", "MT-CO1"]
    assert check_plot_genes(["erbb2", "Fasn", "IGKC", "ERBB2"], genes, tmp_path) == ["ERBB2", "FASN", "IGKC"]
    with pytest.raises(UserError, match=r"gene\(s\) ERB2, XYZQW not predicted .*ERB2: did you mean ERBB2\?; "
                                        r"per-spot columns: qc_blur, .*; check the spelling \(mmap-predict "
                                        r"--list-genes prints them all\)"):
        check_plot_genes(["ERB2", "XYZQW"], genes, tmp_path)


def test_plot_with_a_lower_case_gene_writes_its_map(pyramid, tiny_bundle, tmp_path):  # noqa: F811
    coords, _, _ = write_coords(tmp_path / "c.csv", "xy")
    out = tmp_path / "o.h5ad"
    r = run_cli(pyramid, coords, "-o", out, "--model", tiny_bundle, "--plot", "gene1", expect=0)
    assert (tmp_path / "o.GENE1.png").is_file() and f"wrote {tmp_path / 'o.GENE1.png'}" in r.stderr
    r = run_cli(pyramid, coords, "-o", tmp_path / "p.h5ad", "--model", tiny_bundle, "--plot", "GENE1x", expect=2)
    assert_one_line_error(r, "GENE1x not predicted", "did you mean GENE1")


# -- tissue_fraction for COORDS runs --------------------------------------------------------------
def test_spot_tissue_fraction_is_the_grids_area_share():
    from mmap_deploy.inputs.grid import lay_grid, parse_grid, spot_tissue_fraction

    mask = np.zeros((200, 300), bool)
    mask[40:160, 30:200] = True
    mask[90:110, 100:140] = False  # a hole
    spec = parse_grid("visium")
    grid = lay_grid(spec, width_px=3000, height_px=2000, mpp=0.5, mask=mask, scale_x=0.1, scale_y=0.1,
                    min_tissue=0.01)
    share = spot_tissue_fraction(mask, 0.1, 0.1, grid.xy, grid.spot_diameter_px)
    assert share.dtype == np.float32 and len(share) == len(grid) > 50
    np.testing.assert_allclose(share, grid.tissue_fraction, atol=1e-5)
    # on the tissue, off it, astride its left edge (x = 300 level-0 px), and off the mask's extent
    xy = np.array([[600.0, 600.0], [2500.0, 1800.0], [300.0, 1000.0], [-500.0, 1000.0]])
    np.testing.assert_allclose(spot_tissue_fraction(mask, 0.1, 0.1, xy, 110.0), [1, 0, 0.5, 0], atol=1e-3)


def test_every_coords_run_records_the_tissue_share_of_its_spots(tiny_bundle, tmp_path):
    out = tmp_path / "d.h5ad"
    run_cli("--demo", "--model", tiny_bundle, "-o", out, expect=0)
    a = ad.read_h5ad(out)
    f = a.obs["tissue_fraction"]
    assert f.dtype == np.float32 and f.between(0, 1).all()
    assert (f > 0.9).sum() > 30 and (f < 0.5).sum() > 5  # the sample has glass beside its tissue
    m = a.uns["mmap"]
    assert m["timings"]["tissue"] < 5.0
    assert m["spot_tissue"]["footprint"] == "disc of spot_diameter_fullres"
    lib = next(iter(a.uns["spatial"]))
    assert m["spot_tissue"]["spot_diameter_fullres"] == a.uns["spatial"][lib]["scalefactors"]["spot_diameter_fullres"]
    assert m["spot_tissue"]["tissue"]["method"] == "detected" and m["spot_tissue"]["tissue"]["pieces"] >= 1
    assert "tissue" not in m and "grid" not in m  # a COORDS run is not a grid run
    on = a[a.obs.tissue_fraction >= 0.5]  # the one line that drops background spots
    assert 0 < on.n_obs < a.n_obs


@pytest.mark.parametrize("failure", ["no tissue", "unreadable"])
def test_a_slide_without_detectable_tissue_still_runs(failure, tiny_bundle, tmp_path, monkeypatch):
    import mmap_deploy.inputs.tissue as tissue_mod
    from mmap_deploy.inputs.slide import PatchReadError

    def fail(slide, **_):
        if failure == "no tissue":
            raise tissue_mod.no_tissue_error(slide.path, 0.0, 0.01)
        raise PatchReadError("level 2 cannot be read")

    monkeypatch.setattr(tissue_mod, "detect_tissue", fail)
    out = tmp_path / "d.h5ad"
    r = run_cli("--demo", "--model", tiny_bundle, "-o", out, expect=0)
    a = ad.read_h5ad(out)
    if failure == "no tissue":
        assert (a.obs["tissue_fraction"] == 0).all() and "no tissue found" in a.uns["mmap"]["spot_tissue"]["note"]
    else:
        assert a.obs["tissue_fraction"].isna().all()
        assert "no tissue_fraction (tissue detection failed: level 2 cannot be read)" in r.stderr
