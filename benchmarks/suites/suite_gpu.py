"""The GPU rows: a probe of the GPU and its software, torch eager/compiled encoder runs, ONNX Runtime's
GPU providers and native TensorRT engines where present."""

from __future__ import annotations

import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
from harness import Report, Suite, interleaved, step
from models import build_model, deployable_encoder_fn, export_model, model_label, torch_encoder_fn, views_for


def gpu_probe(report: Report) -> None:
    """First row of the GPU suite: the GPU, onnxruntime's providers, whether tensorrt imports,
    and a CUDA driver round trip through the TensorRT runner's own CUDA driver calls."""
    import onnxruntime as ort

    from mmap_deploy.engines import tensorrt_importable

    row: dict[str, Any] = {"name": "probe", "onnxruntime": ort.__version__,
                           "onnxruntime_providers": ort.get_available_providers()}
    ok, trt = tensorrt_importable()
    row["tensorrt"] = trt if ok else f"no: {trt}"
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,compute_cap,driver_version,memory.total",
                              "--format=csv,noheader"], capture_output=True, text=True, timeout=30)
        row["nvidia_smi"] = smi.stdout.strip() or smi.stderr.strip()
    except (OSError, subprocess.TimeoutExpired) as e:
        row["nvidia_smi"] = f"failed: {e}"
    try:
        from mmap_deploy.engines.tensorrt import CudaDriver

        cuda = CudaDriver()
        src = np.arange(1 << 20, dtype=np.float32)
        dst = np.empty_like(src)
        ptr, stream = cuda.malloc(src.nbytes), cuda.stream()
        cuda.to_device(ptr, src, stream)
        cuda.to_host(dst, ptr, stream)
        cuda.synchronize(stream)
        cuda.free(ptr)
        cuda.destroy_stream(stream)
        row["cuda_driver"] = {"gpu": cuda.name(), "compute_capability": cuda.compute_capability(),
                              "round_trip_ok": bool(np.array_equal(src, dst))}
    except Exception as e:
        row["cuda_driver"] = f"failed: {type(e).__name__}: {e}"
    report.add(row)


def gpu_rows(report: Report, suite: Suite, work: Path, deadline: float) -> None:
    """torch eager fp32/bf16/fp16 and torch.compile on the GPU; ORT GPU providers and TensorRT where present."""
    import torch

    if not torch.cuda.is_available():
        report.add({"name": "error", "step": "gpu", "error": "torch sees no CUDA device"})
        return
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    torch.backends.cudnn.allow_tf32 = False
    for backbone in ("tiny", "uni"):
        model = build_model(backbone)
        cfg = model.config
        label = model_label(backbone, cfg)
        batches = suite.gpu_batches if backbone == "uni" else (suite.tiny_batch,)
        for batch in batches:
            if time.perf_counter() > deadline:
                report.add({"name": "skipped", "step": f"gpu {label} batch {batch}", "why": "time budget"})
                break
            views = views_for(cfg, batch)
            fns = {(p, False): torch_encoder_fn(model, views, "cuda", p) for p in ("fp32", "bf16", "fp16")}
            times = interleaved(fns, suite.rounds, warmup=2)
            for (precision, _), ts in times.items():
                med = statistics.median(ts)
                report.add({"name": "encoder", "model": label, "backend": "torch", "precision": precision,
                            "batch": batch, "spots_per_s": round(batch / med, 1),
                            "best_spots_per_s": round(batch / min(ts), 1), "rounds": suite.rounds, "device": "cuda"})
        if backbone == "uni" and time.perf_counter() < deadline - 90:
            with step(report, "deployable graph, uint8 from host"):
                for batch in (256, 512):
                    views = views_for(cfg, batch)
                    fns = {p: deployable_encoder_fn(model, views, "cuda", p) for p in ("fp32", "bf16")}
                    times = interleaved(fns, suite.rounds, warmup=2)
                    for precision, ts in times.items():
                        report.add({"name": "encoder", "model": label, "backend": "torch (uint8 from host)",
                                    "precision": precision, "batch": batch,
                                    "spots_per_s": round(batch / statistics.median(ts), 1), "rounds": suite.rounds,
                                    "device": "cuda"})
        if backbone == "uni" and time.perf_counter() < deadline - 60:
            with step(report, "torch.compile bf16"):
                batch = max(suite.gpu_batches)
                views = views_for(cfg, batch)
                t = time.perf_counter()
                fn = torch_encoder_fn(model, views, "cuda", "bf16", compiled=True)
                fn()
                compile_s = time.perf_counter() - t
                ts = interleaved({"c": fn}, suite.rounds, warmup=2)["c"]
                report.add({"name": "encoder", "model": label, "backend": "torch.compile", "precision": "bf16",
                            "batch": batch, "spots_per_s": round(batch / statistics.median(ts), 1),
                            "compile_s": round(compile_s, 1), "device": "cuda"})
        model.cpu()
        del model
        torch.cuda.empty_cache()
    import onnxruntime as ort

    gpu_eps = [p for p in ("TensorrtExecutionProvider", "CUDAExecutionProvider") if p in ort.get_available_providers()]
    if not gpu_eps:
        report.add({"name": "skipped", "step": "onnxruntime GPU providers",
                    "why": f"onnxruntime {ort.__version__} offers {ort.get_available_providers()} (onnxruntime-gpu "
                           "is not installed)"})
    else:
        with step(report, "onnxruntime GPU"):
            ort_gpu_rows(report, suite, work, gpu_eps)
    from mmap_deploy.engines import tensorrt_importable

    ok, why = tensorrt_importable()
    if not ok:
        report.add({"name": "skipped", "step": "native TensorRT", "why": why})
    else:
        with step(report, "native TensorRT"):
            tensorrt_rows(report, suite, work)


def ort_gpu_rows(report: Report, suite: Suite, work: Path, eps: list[str]) -> None:
    from mmap_deploy.engines import OnnxRuntimeRunner
    from mmap_deploy.model.bundle import load_bundle

    model = build_model("uni")
    label = model_label("uni", model.config)
    bundle = load_bundle(export_model(model, work / "uni-gpu", ("fp16",)), verify_hashes=False)
    for ep in eps:
        for p in ("fp32", "fp16"):
            with OnnxRuntimeRunner(bundle.path_of(bundle.select("encoder", p)), providers=[ep], precision=p) as r:
                for batch in suite.gpu_batches:
                    views = views_for(model.config, batch)
                    ts = interleaved({"r": lambda: r.infer({"views": views})}, suite.rounds, warmup=2)["r"]
                    report.add({"name": "encoder", "model": label, "backend": "onnxruntime", "provider": ep,
                                "precision": p, "batch": batch,
                                "spots_per_s": round(batch / statistics.median(ts), 1), "device": "cuda"})


def tensorrt_rows(report: Report, suite: Suite, work: Path) -> None:
    from mmap_deploy.engines import TensorRTRunner
    from mmap_deploy.model.bundle import load_bundle

    model = build_model("uni")
    label = model_label("uni", model.config)
    bundle_dir = work / "uni-trt"
    export_model(model, bundle_dir, ("fp16",))
    b = max(suite.gpu_batches)
    cmd = [sys.executable, "-m", "mmap_export.cli", "-o", str(bundle_dir / "bundle"), "--tensorrt",
           "--trt-batch", f"1,{b},{b}", "--trt-workspace-gib", "8"]
    t = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    report.add({"name": "tensorrt_build", "model": label, "rc": proc.returncode,
                "seconds": round(time.perf_counter() - t, 1), "log": proc.stderr[-1500:]})
    bundle = load_bundle(bundle_dir / "bundle", verify_hashes=False)
    with TensorRTRunner.from_bundle(bundle, bundle.select("encoder", "fp16", "tensorrt")) as r:
        for batch in suite.gpu_batches:
            views = views_for(model.config, batch)
            ts = interleaved({"r": lambda: r.infer({"views": views})}, suite.rounds, warmup=2)["r"]
            report.add({"name": "encoder", "model": label, "backend": "tensorrt", "precision": "fp16",
                        "batch": batch, "spots_per_s": round(batch / statistics.median(ts), 1), "device": "cuda"})
