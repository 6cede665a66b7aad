"""`mmap-predict`: predict spatial gene expression for the spots of H&E slides.

    mmap-predict SLIDE COORDS -o OUT.h5ad|OUT.zarr [--model BUNDLE_DIR] [--mpp X] ...
    mmap-predict --demo -o demo.h5ad
    mmap-predict --manifest slides.csv -o OUT_DIR [--format h5ad|zarr] [--shard i/n]

A mistake in the input is one line `error: ...` on stderr and exit code 2,
with no output file; anything else is a bug and shows its traceback. This
module imports only click at start-up, so `mmap-predict --help` is instant;
onnxruntime, anndata and openslide are imported when a run needs them.
"""

from __future__ import annotations

import csv
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click

from . import __version__
from .errors import UserError

EXIT_USER_ERROR = 2
EXIT_BATCH_FAILED = 1
MANIFEST_COLUMNS = ("slide", "coords")
MANIFEST_OPTIONAL = ("mpp", "id")


def _echo(msg: str) -> None:
    click.echo(msg, err=True)


@dataclass
class RunSettings:
    """What every slide of one invocation shares."""

    backend: str = "auto"
    precision: str = "fp32"
    batch_size: int = 0  # 0: chosen for the engines (see engine_defaults)
    read_workers: int = 2
    threads: int = 0
    all_spots: bool = False
    overwrite: bool = False
    strict: bool = False
    plot: list[str] = field(default_factory=list)
    progress: bool = True
    engines_note: str = ""  # the `engines:` line, said once a slide's inputs have passed their checks
    output_format: str = "h5ad"  # with --manifest: each slide's file is {id}.h5ad or {id}.zarr
    skip_geometry_checks: bool = False


@dataclass
class SlideResult:
    output: Path
    n_spots: int
    n_dropped: int
    seconds: float
    timings: dict[str, float]
    plots: list[Path]


def load_model(model: Path | None) -> Any:
    """The bundle from --model, or the demo bundle (said plainly on stderr)."""
    from .bundle import default_bundle_path, load_bundle

    if model is None:
        path = default_bundle_path()
        if not (path / "manifest.json").is_file():
            raise UserError(
                f"no --model given and the demo bundle is not installed ({path}); "
                "pass --model DIR with a bundle made by mmap-export"
            )
        bundle = load_bundle(path)
        _echo(
            f"note: no --model given: using the built-in DEMO model ({path}); it is a tiny model for "
            "trying the tool, not for real predictions; pass --model DIR for a real bundle"
        )
        return bundle
    bundle = load_bundle(model)
    if bundle.manifest.demo:
        _echo(f"note: {model} is a DEMO model (its manifest says so); do not use its predictions for research")
    return bundle


def predict_to_file(slide_path: Path, coords_path: Path, out: Path, bundle: Any, engines: Any,
                    settings: RunSettings, *, mpp: float | None = None, library_id: str | None = None,
                    mpp_origin: str = "--mpp", spot_progress: Callable[[int], Any] | None = None) -> SlideResult:
    """One slide end to end: open, read coords, predict, write the .h5ad or .zarr (and plots).

    `mpp_origin` names where a given `mpp` came from, for the provenance
    (`--mpp`, or the batch manifest's mpp column); `spot_progress(n)` is
    told of every n spots done (a cluster-wide progress bar).
    """
    from .coords import check_inside, scale_warning
    from .geometry import fit_lattice
    from .layouts import check_spot_geometry, read_spot_input
    from .output import build_anndata, check_output_path, now_utc, write_gene_plots, write_output
    from .pipeline import predict_slide
    from .prototypes import KMEANS_SEED
    from .slide import open_slide
    from .storage import check_free_space, output_storage_guard, slide_output_bytes

    t0 = time.perf_counter()
    out = check_output_path(out, settings.overwrite)
    spot_input = read_spot_input(coords_path, all_spots=settings.all_spots)
    spots = spot_input.spots
    lattice = fit_lattice(spots.xy, spots.array_xy, spot_input.lattice)
    fallback = (lattice.mpp, lattice.source()) if lattice is not None else None
    if fallback is None and spot_input.hd_mpp:
        fallback = (spot_input.hd_mpp, "scalefactors_json.json microns_per_pixel")
    with open_slide(slide_path, mpp=mpp, fallback_mpp=fallback) as slide:
        check_inside(spots, slide.width, slide.height, coords_path, slide_path)
        # a full output folder is found now, not after the whole slide has run
        need = slide_output_bytes(len(spots), bundle.manifest, slide.width, slide.height, len(settings.plot),
                                  zarr=out.suffix == ".zarr")
        check_free_space(out.parent, need, out.name)
        warning = scale_warning(spots, slide.width, slide.height)
        if warning:
            _echo(f"warning: {coords_path}: {warning}")
        mpp_warning = slide.mpp_warning() if hasattr(slide, "mpp_warning") else None
        if mpp_warning:
            _echo(f"warning: {mpp_warning}")
        mpp_source = mpp_origin if slide.mpp_source == "--mpp" else str(slide.mpp_source)
        sr_images, qc = check_spot_geometry(spot_input, lattice, slide, bundle.manifest.view.patch_um, coords_path,
                                            mpp_source, settings.skip_geometry_checks, warn=_echo)
        if settings.engines_note:
            _echo(settings.engines_note)
            settings.engines_note = ""
        t_open = time.perf_counter() - t0
        library_id = library_id or slide_path.stem
        from concurrent.futures import ThreadPoolExecutor

        from tqdm import tqdm

        # The thumbnail (seconds for a 90 Mpx JPEG) is made while the engines run;
        # Space Ranger's own hires image, when it fits the slide, takes its place.
        with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmap-thumbnail") as background:
            thumb_job = background.submit(_thumbnail, slide) if "hires" not in sr_images else None
            with tqdm(total=len(spots), unit="spot", desc=slide_path.name, file=sys.stderr,
                      disable=not settings.progress, leave=False, dynamic_ncols=True) as bar:
                def on_spots(n: int) -> None:
                    bar.update(n)
                    if spot_progress is not None:
                        spot_progress(n)

                pred = predict_slide(
                    slide, spots, bundle, engines, batch_size=settings.batch_size,
                    read_workers=settings.read_workers, strict=settings.strict, progress=on_spots,
                )
            t = time.perf_counter()
            if thumb_job is not None:
                thumb, scale, thumb_note, t_thumb = thumb_job.result()
            else:
                hires = sr_images["hires"]
                thumb, scale, t_thumb = hires, spot_input.scalefactors["tissue_hires_scalef"], 0.0
                thumb_note = f"Space Ranger's tissue_hires_image.png ({hires.shape[1]}x{hires.shape[0]} px)"
            t_thumb_wait = time.perf_counter() - t
        m = bundle.manifest
        provenance = {
            "project": "mmap-deploy",
            "project_version": __version__,
            "created_at": now_utc(),
            "command": " ".join(["mmap-predict"] + sys.argv[1:]),
            "library_id": library_id,
            "slide": str(slide_path),
            "slide_format": str(slide.format),
            "slide_width": int(slide.width),
            "slide_height": int(slide.height),
            "mpp": float(slide.mpp),
            "mpp_source": mpp_source,
            "coords": str(coords_path),
            "coords_format": str(spots.source_format),
            "coords_layout": spot_input.layout,
            "qc": qc,
            "all_spots": bool(settings.all_spots),
            "bundle": str(bundle.root),
            "bundle_sha256": bundle.sha256(),
            "bundle_demo": bool(m.demo),
            "backbone": m.backbone,
            "model_mpp": float(m.view.mpp),
            "patch_um": float(m.view.patch_um),
            "input_size": int(m.view.input_size),
            "backend": engines.plan.backend,
            "providers": ",".join(engines.encoder.providers),
            "precision": engines.encoder.precision,
            "batch_size": int(settings.batch_size),
            "threads": int(settings.threads),
            "strict": bool(settings.strict),
            "kmeans_seed": int(KMEANS_SEED),
            "thumbnail": thumb_note,
        }
        pred.timings["open"] = round(t_open, 4)
        pred.timings["thumbnail"] = round(t_thumb, 4)
        pred.timings["thumbnail_wait"] = round(t_thumb_wait, 4)
        from .layouts import spatial_scalefactors

        adata = build_anndata(pred, thumb, scale, library_id=library_id, slide_mpp=slide.mpp,
                              patch_um=m.view.patch_um, provenance=provenance, spatial_images=sr_images,
                              spatial_scalefactors=spatial_scalefactors(spot_input, sr_images))
    t = time.perf_counter()
    with output_storage_guard(out.parent, need, out.name):
        write_output(adata, out, overwrite=settings.overwrite)
        plots = write_gene_plots(adata, settings.plot, out, library_id) if settings.plot else []
    timings = dict(pred.timings, write=round(time.perf_counter() - t, 4))
    seconds = time.perf_counter() - t0
    timings["wall"] = round(seconds, 4)
    return SlideResult(out, len(pred.spot_ids), len(pred.dropped), seconds, timings, plots)


def engine_defaults(engines: Any, settings: RunSettings) -> RunSettings:
    """Batch size and reader threads for the engines that were picked.

    On the CPU the engine and the patch readers share the cores: 32 spots a
    batch, at most 4 readers. On a GPU the cores are free for reading, and
    bigger batches keep the GPU busy: 128 spots, a reader per core but one,
    at most 8 (on a 16-core H200 machine, 8 readers made 3 166 patches/s and
    16 read fewer; see benchmarks/RESULTS.md).
    """
    from .engines import GPU_PROVIDERS, default_threads

    cores = settings.threads or default_threads()
    on_gpu = engines.encoder.name == "tensorrt" or any(p in GPU_PROVIDERS for p in engines.encoder.providers)
    settings.batch_size = settings.batch_size or (128 if on_gpu else 32)
    settings.read_workers = max(1, min(8, cores - 1)) if on_gpu else max(1, min(4, cores))
    return settings


def _thumbnail(slide: Any) -> tuple[Any, float, str, float]:
    """The hires image, its scale, a note, and the seconds it took.

    A damaged region must not cost the predictions, so this degrades step by
    step: a smaller thumbnail (a coarser pyramid level), then a blank image.
    """
    import numpy as np

    from .output import THUMBNAIL_MAX_SIDE
    from .slide import PatchReadError

    t = time.perf_counter()
    for side in (THUMBNAIL_MAX_SIDE, 500):
        try:
            image, scale = slide.thumbnail(side)
            return image, scale, f"longest side {max(image.shape[:2])} px", time.perf_counter() - t
        except PatchReadError as e:
            reason = str(e)
    _echo(f"warning: {reason}; the output's hires image is left blank")
    scale = min(1.0, THUMBNAIL_MAX_SIDE / max(slide.width, slide.height))
    shape = (max(1, round(slide.height * scale)), max(1, round(slide.width * scale)), 3)
    note = f"blank: the slide could not be read for it ({reason})"
    return np.full(shape, 255, np.uint8), scale, note, time.perf_counter() - t


def _report(result: SlideResult) -> None:
    rate = result.n_spots / result.seconds if result.seconds > 0 else 0.0
    msg = f"wrote {result.output}: {result.n_spots} spots in {result.seconds:.1f} s ({rate:.1f} spots/s)"
    if result.n_dropped:
        msg += f"; {result.n_dropped} unreadable spot(s) dropped (listed in uns['mmap']['dropped_spots'])"
    _echo(msg)
    for p in result.plots:
        _echo(f"wrote {p}")


def parse_shard(value: str | None) -> tuple[int, int] | None:
    """'i/n' -> (i, n) with 0 <= i < n."""
    if value is None:
        return None
    try:
        i_s, n_s = value.split("/")
        i, n = int(i_s), int(n_s)
    except ValueError:
        raise UserError(f"--shard must look like i/n (e.g. 0/4), got {value!r}") from None
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--shard {value}: need 0 <= i < n (shards are numbered 0 to n-1)")
    return i, n


@dataclass
class ManifestRow:
    line: int
    slide: Path
    coords: Path
    mpp: float | None
    name: str


def read_manifest(path: Path) -> list[ManifestRow]:
    """The batch manifest CSV: columns slide, coords, optional mpp and id; paths relative to the CSV."""
    import math

    if not path.is_file():
        raise UserError(f"{path}: manifest file not found; check the --manifest path")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file; the manifest must be a CSV with columns slide,coords") from None
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if not header or not any(h.strip() for h in header):
        raise UserError(f"{path}: empty manifest; it needs a header line 'slide,coords[,mpp][,id]' and one row per slide")
    header = [h.strip().lower() for h in header]
    missing = [c for c in MANIFEST_COLUMNS if c not in header]
    unknown = [c for c in header if c not in MANIFEST_COLUMNS + MANIFEST_OPTIONAL]
    if missing or unknown or len(set(header)) != len(header):
        what = []
        if missing:
            what.append(f"missing column(s) {', '.join(missing)}")
        if unknown:
            what.append(f"unknown column(s) {', '.join(unknown)}")
        if len(set(header)) != len(header):
            what.append("a repeated column")
        raise UserError(f"{path}: line 1: {'; '.join(what)}; the header must be slide,coords with optional mpp,id")
    rows: list[ManifestRow] = []
    names: dict[str, int] = {}
    base = path.parent
    for line_no, values in enumerate(reader, start=2):
        if not values or all(not v.strip() for v in values):
            continue
        if len(values) != len(header):
            raise UserError(f"{path}: line {line_no}: {len(values)} fields, the header has {len(header)}")
        rec = {h: v.strip() for h, v in zip(header, values)}
        if not rec["slide"] or not rec["coords"]:
            raise UserError(f"{path}: line {line_no}: empty slide or coords path")
        mpp = None
        if rec.get("mpp"):
            try:
                mpp = float(rec["mpp"])
            except ValueError:
                mpp = math.nan
            if not math.isfinite(mpp) or mpp <= 0:
                raise UserError(f"{path}: line {line_no}: mpp {rec['mpp']!r} is not a positive number (µm per pixel)")
        slide = Path(rec["slide"]).expanduser()
        coords = Path(rec["coords"]).expanduser()
        slide = slide if slide.is_absolute() else base / slide
        coords = coords if coords.is_absolute() else base / coords
        name = rec.get("id") or slide.stem
        if any(c in name for c in "/\\") or name in (".", ".."):
            raise UserError(f"{path}: line {line_no}: id {name!r} cannot be a file name; use letters, digits, - and _")
        if name in names:
            raise UserError(
                f"{path}: line {line_no}: output name {name!r} is already used on line {names[name]}; "
                "give the slides distinct 'id' values"
            )
        names[name] = line_no
        rows.append(ManifestRow(line_no, slide, coords, mpp, name))
    if not rows:
        raise UserError(f"{path}: the manifest lists no slides; add one row per slide under the header")
    return rows


def check_output_dir(out_dir: Path) -> None:
    if out_dir.suffix in (".h5ad", ".zarr") or (out_dir.exists() and not out_dir.is_dir()):
        raise UserError(f"{out_dir}: with --manifest, -o is an output folder (one .h5ad per slide, "
                        "or one .zarr with --format zarr)")


def run_batch(manifest: Path, rows: list[ManifestRow], out_dir: Path, bundle: Any, engines: Any,
              settings: RunSettings, shard: tuple[int, int] | None) -> int:
    """Every slide of the manifest's `rows` (or of one shard); returns the exit code."""
    check_output_dir(out_dir)
    if shard is not None:
        i, n = shard
        rows = [r for k, r in enumerate(rows) if k % n == i]
    from .claims import new_run_id
    from .cohort import STOP, BatchTally, predict_row
    from .storage import make_output_dir

    make_output_dir(out_dir)

    run_id, tally = new_run_id(), BatchTally(len(rows))
    for k, row in enumerate(rows, start=1):
        out = out_dir / f"{row.name}.{settings.output_format}"
        prefix = f"[{k}/{len(rows)}] {row.name}"
        if out.exists() and not settings.overwrite:
            tally.skipped.append(row.name)
            _echo(f"{prefix}: skipped, {out} exists (pass --overwrite to redo it)")
            continue
        outcome = predict_row(row, out, bundle, engines, settings, manifest_name=manifest.name, run_id=run_id)
        tally.add(row, outcome)
        echo_outcome(prefix, outcome)
        if outcome.status == STOP:
            tally.not_started = len(rows) - k
            break
    shard_txt = f" (shard {shard[0]}/{shard[1]})" if shard else ""
    for line in tally.summary_lines(manifest, shard_txt):
        _echo(line)
    return EXIT_BATCH_FAILED if tally.failed else 0


def echo_outcome(prefix: str, outcome: Any, echo: Callable[[str], None] = _echo) -> None:
    """One slide's line of a batch (a bug's traceback first)."""
    if outcome.traceback:
        echo(f"{prefix}: internal error; traceback follows")
        echo(outcome.traceback.rstrip())
    elif outcome.status in ("failed", "stop"):
        echo(f"{prefix}: error: {outcome.message}")
    else:
        echo(f"{prefix}: {'skipped, ' if outcome.status == 'claimed' else ''}{outcome.message}")


def _summary_line(result: SlideResult) -> str:
    rate = result.n_spots / result.seconds if result.seconds > 0 else 0.0
    msg = f"wrote {result.output.name}, {result.n_spots} spots, {rate:.1f} spots/s"
    if result.n_dropped:
        msg += f", {result.n_dropped} unreadable spot(s) dropped"
    return msg


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


@click.command(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.argument("slide", required=False, type=click.Path(path_type=Path, dir_okay=True))
@click.argument("coords", required=False, type=click.Path(path_type=Path, dir_okay=True))
@click.option("-o", "--output", required=True, type=click.Path(path_type=Path),
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
              help="CPU threads for ONNX Runtime (0: all cores).")
@click.option("--all-spots", is_flag=True, help="Keep spots marked outside the tissue (in_tissue/selected = 0).")
@click.option("--overwrite", is_flag=True, help="Replace existing output files.")
@click.option("--plot", "plot_genes", metavar="GENE[,GENE...]",
              help="Also write a PNG map of each gene over the slide thumbnail (needs matplotlib).")
@click.option("--strict", is_flag=True, help="Fail on an unreadable spot instead of dropping and listing it.")
@click.option("--skip-geometry-checks", is_flag=True,
              help="Run even when the coordinates look wrong for the slide (lattice vs resolution, swapped x/y, "
                   "spots off tissue); the findings become warnings.")
@click.option("--library-id", help="Key of uns['spatial'] (default: the slide file name without extension).")
@click.option("--demo", is_flag=True, help="Run the built-in her2st sample with the demo model.")
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
def main(slide: Path | None, coords: Path | None, output: Path, model: Path | None, mpp: float | None,
         backend: str, precision: str, batch_size: int | None, threads: int, all_spots: bool, overwrite: bool,
         plot_genes: str | None, strict: bool, skip_geometry_checks: bool, library_id: str | None, demo: bool,
         manifest: Path | None, shard: str | None, ray_address: str | None, ray_workers: int | None,
         output_format: str | None, quiet: bool) -> None:
    """Predict spatial gene expression for the spots of an H&E slide (MMAP).

    SLIDE is a whole-slide image (SVS, pyramidal TIFF, NDPI, MRXS, ...) or a
    plain JPEG/PNG/TIFF; COORDS the spot centres in full-resolution pixels:
    a Space Ranger outs/ or spatial/ folder, a Visium HD
    binned_outputs/square_NNNum/ folder, Visium tissue_positions(.csv /
    _list.csv / .parquet), her2st *_selection.tsv, or a table with x,y and
    optionally barcode/id. Writes an AnnData .h5ad that scanpy and squidpy
    plot directly, or with -o OUT.zarr the same as a
    SpatialData store.

    Exit codes: 0 done; 2 bad input (one-line error, no output written);
    1 with --manifest when some slides failed (the others are written).
    """
    try:
        code = _main(slide, coords, output, model, mpp, backend, precision, batch_size, threads, all_spots,
                     overwrite, plot_genes, strict, library_id, demo, manifest, shard, quiet,
                     ray_address=ray_address, ray_workers=ray_workers, output_format=output_format,
                     skip_geometry_checks=skip_geometry_checks)
    except UserError as e:
        _echo(f"error: {e}")
        sys.exit(EXIT_USER_ERROR)
    sys.exit(code)


def _main(slide, coords, output, model, mpp, backend, precision, batch_size, threads, all_spots, overwrite,
          plot_genes, strict, library_id, demo, manifest, shard, quiet, *, ray_address=None, ray_workers=None,
          output_format=None, skip_geometry_checks=False) -> int:
    modes = sum([bool(manifest), bool(demo), slide is not None])
    if modes != 1:
        raise UserError(
            "give either SLIDE COORDS, or --demo, or --manifest CSV (exactly one); see mmap-predict --help"
        )
    if slide is not None and coords is None:
        raise UserError(f"missing COORDS after SLIDE {slide}: the spot coordinates file")
    if shard is not None and manifest is None:
        raise UserError("--shard only applies with --manifest")
    if (ray_address is not None or ray_workers is not None) and manifest is None:
        raise UserError("--ray and --ray-workers only apply with --manifest")
    if ray_address is None and ray_workers is not None:
        raise UserError("--ray-workers needs --ray")
    if ray_address is not None:
        from .cohort_ray import import_ray

        import_ray()  # a missing extra is said now, before anything is loaded
    if output_format is not None and manifest is None:
        raise UserError("--format only applies with --manifest; for one slide, -o's suffix (.h5ad or .zarr) decides")
    if manifest is not None and (mpp is not None or library_id):
        raise UserError("with --manifest, give mpp and id per slide in the manifest's mpp and id columns")
    if library_id is not None and "/" in library_id:
        # a key of uns['spatial']: HDF5 and zarr read a '/' as a sub-group
        raise UserError(f"--library-id {library_id!r}: cannot contain '/'; use letters, digits, - and _")
    settings = RunSettings(backend=backend, precision=precision, batch_size=batch_size or 0, threads=threads,
                           all_spots=all_spots, overwrite=overwrite, strict=strict,
                           plot=_parse_genes(plot_genes), progress=not quiet,
                           output_format=output_format or "h5ad", skip_geometry_checks=skip_geometry_checks)
    shard_ix = parse_shard(shard)
    # check what is cheap to check before loading anything
    if manifest is None:
        from .output import check_output_path

        check_output_path(output, overwrite)
    else:
        rows = read_manifest(manifest)
        check_output_dir(output)
        if settings.output_format == "zarr":
            from .spatialdata_out import require_spatialdata

            require_spatialdata("--format zarr")
    if demo:
        # the sample's mpp is in its EXIF tags: open_slide finds it (and records the source)
        slide, coords, _ = _demo_paths()
    bundle = load_model(model)
    if settings.plot:
        from .output import check_plot_genes

        check_plot_genes(settings.plot, bundle.manifest.genes, bundle.root)
    if ray_address is not None:  # the workers load the engines; the driver only hands out slides
        from .cohort_ray import run_batch_ray

        return run_batch_ray(manifest, rows, output, bundle, settings, shard_ix, ray_address, ray_workers)
    from .engines import open_engines

    with open_engines(backend, bundle, precision, threads=threads) as engines:
        engine_defaults(engines, settings)
        settings.engines_note = (f"engines: {engines.plan.reason}; providers: {', '.join(engines.encoder.providers)}; "
                                 f"batch size {settings.batch_size}, {settings.read_workers} patch reader thread(s)")
        if manifest is not None:
            return run_batch(manifest, rows, output, bundle, engines, settings, shard_ix)
        result = predict_to_file(slide, coords, output, bundle, engines, settings, mpp=mpp, library_id=library_id)
    _report(result)
    return 0


if __name__ == "__main__":  # pragma: no cover
    main()
