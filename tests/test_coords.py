"""Coordinates: every layout (Visium with and without header, her2st, plain x,y), delimiter
sniffing, the real her2st spot tables, every error, and the inside-the-slide check."""

from __future__ import annotations

import gzip
import re

import numpy as np
import pytest

from mmap_deploy.errors import UserError
from mmap_deploy.inputs.coords import LAYOUTS, Spots, check_inside, read_coords, scale_warning

VISIUM_HEADER = "barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres"
VISIUM_ROWS = [
    "AAACAAGTATCTCCCA-1,1,50,102,7475,8412",
    "AAACACCAATAACTGC-1,0,59,19,8505,2799",
    "AAACAGAGCGACTCCT-1,1,14,94,3487,7888",
]


def write(tmp_path, name: str, text: str | bytes):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


# --- Visium ----------------------------------------------------------------------------------------


def test_visium_with_header(tmp_path):
    path = write(tmp_path, "tissue_positions.csv", "\n".join([VISIUM_HEADER, *VISIUM_ROWS]) + "\n")
    spots = read_coords(path)
    assert spots.source_format == "visium"
    assert spots.ids == ["AAACAAGTATCTCCCA-1", "AAACAGAGCGACTCCT-1"]  # in_tissue == 0 dropped, order kept
    np.testing.assert_array_equal(spots.xy, [[8412, 7475], [7888, 3487]])  # x = column, y = row
    assert spots.xy.dtype == np.float64 and spots.xy.flags["C_CONTIGUOUS"]
    every = read_coords(path, all_spots=True)
    assert every.ids == [r.split(",")[0] for r in VISIUM_ROWS]
    np.testing.assert_array_equal(every.xy[1], [2799, 8505])


def test_visium_column_order_comes_from_the_header(tmp_path):
    header = "pxl_col_in_fullres,pxl_row_in_fullres,barcode,in_tissue,array_row,array_col"
    path = write(tmp_path, "reordered.csv", f"{header}\n100.5,200.25,A-1,1,0,0\n")
    spots = read_coords(path)
    assert spots.ids == ["A-1"] and spots.xy.tolist() == [[100.5, 200.25]]


def test_visium_list_without_header(tmp_path):
    path = write(tmp_path, "tissue_positions_list.csv", "\r\n".join(VISIUM_ROWS) + "\r\n")
    spots = read_coords(path)
    assert spots.source_format == "visium-list"
    assert spots.ids == ["AAACAAGTATCTCCCA-1", "AAACAGAGCGACTCCT-1"]
    np.testing.assert_array_equal(spots.xy, [[8412, 7475], [7888, 3487]])
    assert len(read_coords(path, all_spots=True)) == 3


def test_bom_gzip_and_blank_lines(tmp_path):
    text = "\ufeff" + VISIUM_HEADER + "\n\n" + "\n".join(VISIUM_ROWS) + "\n\n\n"
    plain = read_coords(write(tmp_path, "bom.csv", text))
    gz = tmp_path / "tissue_positions.csv.gz"
    gz.write_bytes(gzip.compress(text.encode("utf-8"), mtime=0))
    zipped = read_coords(gz)
    assert plain.ids == zipped.ids == ["AAACAAGTATCTCCCA-1", "AAACAGAGCGACTCCT-1"]
    np.testing.assert_array_equal(plain.xy, zipped.xy)


def test_no_spot_in_tissue_suggests_all_spots(tmp_path):
    rows = [r.replace(",1,", ",0,", 1) for r in VISIUM_ROWS]
    path = write(tmp_path, "none.csv", "\n".join([VISIUM_HEADER, *rows]))
    with pytest.raises(UserError, match=r"none\.csv: all 3 spots have in_tissue == 0.*all_spots="):
        read_coords(path)
    assert len(read_coords(path, all_spots=True)) == 3


def test_in_tissue_must_be_a_flag(tmp_path):
    path = write(tmp_path, "flag.csv", f"{VISIUM_HEADER}\nA-1,2,0,0,10,10\n")
    with pytest.raises(UserError, match=r"flag\.csv: line 2, column 'in_tissue': '2' must be 0 or 1"):
        read_coords(path)


# --- her2st ------------------------------------------------------------------------------------------


HER2ST = "x\ty\tnew_x\tnew_y\tpixel_x\tpixel_y\tselected\n"


def test_her2st_layout(tmp_path):
    rows = ["25\t13\t24.914\t13.042\t6930.58\t3510.24\t1", "24\t13\t24.032\t13.068\t6674.96\t3517.82\t0",
            "22.0\t14\t21.859\t13.955\t6045.2\t3776.38\t1"]
    path = write(tmp_path, "A1_selection.tsv", HER2ST + "\n".join(rows) + "\n")
    spots = read_coords(path)
    assert spots.source_format == "her2st"
    assert spots.ids == ["25x13", "22x14"]  # ids from the ARRAY coordinates, rounded
    np.testing.assert_array_equal(spots.xy, [[6930.58, 3510.24], [6045.2, 3776.38]])
    assert read_coords(path, all_spots=True).ids == ["25x13", "24x13", "22x14"]


def test_her2st_real_spot_tables_match_the_counts(real_data):
    n_total = 0
    for table in sorted((real_data / "her2st" / "spots").glob("*_selection.tsv")):
        section = table.name.split("_")[0]
        spots = read_coords(table)
        assert spots.source_format == "her2st"
        assert all(re.fullmatch(r"\d+x\d+", i) for i in spots.ids)
        with gzip.open(real_data / "her2st" / "counts" / f"{section}.tsv.gz", "rt") as fh:
            next(fh)
            count_rows = [line.split("\t", 1)[0] for line in fh]
        assert set(count_rows) <= set(spots.ids), section  # every counts row has its spot
        assert (spots.xy > 0).all() and (spots.xy < 10_000).all()
        n_total += len(count_rows)
    assert n_total == 13_620


def test_demo_sample_spots_are_real_her2st_spots(real_data):
    from mmap_deploy.demo import sample_paths

    _, coords, _ = sample_paths()
    sample = read_coords(coords)
    full = read_coords(real_data / "her2st" / "spots" / "B4_selection.tsv")
    position = {i: xy for i, xy in zip(full.ids, full.xy)}
    assert len(sample) == 120 and set(sample.ids) <= set(position)
    # the crop moved every spot by the same offset (left 1200, top 4450)
    shift = np.array([position[i] for i in sample.ids]) - sample.xy
    np.testing.assert_allclose(shift, np.broadcast_to([1200, 4450], shift.shape), atol=1e-9)


# --- plain x,y ------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", [
    "barcode,x,y\ns1,10,20\ns2,30.5,40\n",
    "barcode\tx\ty\ns1\t10\t20\ns2\t30.5\t40\n",
    "barcode;x;y\ns1;10;20\ns2;30.5;40\n",
    "barcode x y\ns1   10 20\ns2\t30.5  40\n",
    '"Barcode","X","Y"\n"s1",10,20\n"s2",30.5,40\n',
    "id, x, y\ns1, 10, 20\ns2, 30.5, 40\n",
    "y,spot_id,x,extra\n20,s1,10,a\n40,s2,30.5,b\n",
])
def test_plain_xy_delimiters_and_id_columns(tmp_path, text):
    spots = read_coords(write(tmp_path, "spots.txt", text))
    assert spots.source_format == "xy"
    assert spots.ids == ["s1", "s2"]
    np.testing.assert_array_equal(spots.xy, [[10, 20], [30.5, 40]])


def test_plain_xy_without_ids(tmp_path):
    spots = read_coords(write(tmp_path, "xy.csv", "x,y\n1e3,2E+3\n-0.5,.25\n"))
    assert spots.ids == ["spot_0", "spot_1"]
    np.testing.assert_array_equal(spots.xy, [[1000, 2000], [-0.5, 0.25]])


def test_semicolon_with_decimal_comma_is_explained(tmp_path):
    path = write(tmp_path, "eu.csv", "x;y\n1,5;2,5\n")
    with pytest.raises(UserError, match=r"eu\.csv: line 2, column 'x': '1,5' is not a finite number; use a dot"):
        read_coords(path)


# --- errors ---------------------------------------------------------------------------------------


def test_missing_directory_and_empty(tmp_path):
    with pytest.raises(UserError, match=r"nope\.csv: coordinates file not found"):
        read_coords(tmp_path / "nope.csv")
    with pytest.raises(UserError, match="is a directory"):
        read_coords(tmp_path)
    for text in ("", "\n\n  \n"):
        with pytest.raises(UserError, match=r"empty\.csv: the coordinates file is empty; expected one of: Visium"):
            read_coords(write(tmp_path, "empty.csv", text))
    with pytest.raises(UserError, match=r"header\.csv: has a header but no spots"):
        read_coords(write(tmp_path, "header.csv", "barcode,x,y\n"))


def test_unknown_columns_list_the_layouts(tmp_path):
    with pytest.raises(UserError) as err:
        read_coords(write(tmp_path, "odd.csv", "name,col,row\na,1,2\n"))
    msg = str(err.value)
    assert msg.startswith(f"{tmp_path / 'odd.csv'}: unrecognised columns [name,col,row]")
    assert "rename the coordinate columns to x and y" in msg
    for description in LAYOUTS.values():
        assert description in msg
    assert "\n" not in msg
    with pytest.raises(UserError, match="a Visium table needs all of barcode,in_tissue"):
        read_coords(write(tmp_path, "partial.csv", "in_tissue,pxl_row_in_fullres,pxl_col_in_fullres\n1,2,3\n"))
    with pytest.raises(UserError, match="a her2st table needs x, y, pixel_x and pixel_y"):
        read_coords(write(tmp_path, "partial.tsv", "pixel_x\tpixel_y\n1\t2\n"))


def test_numbers_without_header(tmp_path):
    with pytest.raises(UserError, match=r"nohead\.csv: the first line '10,20' has no column names; add a header line 'x,y'"):
        read_coords(write(tmp_path, "nohead.csv", "10,20\n30,40\n"))


@pytest.mark.parametrize("value,line", [("abc", 3), ("nan", 3), ("NaN", 3), ("inf", 3), ("-Infinity", 3),
                                         ("1e999", 3), ("", 3), ("1_000", 3), ("0x10", 3)])
def test_bad_numbers_name_line_column_and_value(tmp_path, value, line):
    path = write(tmp_path, "bad.csv", f"barcode,x,y\na,1,2\nb,{value},4\nc,5,6\n")
    with pytest.raises(UserError, match=rf"bad\.csv: line {line}, column 'x': '{re.escape(value)}' is not a finite number"):
        read_coords(path)


def test_bad_number_in_visium_list_names_the_column(tmp_path):
    rows = VISIUM_ROWS[:2] + ["AAACAGAGCGACTCCT-1,1,14,94,3487,NA"]
    with pytest.raises(UserError, match=r"line 3, column 'pxl_col_in_fullres': 'NA' is not a finite number"):
        read_coords(write(tmp_path, "list.csv", "\n".join(rows)))


def test_wrong_field_count(tmp_path):
    with pytest.raises(UserError, match=r"ragged\.csv: line 3 has 2 fields where the header has 3"):
        read_coords(write(tmp_path, "ragged.csv", "barcode,x,y\na,1,2\nb,3\n"))


def test_duplicate_ids_are_named(tmp_path):
    text = "barcode,x,y\na,1,2\nb,3,4\na,5,6\nc,7,8\nb,9,9\n"
    with pytest.raises(UserError, match=r"dup\.csv: 2 duplicate spot id\(s\): 'a', 'b'; every spot needs a unique id"):
        read_coords(write(tmp_path, "dup.csv", text))
    her2st = HER2ST + "3\t4\t0\t0\t10\t10\t1\n3.2\t4\t0\t0\t20\t20\t1\n"  # both round to 3x4
    with pytest.raises(UserError, match=r"'3x4'"):
        read_coords(write(tmp_path, "dup.tsv", her2st))


def test_empty_id(tmp_path):
    with pytest.raises(UserError, match=r"noid\.csv: line 3: empty spot id"):
        read_coords(write(tmp_path, "noid.csv", 'barcode,x,y\na,1,2\n"",3,4\n'))


def test_not_text(tmp_path):
    with pytest.raises(UserError, match=r"bin\.csv: not a UTF-8 text table \(undecodable byte at offset 2\)"):
        read_coords(write(tmp_path, "bin.csv", b"x,\xff\xfe\n"))
    with pytest.raises(UserError, match=r"nul\.csv: contains NUL bytes"):
        read_coords(write(tmp_path, "nul.csv", b"x,y\n1,\x002\n"))
    with pytest.raises(UserError, match=r"bad\.gz: the gzip file is damaged"):
        read_coords(write(tmp_path, "bad.gz", gzip.compress(b"x,y\n1,2\n")[:15]))
    with pytest.raises(UserError, match=r"tissue_positions\.parquet: cannot read the parquet file .*re-copy it"):
        read_coords(write(tmp_path, "tissue_positions.parquet", b"PAR1\x00\x00"))
    with pytest.raises(UserError, match=r"positions\.csv: a parquet file named like a text table; rename it"):
        read_coords(write(tmp_path, "positions.csv", b"PAR1\x00\x00"))


# --- inside the slide -----------------------------------------------------------------------------


def spots_at(points) -> Spots:
    xy = np.asarray(points, dtype=np.float64)
    return Spots(ids=[f"s{i}" for i in range(len(xy))], xy=xy, source_format="xy")


def test_check_inside_passes_and_counts_the_outside():
    check_inside(spots_at([[0, 0], [999.9, 499.9]]), 1000, 500, "c.csv", "s.svs")
    points = [[10, 10], [1200, 20], [30, 600], [40, 40], [1000, 0], [2000, 2000], [3000, 3000], [4000, 4000],
              [5000, 5000]]
    with pytest.raises(UserError) as err:
        check_inside(spots_at(points), 1000, 500, "c.csv", "s.svs")
    msg = str(err.value)
    assert msg.startswith("c.csv: 7 of 9 spot centres lie outside the slide s.svs (1000 x 500 px): "
                          "s1 (1200, 20), s2 (30, 600), s4 (1000, 0), s5 (2000, 2000), s6 (3000, 3000), ...")
    assert "\n" not in msg


def test_check_inside_hints_at_swapped_xy():
    # a tall slide: the spots fit only with x and y exchanged
    with pytest.raises(UserError, match="x and y look swapped"):
        check_inside(spots_at([[100, 50], [900, 80], [450, 60]]), 200, 1000, "c.csv", "s.svs")


def test_check_inside_hints_at_a_downscaled_image():
    # full-resolution coordinates over a 2000 px hires PNG of a 20 000 px slide
    points = np.random.default_rng(0).uniform(2000, 18000, size=(50, 2))
    with pytest.raises(UserError, match=r"reach \d+\.\dx the slide's size: .*downscaled image .*tissue_hires_image\.png"):
        check_inside(spots_at(points), 2000, 1900, "c.csv", "tissue_hires_image.png")


def test_check_inside_negative_coordinates():
    with pytest.raises(UserError, match="negative coordinates"):
        check_inside(spots_at([[-10, 5], [500, 400]]), 1000, 500, "c.csv", "s.svs")


def test_scale_warning_for_hires_coordinates_on_a_full_resolution_slide():
    hires = spots_at(np.random.default_rng(1).uniform(100, 1900, size=(30, 2)))
    assert "tissue_hires_scalef" in scale_warning(hires, 20_000, 20_000)
    assert scale_warning(hires, 2000, 2000) is None
