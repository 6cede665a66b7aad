"""Reading from a web server and from S3 (moto) on 127.0.0.1: range reads, retries, failures, tables and folders."""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from conftest import write_pyramid
from remote_servers import FileServer, bucket, fast_retries, s3_server, web  # noqa: F401  (fixtures)

from mmap_deploy.errors import OutputStorageError, UserError
from mmap_deploy.location import as_location, io_totals, open_input
from mmap_deploy.location.ranges import open_range

SIGNATURE = "X-Amz-Signature=0123456789abcdef"


def _pyramid_bytes(tmp_path) -> bytes:
    """A zlib-tiled 3-level TIFF pyramid (2048 px; blocks of colour, so it compresses as a scan does)."""
    rng = np.random.default_rng(0)
    img = np.kron(rng.integers(40, 250, (64, 64, 3), dtype=np.uint8), np.ones((32, 32, 1), np.uint8))
    img = (img.astype(np.int16) + rng.integers(-3, 4, img.shape)).clip(0, 255).astype(np.uint8)
    return write_pyramid(tmp_path / "slide.tif", img, levels=(1, 4, 16)).read_bytes()


def test_a_pyramid_level_is_read_by_range_not_whole(web, bucket, tmp_path):
    import tifffile
    data = _pyramid_bytes(tmp_path)
    with tifffile.TiffFile(tmp_path / "slide.tif") as tif:
        want = tif.pages[2].asarray()
    web.files["/cohort/slide.tif"] = data
    for url in (web.url("/cohort/slide.tif") + "?" + SIGNATURE, bucket.put("cohort/slide.tif", data)):
        before = io_totals()
        with open_range(as_location(url), block_bytes=64 << 10) as fh, tifffile.TiffFile(fh) as tif:
            got = tif.pages[2].asarray()
            stats = fh.stats
        assert np.array_equal(got, want)
        # the smallest level, the header and the page directories: a fraction of the file, in a few requests
        assert stats.bytes < len(data) / 4, (stats, len(data))
        assert 2 <= stats.requests <= 12 and stats.retries == 0
        assert (io_totals() - before).bytes == stats.bytes
    gets = [r for r in web.requests if r[0] == "GET"]
    assert len(gets) == stats.requests - 1 and all(r[2] and r[2].startswith("bytes=") for r in gets)


def test_a_dropped_connection_is_retried_once_and_counted(web, fast_retries):
    data = bytes(range(256)) * 4096  # 1 MiB
    web.files["/a.bin"] = data
    web.drop("/a.bin", times=1)
    fh = open_range(as_location(web.url("/a.bin")), block_bytes=64 << 10)
    assert fh.read_at(300_000, 10) == data[300_000:300_010]
    assert (fh.stats.requests, fh.stats.retries, fh.stats.bytes) == (3, 1, 64 << 10)  # size, dropped GET, GET
    assert web.gets("/a.bin") == 2
    # the cached block serves the next read without a request
    fh.seek(300_010)
    assert fh.read(6) == data[300_010:300_016] and fh.stats.requests == 3


def test_a_connection_that_keeps_dropping_is_one_line(web, fast_retries):
    web.files["/a.bin"] = bytes(1 << 20)
    web.drop("/a.bin", times=-1)
    with pytest.raises(UserError) as e:
        open_range(as_location(web.url("/a.bin") + "?" + SIGNATURE), block_bytes=64 << 10).read(5)
    msg = str(e.value)
    assert "\n" not in msg and "0123456789abcdef" not in msg
    assert msg.startswith(f"{web.url('/a.bin')}?X-Amz-Signature=***: reading bytes 0-65535 failed 3 times (")
    assert msg.endswith("the connection or the service failed: check the network (or the endpoint) and rerun")
    assert web.gets("/a.bin") == 3


@pytest.mark.parametrize("status, says, gets", [
    (404, "not found; check the URL", 1),
    (403, "access denied reading it (HTTP 403 Forbidden); the URL may have expired (a signed URL: sign it anew) or "
          "need a token, and check that they may read it", 1),
    (503, "reading it failed 3 times (HTTP 503 Service Unavailable); the connection or the service failed: check "
          "the network (or the endpoint) and rerun", 3),
])
def test_http_failures_are_one_line_and_only_transient_ones_are_retried(web, fast_retries, status, says, gets):
    web.files["/t.csv"] = b"x,y\n1,2\n"
    web.status["/t.csv"] = status
    with pytest.raises(UserError) as e:
        as_location(web.url("/t.csv") + "?token=T0K3N").read_bytes()
    assert str(e.value) == f"{web.url('/t.csv')}?token=***: {says}"
    assert web.gets("/t.csv") == gets


def test_a_server_without_byte_ranges_is_refused_not_downloaded(tmp_path):
    with FileServer({"/big.tif": bytes(8 << 20)}, ranges=False) as server:
        fh = open_range(as_location(server.url("/big.tif")), block_bytes=64 << 10)
        with pytest.raises(UserError, match=r"big\.tif: failed reading bytes 65536-131071 \(ValueError: The HTTP "
                                            r"server doesn't appear to support range requests"):
            fh.read_at(100_000, 10)
        assert fh.stats.bytes == 0


def spaceranger_outs(root, n: int = 6):
    """A small Space Ranger outs/ folder: a Visium table with a header, scale factors, the two images."""
    from PIL import Image

    spatial = root / "outs" / "spatial"
    spatial.mkdir(parents=True)
    rows = ["barcode,in_tissue,array_row,array_col,pxl_row_in_fullres,pxl_col_in_fullres"]
    for r in range(n):
        for c in range(r % 2, 2 * n, 2):
            rows.append(f"B{r:02d}{c:02d}-1,{int(c != 0)},{r},{c},{100 + r * 125.9:.1f},{100 + c * 72.7:.1f}")
    (spatial / "tissue_positions.csv").write_text("\n".join(rows) + "\n")
    rgb = np.full((1000, 1200, 3), 230, np.uint8)
    Image.fromarray(rgb).resize((600, 500)).save(spatial / "tissue_hires_image.png")
    Image.fromarray(rgb).resize((120, 100)).save(spatial / "tissue_lowres_image.png")
    sf = {"tissue_hires_scalef": 0.5, "tissue_lowres_scalef": 0.1, "spot_diameter_fullres": 80.0}
    (spatial / "scalefactors_json.json").write_text(json.dumps(sf))
    return root / "outs"


def _same_input(a, b) -> None:
    assert a.layout == b.layout and a.scalefactors == b.scalefactors and list(a.spots.ids) == list(b.spots.ids)
    assert np.array_equal(a.spots.xy, b.spots.xy) and np.array_equal(a.spots.array_xy, b.spots.array_xy)
    assert sorted(a.images) == sorted(b.images) == ["hires", "lowres"]


def test_a_space_ranger_folder_and_a_table_over_http_and_in_a_bucket(web, bucket, tmp_path):
    from mmap_deploy.inputs.coords import read_coords
    from mmap_deploy.inputs.layouts import load_images, read_spot_input

    outs = spaceranger_outs(tmp_path)
    local = read_spot_input(outs)
    for p in sorted(outs.rglob("*")):
        if p.is_file():
            web.files["/run1/" + p.relative_to(tmp_path).as_posix()] = p.read_bytes()
    over_http = read_spot_input(web.url("/run1/outs/"))
    in_bucket = read_spot_input(bucket.put_folder(outs, "run1/outs"))
    for remote in (over_http, in_bucket):
        _same_input(remote, local)
        assert str(remote.table).endswith("/run1/outs/spatial/tissue_positions.csv")
        images, warnings = load_images(remote, 1200, 1000)
        assert warnings == [] and images["lowres"].shape == (100, 120, 3)
    assert in_bucket.table.url == bucket.url("run1/outs/spatial/tissue_positions.csv")
    # the table on its own, and its spatial/ folder
    table = read_coords(bucket.url("run1/outs/spatial/tissue_positions.csv"))
    assert list(table.ids) == list(local.spots.ids)
    assert read_spot_input(bucket.url("run1/outs/spatial/")).layout == "spaceranger-spatial"
    with pytest.raises(UserError, match=r"^s3://.*/run1/nothing/: coordinates file or folder not found"):
        read_spot_input(bucket.url("run1/nothing/"))


def test_a_visium_hd_folder_in_a_bucket_reads_its_parquet_by_range(bucket, tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq
    from mmap_deploy.inputs.layouts import read_spot_input

    root = tmp_path / "hd" / "outs"
    for um in (8, 16):
        spatial = root / "binned_outputs" / f"square_{um:03d}um" / "spatial"
        spatial.mkdir(parents=True)
        r, c = np.divmod(np.arange(2500), 50)
        pq.write_table(pa.table({
            "barcode": [f"s_{um:03d}um_{i:05d}_{j:05d}-1" for i, j in zip(r, c)],
            "in_tissue": pa.array((c % 7 != 0).astype(np.int32)), "array_row": pa.array(r),
            "array_col": pa.array(c), "pxl_row_in_fullres": pa.array(100 + r * um / 0.5),
            "pxl_col_in_fullres": pa.array(100 + c * um / 0.5)}), spatial / "tissue_positions.parquet")
        (spatial / "scalefactors_json.json").write_text(json.dumps({"bin_size_um": um, "microns_per_pixel": 0.5}))
    base = bucket.put_folder(root, "hd/outs")
    with pytest.raises(UserError, match=r"hd/outs/: a Visium HD output with bins of several sizes; pass one bin "
                                        r"folder, e.g. s3://.*/hd/outs/binned_outputs/square_016um \(available: "
                                        r"square_008um, square_016um\)"):
        read_spot_input(base)
    remote = read_spot_input(bucket.url("hd/outs/binned_outputs/square_016um/"))
    local = read_spot_input(root / "binned_outputs" / "square_016um")
    assert remote.layout == local.layout == "visium-hd-bins" and remote.lattice == local.lattice
    assert np.array_equal(remote.spots.ids, local.spots.ids) and np.array_equal(remote.spots.xy, local.spots.xy)


def test_s3_failures_are_one_line_with_the_fix(bucket, monkeypatch):
    from mmap_deploy.atomic import atomic_path

    with pytest.raises(UserError, match=rf"^s3://{bucket.name}/nope\.csv: not found; check the bucket and key$"):
        as_location(bucket.url("nope.csv")).read_bytes()
    with pytest.raises(UserError, match=rf"^s3://{bucket.name}-gone/x\.csv: the bucket '{bucket.name}-gone' does not "
                                        r"exist \(or not at this endpoint\); check the bucket's name$"):
        as_location(f"s3://{bucket.name}-gone/x.csv").read_bytes()
    # moto checks signatures against its IAM users once told to: our test keys are then refused (HTTP 403)
    key = bucket.put("in/t.csv", b"x,y\n1,2\n")
    import moto.settings

    monkeypatch.setattr(moto.settings, "INITIAL_NO_AUTH_ACTION_COUNT", 0)
    with pytest.raises(UserError) as e:
        as_location(key).read_bytes()
    assert str(e.value).startswith(f"{key}: access denied reading it (403")
    assert str(e.value).endswith("set AWS_PROFILE, or AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY, or run where an "
                                 "instance role gives them, and check that they may read it")
    with pytest.raises(OutputStorageError, match=r"out\.h5ad: access denied uploading it .*may write there$"):
        with atomic_path(bucket.url("out/out.h5ad")) as tmp:
            tmp.write_bytes(b"data")


def test_without_credentials_reads_go_anonymous_and_writes_say_what_to_set(bucket, monkeypatch, caplog, tmp_path):
    from mmap_deploy.atomic import atomic_path
    from mmap_deploy.location import reset_clients

    # a public object, as in the Imaging Data Commons' buckets: anyone may read it, no one anonymous may write
    bucket.fs.call_s3("put_object", Bucket=bucket.name, Key="public/t.csv", Body=b"x,y\n1,2\n", ACL="public-read")
    key = bucket.url("public/t.csv")
    for k in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.delenv(k)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "none"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    reset_clients()
    with caplog.at_level("INFO", logger="mmap_deploy"):
        assert as_location(key).read_bytes() == b"x,y\n1,2\n"
    assert f"no AWS credentials found: reading s3://{bucket.name} anonymously (a public bucket)" in caplog.text
    with pytest.raises(OutputStorageError, match=rf"^s3://{bucket.name}/o\.h5ad: no credentials found for s3:// "
                                                 r"\(uploading it\); set AWS_PROFILE"):
        with atomic_path(bucket.url("o.h5ad")) as tmp:
            tmp.write_bytes(b"data")


def test_a_manifest_in_a_bucket_resolves_its_rows_against_its_own_location(bucket):
    from mmap_deploy.run.manifest import check_output_dir, check_rows_exist, read_manifest

    bucket.put("cohort/svs/A.svs", b"slide")
    bucket.put("cohort/csv/A.csv", b"x,y\n1,2\n")
    bucket.put("elsewhere/B.svs", b"slide")
    text = ("slide,coords,id\nsvs/A.svs,csv/A.csv,A\n"
            f"s3://{bucket.name}/elsewhere/B.svs,,B\n"
            "https://host.invalid/C.svs?sig=SECRET,../csv/C.csv,C\n")
    manifest = bucket.put("cohort/slides.csv", text.encode())
    rows = read_manifest(manifest)
    assert [r.slide.url for r in rows] == [bucket.url("cohort/svs/A.svs"), bucket.url("elsewhere/B.svs"),
                                           "https://host.invalid/C.svs?sig=SECRET"]
    assert [None if r.coords is None else r.coords.url for r in rows] == [bucket.url("cohort/csv/A.csv"), None,
                                                                           bucket.url("csv/C.csv")]
    check_rows_exist(as_location(manifest), rows[:2])
    missing = dataclasses.replace(rows[0], line=9, slide=as_location(bucket.url("cohort/svs/Z.svs")), name="Z")
    with pytest.raises(UserError) as e:
        check_rows_exist(as_location(manifest), [rows[0], missing])
    assert str(e.value) == (f"{manifest}: 1 path(s) not found, no slide was started: line 9: slide "
                            f"{bucket.url('cohort/svs/Z.svs')}; fix the manifest (paths are relative to its folder)")
    check_output_dir(bucket.url("results/"))
    with pytest.raises(UserError, match=r"^https://h/out/: cannot write to an HTTPS URL; write to s3://, gs://"):
        check_output_dir("https://h/out/")
    with pytest.raises(UserError, match=r"results\.h5ad: with --manifest, -o is an output folder"):
        check_output_dir(bucket.url("results.h5ad"))


def test_open_input_is_a_plain_file_for_a_local_path(tmp_path):
    (tmp_path / "a.bin").write_bytes(b"abc")
    with open_input(tmp_path / "a.bin") as fh:
        assert fh.read() == b"abc" and not hasattr(fh, "stats")
    with pytest.raises(FileNotFoundError):
        open_input(tmp_path / "missing.bin")


def test_read_input_fetches_a_small_input_whole(web, tmp_path):
    from mmap_deploy.location import read_input

    web.files["/mask.geojson"] = b'{"type": "FeatureCollection", "features": []}'
    assert read_input(web.url("/mask.geojson?token=T")) == web.files["/mask.geojson"]
    (tmp_path / "mask.png").write_bytes(b"png")
    assert read_input(tmp_path / "mask.png") == b"png"
    with pytest.raises(FileNotFoundError):
        read_input(tmp_path / "missing.png")


def test_a_slide_for_openslide_is_copied_whole_within_its_bound_and_removed(web, tmp_path):
    import openslide
    from mmap_deploy.location import local_copy

    data = _pyramid_bytes(tmp_path)
    web.files["/cohort/A.tif"] = data
    with local_copy(as_location(web.url("/cohort/A.tif") + "?" + SIGNATURE)) as copy:
        assert copy.name == "A.tif" and copy.read_bytes() == data
        with openslide.OpenSlide(str(copy)) as slide:  # OpenSlide reads the copy as it reads any local file
            assert slide.level_count == 3 and slide.dimensions == (2048, 2048)
        folder = copy.parent
    assert not folder.exists()
    with pytest.raises(UserError, match=r"A\.tif\?X-Amz-Signature=\*\*\*: \d+\.\d MB, more than the 1\.0 MB this tool "
                                        r"copies to local disk for OpenSlide, which cannot read remote files; copy it"):
        with local_copy(as_location(web.url("/cohort/A.tif") + "?" + SIGNATURE), max_bytes=10**6):
            pass
    with pytest.raises(UserError, match=r"B\.mrxs: MIRAX \(\.mrxs and its folder of \.dat files\) slides are several "
                                        r"files, which OpenSlide reads only from local disk; copy the slide's files"):
        with local_copy(as_location(web.url("/cohort/B.mrxs"))):
            pass
    assert web.gets("/cohort/B.mrxs") == 0
