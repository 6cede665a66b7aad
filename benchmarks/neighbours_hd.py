"""Time and peak memory of the neighbour smoothing on Visium HD-scale slides (issue 21).

    python benchmarks/neighbours_hd.py --json benchmarks/results/neighbours_hd_cpu.json

Each case is a fresh process: it lays N bins of 8 or 16 µm on a square
lattice (tilted by 1.5 degrees, as a scan rarely lines up with the slide's
axes), in pixels at 0.2738 µm/px with their array indices (what a Space Ranger
bin folder gives the runtime), fills an (N, 785) float32 prediction matrix,
then smooths it in place as `pipeline.predict_slide` does
(`neighbours.smooth_predictions`). Peak RSS is the kernel's count for the
process (`ru_maxrss`), read before and after the step: the step's extra
memory is the difference; the prediction matrix's own size is given beside
it. A KD-tree row (`--kdtree`) forces the pair-list path at a small size for
comparison (its memory grows with N x neighbours).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GENES = 785
MPP = 0.2738  # Visium HD's CytAssist-registered full-resolution images are about this


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def one_case(bins: int, bin_um: float, radius_um: float, weight: float, kdtree: bool) -> dict:
    import numpy as np

    import mmap_deploy.model.neighbours as nb

    side = int(np.ceil(np.sqrt(bins)))
    k = np.arange(bins)
    array_xy = np.stack([k % side, k // side], axis=1).astype(np.float64)
    th = np.deg2rad(1.5)
    rot = np.array([[np.cos(th), -np.sin(th)], [np.sin(th), np.cos(th)]])
    xy_px = 5000.0 + (array_xy * (bin_um / MPP)) @ rot.T
    pred = np.random.default_rng(0).random((bins, GENES), dtype=np.float32)
    before = _rss_mb()
    t = time.perf_counter()
    smoothing = nb.NeighbourSmoothing(radius_um, weight)
    neighbours = nb.Neighbours(xy_px * MPP, radius_um, array_xy, method="kdtree" if kdtree else "auto")
    t_build = time.perf_counter() - t
    neighbours.smooth(pred, smoothing.weight, out=pred)
    seconds = time.perf_counter() - t
    after = _rss_mb()
    return {"bins": bins, "bin_um": bin_um, "radius_um": radius_um, "weight": weight, "genes": GENES,
            "method": neighbours.method, "mean_neighbours": round(float(neighbours.counts.mean()), 1),
            "seconds": round(seconds, 2), "seconds_build": round(t_build, 2),
            "prediction_mb": round(pred.nbytes / 2**20, 1), "peak_rss_before_mb": round(before, 1),
            "peak_rss_after_mb": round(after, 1), "extra_peak_rss_mb": round(after - before, 1),
            "checksum": float(pred[:: max(1, bins // 1000)].astype(np.float64).sum())}


def cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--json", required=True, help="Where to write the rows.")
    ap.add_argument("--bins", default="100000,400000", help="Comma-separated numbers of bins.")
    ap.add_argument("--bin-um", default="8,16", help="Comma-separated bin sizes in µm.")
    ap.add_argument("--radius-um", type=float, default=300.0)
    ap.add_argument("--weight", type=float, default=1.0)
    ap.add_argument("--kdtree", type=int, default=20000, help="Bins of the KD-tree comparison row (0: none).")
    ap.add_argument("--case", help=argparse.SUPPRESS)  # internal: one case, in this process
    args = ap.parse_args()
    if args.case:
        bins, bin_um, kd = args.case.split(":")
        print(json.dumps(one_case(int(bins), float(bin_um), args.radius_um, args.weight, kd == "kd")))
        return
    cases = [f"{b}:{u}:lattice" for u in args.bin_um.split(",") for b in args.bins.split(",")]
    if args.kdtree:
        cases += [f"{args.kdtree}:16:kd", f"{args.kdtree}:16:lattice"]
    rows = []
    out = Path(args.json)
    for case in cases:
        load = list(os.getloadavg())
        got = subprocess.run([sys.executable, __file__, "--json", "-", "--case", case, "--radius-um",
                              str(args.radius_um), "--weight", str(args.weight)],
                             capture_output=True, text=True, check=True, cwd=REPO)
        row = {**json.loads(got.stdout.strip().splitlines()[-1]), "load_average_before": load}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps({
            "machine": {"cpu": cpu_model(), "cpus": os.cpu_count(), "python": platform.python_version(),
                        "note": "fresh process per row; the FFTs on all cores (scipy.fft workers=-1)"},
            "command": " ".join(["python", "benchmarks/neighbours_hd.py", *sys.argv[1:]]),
            "measured_at": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
            "rows": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
