"""The Python API (`import mmap_deploy as mm`): the same AnnData as `mmap-predict`, errors as exceptions with
the CLI's messages, nothing printed, atomic writes, and the docs page in step with `__all__`."""

from __future__ import annotations

import logging
import re
import runpy
import subprocess
import sys
import warnings
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from conftest import run_cli, spatialdata_or_skip

import mmap_deploy as mm

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = REPO / "docs" / "examples" / "predict_demo.py"
API_PAGE = REPO / "docs" / "api.md"


def assert_same_prediction(a, b) -> None:
    """X, obs and obsm bit for bit; the same genes and spots."""
    import pandas as pd

    assert a.X.dtype == b.X.dtype == np.float32
    np.testing.assert_array_equal(a.X, b.X)
    assert list(a.var_names) == list(b.var_names)
    pd.testing.assert_frame_equal(a.obs, b.obs, check_exact=True)
    assert sorted(a.obsm) == sorted(b.obsm)
    for key in a.obsm:
        assert a.obsm[key].dtype == b.obsm[key].dtype
        np.testing.assert_array_equal(a.obsm[key], b.obsm[key])


@pytest.fixture(scope="module")
def demo():
    return mm.demo_paths()


@pytest.fixture(scope="module")
def cli_demo(tmp_path_factory) -> ad.AnnData:
    """What `mmap-predict --demo` writes."""
    out = tmp_path_factory.mktemp("cli") / "demo.h5ad"
    run_cli("--demo", "-o", out, expect=0)
    return ad.read_h5ad(out)


@pytest.fixture(scope="module")
def api_demo(demo) -> ad.AnnData:
    return mm.predict(demo.slide, demo.coords)


# -- the worked example -----------------------------------------------------------
def test_the_worked_example_runs_and_equals_mmap_predict(tmp_path, monkeypatch, cli_demo):
    png = tmp_path / "FASN.png"
    monkeypatch.setattr(sys, "argv", [str(EXAMPLE), str(png)])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # scanpy points to squidpy for sc.pl.spatial
        names = runpy.run_path(str(EXAMPLE), run_name="__main__")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    adata = names["adata"]
    assert adata.n_obs == 120 and "FASN" in adata.var_names
    assert_same_prediction(adata, cli_demo)


def test_predict_in_memory_equals_what_the_cli_writes(api_demo, cli_demo):
    assert_same_prediction(api_demo, cli_demo)
    # and it survives the trip through a file unchanged
    lib = next(iter(api_demo.uns["spatial"]))
    np.testing.assert_array_equal(api_demo.uns["spatial"][lib]["images"]["hires"],
                                  cli_demo.uns["spatial"][lib]["images"]["hires"])
    assert api_demo.uns["mmap"]["command"] == "mmap_deploy.Predictor.predict (Python API)"
    assert cli_demo.uns["mmap"]["command"].startswith("mmap-predict -q --demo -o ")


# -- the Predictor ----------------------------------------------------------------
def test_predictor_is_a_context_manager_and_predicts_many_slides(demo, api_demo):
    with mm.Predictor(threads=1) as predictor:
        assert not predictor.closed and predictor.backend == "onnxruntime"
        assert predictor.genes == list(api_demo.var_names)
        assert predictor.model_path == demo.model
        first = predictor.predict(demo.slide, demo.coords, library_id="first")
        second = predictor.predict(str(demo.slide), str(demo.coords))
    assert predictor.closed and "closed" in repr(predictor)
    assert_same_prediction(first, second)
    assert_same_prediction(first, api_demo)  # threads do not change the numbers
    assert list(first.uns["spatial"]) == ["first"] and list(second.uns["spatial"]) == [demo.slide.stem]
    with pytest.raises(ValueError, match="closed"):
        predictor.predict(demo.slide, demo.coords)
    predictor.close()  # again: nothing happens


def test_close_without_a_with_block(demo):
    predictor = mm.Predictor(model=demo.model, threads=1)
    assert predictor.engines is not None
    predictor.close()
    assert predictor.closed
    with pytest.raises(ValueError, match="closed"), predictor:
        pass


def test_nothing_is_printed_and_notes_go_to_logging(demo, capfd, caplog):
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the demo gives no warning: its EXIF mpp is B4's lattice
        with caplog.at_level(logging.INFO, logger="mmap_deploy"):
            adata = mm.predict(demo.slide, demo.coords, threads=1)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert adata.n_obs == 120
    notes = [r.getMessage() for r in caplog.records if r.name == "mmap_deploy"]
    assert any("using the built-in DEMO model" in n for n in notes), notes
    assert any(n.startswith("engines: ") for n in notes), notes


def test_a_finding_the_run_goes_on_with_is_a_warning(demo, capfd):
    # the EXIF says 0.6876 µm per pixel: 0.65 (5.5% less) is used, with a warning (the lattice's, 0.687, too)
    with pytest.warns(mm.MMAPWarning, match=r"mpp=0\.65 overrides the slide's own 0\.6876"):
        adata = mm.predict(demo.slide, demo.coords, mpp=0.65, threads=1)
    assert adata.uns["mmap"]["mpp"] == 0.65
    assert capfd.readouterr() == ("", "")


# -- errors: the project's exceptions, with the CLI's one-line message ----------------
def _bad_inputs(tmp_path: Path, demo) -> dict[str, tuple[Path, Path, list[str]]]:
    header_only = tmp_path / "empty.csv"
    header_only.write_text("x,y,barcode\n")
    outside = tmp_path / "outside.csv"
    outside.write_text("x,y,barcode\n100,100,a\n90000,100,b\n")
    return {
        "missing coords": (demo.slide, tmp_path / "nope.csv", []),
        "no spots": (demo.slide, header_only, []),
        "missing slide": (tmp_path / "nope.svs", demo.coords, []),
        "spots outside": (demo.slide, outside, []),
        "implausible mpp": (demo.slide, demo.coords, ["--mpp", "500"]),
    }


@pytest.mark.parametrize("case", ["missing coords", "no spots", "missing slide", "spots outside", "implausible mpp"])
def test_bad_input_raises_user_error_with_the_cli_message(tmp_path, demo, case):
    slide, coords, extra = _bad_inputs(tmp_path, demo)[case]
    kwargs = {"mpp": float(extra[1])} if extra else {}
    with pytest.raises(mm.UserError) as info:
        mm.predict(slide, coords, threads=1, **kwargs)
    r = run_cli(slide, coords, "-o", tmp_path / "o.h5ad", *extra, expect=2)
    said = r.stderr.strip().splitlines()[-1]
    # the same line, each option named as its caller writes it: --mpp 0.5 on the command line, mpp=0.5 in Python
    assert said == "error: " + re.sub(r"\bmpp=([^\s,;]*)",
                                      lambda m: "--mpp" + (f" {m.group(1)}" if m.group(1) else ""), str(info.value))
    assert "\n" not in str(info.value) and "--" not in str(info.value)


def test_bad_arguments_are_user_errors(tmp_path, demo):
    with pytest.raises(mm.UserError, match="no spot coordinates given"):
        mm.predict(demo.slide)
    with pytest.raises(mm.UserError, match="^backend='gpu': must be one of auto, onnxruntime, tensorrt$"):
        mm.Predictor(backend="gpu")
    with pytest.raises(mm.UserError, match="^precision='fp8': must be one of"):
        mm.Predictor(precision="fp8")
    with pytest.raises(mm.UserError, match="^threads=-1: must be a whole number, at least 0$"):
        mm.Predictor(threads=-1)
    with pytest.raises(mm.UserError, match="^batch_size=0: must be"):
        mm.Predictor(batch_size=0)
    with pytest.raises(mm.UserError, match="^Predictor.predict\\(\\) got unknown option"):
        mm.Predictor(threads=1).predict(demo.slide, demo.coords, grid_size=3)
    with pytest.raises(mm.BundleError):
        mm.Predictor(model=tmp_path)  # no manifest.json there
    assert issubclass(mm.BundleError, mm.UserError) and issubclass(mm.OutputStorageError, mm.UserError)
    with mm.Predictor(threads=1) as predictor:
        with pytest.raises(mm.UserError, match="cannot contain '/'"):
            predictor.predict(demo.slide, demo.coords, library_id="a/b")
        with pytest.raises(mm.UserError, match="^mpp='fast': must be a number"):
            predictor.predict(demo.slide, demo.coords, mpp="fast")


# -- writing --------------------------------------------------------------------------
def test_write_h5ad_atomically_and_refuse_to_overwrite(tmp_path, api_demo):
    out = mm.write(api_demo, tmp_path / "sub" / "demo.h5ad")
    assert out == tmp_path / "sub" / "demo.h5ad"
    assert_same_prediction(ad.read_h5ad(out), api_demo)
    with pytest.raises(mm.UserError, match="already exists"):
        mm.write(api_demo, out)
    mm.write(api_demo, out, overwrite=True)
    with pytest.raises(mm.UserError, match=r"must end in \.h5ad \(AnnData\) or \.zarr"):
        mm.write(api_demo, tmp_path / "demo.csv")
    assert sorted(p.name for p in (tmp_path / "sub").iterdir()) == ["demo.h5ad"]  # no temporary files


def test_write_zarr(tmp_path, api_demo):
    sd = spatialdata_or_skip()
    out = mm.write(api_demo, tmp_path / "demo.zarr")
    table = sd.read_zarr(out).tables["table"]
    np.testing.assert_array_equal(table.X, api_demo.X)
    np.testing.assert_array_equal(table.obsm["spatial"], api_demo.obsm["spatial"])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo.zarr"]


# -- reading spots ------------------------------------------------------------------
def test_read_spots_of_a_table_and_of_a_space_ranger_folder(tmp_path, demo):
    spots = mm.read_spots(demo.coords)
    assert len(spots) == 120 and list(spots.columns) == ["x", "y", "array_col", "array_row"]
    assert spots.attrs["format"] == "her2st" and spots.attrs["layout"] == "table"
    assert spots.index[0] == f"{int(spots.array_col.iloc[0])}x{int(spots.array_row.iloc[0])}"

    plain = tmp_path / "xy.csv"
    plain.write_text("x,y\n10,20\n30,40.5\n")
    xy = mm.read_spots(plain)
    assert list(xy.index) == ["spot_0", "spot_1"] and list(xy.columns) == ["x", "y"]
    np.testing.assert_array_equal(xy[["x", "y"]].to_numpy(), [[10, 20], [30, 40.5]])

    spatial = tmp_path / "outs" / "spatial"
    spatial.mkdir(parents=True)
    (spatial / "tissue_positions.csv").write_text(
        "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres\n"
        "AAAC-1,1,0,0,100,200\nAAAG-1,0,0,2,100,380\nAATT-1,1,1,1,256,290\n")
    (spatial / "scalefactors_json.json").write_text(
        '{"tissue_hires_scalef": 0.1, "tissue_lowres_scalef": 0.03, "spot_diameter_fullres": 90.0}')
    visium = mm.read_spots(tmp_path / "outs")
    assert list(visium.index) == ["AAAC-1", "AATT-1"]  # in tissue only
    assert visium.attrs["layout"] == "spaceranger-spatial" and visium.attrs["format"] == "visium"
    assert visium.attrs["scalefactors"]["tissue_hires_scalef"] == 0.1
    np.testing.assert_array_equal(visium[["x", "y", "array_col", "array_row"]].to_numpy(),
                                  [[200, 100, 0, 0], [290, 256, 1, 1]])
    assert len(mm.read_spots(tmp_path / "outs", all_spots=True)) == 3

    missing = tmp_path / "missing.csv"
    with pytest.raises(mm.UserError, match="not found"):
        mm.read_spots(missing)


# -- the public names ---------------------------------------------------------------
def test_the_api_page_lists_exactly_the_public_names():
    rows = re.findall(r"^\| `(\w+)` \|", API_PAGE.read_text(), flags=re.MULTILINE)
    assert len(rows) == len(set(rows)), "a name is listed twice"
    assert set(rows) == set(mm.__all__)
    for name in mm.__all__:
        obj = getattr(mm, name)
        assert (obj.__doc__ or "").strip(), f"mm.{name} has no docstring"


def test_public_functions_have_numpydoc_sections_and_type_hints():
    import inspect

    for fn in (mm.Predictor, mm.Predictor.predict, mm.predict, mm.write, mm.read_spots, mm.demo_paths):
        doc = inspect.getdoc(fn)
        assert "Parameters\n----------" in doc or fn is mm.demo_paths, fn
        assert "Returns\n-------" in doc or fn is mm.Predictor, fn
        hints = inspect.signature(fn).parameters
        assert all(p.annotation is not inspect.Parameter.empty for n, p in hints.items() if n != "self"), fn


def test_the_names_load_lazily_and_light():
    """`import mmap_deploy` and its names load no engine, slide reader, AnnData nor numpy until a slide runs."""
    code = ("import sys, mmap_deploy as mm\n"
            "before = 'mmap_deploy.api' in sys.modules\n"
            "mm.Predictor, mm.predict, mm.write, mm.UserError, mm.MMAPWarning\n"
            "heavy = [m for m in ('onnxruntime', 'anndata', 'openslide', 'numpy', 'pandas', 'torch') if m in sys.modules]\n"
            "print(before, heavy, sorted(set(mm.__all__) - set(dir(mm))))\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False [] []"
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        mm.nope  # noqa: B018
