"""Merge `mmap-train cv` JSON files of other candidates (or other folds) into one, and summarise again.

    python benchmarks/merge_cv.py benchmarks/results/train_cv.json new_run.json -o benchmarks/results/train_cv.json

Folds are matched by held-out patient; a fold's models (y1, ridge, each
candidate) are taken from every file, the later file winning on a clash
(y1 and ridge are the same in every run: the same spots, the same inner
selection). Each file's machine and command are kept under `runs`.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from mmap_train.cv import summarise


def merge(paths: list[Path]) -> dict:
    out: dict = {"patients": {}, "folds": {}, "candidates": {}, "runs": []}
    for p in paths:
        r = json.loads(p.read_text())
        out["patients"].update(r["patients"])
        out["candidates"].update(r["candidates"])
        for patient, fold in r["folds"].items():
            out["folds"].setdefault(patient, {}).update(fold)
        out["runs"] += r.get("runs") or [{"command": r.get("command"), "folds": list(r["folds"]),
                                          "machine": r.get("machine")}]
        if "smoothing_all_patients" in r:
            out["smoothing_all_patients"] = r["smoothing_all_patients"]
    out["folds"] = dict(sorted(out["folds"].items()))
    return summarise(out)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+", type=Path)
    ap.add_argument("-o", "--out", type=Path, required=True)
    args = ap.parse_args(argv)
    res = merge(args.files)
    args.out.write_text(json.dumps(res, indent=1) + "\n")
    from mmap_train.cv import table

    print(table(res))
    return 0


if __name__ == "__main__":
    sys.exit(main())
