"""`mmap-predict`: predict spatial gene expression for the spots of H&E slides.

    mmap-predict SLIDE COORDS -o OUT.h5ad|OUT.zarr [--model BUNDLE_DIR] [--mpp X] ...
    mmap-predict SLIDE --grid visium|st|NUMum -o OUT.h5ad [--tissue-mask FILE] [--overview] ...
    mmap-predict --demo -o demo.h5ad
    mmap-predict --manifest slides.csv -o OUT_DIR [--format h5ad|zarr] [--shard i/n]
    mmap-predict --list-genes [--model BUNDLE_DIR]

A thin layer over the Python API (api.py). The options are the fields of
`options.Settings`, each declared once there (flag, type, default, help,
checks): this module adds only what picks the run (SLIDE, COORDS, -o,
--demo, --list-genes, --manifest, --ray) and turns the command line into a
frozen `Settings` (`options.from_cli`). A `Predictor` loads the model and its
engines, and each slide runs `run.predict.predict_to_file` (`predict_adata`,
the function behind `Predictor.predict`, then `write_adata`, the one behind
`mmap_deploy.write`). The library raises, warns and logs; this layer turns
that into lines on stderr (`messages.show_on_stderr`) and exit codes.

A mistake in the input is one line `error: ...` on stderr and exit code 2,
with no output file (`messages.run_cli`, as in mmap-train and mmap-export);
anything else is a bug and shows its traceback. This module imports only
click at start-up, so `mmap-predict --help` is instant; onnxruntime, anndata
and openslide are imported when a run needs them.
"""

from __future__ import annotations

import sys
from typing import Any

import click

from ._version import __version__
from .errors import UserError
from .messages import (  # noqa: F401  (the exit codes are re-exported for scripts)
    EXIT_BATCH_FAILED,
    EXIT_OK,
    EXIT_USER_ERROR,
    command_line,
    echo,
    run_cli,
    show_on_stderr,
)
from .options import CLI, Settings, caller, check_options, click_params, from_cli, manifest_columns, spell

HELP = """Predict spatial gene expression for the spots of an H&E slide (MMAP).

    SLIDE is a whole-slide image (SVS, pyramidal TIFF, NDPI, MRXS, ...) or a
    plain JPEG/PNG/TIFF; COORDS the spot centres in full-resolution pixels:
    a Space Ranger outs/ or spatial/ folder, a Visium HD
    binned_outputs/square_NNNum/ folder, Visium tissue_positions(.csv /
    _list.csv / .parquet), her2st *_selection.tsv, or a table with x,y and
    optionally barcode/id. A slide with no spatial assay takes --grid instead
    of COORDS: spots are laid over the tissue found on it. Writes an AnnData
    .h5ad that scanpy and squidpy plot directly, or with -o OUT.zarr the same
    as a SpatialData store.

    Exit codes: 0 done; 2 bad input (one-line error, no output written);
    1 with --manifest when some slides failed (the others are written).
    """

# What picks the run; everything else is an option of `Settings`.
_RUN_PARAMS = ("slide", "coords", "output", "demo", "list_genes", "manifest", "ray_address")


class _Command(click.Command):
    """A click command that keeps the arguments it was given: the run's command line, for the provenance."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["mmap_argv"] = list(args)
        return super().parse_args(ctx, args)


def _command_line() -> str:
    """`mmap-predict ARGS` as given (also through click's test runner, or on a Ray worker: passed down),
    secrets in URLs hidden: it goes into every output's provenance."""
    from .location import redact_text

    ctx = click.get_current_context(silent=True)
    args = ctx.meta.get("mmap_argv") if ctx is not None else None
    return redact_text(command_line("mmap-predict", args))


class _LocationType(click.ParamType):
    """A local path or a URL (s3://, gs://, https://), kept a URL (`location.as_location`)."""

    name = "path"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        from .location import as_location

        try:
            return as_location(value)
        except UserError as e:
            self.fail(str(e), param, ctx)


def _run_params(settings_cls: type) -> list[click.Parameter]:
    path = _LocationType()
    columns = ",".join(manifest_columns(settings_cls))
    return [
        click.Argument(["slide"], required=False, type=path),
        click.Argument(["coords"], required=False, type=path),
        click.Option(["-o", "--output"], type=path,
                     help="Output file: .h5ad (AnnData) or .zarr (SpatialData, needs the [spatialdata] extra). "
                          "With --manifest: an output folder, one file per slide (see --format)."),
        click.Option(["--demo"], is_flag=True, help="Run the built-in her2st sample with the demo model."),
        click.Option(["--list-genes"], is_flag=True, help="Print the genes the model (--model, or the demo model) "
                                                          "predicts, one a line on stdout, and exit."),
        click.Option(["--manifest"], type=path, metavar="FILE",
                     help=f"Batch mode: CSV with columns slide,coords and optional {columns} (paths relative "
                          "to the CSV)."),
        click.Option(["--ray", "ray_address"], is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
                     help="With --manifest: predict the slides on Ray workers (one per GPU, or per group of CPU "
                          "cores). Without ADDRESS a private local Ray is started (127.0.0.1 only); 'auto' or "
                          "HOST:PORT joins a running cluster. Needs pip install 'mmap-deploy[ray]'."),
    ]


def build_command(settings_cls: type = Settings) -> click.Command:
    """`mmap-predict`: the run's own parameters, then one option per field of `settings_cls`."""
    command = _Command("mmap-predict", callback=lambda **values: _main(settings_cls, values),
                       params=_run_params(settings_cls) + click_params(settings_cls), help=HELP,
                       context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
    return click.version_option(__version__, prog_name="mmap-predict")(command)


def _given(values: dict[str, Any]) -> list[str]:
    """The parameters the command line set (a default cannot be told apart from a value equal to it)."""
    from click.core import ParameterSource

    ctx = click.get_current_context()
    return [name for name in values if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)]


def _main(settings_cls: type, values: dict[str, Any]) -> None:
    if values.get("output") is None and not values.get("list_genes"):
        ctx = click.get_current_context()
        param = next(p for p in ctx.command.params if p.name == "output")
        raise click.MissingParameter(ctx=ctx, param=param)  # -o is required, except with --list-genes
    run = {name: values.pop(name) for name in _RUN_PARAMS}
    given = _given(values)
    command = _command_line()

    def body() -> int:
        with caller(CLI), show_on_stderr(echo):
            settings = from_cli(values, given, settings_cls)
            return _run(run, settings, command)

    sys.exit(run_cli(body))


def _check_run(run: dict[str, Any], settings: Settings) -> None:
    """One input mode (SLIDE COORDS, SLIDE --grid, --demo, --manifest), and the options each takes."""
    slide, manifest = run["slide"], run["manifest"]
    if sum([bool(manifest), bool(run["demo"]), slide is not None]) != 1:
        raise UserError("give either SLIDE COORDS, or --demo, or --manifest CSV (exactly one); see mmap-predict --help")
    if run["demo"] and settings.grid is not None:
        raise UserError("--demo runs the sample's own spots; --grid needs a SLIDE (mmap-predict SLIDE --grid ...)")
    if run["ray_address"] is not None and manifest is None:
        raise UserError("--ray only applies with --manifest")
    if run["ray_address"] is None and settings.ray_workers is not None:
        raise UserError("--ray-workers needs --ray")
    check_options(settings, batch=manifest is not None,
                  has_coords=None if manifest is not None or run["demo"] else run["coords"] is not None,
                  coords=run["coords"], slide=slide, output=run["output"])
    if settings.grid is not None:
        from .inputs.grid import parse_grid

        parse_grid(settings.grid)  # a bad --grid is said before anything is loaded
    if run["ray_address"] is not None:
        from .run.batch_ray import import_ray

        import_ray()  # a missing extra is said now, before anything is loaded


def _list_genes(run: dict[str, Any], settings: Settings) -> int:
    """`--list-genes`: the bundle's genes, one a line on stdout (the data; notes stay on stderr)."""
    from .run.predict import load_model

    given = [flag for flag, on in (("SLIDE", run["slide"] is not None), ("--demo", run["demo"]),
                                   ("--manifest", run["manifest"]), ("--plot", settings.plot)) if on]
    if given:
        raise UserError(f"--list-genes only reads the model (--model DIR, or the demo model); drop {', '.join(given)}")
    bundle = load_model(settings.model)
    genes = bundle.manifest.genes
    click.echo("\n".join(genes))
    echo(f"{len(genes)} genes predicted by the model {bundle.root}")
    return EXIT_OK


def _run(run: dict[str, Any], settings: Settings, command: str) -> int:
    """The run the command line asks for; its exit code."""
    from .run.manifest import check_output_dir, check_rows_exist, read_manifest
    from .run.predict import load_model, predict_to_file

    if run["list_genes"]:
        return _list_genes(run, settings)
    _check_run(run, settings)
    manifest, output = run["manifest"], run["output"]
    rows = None
    if manifest is None:
        from .outputs.adata import check_output_path

        check_output_path(output, settings.overwrite)
    else:  # what is cheap to check before loading anything: the manifest, its rows, the output folder
        rows = read_manifest(manifest)
        check_output_dir(output)
        if settings.output_format == "zarr":
            from .outputs.sdata import require_spatialdata

            require_spatialdata(spell("output_format", "zarr"))
        check_rows_exist(manifest, rows, settings.shard)
    slide, coords = run["slide"], run["coords"]
    if run["demo"]:  # the sample's mpp is in its EXIF tags: open_slide finds it (and records the source)
        from .demo import sample_paths

        slide, coords, _ = sample_paths()
    if settings.overview:
        from .outputs.overview import require_matplotlib

        require_matplotlib()
    bundle = load_model(settings.model)
    if settings.plot:
        from .outputs.adata import check_plot_genes

        settings = settings.replace(plot=check_plot_genes(list(settings.plot), bundle.manifest.genes, bundle.root))
    if settings.genes and settings.genes != ("all",):  # the QuPath file's measurements, checked before any work
        from .outputs.gene_names import resolve_names

        settings = settings.replace(genes=resolve_names(list(settings.genes), bundle.manifest.genes, bundle.root,
                                                        flag=spell("genes")))
    if run["ray_address"] is not None:  # the workers load the engines; the driver only hands out slides
        from .run.batch_ray import run_batch_ray

        return run_batch_ray(manifest, rows, output, bundle, settings, command, run["ray_address"])
    from .api import Predictor

    with Predictor._from_settings(bundle, settings, command) as predictor:
        if manifest is not None:
            from .run.batch import run_batch

            return run_batch(manifest, rows, output, bundle, predictor.state, settings)
        result = predict_to_file(slide, coords, output, bundle, predictor.state, settings)
    echo(result.report_line())
    for picture in result.plots:
        echo(f"wrote {picture}")
    return EXIT_OK


main = build_command()


if __name__ == "__main__":  # pragma: no cover
    main()
