"""Slides where users keep them: a QuPath OME-TIFF export in a bucket (moto on 127.0.0.1) and on a web server,
read by byte range, gives the prediction the same file gives from disk, bit for bit; and a Ray cohort read
from a bucket and written to one equals the local batch, and a rerun skips what is done."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from conftest import run_cli
from remote_servers import bucket, fast_retries, point_clients_at, s3_server, web  # noqa: F401  (fixtures)
from wsi import load_section, qupath_export

CROP = (800, 800, 2300, 2300)  # 1 500 px (1.03 mm) of the demo's tissue
MPP = 0.5


@pytest.fixture(scope="module")
def qupath(tmp_path_factory):
    """A QuPath-like export (big-endian OME-TIFF, JPEG tiles, SubIFDs, the pixel size in the OME-XML only)."""
    from mmap_deploy.demo import sample_paths

    image, _, mpp = sample_paths()
    section = load_section(image, mpp, (200.0, 200.0), crop=CROP)
    return qupath_export(tmp_path_factory.mktemp("slides") / "he.ome.tif", [section], (1440.0, 1440.0), MPP)


def assert_same_prediction(a: ad.AnnData, b: ad.AnnData) -> None:
    np.testing.assert_array_equal(a.X, b.X)
    assert list(a.obs_names) == list(b.obs_names) and list(a.obs.columns) == list(b.obs.columns)
    for col in a.obs.columns:
        assert list(a.obs[col].astype(str)) == list(b.obs[col].astype(str)), col
    for key in a.obsm:
        np.testing.assert_array_equal(a.obsm[key], b.obsm[key])


def _read(bucket, key, tmp_path) -> ad.AnnData:
    local = tmp_path / key.replace("/", "_")
    local.write_bytes(bucket.get(key))
    return ad.read_h5ad(local)


def test_an_ome_tiff_over_http_and_in_a_bucket_predicts_as_from_disk(qupath, web, bucket, tmp_path):
    run_cli(qupath, "--grid", "visium", "-o", tmp_path / "disk.h5ad", expect=0)
    disk = ad.read_h5ad(tmp_path / "disk.h5ad")
    assert disk.uns["mmap"]["slide_reader"]["backend"] == "tifffile" and disk.uns["mmap"]["mpp"] == MPP
    size = qupath.stat().st_size

    web.files["/slides/he.ome.tif"] = qupath.read_bytes()
    url = web.url("/slides/he.ome.tif")
    run_cli(url, "--grid", "visium", "-o", tmp_path / "http.h5ad", expect=0)
    over_http = ad.read_h5ad(tmp_path / "http.h5ad")
    assert_same_prediction(disk, over_http)
    record = over_http.uns["mmap"]
    assert record["slide"] == url and record["slide_format"] == disk.uns["mmap"]["slide_format"]
    assert record["mpp_source"] == disk.uns["mmap"]["mpp_source"]
    timings = record["timings"]
    assert timings["remote_requests"] >= 2 and 0 < timings["remote_bytes"] <= size + 4 * 2**20
    assert "remote_requests" not in disk.uns["mmap"]["timings"]

    slide = bucket.put("slides/he.ome.tif", qupath.read_bytes())
    run_cli(slide, "--grid", "visium", "-o", bucket.url("results/he.h5ad"), expect=0)
    assert_same_prediction(disk, _read(bucket, "results/he.h5ad", tmp_path))


def test_a_slide_and_its_spots_in_a_bucket_predict_as_from_disk(qupath, bucket, tmp_path):
    # spots: the grid the local run laid, as a plain x,y table
    run_cli(qupath, "--grid", "st", "-o", tmp_path / "grid.h5ad", expect=0)
    xy = ad.read_h5ad(tmp_path / "grid.h5ad").obsm["spatial"]
    table = "barcode,x,y\n" + "".join(f"s{i},{x:.1f},{y:.1f}\n" for i, (x, y) in enumerate(xy))
    (tmp_path / "spots.csv").write_text(table)
    run_cli(qupath, tmp_path / "spots.csv", "-o", tmp_path / "disk.h5ad", "--skip-geometry-checks", expect=0)
    slide = bucket.put("cohort/he.ome.tif", qupath.read_bytes())
    spots = bucket.put("cohort/spots.csv", table.encode())
    run_cli(slide, spots, "-o", tmp_path / "bucket.h5ad", "--skip-geometry-checks", expect=0)
    disk, remote = ad.read_h5ad(tmp_path / "disk.h5ad"), ad.read_h5ad(tmp_path / "bucket.h5ad")
    assert_same_prediction(disk, remote)
    assert remote.uns["mmap"]["coords"] == spots


def test_a_dicom_series_in_a_bucket_is_refused_with_the_fix(bucket, tmp_path):
    folder = bucket.url("dicom/series/")
    r = run_cli(folder, "--grid", "visium", "-o", tmp_path / "o.h5ad", expect=2)
    line = r.stderr.strip().splitlines()[-1]
    assert line.startswith(f"error: {folder}: a DICOM WSI is a series of files") and "copy the series folder" in line
    assert not (tmp_path / "o.h5ad").exists()


@pytest.mark.slow
def test_a_ray_cohort_from_a_bucket_to_a_bucket_equals_the_local_batch_and_resumes(qupath, s3_server, monkeypatch,
                                                                                     tmp_path):
    """No shared folder: the manifest, slides, spots and outputs are in the bucket; the workers read them there."""
    import ray

    from mmap_deploy.location import reset_clients
    from mmap_deploy.run.batch_ray import start_local_ray
    from remote_servers import Bucket, new_bucket_name

    point_clients_at(monkeypatch, s3_server.endpoint)  # before Ray starts: its workers inherit the environment
    name = new_bucket_name()
    from mmap_deploy.location import RemotePath
    from mmap_deploy.location.access import client

    client(RemotePath(f"s3://{name}/")).mkdir(name)
    bucket = Bucket(name, s3_server.endpoint)
    run_cli(qupath, "--grid", "st", "-o", tmp_path / "grid.h5ad", expect=0)
    xy = ad.read_h5ad(tmp_path / "grid.h5ad").obsm["spatial"]
    table = "x,y\n" + "".join(f"{x:.1f},{y:.1f}\n" for x, y in xy)
    rows = "slide,coords,id\nslides/he.ome.tif,spots/he.csv,spots\nslides/he.ome.tif,,grid\n"
    bucket.put("cohort/slides/he.ome.tif", qupath.read_bytes())
    bucket.put("cohort/spots/he.csv", table.encode())
    manifest = bucket.put("cohort/slides.csv", rows.encode())
    local = tmp_path / "cohort"
    (local / "slides").mkdir(parents=True)
    (local / "spots").mkdir()
    (local / "slides" / "he.ome.tif").write_bytes(qupath.read_bytes())
    (local / "spots" / "he.csv").write_text(table)
    (local / "slides.csv").write_text(rows)
    flags = ("--grid", "visium", "--skip-geometry-checks")
    run_cli("--manifest", local / "slides.csv", "-o", tmp_path / "local", *flags, expect=0)
    start_local_ray(num_cpus=2)
    try:
        r = run_cli("--manifest", manifest, "-o", bucket.url("results/"), "--ray", "--ray-workers", "1", *flags,
                    expect=0)
        assert "batch: 2 done, 0 skipped (already done), 0 failed of 2 slide(s)" in r.stderr
        assert sorted(k for k in bucket.keys() if k.startswith("results/")) == ["results/grid.h5ad",
                                                                              "results/spots.h5ad"]
        for row in ("spots", "grid"):
            assert_same_prediction(ad.read_h5ad(tmp_path / "local" / f"{row}.h5ad"),
                                   _read(bucket, f"results/{row}.h5ad", tmp_path))
        r = run_cli("--manifest", manifest, "-o", bucket.url("results/"), "--ray", *flags, expect=0)
        assert "batch: 0 done, 2 skipped (already done), 0 failed of 2 slide(s)" in r.stderr
    finally:
        ray.shutdown()
        reset_clients()
