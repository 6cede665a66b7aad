"""`encoder` rows: spots/s of the phase-1 encoder on the CPU, torch eager fp32 (the reference
implementation's way of running it) against ONNX Runtime at each precision, timed in interleaved rounds
so that load from other processes hits them alike; spots_per_s is from the median round."""

from __future__ import annotations

import statistics
import time
from pathlib import Path

from harness import Report, Suite, interleaved
from models import model_label, prepare_model, torch_encoder_fn, views_for


def encoder_rows(report: Report, suite: Suite, backbone: str, batches: tuple[int, ...], rounds: int,
                 precisions: tuple[str, ...], work: Path, checkpoint: Path | None = None,
                 given_bundle: Path | None = None) -> None:
    """torch eager fp32 vs ONNX Runtime (fp32 and reduced precisions) for one model, interleaved."""
    import torch

    from mmap_deploy.engines import OnnxRuntimeRunner, default_threads
    from mmap_deploy.model.bundle import load_bundle

    threads = default_threads()
    torch.set_num_threads(threads)
    t = time.perf_counter()
    model, bundle_dir = prepare_model(backbone, work, precisions, checkpoint, given_bundle)
    cfg = model.config
    label = model_label(backbone, cfg)
    report.add({"name": "export", "model": label, "precisions": list(precisions),
                "seconds": round(time.perf_counter() - t, 1)})
    bundle = load_bundle(bundle_dir, verify_hashes=False)
    runners = {p: OnnxRuntimeRunner(bundle.path_of(bundle.select("encoder", p)), threads=threads, precision=p)
               for p in precisions}
    try:
        for batch in batches:
            views = views_for(cfg, batch)
            fns = {("torch", "fp32"): torch_encoder_fn(model, views)}
            for p, r in runners.items():
                fns[("onnxruntime", p)] = (lambda r=r: r.infer({"views": views}))
            times = interleaved(fns, rounds)
            for (backend, precision), ts in times.items():
                med = statistics.median(ts)
                report.add({"name": "encoder", "model": label, "backend": backend, "precision": precision,
                            "batch": batch, "spots_per_s": round(batch / med, 3),
                            "best_spots_per_s": round(batch / min(ts), 3), "rounds": rounds, "threads": threads,
                            "device": "cpu"})
    finally:
        for r in runners.values():
            r.close()
    del model
