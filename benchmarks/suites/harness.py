"""What every benchmark suite shares: sizes, the machine, timing, result rows, slides and `mmap-predict` runs.

Rows go to a `Report`, which rewrites the JSON (and its markdown summary,
`summary.py`) after every row, so a run cut short keeps what it measured.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
import traceback
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import numpy as np
from summary import markdown, targets

from mmap_deploy.errors import first_line

REPO = Path(__file__).resolve().parents[2]


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
    gpu_batches: tuple[int, ...] = ()
    time_budget_s: float = 1200.0


@dataclass
class Context:
    """One run: what the suite functions get (its sizes, report, scratch folder, data, time budget)."""

    suite: Suite
    report: "Report"
    work: Path
    data_dir: Path | None
    deadline: float
    only: set[str] = field(default_factory=set)
    tiny_checkpoint: Path | None = None
    tiny_bundle: Path | None = None

    def wanted(self, step_name: str) -> bool:
        """Whether `--only` (empty: everything) asks for this step."""
        return not self.only or step_name in self.only


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
        from mmap_deploy.atomic import atomic_path

        with atomic_path(self.path) as tmp:
            tmp.write_text(json.dumps(data, indent=1) + "\n")
        self.path.with_suffix(".md").write_text(markdown(data))


@contextmanager
def step(report: Report, name: str):
    """Run one benchmark step; a failure is recorded as a row and the suite goes on."""
    t = time.perf_counter()
    print(f"== {name}", file=sys.stderr, flush=True)
    try:
        yield
    except Exception as e:  # a benchmark step must not lose the others
        report.add({"name": "error", "step": name, "error": first_line(e, with_type=True),
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
    from mmap_deploy.engines import tensorrt_importable

    ok, trt = tensorrt_importable()
    info["tensorrt"] = trt if ok else f"no: {trt}"
    return info


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


# -- slides and mmap-predict runs -------------------------------------------------
def her2st_slide(data_dir: Path | None, prefer_sample: bool = False) -> tuple[Path, Path, float] | None:
    """The B4 section's full-resolution image and spot table, or the packaged demo sample (a crop of it)."""
    from mmap_deploy.model.preprocess import DEFAULT_MPP

    if prefer_sample:
        try:
            from mmap_deploy.demo import sample_paths

            return sample_paths()
        except Exception:
            pass
    if data_dir is not None and (data_dir / "her2st" / "images" / "B4.jpg").is_file():
        return (data_dir / "her2st" / "images" / "B4.jpg", data_dir / "her2st" / "spots" / "B4_selection.tsv",
                DEFAULT_MPP)
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


def run_predict(slide: Path, coords: Path | None, bundle: Path, out: Path, mpp: float | None,
                extra: list[str] | None = None) -> dict[str, Any]:
    """`mmap-predict` in a fresh process (with `extra` options): wall time, peak RSS, and its own timings.

    `coords` None: no COORDS (a `--grid` run; give it in `extra`).
    """
    cmd = [sys.executable, "-m", "mmap_deploy.cli", str(slide), *([str(coords)] if coords else []), "-o", str(out),
           "--model", str(bundle), "-q", "--overwrite", *(extra or [])]
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
