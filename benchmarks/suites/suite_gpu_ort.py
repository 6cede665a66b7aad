"""The deployed GPU path: `mmap-predict` on ONNX Runtime's CUDA provider, against its engines alone and torch.

One run, on one GPU, UNI geometry (ViT-L/16 at 112 px, random weights: speed does not depend on them):

- `predict`: `mmap-predict --backend onnxruntime` end to end, fp32 and fp16, on a 5 000-spot grid over a
  real her2st section written as a pyramidal TIFF (read through OpenSlide);
- `encoder`: engine-only spots/s of the same bundle's encoder on ORT CUDA, fp32 and fp16, with and without
  IO binding; torch eager bf16 and torch.compile bf16 on the same weights;
- `reader_wait`: the share of wall time in which the GPU engine waits for tile reading, at 4, 8 and 16
  reader threads (the pipeline's own `read_wait` timing over its `total`);
- `targets`: ORT CUDA fp16 engine vs torch eager bf16; end-to-end fp16 vs its engine-only rate.

Run by `benchmarks/gpu/gpu_ort_suite.sh` after it has put onnxruntime-gpu on the path. The suite
`gpu-ort-check` runs the same steps on the CPU provider with the tiny model and a small grid, so that
the script's Python is exercised (by the tests) before any GPU time is spent on it.
"""

from __future__ import annotations

import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from harness import Context, grid_coords, interleaved, pyramidal_tiff, run_predict, step
from models import build_model, export_model, model_label, torch_encoder_fn, views_for

SLIDE_NAME = "C6"
SLIDE_MPP = 0.698  # HEST-1k's estimate for her2st C6; the section's lattice gives ~0.69


@dataclass(frozen=True)
class Plan:
    provider: str = "CUDAExecutionProvider"
    backbone: str = "uni"
    device: str = "cuda"
    grid_spots: int = 5000
    engine_batches: tuple[int, ...] = (128, 256)
    reader_threads: tuple[int, ...] = (4, 8, 16)
    compile: bool = True


PLANS = {
    "gpu-ort": Plan(),
    # the same steps on the CPU, small: checks the suite's own code where no GPU is at hand
    "gpu-ort-check": Plan(provider="CPUExecutionProvider", backbone="tiny", device="cpu", grid_spots=120,
                          engine_batches=(8,), reader_threads=(1, 2), compile=False),
}


def _slide_jpeg(ctx: Context) -> Path | None:
    """C6's image: carried beside the checkout in .gpudata/, else from the data folder."""
    from harness import REPO

    for p in (REPO / ".gpudata" / f"{SLIDE_NAME}.jpg",
              (ctx.data_dir / "her2st" / "images" / f"{SLIDE_NAME}.jpg") if ctx.data_dir else None):
        if p is not None and p.is_file():
            return p
    return None


def _runner(plan: Plan, path: Path, precision: str, io_binding: bool):
    from mmap_deploy.engines import OnnxRuntimeRunner

    return OnnxRuntimeRunner(path, providers=[plan.provider], precision=precision, io_binding=io_binding)


def gpu_ort_suite(ctx: Context) -> None:
    """Probe, then the rows above; each step guarded, so a failure keeps what ran."""
    import onnxruntime as ort
    from suite_gpu import gpu_probe

    report, work = ctx.report, ctx.work
    plan = PLANS[ctx.suite.name]
    with step(report, "probe"):
        gpu_probe(report)
    if plan.provider not in ort.get_available_providers():
        report.add({"name": "skipped", "step": ctx.suite.name, "why": f"onnxruntime {ort.__version__} offers "
                    f"{ort.get_available_providers()}: put onnxruntime-gpu on the path (benchmarks/gpu/gpu_ort_suite.sh)"})
        return
    model = build_model(plan.backbone)
    label = model_label(plan.backbone, model.config)
    with step(report, f"export {label} (fp32 + fp16)"):
        t = time.perf_counter()
        bundle = export_model(model, work / plan.backbone, ("fp16",))
        report.add({"name": "export", "model": label, "seconds": round(time.perf_counter() - t, 1)})
    from mmap_deploy.model.bundle import load_bundle

    b = load_bundle(bundle)
    engine_rate: dict[str, float] = {}
    with step(report, "engine only: ORT CUDA and torch"):
        engine_rate = _engine_rows(ctx, plan, model, label, b)
    jpeg = _slide_jpeg(ctx)
    if jpeg is None:
        report.add({"name": "skipped", "step": "mmap-predict end to end",
                    "why": f"no {SLIDE_NAME}.jpg in .gpudata/ or the data folder"})
        return
    with step(report, "pyramidal TIFF and grid"):
        tif = pyramidal_tiff(jpeg, SLIDE_MPP, work / f"{SLIDE_NAME}.tif")
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None
        with Image.open(jpeg) as im:
            width, height = im.size
        coords = grid_coords(work / "grid.csv", width, height, plan.grid_spots, margin=200)
    e2e: dict[str, float] = {}
    for precision in ("fp32", "fp16"):
        with step(report, f"mmap-predict {precision}"):
            res = run_predict(tif, coords, bundle, work / f"out_{precision}.h5ad", SLIDE_MPP,
                              extra=["--backend", "onnxruntime", "--precision", precision])
            rate = res["spots"] / res["wall"]
            e2e[precision] = rate
            report.add({"name": "predict", "command": "mmap-predict", "backend": "onnxruntime",
                        "provider": res["timings"].get("provider", plan.provider), "precision": precision,
                        "model": label,
                        "slide": f"{SLIDE_NAME} pyramidal TIFF (OpenSlide)", "spots": res["spots"],
                        "wall_s": round(res["wall"], 2), "spots_per_s": round(rate, 1),
                        "timings": res["timings"], "maxrss_mib": round(res["maxrss_mib"], 1)})
    with step(report, "reader wait"):
        _reader_rows(ctx, plan, tif, coords, b)
    _targets(ctx, engine_rate, e2e)


def _engine_rows(ctx: Context, plan: Plan, model: Any, label: str, b: Any) -> dict[str, float]:
    """spots/s of the encoder alone: ORT CUDA fp32/fp16 (with/without IO binding), torch eager and compile bf16."""
    import torch

    report, rounds = ctx.report, ctx.suite.rounds
    best: dict[str, float] = {}
    for batch in plan.engine_batches:
        views = views_for(model.config, batch)
        fns = {}
        runners = []
        for precision in ("fp32", "fp16"):
            path = b.path_of(b.select("encoder", precision))
            for io in (False, True):
                r = _runner(plan, path, precision, io)
                runners.append(r)
                fns[("onnxruntime", precision, io)] = (lambda r=r: r.infer({"views": views}))
        fns[("torch", "bf16", False)] = torch_encoder_fn(model, views, plan.device, "bf16")
        times = interleaved(fns, rounds, warmup=2)
        for (backend, precision, io), ts in times.items():
            rate = batch / statistics.median(ts)
            key = f"{backend}:{precision}"
            best[key] = max(best.get(key, 0.0), rate)
            report.add({"name": "encoder", "model": label, "backend": backend, "precision": precision,
                        "provider": plan.provider if backend == "onnxruntime" else f"torch {plan.device}",
                        "io_binding": io, "batch": batch, "spots_per_s": round(rate, 1), "rounds": rounds})
        for r in runners:
            r.close()
    if not plan.compile:
        return best
    batch = max(plan.engine_batches)
    views = views_for(model.config, batch)
    t = time.perf_counter()
    fn = torch_encoder_fn(model, views, plan.device, "bf16", compiled=True)
    fn()
    compile_s = time.perf_counter() - t
    ts = interleaved({"c": fn}, rounds, warmup=2)["c"]
    best["torch.compile:bf16"] = batch / statistics.median(ts)
    report.add({"name": "encoder", "model": label, "backend": "torch.compile", "precision": "bf16",
                "batch": batch, "spots_per_s": round(best["torch.compile:bf16"], 1), "compile_s": round(compile_s, 1)})
    model.cpu()
    torch.cuda.empty_cache()
    return best


def _reader_rows(ctx: Context, plan: Plan, tif: Path, coords: Path, b: Any) -> None:
    """The pipeline in-process at 4, 8, 16 reader threads: how long the engine waits for patches."""
    from mmap_deploy.options import Settings
    from mmap_deploy.run.predict import open_run, predict_to_file

    settings = Settings(backend="onnxruntime", precision="fp16", overwrite=True, mpp=SLIDE_MPP)
    for threads in plan.reader_threads:
        with open_run(b, settings, "benchmarks/suites/suite_gpu_ort.py", read_workers=threads) as state:
            engines = state.engines
            res = predict_to_file(tif, coords, ctx.work / f"readers_{threads}.h5ad", b, state, settings)
            tm = res.timings
            ctx.report.add({"name": "reader_wait", "backend": "onnxruntime", "provider": ",".join(engines.encoder.providers),
                            "precision": "fp16", "reader_threads": threads, "spots": res.n_spots,
                            "spots_per_s": round(res.n_spots / res.seconds, 1),
                            "read_wait_s": tm.get("read_wait"), "encoder_s": tm.get("encoder"),
                            "total_s": tm.get("total"),
                            "wait_share": round(tm["read_wait"] / tm["total"], 3) if tm.get("total") else None})


def _targets(ctx: Context, engine: dict[str, float], e2e: dict[str, float]) -> None:
    rows = []
    if "onnxruntime:fp16" in engine and "torch:bf16" in engine:
        r = engine["onnxruntime:fp16"] / engine["torch:bf16"]
        rows.append({"target": "ORT CUDA fp16 engine >= torch eager bf16", "ratio": round(r, 3), "met": r >= 1.0})
    if "fp16" in e2e and "onnxruntime:fp16" in engine:
        r = e2e["fp16"] / engine["onnxruntime:fp16"]
        rows.append({"target": "mmap-predict fp16 end to end >= 80% of its engine-only rate", "ratio": round(r, 3),
                     "met": r >= 0.8})
    for row in rows:
        ctx.report.add({"name": "target", **row})
