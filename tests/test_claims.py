"""Slide claims on the output folder: one holder at a time, stale claims taken over, heartbeats."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time

from mmap_deploy.run.claims import ClaimHolder, SlideClaim, claim_path, release_run_claims, try_claim


def test_one_holder_at_a_time_and_release(tmp_path):
    out = tmp_path / "s.h5ad"
    first = try_claim(out, "run-a")
    assert isinstance(first, SlideClaim) and claim_path(out).name == ".s.h5ad.claim"
    info = json.loads(claim_path(out).read_text())
    assert info["host"] == socket.gethostname() and info["pid"] == os.getpid() and info["run"] == "run-a"
    # another run on this host while this process lives: refused, and told who holds it
    second = try_claim(out, "run-b")
    assert isinstance(second, ClaimHolder) and second.pid == os.getpid() and second.run == "run-a"
    first.release()
    assert not claim_path(out).exists()
    assert isinstance(try_claim(out, "run-b"), SlideClaim)


def test_stale_claims_are_taken_over(tmp_path):
    out = tmp_path / "s.h5ad"
    path = claim_path(out)
    # a dead process on this host
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead.pid, "run": "x", "started": "t"}))
    assert isinstance(try_claim(out, "me"), SlideClaim)
    # another host that stopped its heartbeat 11 minutes ago; the same claim 1 minute old is respected
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "run": "x", "started": "t"}))
    old = time.time() - 60
    os.utime(path, (old, old))
    assert isinstance(try_claim(out, "me"), ClaimHolder)
    old = time.time() - 660
    os.utime(path, (old, old))
    assert isinstance(try_claim(out, "me"), SlideClaim)
    assert json.loads(path.read_text())["run"] == "me"
    # this run's own claim (a worker of the run died on the slide)
    path.write_text(json.dumps({"host": "elsewhere", "pid": 1, "run": "me", "started": "t"}))
    assert isinstance(try_claim(out, "me"), SlideClaim)
    assert not list(tmp_path.glob("*.stale"))


def test_heartbeat_keeps_a_claim_fresh_and_run_claims_are_released(tmp_path):
    out = tmp_path / "s.h5ad"
    claim = try_claim(out, "me", heartbeat_s=0.05)
    old = time.time() - 3600
    os.utime(claim.path, (old, old))
    # the heartbeat (every 0.05 s) touches the claim again: wait for it, not for a guessed time
    deadline = time.monotonic() + 120  # only bounds a failure
    while time.time() - claim.path.stat().st_mtime > 5 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert time.time() - claim.path.stat().st_mtime < 5
    release_run_claims([out], "someone-else")
    assert claim.path.exists()
    release_run_claims([out], "me")
    assert not claim.path.exists()
    claim.release()
