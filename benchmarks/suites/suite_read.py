"""Tile reading. `--suite read`: spots/s of patches + views, the per-spot reader against the band reader;
and `tile_rows` (the cpu/gpu suites): patches/s of the per-spot reader by thread count.

Layouts over a real her2st image (C6, 0.698 µm/px as HEST-1k estimates):
`visium`, a 100 µm hexagonal grid of 5 000 spots over the whole section, and
`hd16`, a square 16 µm grid of 50 000 bins (Visium HD's binning) in its centre;
each read through OpenSlide (the image as a tiled pyramidal TIFF) and as the
plain JPEG. The two readers of one slide, layout and thread count run in
alternating rounds, so load from other processes hits both alike; the row
keeps the best round of each.

- `per_spot`: `read_patch` + `make_views` per spot on a thread pool (what the
  pipeline did before the band reader), on a contiguous run of 300 of the
  layout's spots (in grid order, so OpenSlide's tile cache helps as in a full
  run): each spot costs the same wherever it lies.
- `tile_once`: `bands.read_spot_views(reader="tile_once")` on a run of whole
  grid rows (2 500 Visium spots, 4 000 bins: the layout's density, so the
  same sharing of tiles as the whole grid). Timing every spot of both layouts
  at 1 and 2 threads, twice, would take an hour on a shared 2-core box.

`tile_read_coverage` rows (one thread): random spots at rising coverage
(patch area x spots / slide area), both readers on the same spots: where the
band reader starts to win (`bands.MIN_COVERAGE`), through each decoder.

Slide backends: the same pyramid through OpenSlide and tifffile (`open_slide(reader=...)`),
zlib tiles and JPEG tiles (quality 90, what scanners write), beside the plain
JPEG. `slide_read` rows time what a slide costs besides its spots: opening it,
the 2 000 px thumbnail and tissue detection (best of the rounds).
`tile_read` rows with reader `per_spot (tiffslide)` read the same patches
through tiffslide's `read_region` (zarr over tifffile), the alternative to a
tifffile backend of our own, measured here only.
"""

from __future__ import annotations

import math
import os
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

SLIDE_SECTION = "C6"
SLIDE_MPP = 0.698
VISIUM_PITCH_UM = 100.0
VISIUM_SPOTS = 5000
HD_PITCH_UM = 16.0
HD_BINS = 50_000


def visium_grid(width: int, height: int, mpp: float, n: int = VISIUM_SPOTS) -> np.ndarray:
    """n spot centres on a hexagonal 100 µm lattice from the top-left of the slide, row by row."""
    pitch = VISIUM_PITCH_UM / mpp
    rows = []
    r = 0
    while len(rows) < n:
        y = pitch / 2 + r * pitch * math.sqrt(3) / 2
        if y >= height:
            raise ValueError(f"a {width}x{height} px slide holds fewer than {n} spots at {VISIUM_PITCH_UM} µm")
        xs = np.arange(pitch / 2 + (r % 2) * pitch / 2, width, pitch)
        rows += [(x, y) for x in xs]
        r += 1
    return np.asarray(rows[:n])


def hd_grid(width: int, height: int, mpp: float, n: int = HD_BINS, pitch_um: float = HD_PITCH_UM) -> np.ndarray:
    """n bin centres on a square grid (16 µm: Visium HD's bins) centred on the slide, row by row."""
    pitch = pitch_um / mpp
    side = int(math.ceil(math.sqrt(n)))
    x0 = width / 2 - side * pitch / 2
    y0 = height / 2 - side * pitch / 2
    g = np.arange(side) * pitch
    xy = np.stack(np.meshgrid(x0 + g, y0 + g), -1).reshape(-1, 2)
    return xy[:n]


def write_coords(path: Path, xy: np.ndarray) -> Path:
    path.write_text("x,y\n" + "".join(f"{x:.2f},{y:.2f}\n" for x, y in xy))
    return path


def _per_spot(slide, xy: np.ndarray, spec, threads: int) -> float:
    from mmap_deploy.model.preprocess import make_views

    def one(i: int) -> None:
        make_views(slide.read_patch(float(xy[i, 0]), float(xy[i, 1]), spec), spec)

    with ThreadPoolExecutor(threads) as pool:
        t = time.perf_counter()
        list(pool.map(one, range(len(xy))))
        return time.perf_counter() - t


def _tile_once(slide, xy: np.ndarray, spec, threads: int) -> float:
    from mmap_deploy.inputs.bands import read_spot_views

    t = time.perf_counter()
    n = sum(len(c.rows) for c in read_spot_views(slide, xy, spec, workers=threads, reader="tile_once"))
    assert n == len(xy)
    return time.perf_counter() - t


def _runs(xy: np.ndarray, layout: str, per_spot_n: int, tile_once_n: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Contiguous runs of the grid (row order) for each reader; tile_once rounded to whole rows."""
    mid = len(xy) // 2
    a = xy[mid : mid + per_spot_n]
    if tile_once_n is None or tile_once_n >= len(xy):
        return a, xy
    row_len = int(np.sum(np.isclose(xy[:, 1], xy[0, 1])))
    rows = max(1, -(-tile_once_n // row_len))
    start = (mid // row_len) * row_len
    return a, xy[start : start + rows * row_len]


def coverage_rows(report: Any, slide, spec, label: str) -> None:
    """Where the band reader starts to win on a tiled slide: random spots at rising coverage
    (patch area x spots / slide area), one thread, both readers on the same spots."""
    from threadpoolctl import threadpool_limits

    from mmap_deploy.inputs.bands import plan_reads

    side = plan_reads(slide, np.zeros((1, 2)), spec).n
    rng = np.random.default_rng(0)
    for coverage in (0.25, 0.5, 1.0, 2.0):
        n = max(2, int(round(coverage * slide.width * slide.height / side**2)))
        xy = rng.uniform((0, 0), (slide.width, slide.height), (n, 2))
        xy = xy[np.argsort(xy[:, 1])]  # in reading order, so per-spot reads share OpenSlide's tile cache too
        with threadpool_limits(limits=1, user_api="blas"):
            t_spot = _per_spot(slide, xy, spec, 1) / n
            t_band = _tile_once(slide, xy, spec, 1) / n
        report.add({"name": "tile_read_coverage", "slide": label, "coverage": coverage, "spots": n,
                    "per_spot_per_s": round(1 / t_spot, 1), "tile_once_per_s": round(1 / t_band, 1),
                    "tile_once_over_per_spot": round(t_spot / t_band, 2), "threads": 1,
                    "load_avg_1m": round(os.getloadavg()[0], 2)})


def jpeg_pyramid(image: Path, mpp: float, out: Path) -> Path:
    """The image as a JPEG-tiled pyramidal TIFF (quality 90, levels 1/2/4), what a scanner writes."""
    import tifffile
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None  # a whole her2st section is 92 MP: trusted input here
    rgb = np.asarray(Image.open(image).convert("RGB"))
    with tifffile.TiffWriter(out, bigtiff=False) as tw:
        for i in range(3):
            res = 1e4 / (mpp * 2**i)
            tw.write(np.ascontiguousarray(rgb[:: 2**i, :: 2**i]), tile=(256, 256), compression="jpeg",
                     compressionargs={"level": 90}, photometric="rgb", resolution=(res, res),
                     resolutionunit="CENTIMETER", subfiletype=0 if i == 0 else 1)
    return out


def slide_rows(report: Any, slide, label: str, rounds: int) -> None:
    """`slide_read`: seconds to open the slide, make the 2 000 px thumbnail and find the tissue (best of rounds)."""
    from mmap_deploy.inputs.slide import open_slide
    from mmap_deploy.inputs.tissue import detect_tissue

    best = {"open_s": math.inf, "thumbnail_s": math.inf, "tissue_s": math.inf}
    for _ in range(rounds):
        t = time.perf_counter()
        with open_slide(slide.path, mpp=SLIDE_MPP, reader=slide.backend) as fresh:
            best["open_s"] = min(best["open_s"], time.perf_counter() - t)
            t = time.perf_counter()
            fresh.thumbnail(2000)
            best["thumbnail_s"] = min(best["thumbnail_s"], time.perf_counter() - t)
            t = time.perf_counter()
            tissue = detect_tissue(fresh)
            best["tissue_s"] = min(best["tissue_s"], time.perf_counter() - t)
    report.add({"name": "slide_read", "slide": label, "format": slide.format, "tissue_level": int(tissue.level),
                **{k: round(v, 3) for k, v in best.items()}, "rounds": rounds,
                "load_avg_1m": round(os.getloadavg()[0], 2)})


class _TiffSlidePatches:
    """tiffslide's read_region behind read_patch's geometry (benchmark only: the alternative not taken)."""

    def __init__(self, path: Path, slide):
        import tiffslide

        from mmap_deploy.inputs.slide import SlideReader

        self._ts = tiffslide.TiffSlide(str(path))
        self.reader = SlideReader()
        for k in ("path", "mpp", "mpp_source", "width", "height", "level_downsamples", "level_dimensions"):
            setattr(self.reader, k, getattr(slide, k))
        ts = self._ts
        self.reader._read_region = lambda left, top, level, size: np.asarray(
            ts.read_region((left, top), level, (size, size), as_array=True))[..., :3]

    def close(self) -> None:
        self._ts.close()


def _compare_readers(report: Any, slide, label: str, xy_all: dict[str, np.ndarray], spec, rounds: int,
                     per_spot_slide=None, reader_name: str = "per_spot") -> None:
    """tile_read rows: per_spot (or another per-spot reader) against tile_once, by layout and threads."""
    from threadpoolctl import threadpool_limits

    for layout, xy in xy_all.items():
        a, b = _runs(xy, layout, 300, 2500 if layout == "visium" else 4000)
        for threads in (1, 2):
            best = {"per_spot": math.inf, "tile_once": math.inf}
            loads = []
            with threadpool_limits(limits=1, user_api="blas"):  # as the pipeline's readers do
                _per_spot(per_spot_slide or slide, a[:8], spec, threads)  # warm caches
                for _ in range(rounds):
                    loads.append(os.getloadavg()[0])
                    per = _per_spot(per_spot_slide or slide, a, spec, threads) / len(a)
                    best["per_spot"] = min(best["per_spot"], per)
                    loads.append(os.getloadavg()[0])
                    if per_spot_slide is None:
                        best["tile_once"] = min(best["tile_once"], _tile_once(slide, b, spec, threads) / len(b))
            readers = [("per_spot", len(a))] + ([("tile_once", len(b))] if per_spot_slide is None else [])
            for reader, n in readers:
                name = reader_name if reader == "per_spot" else reader
                report.add({"name": "tile_read", "layout": layout, "reader": name,
                            "slide": label, "threads": threads, "patches_per_s": round(1.0 / best[reader], 1),
                            "spots_in_layout": len(xy), "spots_timed": n, "rounds": rounds,
                            "cpu": _cpu(), "load_avg_1m": [round(x, 2) for x in loads],
                            "includes": "patch read + three views"})
            if per_spot_slide is None:
                report.add({"name": "tile_read_ratio", "layout": layout, "slide": label, "threads": threads,
                            "tile_once_over_per_spot": round(best["per_spot"] / best["tile_once"], 2)})


REMOTE_SPOTS = 1600  # a 4 x 4 mm square of 100 µm spots in the section's centre
REMOTE_ROUNDS = 2


def remote_rows(report: Any, work: Path, image: Path) -> None:
    """`remote_read` rows: one slide end to end (the pipeline of mmap-predict, the demo bundle), read from disk
    and served over HTTP from 127.0.0.1 by byte range (the tests' file server), in alternating rounds: seconds
    per slide, the requests and bytes it took against the file's size, and whether the outputs are the same."""
    import sys

    sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "tests"))  # the tests' range-serving file server
    from remote_servers import FileServer

    import mmap_deploy as mm

    slide = work / f"{SLIDE_SECTION}_jpeg.tif"
    if not slide.is_file():
        jpeg_pyramid(image, SLIDE_MPP, slide)
    with mm.Predictor(threads=2) as probe:
        del probe  # the engines once, so the first round does not pay their loading
    from PIL import Image

    with Image.open(image) as im:
        width, height = im.size
    coords = write_coords(work / "remote_spots.csv", hd_grid(width, height, SLIDE_MPP, REMOTE_SPOTS, 100.0))
    size = slide.stat().st_size
    best: dict[str, float] = {}
    outputs: dict[str, Any] = {}
    with FileServer({"/C6_jpeg.tif": slide.read_bytes()}) as web, mm.Predictor(threads=2) as predictor:
        where = {"disk": slide, "http (127.0.0.1)": web.url("/C6_jpeg.tif")}
        for _ in range(REMOTE_ROUNDS):
            for name, path in where.items():
                t = time.perf_counter()
                adata = predictor.predict(path, coords, mpp=SLIDE_MPP)
                best[name] = min(best.get(name, math.inf), time.perf_counter() - t)
                outputs[name] = adata
    same = bool(np.array_equal(outputs["disk"].X, outputs["http (127.0.0.1)"].X))
    for name, adata in outputs.items():
        timings = adata.uns["mmap"]["timings"]
        fetched = float(timings.get("remote_bytes", 0.0))
        report.add({"name": "remote_read", "where": name, "slide": slide.name, "file_bytes": size,
                    "spots": int(adata.n_obs), "s_per_slide": round(best[name], 2),
                    "remote_requests": int(timings.get("remote_requests", 0)), "remote_bytes": int(fetched),
                    "share_of_file_fetched": round(fetched / size, 3), "same_X_as_disk": same,
                    "rounds": REMOTE_ROUNDS, "cpu": _cpu(), "load_avg_1m": round(os.getloadavg()[0], 2)})


def _cpu() -> str:
    from harness import cpu_model

    return cpu_model()


def run_read_suite(args: Any, report: Any, work: Path, data_dir: Path | None) -> None:
    """Rows `tile_read` for both readers, both layouts, every slide backend, 1 and 2 threads (see module doc)."""
    from harness import pyramidal_tiff

    from mmap_deploy.inputs.slide import open_slide
    from mmap_deploy.model.bundle import default_bundle_path, load_bundle

    image = (data_dir / "her2st" / "images" / f"{SLIDE_SECTION}.jpg") if data_dir else None
    if image is None or not image.is_file():
        report.add({"name": "skipped", "step": "read", "why": f"no her2st {SLIDE_SECTION}.jpg (set MMAP_DATA_DIR)"})
        return
    spec = load_bundle(default_bundle_path()).manifest.view  # the demo bundle's geometry
    tif = pyramidal_tiff(image, SLIDE_MPP, work / f"{SLIDE_SECTION}.tif")
    jpeg_tif = jpeg_pyramid(image, SLIDE_MPP, work / f"{SLIDE_SECTION}_jpeg.tif")
    rounds = getattr(args, "read_rounds", 3)
    slides = [(tif, "openslide"), (tif, "tifffile"), (jpeg_tif, "openslide"), (jpeg_tif, "tifffile"),
              (image, "image")]
    for slide_path, backend in slides:
        label = f"{slide_path.name} ({backend})"
        with open_slide(slide_path, mpp=SLIDE_MPP, reader=backend) as slide:
            slide_rows(report, slide, label, rounds)
            if backend != "image":
                coverage_rows(report, slide, spec, label)
            layouts = {"visium": visium_grid(slide.width, slide.height, slide.mpp),
                       "hd16": hd_grid(slide.width, slide.height, slide.mpp)}
            _compare_readers(report, slide, label, layouts, spec, rounds)
            if backend == "tifffile":
                other = _TiffSlidePatches(slide_path, slide)
                try:
                    _compare_readers(report, slide, label, layouts, spec, rounds, per_spot_slide=other.reader,
                                     reader_name="per_spot (tiffslide)")
                finally:
                    other.close()


def tile_rows(report: Any, suite: Any, slide_path: Path, mpp: float, work: Path, fmt: str) -> None:
    """`tile_read` rows: patches/s (patch read + three views, per spot) by thread count, plain image or OpenSlide."""
    from threadpoolctl import threadpool_limits

    from mmap_deploy.inputs.slide import open_slide
    from mmap_deploy.model.preprocess import ViewSpec, make_views

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
