"""Each mmap-predict option is declared once (`options.Settings`): the command line, the Python API and the
batch manifest are made from that declaration; the settings are frozen; the cross-checks are one function
that the CLI, the API and the batch share, and messages spell an option as its caller does."""

from __future__ import annotations

import dataclasses
import inspect

import pytest
from click.testing import CliRunner
from conftest import run_cli

import mmap_deploy as mm
from mmap_deploy.cli import build_command
from mmap_deploy.options import (
    API,
    CLI,
    SLIDE,
    Number,
    Settings,
    caller,
    check_options,
    click_params,
    manifest_columns,
    option,
    option_fields,
    settings_from_api,
    spell,
)
from mmap_deploy.run.manifest import read_manifest


@dataclasses.dataclass(frozen=True)
class _Knobbed(Settings):
    """The settings with one more option, declared in one place."""

    dummy_knob: int = option(3, Number(low=1, whole=True), "A test option (a whole number, at least 1).", SLIDE,
                             column="knob")


# -- one declaration reaches the CLI, the API and the manifest ---------------------------------------------
def test_a_dummy_option_declared_once_reaches_the_cli(tiny_bundle, tmp_path):
    cli = build_command(_Knobbed)
    r = CliRunner().invoke(cli, ["--help"])
    assert r.exit_code == 0 and "--dummy-knob N" in r.output and "A test option" in r.output
    r = CliRunner().invoke(cli, ["--demo", "--model", str(tiny_bundle), "-o", str(tmp_path / "a.h5ad"),
                                 "--dummy-knob", "0", "-q"])
    assert r.exit_code == 2 and r.stderr.strip().splitlines()[-1] == "error: --dummy-knob 0: must be a whole " \
                                                                      "number, at least 1"
    r = CliRunner().invoke(cli, ["--demo", "--model", str(tiny_bundle), "-o", str(tmp_path / "a.h5ad"),
                                 "--dummy-knob", "5", "-q"])
    assert r.exit_code == 0, r.stderr
    assert "--dummy-knob" not in CliRunner().invoke(build_command(), ["--help"]).output  # only where declared


def test_a_dummy_option_declared_once_reaches_the_api(tiny_bundle):
    settings = settings_from_api({"dummy_knob": 7}, (SLIDE,), "Predictor.predict", base=_Knobbed())
    assert settings.dummy_knob == 7 and "dummy_knob" in settings.given
    with pytest.raises(mm.UserError, match=r"^dummy_knob=2\.5: must be a whole number, at least 1$"):
        settings_from_api({"dummy_knob": 2.5}, (SLIDE,), "Predictor.predict", base=_Knobbed())
    with pytest.raises(mm.UserError, match="got unknown option"):  # the plain settings do not have it
        settings_from_api({"dummy_knob": 7}, (SLIDE,), "Predictor.predict", base=Settings())
    demo = mm.demo_paths()
    from mmap_deploy.model.bundle import load_bundle

    with mm.Predictor._from_settings(load_bundle(tiny_bundle), _Knobbed(threads=1), "test") as predictor:
        adata = predictor.predict(demo.slide, demo.coords, dummy_knob=4)  # taken by Predictor.predict
        assert adata.n_obs == 120
        with pytest.raises(mm.UserError, match="got unknown option"):
            predictor.predict(demo.slide, demo.coords, dumy_knob=4)


def test_a_dummy_option_declared_once_reaches_the_manifest(tmp_path):
    assert manifest_columns(_Knobbed) == {"mpp": "mpp", "id": "library_id", "knob": "dummy_knob"}
    m = tmp_path / "slides.csv"
    m.write_text("slide,coords,knob\na.png,a.csv,4\nb.png,b.csv,\n")
    rows = read_manifest(m, _Knobbed)
    assert rows[0].values["dummy_knob"] == 4 and "dummy_knob" not in rows[1].values
    m.write_text("slide,coords,knob\na.png,a.csv,0.5\n")
    with pytest.raises(mm.UserError, match=r"slides\.csv: line 2: knob '0\.5': must be a whole number, at least 1$"):
        read_manifest(m, _Knobbed)
    m.write_text("slide,coords,knob\na.png,a.csv,4\n")
    with pytest.raises(mm.UserError, match=r"unknown column\(s\) knob; the header must be slide,coords with "
                                           r"optional mpp,id$"):
        read_manifest(m)


def test_every_option_has_a_flag_or_a_reason_and_the_api_signatures_come_from_the_declarations():
    flags = {p.opts[-1] for p in click_params()}
    for f in option_fields():
        assert f.metadata["option"].help, f.name
    assert {"--mpp", "--grid", "--tissue-mask", "--min-tissue", "--max-spots", "--format", "--quiet"} <= flags
    predict_params = inspect.signature(mm.Predictor.predict).parameters
    declared = [f.name for f in option_fields() if f.metadata["option"].scope == SLIDE]
    assert list(predict_params)[3:] == declared
    assert all(predict_params[n].default == Settings.__dataclass_fields__[n].default for n in declared)
    assert "min_tissue" in mm.Predictor.predict.__doc__ and "{options}" not in mm.Predictor.predict.__doc__


# -- frozen settings and one default ---------------------------------------------------------------------
def test_settings_are_frozen_and_replace_checks_the_new_values():
    s = Settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.batch_size = 8  # type: ignore[misc]
    t = s.replace(batch_size=8)
    assert (s.batch_size, t.batch_size, t.given) == (None, 8, frozenset({"batch_size"}))
    with pytest.raises(mm.UserError, match="^batch_size=0: must be a whole number, at least 1$"):
        s.replace(batch_size=0)
    from mmap_deploy.inputs.grid import DEFAULT_MAX_SPOTS, DEFAULT_MIN_TISSUE

    assert (DEFAULT_MIN_TISSUE, DEFAULT_MAX_SPOTS) == (Settings.min_tissue, Settings.max_spots)  # one default


def test_the_run_state_holds_what_the_run_chose_and_the_settings_do_not_change(tiny_bundle):
    from mmap_deploy.model.bundle import load_bundle
    from mmap_deploy.run.predict import open_run

    settings = Settings(threads=1)
    with open_run(load_bundle(tiny_bundle), settings, "test") as state:
        assert state.batch_size == 32 and state.read_workers == 1  # chosen for the CPU engines
        assert "batch size 32" in state.engines_note
    assert settings == Settings(threads=1) and settings.batch_size is None


# -- bad values: UserError, never ValueError or silent truncation ------------------------------------------
@pytest.mark.parametrize("name, value, message", [
    ("min_tissue", "abc", "min_tissue='abc': must be a number, above 0 and at most 1"),
    ("min_tissue", 0, "min_tissue=0: must be a number, above 0 and at most 1"),
    ("max_spots", 2.5, "max_spots=2.5: must be a whole number, at least 1"),
    ("max_spots", True, "max_spots=True: must be a whole number, at least 1"),
    ("max_spots", "1e3", "max_spots='1e3': must be a whole number, at least 1"),
    ("mpp", float("nan"), "mpp=nan: must be a number, above 0 (µm per pixel)"),
    ("all_spots", "yes", "all_spots='yes': must be True or False"),
    ("library_id", "a/b", "library_id='a/b': cannot contain '/'"),
])
def test_bad_values_are_one_line_user_errors(name, value, message):
    with pytest.raises(mm.UserError) as info:
        settings_from_api({name: value}, (SLIDE,), "Predictor.predict")
    assert message in str(info.value) and "\n" not in str(info.value)
    assert settings_from_api({"max_spots": 2.0}, (SLIDE,), "x").max_spots == 2  # a whole float is a whole number


# -- the cross-checks: the API refuses what the CLI refuses, each in its own spelling ---------------------
CROSS = [
    ({"tissue_mask": "m.png"}, True, "--tissue-mask only applies with --grid", "tissue_mask= only applies with grid="),
    ({"min_tissue": 0.3, "max_spots": 10}, True, "--min-tissue and --max-spots only apply with --grid",
     "min_tissue= and max_spots= only apply with grid="),
    ({"grid": "visium"}, True, "give spot coordinates or --grid visium, not both",
     "give spot coordinates or grid='visium', not both"),
    ({}, False, "no spot coordinates given: pass COORDS", "no spot coordinates given: pass coords"),
]


@pytest.mark.parametrize("options, has_coords, cli_says, api_says", CROSS)
def test_one_cross_check_for_the_cli_and_the_api(options, has_coords, cli_says, api_says, tmp_path):
    (tmp_path / "m.png").write_bytes(b"")
    options = {k: (str(tmp_path / v) if k == "tissue_mask" else v) for k, v in options.items()}
    with caller(CLI):
        cli = Settings().replace(**options)
        with pytest.raises(mm.UserError, match=cli_says):
            check_options(cli, has_coords=has_coords, coords="c.csv", slide="s.tif")
    api = settings_from_api(options, (SLIDE,), "Predictor.predict")
    with pytest.raises(mm.UserError, match=api_says.replace("(", r"\(")):
        check_options(api, has_coords=has_coords, coords="c.csv", slide="s.tif")


def test_the_api_and_the_cli_refuse_a_mask_without_grid_with_the_same_line(tmp_path):
    demo = mm.demo_paths()
    mask = tmp_path / "mask.png"
    mask.write_bytes(b"\x89PNG")
    with pytest.raises(mm.UserError) as api:
        mm.predict(demo.slide, demo.coords, tissue_mask=mask, threads=1)
    r = run_cli(demo.slide, demo.coords, "-o", tmp_path / "o.h5ad", "--tissue-mask", mask, expect=2)
    said = r.stderr.strip().splitlines()[-1]
    assert said == "error: --tissue-mask only applies with --grid (to the spots it lays over the tissue)"
    assert str(api.value) == "tissue_mask= only applies with grid= (to the spots it lays over the tissue)"
    with pytest.raises(mm.UserError, match="give tissue= or tissue_mask=, not both"):
        mm.make_grid(demo.slide, "visium", tissue=mm.detect_tissue(demo.slide), tissue_mask=mask)
    assert not (tmp_path / "o.h5ad").exists()


def test_batch_options_outside_a_batch_and_per_slide_flags_inside_one():
    with caller(CLI):
        with pytest.raises(mm.UserError, match="^--shard only applies with --manifest$"):
            check_options(Settings().replace(shard="0/2"))
        with pytest.raises(mm.UserError, match="^with --manifest, give --mpp per slide in the manifest's mpp column"):
            check_options(Settings().replace(mpp=0.5), batch=True)
        check_options(Settings().replace(grid="visium"), batch=True, has_coords=True)  # the grid is for other rows


def test_messages_name_the_flag_for_the_cli_and_the_parameter_for_the_api():
    assert spell("min_tissue", 0.3) == "min_tissue=0.3" and spell("mpp") == "mpp="
    with caller(CLI):
        assert spell("min_tissue", 0.3) == "--min-tissue 0.3" and spell("output_format") == "--format"
    with caller(API):
        assert spell("grid", "visium") == "grid='visium'"
