"""`mmap-predict`: predict spatial gene expression for the spots of H&E slides.

    mmap-predict SLIDE COORDS -o OUT.h5ad|OUT.zarr [--model BUNDLE_DIR] [--mpp X] ...
    mmap-predict SLIDE --grid visium|st|NUMum -o OUT.h5ad [--tissue-mask FILE] [--overview] ...
    mmap-predict --demo -o demo.h5ad
    mmap-predict --manifest slides.csv -o OUT_DIR [--format h5ad|zarr] [--shard i/n]
    mmap-predict --list-genes [--model BUNDLE_DIR]

A thin layer over the Python API (api.py): the options become a
`RunSettings`, a `Predictor` loads the model and its engines, and each slide
runs `run.predict.predict_to_file` (`predict_adata`, the function behind
`Predictor.predict`, then `write_adata`, the one behind `mmap_deploy.write`).
The library raises, warns and logs; this layer turns that into lines on
stderr (`messages.show_on_stderr`) and exit codes.

A mistake in the input is one line `error: ...` on stderr and exit code 2,
with no output file (`messages.run_cli`, as in mmap-train and mmap-export);
anything else is a bug and shows its traceback. The options arrive by name
as a `PredictOptions`. This
module imports only click at start-up, so `mmap-predict --help` is instant;
onnxruntime, anndata and openslide are imported when a run needs them.
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path
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
from .run.batch import run_batch
from .run.manifest import ManifestRow, check_output_dir, check_rows_exist, parse_shard, read_manifest
from .run.predict import (  # noqa: F401  (re-exported: the names users and scripts import from cli)
    RunSettings,
    SlideResult,
    _report,
    engine_defaults,
    load_model,
    predict_to_file,
)


def _demo_paths() -> tuple[Path, Path, float]:
    try:
        from .demo import sample_paths
    except ImportError:
        sample_paths = None
    if sample_paths is None:
        raise UserError("the demo sample is not installed with this copy of mmap-deploy; run on your own SLIDE COORDS")
    image, coords, mpp = sample_paths()
    return Path(image), Path(coords), float(mpp)


def _parse_genes(value: str | None) -> list[str]:
    if not value:
        return []
    genes = [g.strip() for g in value.split(",") if g.strip()]
    if not genes:
        raise UserError(f"--plot needs gene names separated by commas, got {value!r}")
    return list(dict.fromkeys(genes))


def _grid_options_given() -> list[str]:
    """The --grid-only options with a default that the command line set (a default cannot be told apart)."""
    from click.core import ParameterSource

    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return []
    return [flag for name, flag in (("min_tissue", "--min-tissue"), ("max_spots", "--max-spots"))
            if ctx.get_parameter_source(name) not in (None, ParameterSource.DEFAULT)]


class _Command(click.Command):
    """A click command that keeps the arguments it was given: the run's command line, for the provenance."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        ctx.meta["mmap_argv"] = list(args)
        return super().parse_args(ctx, args)


def _command_line() -> str:
    """`mmap-predict ARGS` as given (also through click's test runner, or on a Ray worker: passed down)."""
    ctx = click.get_current_context(silent=True)
    args = ctx.meta.get("mmap_argv") if ctx is not None else None
    return command_line("mmap-predict", args)


@click.command(cls=_Command, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("slide", required=False, type=click.Path(path_type=Path, dir_okay=True))
@click.argument("coords", required=False, type=click.Path(path_type=Path, dir_okay=True))
@click.option("-o", "--output", type=click.Path(path_type=Path),
              help="Output file: .h5ad (AnnData) or .zarr (SpatialData, needs the [spatialdata] extra). "
                   "With --manifest: an output folder, one file per slide (see --format).")
@click.option("--model", type=click.Path(path_type=Path),
              help="Model bundle directory made by mmap-export. Default: the built-in demo model.")
@click.option("--mpp", type=float, help="Slide resolution in µm per pixel; overrides the slide's metadata.")
@click.option("--backend", type=click.Choice(["auto", "onnxruntime", "tensorrt"]), default="auto",
              show_default=True, help="Inference engine; auto picks the fastest available and says which.")
@click.option("--precision", type=click.Choice(["fp32", "fp16", "int8"]), default="fp32", show_default=True,
              help="Which of the bundle's model files to run.")
@click.option("--batch-size", type=click.IntRange(min=1), default=None,
              help="Spots per engine call (default: 32 on the CPU, 128 on a GPU).")
@click.option("--threads", type=click.IntRange(min=0), default=0, show_default=True,
              help="CPU threads for ONNX Runtime (0: all cores); on the CPU, two encoder batches run at once "
                   "on half of them each.")
@click.option("--all-spots", is_flag=True, help="Keep spots marked outside the tissue (in_tissue/selected = 0).")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.option("--plot", "plot_genes", metavar="GENE[,GENE...]",
              help="Also write a PNG map of each gene over the slide thumbnail (needs matplotlib).")
@click.option("--strict", is_flag=True, help="Fail on an unreadable spot instead of dropping and listing it.")
@click.option("--skip-geometry-checks", is_flag=True,
              help="Run even when the coordinates look wrong for the slide (lattice vs resolution, swapped x/y, "
                   "spots off tissue); the findings become warnings.")
@click.option("--grid", metavar="visium|st|NUMum",
              help="No COORDS: lay spots over the slide's tissue: 'visium' (hexagonal, 100 µm apart, 55 µm "
                   "spots), 'st' (square, 200 µm, 100 µm spots) or square bins of NUM µm (e.g. 16um; 2-1000). "
                   "With --manifest: for the rows whose coords are empty.")
@click.option("--tissue-mask", type=click.Path(path_type=Path, dir_okay=False),
              help="With --grid: the tissue, in place of detection: a binary PNG/TIFF (the slide's aspect ratio, "
                   "any size) or GeoJSON polygons in level-0 pixels (QuPath, TRIDENT).")
@click.option("--min-tissue", type=click.FloatRange(min=0.0, max=1.0, min_open=True), default=0.5,
              show_default=True, help="With --grid: keep a spot when at least this share of its area is tissue.")
@click.option("--max-spots", type=click.IntRange(min=1), default=2_000_000, show_default=True,
              help="With --grid: refuse a grid with more spots than this (a coarser --grid is faster).")
@click.option("--overview", is_flag=True,
              help="Also write OUT.overview.png: the slide's thumbnail, the tissue outline and every spot.")
@click.option("--library-id", help="Key of uns['spatial'] (default: the slide file name without extension).")
@click.option("--demo", is_flag=True, help="Run the built-in her2st sample with the demo model.")
@click.option("--list-genes", is_flag=True,
              help="Print the genes the model (--model, or the demo model) predicts, one a line on stdout, and exit.")
@click.option("--manifest", type=click.Path(path_type=Path, dir_okay=False),
              help="Batch mode: CSV with columns slide,coords and optional mpp,id (paths relative to the CSV).")
@click.option("--shard", metavar="I/N",
              help="With --manifest: run only rows k with k % N == I (I = 0..N-1), e.g. $SLURM_ARRAY_TASK_ID/N.")
@click.option("--ray", "ray_address", is_flag=False, flag_value="local", default=None, metavar="[ADDRESS]",
              help="With --manifest: predict the slides on Ray workers (one per GPU, or per group of CPU cores). "
                   "Without ADDRESS a private local Ray is started (127.0.0.1 only); 'auto' or HOST:PORT joins a "
                   "running cluster. Needs pip install 'mmap-deploy[ray]'.")
@click.option("--ray-workers", type=click.IntRange(min=1), default=None,
              help="With --ray: how many workers (default: one per GPU; without GPUs one per 8 cores of a node, "
                   "or per --threads cores).")
@click.option("--format", "output_format", type=click.Choice(["h5ad", "zarr"]),
              help="With --manifest: write each slide as {id}.h5ad (default) or {id}.zarr (SpatialData).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bar.")
@click.version_option(__version__, prog_name="mmap-predict")
def main(**options: Any) -> None:
    """Predict spatial gene expression for the spots of an H&E slide (MMAP).

    SLIDE is a whole-slide image (SVS, pyramidal TIFF, NDPI, MRXS, ...) or a
    plain JPEG/PNG/TIFF; COORDS the spot centres in full-resolution pixels:
    a Space Ranger outs/ or spatial/ folder, a Visium HD
    binned_outputs/square_NNNum/ folder, Visium tissue_positions(.csv /
    _list.csv / .parquet), her2st *_selection.tsv, or a table with x,y and
    optionally barcode/id. A slide with no spatial assay takes --grid instead
    of COORDS: spots are laid over the tissue found on it. Writes an AnnData .h5ad that scanpy and squidpy
    plot directly, or with -o OUT.zarr the same as a
    SpatialData store.

    Exit codes: 0 done; 2 bad input (one-line error, no output written);
    1 with --manifest when some slides failed (the others are written).
    """
    if options.get("output") is None and not options.get("list_genes"):
        ctx = click.get_current_context()
        param = next(p for p in ctx.command.params if p.name == "output")
        raise click.MissingParameter(ctx=ctx, param=param)  # -o is required, except with --list-genes
    opts = PredictOptions(**options)

    def body() -> int:
        with show_on_stderr(echo):
            return _run(opts)

    sys.exit(run_cli(body))


@dataclass(frozen=True)
class PredictOptions:
    """mmap-predict's command line, by name (the parameters of `main`)."""

    output: Path | None
    slide: Path | None = None
    coords: Path | None = None
    model: Path | None = None
    mpp: float | None = None
    backend: str = "auto"
    precision: str = "fp32"
    batch_size: int | None = None
    threads: int = 0
    all_spots: bool = False
    overwrite: bool = False
    plot_genes: str | None = None
    strict: bool = False
    skip_geometry_checks: bool = False
    grid: str | None = None
    tissue_mask: Path | None = None
    min_tissue: float = 0.5
    max_spots: int = 2_000_000
    overview: bool = False
    library_id: str | None = None
    demo: bool = False
    list_genes: bool = False
    manifest: Path | None = None
    shard: str | None = None
    ray_address: str | None = None
    ray_workers: int | None = None
    output_format: str | None = None
    quiet: bool = False

    def settings(self) -> RunSettings:
        """What every slide of the run shares."""
        return RunSettings(backend=self.backend, precision=self.precision, batch_size=self.batch_size or 0,
                           threads=self.threads, all_spots=self.all_spots, overwrite=self.overwrite,
                           strict=self.strict, plot=_parse_genes(self.plot_genes), progress=not self.quiet,
                           output_format=self.output_format or "h5ad",
                           skip_geometry_checks=self.skip_geometry_checks, command=_command_line(), grid=self.grid,
                           tissue_mask=self.tissue_mask, min_tissue=self.min_tissue, max_spots=self.max_spots,
                           overview=self.overview)


def _check_inputs(o: PredictOptions) -> None:
    """One input mode (SLIDE COORDS, SLIDE --grid, --demo, --manifest), and the --grid options with it."""
    modes = sum([bool(o.manifest), bool(o.demo), o.slide is not None])
    if modes != 1:
        raise UserError(
            "give either SLIDE COORDS, or --demo, or --manifest CSV (exactly one); see mmap-predict --help"
        )
    if o.slide is not None and o.coords is None and o.grid is None:
        raise UserError(f"missing COORDS after SLIDE {o.slide}: the spot coordinates file (or, for a slide with "
                        "no spatial assay, --grid visium|st|NUMum to lay spots over its tissue)")
    if o.slide is not None and o.coords is not None and o.grid is not None:
        raise UserError(f"give COORDS or --grid, not both: drop {o.coords} to lay a {o.grid} grid over the tissue, "
                        "or drop --grid to predict at the given spots")
    if o.demo and o.grid is not None:
        raise UserError("--demo runs the sample's own spots; --grid needs a SLIDE (mmap-predict SLIDE --grid ...)")
    if o.tissue_mask is not None and o.grid is None:
        raise UserError(f"--tissue-mask {o.tissue_mask} only applies with --grid (it says where to lay the spots)")
    if o.grid is None and _grid_options_given():
        given = _grid_options_given()
        raise UserError(f"{' and '.join(given)} only appl{'ies' if len(given) == 1 else 'y'} with --grid, "
                        "to the spots it lays over the tissue")
    if o.grid is not None:
        from .inputs.grid import parse_grid

        parse_grid(o.grid)  # a bad --grid is said before anything is loaded
    if o.tissue_mask is not None and not o.tissue_mask.is_file():
        raise UserError(f"--tissue-mask {o.tissue_mask}: file not found; give a PNG/TIFF mask or a GeoJSON file")


def _check_batch_options(o: PredictOptions) -> None:
    """The options that only a batch (--manifest, --shard, --ray, --format) or only one slide takes."""
    if o.shard is not None and o.manifest is None:
        raise UserError("--shard only applies with --manifest")
    if (o.ray_address is not None or o.ray_workers is not None) and o.manifest is None:
        raise UserError("--ray and --ray-workers only apply with --manifest")
    if o.ray_address is None and o.ray_workers is not None:
        raise UserError("--ray-workers needs --ray")
    if o.ray_address is not None:
        from .run.batch_ray import import_ray

        import_ray()  # a missing extra is said now, before anything is loaded
    if o.output_format is not None and o.manifest is None:
        raise UserError("--format only applies with --manifest; for one slide, -o's suffix (.h5ad or .zarr) decides")
    if o.manifest is not None and (o.mpp is not None or o.library_id):
        raise UserError("with --manifest, give mpp and id per slide in the manifest's mpp and id columns")
    if o.library_id is not None and "/" in o.library_id:
        # a key of uns['spatial']: HDF5 and zarr read a '/' as a sub-group
        raise UserError(f"--library-id {o.library_id!r}: cannot contain '/'; use letters, digits, - and _")


def _check_outputs(o: PredictOptions, settings: RunSettings) -> list[ManifestRow] | None:
    """What is cheap to check before loading anything: the output path, or the manifest and its folder."""
    if o.manifest is None:
        from .outputs.adata import check_output_path

        check_output_path(o.output, o.overwrite)
        return None
    rows = read_manifest(o.manifest)
    check_output_dir(o.output)
    if settings.output_format == "zarr":
        from .outputs.sdata import require_spatialdata

        require_spatialdata("--format zarr")
    return rows


def _list_genes(o: PredictOptions) -> int:
    """`--list-genes`: the bundle's genes, one a line on stdout (the data; notes stay on stderr)."""
    given = [flag for flag, on in (("SLIDE", o.slide is not None), ("--demo", o.demo), ("--manifest", o.manifest),
                                   ("--plot", o.plot_genes)) if on]
    if given:
        raise UserError(f"--list-genes only reads the model (--model DIR, or the demo model); drop {', '.join(given)}")
    bundle = load_model(o.model)
    genes = bundle.manifest.genes
    click.echo("\n".join(genes))
    echo(f"{len(genes)} genes predicted by the model {bundle.root}")
    return EXIT_OK


def _run(o: PredictOptions) -> int:
    """The run the options ask for; its exit code."""
    if o.list_genes:
        return _list_genes(o)
    _check_inputs(o)
    _check_batch_options(o)
    settings = o.settings()
    shard = parse_shard(o.shard)
    rows = _check_outputs(o, settings)
    if rows is not None:
        check_rows_exist(o.manifest, rows, shard)
    slide, coords = o.slide, o.coords
    if o.demo:
        # the sample's mpp is in its EXIF tags: open_slide finds it (and records the source)
        slide, coords, _ = _demo_paths()
    if o.overview:
        from .outputs.overview import require_matplotlib

        require_matplotlib()
    bundle = load_model(o.model)
    if settings.plot:
        from .outputs.adata import check_plot_genes

        settings.plot = check_plot_genes(settings.plot, bundle.manifest.genes, bundle.root)
    if o.ray_address is not None:  # the workers load the engines; the driver only hands out slides
        from .run.batch_ray import run_batch_ray

        return run_batch_ray(o.manifest, rows, o.output, bundle, settings, shard, o.ray_address, o.ray_workers)
    from .api import Predictor

    with Predictor._with_settings(bundle, settings) as predictor:
        if o.manifest is not None:
            return run_batch(o.manifest, rows, o.output, bundle, predictor.engines, settings, shard)
        result = predict_to_file(slide, coords, o.output, bundle, predictor.engines, settings, mpp=o.mpp,
                                 library_id=o.library_id)
    _report(result)
    return EXIT_OK


if __name__ == "__main__":  # pragma: no cover
    main()
