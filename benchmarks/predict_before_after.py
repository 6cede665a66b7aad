"""`mmap-predict` of two checkouts back to back: wall time and agreement of the predictions.

    python benchmarks/predict_before_after.py --before ../main --after . --json F [--cases demo,her2st,hd16]

Each case runs the `before` checkout's `mmap-predict`, then the `after`
checkout's, in fresh processes (PYTHONPATH puts each checkout's packages
first), with the demo bundle. Rows: wall seconds of each and their ratio; the
Pearson r of every gene's predictions between the two (the worst gene named);
whether the spot order and ids agree. Cases:

- `demo`: the packaged demo sample (a her2st B4 crop, mpp from its EXIF);
- `her2st`: the six her2st sections with images, their own spots, --mpp 0.698;
- `hd16`: her2st C6 with a 16 µm grid of 50 000 bins (benchmarks/suites/suite_read.py).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
SECTIONS = ("B4", "C2", "C3", "C4", "C5", "C6")
HER2ST_MPP = 0.698


def _env(checkout: Path, links: Path) -> dict[str, str]:
    links.mkdir(parents=True, exist_ok=True)
    for pkg, src in (("mmap_deploy", "mmap_deploy"), ("mmap_train", "train"), ("mmap_export", "export")):
        (links / pkg).symlink_to(checkout / src)
    env = dict(os.environ, PYTHONPATH=f"{links}:{os.environ.get('PYTHONPATH', '')}")
    return env


def _start(env: dict, slide: Path, coords: Path, out: Path, bundle: Path, mpp: float | None) -> tuple:
    cmd = [sys.executable, "-m", "mmap_deploy.cli", str(slide), str(coords), "-o", str(out), "--model", str(bundle),
           "-q", "--overwrite"] + (["--mpp", str(mpp)] if mpp else [])
    # cwd: `python -m` puts the working directory first on sys.path; it must not hold a checkout
    proc = subprocess.Popen(cmd, env=env, cwd=out.parent, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    return proc, cmd, time.perf_counter()


def _wait(started: tuple) -> float:
    proc, cmd, t = started
    _, err = proc.communicate()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {proc.returncode}: {err[-800:]}")
    return time.perf_counter() - t


def _compare(a_path: Path, b_path: Path) -> dict:
    import anndata

    a, b = anndata.read_h5ad(a_path), anndata.read_h5ad(b_path)
    same_order = list(a.obs_names) == list(b.obs_names)
    xa, xb = np.asarray(a.X, np.float64), np.asarray(b.X, np.float64)
    xa, xb = xa - xa.mean(0), xb - xb.mean(0)
    den = np.sqrt((xa**2).sum(0) * (xb**2).sum(0))
    r = np.where(den > 0, (xa * xb).sum(0) / np.where(den > 0, den, 1), 1.0)
    worst = int(np.argmin(r))
    keys = ("read_threads", "read_wait", "encoder", "total")
    t_a, t_b = dict(a.uns["mmap"]["timings"]), dict(b.uns["mmap"]["timings"])
    return {"timings_before_s": {k: round(float(t_a[k]), 1) for k in keys if k in t_a},
            "timings_after_s": {k: round(float(t_b[k]), 1) for k in keys if k in t_b},
            "spots": int(a.n_obs), "same_spot_order": same_order, "r_min": round(float(r[worst]), 6),
            "r_median": round(float(np.median(r)), 6), "worst_gene": str(a.var_names[worst]),
            "max_abs_diff": round(float(np.abs(np.asarray(a.X) - np.asarray(b.X)).max()), 5)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", type=Path, required=True)
    ap.add_argument("--after", type=Path, required=True)
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--cases", default="demo,her2st,hd16")
    ap.add_argument("--bins", type=int, default=50_000, help="bins of the hd16 case")
    ap.add_argument("--side-by-side", action="store_true", help="run before and after at the same time")
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("MMAP_DATA_DIR", HERE.parents[1] / "shared" / "data")))
    args = ap.parse_args(argv)
    sys.path.insert(0, str(HERE / "suites"))
    from suite_read import hd_grid, write_coords

    work = Path(tempfile.mkdtemp(prefix="mmap-before-after-"))
    env_b, env_a = _env(args.before.resolve(), work / "before"), _env(args.after.resolve(), work / "after")
    bundle = args.after.resolve() / "mmap_deploy" / "demo" / "bundle"
    her2st = args.data_dir / "her2st"
    cases = []
    wanted = set(args.cases.split(","))
    if "demo" in wanted:
        sample = args.after.resolve() / "mmap_deploy" / "demo" / "sample"
        cases.append(("demo", sample / "B4_crop.jpg", sample / "B4_crop_selection.tsv", None))
    if "her2st" in wanted:
        cases += [(s, her2st / "images" / f"{s}.jpg", her2st / "spots" / f"{s}_selection.tsv", HER2ST_MPP)
                  for s in SECTIONS]
    if "hd16" in wanted:
        from PIL import Image

        Image.MAX_IMAGE_PIXELS = None
        with Image.open(her2st / "images" / "C6.jpg") as im:
            w, h = im.size
        coords = write_coords(work / "hd16.csv", hd_grid(w, h, HER2ST_MPP, args.bins))
        cases.append((f"C6 hd16 {args.bins} bins", her2st / "images" / "C6.jpg", coords, HER2ST_MPP))
    rows = []
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    cpu = next((line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")), "?")
    for name, slide, coords, mpp in cases:
        load0 = os.getloadavg()[0]
        if args.side_by_side:  # both at once: load from other processes hits them alike
            b, a = (_start(env_b, slide, coords, work / "before.h5ad", bundle, mpp),
                    _start(env_a, slide, coords, work / "after.h5ad", bundle, mpp))
            while b[0].poll() is None and a[0].poll() is None:  # time the first to finish when it does
                time.sleep(0.2)
            first_b = b[0].poll() is not None
            t_first = _wait(b if first_b else a)
            t_second = _wait(a if first_b else b)
            t_before, t_after = (t_first, t_second) if first_b else (t_second, t_first)
            load1 = load0
        else:
            t_before = _wait(_start(env_b, slide, coords, work / "before.h5ad", bundle, mpp))
            load1 = os.getloadavg()[0]
            t_after = _wait(_start(env_a, slide, coords, work / "after.h5ad", bundle, mpp))
        row = {"case": name, "slide": slide.name, "mpp": mpp or "from EXIF", "side_by_side": args.side_by_side,
               "before_s": round(t_before, 2),
               "after_s": round(t_after, 2), "speedup": round(t_before / t_after, 2), "cpu": cpu,
               "load_avg_1m": [round(load0, 2), round(load1, 2), round(os.getloadavg()[0], 2)]}
        row.update(_compare(work / "before.h5ad", work / "after.h5ad"))
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
        args.json.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
