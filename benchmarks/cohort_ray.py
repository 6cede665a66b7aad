"""Cohort throughput: the local batch vs `--ray` with 1 and with 2 workers, side by side in one run.

    python benchmarks/cohort_ray.py --json benchmarks/results/cohort_ray_cpu.json [--model BUNDLE]

Eight slides: 3000 x 3000 px crops of the six her2st images (two images give
a second, shifted crop), with their spots, written as JPEGs into a temporary
folder; the manifest gives the mpp (0.73, as the demo sample). Each
configuration runs the real `mmap-predict --manifest` command in a fresh
process, `--rounds` times in turn (local, ray 1, ray 2, local, ...), into an
empty output folder. Two times are reported per run, both from the command's
own stderr lines, timestamped as they arrive:
- `wall_s`: the whole command (for Ray: starting the local Ray and the
  workers included);
- `predict_s`: from the line saying the engines are loaded (for Ray: the
  first worker ready) to the summary line: the steady state a long cohort
  approaches;
and, per run, the stages' seconds summed over the slides (`per_slide_s`; `total` is predict_slide's,
from each output's `uns['mmap']['timings']`).
slides/min and the ratios to the local batch use the best round of each.
The CPU model and the load average (other processes share the machine) are
recorded with the numbers.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SECTIONS = ["B4", "C2", "C3", "C4", "C5", "C6"]
SIDE = 3000
MPP = 0.73
MARGIN = 112  # half the 224 px patch: spots whose patch lies inside the crop
# (section, shift of the window from the spots' centre, in px): 8 slides
SLIDES = [(s, (0, 0)) for s in SECTIONS] + [("B4", (1500, 1500)), ("C2", (-1500, -1500))]


def data_dir() -> Path:
    env = os.environ.get("MMAP_DATA_DIR")
    p = Path(env) if env else REPO.parent / "shared" / "data"
    if not (p / "her2st" / "images").is_dir():
        sys.exit(f"her2st images not found under {p}: set MMAP_DATA_DIR")
    return p


def make_cohort(data: Path, folder: Path) -> tuple[Path, int]:
    """The 8 crops, their spot tables and the manifest; returns (manifest, total spots)."""
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    lines, total = ["slide,coords,mpp,id"], 0
    for k, (section, (dx, dy)) in enumerate(SLIDES):
        img = Image.open(data / "her2st" / "images" / f"{section}.jpg")
        table = np.genfromtxt(data / "her2st" / "spots" / f"{section}_selection.tsv", delimiter="\t", names=True)
        xy = np.stack([table["pixel_x"], table["pixel_y"]], axis=1)
        cx, cy = np.median(xy, axis=0) + (dx, dy)
        left = int(np.clip(cx - SIDE / 2, 0, img.width - SIDE))
        top = int(np.clip(cy - SIDE / 2, 0, img.height - SIDE))
        local = xy - (left, top)
        inside = np.all((local >= MARGIN) & (local <= SIDE - MARGIN), axis=1)
        name = f"{section}_{k}"
        img.crop((left, top, left + SIDE, top + SIDE)).save(folder / f"{name}.jpg", quality=90)
        rows = [f"{x:.2f},{y:.2f},{name}_{i}" for i, (x, y) in enumerate(local[inside])]
        (folder / f"{name}.csv").write_text("x,y,barcode\n" + "\n".join(rows) + "\n")
        lines.append(f"{name}.jpg,{name}.csv,{MPP},{name}")
        total += len(rows)
    manifest = folder / "slides.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest, total


def run_config(args: list[str], manifest: Path, out: Path) -> dict:
    """One `mmap-predict --manifest` run in a fresh process; times from its stderr lines."""
    cmd = [sys.executable, "-m", "mmap_deploy.cli", "--manifest", str(manifest), "-o", str(out), "-q", *args]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stderr=subprocess.PIPE, text=True, cwd=REPO)
    t_ready = t_end = None
    log = []
    for line in proc.stderr:
        t = time.perf_counter() - t0
        log.append(line.rstrip())
        if t_ready is None and line.startswith(("engines:", "engines (each worker):")):
            t_ready = t
        if line.startswith("batch:"):
            t_end = t
    proc.wait()
    wall = time.perf_counter() - t0
    if proc.returncode != 0 or t_ready is None or t_end is None:
        raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}):\n" + "\n".join(log[-20:]))
    return {"wall_s": round(wall, 2), "predict_s": round(t_end - t_ready, 2),
            "summary": next(ln for ln in log if ln.startswith("batch:"))}


def slide_timings(out: Path) -> dict[str, float]:
    """Seconds per stage summed over the slides, from each output's uns['mmap']['timings']."""
    import anndata as ad

    total: dict[str, float] = {}
    for f in sorted(out.glob("*.h5ad")):
        timings = ad.read_h5ad(f, backed="r").uns["mmap"]["timings"]
        for key in ("open", "total", "read_wait", "encoder", "kmeans", "fusion", "thumbnail", "thumbnail_wait"):
            total[key] = round(total.get(key, 0.0) + float(timings.get(key, 0.0)), 2)
    return total


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(ln.split(":", 1)[1].strip() for ln in out.splitlines() if ln.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "cohort_ray_cpu.json")
    ap.add_argument("--model", type=Path, help="bundle (default: the demo bundle)")
    ap.add_argument("--rounds", type=int, default=2)
    a = ap.parse_args()
    # local_threads_2: the local batch with ONNX Runtime's threads given as a Ray worker gets them
    # (--threads 0 leaves ONNX Runtime its default pool, which pins its threads to cores)
    configs = {"local": [], "local_threads_2": ["--threads", "2"], "ray_1_worker": ["--ray", "--ray-workers", "1"],
               "ray_2_workers": ["--ray", "--ray-workers", "2"]}
    model = ["--model", str(a.model)] if a.model else []
    runs: dict[str, list[dict]] = {k: [] for k in configs}
    loads = [Path("/proc/loadavg").read_text().split()[:3]]
    with tempfile.TemporaryDirectory(prefix="mmap-cohort-") as tmp:
        tmp = Path(tmp)
        manifest, n_spots = make_cohort(data_dir(), tmp)
        n_slides = len(SLIDES)
        for r in range(a.rounds):
            for name, extra in configs.items():
                out = tmp / f"out_{name}_{r}"
                res = run_config(extra + model, manifest, out)
                res["load_after"] = Path("/proc/loadavg").read_text().split()[:3]
                res["per_slide_s"] = slide_timings(out)
                runs[name].append(res)
                print(f"round {r} {name}: {res}", file=sys.stderr)
        # the outputs agree across configurations (bit for bit X)
        import anndata as ad

        same = all(
            np.array_equal(ad.read_h5ad(tmp / "out_local_0" / f"{s}_{k}.h5ad").X,
                           ad.read_h5ad(tmp / f"out_{name}_0" / f"{s}_{k}.h5ad").X)
            for k, (s, _) in enumerate(SLIDES) for name in configs if name != "local")
    loads.append(Path("/proc/loadavg").read_text().split()[:3])
    best = {k: {"wall_s": min(x["wall_s"] for x in v), "predict_s": min(x["predict_s"] for x in v)}
            for k, v in runs.items()}
    table = {}
    for k, b in best.items():
        table[k] = {
            "slides_per_min_wall": round(60 * n_slides / b["wall_s"], 2),
            "slides_per_min_predict": round(60 * n_slides / b["predict_s"], 2),
            "ratio_vs_local_wall": round(best["local"]["wall_s"] / b["wall_s"], 3),
            "ratio_vs_local_predict": round(best["local"]["predict_s"] / b["predict_s"], 3),
        }
    result = {
        "what": "8 her2st crops (3000 px, mpp 0.73): local batch (default and --threads 2) vs --ray with 1 and 2 "
                "workers, interleaved rounds in one run",
        "machine": {"cpu_model": cpu_model(), "cores": os.cpu_count(), "python": platform.python_version(),
                    "load_average_before_after": loads,
                    "note": "the machine's cores are shared with other processes; see load averages"},
        "bundle": str(a.model) if a.model else "demo bundle (tiny ViT)",
        "n_slides": n_slides, "n_spots": n_spots, "rounds": a.rounds,
        "identical_X_across_configurations": bool(same),
        "best": best, "table": table, "runs": runs,
    }
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps(table, indent=2))


if __name__ == "__main__":
    main()
