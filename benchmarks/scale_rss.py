"""Peak memory of `mmap-predict` as the number of spots grows (Visium HD-like bins over a real slide).

    python benchmarks/scale_rss.py --spots 1000,5000,20000,100000 --json benchmarks/results/scale_rss.json

A real her2st H&E image is converted once into a tiled pyramidal TIFF (so the
slide is read through OpenSlide, tile by tile, as a whole-slide scan would be),
and a square grid of bins is laid over it at the pitch that gives the asked
number of spots. Each run is a separate `mmap-predict` process; its peak RSS
comes from the kernel's accounting of that child (wait4), not from sampling.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
HER2ST_MPP = 0.73


def default_data_dir() -> Path:
    env = os.environ.get("MMAP_DATA_DIR")
    return Path(env) if env else REPO.parent / "shared" / "data"


def her2st_pyramid(data_dir: Path, section: str, out: Path) -> Path:
    """The section's JPEG as a tiled, deflate-compressed pyramidal TIFF with resolution tags."""
    import tifffile
    from PIL import Image

    if out.exists():
        return out
    Image.MAX_IMAGE_PIXELS = None
    with Image.open(data_dir / "her2st" / "images" / f"{section}.jpg") as im:
        level0 = np.asarray(im.convert("RGB"))
    tmp = out.with_suffix(".tmp.tif")
    with tifffile.TiffWriter(tmp, bigtiff=True) as tw:
        level = level0
        for i in range(4):
            res = 1e4 / (HER2ST_MPP * 2**i)  # pixels per cm
            tw.write(level, tile=(256, 256), compression="zlib", photometric="rgb",
                     resolution=(res, res), resolutionunit="CENTIMETER", subfiletype=0 if i == 0 else 1)
            level = np.ascontiguousarray(level[::2, ::2])
    tmp.replace(out)
    return out


def bin_grid(width: int, height: int, n: int, margin: int = 150) -> np.ndarray:
    """About `n` bin centres on a square grid covering the slide (inside a margin)."""
    w, h = width - 2 * margin, height - 2 * margin
    pitch = np.sqrt(w * h / n)
    xs = np.arange(margin + pitch / 2, width - margin, pitch)
    ys = np.arange(margin + pitch / 2, height - margin, pitch)
    grid = np.stack(np.meshgrid(xs, ys), -1).reshape(-1, 2)
    return grid[:n]


def run_once(slide: Path, coords: Path, out: Path, bundle: str | None, threads: int, batch: int) -> dict:
    exe = Path(sys.executable).parent / "mmap-predict"
    cmd = [str(exe), str(slide), str(coords), "-o", str(out), "--overwrite", "-q",
           "--threads", str(threads), "--batch-size", str(batch)]
    if bundle:
        cmd += ["--model", bundle]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    stderr = proc.stderr.read()
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise RuntimeError(f"mmap-predict failed ({proc.returncode}):\n{stderr}")
    return {"wall_s": round(wall, 2), "peak_rss_mb": round(usage.ru_maxrss / 1024, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spots", default="1000,5000,20000,100000")
    ap.add_argument("--section", default="C2")
    ap.add_argument("--data-dir", type=Path, default=default_data_dir())
    ap.add_argument("--work", type=Path, default=Path("/tmp/mmap-scale"))
    ap.add_argument("--model", default=None, help="bundle (default: the demo bundle)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--convert-only", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.convert_only:
        her2st_pyramid(args.data_dir, args.section, args.work / f"{args.section}.tif")
        return 0

    import openslide

    args.work.mkdir(parents=True, exist_ok=True)
    slide = args.work / f"{args.section}.tif"
    if not slide.exists():
        # Converted in a child process: a child's peak RSS (ru_maxrss) counts the memory it
        # inherited at fork, so this process must stay small while it starts the runs.
        subprocess.run([sys.executable, __file__, "--convert-only", "--section", args.section,
                        "--data-dir", str(args.data_dir), "--work", str(args.work)], check=True)
    with openslide.OpenSlide(str(slide)) as s:
        width, height = s.dimensions
    rows = []
    for n in [int(v) for v in args.spots.split(",")]:
        xy = bin_grid(width, height, n)
        coords = args.work / f"bins_{n}.csv"
        coords.write_text("x,y,barcode\n" + "".join(f"{x:.1f},{y:.1f},bin_{i}\n" for i, (x, y) in enumerate(xy)))
        res = run_once(slide, coords, args.work / f"out_{n}.h5ad", args.model, args.threads, args.batch_size)
        row = {"name": "peak_rss", "spots": len(xy), **res, "spots_per_s": round(len(xy) / res["wall_s"], 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "slide": f"her2st {args.section} as a pyramidal TIFF ({width}x{height} px at {HER2ST_MPP} µm/px)",
        "model": args.model or "demo bundle",
        "results": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
