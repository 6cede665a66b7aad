"""One slide end to end: settings, the model, `predict_to_file` (open, check, predict, write).

Shared by `mmap-predict` (cli.py), the local batch (batch.py) and the Ray
workers (cohort_ray.py). Imports only click at start-up; the heavy parts are
imported when a slide runs.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import click

from .. import __version__
from ..errors import UserError

EXIT_USER_ERROR = 2
EXIT_BATCH_FAILED = 1

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
    from ..model.bundle import default_bundle_path, load_bundle

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
    from ..inputs.coords import check_inside, scale_warning
    from ..inputs.geometry import fallback_mpp, fit_lattice
    from ..inputs.layouts import check_spot_geometry, read_spot_input
    from ..inputs.slide import open_slide
    from ..model.prototypes import KMEANS_SEED
    from ..outputs.adata import build_anndata, check_output_path, now_utc, write_gene_plots, write_output
    from .pipeline import predict_slide
    from .storage import check_free_space, output_storage_guard, slide_output_bytes

    t0 = time.perf_counter()
    out = check_output_path(out, settings.overwrite)
    spot_input = read_spot_input(coords_path, all_spots=settings.all_spots)
    spots = spot_input.spots
    lattice = fit_lattice(spots.xy, spots.array_xy, spot_input.lattice)
    with open_slide(slide_path, mpp=mpp, fallback_mpp=fallback_mpp(lattice, spot_input.hd_mpp)) as slide:
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
        from ..inputs.layouts import spatial_scalefactors

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
    from ..engines import GPU_PROVIDERS, default_threads

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

    from ..inputs.slide import PatchReadError
    from ..outputs.adata import THUMBNAIL_MAX_SIDE

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


def _summary_line(result: SlideResult) -> str:
    rate = result.n_spots / result.seconds if result.seconds > 0 else 0.0
    msg = f"wrote {result.output.name}, {result.n_spots} spots, {rate:.1f} spots/s"
    if result.n_dropped:
        msg += f", {result.n_dropped} unreadable spot(s) dropped"
    return msg
