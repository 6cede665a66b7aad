"""Reading spot coordinates: Visium, her2st and plain x,y tables.

`read_coords` recognises the layout from the header and returns `Spots`: ids,
(x, y) centres in level-0 (full-resolution) pixels — x the column, y the row —
and the layout name, in the order of the file.

Recognised layouts (`LAYOUTS`):

- ``visium``: Space Ranger 2+ ``tissue_positions.csv`` with header
  ``barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres``;
- ``visium-list``: Space Ranger 1 ``tissue_positions_list.csv``, the same six
  columns without a header;
- ``her2st``: ``*_selection.tsv`` with header ``x y new_x new_y pixel_x pixel_y
  selected``; x = ``pixel_x``, y = ``pixel_y``, id ``"{x}x{y}"`` of the array
  coordinates ``x``, ``y`` rounded to integers;
- ``xy``: a header with ``x`` and ``y`` and optionally an id column
  (``barcode``, ``id``, ``spot_id`` or ``spot``); without one, ids are
  ``spot_{i}``;
- ``visium-hd``: Space Ranger's Visium HD ``tissue_positions.parquet`` (the
  same six columns as ``visium``; read with pyarrow, the ``[visium-hd]``
  extra). Its ids are a numpy string array, not a list: a slide has up to
  millions of bins, and no per-bin Python object is made.

Visium, Visium HD and her2st tables carry the spots' array indices too
(`Spots.array_xy`), from which `geometry` derives the resolution.

Visium spots with ``in_tissue == 0`` and her2st spots with ``selected == 0``
are dropped unless `all_spots`. The delimiter is sniffed: tab, comma,
semicolon, or runs of whitespace. Every problem is a one-line `UserError`
naming the file, line and value and saying how to fix it.
"""

from __future__ import annotations

import csv
import gzip
import itertools
import math
import re
import zlib
from array import array
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import UserError
from ..location import Location, RemotePath, as_location
from ..options import spell

LAYOUTS = {
    "visium": "Visium tissue_positions.csv (barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres)",
    "visium-list": "Visium tissue_positions_list.csv (the same six columns, no header)",
    "her2st": "her2st *_selection.tsv (x y new_x new_y pixel_x pixel_y selected)",
    "xy": "plain table with a header x,y and optionally barcode/id/spot_id/spot",
    "visium-hd": "Visium HD tissue_positions.parquet (the six Visium columns)",
}
VISIUM_COLUMNS = ("barcode", "in_tissue", "array_row", "array_col", "pxl_row_in_fullres", "pxl_col_in_fullres")
ID_COLUMNS = ("barcode", "id", "spot_id", "spot")
# Files larger than this are not coordinate tables (a Visium HD 2 µm table is ~1 GB
# as parquet, but its CSV export of 8 µm bins stays well under this).
MAX_COORDS_BYTES = 2_000_000_000
_NUMBER = re.compile(r"[+-]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?")
_SHOW = 5  # how many offending rows/ids a message lists


@dataclass
class Spots:
    """Spot ids and centres, in the order of the coordinates file.

    `xy` is (N, 2) float64: x = column, y = row, in level-0 full-resolution pixels.
    `source_format` is one of `LAYOUTS`. `ids` is a list, or a numpy string
    array for Visium HD. `array_xy` is (N, 2) float64, each spot's array
    indices (column index, row index: Visium `array_col`, `array_row`; her2st
    `x`, `y`), or None for a table without them.
    """

    ids: list[str] | np.ndarray
    xy: np.ndarray
    source_format: str
    array_xy: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.ids)


def _describe_layouts() -> str:
    return "; ".join(LAYOUTS.values())


def _read_text(path: Location) -> str:
    if not path.exists():
        raise UserError(f"{path}: coordinates file not found; check the path")
    if path.is_dir():
        raise UserError(f"{path}: is a directory; pass the coordinates file (e.g. spatial/tissue_positions.csv)")
    try:
        size = path.stat().st_size
        if size > MAX_COORDS_BYTES:
            raise UserError(f"{path}: {size} bytes is too large for a coordinates table; split it into several slides' files")
        raw = path.read_bytes()
    except OSError as exc:
        raise UserError(f"{path}: cannot read the coordinates file: {exc.strerror or exc}") from None
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (OSError, EOFError, zlib.error) as exc:
            raise UserError(f"{path}: the gzip file is damaged ({exc}); re-copy it or pass it uncompressed") from None
    if raw[:4] == b"PAR1":
        raise UserError(f"{path}: a parquet file named like a text table; rename it to .parquet")
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise UserError(
            f"{path}: not a UTF-8 text table (undecodable byte at offset {exc.start}); "
            f"expected one of: {_describe_layouts()}"
        ) from None
    if "\x00" in text:
        raise UserError(f"{path}: contains NUL bytes, so it is not a text table; expected one of: {_describe_layouts()}")
    return text


# Why not pandas.read_csv (checked with pandas 2.3): sep=None (csv.Sniffer) splits a table
# aligned with a mix of tabs and runs of spaces into the wrong columns, with no error, and
# takes a headerless Visium list's first spot as its header. A row with too few fields is
# padded with NaN without a word. Blank lines are skipped, so a row's index no longer gives
# its line for "line N, column 'x'". Parsed as floats, "nan", "NA", "" and "inf" pass as
# numbers, and "abc" fails with neither line nor column. The delimiter, the split and the
# line numbers below are what pandas would still leave to write.
def _sniff_delimiter(lines: list[str]) -> str | None:
    """The delimiter of a table: tab, comma or semicolon if the first line has one
    and the following lines agree on the field count; None means runs of whitespace."""
    first, rest = lines[0], lines[1:20]
    for delim in ("\t", ",", ";"):
        if delim in first:
            n = len(_split(first, delim))
            if all(len(_split(line, delim)) == n for line in rest):
                return delim
    for delim in ("\t", ",", ";"):
        if delim in first:
            return delim
    return None


def _split(line: str, delim: str | None) -> list[str]:
    if delim is None:
        return line.split()
    if '"' not in line and "'" not in line:  # the common case, without the csv module's cost
        return [f.strip() for f in line.split(delim)]
    try:
        fields = next(csv.reader([line], delimiter=delim, strict=False))
    except (csv.Error, StopIteration):
        fields = line.split(delim)
    return [f.strip() for f in fields]


def _unquote(name: str) -> str:
    return name.strip().strip('"').strip("'").strip().lower()


def _parse_number(value: str, path: Location, line_no: int, column: str) -> float:
    if _NUMBER.fullmatch(value):
        v = float(value)
        if math.isfinite(v):
            return v
    shown = value if len(value) <= 40 else value[:37] + "..."
    fix = "use a dot as the decimal separator" if re.fullmatch(r"[+-]?\d+,\d+", value) else "fix or remove that row"
    raise UserError(f"{path}: line {line_no}, column '{column}': {shown!r} is not a finite number; {fix}")


def _is_number(value: str) -> bool:
    return bool(_NUMBER.fullmatch(value.strip().strip('"')))


def _nonblank_lines(text: str):
    """(line number, line) for every non-blank line, produced one at a time (no list of all lines)."""
    pos, number, end = 0, 1, len(text)
    while pos <= end:
        nl = text.find("\n", pos)
        if nl < 0:
            nl = end
        line = text[pos:nl]
        if line.strip():
            yield number, line
        pos, number = nl + 1, number + 1


# Which columns each layout reads (in_tissue/selected and the id column are optional).
_LAYOUT_COLUMNS = {
    "visium": ("barcode", "pxl_col_in_fullres", "pxl_row_in_fullres", "in_tissue", "array_col", "array_row"),
    "visium-list": ("barcode", "pxl_col_in_fullres", "pxl_row_in_fullres", "in_tissue", "array_col", "array_row"),
    "her2st": ("x", "y", "pixel_x", "pixel_y", "selected"),
    "xy": ("x", "y"),
}


def read_coords(path: str | Path | RemotePath, all_spots: bool = False) -> Spots:
    """Read a coordinates table (Visium, her2st or plain x,y) into `Spots`.

    Keeps the file's order. Drops spots outside the tissue (`in_tissue == 0`,
    her2st `selected == 0`) unless `all_spots`. Raises `UserError` for a
    missing/empty file, unknown columns, bad values, duplicate ids, or no spots left.
    `path` may be remote (`s3://`, `gs://`, `https://`): the table is fetched whole.
    """
    path = as_location(path)
    if path.suffix.lower() == ".parquet":
        return read_parquet_positions(path, all_spots)
    text = _read_text(path).replace("\r\n", "\n").replace("\r", "\n")
    lines = _nonblank_lines(text)
    head = list(itertools.islice(lines, 20))  # enough to sniff the delimiter and the layout
    if not head:
        raise UserError(f"{path}: the coordinates file is empty; expected one of: {_describe_layouts()}")
    delim = _sniff_delimiter([line for _, line in head])
    header = [_unquote(f) for f in _split(head[0][1], delim)]
    layout = _detect_layout(path, header, head, delim)
    if layout == "visium-list":
        header, body = list(VISIUM_COLUMNS), itertools.chain(head, lines)
    else:
        body = itertools.chain(head[1:], lines)

    # Keep only the columns this layout reads, one list per column (memory: a
    # Visium HD table has ~10^6 rows), and each row's line number for messages.
    wanted = [c for c in _LAYOUT_COLUMNS[layout] if c in header]
    if layout == "xy":
        wanted += [c for c in ID_COLUMNS if c in header][:1]
    index = {c: header.index(c) for c in wanted}
    columns: dict[str, list[str]] = {c: [] for c in wanted}
    line_nos = array("q")
    width = len(header)
    for n, line in body:
        fields = _split(line, delim)
        if len(fields) != width:
            raise UserError(
                f"{path}: line {n} has {len(fields)} fields where the "
                f"{'first line' if layout == 'visium-list' else 'header'} has {width}; "
                "fix that row (a missing value or a stray delimiter)"
            )
        for c, k in index.items():
            columns[c].append(fields[k])
        line_nos.append(n)
    if not line_nos:
        raise UserError(f"{path}: has a header but no spots; add one row per spot")
    table = _Columns(path, columns, line_nos)

    array_xy = None
    if layout in ("visium", "visium-list"):
        ids = table.ids("barcode")
        xy = np.stack([table.numbers("pxl_col_in_fullres"), table.numbers("pxl_row_in_fullres")], axis=1)
        if "array_col" in columns and "array_row" in columns:
            array_xy = np.stack([table.numbers("array_col"), table.numbers("array_row")], axis=1)
        keep, dropped_by = table.flags("in_tissue"), "in_tissue == 0"
    elif layout == "her2st":
        ax, ay = table.numbers("x"), table.numbers("y")
        ids = [f"{int(round(a))}x{int(round(b))}" for a, b in zip(ax.tolist(), ay.tolist())]
        xy = np.stack([table.numbers("pixel_x"), table.numbers("pixel_y")], axis=1)
        array_xy = np.stack([ax, ay], axis=1)
        keep, dropped_by = table.flags("selected"), "selected == 0"
    else:
        id_column = next((c for c in ID_COLUMNS if c in columns), None)
        ids = [f"spot_{k}" for k in range(len(line_nos))] if id_column is None else table.ids(id_column)
        xy = np.stack([table.numbers("x"), table.numbers("y")], axis=1)
        keep, dropped_by = None, ""

    if not all_spots and keep is not None and not keep.all():
        ids = [i for i, k in zip(ids, keep.tolist()) if k]
        xy = xy[keep]
        array_xy = array_xy[keep] if array_xy is not None else None
        if not ids:
            raise UserError(
                f"{path}: all {len(keep)} spots have {dropped_by}, so none is left; "
                f"pass {spell('all_spots')} to predict every spot"
            )
    _check_unique(path, ids)
    return Spots(ids=ids, xy=np.ascontiguousarray(xy, dtype=np.float64), source_format=layout,
                 array_xy=None if array_xy is None else np.ascontiguousarray(array_xy, dtype=np.float64))


def _detect_layout(path: Location, header: list[str], head, delim) -> str:
    names = set(header)
    if {"pxl_row_in_fullres", "pxl_col_in_fullres", "barcode"} <= names:
        return "visium"
    if {"x", "y", "pixel_x", "pixel_y"} <= names:
        return "her2st"
    if {"x", "y"} <= names:
        return "xy"
    first = _split(head[0][1], delim)
    if len(first) == 6 and not _is_number(first[0]) and all(_is_number(f) for f in first[1:]):
        return "visium-list"
    if first and all(_is_number(f) for f in first):
        raise UserError(
            f"{path}: the first line {head[0][1][:60]!r} has no column names; add a header line "
            "'x,y' (or 'barcode,x,y') with x the column and y the row in full-resolution pixels"
        )
    shown = ",".join(header[:8]) + (",..." if len(header) > 8 else "")
    if {"pxl_row_in_fullres", "pxl_col_in_fullres"} & names or "in_tissue" in names:
        hint = f"a Visium table needs all of {','.join(VISIUM_COLUMNS)}"
    elif "pixel_x" in names or "pixel_y" in names:
        hint = "a her2st table needs x, y, pixel_x and pixel_y"
    else:
        hint = "rename the coordinate columns to x and y (x = column, y = row, full-resolution pixels)"
    raise UserError(f"{path}: unrecognised columns [{shown}]; {hint}. Recognised layouts: {_describe_layouts()}")


class _Columns:
    """The kept columns of a table (as text) and each row's line number, for parsing with messages."""

    def __init__(self, path: Location, columns: dict[str, list[str]], line_nos: array):
        self.path, self.columns, self.line_nos = path, columns, line_nos

    def numbers(self, column: str) -> np.ndarray:
        """A numeric column as float64; the first bad value is reported with its line."""
        values = self.columns[column]
        if all(map(_NUMBER.fullmatch, values)):
            out = np.array(values, dtype=np.float64)
            if np.isfinite(out).all():
                return out
        for n, v in zip(self.line_nos, values):  # rare: find the offending row for the message
            _parse_number(v, self.path, n, column)
        raise AssertionError("a bad value was detected but not found")

    def flags(self, column: str) -> np.ndarray | None:
        """A 0/1 column (in_tissue, selected) as bool; None if the table has no such column."""
        if column not in self.columns:
            return None
        values = self.numbers(column)
        bad = np.flatnonzero((values != 0) & (values != 1))
        if bad.size:
            k = int(bad[0])
            raise UserError(
                f"{self.path}: line {self.line_nos[k]}, column '{column}': {self.columns[column][k]!r} must be 0 or 1"
            )
        return values == 1

    def ids(self, column: str) -> list[str]:
        ids = [v.strip('"').strip() for v in self.columns[column]]
        if not all(ids):
            n = self.line_nos[ids.index("")]
            raise UserError(f"{self.path}: line {n}: empty spot id; give every spot an id or drop the id column")
        return ids


def _check_unique(path: Location, ids: list[str] | np.ndarray) -> None:
    if isinstance(ids, np.ndarray):  # Visium HD: sorted copies, no per-bin objects
        ordered = np.sort(ids)
        dup = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
        if len(dup) == 0:
            return
        shown = ", ".join(repr(str(d)) for d in dup[:_SHOW]) + (", ..." if len(dup) > _SHOW else "")
        raise UserError(f"{path}: {len(dup)} duplicate spot id(s): {shown}; every spot needs a unique id")
    if len(set(ids)) == len(ids):
        return
    seen, dup = set(), []
    for i in ids:
        if i in seen and i not in dup:
            dup.append(i)
        seen.add(i)
    shown = ", ".join(repr(d) for d in dup[:_SHOW]) + (", ..." if len(dup) > _SHOW else "")
    raise UserError(f"{path}: {len(dup)} duplicate spot id(s): {shown}; every spot needs a unique id")


PARQUET_EXTRA = "pip install 'mmap-deploy[visium-hd]'"
# Rows converted at a time from Arrow strings to a numpy array (bounded scratch memory).
_STRING_BLOCK = 1 << 18


def read_parquet_positions(path: str | Path | RemotePath, all_spots: bool = False) -> Spots:
    """Read a Visium HD ``tissue_positions.parquet`` into `Spots` (layout ``visium-hd``).

    Columns as in Space Ranger's Visium tables (barcode, in_tissue, array_row,
    array_col, pxl_row_in_fullres, pxl_col_in_fullres). Bins with
    ``in_tissue == 0`` are dropped unless `all_spots`. Ids come back as a numpy
    string array, built from Arrow's buffers without a Python object per bin.
    A remote file is read by range: its footer and the six columns' chunks.
    """
    path = as_location(path)
    if not path.is_file():
        raise UserError(f"{path}: coordinates file not found; check the path")
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise UserError(f"{path}: reading Visium HD parquet positions needs pyarrow: {PARQUET_EXTRA}") from None
    source = path.open() if isinstance(path, RemotePath) else path
    try:
        return _parquet_spots(path, source, pq, all_spots)
    finally:
        if source is not path:
            source.close()


def _parquet_spots(path: Location, source, pq, all_spots: bool) -> Spots:
    """`read_parquet_positions` once the file is open (`source`: the local path, or a remote file)."""
    try:
        schema = pq.read_schema(source)
        names = [n.lower() for n in schema.names]
        missing = [c for c in VISIUM_COLUMNS if c not in names]
        if missing:
            raise UserError(
                f"{path}: parquet columns [{','.join(schema.names[:8])}] lack {','.join(missing)}; "
                f"a Visium HD tissue_positions.parquet has {','.join(VISIUM_COLUMNS)}"
            )
        table = pq.read_table(source, columns=[schema.names[names.index(c)] for c in VISIUM_COLUMNS])
    except UserError:
        raise
    except Exception as exc:  # pyarrow's errors for damaged files are many kinds
        raise UserError(f"{path}: cannot read the parquet file ({exc}); re-copy it from Space Ranger's output") from None
    if table.num_rows == 0:
        raise UserError(f"{path}: has no bins; add one row per bin")
    cols = dict(zip(VISIUM_COLUMNS, table.columns))
    numbers = {}
    for c in VISIUM_COLUMNS[1:]:
        if cols[c].null_count:
            raise UserError(f"{path}: column '{c}' has {cols[c].null_count} empty value(s); every bin needs one")
        try:
            numbers[c] = cols[c].to_numpy().astype(np.float64)
        except Exception:
            raise UserError(f"{path}: column '{c}' is of type {cols[c].type}, not numbers") from None
        if not np.isfinite(numbers[c]).all():
            k = int(np.flatnonzero(~np.isfinite(numbers[c]))[0])
            raise UserError(f"{path}: row {k + 1}, column '{c}': {numbers[c][k]!r} is not a finite number")
    in_tissue = numbers["in_tissue"]
    bad = np.flatnonzero((in_tissue != 0) & (in_tissue != 1))
    if bad.size:
        raise UserError(f"{path}: row {bad[0] + 1}, column 'in_tissue': {in_tissue[bad[0]]:g} must be 0 or 1")
    keep = slice(None) if all_spots else np.flatnonzero(in_tissue == 1)
    if not all_spots and len(keep) == 0:
        raise UserError(f"{path}: all {len(in_tissue)} bins have in_tissue == 0, so none is left; "
                        f"pass {spell('all_spots')} to predict every bin")
    barcodes = cols["barcode"].take(keep) if not all_spots else cols["barcode"]
    ids = _arrow_strings(path, barcodes)
    xy = np.stack([numbers["pxl_col_in_fullres"][keep], numbers["pxl_row_in_fullres"][keep]], axis=1)
    array_xy = np.stack([numbers["array_col"][keep], numbers["array_row"][keep]], axis=1)
    _check_unique(path, ids)
    return Spots(ids=ids, xy=np.ascontiguousarray(xy), source_format="visium-hd",
                 array_xy=np.ascontiguousarray(array_xy))


def _arrow_strings(path: Location, column) -> np.ndarray:
    """An Arrow string column as a numpy unicode array, copied from its buffers block by block."""
    import pyarrow as pa

    arr = column.combine_chunks() if isinstance(column, pa.ChunkedArray) else column
    if pa.types.is_dictionary(arr.type):
        arr = arr.dictionary_decode()
    if not pa.types.is_large_string(arr.type):
        arr = arr.cast(pa.large_string())  # one offset width (int64) below
    if arr.null_count:
        raise UserError(f"{path}: {arr.null_count} bin(s) have no barcode; every bin needs one")
    n = len(arr)
    offsets = np.frombuffer(arr.buffers()[1], dtype=np.int64)[arr.offset : arr.offset + n + 1]
    data = arr.buffers()[2]
    data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, np.uint8)
    lengths = np.diff(offsets)
    if n and lengths.min() == 0:
        raise UserError(f"{path}: row {int(np.argmin(lengths)) + 1}: empty barcode; every bin needs one")
    width = int(lengths.max()) if n else 1
    raw = np.zeros((n, width), dtype=np.uint8)
    steps = np.arange(width)
    for s in range(0, n, _STRING_BLOCK):
        e = min(n, s + _STRING_BLOCK)
        valid = steps < lengths[s:e, None]
        raw[s:e][valid] = data[(offsets[s:e, None] + steps)[valid]]
    as_bytes = raw.view(f"S{width}").ravel()
    try:
        return as_bytes.astype(f"U{width}")
    except UnicodeDecodeError:  # barcodes are ASCII; anything else is decoded the slow way
        return np.char.decode(as_bytes, "utf-8")


def check_inside(spots: Spots, width: int, height: int, coords_path, slide_path) -> None:
    """Raise `UserError` if any spot centre lies outside the slide's level-0 area.

    The message says how many, lists the first few, and hints at swapped x/y or
    at coordinates from a different image scale.
    """
    x, y = spots.xy[:, 0], spots.xy[:, 1]
    outside = (x < 0) | (y < 0) | (x >= width) | (y >= height)
    n_out = int(outside.sum())
    if n_out == 0:
        return
    idx = np.flatnonzero(outside)[:_SHOW]
    shown = ", ".join(f"{spots.ids[i]} ({x[i]:g}, {y[i]:g})" for i in idx) + (", ..." if n_out > _SHOW else "")
    msg = (
        f"{coords_path}: {n_out} of {len(spots)} spot centres lie outside the slide {slide_path} "
        f"({width} x {height} px): {shown}"
    )
    swapped_inside = (y >= 0) & (x >= 0) & (y < width) & (x < height)
    extent = max(float(x.max()) / width, float(y.max()) / height)
    if swapped_inside.all():
        msg += "; x and y look swapped (x is the column, y the row): check which columns hold them"
    elif extent > 1.5:
        msg += (
            f"; the coordinates reach {extent:.1f}x the slide's size: are they full-resolution coordinates "
            "over a downscaled image (e.g. tissue_hires_image.png)? Pass the full-resolution slide"
        )
    elif (x < 0).any() or (y < 0).any():
        msg += "; negative coordinates: check that they are pixels of this slide, not of another image or a crop"
    else:
        msg += "; check that the coordinates belong to this slide (full-resolution pixels, x = column, y = row)"
    raise UserError(msg)


def scale_warning(spots: Spots, width: int, height: int) -> str | None:
    """A warning when all spots crowd into a small corner of the slide, else None.

    Coordinates in a downscaled image's pixels (Visium `hires`/`lowres`) over a
    full-resolution slide all fit inside it, so `check_inside` cannot catch them.
    """
    if len(spots) < 2:
        return None
    span_x = float(spots.xy[:, 0].max()) / width
    span_y = float(spots.xy[:, 1].max()) / height
    if max(span_x, span_y) < 0.25:
        return (
            f"all spots lie within the top-left {max(span_x, span_y):.0%} of the slide: if the coordinates "
            "are hires/lowres image pixels, convert them to full resolution (divide by tissue_hires_scalef "
            "from scalefactors_json.json) or use pxl_col_in_fullres/pxl_row_in_fullres"
        )
    return None
