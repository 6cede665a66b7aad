"""Peak memory of `mmap-predict` as spots grow: Visium HD-like bins over a real slide read by OpenSlide.

    python benchmarks/scale_rss.py --spots 1000,5000,20000,100000 --json benchmarks/results/scale_rss_cpu.json

A real her2st H&E image is written once as a tiled pyramidal TIFF, so the slide
is read tile by tile through OpenSlide as a whole-slide scan would be (the
`rss` rows of `run.py` use the plain JPEG, which is decoded whole), and a grid
of bins is laid over it. Each run is a fresh `mmap-predict` process; its peak
RSS is the kernel's count for that process (see `harness.run_predict`).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from harness import grid_coords, pyramidal_tiff, run_predict  # noqa: E402

from mmap_deploy.preprocess import DEFAULT_MPP  # noqa: E402

REPO = Path(__file__).resolve().parents[1]


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spots", default="1000,5000,20000,100000")
    ap.add_argument("--section", default="C2")
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("MMAP_DATA_DIR", REPO.parent / "shared" / "data")))
    ap.add_argument("--work", type=Path, default=Path("/tmp/mmap-scale"))
    ap.add_argument("--model", type=Path, default=None, help="bundle (default: the demo bundle)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    from mmap_deploy.bundle import default_bundle_path
    from mmap_deploy.slide import open_slide

    bundle = args.model or default_bundle_path()
    args.work.mkdir(parents=True, exist_ok=True)
    slide = args.work / f"{args.section}.tif"
    if not slide.exists():
        pyramidal_tiff(args.data_dir / "her2st" / "images" / f"{args.section}.jpg", DEFAULT_MPP, slide, levels=4)
    with open_slide(slide) as s:
        width, height, margin = s.width, s.height, 150
    rows = []
    for n in [int(v) for v in args.spots.split(",")]:
        coords = grid_coords(args.work / f"bins_{n}.csv", width, height, n, margin)
        res = run_predict(slide, coords, bundle, args.work / f"out_{n}.h5ad", None)
        row = {"name": "peak_rss", "reader": "openslide", "spots": res["spots"], "wall_s": round(res["wall"], 2),
               "peak_rss_mb": round(res["maxrss_mib"] * 1.048576, 1),
               "spots_per_s": round(res["spots"] / res["wall"], 1)}
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "python": platform.python_version()},
        "slide": f"her2st {args.section} as a pyramidal TIFF ({width}x{height} px at {DEFAULT_MPP} µm/px)",
        "model": str(bundle),
        "results": rows,
    }
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
