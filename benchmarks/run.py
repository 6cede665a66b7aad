"""Latency and throughput benchmarks of MMAP deployment, measured side by side.

    python benchmarks/run.py --suite cpu --json benchmarks/results/cpu.json
    python benchmarks/run.py --suite gpu --json $OUT/gpu.json
    python benchmarks/run.py --suite gpu-ort --json $OUT/gpu_ort.json   # via benchmarks/gpu/gpu_ort_suite.sh
    python benchmarks/run.py --suite smoke --json /tmp/smoke.json   # tiny sizes, for the tests
    python benchmarks/run.py --suite read --json benchmarks/results/read.json   # per-spot vs band reader; --only remote: over HTTP
    python benchmarks/run.py --suite grid --json benchmarks/results/grid_cpu.json   # slides with no assay

Writes `{"machine": {...}, "results": [...], "targets": [...]}` (after every
step, so a run cut short keeps what it measured) and a markdown summary next
to the JSON (`.md`). Rows, by the module that measures them:

- `encoder` (`suite_encoder.py`, GPU rows `suite_gpu.py`): spots/s of the
  phase-1 encoder per model, backend (torch eager = the reference
  implementation's way of running; onnxruntime; tensorrt), precision and batch.
- `kmeans` (`suite_kmeans.py`): numpy k-means (the runtime's) against
  scikit-learn on the same data with the same number of initialisations.
- `tile_read` (`suite_read.py`): patches/s (patch read + three views) by thread
  count, for the plain-JPEG and the OpenSlide readers; `--suite read` also the
  tifffile backend on the same pyramids, `slide_read` (open, thumbnail, tissue
  detection per backend) and `tile_read_coverage`.
- `pipeline_overhead`, `rss` (`suite_pipeline.py`): wall time of `mmap-predict`
  outside the engines, per spot; its peak resident memory by number of spots.

`harness.py` holds what they share (sizes, machine description, timing, the
report, slides, `mmap-predict` runs), `models.py` the random-weight models
(speed does not depend on the weights; the UNI geometry is ViT-L/16 at 112 px),
`summary.py` the targets and the markdown. A suite is a name in `SUITES`: its
sizes and the function that runs its steps; add one there.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Callable

sys.path.insert(0, str(Path(__file__).resolve().parent / "suites"))  # the suites and their harness
from harness import REPO, Context, Report, Suite, her2st_slide, machine_info, pyramidal_tiff, step


def cpu_suite(ctx: Context) -> None:
    """Encoder (tiny, then UNI geometry), k-means, tile reading, pipeline overhead and peak memory."""
    from suite_encoder import encoder_rows
    from suite_kmeans import kmeans_rows

    suite, report, work = ctx.suite, ctx.report, ctx.work
    if ctx.wanted("encoder"):
        with step(report, "encoder tiny"):
            encoder_rows(report, suite, "tiny", (suite.tiny_batch,), suite.tiny_rounds, suite.tiny_precisions,
                         work, ctx.tiny_checkpoint, ctx.tiny_bundle)
    if suite.uni and ctx.wanted("uni"):
        with step(report, "encoder uni"):
            encoder_rows(report, suite, "uni", suite.uni_batch, suite.rounds, suite.uni_precisions, work)
        shutil.rmtree(work / "uni", ignore_errors=True)
    if ctx.wanted("kmeans"):
        with step(report, "kmeans"):
            kmeans_rows(report, suite)
    slide_steps(ctx)


def gpu_suite(ctx: Context) -> None:
    """The GPU probe and rows, then (time allowing) k-means and tile reading on the GPU machine's cores."""
    from suite_gpu import gpu_probe, gpu_rows
    from suite_kmeans import kmeans_rows

    with step(ctx.report, "probe"):
        gpu_probe(ctx.report)
    if ctx.wanted("gpu"):
        with step(ctx.report, "gpu"):
            gpu_rows(ctx.report, ctx.suite, ctx.work, ctx.deadline)
    if not ctx.wanted("tiles") or time.perf_counter() > ctx.deadline:
        return
    if ctx.wanted("kmeans"):
        with step(ctx.report, "kmeans"):
            kmeans_rows(ctx.report, ctx.suite)
    slide_steps(ctx)


def slide_steps(ctx: Context) -> None:
    """Tile reading, pipeline overhead and peak RSS on the her2st B4 image (or the demo sample)."""
    from suite_pipeline import pipeline_rows, rss_rows
    from suite_read import tile_rows

    suite, report, work = ctx.suite, ctx.report, ctx.work
    # smoke: small and quick; gpu: the GPU machine has only the checkout
    slide = her2st_slide(ctx.data_dir, prefer_sample=suite.name in ("smoke", "gpu"))
    if slide is None:
        report.add({"name": "skipped", "step": "tiles, pipeline, rss", "why": "no her2st image or demo sample"})
        return
    if ctx.wanted("tiles") and suite.tile_patches:
        with step(report, "tile reading (plain image)"):
            tile_rows(report, suite, slide[0], slide[2], work, "image")
        with step(report, "tile reading (OpenSlide, pyramidal TIFF)"):
            tif = pyramidal_tiff(slide[0], slide[2], work / f"{slide[0].stem}.tif")
            tile_rows(report, suite, tif, slide[2], work, "openslide")
    if ctx.wanted("pipeline") and suite.overhead_spots:
        with step(report, "pipeline overhead"):
            pipeline_rows(report, suite, slide, work)
    if ctx.wanted("rss") and suite.rss_spots:
        with step(report, "peak RSS"):
            rss_rows(report, suite, slide, work)


def read_suite(ctx: Context) -> None:
    """The per-spot reader against the band reader (both layouts, every slide backend, 1 and 2 threads);
    `remote`: a slide end to end from disk and over HTTP from 127.0.0.1."""
    from suite_read import SLIDE_SECTION, remote_rows, run_read_suite

    if ctx.wanted("backends"):
        with step(ctx.report, "read"):
            run_read_suite(None, ctx.report, ctx.work, ctx.data_dir)
    image = ctx.data_dir / "her2st" / "images" / f"{SLIDE_SECTION}.jpg" if ctx.data_dir else None
    if ctx.wanted("remote") and image is not None and image.is_file():
        with step(ctx.report, "remote"):
            remote_rows(ctx.report, ctx.work, image)


def grid_suite(ctx: Context) -> None:
    """Tissue detection by slide size, grid building, and `--grid` end to end at two resolutions."""
    from suite_grid import grid_suite as run

    run(ctx)


def gpu_ort_suite(ctx: Context) -> None:
    """mmap-predict on ONNX Runtime CUDA end to end, its engines alone, torch, and the readers' share."""
    from suite_gpu_ort import gpu_ort_suite as run

    run(ctx)


# The suites: name -> (sizes, the function that runs its steps).
SUITES: dict[str, tuple[Suite, Callable[[Context], None]]] = {
    "cpu": (Suite("cpu"), cpu_suite),
    "smoke": (Suite("smoke", tiny_batch=4, rounds=2, tiny_rounds=2, uni=False, tiny_precisions=("fp32", "int8"),
                    kmeans_n=400, kmeans_dim=32, kmeans_k=8, tile_patches=20, tile_threads=(1, 2),
                    overhead_spots=(60,), rss_spots=(30, 60), time_budget_s=300.0), cpu_suite),
    "gpu": (Suite("gpu", tiny_batch=256, uni_batch=(16, 64, 256), rounds=10, tiny_rounds=10,
                  uni_precisions=("fp32", "fp16"), tiny_precisions=("fp32",), kmeans_n=5000,
                  tile_patches=2000, tile_threads=(1, 2, 4, 8, 16), overhead_spots=(), rss_spots=(), gpu_batches=(16, 64, 256),
                  time_budget_s=420.0), gpu_suite),
    "read": (Suite("read", uni=False), read_suite),
    "grid": (Suite("grid", uni=False, time_budget_s=3600.0), grid_suite),
    "grid-smoke": (Suite("grid-smoke", uni=False, time_budget_s=600.0), grid_suite),
    "gpu-ort": (Suite("gpu-ort", rounds=10, time_budget_s=480.0), gpu_ort_suite),
    "gpu-ort-check": (Suite("gpu-ort-check", rounds=2, time_budget_s=300.0), gpu_ort_suite),
}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=sorted(SUITES), default="cpu")
    ap.add_argument("--json", type=Path, required=True, help="output JSON (a .md summary is written beside it)")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="folder holding her2st/ (default: $MMAP_DATA_DIR, else ../shared/data if present)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--tiny-checkpoint", type=Path, help="use this tiny-model checkpoint (with --tiny-bundle)")
    ap.add_argument("--tiny-bundle", type=Path, help="its exported bundle (skips the export)")
    ap.add_argument("--read-rounds", type=int, default=3,
                    help="--suite read: alternating rounds of both readers; each row keeps the best")
    ap.add_argument("--only", default="", help="comma-separated steps: encoder,uni,kmeans,tiles,pipeline,rss,gpu; "
                    "grid: detect,build,e2e; read: backends,remote")
    args = ap.parse_args(argv)
    suite, run_suite = SUITES[args.suite]
    data_dir = args.data_dir or (Path(os.environ["MMAP_DATA_DIR"]) if os.environ.get("MMAP_DATA_DIR") else None)
    if data_dir is None and (REPO.parent / "shared" / "data").is_dir():
        data_dir = REPO.parent / "shared" / "data"
    work = args.work or Path(tempfile.mkdtemp(prefix="mmap-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    report = Report(args.json, machine_info(suite))
    report.machine["data"] = str(data_dir) if data_dir else "none (demo sample)"
    ctx = Context(suite, report, work, data_dir, deadline=time.perf_counter() + suite.time_budget_s,
                  only={s for s in args.only.split(",") if s}, tiny_checkpoint=args.tiny_checkpoint,
                  tiny_bundle=args.tiny_bundle)
    try:
        run_suite(ctx)
    finally:
        report.write()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
