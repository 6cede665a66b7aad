"""Property tests: whatever a coordinates file holds, `read_coords` returns well-formed spots or
raises the project's one-line `UserError` naming the file — never another exception."""

from __future__ import annotations

import gzip
import math
import os
import tempfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from mmap_deploy.errors import UserError
from mmap_deploy.inputs.coords import LAYOUTS, check_inside, read_coords

# 150 examples per property in CI; MMAP_FUZZ_EXAMPLES=5000 for a deeper run.
FUZZ = settings(max_examples=int(os.environ.get("MMAP_FUZZ_EXAMPLES", "150")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])

HEADERS = [
    "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres",
    "x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\tselected",
    "barcode,x,y",
    "x,y",
    "id;x;y",
    "spot_id x y",
    "x,y,pixel_x",
    "",
]
FIELDS = st.one_of(
    st.integers(-10**6, 10**6).map(str),
    st.floats(allow_nan=True, allow_infinity=True).map(repr),
    st.sampled_from(["0", "1", "2", "nan", "NA", "", " ", '"', '"a"', "1,5", "1e999", "-0", ".5", "AAAC-1",
                     "x", "y", "\u00a0", "\u2028", "１２", "1_0"]),
    st.text(max_size=8),
)
DELIMS = st.sampled_from([",", "\t", ";", " ", "  ", ", ", "|"])
NEWLINES = st.sampled_from(["\n", "\r\n", "\r"])


@pytest.fixture(scope="module")
def workdir():
    with tempfile.TemporaryDirectory() as d:
        yield Path(d)


def check(path: Path, all_spots: bool) -> None:
    """The property: spots with consistent shapes, or a one-line UserError that names the file."""
    try:
        spots = read_coords(path, all_spots=all_spots)
    except UserError as exc:
        msg = str(exc)
        assert msg.startswith(str(path)), msg
        assert "\n" not in msg and "\r" not in msg, msg
        return
    assert spots.source_format in LAYOUTS
    assert len(spots.ids) == spots.xy.shape[0] >= 1
    assert spots.xy.shape == (len(spots.ids), 2) and spots.xy.dtype == np.float64
    assert np.isfinite(spots.xy).all()
    assert len(set(spots.ids)) == len(spots.ids) and all(spots.ids)
    # the inside check on any slide size is again either fine or a UserError
    for width, height in ((1, 1), (10_000, 10_000)):
        try:
            check_inside(spots, width, height, path, "slide.svs")
        except UserError as exc:
            assert "\n" not in str(exc)


@FUZZ
@given(data=st.binary(max_size=400), all_spots=st.booleans())
def test_arbitrary_bytes(workdir, data, all_spots):
    path = workdir / "bytes.csv"
    path.write_bytes(data)
    check(path, all_spots)


@FUZZ
@given(text=st.text(max_size=300), all_spots=st.booleans())
def test_arbitrary_text(workdir, text, all_spots):
    path = workdir / "text.tsv"
    path.write_text(text, encoding="utf-8", errors="surrogatepass")
    check(path, all_spots)


@FUZZ
@given(
    header=st.sampled_from(HEADERS),
    rows=st.lists(st.lists(FIELDS, min_size=0, max_size=8), max_size=6),
    delim=DELIMS,
    newline=NEWLINES,
    gz=st.booleans(),
    all_spots=st.booleans(),
)
def test_table_shaped_input(workdir, header, rows, delim, newline, gz, all_spots):
    """Near-valid tables: a real header, rows of plausible and hostile fields, any delimiter."""
    lines = ([header] if header else []) + [delim.join(r) for r in rows]
    data = newline.join(lines).encode("utf-8", errors="surrogatepass")
    path = workdir / "table.csv"
    path.write_bytes(gzip.compress(data, mtime=0) if gz else data)
    check(path, all_spots)


@FUZZ
@given(points=st.lists(st.tuples(st.floats(-1e6, 1e6), st.floats(-1e6, 1e6)), min_size=1, max_size=20),
       in_tissue=st.lists(st.booleans(), min_size=20, max_size=20))
def test_valid_visium_round_trips(workdir, points, in_tissue):
    """Any well-formed Visium table reads back exactly: ids, order, x = column, y = row, the filter."""
    rows = [f"B{i}-1,{int(t)},0,{i},{y!r},{x!r}" for i, ((x, y), t) in enumerate(zip(points, in_tissue))]
    path = workdir / "tissue_positions.csv"
    path.write_text("barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres\n" + "\n".join(rows))
    kept = [i for i in range(len(points)) if in_tissue[i]]
    if not kept:
        with pytest.raises(UserError, match="all_spots="):
            read_coords(path)
        return
    spots = read_coords(path)
    assert spots.ids == [f"B{i}-1" for i in kept]
    expected = np.array([points[i] for i in kept], dtype=np.float64)
    np.testing.assert_array_equal(spots.xy, expected)
    assert not any(math.isnan(v) for v in spots.xy.ravel())
