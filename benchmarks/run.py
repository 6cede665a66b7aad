"""Latency and throughput benchmarks of MMAP deployment, measured side by side.

    python benchmarks/run.py --suite cpu --json benchmarks/results/cpu.json
    python benchmarks/run.py --suite gpu --json $OUT/gpu.json
    python benchmarks/run.py --suite smoke --json /tmp/smoke.json   # tiny sizes, for the tests

Writes `{"machine": {...}, "results": [...], "targets": [...]}` (after every
step, so a run cut short keeps what it measured) and a markdown summary next
to the JSON (`.md`). Rows:

- `encoder`: spots/s of the phase-1 encoder per model, backend (torch eager =
  the reference implementation's way of running; onnxruntime; tensorrt),
  precision and batch. Backends of one model are timed in interleaved rounds,
  so load from other processes hits them alike; spots_per_s is from the
  median round.
- `kmeans`: numpy k-means (the runtime's) against scikit-learn on the same data
  with the same number of initialisations.
- `tile_read`: patches/s (patch read + three views, what the pipeline's reader
  threads do) by thread count, for the plain-JPEG and the OpenSlide readers.
- `pipeline_overhead`: wall time of `mmap-predict` outside the engines, per spot.
- `rss`: peak resident memory of `mmap-predict` by number of spots.

Models use random weights: speed does not depend on them. The UNI geometry is
ViT-L/16 at 112 px (MMAPConfig(backbone="uni", lora_last_blocks=0)).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np

REPO = Path(__file__).resolve().parents[1]
N_GENES = 785  # the her2st protocol's gene list


@dataclass
class Suite:
    """Sizes of one suite."""

    name: str
    tiny_batch: int = 32
    uni_batch: tuple[int, ...] = (4,)
    rounds: int = 5
    tiny_rounds: int = 10
    uni: bool = True
    uni_precisions: tuple[str, ...] = ("fp32", "int8")
    tiny_precisions: tuple[str, ...] = ("fp32", "fp16", "int8")
    kmeans_n: int = 5000
    kmeans_dim: int = 1024
    kmeans_k: int = 80
    kmeans_n_init: int = 1
    tile_patches: int = 400
    tile_threads: tuple[int, ...] = (1, 2, 4)
    overhead_spots: tuple[int, ...] = (5000,)
    rss_spots: tuple[int, ...] = (1000, 5000, 20000)
    gpu: bool = False
    gpu_batches: tuple[int, ...] = ()
    time_budget_s: float = 1200.0


SUITES = {
    "cpu": Suite("cpu"),
    "smoke": Suite("smoke", tiny_batch=4, rounds=2, tiny_rounds=2, uni=False, tiny_precisions=("fp32", "int8"),
                   kmeans_n=400, kmeans_dim=32, kmeans_k=8, tile_patches=20, tile_threads=(1, 2),
                   overhead_spots=(60,), rss_spots=(30, 60), time_budget_s=300.0),
    "gpu": Suite("gpu", tiny_batch=256, uni_batch=(16, 64, 256), rounds=10, tiny_rounds=10,
                 uni_precisions=("fp32", "fp16"), tiny_precisions=("fp32",), kmeans_n=5000,
                 tile_patches=2000, tile_threads=(1, 2, 4, 8, 16), overhead_spots=(), rss_spots=(), gpu=True,
                 gpu_batches=(16, 64, 256),
                 time_budget_s=420.0),
    # per-spot reader against the band reader (benchmarks/suite_read.py)
    "read": Suite("read", uni=False),
}


# -- bookkeeping -----------------------------------------------------------------
@dataclass
class Report:
    path: Path
    machine: dict[str, Any]
    results: list[dict[str, Any]] = field(default_factory=list)
    t0: float = field(default_factory=time.perf_counter)

    def add(self, row: dict[str, Any]) -> None:
        self.results.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        self.write()

    def write(self) -> None:
        self.machine["elapsed_s"] = round(time.perf_counter() - self.t0, 1)
        self.machine["load_average_end"] = list(os.getloadavg())
        data = {"machine": self.machine, "results": self.results, "targets": targets(self.results)}
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(".tmp")
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        tmp.replace(self.path)
        self.path.with_suffix(".md").write_text(markdown(data))


@contextmanager
def step(report: Report, name: str):
    """Run one benchmark step; a failure is recorded as a row and the suite goes on."""
    t = time.perf_counter()
    print(f"== {name}", file=sys.stderr, flush=True)
    try:
        yield
    except Exception as e:  # a benchmark step must not lose the others
        report.add({"name": "error", "step": name, "error": f"{type(e).__name__}: {e}".splitlines()[0],
                    "traceback": traceback.format_exc()[-2000:]})
    finally:
        print(f"== {name}: {time.perf_counter() - t:.1f} s", file=sys.stderr, flush=True)


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(suite: Suite) -> dict[str, Any]:
    import onnxruntime as ort

    try:
        mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30
    except (ValueError, OSError):
        mem_gib = float("nan")
    info: dict[str, Any] = {
        "suite": suite.name,
        "cpu": cpu_model(),
        "cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "memory_gib": round(mem_gib, 1),
        "python": platform.python_version(),
        "numpy": np.__version__,
        "onnxruntime": ort.__version__,
        "onnxruntime_providers": ort.get_available_providers(),
        "load_average_start": list(os.getloadavg()),
        "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import torch

        info["torch"] = torch.__version__
        info["torch_threads"] = torch.get_num_threads()
        if torch.cuda.is_available():
            p = torch.cuda.get_device_properties(0)
            info["gpu"] = p.name
            info["gpu_memory_gib"] = round(p.total_memory / 2**30, 1)
            info["compute_capability"] = f"{p.major}.{p.minor}"
            info["cuda"] = torch.version.cuda
    except ImportError:
        info["torch"] = "not installed"
    from mmap_deploy.runners import tensorrt_importable

    ok, trt = tensorrt_importable()
    info["tensorrt"] = trt if ok else f"no: {trt}"
    return info


# -- models ----------------------------------------------------------------------
def build_model(backbone: str, seed: int = 0):
    """A random-weight MMAP in eval mode (no LoRA: speed runs)."""
    import torch

    from mmap_train.config import MMAPConfig
    from mmap_train.model import MMAP

    torch.manual_seed(seed)
    cfg = MMAPConfig(genes=[f"GENE{i}" for i in range(N_GENES)], backbone=backbone, lora_last_blocks=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the "random UNI weights" warning: intended here
        return MMAP(cfg).eval()


def model_label(backbone: str, cfg) -> str:
    return {"uni": f"uni-vit-large-patch16-{cfg.input_size}", "tiny": f"tiny-vit-patch16-{cfg.input_size}"}.get(
        backbone, backbone)


def export_model(model, work: Path, precisions: tuple[str, ...]) -> Path:
    """Checkpoint -> bundle with the requested extra precisions (the project's own export path)."""
    from mmap_export.bundle_writer import export_bundle
    from mmap_train.model import save_checkpoint

    work.mkdir(parents=True, exist_ok=True)
    ckpt = work / "model.pt"
    save_checkpoint(ckpt, model)
    bundle = work / "bundle"
    export_bundle(ckpt, bundle, overwrite=True)
    ckpt.unlink()
    add_precisions(bundle, precisions)
    return bundle


def add_precisions(bundle: Path, precisions: tuple[str, ...], parity_spots: int = 4) -> None:
    """Add the fp16/int8 files a bundle lacks (parity on a few random views: speed runs;
    the parity that matters is measured on real patches by mmap-export and the tests)."""
    from mmap_deploy.bundle import load_bundle

    m = load_bundle(bundle, verify_hashes=False).manifest
    if "fp16" in precisions and m.model_file("encoder", "fp16") is None:
        from mmap_export.precision import add_fp16

        add_fp16(bundle, n_spots=parity_spots)
    if "int8" in precisions and m.model_file("encoder", "int8") is None:
        from mmap_export.precision import add_int8

        add_int8(bundle, n_spots=parity_spots)


def prepare_model(backbone: str, work: Path, precisions: tuple[str, ...], checkpoint: Path | None = None,
                  bundle: Path | None = None):
    """(torch model, bundle dir) of the same weights: a given checkpoint and its bundle, or a fresh export."""
    if checkpoint is not None and bundle is not None:
        from mmap_train.model import load_checkpoint

        model = load_checkpoint(checkpoint)[0].eval()
        dst = work / backbone / "bundle"
        shutil.copytree(bundle, dst, dirs_exist_ok=True)
        add_precisions(dst, tuple(p for p in precisions if p != "fp32"))
        return model, dst
    model = build_model(backbone)
    return model, export_model(model, work / backbone, tuple(p for p in precisions if p != "fp32"))


def views_for(cfg, n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    s = cfg.input_size
    return rng.integers(0, 256, (n, len(cfg.crop_fractions), s, s, 3), dtype=np.uint8)


def interleaved(fns: dict[str, Callable[[], Any]], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Time each function once per round, rounds interleaved; returns seconds per call."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(rounds):
        for k, fn in fns.items():
            t = time.perf_counter()
            fn()
            times[k].append(time.perf_counter() - t)
    return times


def torch_encoder_fn(model, views: np.ndarray, device: str = "cpu", dtype: str = "fp32", compiled: bool = False):
    """The reference way: the training model's encoder on normalised float views, eager (or compiled)."""
    import torch

    from mmap_deploy.preprocess import normalise

    x = torch.from_numpy(normalise(views, model.config.view_spec)).to(device)
    enc = model.encoder.to(device)
    cast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]
    if compiled:
        enc = torch.compile(enc)

    def run():
        with torch.inference_mode():
            if cast is None:
                out = enc(x)
            else:
                with torch.autocast(device_type=device.split(":")[0], dtype=cast):
                    out = enc(x)
            if device != "cpu":
                torch.cuda.synchronize()
            return out

    return run


def deployable_encoder_fn(model, views: np.ndarray, device: str, dtype: str):
    """The exported graph's torch twin (LoRA merged, LayerScale folded, uint8 NHWC in, normalisation
    inside) fed from host memory every call, outputs copied back: what a deployed GPU engine does."""
    import torch

    from mmap_export.graphs import EncoderGraph, deployable

    graph = EncoderGraph(deployable(model), model.config.view_spec).eval().to(device)
    host = torch.from_numpy(views).pin_memory()
    cast = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[dtype]

    def run():
        with torch.inference_mode():
            x = host.to(device, non_blocking=True)
            if cast is None:
                f, y1 = graph(x)
            else:
                with torch.autocast(device_type="cuda", dtype=cast):
                    f, y1 = graph(x)
            return f.float().cpu(), y1.float().cpu()

    return run


def encoder_rows(report: Report, suite: Suite, backbone: str, batches: tuple[int, ...], rounds: int,
                 precisions: tuple[str, ...], work: Path, checkpoint: Path | None = None,
                 given_bundle: Path | None = None) -> None:
    """torch eager fp32 vs ONNX Runtime (fp32 and reduced precisions) for one model, interleaved."""
    import torch

    from mmap_deploy.bundle import load_bundle
    from mmap_deploy.runners import OnnxRuntimeRunner, default_threads

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
                fns[("onnxruntime", p)] = (lambda r=r: r.run({"views": views}))
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


# -- k-means ---------------------------------------------------------------------
def kmeans_data(n: int, dim: int, k: int, seed: int = 0) -> np.ndarray:
    """A mixture of k Gaussians of unequal sizes and spreads: stand-in for one slide's features."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(k, dim)).astype(np.float32)
    weights = rng.dirichlet(np.full(k, 2.0))
    labels = rng.choice(k, size=n, p=weights)
    spread = rng.uniform(0.8, 1.6, size=k).astype(np.float32)
    return (centres[labels] + spread[labels, None] * rng.normal(size=(n, dim)).astype(np.float32)).astype(np.float32)


def kmeans_rows(report: Report, suite: Suite) -> None:
    """numpy (the runtime's) vs scikit-learn k-means, same data and init count, at two thread settings:
    the libraries' defaults (all cores) and one thread (what the pipeline uses below 20k spots)."""
    from sklearn.cluster import KMeans
    from threadpoolctl import threadpool_limits

    from mmap_deploy.prototypes import kmeans

    x = kmeans_data(suite.kmeans_n, suite.kmeans_dim, suite.kmeans_k)
    common = {"name": "kmeans", "n": suite.kmeans_n, "dim": suite.kmeans_dim, "k": suite.kmeans_k,
              "n_init": suite.kmeans_n_init, "data": "gaussian mixture (seed 0)"}
    runs = {
        "numpy": lambda: kmeans(x, suite.kmeans_k, seed=0, n_init=suite.kmeans_n_init),
        "sklearn": lambda: KMeans(suite.kmeans_k, init="k-means++", n_init=suite.kmeans_n_init, random_state=0,
                                  algorithm="lloyd").fit(x),
    }
    for threads in ("default", 1):
        best: dict[str, dict] = {}
        for _ in range(2):  # two interleaved rounds: the faster of each
            for impl, fn in runs.items():
                with threadpool_limits(limits=None if threads == "default" else threads):
                    t = time.perf_counter()
                    res = fn()
                    sec = time.perf_counter() - t
                inertia = float(res.inertia if impl == "numpy" else res.inertia_)
                iters = int(res.n_iter if impl == "numpy" else res.n_iter_)
                if impl not in best or sec < best[impl]["seconds"]:
                    best[impl] = dict(common, impl=impl, threads=threads, seconds=round(sec, 3), inertia=inertia,
                                      n_iter=iters)
        for row in best.values():
            report.add(row)


# -- slides ----------------------------------------------------------------------
def her2st_slide(data_dir: Path | None, prefer_sample: bool = False) -> tuple[Path, Path, float] | None:
    """The B4 section's full-resolution image and spot table, or the packaged demo sample (a crop of it)."""
    if prefer_sample:
        try:
            from mmap_deploy.demo import sample_paths

            return sample_paths()
        except Exception:
            pass
    if data_dir is not None and (data_dir / "her2st" / "images" / "B4.jpg").is_file():
        return (data_dir / "her2st" / "images" / "B4.jpg", data_dir / "her2st" / "spots" / "B4_selection.tsv", 0.73)
    try:
        from mmap_deploy.demo import sample_paths

        return sample_paths()
    except Exception:
        return None


def pyramidal_tiff(image: Path, mpp: float, out: Path, levels: int = 3) -> Path:
    """The image as a tiled, zlib-compressed pyramidal TIFF (what OpenSlide reads)."""
    import tifffile
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # a whole her2st section is 92 MP: trusted input here
    rgb = np.asarray(Image.open(image).convert("RGB"))
    with tifffile.TiffWriter(out, bigtiff=False) as tw:
        for i in range(levels):
            level = np.ascontiguousarray(rgb[:: 2**i, :: 2**i])
            res = 1e4 / (mpp * 2**i)
            tw.write(level, tile=(256, 256), compression="zlib", photometric="rgb",
                     resolution=(res, res), resolutionunit="CENTIMETER", subfiletype=0 if i == 0 else 1)
    return out


def tile_rows(report: Report, suite: Suite, slide_path: Path, mpp: float, work: Path, fmt: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    from mmap_deploy.preprocess import ViewSpec, make_views
    from mmap_deploy.slide import open_slide

    spec = ViewSpec()
    t = time.perf_counter()
    slide = open_slide(slide_path, mpp=mpp)
    open_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    margin = spec.patch_um / slide.mpp
    xs = rng.uniform(margin, slide.width - margin, suite.tile_patches)
    ys = rng.uniform(margin, slide.height - margin, suite.tile_patches)

    def one(i: int) -> None:
        make_views(slide.read_patch(float(xs[i]), float(ys[i]), spec), spec)

    try:
        with threadpool_limits(limits=1, user_api="blas"):  # as the pipeline's readers do
            for threads in suite.tile_threads:
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(one, range(min(8, suite.tile_patches))))  # warm caches
                    t = time.perf_counter()
                    list(pool.map(one, range(suite.tile_patches)))
                    sec = time.perf_counter() - t
                report.add({"name": "tile_read", "reader": fmt, "slide": slide_path.name, "threads": threads,
                            "patches": suite.tile_patches, "patches_per_s": round(suite.tile_patches / sec, 1),
                            "open_seconds": round(open_s, 3), "includes": "read_patch + make_views"})
    finally:
        slide.close()


def grid_coords(path: Path, width: int, height: int, n: int, margin: float) -> Path:
    """n spot centres on a regular grid covering the slide (plain x,y table)."""
    aspect = (width - 2 * margin) / (height - 2 * margin)
    cols = int(np.ceil(np.sqrt(n * aspect)))
    rows = int(np.ceil(n / cols))
    xs = np.linspace(margin, width - margin, cols)
    ys = np.linspace(margin, height - margin, rows)
    xy = np.array([(x, y) for y in ys for x in xs])[:n]
    path.write_text("x,y\n" + "".join(f"{x:.1f},{y:.1f}\n" for x, y in xy))
    return path


def run_predict(slide: Path, coords: Path, bundle: Path, out: Path, mpp: float | None) -> dict[str, Any]:
    """`mmap-predict` in a fresh process: wall time, peak RSS of that process, and its own timings."""
    cmd = [sys.executable, "-m", "mmap_deploy.cli", str(slide), str(coords), "-o", str(out), "--model",
           str(bundle), "-q", "--overwrite"]
    if mpp is not None:
        cmd += ["--mpp", str(mpp)]
    # A launcher measures its one child's peak RSS (ru_maxrss of RUSAGE_CHILDREN, KiB on Linux).
    launcher = ("import resource, subprocess, sys, time, json;"
                "t = time.perf_counter(); r = subprocess.run(sys.argv[1:]);"
                "print(json.dumps({'rc': r.returncode, 'wall': time.perf_counter() - t,"
                "'maxrss_kib': resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss}))")
    proc = subprocess.run([sys.executable, "-c", launcher, *cmd], capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"launcher failed: {proc.stderr[-500:]}")
    res = json.loads(proc.stdout.strip().splitlines()[-1])
    if res["rc"] != 0:
        raise RuntimeError(f"mmap-predict exited {res['rc']}: {proc.stderr.strip()[-500:]}")
    import anndata

    adata = anndata.read_h5ad(out, backed="r")
    timings = {k: float(v) for k, v in dict(adata.uns["mmap"]["timings"]).items()}
    n = int(adata.n_obs)
    adata.file.close()
    return {"spots": n, "wall": res["wall"], "maxrss_mib": res["maxrss_kib"] / 1024, "timings": timings}


def tiny_bundle(work: Path) -> Path:
    bundle = work / "tiny" / "bundle"
    if not (bundle / "manifest.json").is_file():
        (work / "tiny").mkdir(parents=True, exist_ok=True)
        export_model(build_model("tiny"), work / "tiny", ())
    return bundle


def pipeline_rows(report: Report, suite: Suite, slide: tuple[Path, Path, float], work: Path) -> None:
    from mmap_deploy.slide import open_slide

    image, coords, mpp = slide
    bundle = tiny_bundle(work)
    with open_slide(image, mpp=mpp) as s:
        width, height = s.width, s.height
        margin = 0.5 * 165 / s.mpp
    cases = [(image, "her2st spots", coords)]
    for n in suite.overhead_spots:
        grid = grid_coords(work / f"grid_{n}.csv", width, height, n, margin)
        cases.append((image, f"grid {n}", grid))
        tif = work / f"{image.stem}.tif"  # written by the tile-reading step
        if tif.is_file():
            cases.append((tif, f"grid {n}", grid))
    for slide_path, what, path in cases:
        res = run_predict(slide_path, path, bundle, work / "out.h5ad", mpp)
        t = res["timings"]
        engines = t.get("encoder", 0.0) + t.get("fusion", 0.0)
        report.add({"name": "pipeline_overhead", "slide": slide_path.name, "coords": what, "spots": res["spots"],
                    "ms_per_spot": round(1e3 * (res["wall"] - engines) / res["spots"], 3),
                    "wall_s": round(res["wall"], 2), "engines_s": round(engines, 2),
                    "breakdown_s": {k: round(v, 3) for k, v in t.items()},
                    "model": "tiny (random weights)", "includes": "process start, imports, slide decode, write"})


def rss_rows(report: Report, suite: Suite, slide: tuple[Path, Path, float], work: Path) -> None:
    from mmap_deploy.slide import open_slide

    image, _, mpp = slide
    bundle = tiny_bundle(work)
    with open_slide(image, mpp=mpp) as s:
        width, height, margin = s.width, s.height, 0.5 * 165 / s.mpp
    for n in suite.rss_spots:
        coords = grid_coords(work / f"rss_{n}.csv", width, height, n, margin)
        res = run_predict(image, coords, bundle, work / "out.h5ad", mpp)
        report.add({"name": "rss", "slide": image.name, "spots": res["spots"],
                    "peak_rss_mib": round(res["maxrss_mib"], 1), "wall_s": round(res["wall"], 2),
                    "model": "tiny (random weights)"})


# -- GPU -------------------------------------------------------------------------
def gpu_probe(report: Report) -> None:
    """First row of the GPU suite: the GPU, onnxruntime's providers, whether tensorrt imports,
    and a CUDA driver round trip through the TensorRT runner's own CUDA driver calls."""
    import onnxruntime as ort

    from mmap_deploy.runners import tensorrt_importable

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
        from mmap_deploy.tensorrt_runner import CudaDriver

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
    from mmap_deploy.runners import tensorrt_importable

    ok, why = tensorrt_importable()
    if not ok:
        report.add({"name": "skipped", "step": "native TensorRT", "why": why})
    else:
        with step(report, "native TensorRT"):
            tensorrt_rows(report, suite, work)


def ort_gpu_rows(report: Report, suite: Suite, work: Path, eps: list[str]) -> None:
    from mmap_deploy.bundle import load_bundle
    from mmap_deploy.runners import OnnxRuntimeRunner

    model = build_model("uni")
    label = model_label("uni", model.config)
    bundle = load_bundle(export_model(model, work / "uni-gpu", ("fp16",)), verify_hashes=False)
    for ep in eps:
        for p in ("fp32", "fp16"):
            with OnnxRuntimeRunner(bundle.path_of(bundle.select("encoder", p)), providers=[ep], precision=p) as r:
                for batch in suite.gpu_batches:
                    views = views_for(model.config, batch)
                    ts = interleaved({"r": lambda: r.run({"views": views})}, suite.rounds, warmup=2)["r"]
                    report.add({"name": "encoder", "model": label, "backend": "onnxruntime", "provider": ep,
                                "precision": p, "batch": batch,
                                "spots_per_s": round(batch / statistics.median(ts), 1), "device": "cuda"})


def tensorrt_rows(report: Report, suite: Suite, work: Path) -> None:
    from mmap_deploy.bundle import load_bundle
    from mmap_deploy.tensorrt_runner import TensorRTRunner

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
    with TensorRTRunner(bundle.path_of(bundle.select("encoder", "fp16", "tensorrt"))) as r:
        for batch in suite.gpu_batches:
            views = views_for(model.config, batch)
            ts = interleaved({"r": lambda: r.run({"views": views})}, suite.rounds, warmup=2)["r"]
            report.add({"name": "encoder", "model": label, "backend": "tensorrt", "precision": "fp16",
                        "batch": batch, "spots_per_s": round(batch / statistics.median(ts), 1), "device": "cuda"})


# -- targets and summary ---------------------------------------------------------
def _enc(results, model_part: str, backend: str, precision: str, device: str = "cpu") -> dict | None:
    rows = [r for r in results if r.get("name") == "encoder" and model_part in r.get("model", "")
            and r.get("backend") == backend and r.get("precision") == precision and r.get("device") == device]
    return max(rows, key=lambda r: r["batch"]) if rows else None


def targets(results: list[dict]) -> list[dict]:
    """The issue's speed targets, each with the measured value and whether it holds."""
    out = []
    ref = _enc(results, "large", "torch", "fp32")
    for precision, need in (("fp32", 1.2), ("int8", 1.8)):
        row = _enc(results, "large", "onnxruntime", precision)
        if ref and row and row["batch"] == ref["batch"]:
            ratio = row["spots_per_s"] / ref["spots_per_s"]
            out.append({"target": f"onnxruntime {precision} >= {need}x torch eager fp32 (UNI geometry, CPU)",
                        "value": round(ratio, 2), "holds": ratio >= need})
    km = {(r["impl"], r.get("threads", "default")): r for r in results if r.get("name") == "kmeans"}
    for threads in ("default", 1):
        a, b = km.get(("numpy", threads)), km.get(("sklearn", threads))
        if a is None or b is None:
            continue
        rel = abs(a["inertia"] - b["inertia"]) / b["inertia"]
        out.append({"target": f"numpy k-means no slower than scikit-learn (threads: {threads})",
                    "value": round(b["seconds"] / a["seconds"], 2), "holds": a["seconds"] <= b["seconds"]})
        out.append({"target": f"k-means inertia within 1% of scikit-learn (threads: {threads})",
                    "value": round(100 * rel, 3), "holds": rel <= 0.01})
    over = [r for r in results if r.get("name") == "pipeline_overhead"]
    if over:
        # The frame is a 5 000-spot slide: judged at the largest spot count measured. Fixed
        # costs (process start, slide decode, thumbnail, write) dominate small slides; their rows
        # are reported beside it.
        n = max(r["spots"] for r in over)
        judged = [r for r in over if r["spots"] == n]
        worst = max(judged, key=lambda r: r["ms_per_spot"])
        out.append({"target": f"pipeline overhead <= 2 ms per spot ({n} spots, every reader)",
                    "value": worst["ms_per_spot"], "holds": all(r["ms_per_spot"] <= 2.0 for r in judged)})
    return out


def _table(rows: list[dict], cols: list[str]) -> str:
    if not rows:
        return "_none_\n"
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for r in rows:
        lines.append("| " + " | ".join(str(r.get(c, "")) for c in cols) + " |")
    return "\n".join(lines) + "\n"


def markdown(data: dict) -> str:
    m, res = data["machine"], data["results"]
    parts = [f"# Benchmark: suite `{m['suite']}`\n",
             f"Machine: {m.get('cpu')}, {m.get('cores')} cores, {m.get('memory_gib')} GiB"
             + (f"; GPU {m['gpu']} (sm {m.get('compute_capability')}, CUDA {m.get('cuda')})" if m.get("gpu") else "")
             + f". onnxruntime {m.get('onnxruntime')} ({', '.join(m.get('onnxruntime_providers', []))}), "
               f"torch {m.get('torch')}, TensorRT: {m.get('tensorrt')}. Load average at start "
               f"{[round(x, 1) for x in m.get('load_average_start', [])]}, at end "
               f"{[round(x, 1) for x in m.get('load_average_end', [])]}; {m.get('elapsed_s')} s in all.\n"]
    enc = [r for r in res if r.get("name") == "encoder"]
    ref = {(r["model"], r["batch"], r.get("device")): r["spots_per_s"] for r in enc
           if r["backend"] == "torch" and r["precision"] == "fp32"}
    enc_rows = [dict(r, vs_torch_fp32=round(r["spots_per_s"] / ref[(r["model"], r["batch"], r.get("device"))], 2)
                     if (r["model"], r["batch"], r.get("device")) in ref else "") for r in enc]
    probe = next((r for r in res if r.get("name") == "probe"), None)
    if probe:
        parts.append(f"GPU probe: nvidia-smi `{probe.get('nvidia_smi')}`; onnxruntime {probe.get('onnxruntime')} providers "
                     f"{probe.get('onnxruntime_providers')}; tensorrt: {probe.get('tensorrt')}; CUDA driver check "
                     f"(the TensorRT runner's ctypes CUDA calls): {probe.get('cuda_driver')}.\n")
    if enc_rows:
        parts.append("## Encoder (spots/s; one spot = three views)\n")
        if any(r.get("device") == "cuda" for r in enc_rows):
            parts.append("GPU rows: inputs already on the GPU (normalised float for torch); "
                         "`slide_5000_s` = seconds for the encoder on 5 000 spots at that rate.\n")
            for r in enc_rows:
                r["slide_5000_s"] = round(5000 / r["spots_per_s"], 2)
        parts.append(_table(enc_rows, ["model", "device", "backend", "provider", "precision", "batch", "spots_per_s",
                                       "vs_torch_fp32"] + (["slide_5000_s"] if "slide_5000_s" in enc_rows[0] else [])))
    sections = [
        ("k-means", "kmeans", ["impl", "threads", "n", "dim", "k", "n_init", "seconds", "inertia", "n_iter"]),
        ("Tile reading (patch + three views)", "tile_read",
         ["reader", "slide", "threads", "patches", "patches_per_s", "open_seconds"]),
        ("mmap-predict outside the engines", "pipeline_overhead",
         ["slide", "coords", "spots", "ms_per_spot", "wall_s", "engines_s"]),
        ("Peak RSS of mmap-predict", "rss", ["slide", "spots", "peak_rss_mib", "wall_s"]),
    ]
    for title, name, cols in sections:
        picked = [r for r in res if r.get("name") == name]
        if picked:
            parts.append(f"\n## {title}\n")
            parts.append(_table(picked, cols))
    other = [r for r in res if r.get("name") in ("export", "tensorrt_build", "skipped", "error")]
    if other:
        parts.append("\n## Other steps\n")
        parts.append(_table([{k: v for k, v in r.items() if k != "traceback"} for r in other],
                            ["name", "step", "model", "seconds", "rc", "why", "error"]))
    parts.append("\n## Targets\n")
    parts.append(_table(data["targets"], ["target", "value", "holds"]))
    return "\n".join(parts)


# -- main ------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", choices=sorted(SUITES), default="cpu")
    ap.add_argument("--json", type=Path, required=True, help="output JSON (a .md summary is written beside it)")
    ap.add_argument("--data-dir", type=Path, default=None,
                    help="folder holding her2st/ (default: $MMAP_DATA_DIR, else ../shared/data if present)")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a temporary one)")
    ap.add_argument("--tiny-checkpoint", type=Path, help="use this tiny-model checkpoint (with --tiny-bundle)")
    ap.add_argument("--tiny-bundle", type=Path, help="its exported bundle (skips the export)")
    ap.add_argument("--only", default="", help="comma-separated steps: encoder,uni,kmeans,tiles,pipeline,rss,gpu")
    args = ap.parse_args(argv)
    suite = SUITES[args.suite]
    data_dir = args.data_dir or (Path(os.environ["MMAP_DATA_DIR"]) if os.environ.get("MMAP_DATA_DIR") else None)
    if data_dir is None and (REPO.parent / "shared" / "data").is_dir():
        data_dir = REPO.parent / "shared" / "data"
    only = {s for s in args.only.split(",") if s}

    def wanted(s: str) -> bool:
        return not only or s in only

    work = args.work or Path(tempfile.mkdtemp(prefix="mmap-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    report = Report(args.json, machine_info(suite))
    report.machine["data"] = str(data_dir) if data_dir else "none (demo sample)"
    deadline = time.perf_counter() + suite.time_budget_s
    try:
        if suite.name == "read":
            from suite_read import run_read_suite

            with step(report, "read"):
                run_read_suite(args, report, work, data_dir)
            return 0
        if suite.gpu:
            with step(report, "probe"):
                gpu_probe(report)
            if wanted("gpu"):
                with step(report, "gpu"):
                    gpu_rows(report, suite, work, deadline)
            if not wanted("tiles") or time.perf_counter() > deadline:
                return 0
        if not suite.gpu and wanted("encoder"):
            with step(report, "encoder tiny"):
                encoder_rows(report, suite, "tiny", (suite.tiny_batch,), suite.tiny_rounds, suite.tiny_precisions,
                             work, args.tiny_checkpoint, args.tiny_bundle)
        if suite.uni and not suite.gpu and wanted("uni"):
            with step(report, "encoder uni"):
                encoder_rows(report, suite, "uni", suite.uni_batch, suite.rounds, suite.uni_precisions, work)
            shutil.rmtree(work / "uni", ignore_errors=True)
        if wanted("kmeans"):
            with step(report, "kmeans"):
                kmeans_rows(report, suite)
        # smoke: small and quick; gpu: the GPU machine has only the checkout
        slide = her2st_slide(data_dir, prefer_sample=suite.name in ("smoke", "gpu"))
        if slide is None:
            report.add({"name": "skipped", "step": "tiles, pipeline, rss", "why": "no her2st image or demo sample"})
            return 0
        if wanted("tiles") and suite.tile_patches:
            with step(report, "tile reading (plain image)"):
                tile_rows(report, suite, slide[0], slide[2], work, "image")
            with step(report, "tile reading (OpenSlide, pyramidal TIFF)"):
                tif = pyramidal_tiff(slide[0], slide[2], work / f"{slide[0].stem}.tif")
                tile_rows(report, suite, tif, slide[2], work, "openslide")
        if wanted("pipeline") and suite.overhead_spots:
            with step(report, "pipeline overhead"):
                pipeline_rows(report, suite, slide, work)
        if wanted("rss") and suite.rss_spots:
            with step(report, "peak RSS"):
                rss_rows(report, suite, slide, work)
    finally:
        report.write()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
