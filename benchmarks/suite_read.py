"""`tile_read` rows: patches/s (patch read + three views, what the pipeline's reader threads do) by
thread count, for the plain-image and the OpenSlide readers."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np

from harness import Report, Suite


def tile_rows(report: Report, suite: Suite, slide_path: Path, mpp: float, work: Path, fmt: str) -> None:
    from concurrent.futures import ThreadPoolExecutor

    from threadpoolctl import threadpool_limits

    from mmap_deploy.preprocess import ViewSpec, make_views
    from mmap_deploy.slide import open_slide

    spec = ViewSpec()
    t = time.perf_counter()
    slide = open_slide(slide_path, mpp=mpp)
    open_s = time.perf_counter() - t
    rng = np.random.default_rng(0)
    margin = spec.patch_um / slide.mpp
    xs = rng.uniform(margin, slide.width - margin, suite.tile_patches)
    ys = rng.uniform(margin, slide.height - margin, suite.tile_patches)

    def one(i: int) -> None:
        make_views(slide.read_patch(float(xs[i]), float(ys[i]), spec), spec)

    try:
        with threadpool_limits(limits=1, user_api="blas"):  # as the pipeline's readers do
            for threads in suite.tile_threads:
                with ThreadPoolExecutor(threads) as pool:
                    list(pool.map(one, range(min(8, suite.tile_patches))))  # warm caches
                    t = time.perf_counter()
                    list(pool.map(one, range(suite.tile_patches)))
                    sec = time.perf_counter() - t
                report.add({"name": "tile_read", "reader": fmt, "slide": slide_path.name, "threads": threads,
                            "patches": suite.tile_patches, "patches_per_s": round(suite.tile_patches / sec, 1),
                            "open_seconds": round(open_s, 3), "includes": "read_patch + make_views"})
    finally:
        slide.close()
