"""`--manifest ... --ray`: a real local Ray (2 CPUs), the same outputs and contract as the local batch."""

from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from click.testing import CliRunner
from conftest import demo_output_bytes, leave_free
from conftest import run_cli as run

from mmap_deploy.cli import main
from mmap_deploy.run.claims import claim_path

MPP = 0.6
SAMPLE = Path(__file__).resolve().parents[1] / "mmap_deploy" / "demo" / "sample"


@pytest.fixture(scope="module")
def local_ray():
    """One private local Ray for the whole module (the runs below join it instead of starting their own)."""
    import ray
    from mmap_deploy.run.batch_ray import start_local_ray

    start_local_ray(num_cpus=2)
    yield ray
    ray.shutdown()


def write_slide(path: Path, seed: int) -> None:
    from PIL import Image

    rng = np.random.default_rng(seed)
    img = np.kron(rng.integers(60, 240, (30, 30, 3), dtype=np.uint8), np.ones((30, 30, 1), np.uint8))
    Image.fromarray(img).save(path)


@pytest.fixture()
def cohort(tmp_path):
    """Three slides; the middle one a damaged PNG (a bad slide among good ones)."""
    lines = ["slide,coords,mpp,id"]
    for i, name in enumerate(["a", "bad", "c"]):
        write_slide(tmp_path / f"{name}.png", seed=i)
        (tmp_path / f"{name}.csv").write_text("x,y\n" + "".join(f"{150 + 200 * c + 7 * i},{150 + 200 * r}\n"
                                                                for r in range(4) for c in range(4)))
        lines.append(f"{name}.png,{name}.csv,{MPP},{name}")
    (tmp_path / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n truncated")
    manifest = tmp_path / "slides.csv"
    manifest.write_text("\n".join(lines) + "\n")
    return manifest



def test_ray_batch_equals_the_local_batch_and_reruns_skip(local_ray, cohort, tmp_path):
    local = run("--manifest", cohort, "-o", tmp_path / "local", expect=1)
    r = run("--manifest", cohort, "-o", tmp_path / "ray", "--ray", "--ray-workers", "2", expect=1)
    assert "ray: 2 worker(s), 1 CPU core(s) each on 1 node(s)" in r.stderr
    for text in (local.stderr, r.stderr):
        assert "batch: 2 done, 0 skipped (already done), 1 failed of 3 slide(s)" in text
        assert f"failed: bad ({cohort} line 3): " in text and "Traceback" not in text
    assert sorted(p.name for p in (tmp_path / "ray").iterdir()) == ["a.h5ad", "c.h5ad"]  # no claims, no temp files
    for name in ("a", "c"):
        x_local = ad.read_h5ad(tmp_path / "local" / f"{name}.h5ad")
        x_ray = ad.read_h5ad(tmp_path / "ray" / f"{name}.h5ad")
        np.testing.assert_array_equal(x_ray.X, x_local.X)  # bit for bit
        np.testing.assert_array_equal(x_ray.obsm["mmap_embedding"], x_local.obsm["mmap_embedding"])
        assert list(x_ray.obs["mmap_cluster"]) == list(x_local.obs["mmap_cluster"])
        # the command line given to mmap-predict (by the driver), not the Ray worker's own
        assert x_local.uns["mmap"]["command"] == f"mmap-predict -q --manifest {cohort} -o {tmp_path / 'local'}"
        assert x_ray.uns["mmap"]["command"] == (f"mmap-predict -q --manifest {cohort} -o {tmp_path / 'ray'} "
                                                "--ray --ray-workers 2")
    stamps = {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ray").iterdir()}
    r = run("--manifest", cohort, "-o", tmp_path / "ray", "--ray", expect=1)
    assert "batch: 0 done, 2 skipped (already done), 1 failed of 3" in r.stderr
    assert {p.name: p.stat().st_mtime_ns for p in (tmp_path / "ray").iterdir()} == stamps


def test_rerun_after_an_interrupted_run_and_a_slide_held_by_another_run(local_ray, cohort, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    # what a killed run leaves: its claim (a pid that no longer runs) and a half-written temporary file
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    host = socket.gethostname()
    claim_path(out / "a.h5ad").write_text(f'{{"host": "{host}", "pid": {dead.pid}, "run": "old", "started": "x"}}')
    (out / ".a.h5ad.k1l2.tmp").write_bytes(b"half an h5ad")
    # a run that is alive and working on c
    alive = subprocess.Popen(["sleep", "60"])
    try:
        claim_path(out / "c.h5ad").write_text(f'{{"host": "{host}", "pid": {alive.pid}, "run": "other", '
                                              '"started": "2026-01-01T00:00:00Z"}')
        r = run("--manifest", cohort, "-o", out, "--ray", expect=1)
        assert "[1/3] a: wrote a.h5ad" in r.stderr
        assert f"[3/3] c: skipped, claimed by another run (host {host}, pid {alive.pid}" in r.stderr
        assert "batch: 1 done, 0 skipped (already done), 1 failed of 3 slide(s)" in r.stderr
        assert "1 left to another run that holds them (c)" in r.stderr
        assert sorted(p.name for p in out.iterdir()) == [".c.h5ad.claim", "a.h5ad"]
    finally:
        alive.kill()
        alive.wait()
    r = run("--manifest", cohort, "-o", out, "--ray", expect=1)  # the other run died: its claim is stale now
    assert "batch: 1 done, 1 skipped (already done), 1 failed of 3" in r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["a.h5ad", "c.h5ad"]


def _worker_pids(title: str) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if (d / "cmdline").read_bytes().startswith(title.encode()):
                    pids.append(int(d.name))
            except OSError:
                pass
    return pids


def _open_fifo_for_writing(fifo: Path) -> int:
    """The write end of `fifo`, once a reader has opened it (a worker, now blocked reading its coordinates)."""
    deadline = time.monotonic() + 300  # only bounds a failure: on success this returns as soon as the reader is there
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)  # ENXIO while no reader has it open
        except OSError as e:
            if e.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.02)


def _readers_of(path: Path) -> list[int]:
    """The processes (other than this one) that hold `path` open."""
    pids = []
    for fd_dir in Path("/proc").glob("[0-9]*/fd"):
        pid = int(fd_dir.parent.name)
        if pid == os.getpid():
            continue
        try:
            if any(os.readlink(fd) == str(path) for fd in fd_dir.iterdir()):
                pids.append(pid)
        except OSError:  # gone meanwhile, or not ours to look at
            pass
    return pids


def test_a_worker_killed_mid_slide_is_replaced_and_its_slide_retried(local_ray, tmp_path):
    """SIGKILL the worker while it is inside the first slide: a new worker redoes it.

    The first slide's coordinates are a FIFO, so the worker's run waits, inside the slide, until
    the test writes them: the test kills it there, whatever the machine's speed, after putting
    the real coordinates file in the FIFO's place for the new worker's retry.
    """
    image, coords = SAMPLE / "B4_crop.jpg", SAMPLE / "B4_crop_selection.tsv"
    fifo = tmp_path / "B4_crop_selection.tsv"
    os.mkfifo(fifo)
    manifest = tmp_path / "slides.csv"
    manifest.write_text(f"slide,coords,id\n{image},{fifo},first\n{image},{coords},second\n")
    result: dict = {}
    t = threading.Thread(target=lambda: result.update(r=CliRunner().invoke(
        main, ["-q", "--manifest", str(manifest), "-o", str(tmp_path / "out"), "--ray", "--ray-workers", "1"])))
    t.start()
    try:
        fd = _open_fifo_for_writing(fifo)  # a worker is reading the first slide's coordinates ...
        deadline = time.monotonic() + 60
        while not (readers := _readers_of(fifo)) and time.monotonic() < deadline:
            time.sleep(0.01)  # ... and holds the FIFO once its open() returns
        assert len(readers) == 1, readers
        killed = readers[0]
        assert _worker_pids("ray::SlideWorker.predict").count(killed) == 1
        shutil.copyfile(coords, tmp_path / "coords.tmp")
        os.replace(tmp_path / "coords.tmp", fifo)  # the retry reads a plain file
        os.kill(killed, signal.SIGKILL)
        os.close(fd)
    finally:
        t.join(timeout=600)
    r = result["r"]
    assert r.exit_code == 0, r.stderr
    assert f"pid {killed}) died" in r.stderr and "retrying it once on a new worker" in r.stderr
    assert "batch: 2 done, 0 skipped (already done), 0 failed of 2 slide(s)" in r.stderr
    first, second = (ad.read_h5ad(tmp_path / "out" / f"{name}.h5ad") for name in ("first", "second"))
    assert first.n_obs == 120
    np.testing.assert_array_equal(first.X, second.X)
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["first.h5ad", "second.h5ad"]


def test_ray_batch_stops_at_a_full_disk(local_ray, cohort, tmp_path, small_filesystem):
    write_slide(cohort.parent / "bad.png", seed=9)  # three good slides
    out = small_filesystem("8m")
    # room for one output's estimate (4.1 MB, the thumbnail counted uncompressed) and a little more: the first
    # slide's real output (about 0.2 MB, its thumbnail gzip-compressed) leaves less than the next one's estimate
    ballast = leave_free(out, demo_output_bytes(16, 900, 900) + (64 << 10))
    r = run("--manifest", cohort, "-o", out, "--ray", "--ray-workers", "1", expect=1)
    assert "[1/3] a: wrote a.h5ad" in r.stderr
    assert f"[2/3] bad: error: {out}: no room for bad.h5ad: it needs about 4.1 MB" in r.stderr
    assert "batch stopped at the first output-folder failure: 1 slide(s) not started" in r.stderr
    assert "[3/3]" not in r.stderr and "Traceback" not in r.stderr
    assert sorted(p.name for p in out.iterdir() if p != ballast) == ["a.h5ad"]


def test_the_local_ray_listens_on_localhost_only(local_ray):
    gcs = local_ray.get_runtime_context().gcs_address
    host, port = gcs.rsplit(":", 1)
    assert host == "127.0.0.1", gcs
    # the machine's own network address must not reach it
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        try:
            s.connect(("192.0.2.1", 9))  # no packet is sent: this only picks the outgoing interface
            own = s.getsockname()[0]
        except OSError:
            own = "127.0.0.1"
    if own.startswith("127."):
        pytest.skip("this machine has no network address besides loopback")
    with socket.socket() as s:
        s.settimeout(2)
        assert s.connect_ex((own, int(port))) != 0, f"Ray's GCS answers on {own}:{port}"


def test_without_the_extra_ray_is_one_line_naming_it(cohort, tmp_path):
    code = "import sys; sys.modules['ray'] = None; from mmap_deploy.cli import main; main()"
    r = subprocess.run([sys.executable, "-c", code, "--manifest", str(cohort), "-o", str(tmp_path / "o"), "--ray"],
                       capture_output=True, text=True, env=dict(os.environ))
    assert r.returncode == 2
    assert r.stderr.strip() == "error: --ray needs Ray, which is not installed here: pip install 'mmap-deploy[ray]'"
    assert not (tmp_path / "o").exists()


def test_a_worker_that_cannot_load_its_engines_is_one_line(local_ray, cohort, tmp_path):
    r = run("--manifest", cohort, "-o", tmp_path / "out", "--ray", "--backend", "tensorrt", expect=2)
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith(f"error: worker on {socket.gethostname()}: ") and "tensorrt" in last, r.stderr
    assert "Traceback" not in r.stderr and list((tmp_path / "out").iterdir()) == []
