"""The benchmark harness at tiny sizes: every row kind is produced, well formed, and summarised.

Speed itself is never asserted here (that is what the benchmark JSON is for).
"""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from conftest import REPO

RUN = REPO / "benchmarks" / "run.py"


@pytest.fixture(scope="module")
def smoke(tiny_checkpoint, tiny_bundle, tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("bench") / "smoke.json"
    r = subprocess.run([sys.executable, str(RUN), "--suite", "smoke", "--json", str(out),
                        "--tiny-checkpoint", str(tiny_checkpoint), "--tiny-bundle", str(tiny_bundle)],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    data = json.loads(out.read_text())
    data["_md"] = out.with_suffix(".md").read_text()
    return data


def rows(data: dict, name: str) -> list[dict]:
    return [r for r in data["results"] if r["name"] == name]


def test_no_step_failed(smoke):
    assert rows(smoke, "error") == [], [r["error"] for r in rows(smoke, "error")]


def test_machine_is_described(smoke):
    m = smoke["machine"]
    assert m["suite"] == "smoke" and m["cores"] >= 1 and m["memory_gib"] > 0
    assert "CPUExecutionProvider" in m["onnxruntime_providers"] and m["cpu"]
    assert isinstance(m["tensorrt"], str) and m["elapsed_s"] > 0


def test_encoder_rows_compare_torch_and_onnxruntime(smoke):
    enc = rows(smoke, "encoder")
    combos = {(r["backend"], r["precision"]) for r in enc}
    assert {("torch", "fp32"), ("onnxruntime", "fp32"), ("onnxruntime", "int8")} <= combos
    for r in enc:
        assert r["model"].startswith("tiny") and r["batch"] == 4 and r["spots_per_s"] > 0
        assert r["best_spots_per_s"] >= r["spots_per_s"]


def test_kmeans_rows_use_the_same_data(smoke):
    km = {(r["impl"], r["threads"]): r for r in rows(smoke, "kmeans")}
    assert set(km) == {("numpy", "default"), ("sklearn", "default"), ("numpy", 1), ("sklearn", 1)}
    for r in km.values():
        assert (r["n"], r["dim"], r["k"], r["n_init"]) == (400, 32, 8, 1)
        assert r["seconds"] > 0 and r["inertia"] > 0
    targets = {t["target"]: t for t in smoke["targets"]}
    assert "k-means inertia within 1% of scikit-learn (threads: 1)" in targets
    # same data, same seed: the inertia does not depend on the thread count
    assert km[("numpy", 1)]["inertia"] == pytest.approx(km[("numpy", "default")]["inertia"], rel=1e-5)


def test_slide_rows(smoke):
    """On the demo sample, which ships with the package: its absence is a broken install, not a skip."""
    tiles = rows(smoke, "tile_read")
    assert {(r["reader"], r["threads"]) for r in tiles} == {("image", 1), ("image", 2), ("openslide", 1),
                                                           ("openslide", 2)}
    assert all(r["patches_per_s"] > 0 for r in tiles)
    over = rows(smoke, "pipeline_overhead")
    assert {r["coords"] for r in over} == {"her2st spots", "grid 60"}
    for r in over:
        assert r["ms_per_spot"] > 0 and r["wall_s"] > r["engines_s"] > 0
        assert {"encoder", "fusion", "kmeans"} <= set(r["breakdown_s"])
    assert any(r["coords"] == "grid 60" and r["spots"] == 60 for r in over)
    rss = rows(smoke, "rss")
    assert [r["spots"] for r in rss] == [30, 60] and all(r["peak_rss_mib"] > 50 for r in rss)


def test_markdown_summary_has_the_tables(smoke):
    md = smoke["_md"]
    for heading in ("## Encoder", "## k-means", "## Tile reading", "## mmap-predict outside the engines",
                    "## Peak RSS", "## Targets"):
        assert heading in md
    assert "| tiny-vit-patch16-112 | cpu | onnxruntime |" in md


@pytest.mark.slow
def test_gpu_ort_suite_steps_run_on_the_cpu(tmp_path, real_data):
    """`--suite gpu-ort-check`: the GPU suite's own steps (export, engine-only rows, mmap-predict end to end
    on a pyramidal TIFF, the reader-thread sweep) on the CPU provider, so no GPU time is lost to its bugs."""
    out = tmp_path / "gpu_ort.json"
    r = subprocess.run([sys.executable, str(RUN), "--suite", "gpu-ort-check", "--json", str(out),
                        "--data-dir", str(real_data)], capture_output=True, text=True, timeout=900)
    assert r.returncode == 0, r.stderr[-2000:]
    rows = json.loads(out.read_text())["results"]
    assert not [x for x in rows if x["name"] == "error"], rows
    names = [x["name"] for x in rows]
    assert names.count("predict") == 2 and all(x["command"] == "mmap-predict" for x in rows if x["name"] == "predict")
    assert {(x["precision"], x["io_binding"]) for x in rows if x["name"] == "encoder" and x["backend"] == "onnxruntime"} \
        == {("fp32", False), ("fp32", True), ("fp16", False), ("fp16", True)}
    waits = [x for x in rows if x["name"] == "reader_wait"]
    assert [x["reader_threads"] for x in waits] == [1, 2] and all(0 <= x["wait_share"] <= 1 for x in waits)
    assert sum(x["name"] == "target" for x in rows) == 2
