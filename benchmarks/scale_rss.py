"""Peak memory of `mmap-predict` as spots grow: Visium HD-like bins over a real slide read by OpenSlide.

    python benchmarks/scale_rss.py --spots 1000,5000,20000,100000 --json benchmarks/results/scale_rss_cpu.json
    python benchmarks/scale_rss.py --layout visium-hd --spots 5000,100000,300000 --json benchmarks/results/scale_rss_visium_hd.json

A real her2st H&E image is written once as a tiled pyramidal TIFF, so the slide
is read tile by tile through OpenSlide as a whole-slide scan would be (the
`rss` rows of `run.py` use the plain JPEG, which is decoded whole), and a grid
of bins is laid over it. Each run is a fresh `mmap-predict` process; its peak
RSS is the kernel's count for that process (see `harness.run_predict`).

`--layout visium-hd` lays Visium HD bins instead: a Space Ranger
`binned_outputs/square_008um/` folder (`spatial/tissue_positions.parquet`,
`scalefactors_json.json`) with the bins on a true 8 µm square lattice, read
through the folder as a user would pass it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent / "suites"))
from harness import cpu_model, grid_coords, pyramidal_tiff, run_predict  # noqa: E402

from mmap_deploy.model.preprocess import DEFAULT_MPP  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
HD_BIN_UM = 8.0


def visium_hd_bins(folder: Path, width: int, height: int, n: int, mpp: float, bin_um: float = HD_BIN_UM) -> Path:
    """A Visium HD bin folder: n in-tissue bins in a square block at the slide's centre, on a true lattice."""
    import numpy as np
    import pyarrow as pa
    import pyarrow.parquet as pq

    spatial = folder / f"square_{int(bin_um):03d}um" / "spatial"
    spatial.mkdir(parents=True, exist_ok=True)
    side = int(np.ceil(np.sqrt(n)))
    pitch = bin_um / mpp
    if side * pitch > min(width, height) - 300:
        raise SystemExit(f"{n} bins of {bin_um} µm do not fit the slide")
    k = np.arange(n)
    row, col = k // side, k % side
    x0, y0 = (width - side * pitch) / 2, (height - side * pitch) / 2
    table = pa.table({
        "barcode": pa.array([f"s_{int(bin_um):03d}um_{r:05d}_{c:05d}-1" for r, c in zip(row, col)]),
        "in_tissue": pa.array(np.ones(n, np.int32)),
        "array_row": pa.array(row.astype(np.int64)),
        "array_col": pa.array(col.astype(np.int64)),
        "pxl_row_in_fullres": pa.array(y0 + row * pitch),
        "pxl_col_in_fullres": pa.array(x0 + col * pitch),
    })
    pq.write_table(table, spatial / "tissue_positions.parquet")
    (spatial / "scalefactors_json.json").write_text(json.dumps({
        "spot_diameter_fullres": bin_um / mpp, "bin_size_um": bin_um, "microns_per_pixel": mpp,
        "tissue_hires_scalef": 0.1, "tissue_lowres_scalef": 0.03, "fiducial_diameter_fullres": 100.0}))
    return spatial.parent


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spots", default="1000,5000,20000,100000")
    ap.add_argument("--section", default="C2")
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("MMAP_DATA_DIR", REPO.parent / "shared" / "data")))
    ap.add_argument("--work", type=Path, default=Path("/tmp/mmap-scale"))
    ap.add_argument("--model", type=Path, default=None, help="bundle (default: the demo bundle)")
    ap.add_argument("--json", type=Path, default=None)
    ap.add_argument("--layout", choices=["xy", "visium-hd"], default="xy",
                    help="xy: a grid in a plain x,y table; visium-hd: a binned_outputs/square_008um/ folder")
    args = ap.parse_args(argv)

    from mmap_deploy.inputs.slide import open_slide
    from mmap_deploy.model.bundle import default_bundle_path

    bundle = args.model or default_bundle_path()
    args.work.mkdir(parents=True, exist_ok=True)
    slide = args.work / f"{args.section}.tif"
    if not slide.exists():
        pyramidal_tiff(args.data_dir / "her2st" / "images" / f"{args.section}.jpg", DEFAULT_MPP, slide, levels=4)
    with open_slide(slide) as s:
        width, height, margin = s.width, s.height, 150
    rows = []
    for n in [int(v) for v in args.spots.split(",")]:
        if args.layout == "visium-hd":
            coords = visium_hd_bins(args.work / f"hd_{n}" / "binned_outputs", width, height, n, DEFAULT_MPP)
        else:
            coords = grid_coords(args.work / f"bins_{n}.csv", width, height, n, margin)
        load_before = os.getloadavg()
        res = run_predict(slide, coords, bundle, args.work / f"out_{n}.h5ad", None)
        row = {"name": "peak_rss", "reader": "openslide", "layout": args.layout, "spots": res["spots"],
               "wall_s": round(res["wall"], 2), "peak_rss_mb": round(res["maxrss_mib"] * 1.048576, 1),
               "spots_per_s": round(res["spots"] / res["wall"], 1),
               "load_average_before": [round(v, 2) for v in load_before],
               "load_average_after": [round(v, 2) for v in os.getloadavg()],
               "timings": {k: round(v, 2) for k, v in res["timings"].items()}}
        print(json.dumps(row), flush=True)
        rows.append(row)
    result = {
        "machine": {"platform": platform.platform(), "cpu": cpu_model(), "cpus": os.cpu_count(),
                    "python": platform.python_version()},
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
