"""The batch manifest (`--manifest slides.csv`): its rows, the --shard option, the output folder's check."""

from __future__ import annotations

import csv
from dataclasses import dataclass
from pathlib import Path

from ..errors import UserError

MANIFEST_COLUMNS = ("slide", "coords")
MANIFEST_OPTIONAL = ("mpp", "id")


def parse_shard(value: str | None) -> tuple[int, int] | None:
    """'i/n' -> (i, n) with 0 <= i < n."""
    if value is None:
        return None
    try:
        i_s, n_s = value.split("/")
        i, n = int(i_s), int(n_s)
    except ValueError:
        raise UserError(f"--shard must look like i/n (e.g. 0/4), got {value!r}") from None
    if n < 1 or not 0 <= i < n:
        raise UserError(f"--shard {value}: need 0 <= i < n (shards are numbered 0 to n-1)")
    return i, n


@dataclass
class ManifestRow:
    line: int
    slide: Path
    coords: Path | None  # None: an empty coords cell, for --grid
    mpp: float | None
    name: str


def read_manifest(path: Path) -> list[ManifestRow]:
    """The batch manifest CSV: columns slide, coords, optional mpp and id; paths relative to the CSV.

    An empty coords cell is a slide with no spatial assay: it runs with `--grid` (and fails on its own
    without it).
    """
    import math

    if not path.is_file():
        raise UserError(f"{path}: manifest file not found; check the --manifest path")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file; the manifest must be a CSV with columns slide,coords") from None
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if not header or not any(h.strip() for h in header):
        raise UserError(f"{path}: empty manifest; it needs a header line 'slide,coords[,mpp][,id]' and one row per slide")
    header = [h.strip().lower() for h in header]
    missing = [c for c in MANIFEST_COLUMNS if c not in header]
    unknown = [c for c in header if c not in MANIFEST_COLUMNS + MANIFEST_OPTIONAL]
    if missing or unknown or len(set(header)) != len(header):
        what = []
        if missing:
            what.append(f"missing column(s) {', '.join(missing)}")
        if unknown:
            what.append(f"unknown column(s) {', '.join(unknown)}")
        if len(set(header)) != len(header):
            what.append("a repeated column")
        raise UserError(f"{path}: line 1: {'; '.join(what)}; the header must be slide,coords with optional mpp,id")
    rows: list[ManifestRow] = []
    names: dict[str, int] = {}
    base = path.parent
    for line_no, values in enumerate(reader, start=2):
        if not values or all(not v.strip() for v in values):
            continue
        if len(values) != len(header):
            raise UserError(f"{path}: line {line_no}: {len(values)} fields, the header has {len(header)}")
        rec = {h: v.strip() for h, v in zip(header, values)}
        if not rec["slide"]:
            raise UserError(f"{path}: line {line_no}: empty slide path")
        mpp = None
        if rec.get("mpp"):
            try:
                mpp = float(rec["mpp"])
            except ValueError:
                mpp = math.nan
            if not math.isfinite(mpp) or mpp <= 0:
                raise UserError(f"{path}: line {line_no}: mpp {rec['mpp']!r} is not a positive number (µm per pixel)")
        slide = Path(rec["slide"]).expanduser()
        slide = slide if slide.is_absolute() else base / slide
        coords = None
        if rec["coords"]:
            coords = Path(rec["coords"]).expanduser()
            coords = coords if coords.is_absolute() else base / coords
        name = rec.get("id") or slide.stem
        if any(c in name for c in "/\\") or name in (".", ".."):
            raise UserError(f"{path}: line {line_no}: id {name!r} cannot be a file name; use letters, digits, - and _")
        if name in names:
            raise UserError(
                f"{path}: line {line_no}: output name {name!r} is already used on line {names[name]}; "
                "give the slides distinct 'id' values"
            )
        names[name] = line_no
        rows.append(ManifestRow(line_no, slide, coords, mpp, name))
    if not rows:
        raise UserError(f"{path}: the manifest lists no slides; add one row per slide under the header")
    return rows


def check_rows_exist(manifest: Path, rows: list[ManifestRow], shard: tuple[int, int] | None = None) -> None:
    """Before the first slide starts: every row's slide and coords path (of this shard) exists.

    The missing ones are said in one error, one `line N: slide|coords PATH` each. An empty coords
    cell (a row for --grid) is not a missing path.
    """
    if shard is not None:
        i, n = shard
        rows = [r for k, r in enumerate(rows) if k % n == i]
    missing = []
    for row in rows:
        for what, p in (("slide", row.slide), ("coords", row.coords)):
            if p is not None and not p.exists():
                missing.append(f"line {row.line}: {what} {p}")
    if missing:
        raise UserError(f"{manifest}: {len(missing)} path(s) not found, no slide was started: "
                        f"{'; '.join(missing)}; fix the manifest (paths are relative to its folder)")


def check_output_dir(out_dir: Path) -> None:
    if out_dir.suffix in (".h5ad", ".zarr", ".geojson") or (out_dir.exists() and not out_dir.is_dir()):
        raise UserError(f"{out_dir}: with --manifest, -o is an output folder (one .h5ad per slide, "
                        "or one .zarr or .geojson with --format zarr|geojson)")
