"""Writing to S3 (moto on 127.0.0.1): whole uploads or none, folders with their markers last, claims by condition."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
import time

import pytest
from remote_servers import FaultProxy, bucket, fast_retries, point_clients_at, s3_server  # noqa: F401  (fixtures)

from mmap_deploy.atomic import atomic_folder, atomic_path, output_exists
from mmap_deploy.errors import OutputStorageError, UserError
from mmap_deploy.location import as_location
from mmap_deploy.run.claims import BucketClaim, ClaimHolder, claim_path, release_run_claims, try_claim


def test_an_output_is_uploaded_whole_and_a_failed_write_leaves_none(bucket):
    out = bucket.url("results/A.h5ad")
    with atomic_path(out) as tmp:
        assert tmp.name == "A.h5ad" and not str(tmp).startswith("s3:")
        tmp.write_bytes(b"first")
    assert bucket.get("results/A.h5ad") == b"first" and output_exists(out)
    with pytest.raises(RuntimeError, match="the writer failed"):
        with atomic_path(out) as tmp:
            tmp.write_bytes(b"half of the second")
            raise RuntimeError("the writer failed")
    assert bucket.get("results/A.h5ad") == b"first"  # the old output, as it was
    with pytest.raises(RuntimeError):
        with atomic_path(bucket.url("results/B.h5ad")) as tmp:
            raise RuntimeError("the writer failed")
    assert bucket.keys() == ["results/A.h5ad"] and not output_exists(bucket.url("results/B.h5ad"))
    with pytest.raises(UserError, match=r"^https://h/o\.h5ad: cannot write to an HTTPS URL; write to s3://, gs://"):
        with atomic_path("https://h/o.h5ad") as tmp:
            tmp.write_bytes(b"x")


def _through(monkeypatch, s3_server, should_drop):
    proxy = FaultProxy(s3_server.port, should_drop)
    proxy.__enter__()
    point_clients_at(monkeypatch, proxy.endpoint)
    return proxy


def test_an_upload_that_fails_mid_way_leaves_no_object(bucket, s3_server, monkeypatch, tmp_path):
    from mmap_deploy.location import transfer

    monkeypatch.setattr(transfer, "UPLOAD_CHUNK_BYTES", 5 << 20)  # S3's smallest part: 3 parts for 11 MiB
    big = tmp_path / "big.h5ad"
    big.write_bytes(os.urandom(11 << 20))
    bucket.put("results/big.h5ad", b"the previous output")
    dropped = {"n": 0}

    def second_part(method: str, path: str) -> bool:  # every upload of part 2: the upload fails mid-way
        return method == "PUT" and "partNumber=2" in path

    proxy = _through(monkeypatch, s3_server, second_part)
    try:
        with pytest.raises(UserError) as e:
            transfer.upload_file(big, as_location(bucket.url("results/big.h5ad")))
        dropped["n"] = len(proxy.dropped)
    finally:
        proxy.__exit__()
    assert str(e.value).startswith(f"{bucket.url('results/big.h5ad')}: uploading it failed 3 times (")
    # 3 tries of ours; aiohttp itself sends an idempotent request again once on a dropped kept-alive connection
    assert 3 <= dropped["n"] <= 6 and "\n" not in str(e.value)
    point_clients_at(monkeypatch, s3_server.endpoint)
    assert bucket.get("results/big.h5ad") == b"the previous output"  # never a partial object
    assert bucket.pending_uploads() == []  # the multipart uploads were aborted: no parts left to pay for

    # dropped once: the retry uploads it whole
    once = iter([True])
    proxy = _through(monkeypatch, s3_server, lambda m, p: m == "PUT" and "partNumber=2" in p and next(once, False))
    try:
        transfer.upload_file(big, as_location(bucket.url("results/big.h5ad")))
    finally:
        proxy.__exit__()
    point_clients_at(monkeypatch, s3_server.endpoint)
    assert bucket.get("results/big.h5ad") == big.read_bytes() and bucket.pending_uploads() == []


def _store(folder) -> None:
    """A folder shaped like a zarr store: root metadata, a group, chunks."""
    (folder / "table" / "X" / "c").mkdir(parents=True)
    (folder / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    (folder / "table" / "zarr.json").write_text('{"zarr_format": 3, "node_type": "group"}')
    for i in range(5):
        (folder / "table" / "X" / "c" / str(i)).write_bytes(bytes([i]) * 1000)


def test_a_zarr_store_is_in_the_bucket_whole_or_not_at_all(bucket, s3_server, monkeypatch):
    out = bucket.url("results/A.zarr")
    atomic_folder(as_location(out), _store)
    assert output_exists(out)
    assert bucket.keys() == ["results/A.zarr/table/X/c/0", "results/A.zarr/table/X/c/1", "results/A.zarr/table/X/c/2",
                             "results/A.zarr/table/X/c/3", "results/A.zarr/table/X/c/4", "results/A.zarr/table/zarr.json",
                             "results/A.zarr/zarr.json"]
    # the root metadata goes last; when its upload fails, what was uploaded goes too
    proxy = _through(monkeypatch, s3_server, lambda m, p: m == "PUT" and p.startswith(f"/{bucket.name}/results/B.zarr/zarr.json"))
    try:
        with pytest.raises(UserError, match=r"B\.zarr/zarr\.json: uploading it failed 3 times"):
            atomic_folder(as_location(bucket.url("results/B.zarr")), _store)
        puts = [p for m, p in proxy.seen if m == "PUT" and "/B.zarr/" in p]
    finally:
        proxy.__exit__()
    point_clients_at(monkeypatch, s3_server.endpoint)
    assert puts[-3:] == [f"/{bucket.name}/results/B.zarr/zarr.json"] * 3  # after every other file
    assert not output_exists(bucket.url("results/B.zarr"))
    assert not [k for k in bucket.keys() if "B.zarr" in k]
    # objects left by a killed upload (no root metadata) are not an output, and the next write replaces them
    bucket.put("results/C.zarr/table/X/c/9", b"debris")
    assert not output_exists(bucket.url("results/C.zarr"))
    atomic_folder(as_location(bucket.url("results/C.zarr")), _store)
    assert output_exists(bucket.url("results/C.zarr")) and "results/C.zarr/table/X/c/9" not in bucket.keys()


def test_two_claimants_one_winner_and_who_holds_it_is_said(bucket):
    out = as_location(bucket.url("results/A.h5ad"))
    start = threading.Barrier(2)
    got = {}

    def claim(run: str) -> None:
        start.wait(timeout=60)
        got[run] = try_claim(out, run)

    threads = [threading.Thread(target=claim, args=(run,)) for run in ("run-a", "run-b")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    winners = [r for r, c in got.items() if isinstance(c, BucketClaim)]
    losers = [c for c in got.values() if isinstance(c, ClaimHolder)]
    assert len(winners) == 1 and len(losers) == 1
    assert losers[0].run == winners[0] and losers[0].host == socket.gethostname() and losers[0].pid == os.getpid()
    assert claim_path(out).url == bucket.url("results/.A.h5ad.claim")
    got[winners[0]].release()
    assert ".A.h5ad.claim" not in " ".join(bucket.keys())
    again = try_claim(out, "run-c")
    assert isinstance(again, BucketClaim)
    again.release()


def test_stale_claims_in_a_bucket_are_taken_over_and_live_ones_kept(bucket):
    out = as_location(bucket.url("results/A.h5ad"))
    key = "results/.A.h5ad.claim"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    # a dead process on this host
    bucket.put(key, json.dumps({"host": socket.gethostname(), "pid": dead.pid, "run": "x", "started": "t"}).encode())
    claim = try_claim(out, "me")
    assert isinstance(claim, BucketClaim) and json.loads(bucket.get(key))["run"] == "me"
    claim.release()
    # another host's claim: kept while its heartbeat is recent, taken over once it is not
    bucket.put(key, json.dumps({"host": "elsewhere", "pid": 1, "run": "x", "started": "t"}).encode())
    held = try_claim(out, "me")
    assert isinstance(held, ClaimHolder) and held.describe() == "host elsewhere, pid 1, since t"
    claim = try_claim(out, "me", stale_after_s=-1.0)  # every heartbeat is "too old": as after 10 minutes
    assert isinstance(claim, BucketClaim) and json.loads(bucket.get(key))["run"] == "me"
    claim.release()
    # this run's own claim (a worker of the run died on the slide)
    bucket.put(key, json.dumps({"host": "elsewhere", "pid": 1, "run": "me", "started": "t"}).encode())
    claim = try_claim(out, "me")
    assert isinstance(claim, BucketClaim)
    claim.release()
    assert bucket.keys() == []


def test_of_two_runs_that_judge_a_claim_stale_only_one_takes_it(bucket):
    from mmap_deploy.location.objects import read_versioned, replace_if_unchanged

    loc = as_location(bucket.url("results/.A.h5ad.claim"))
    bucket.put("results/.A.h5ad.claim", b'{"host": "elsewhere", "pid": 1, "run": "x", "started": "t"}')
    stale = read_versioned(loc)
    first = replace_if_unchanged(loc, b'{"run": "a"}', stale.tag)
    second = replace_if_unchanged(loc, b'{"run": "b"}', stale.tag)
    assert first and second is None and bucket.get("results/.A.h5ad.claim") == b'{"run": "a"}'


def test_the_heartbeat_renews_a_bucket_claim_until_another_run_took_it(bucket, s3_server, monkeypatch):
    from mmap_deploy.location.objects import read_versioned, replace_if_unchanged

    proxy = _through(monkeypatch, s3_server, lambda m, p: False)  # passes everything on, and sees it
    try:
        out = as_location(bucket.url("results/A.h5ad"))
        claim = try_claim(out, "me", heartbeat_s=0.05)
        assert isinstance(claim, BucketClaim)
        path = f"/{bucket.name}/results/.A.h5ad.claim"

        def puts() -> int:
            with proxy.lock:
                return sum(1 for m, p in proxy.seen if m == "PUT" and p == path)

        deadline = time.monotonic() + 120  # only bounds a failure
        while puts() < 3 and time.monotonic() < deadline:  # the claim, then two renewals
            time.sleep(0.01)
        assert puts() >= 3
        # another run judged it stale and replaced it: the holder stops renewing, and leaves it in place
        now = read_versioned(claim_path(out))
        assert replace_if_unchanged(claim_path(out), b'{"run": "other"}', now.tag)
        deadline = time.monotonic() + 120
        while claim._thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.01)
        assert not claim._thread.is_alive()
        claim.release()
        assert bucket.get("results/.A.h5ad.claim") == b'{"run": "other"}'
    finally:
        proxy.__exit__()


def test_a_run_releases_only_its_own_claims_in_a_bucket(bucket):
    outs = [as_location(bucket.url(f"results/{n}.h5ad")) for n in "ABC"]
    mine = [try_claim(outs[0], "me"), try_claim(outs[1], "me")]
    theirs = try_claim(outs[2], "them")
    for c in mine:
        c._stop.set()  # as when the run's workers were stopped: nobody releases them one by one
    release_run_claims(outs, "me")
    assert bucket.keys() == ["results/.C.h5ad.claim"]
    theirs.release()


def test_output_folders_in_buckets_need_no_room_but_the_staging_folder_does(bucket, monkeypatch):
    import tempfile

    from mmap_deploy.outputs.adata import check_output_path
    from mmap_deploy.run.storage import check_free_space, free_bytes, make_output_dir

    make_output_dir(as_location(bucket.url("results/")))  # a prefix: nothing to create
    with pytest.raises(OutputStorageError, match=rf"^s3://{bucket.name}-gone/results/: the bucket '{bucket.name}-gone' "
                                                 r"does not exist \(or not at this endpoint\); check the bucket's name "
                                                 r"or create the bucket$"):
        make_output_dir(as_location(f"s3://{bucket.name}-gone/results/"))
    assert free_bytes(bucket.url("results/")) == free_bytes(tempfile.gettempdir())
    with pytest.raises(OutputStorageError, match=rf"^{tempfile.gettempdir()} \(staging for s3://{bucket.name}/results/\): "
                                                 r"no room for A\.h5ad: .* set TMPDIR to a larger disk$"):
        check_free_space(as_location(bucket.url("results/")), 1 << 60, "A.h5ad")
    bucket.put("results/A.h5ad", b"done")
    with pytest.raises(UserError, match=r"A\.h5ad: already exists; pass overwrite= to replace it"):
        check_output_path(bucket.url("results/A.h5ad"), overwrite=False)
    assert check_output_path(bucket.url("results/A.h5ad"), overwrite=True).url == bucket.url("results/A.h5ad")
    with pytest.raises(OutputStorageError, match="does not exist"):
        check_output_path(f"s3://{bucket.name}-gone/A.h5ad", overwrite=False)
    with pytest.raises(UserError, match=r"cannot write to an HTTPS URL"):
        check_output_path("https://host/A.h5ad", overwrite=False)
