"""Phase 1 (tiny backbone) on the six her2st sections with images: the demo bundle's training run.

    python -m mmap_train.make_demo --data-dir ../shared/data --out mmap_deploy/demo/bundle --work runs/demo
    python benchmarks/train_phase1_tiny.py --work runs/demo

Reads the run's logs (phase 1 per epoch; phase 2 on its feature cache), writes
benchmarks/train_phase1_tiny.json and prints the markdown tables of the
results page: loss curve and validation metrics per epoch, against the
train-mean baseline (the mean training target for every spot: MSE/MAE only,
its PCC is undefined as the prediction is constant).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", default="runs/demo")
    ap.add_argument("--json", default="benchmarks/train_phase1_tiny.json")
    ap.add_argument("--rotations", nargs="+", help="phase-1 run folders: one summary row each (kept epoch), "
                                                   "written to --json")
    args = ap.parse_args()
    if args.rotations:
        rotations(args.rotations, args.json)
        return
    work = Path(args.work)
    # a work dir of make_demo has phase1/ and phase2/; an `mmap-train phase1 --out DIR` run is DIR itself
    p1_log = work / "phase1" / "log.json" if (work / "phase1").is_dir() else work / "log.json"
    p1 = json.loads(p1_log.read_text())
    p2_log = work / "phase2" / "log.json"
    p2 = json.loads(p2_log.read_text()) if p2_log.is_file() else []
    Path(args.json).write_text(json.dumps({"phase1": p1, "phase2": p2}, indent=1) + "\n")
    print("| epoch | train loss | val PCC pooled | val PCC per slide | val MSE | val MAE | train-mean MSE | train-mean MAE | minutes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in p1:
        print(f"| {r['epoch']} | {r['train_loss']:.4f} | {r['val_pcc_pooled']:.4f} | {r['val_pcc_per_slide']:.4f} | "
              f"{r['val_mse']:.4f} | {r['val_mae']:.4f} | {r['val_train_mean_mse']:.4f} | {r['val_train_mean_mae']:.4f} | "
              f"{r['seconds'] / 60:.1f} |")
    if not p2:
        return
    print("\n| phase-2 epoch | train loss | val PCC pooled | val PCC per slide | val MSE | val MAE |\n|---|---|---|---|---|---|")
    for r in p2:
        print(f"| {r['epoch']}{' (best so far)' if r.get('kept') else ''} | {r['train_loss']:.4f} | {r['val_pcc_pooled']:.4f} | "
              f"{r['val_pcc_per_slide']:.4f} | {r['val_mse']:.4f} | {r['val_mae']:.4f} |")


def rotations(runs: list[str], json_out: str) -> None:
    """One row per run: its validation section and the kept epoch's metrics vs the train-mean baseline."""
    rows = []
    for run in runs:
        work = Path(run)
        log_path = work / "phase1" / "log.json" if (work / "phase1").is_dir() else work / "log.json"
        log = json.loads(log_path.read_text())
        kept = [r for r in log if r.get("kept")][-1]
        from mmap_train.model import read_checkpoint

        ckpt = read_checkpoint(log_path.parent / "checkpoint.pt")
        data = ckpt["training_data"]
        rows.append({"run": str(work), "val_sections": data["val_sections"], "n_train_spots": data["n_train_spots"],
                     "n_val_spots": data["n_val_spots"], "kept_epoch": kept["epoch"], "minutes": log[-1]["seconds"] / 60,
                     **{k: kept[k] for k in ("val_pcc_pooled", "val_mse", "val_mae", "val_train_mean_mse",
                                             "val_train_mean_mae")}})
    Path(json_out).write_text(json.dumps(rows, indent=1) + "\n")
    print("| validation section | train / val spots | kept epoch | val PCC | val MSE | train-mean MSE | val MAE | train-mean MAE | minutes |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {', '.join(r['val_sections'])} | {r['n_train_spots']} / {r['n_val_spots']} | {r['kept_epoch']} | "
              f"{r['val_pcc_pooled']:.4f} | {r['val_mse']:.4f} | {r['val_train_mean_mse']:.4f} | {r['val_mae']:.4f} | "
              f"{r['val_train_mean_mae']:.4f} | {r['minutes']:.1f} |")
    pcc = [r["val_pcc_pooled"] for r in rows]
    print(f"\nmean val PCC over the {len(rows)} rotations: {sum(pcc) / len(pcc):.4f}")


if __name__ == "__main__":
    main()
