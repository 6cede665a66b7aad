"""`pipeline_overhead` rows (wall time of `mmap-predict` outside the engines, per spot) and `rss` rows
(its peak resident memory by number of spots), each a fresh `mmap-predict` process on a tiny model."""

from __future__ import annotations

from pathlib import Path

from harness import Report, Suite, grid_coords, run_predict
from models import tiny_bundle


def pipeline_rows(report: Report, suite: Suite, slide: tuple[Path, Path, float], work: Path) -> None:
    from mmap_deploy.inputs.slide import open_slide

    image, coords, mpp = slide
    bundle = tiny_bundle(work)
    with open_slide(image, mpp=mpp) as s:
        width, height = s.width, s.height
        margin = 0.5 * 165 / s.mpp
    cases = [(image, "her2st spots", coords)]
    for n in suite.overhead_spots:
        grid = grid_coords(work / f"grid_{n}.csv", width, height, n, margin)
        cases.append((image, f"grid {n}", grid))
        tif = work / f"{image.stem}.tif"  # written by the tile-reading step
        if tif.is_file():
            cases.append((tif, f"grid {n}", grid))
    for slide_path, what, path in cases:
        res = run_predict(slide_path, path, bundle, work / "out.h5ad", mpp)
        t = res["timings"]
        engines = t.get("encoder", 0.0) + t.get("fusion", 0.0)
        report.add({"name": "pipeline_overhead", "slide": slide_path.name, "coords": what, "spots": res["spots"],
                    "ms_per_spot": round(1e3 * (res["wall"] - engines) / res["spots"], 3),
                    "wall_s": round(res["wall"], 2), "engines_s": round(engines, 2),
                    "breakdown_s": {k: round(v, 3) for k, v in t.items()},
                    "model": "tiny (random weights)", "includes": "process start, imports, slide decode, write"})


def rss_rows(report: Report, suite: Suite, slide: tuple[Path, Path, float], work: Path) -> None:
    from mmap_deploy.inputs.slide import open_slide

    image, _, mpp = slide
    bundle = tiny_bundle(work)
    with open_slide(image, mpp=mpp) as s:
        width, height, margin = s.width, s.height, 0.5 * 165 / s.mpp
    for n in suite.rss_spots:
        coords = grid_coords(work / f"rss_{n}.csv", width, height, n, margin)
        res = run_predict(image, coords, bundle, work / "out.h5ad", mpp)
        report.add({"name": "rss", "slide": image.name, "spots": res["spots"],
                    "peak_rss_mib": round(res["maxrss_mib"], 1), "wall_s": round(res["wall"], 2),
                    "model": "tiny (random weights)"})
