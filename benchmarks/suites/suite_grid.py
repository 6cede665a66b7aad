"""`--suite grid`: slides with no spatial assay (tissue detection, the spot grid, `--grid` end to end).

Rows:
- `tissue_detect`: `detect_tissue` wall time on whole 40x-style slides
  (JPEG-tiled pyramids at 0.25 µm/px, levels 1/4/16/64) of growing size, with
  the pyramid level it read and the tissue it found.
- `grid_build`: `lay_grid` wall time for about 1 000 000 bins (8 µm over
  8 mm x 8 mm of tissue) and for the Visium and ST lattices over the same mask.
- `grid_e2e`: `mmap-predict SLIDE --grid G` in a fresh process, for G in visium,
  32um, 16um, over the same tissue scanned at 0.25 and at 0.7 µm/px: spots,
  spots/s, peak RSS, and the run's own timings (tissue detection included).

The slides are made from a her2st section (real tissue, its glass, its faint
ST spot array) placed on glass in µm (`tests/wsi.py`), so both scans hold the
same tissue at the same place.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import numpy as np
from harness import REPO, Context, run_predict, step

sys.path.insert(0, str(REPO / "tests"))
from wsi import Section, load_section, whole_slide  # noqa: E402

# her2st C6: ~0.69 µm per pixel (HEST-1k: 0.698)
SECTION_MPP = 0.69


def _section(data_dir: Path | None, at_um: tuple[float, float], crop=None) -> Section:
    if data_dir is not None and (data_dir / "her2st" / "images" / "C6.jpg").is_file():
        return load_section(data_dir / "her2st" / "images" / "C6.jpg", SECTION_MPP, at_um, crop)
    from mmap_deploy.demo import sample_paths

    slide, _, mpp = sample_paths()
    return load_section(slide, mpp, at_um)


def detect_rows(ctx: Context, sizes_mm: tuple[float, ...]) -> None:
    from mmap_deploy.inputs.slide import open_slide
    from mmap_deploy.inputs.tissue import detect_tissue

    for size in sizes_mm:
        # one section per 6.4 mm square of slide, on a regular layout
        n = max(1, int(round(size / 6.4)))
        sections = [_section(ctx.data_dir, (500.0 + i * 6400.0, 500.0 + j * 6400.0), (1000, 1000, 8300, 8300))
                    for i in range(n) for j in range(n)]
        path = ctx.work / f"wsi_{size:g}mm.tif"
        t = time.perf_counter()
        whole_slide(path, sections, (size * 1000.0, size * 1000.0), 0.25)
        write_s = time.perf_counter() - t
        del sections
        with open_slide(path) as slide:
            best = None
            for _ in range(3):
                tissue = detect_tissue(slide)
                best = tissue.seconds if best is None else min(best, tissue.seconds)
            ctx.report.add({"name": "tissue_detect", "slide_mm": size, "level0_px": [slide.width, slide.height],
                            "mpp": slide.mpp, "level_read": tissue.level, "seconds_best_of_3": round(best, 3),
                            "tissue_mm2": round(tissue.area_mm2, 2), "pieces": tissue.pieces,
                            "sections_placed": n * n, "slide_write_s": round(write_s, 1)})
        path.unlink()


def build_rows(ctx: Context) -> None:
    from mmap_deploy.inputs.grid import lay_grid, parse_grid

    # a disc of 4.5 mm radius (~64 mm2) on a mask of 8 µm per pixel over a 12 mm square slide at 0.25 µm/px
    mpp, mask_um = 0.25, 8.0
    side = int(12000 / mask_um)
    yy, xx = np.mgrid[:side, :side]
    mask = (xx - side / 2) ** 2 + (yy - side / 2) ** 2 <= (4500 / mask_um) ** 2
    labels = mask.astype(np.int32)
    scale = mpp / mask_um
    for name in ("8um", "16um", "visium", "st"):
        times = []
        for _ in range(3):
            t = time.perf_counter()
            grid = lay_grid(parse_grid(name), width_px=int(12000 / mpp), height_px=int(12000 / mpp), mpp=mpp,
                            mask=mask, scale_x=scale, scale_y=scale, labels=labels, max_spots=5_000_000)
            times.append(time.perf_counter() - t)
        ctx.report.add({"name": "grid_build", "grid": name, "spots": len(grid.xy), "tissue_mm2": round(
            float(mask.sum()) * (mask_um / 1000) ** 2, 2), "seconds_best_of_3": round(min(times), 3)})


def e2e_rows(ctx: Context, grids: tuple[str, ...], mpps: tuple[float, ...]) -> None:
    from mmap_deploy.model.bundle import default_bundle_path

    bundle = default_bundle_path()
    section = _section(ctx.data_dir, (400.0, 400.0), (2500, 2500, 6500, 6500))  # ~2.8 mm square of tissue
    for mpp in mpps:
        slide = whole_slide(ctx.work / f"e2e_{mpp:g}.tif", [section], (3600.0, 3600.0), mpp)
        for g in grids:
            res = run_predict(slide, None, bundle, ctx.work / f"grid_{g}_{mpp:g}.h5ad", None, ["--grid", g])
            t = res["timings"]
            ctx.report.add({"name": "grid_e2e", "grid": g, "mpp": mpp, "spots": res["spots"],
                            "wall_s": round(res["wall"], 2), "spots_per_s": round(res["spots"] / res["wall"], 1),
                            "peak_rss_mib": round(res["maxrss_mib"], 1),
                            "tissue_s": round(t.get("tissue", -1.0), 3), "grid_s": round(t.get("grid", -1.0), 3),
                            "timings": {k: round(v, 3) for k, v in t.items()}})
        slide.unlink()


def grid_suite(ctx: Context) -> None:
    small = ctx.suite.name == "grid-smoke"
    if ctx.wanted("detect"):
        with step(ctx.report, "tissue detection by slide size"):
            detect_rows(ctx, (6.4,) if small else (6.4, 12.8, 25.6))
    if ctx.wanted("build"):
        with step(ctx.report, "grid building"):
            build_rows(ctx)
    if ctx.wanted("e2e"):
        with step(ctx.report, "--grid end to end"):
            e2e_rows(ctx, ("visium",) if small else ("visium", "32um", "16um"), (0.7,) if small else (0.25, 0.7))
