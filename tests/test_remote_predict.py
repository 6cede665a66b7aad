"""mmap-predict with spots and outputs in a bucket (moto) or on a web server: the local run's output, bit for bit."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pytest
from conftest import run_cli, spatialdata_or_skip
from remote_servers import bucket, fast_retries, s3_server, web  # noqa: F401  (fixtures)


@pytest.fixture(scope="module")
def demo():
    from mmap_deploy.demo import sample_paths

    return sample_paths()


def _read(bucket, key: str, tmp_path):
    local = tmp_path / key.replace("/", "_")
    local.write_bytes(bucket.get(key))
    return ad.read_h5ad(local)


def test_spots_in_a_bucket_and_the_output_uploaded_give_the_local_output(demo, bucket, tmp_path):
    image, coords, _ = demo
    remote_coords = bucket.put("cohort/B4/B4_selection.tsv", coords.read_bytes())
    run_cli(image, coords, "-o", tmp_path / "local.h5ad", expect=0)
    r = run_cli(image, remote_coords, "-o", bucket.url("results/B4.h5ad"), expect=0)
    assert f"wrote {bucket.url('results/B4.h5ad')}: " in r.stderr
    local, remote = ad.read_h5ad(tmp_path / "local.h5ad"), _read(bucket, "results/B4.h5ad", tmp_path)
    assert np.array_equal(local.X, remote.X) and list(local.obs_names) == list(remote.obs_names)
    assert np.array_equal(local.obsm["spatial"], remote.obsm["spatial"])
    assert np.array_equal(local.obsm["mmap_embedding"], remote.obsm["mmap_embedding"])
    assert bucket.keys() == ["cohort/B4/B4_selection.tsv", "results/B4.h5ad"]  # no claim, no temporary object
    # an output that is there is kept, as locally
    r = run_cli(image, remote_coords, "-o", bucket.url("results/B4.h5ad"), expect=2)
    assert f"error: {bucket.url('results/B4.h5ad')}: already exists; pass --overwrite to replace it" in r.stderr


@pytest.mark.slow
def test_a_spatialdata_store_goes_to_the_bucket_whole(demo, bucket, tmp_path):
    sd = spatialdata_or_skip()
    from mmap_deploy.atomic import output_exists

    image, coords, _ = demo
    run_cli(image, coords, "-o", bucket.url("results/B4.zarr"), expect=0)
    assert output_exists(bucket.url("results/B4.zarr")) and "results/B4.zarr/zarr.json" in bucket.keys()
    local = tmp_path / "B4.zarr"
    for key in bucket.keys():
        (local / key.removeprefix("results/B4.zarr/")).parent.mkdir(parents=True, exist_ok=True)
        (local / key.removeprefix("results/B4.zarr/")).write_bytes(bucket.get(key))
    run_cli(image, coords, "-o", tmp_path / "ref.h5ad", "--library-id", "B4", expect=0)
    table = sd.read_zarr(local).tables["table"]
    assert np.array_equal(table.X, ad.read_h5ad(tmp_path / "ref.h5ad").X)


def test_spots_that_cannot_be_fetched_are_one_line_and_no_output(demo, bucket, web):
    image, coords, _ = demo
    web.files["/B4_selection.tsv"] = coords.read_bytes()
    web.drop("/B4_selection.tsv", times=-1)
    url = web.url("/B4_selection.tsv") + "?X-Amz-Signature=5d672d79c15b13162d"
    r = run_cli(image, url, "-o", bucket.url("results/B4.h5ad"), expect=2)
    errors = [ln for ln in r.stderr.splitlines() if ln.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in r.stderr, r.stderr
    assert errors[0].startswith(f"error: {web.url('/B4_selection.tsv')}?X-Amz-Signature=***: reading it failed 3 "
                                "times (")
    assert "5d672d79c15b13162d" not in r.stderr
    assert bucket.keys() == []
    assert web.gets("/B4_selection.tsv") == 3


def test_a_batch_from_a_manifest_in_a_bucket_into_a_bucket(demo, bucket, tmp_path):
    image, coords, _ = demo
    bucket.put("cohort/spots/A.tsv", coords.read_bytes())
    bucket.put("cohort/spots/B.tsv", b"no,columns,we,know\n1,2,3,4\n")
    manifest = bucket.put("cohort/slides.csv", f"slide,coords,id\n{image},spots/A.tsv,A\n{image},spots/B.tsv,B\n"
                          .encode())
    r = run_cli("--manifest", manifest, "-o", bucket.url("results/"), expect=1)
    assert f"batch: 1 done, 0 skipped (already done), 1 failed of 2 slide(s) in {manifest}" in r.stderr
    assert f"failed: B ({manifest} line 3): {bucket.url('cohort/spots/B.tsv')}: unrecognised columns" in r.stderr
    assert [k for k in bucket.keys() if k.startswith("results/")] == ["results/A.h5ad"]  # claims released
    run_cli(image, coords, "-o", tmp_path / "A.h5ad", "--library-id", "A", expect=0)
    assert np.array_equal(_read(bucket, "results/A.h5ad", tmp_path).X, ad.read_h5ad(tmp_path / "A.h5ad").X)
    # a rerun skips what is in the bucket
    r = run_cli("--manifest", manifest, "-o", bucket.url("results/"), expect=1)
    assert f"batch: 0 done, 1 skipped (already done), 1 failed of 2 slide(s) in {manifest}" in r.stderr
