"""The batch manifest (`--manifest slides.csv`): its rows, the output folder's check.

The columns are `slide` and `coords`, and one optional column per option that
a slide may set for itself (`options.manifest_columns`: `mpp`, `id`), read
by the same checks as the option.

The manifest, its rows' slides and coords, and the output folder may each be
local or remote (`s3://`, `gs://`, `https://`: see `mmap_deploy.location`).
A relative path in a row is relative to the manifest's own location: a
manifest at `s3://bucket/cohort/slides.csv` with the row `svs/A.svs` names
`s3://bucket/cohort/svs/A.svs`.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Union

from ..errors import UserError
from ..location import Location, RemotePath, as_location
from ..options import Settings, manifest_columns, parse_column

MANIFEST_COLUMNS = ("slide", "coords")


@dataclass
class ManifestRow:
    """One slide of the manifest: its line, paths, output name, and the options its columns set."""

    line: int
    slide: Location  # a pathlib.Path, or a location.RemotePath
    coords: Location | None  # None: an empty coords cell, for --grid
    name: str  # the output's name: the id column, else the slide's file name without extension
    values: dict[str, Any] = field(default_factory=dict)  # option name -> value, from the option columns

    @property
    def mpp(self) -> float | None:
        return self.values.get("mpp")


def _row_path(base: Location, text: str) -> Location:
    """A row's path: a URL as it is, an absolute local path, or a path relative to the manifest's folder."""
    if "://" in text:  # a URL (an unknown scheme is said as such)
        return as_location(text)
    local = Path(text).expanduser()
    return local if local.is_absolute() else base / text


def read_manifest(path: Union[str, Path, RemotePath], settings_cls: type = Settings) -> list[ManifestRow]:
    """The batch manifest CSV: columns slide, coords, and the option columns; paths relative to the CSV.

    An empty coords cell is a slide with no spatial assay: it runs with `--grid` (and fails on its own
    without it). The manifest and its paths may be local or remote (see the module docstring).
    """
    optional = manifest_columns(settings_cls)
    path = as_location(path)
    if not path.is_file():
        raise UserError(f"{path}: manifest file not found; check the --manifest path")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError:
        raise UserError(f"{path}: not a UTF-8 text file; the manifest must be a CSV with columns slide,coords") from None
    reader = csv.reader(text.splitlines())
    header = next(reader, None)
    if not header or not any(h.strip() for h in header):
        raise UserError(f"{path}: empty manifest; it needs a header line "
                        f"'slide,coords{''.join(f'[,{c}]' for c in optional)}' and one row per slide")
    header = [h.strip().lower() for h in header]
    missing = [c for c in MANIFEST_COLUMNS if c not in header]
    unknown = [c for c in header if c not in MANIFEST_COLUMNS + tuple(optional)]
    if missing or unknown or len(set(header)) != len(header):
        what = []
        if missing:
            what.append(f"missing column(s) {', '.join(missing)}")
        if unknown:
            what.append(f"unknown column(s) {', '.join(unknown)}")
        if len(set(header)) != len(header):
            what.append("a repeated column")
        raise UserError(f"{path}: line 1: {'; '.join(what)}; the header must be slide,coords with optional "
                        f"{','.join(optional)}")
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
        options = {optional[c]: parse_column(c, rec[c], f"{path}: line {line_no}", settings_cls)
                   for c in optional if rec.get(c)}
        slide = _row_path(base, rec["slide"])
        coords = _row_path(base, rec["coords"]) if rec["coords"] else None
        name = options.get("library_id") or slide.stem  # the id column was checked as --library-id is
        if name in names:
            raise UserError(
                f"{path}: line {line_no}: output name {name!r} is already used on line {names[name]}; "
                "give the slides distinct 'id' values"
            )
        names[name] = line_no
        options["library_id"] = name
        rows.append(ManifestRow(line_no, slide, coords, name, options))
    if not rows:
        raise UserError(f"{path}: the manifest lists no slides; add one row per slide under the header")
    return rows


REMOTE_CHECKS = 16  # rows' remote paths looked up at once (each is a round trip)


def check_rows_exist(manifest: Location, rows: list[ManifestRow], shard: tuple[int, int] | None = None) -> None:
    """Before the first slide starts: every row's slide and coords path (of this shard) exists.

    The missing ones are said in one error, one `line N: slide|coords PATH` each. An empty coords
    cell (a row for --grid) is not a missing path. Remote paths are looked up `REMOTE_CHECKS` at a time.
    """
    from concurrent.futures import ThreadPoolExecutor

    if shard is not None:
        i, n = shard
        rows = [r for k, r in enumerate(rows) if k % n == i]
    paths = [(row, what, p) for row in rows for what, p in (("slide", row.slide), ("coords", row.coords))
             if p is not None]
    if any(isinstance(p, RemotePath) for _, _, p in paths):
        with ThreadPoolExecutor(max_workers=REMOTE_CHECKS, thread_name_prefix="mmap-exists") as pool:
            found = list(pool.map(lambda t: t[2].exists(), paths))
    else:
        found = [p.exists() for _, _, p in paths]
    missing = [f"line {row.line}: {what} {p}" for (row, what, p), ok in zip(paths, found) if not ok]
    if missing:
        raise UserError(f"{manifest}: {len(missing)} path(s) not found, no slide was started: "
                        f"{'; '.join(missing)}; fix the manifest (paths are relative to its folder)")


def check_output_dir(out_dir: Union[str, Path, RemotePath]) -> None:
    """-o of a batch: a folder (or a bucket prefix), not a file; a remote one must be a bucket."""
    out_dir = as_location(out_dir)
    if isinstance(out_dir, RemotePath):
        from ..location.transfer import require_writable

        require_writable(out_dir)
    if out_dir.suffix in (".h5ad", ".zarr", ".geojson") or (out_dir.exists() and not out_dir.is_dir()):
        raise UserError(f"{out_dir}: with --manifest, -o is an output folder (one .h5ad per slide, "
                        "or one .zarr or .geojson with --format zarr|geojson)")
