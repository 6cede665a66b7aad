"""One slide end to end: the model, the run's state, `predict_adata` (open, check, predict) and `write_adata`.

Shared by the Python API (api.py), `mmap-predict` (cli.py), the local batch
(batch.py) and the Ray workers (batch_ray.py): `predict_to_file` is
`predict_adata` followed by `write_adata`. The settings are the frozen
`options.Settings`; what a run learns (its engines, the batch size chosen for
them) is its `RunState`. Nothing here prints: warnings go through
`warnings`, notes through `logging` (see `messages`); the CLI shows them. The
heavy parts are imported when a slide runs.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from .._version import __version__
from ..errors import UserError
from ..location import Location, as_location, io_totals
from ..messages import info, note, warn
from ..options import Settings, spell

if TYPE_CHECKING:  # pragma: no cover
    import anndata
    import numpy as np

    from ..engines import Engines
    from ..inputs.geometry import LatticeFit
    from ..inputs.grid import Grid
    from ..inputs.layouts import SpotInput
    from ..inputs.slide import SlideReader
    from ..inputs.tissue import Tissue
    from ..model.bundle import Bundle
    from ..outputs.prediction import SlidePrediction


@dataclass
class SlideResult:
    output: Path
    n_spots: int
    n_dropped: int
    seconds: float
    timings: dict[str, float]
    plots: list[Path]
    mpp: float = 0.0  # the resolution the run used, µm per pixel
    mpp_source: str = ""  # where it came from: a metadata key, --mpp, the manifest's mpp column, the spot lattice
    engine: str = ""  # backend, execution provider and precision, e.g. "onnxruntime (CPUExecutionProvider, fp32)"

    def resolution_text(self) -> str:
        """`0.500 µm/px from SOURCE`: the resolution used and its source (empty when not known)."""
        return f"{self.mpp:.3f} µm/px from {self.mpp_source}" if self.mpp > 0 else ""

    def _details(self) -> list[str]:
        """What both lines say after the spots: the resolution and its source, the engine."""
        return ([self.resolution_text()] if self.mpp > 0 else []) + ([f"engine {self.engine}"] if self.engine else [])

    def report_line(self) -> str:
        """The run's line: output, spots, time, the resolution and its source, the engine, dropped spots."""
        rate = self.n_spots / self.seconds if self.seconds > 0 else 0.0
        parts = [f"wrote {self.output}: {self.n_spots} spots in {self.seconds:.1f} s ({rate:.1f} spots/s)",
                 *self._details()]
        if self.n_dropped:
            parts.append(f"{self.n_dropped} unreadable spot(s) dropped (listed in uns['mmap']['dropped_spots'])")
        return "; ".join(parts)

    def summary_line(self) -> str:
        """A batch row's line: the same facts, shorter."""
        rate = self.n_spots / self.seconds if self.seconds > 0 else 0.0
        parts = [f"wrote {self.output.name}", f"{self.n_spots} spots", f"{rate:.1f} spots/s", *self._details()]
        if self.n_dropped:
            parts.append(f"{self.n_dropped} unreadable spot(s) dropped")
        return ", ".join(parts)


def load_model(model: Path | None) -> Bundle:
    """The bundle from `model`, or the demo bundle (said plainly, in a note: see `messages`)."""
    from ..model.bundle import default_bundle_path, load_bundle

    if model is None:
        path = default_bundle_path()
        if not (path / "manifest.json").is_file():
            raise UserError(
                f"no {spell('model')} given and the demo bundle is not installed ({path}); "
                f"pass {spell('model', 'DIR')} with a bundle made by mmap-export"
            )
        bundle = load_bundle(path)
        note(
            f"no {spell('model')} given: using the built-in DEMO model ({path}); it is a tiny model for "
            f"trying the tool, not for real predictions; pass {spell('model', 'DIR')} for a real bundle"
        )
        return bundle
    bundle = load_bundle(model)
    if bundle.manifest.demo:
        note(f"{model} is a DEMO model (its manifest says so); do not use its predictions for research")
    return bundle


@dataclass
class SpotSource:
    """The spots of one slide and what came with them: the input's layout and images, the lattice fit.

    For a grid (no coords), `grid` and `tissue` are the lattice laid and the tissue it was laid on.
    """

    spot_input: SpotInput  # spots, layout, scale factors, Space Ranger's images
    lattice: LatticeFit | None  # None when the input has no array indices
    label: Path  # what messages name as the spots' source (the COORDS path, or the slide for a grid)
    grid: Grid | None = None
    tissue: Tissue | None = None
    timings: dict[str, float] = field(default_factory=dict)


def open_spots(slide_path: Location, coords: Location | None, settings: Settings) -> tuple[SlideReader, SpotSource]:
    """The slide, opened, and its spots: the one place where the spot source is resolved.

    With `coords` (a table, or a Space Ranger / Visium HD folder) the spots are
    read from it; their lattice, when the input has array indices, gives the
    slide a fallback resolution. Without, `settings.grid` lays a grid over the
    slide's tissue (`settings.tissue_mask`, else detected); `options.check_options`
    has made sure that one of the two is there. The caller closes the slide.
    """
    from ..inputs.geometry import fallback_mpp, fit_lattice
    from ..inputs.layouts import read_spot_input, swapped_arguments_problem
    from ..inputs.slide import open_slide

    if coords is None:
        return _grid_spots(slide_path, settings)
    coords = as_location(coords)
    swapped = swapped_arguments_problem(slide_path, coords)
    if swapped:
        raise UserError(swapped)
    spot_input = read_spot_input(coords, all_spots=settings.all_spots)
    lattice = fit_lattice(spot_input.spots.xy, spot_input.spots.array_xy, spot_input.lattice)
    slide = open_slide(slide_path, mpp=settings.mpp, fallback_mpp=fallback_mpp(lattice, spot_input.hd_mpp),
                       reader=settings.reader)
    return slide, SpotSource(spot_input, lattice, coords)


def _grid_spots(slide_path: Location, settings: Settings) -> tuple[SlideReader, SpotSource]:
    """Open the slide, find its tissue (or read the user's mask), lay the grid over it."""
    from ..inputs.geometry import fit_lattice
    from ..inputs.grid import grid_over_tissue, parse_grid
    from ..inputs.layouts import SpotInput
    from ..inputs.slide import NoResolutionError, open_slide
    from ..inputs.tissue import tissue_for

    spec = parse_grid(settings.grid)
    try:
        slide = open_slide(slide_path, mpp=settings.mpp, reader=settings.reader)
    except NoResolutionError as e:
        raise NoResolutionError(f"{e} ({spell('grid')} lays its spots in µm: it cannot without the slide's "
                                "scale)") from None
    try:
        t = time.perf_counter()
        tissue = tissue_for(slide, settings.tissue_mask)
        t_tissue = time.perf_counter() - t
        t = time.perf_counter()
        grid = grid_over_tissue(spec, slide, tissue, min_tissue=settings.min_tissue, max_spots=settings.max_spots)
        spots = grid.to_spots()
        t_grid = time.perf_counter() - t
        lattice = fit_lattice(spots.xy, spots.array_xy, spec.lattice)
    except BaseException:
        slide.close()
        raise
    spot_input = SpotInput(spots=spots, layout=f"grid-{spec.name}", table=slide_path, lattice=spec.lattice)
    return slide, SpotSource(spot_input, lattice, slide_path, grid=grid, tissue=tissue,
                             timings={"tissue": round(t_tissue, 4), "grid": round(t_grid, 4)})


@dataclass
class SlideRun:
    """One slide predicted, in memory: the AnnData and what writing it needs to know."""

    adata: anndata.AnnData
    library_id: str
    n_spots: int
    n_dropped: int
    timings: dict[str, float]
    need: int  # bytes its output takes (0 when no output was named)
    t0: float  # when the slide's run began (time.perf_counter)


def predict_adata(slide_path: str | Location, coords_path: str | Location | None, bundle: Bundle, state: RunState,
                  settings: Settings, *, mpp_origin: str | None = None,
                  spot_progress: Callable[[int], Any] | None = None, out: Path | None = None,
                  t0: float | None = None) -> SlideRun:
    """One slide to an AnnData in memory: open, read the spots, check, predict, assemble.

    What `mmap-predict`, the local batch, the Ray workers and the Python API
    (`mmap_deploy.Predictor.predict`) all run, after `options.check_options`.
    `mpp_origin` names where `settings.mpp` came from, for the provenance
    (default: the option as the caller spells it; a batch names the manifest's
    mpp column); `spot_progress(n)` is told of every n spots done (a
    cluster-wide progress bar). With `out`, its folder's free space is checked
    against the output's size before any patch is read. Warnings go through
    `warnings` (`MMAPWarning`), notes through `logging`.
    """
    from ..inputs.layouts import spatial_scalefactors
    from ..outputs.adata import build_anndata

    t0 = time.perf_counter() if t0 is None else t0
    io_before = io_totals()  # remote bytes and requests of this slide (one slide at a time per process)
    slide_path = as_location(slide_path)
    mpp_origin = mpp_origin or spell("mpp")
    slide, source = open_spots(slide_path, coords_path, settings)
    with slide:
        checked = _check_slide(slide, slide_path, source, bundle, settings, out=out, mpp_origin=mpp_origin)
        state.say_engines_once()
        t_open = time.perf_counter() - t0
        library_id = settings.library_id or slide_path.stem
        pred, thumb = _predict_with_thumbnail(slide, slide_path.name, source, checked.sr_images, bundle, state,
                                              settings, spot_progress)
        provenance = _provenance(slide, slide_path, source, checked, bundle, state, settings, library_id, thumb.note)
        pred.timings.update(source.timings)
        spot_tissue = _spot_tissue(slide, pred.timings) if source.grid is None else None
        pred.timings["open"] = round(t_open, 4)
        remote = io_totals() - io_before
        if remote.requests:
            pred.timings.update(remote.timings())
        pred.timings["thumbnail"] = round(thumb.seconds, 4)
        pred.timings["thumbnail_wait"] = round(thumb.wait, 4)
        adata = build_anndata(pred, thumb.image, thumb.scale, library_id=library_id, slide_mpp=slide.mpp,
                              patch_um=bundle.manifest.view.patch_um, provenance=provenance,
                              spatial_images=checked.sr_images,
                              spatial_scalefactors=spatial_scalefactors(source.spot_input, checked.sr_images))
        if source.grid is not None:
            from ..outputs.tissue_out import annotate_grid

            annotate_grid(adata, source.grid, source.tissue, library_id)
        else:
            from ..outputs.tissue_out import annotate_spot_tissue

            annotate_spot_tissue(adata, spot_tissue[0], library_id, spot_tissue[1])
    return SlideRun(adata, library_id, len(pred.spot_ids), len(pred.dropped), dict(pred.timings), checked.need, t0)


def _spot_tissue(slide: SlideReader, timings: dict[str, float]) -> tuple[Tissue | None, str]:
    """The slide's tissue (`detect_tissue`, a coarse level) for a COORDS run's `tissue_fraction`, and a note.

    Never fails the run: no tissue found is `Tissue.empty` (every fraction 0); a slide that cannot
    be read for it gives None (the column is NaN) and a warning. Its time goes to `timings['tissue']`.
    """
    from ..inputs.slide import PatchReadError
    from ..inputs.tissue import NoTissueError, Tissue, detect_tissue

    t = time.perf_counter()
    tissue: Tissue | None
    try:
        tissue, why = detect_tissue(slide), ""
    except NoTissueError as e:
        tissue, why = Tissue.empty(slide), f"no tissue found: {e}"
    except (PatchReadError, OSError, UserError) as e:
        tissue, why = None, f"tissue detection failed: {e}"
        warn(f"{slide.path}: no tissue_fraction ({why}); obs['tissue_fraction'] is NaN")
    timings["tissue"] = round(time.perf_counter() - t, 4)
    return tissue, why


@dataclass
class _Checked:
    """What the checks of one slide found: the output's size, the mpp's source, Space Ranger's images, the QC."""

    need: int
    mpp_source: str
    sr_images: dict[str, Any]
    qc: dict[str, Any]


def _check_slide(slide: SlideReader, slide_path: Path, source: SpotSource, bundle: Bundle, settings: Settings, *,
                 out: Path | None, mpp_origin: str) -> _Checked:
    """The spots against the slide, the output folder's room, the resolution and the spot geometry."""
    from ..inputs.coords import check_inside, scale_warning
    from ..inputs.layouts import check_spot_geometry
    from ..inputs.slide import GIVEN_MPP
    from .storage import check_free_space, geojson_output_bytes, slide_output_bytes

    spots, label = source.spot_input.spots, source.label
    check_inside(spots, slide.width, slide.height, label, slide_path)
    need = 0
    if out is not None:  # a full output folder is found now, not after the whole slide has run
        if out.suffix == ".geojson":
            need = geojson_output_bytes(len(spots), _geojson_genes(geojson_options(settings)["genes"],
                                                                   len(bundle.manifest.genes)))
        else:
            need = slide_output_bytes(len(spots), bundle.manifest, slide.width, slide.height,
                                      len(settings.plot) + int(settings.overview), zarr=out.suffix == ".zarr")
        check_free_space(out.parent, need, out.name)
    # A grid is laid on the slide's own pixels: its spots crowd into a corner only where the tissue does.
    warning = scale_warning(spots, slide.width, slide.height) if source.grid is None else None
    if warning:
        warn(f"{label}: {warning}")
    mpp_warning = slide.mpp_warning()
    if mpp_warning:
        warn(mpp_warning)
    mpp_source = mpp_origin if slide.mpp_source == GIVEN_MPP else str(slide.mpp_source)
    if source.grid is None:
        sr_images, qc = check_spot_geometry(source.spot_input, source.lattice, slide, bundle.manifest.view.patch_um,
                                            label, mpp_source, settings.skip_geometry_checks)
    else:  # the grid was laid here, on the slide's own scale: nothing to check against
        sr_images, qc = {}, {"geometry": f"grid laid by mmap-predict ({source.grid.spec.name})",
                             **({"lattice": source.lattice.record()} if source.lattice is not None else {})}
    return _Checked(need, mpp_source, sr_images, qc)


@dataclass
class _Thumbnail:
    image: np.ndarray  # RGB uint8
    scale: float
    note: str
    seconds: float  # making it
    wait: float  # waiting for it once the engines were done


def _predict_with_thumbnail(slide: SlideReader, desc: str, source: SpotSource, sr_images: dict[str, Any],
                            bundle: Bundle, state: RunState, settings: Settings,
                            spot_progress: Callable[[int], Any] | None) -> tuple[SlidePrediction, _Thumbnail]:
    """The slide's predictions (`pipeline.predict_slide`), with the thumbnail made while the engines run.

    The thumbnail takes seconds for a 90 Mpx JPEG; Space Ranger's own hires
    image, when it fits the slide, takes its place.
    """
    from concurrent.futures import ThreadPoolExecutor

    from ..messages import progress
    from .pipeline import predict_slide

    spots = source.spot_input.spots
    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="mmap-thumbnail") as background:
        thumb_job = background.submit(_thumbnail, slide) if "hires" not in sr_images else None
        with progress(len(spots), desc, settings.progress, unit="spot", leave=False, file=sys.stderr) as bar:
            def on_spots(n: int) -> None:
                bar.update(n)
                if spot_progress is not None:
                    spot_progress(n)

            pred = predict_slide(
                slide, spots, bundle, state.engines, batch_size=state.batch_size,
                read_workers=state.read_workers, strict=settings.strict, progress=on_spots,
            )
        t = time.perf_counter()
        if thumb_job is not None:
            thumb, scale, thumb_note, t_thumb = thumb_job.result()
        else:
            hires = sr_images["hires"]
            thumb, scale, t_thumb = hires, source.spot_input.scalefactors["tissue_hires_scalef"], 0.0
            thumb_note = f"Space Ranger's tissue_hires_image.png ({hires.shape[1]}x{hires.shape[0]} px)"
        return pred, _Thumbnail(thumb, scale, thumb_note, t_thumb, time.perf_counter() - t)


def _provenance(slide: SlideReader, slide_path: Path, source: SpotSource, checked: _Checked, bundle: Bundle,
                state: RunState, settings: Settings, library_id: str, thumbnail_note: str) -> dict[str, Any]:
    """`uns['mmap']`'s record of the run: versions, inputs, checks, model, engines."""
    from ..model.prototypes import KMEANS_SEED
    from ..outputs.adata import now_utc

    m, spot_input, engines = bundle.manifest, source.spot_input, state.engines
    return {
        "project": "mmap-deploy",
        "project_version": __version__,
        "created_at": now_utc(),
        "command": state.command,
        "library_id": library_id,
        "slide": str(slide_path),
        "slide_format": str(slide.format),
        "slide_reader": {"backend": str(slide.backend), "reason": str(slide.reason)},
        "slide_width": int(slide.width),
        "slide_height": int(slide.height),
        "mpp": float(slide.mpp),
        "mpp_source": checked.mpp_source,
        "coords": str(source.label),
        "coords_format": str(spot_input.spots.source_format),
        "coords_layout": spot_input.layout,
        "qc": checked.qc,
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
        "batch_size": int(state.batch_size),
        "threads": int(settings.threads),
        "strict": bool(settings.strict),
        "kmeans_seed": int(KMEANS_SEED),
        # the bundle's smoothing over each spot's neighbours (pipeline.predict_slide); absent: none
        **({"neighbour_radius_um": float(m.neighbours.radius_um), "neighbour_weight": float(m.neighbours.weight)}
           if m.neighbours is not None else {}),
        "thumbnail": thumbnail_note,
    }


def write_adata(adata: anndata.AnnData, out: Path, *, overwrite: bool = False, need: int | None = None,
                plot: list[str] | tuple[str, ...] | None = None, library_id: str | None = None,
                overview: bool = False, genes: list[str] | str | None = None,
                classify_by: str | None = "tissue_id") -> list[Path]:
    """Write one slide's AnnData to `out` (.h5ad, SpatialData for .zarr, QuPath detections for .geojson)
    atomically, and its `plot` maps.

    What `mmap-predict` and `mmap_deploy.write` both run. A full or
    unwritable folder is one line (`OutputStorageError`) and leaves nothing
    behind; `need` is the output's expected size in bytes (estimated from
    `adata` when not given). With `overview`, the overview picture (thumbnail,
    tissue outline, spots) is written beside it. `genes` and `classify_by` choose a
    `.geojson`'s measurements and classes (`outputs.geojson.write_geojson`).
    Returns the PNGs written.
    """
    from ..outputs.adata import check_output_path, write_gene_plots, write_output
    from .storage import output_storage_guard

    out = check_output_path(out, overwrite)
    if overview:
        from ..outputs.overview import require_matplotlib

        require_matplotlib()  # said before the output is written, not after
    if need is None and out.suffix == ".geojson":
        from .storage import geojson_output_bytes

        need = geojson_output_bytes(adata.n_obs, _geojson_genes(genes, adata.n_vars))
    elif need is None:
        need = _expected_bytes(adata, zarr=out.suffix == ".zarr", n_plots=len(plot or []) + int(overview))
    with output_storage_guard(out.parent, need, out.name):
        write_output(adata, out, overwrite=overwrite, genes=genes, classify_by=classify_by)
        if not plot and not overview:
            return []
        if library_id is None:
            library_id = next(iter(adata.uns["spatial"]))
        pictures = write_gene_plots(adata, plot, out, library_id) if plot else []
        if overview:
            from ..outputs.overview import overview_path, overview_title, write_overview

            pictures.append(write_overview(adata, overview_path(out), library_id, overview_title(adata)))
        return pictures


def geojson_options(settings: Settings) -> dict[str, Any]:
    """What a .geojson output takes from the settings: `genes` (None: the default choice; `all`) and
    `classify_by`."""
    genes = settings.genes
    return {"genes": "all" if genes == ("all",) else (list(genes) if genes else None),
            "classify_by": settings.classify_by}


def _geojson_genes(genes: list[str] | str | None, n_genes: int) -> int:
    """How many gene measurements a .geojson gets (`genes` as `geojson_options` gives it): `all`, the genes
    named, or the default choice."""
    from ..outputs.geojson import DEFAULT_N_GENES

    if genes == "all":
        return n_genes
    return len(genes) if genes else min(DEFAULT_N_GENES, n_genes)


def _expected_bytes(adata: anndata.AnnData, *, zarr: bool, n_plots: int) -> int:
    """`storage.expected_output_bytes` for an AnnData made by `predict_adata` (or one like it)."""
    from .storage import expected_output_bytes

    shape = (0, 0)
    for lib in (adata.uns.get("spatial") or {}).values():
        hires = (lib.get("images") or {}).get("hires") if isinstance(lib, dict) else None
        if hires is not None:
            shape = tuple(hires.shape[:2])
    embedding = adata.obsm.get("mmap_embedding")
    embed_dim = embedding.shape[1] if embedding is not None else 0
    return expected_output_bytes(adata.n_obs, adata.n_vars, embed_dim, shape, n_plots, zarr)


def predict_to_file(slide_path: Path, coords_path: Path | None, out: Path, bundle: Bundle, state: RunState,
                    settings: Settings, *, mpp_origin: str | None = None,
                    spot_progress: Callable[[int], Any] | None = None) -> SlideResult:
    """One slide end to end: `predict_adata`, then `write_adata` (the .h5ad or .zarr, and the plots).

    The output path is checked before anything is read, its folder's free
    space before any patch is (see `predict_adata`).
    """
    from ..outputs.adata import check_output_path

    t0 = time.perf_counter()
    out = check_output_path(out, settings.overwrite)
    run = predict_adata(slide_path, coords_path, bundle, state, settings, mpp_origin=mpp_origin,
                        spot_progress=spot_progress, out=out, t0=t0)
    t = time.perf_counter()
    plots = write_adata(run.adata, out, overwrite=settings.overwrite, need=run.need, plot=settings.plot,
                        library_id=run.library_id, overview=settings.overview, **geojson_options(settings))
    timings = dict(run.timings, write=round(time.perf_counter() - t, 4))
    seconds = time.perf_counter() - t0
    timings["wall"] = round(seconds, 4)
    record = run.adata.uns.get("mmap", {})
    return SlideResult(out, run.n_spots, run.n_dropped, seconds, timings, plots, mpp=float(record.get("mpp", 0.0)),
                       mpp_source=str(record.get("mpp_source", "")), engine=_engine_text(record))


def _engine_text(record: dict[str, Any]) -> str:
    """`backend (first provider, precision)` from a run's `uns['mmap']`."""
    backend = str(record.get("backend", ""))
    if not backend:
        return ""
    provider = str(record.get("providers", "")).split(",")[0]
    detail = ", ".join(x for x in (provider, str(record.get("precision", ""))) if x)
    return f"{backend} ({detail})" if detail else backend


def engine_defaults(engines: Engines, batch_size: int | None, threads: int) -> tuple[int, int]:
    """(batch size, patch reader threads) for the engines that were picked; a given `batch_size` wins.

    On the CPU the engine and the patch readers share the cores: 32 spots a
    batch, at most 4 readers. On a GPU the cores are free for reading, and
    bigger batches keep the GPU busy: 128 spots, a reader per core but one,
    at most 8 (past 8 threads, the GIL and memory traffic slow reading down;
    figures in benchmarks/RESULTS.md).
    """
    from ..engines import GPU_PROVIDERS, default_threads

    cores = threads or default_threads()
    on_gpu = engines.encoder.name == "tensorrt" or any(p in GPU_PROVIDERS for p in engines.encoder.providers)
    readers = max(1, min(8, cores - 1)) if on_gpu else max(1, min(4, cores))
    return batch_size or (128 if on_gpu else 32), readers


@dataclass
class RunState:
    """What a run learns as it goes: the engines picked, the batch size and reader threads chosen for them.

    Made once per run (`open_run`) from the frozen `Settings`; shared by its
    slides. `command` is what started the run, for the provenance. The
    `engines:` line is said once, by the first slide whose inputs pass their
    checks (`say_engines_once`). A context manager: leaving it closes the engines.
    """

    engines: Engines
    batch_size: int
    read_workers: int
    command: str
    engines_note: str
    _said: bool = False

    def say_engines_once(self) -> None:
        if not self._said:
            self._said = True
            info(self.engines_note)

    def close(self) -> None:
        self.engines.close()

    def __enter__(self) -> RunState:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def open_run(bundle: Bundle, settings: Settings, command: str, *, read_workers: int | None = None) -> RunState:
    """The bundle's engines for `settings` (backend, precision, threads), loaded once for many slides,
    and the batch size and reader threads chosen for them (`engine_defaults`; `read_workers` overrides
    the latter). The caller closes it (or uses it as a context manager)."""
    from ..engines import open_engines

    engines = open_engines(settings.backend, bundle, settings.precision, threads=settings.threads)
    try:
        batch_size, readers = engine_defaults(engines, settings.batch_size, settings.threads)
        readers = read_workers or readers
        line = (f"engines: {engines.plan.reason}; providers: {', '.join(engines.encoder.providers)}; "
                f"batch size {batch_size}, {readers} patch reader thread(s)")
        return RunState(engines, batch_size, readers, command, line)
    except BaseException:
        engines.close()
        raise


def _thumbnail(slide: SlideReader) -> tuple[np.ndarray, float, str, float]:
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
    warn(f"{reason}; the output's hires image is left blank")
    scale = min(1.0, THUMBNAIL_MAX_SIDE / max(slide.width, slide.height))
    shape = (max(1, round(slide.height * scale)), max(1, round(slide.width * scale)), 3)
    note = f"blank: the slide could not be read for it ({reason})"
    return np.full(shape, 255, np.uint8), scale, note, time.perf_counter() - t
