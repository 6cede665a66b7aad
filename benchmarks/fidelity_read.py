"""Views of the band reader against the per-spot reader on the real her2st images.

    python benchmarks/fidelity_read.py --json F [--mpp 0.698]

For every spot of the six her2st sections with images (their own spot
tables), the three views from `read_patch` + `make_views` and from the band
reader; rows: mean absolute difference per view (grey levels), the largest
difference, and the share of pixels that differ at all.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

import numpy as np

SECTIONS = ("B4", "C2", "C3", "C4", "C5", "C6")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--mpp", type=float, default=0.698)
    ap.add_argument("--data-dir", type=Path,
                    default=Path(os.environ.get("MMAP_DATA_DIR", Path(__file__).resolve().parents[2] / "shared" / "data")))
    args = ap.parse_args(argv)
    from threadpoolctl import threadpool_limits

    from mmap_deploy.inputs.bands import read_spot_views
    from mmap_deploy.inputs.coords import read_coords
    from mmap_deploy.inputs.slide import open_slide
    from mmap_deploy.model.bundle import default_bundle_path, load_bundle
    from mmap_deploy.model.preprocess import make_views

    spec = load_bundle(default_bundle_path()).manifest.view
    rows = []
    for section in SECTIONS:
        her2st = args.data_dir / "her2st"
        spots = read_coords(her2st / "spots" / f"{section}_selection.tsv")
        xy = np.asarray(spots.xy, np.float64)
        with open_slide(her2st / "images" / f"{section}.jpg", mpp=args.mpp) as slide, \
                threadpool_limits(1, user_api="blas"):
            ref = np.stack([make_views(slide.read_patch(x, y, spec), spec) for x, y in xy])
            new = np.empty_like(ref)
            for chunk in read_spot_views(slide, xy, spec, reader="tile_once"):
                new[chunk.rows] = chunk.views
        d = np.abs(ref.astype(np.int16) - new.astype(np.int16))
        row = {"section": section, "spots": len(xy), "mpp": args.mpp,
               "mad_per_view": [round(float(v), 4) for v in d.mean(axis=(0, 2, 3, 4))],
               "max_abs": int(d.max()), "share_differing": round(float((d > 0).mean()), 4)}
        rows.append(row)
        print(json.dumps(row), file=sys.stderr, flush=True)
    args.json.write_text(json.dumps({"rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
