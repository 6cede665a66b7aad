"""Writing one slide's output: `.h5ad` vs `.zarr` (SpatialData), seconds and peak RSS, side by side.

    python benchmarks/spatialdata_write.py --json OUT.json [--spots 120,100000] [--genes 785] [--repeats 3]

Each (format, spots) runs in its own process, so its peak RSS is its own; the
AnnData is the layout `build_anndata` makes (random values, a 2000 px thumbnail).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path


def _one(fmt: str, n: int, genes: int, repeats: int) -> dict:
    import numpy as np

    from mmap_deploy.outputs.adata import build_anndata, write_output
    from mmap_deploy.outputs.prediction import SlidePrediction

    rng = np.random.default_rng(0)
    side = int(np.ceil(np.sqrt(n)))
    gx, gy = np.meshgrid(np.arange(side), np.arange(side))
    xy = (np.stack([gx.ravel(), gy.ravel()], axis=1)[:n] * 20.0 + 100.0).astype(np.float64)
    pred = SlidePrediction(
        spot_ids=[f"s{i}" for i in range(n)], xy=xy,
        prediction=rng.standard_normal((n, genes)).astype(np.float32),
        embedding=rng.standard_normal((n, 64)).astype(np.float32), clusters=np.arange(n) % 80, n_prototypes=80,
        bank_size=40, genes=[f"G{i}" for i in range(genes)], dropped=[], timings={}, engines={},
    )
    thumb = rng.integers(0, 255, (2000, 2000, 3), dtype=np.uint8)
    adata = build_anndata(pred, thumb, 2000 / (side * 20.0 + 200), library_id="S1", slide_mpp=0.5,
                          patch_um=160.0, provenance={"mpp": 0.5})
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    seconds = []
    with tempfile.TemporaryDirectory() as d:
        for _ in range(repeats):
            t = time.perf_counter()
            out = write_output(adata, Path(d) / f"o.{fmt}", overwrite=True)
            seconds.append(time.perf_counter() - t)
        size = sum(p.stat().st_size for p in out.rglob("*") if p.is_file()) if out.is_dir() else out.stat().st_size
    return {"format": fmt, "spots": n, "genes": genes, "seconds": seconds, "best_s": min(seconds),
            "bytes": size, "peak_rss_mib_before_write": round(rss_before, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", type=Path, required=True)
    p.add_argument("--spots", default="120,100000")
    p.add_argument("--genes", type=int, default=785)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--one", help=argparse.SUPPRESS)  # internal: "fmt,n" in a child process
    a = p.parse_args()
    if a.one:
        fmt, n = a.one.split(",")
        print(json.dumps(_one(fmt, int(n), a.genes, a.repeats)))
        return
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    load_start = Path("/proc/loadavg").read_text().strip()
    rows = []
    for n in [int(v) for v in a.spots.split(",")]:
        for fmt in ("h5ad", "zarr"):  # side by side, one after the other
            out = subprocess.run([sys.executable, __file__, "--json", str(a.json), "--one", f"{fmt},{n}",
                                  "--genes", str(a.genes), "--repeats", str(a.repeats)],
                                 capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(rows[-1], flush=True)
    result = {"benchmark": "output write: h5ad vs zarr (SpatialData)", "cpu": cpu, "cores": os.cpu_count(),
              "loadavg_start_end": [load_start, Path("/proc/loadavg").read_text().strip()], "rows": rows}
    a.json.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
