"""Carry a large Python wheel to a machine that takes at most a few tens of MiB per transfer.

PyPI's `onnxruntime-gpu` (the CUDA 13 build) is a ~255 MB wheel, most of it one
284 MB library (`libonnxruntime_providers_cuda.so`). A GPU host that cannot
reach the package index, and that receives at most 64 MiB per call, gets it in
parts:

    # here (with the package index): download, slim, compress, split
    python benchmarks/gpu/gpu_wheels.py pack onnxruntime_gpu-*.whl -o .gpuwheel --part-mib 60
    # there, once per part, in consecutive calls (the machine keeps /tmp while it stays warm)
    python benchmarks/gpu/gpu_wheels.py stage .gpuwheel/p1 --into /tmp/mmap-wheel-parts
    ...
    # there, after the last part: check every part's sha256, join, unpack as a `--target` install
    python benchmarks/gpu/gpu_wheels.py unpack /tmp/mmap-wheel-parts --target /tmp/site

`pack` drops the files that cannot load on the target anyway (by default the
TensorRT execution provider, which needs a native TensorRT that the host does
not have), puts the rest of the wheel into one xz-compressed tar (xz gets the
CUDA library to ~186 MB where the wheel's deflate leaves ~231 MB), and splits
that stream into numbered parts, each in its own folder (`p1/`, `p2/`, ...) so
that each call carries one folder. `parts.json` beside them records the wheel,
what was dropped, and the sha256 of every part and of the whole stream; it
travels with every part. Only the standard library is used: the target runs it
under its own Python.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import lzma
import shutil
import sys
import tarfile
import zipfile
from pathlib import Path

PARTS_JSON = "parts.json"
STREAM_NAME = "wheel.tar.xz"
DEFAULT_DROP = ("onnxruntime/capi/libonnxruntime_providers_tensorrt.so",)
MIB = 1 << 20


class PartsError(Exception):
    """A part is missing, damaged or from another packing: one line saying which and what to do."""


def _sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(4 * MIB), b""):
            h.update(block)
    return h.hexdigest()


def _record_without(record: str, dropped: set[str]) -> str:
    """The wheel's RECORD with the dropped files' lines removed (pip checks RECORD on uninstall only)."""
    keep = [line for line in record.splitlines() if line.split(",", 1)[0] not in dropped]
    return "\n".join(keep) + "\n"


def slim_tar(wheel: Path, drop: tuple[str, ...] = DEFAULT_DROP, preset: int = 6) -> tuple[bytes, list[str]]:
    """The wheel's files minus `drop`, as one xz-compressed tar; and the names actually dropped.

    Entries keep the wheel's order and are stored with fixed metadata, so the
    same wheel packs to the same bytes.
    """
    drop_set = set(drop)
    dropped: list[str] = []
    buf = io.BytesIO()
    with zipfile.ZipFile(wheel) as zf, \
            lzma.open(buf, "wb", preset=preset) as xz, \
            tarfile.open(fileobj=xz, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for info in zf.infolist():
            if info.is_dir():
                continue
            if info.filename in drop_set:
                dropped.append(info.filename)
                continue
            data = zf.read(info)
            if info.filename.endswith(".dist-info/RECORD"):
                data = _record_without(data.decode("utf-8"), drop_set).encode("utf-8")
            ti = tarfile.TarInfo(info.filename)
            ti.size = len(data)
            ti.mode = 0o755 if (info.external_attr >> 16) & 0o111 else 0o644
            ti.mtime = 0
            tar.addfile(ti, io.BytesIO(data))
    return buf.getvalue(), dropped


def pack(wheel: Path, out: Path, part_mib: float = 60.0, drop: tuple[str, ...] = DEFAULT_DROP) -> dict:
    """Slim, compress and split `wheel` into `out/p1/`, `out/p2/`, ...; returns the parts record."""
    if not wheel.is_file() or wheel.suffix != ".whl":
        raise PartsError(f"{wheel}: not a wheel file; download one first, e.g. `pip download --no-deps onnxruntime-gpu`")
    if part_mib <= 0:
        raise PartsError(f"--part-mib must be positive, got {part_mib}")
    stream, dropped = slim_tar(wheel, drop)
    part_bytes = int(part_mib * MIB)
    chunks = [stream[i:i + part_bytes] for i in range(0, len(stream), part_bytes)] or [b""]
    if out.exists():
        shutil.rmtree(out)
    record = {
        "wheel": wheel.name,
        "wheel_sha256": _sha256_file(wheel),
        "wheel_bytes": wheel.stat().st_size,
        "dropped": dropped,
        "stream": STREAM_NAME,
        "stream_bytes": len(stream),
        "stream_sha256": _sha256_bytes(stream),
        "parts": [],
    }
    for k, chunk in enumerate(chunks, start=1):
        name = f"{STREAM_NAME}.{k:03d}"
        record["parts"].append({"folder": f"p{k}", "name": name, "bytes": len(chunk), "sha256": _sha256_bytes(chunk)})
    for part in record["parts"]:
        d = out / part["folder"]
        d.mkdir(parents=True)
        k = int(part["folder"][1:])
        (d / part["name"]).write_bytes(chunks[k - 1])
        (d / PARTS_JSON).write_text(json.dumps(record, indent=1) + "\n")
    return record


def _read_record(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except FileNotFoundError:
        raise PartsError(f"{path}: missing; every part folder made by `pack` holds one") from None
    except json.JSONDecodeError as e:
        raise PartsError(f"{path}: not valid JSON ({e}); re-run `pack`") from None


def stage(part_dir: Path, into: Path) -> list[str]:
    """Move one part (and the parts record) into `into`; returns the parts still missing there."""
    record = _read_record(part_dir / PARTS_JSON)
    into.mkdir(parents=True, exist_ok=True)
    staged = into / PARTS_JSON
    if staged.exists() and _read_record(staged)["stream_sha256"] != record["stream_sha256"]:
        raise PartsError(f"{part_dir}: belongs to another packing than the parts already in {into}; "
                         f"empty {into} and stage the parts of one packing")
    for part in record["parts"]:
        src = part_dir / part["name"]
        if src.exists():
            if _sha256_file(src) != part["sha256"]:
                raise PartsError(f"{src}: sha256 does not match {PARTS_JSON}; the part was damaged in transit, send it again")
            shutil.copyfile(src, into / part["name"])
    shutil.copyfile(part_dir / PARTS_JSON, staged)
    return [p["folder"] for p in record["parts"] if not (into / p["name"]).exists()]


def unpack(parts_dir: Path, target: Path) -> dict:
    """Check every part, join them, and unpack the wheel's files into `target` (like `pip install --target`)."""
    record = _read_record(parts_dir / PARTS_JSON)
    missing = [p["folder"] for p in record["parts"] if not (parts_dir / p["name"]).exists()]
    if missing:
        raise PartsError(f"{parts_dir}: part(s) {', '.join(missing)} of {len(record['parts'])} not staged yet; "
                         "stage them first (each in its own call)")
    h = hashlib.sha256()
    joined = io.BytesIO()
    for p in record["parts"]:
        data = (parts_dir / p["name"]).read_bytes()
        if _sha256_bytes(data) != p["sha256"]:
            raise PartsError(f"{parts_dir / p['name']}: sha256 does not match {PARTS_JSON}; stage that part again")
        h.update(data)
        joined.write(data)
    if h.hexdigest() != record["stream_sha256"]:
        raise PartsError(f"{parts_dir}: the joined parts do not match the packed stream; re-run `pack` and stage again")
    joined.seek(0)
    target.mkdir(parents=True, exist_ok=True)
    with lzma.open(joined, "rb") as xz, tarfile.open(fileobj=xz, mode="r") as tar:
        tar.extractall(target, filter="data")
    return record


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pack", help="slim, xz-compress and split a wheel into part folders")
    p.add_argument("wheel", type=Path)
    p.add_argument("-o", "--out", type=Path, required=True, help="folder for p1/, p2/, ... (replaced)")
    p.add_argument("--part-mib", type=float, default=60.0, help="size of each part in MiB (default 60)")
    p.add_argument("--drop", action="append", help="a file inside the wheel to leave out (repeatable; "
                   f"default {', '.join(DEFAULT_DROP)})")
    s = sub.add_parser("stage", help="move one part folder into the staging folder")
    s.add_argument("part_dir", type=Path)
    s.add_argument("--into", type=Path, required=True)
    u = sub.add_parser("unpack", help="check, join and unpack the staged parts")
    u.add_argument("parts_dir", type=Path)
    u.add_argument("--target", type=Path, required=True)
    args = ap.parse_args(argv)
    try:
        if args.cmd == "pack":
            rec = pack(args.wheel, args.out, args.part_mib, tuple(args.drop) if args.drop else DEFAULT_DROP)
            print(f"packed {rec['wheel']} ({rec['wheel_bytes'] / MIB:.1f} MiB) into {len(rec['parts'])} part(s) "
                  f"of at most {args.part_mib:g} MiB ({rec['stream_bytes'] / MIB:.1f} MiB in all) under {args.out}; "
                  f"dropped: {', '.join(rec['dropped']) or 'nothing'}")
        elif args.cmd == "stage":
            missing = stage(args.part_dir, args.into)
            print(f"staged {args.part_dir} into {args.into}; still missing: {', '.join(missing) or 'none'}")
        else:
            rec = unpack(args.parts_dir, args.target)
            print(f"unpacked {rec['wheel']} into {args.target} (sha256 of all {len(rec['parts'])} part(s) checked)")
    except PartsError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
