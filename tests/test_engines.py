"""The runner interface (input checks, chunking) and backend selection, on real ONNX Runtime sessions of the tiny bundle."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import TINY_GENES, random_views

from mmap_deploy.engines import (
    OnnxRuntimeRunner,
    available_providers,
    open_engines,
    resolve_providers,
    select_backend,
    tensorrt_importable,
)
from mmap_deploy.errors import BundleError, UserError
from mmap_deploy.model.bundle import load_bundle, sha256_file
from mmap_deploy.options import CLI, caller

HAS_GPU_EP = "CUDAExecutionProvider" in ort.get_available_providers()
HAS_TENSORRT = tensorrt_importable()[0]


def _copy(tiny_bundle: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "bundle"
    shutil.copytree(tiny_bundle, dst)
    return dst


def _add_file(bundle_dir: Path, entry: dict) -> None:
    """List one more model file in the manifest (its sha256 computed from the file)."""
    mpath = bundle_dir / "manifest.json"
    data = json.loads(mpath.read_text())
    entry = dict({"target": {}, "parity": {}}, **entry)
    entry["sha256"] = sha256_file(bundle_dir / entry["path"])
    data["files"].append(entry)
    mpath.write_text(json.dumps(data, indent=2))


def test_encoder_runner_runs_a_batch(tiny_bundle):
    views = random_views(3)
    with OnnxRuntimeRunner(tiny_bundle / "encoder.onnx", threads=1) as r:
        assert r.name == "onnxruntime"
        assert r.providers == ["CPUExecutionProvider"]
        assert r.precision == "fp32"
        assert r.input_names == ["views"]
        assert r.output_names == ["f", "y1"]
        out = r.infer({"views": views})
        again = r.infer({"views": views})
    assert set(out) == {"f", "y1"}
    assert out["f"].dtype == np.float32 and out["f"].shape[0] == 3
    assert out["y1"].shape == (3, len(TINY_GENES))
    assert np.isfinite(out["f"]).all() and np.isfinite(out["y1"]).all()
    assert out["f"].std() > 0
    # deterministic: the same batch twice gives the same bits
    np.testing.assert_array_equal(out["f"], again["f"])
    np.testing.assert_array_equal(out["y1"], again["y1"])


def test_runner_rows_do_not_depend_on_the_batch(tiny_bundle):
    """One spot alone and inside a batch of five gives the same prediction (to float tolerance)."""
    views = random_views(5, seed=3)
    with OnnxRuntimeRunner(tiny_bundle / "encoder.onnx", threads=1) as r:
        whole = r.infer({"views": views})
        single = r.infer({"views": views[2:3]})
    np.testing.assert_allclose(single["y1"][0], whole["y1"][2], rtol=1e-5, atol=1e-6)


def test_demo_encoder_rows_are_bit_identical_over_threads_and_batches():
    """Two encoder calls in flight run on one thread each instead of one call on two
    (engines.select.cpu_encoder_streams): the demo encoder gives the same bits either way,
    and in any batch."""
    from mmap_deploy.model.bundle import default_bundle_path

    views = random_views(32, seed=5)
    path = default_bundle_path() / "encoder.onnx"
    with OnnxRuntimeRunner(path, threads=2) as two, OnnxRuntimeRunner(path, threads=1, streams=2) as halves:
        assert halves.streams == 2
        ref = two.infer({"views": views})
        for step in (1, 5, 32):
            parts = [halves.infer({"views": views[i : i + step]}) for i in range(0, 32, step)]
            for name in ("f", "y1"):
                np.testing.assert_array_equal(np.concatenate([p[name] for p in parts]), ref[name])


def test_runner_reports_missing_inputs(tiny_bundle):
    with OnnxRuntimeRunner(tiny_bundle / "fusion.onnx") as r:
        with pytest.raises(ValueError, match="missing inputs"):
            r.infer({"f": np.zeros((1, 4), np.float32)})


@pytest.mark.parametrize("feeds, message", [
    ({"views": random_views(2).astype(np.float32)}, r"input 'views' is float32; the model takes uint8"),
    ({"views": random_views(2)[:, :2]}, r"input 'views' has shape \(2, 2, .*the model takes \(N, 3, "),
    ({"views": random_views(2)[0]}, r"input 'views' has shape .*the model takes \(N, "),
    ({"views": random_views(2), "mask": np.ones((2, 1), bool)}, r"unknown inputs \['mask'\]"),
])
def test_runner_checks_feeds_against_the_model(tiny_bundle, feeds, message):
    with OnnxRuntimeRunner(tiny_bundle / "encoder.onnx", threads=1) as r:
        assert [s.name for s in r.inputs] == ["views"] and r.inputs[0].dtype == np.uint8
        with pytest.raises(ValueError, match=message):
            r.infer(feeds)


def test_runner_needs_one_row_per_spot_in_every_input(tiny_bundle):
    with OnnxRuntimeRunner(tiny_bundle / "fusion.onnx", threads=1) as r:
        feeds = {"f": np.zeros((3, 96), np.float32), "bank": np.zeros((3, 2, 96), np.float32),
                 "mask": np.ones((3, 2), bool), "y1": np.zeros((2, len(TINY_GENES)), np.float32)}
        with pytest.raises(ValueError, match=r"input 'y1' has 2 rows but 'f' has 3"):
            r.infer(feeds)


def test_runner_chunks_a_batch_and_keeps_the_spot_order(tiny_bundle):
    views = random_views(11, seed=5)
    with OnnxRuntimeRunner(tiny_bundle / "encoder.onnx", threads=1) as r:
        whole = r.infer({"views": views})
        chunked = r.infer({"views": views}, batch_size=4)  # 4 + 4 + 3 spots
        parts = [r.infer({"views": views[s:s + 4]}) for s in (0, 4, 8)]
    for name in ("f", "y1"):
        assert chunked[name].shape == whole[name].shape
        np.testing.assert_array_equal(chunked[name], np.concatenate([p[name] for p in parts]))
        np.testing.assert_allclose(chunked[name], whole[name], rtol=1e-5, atol=1e-6)


def test_runner_after_close_is_an_error(tiny_bundle):
    r = OnnxRuntimeRunner(tiny_bundle / "encoder.onnx")
    r.close()
    with pytest.raises(RuntimeError, match="closed"):
        r.infer({"views": random_views(1)})


def test_negative_threads_is_a_user_error(tiny_bundle):
    with pytest.raises(UserError, match="^threads=-1: must be 0"):
        OnnxRuntimeRunner(tiny_bundle / "encoder.onnx", threads=-1)


def test_unloadable_model_file_is_a_bundle_error(tmp_path):
    bad = tmp_path / "encoder.onnx"
    bad.write_bytes(b"not an onnx model")
    with pytest.raises(BundleError, match="ONNX Runtime cannot load this model.*re-export"):
        OnnxRuntimeRunner(bad)


def test_model_load_error_without_a_message_is_still_one_line(tiny_bundle, monkeypatch):
    """ONNX Runtime failing with an empty message: the report names its type (it used to raise IndexError)."""
    class Fail(Exception):
        pass

    def refuse(*args, **kwargs):
        raise Fail()

    monkeypatch.setattr(ort, "InferenceSession", refuse)
    with pytest.raises(BundleError, match=r"encoder\.onnx: ONNX Runtime cannot load this model \(Fail\); re-export"):
        OnnxRuntimeRunner(tiny_bundle / "encoder.onnx")


def test_providers_match_short_and_full_names():
    assert resolve_providers(None) == ["CPUExecutionProvider"]
    assert resolve_providers(["cpu"]) == ["CPUExecutionProvider"]
    assert resolve_providers(["cpuexecutionprovider"]) == ["CPUExecutionProvider"]


def test_unknown_provider_lists_what_is_available():
    with pytest.raises(UserError) as e:
        resolve_providers(["FancyExecutionProvider"])
    msg = str(e.value)
    assert "'FancyExecutionProvider' is not available" in msg
    for p in available_providers():
        assert p in msg


@pytest.mark.skipif(HAS_GPU_EP, reason="onnxruntime-gpu is installed: CUDA is available here")
def test_missing_cuda_provider_says_how_to_get_it(tiny_bundle):
    with pytest.raises(UserError, match=r"'cuda' is not available here \(available: .*CPUExecutionProvider.*onnxruntime-gpu"):
        OnnxRuntimeRunner(tiny_bundle / "encoder.onnx", providers=["cuda"])


@pytest.mark.skipif(HAS_GPU_EP or HAS_TENSORRT, reason="a GPU backend is installed here")
def test_auto_on_a_cpu_machine_picks_onnxruntime_cpu_and_says_why(tiny_bundle):
    plan = select_backend("auto", load_bundle(tiny_bundle))
    assert plan.backend == "onnxruntime"
    assert plan.encoder.path.name == "encoder.onnx" and plan.fusion.path.name == "fusion.onnx"
    assert plan.encoder.providers == ["CPUExecutionProvider"]
    assert plan.reason.startswith("picked ONNX Runtime on the CPU")
    assert "no fp32 TensorRT engine in the bundle" in plan.reason


def test_explicit_onnxruntime_backend(tiny_bundle):
    plan = select_backend("onnxruntime", load_bundle(tiny_bundle), providers=["cpu"])
    assert plan.backend == "onnxruntime"
    assert plan.reason == "ONNX Runtime with CPUExecutionProvider"


def test_unknown_backend_and_precision_are_user_errors(tiny_bundle):
    b = load_bundle(tiny_bundle)
    with pytest.raises(UserError, match="^backend='openvino': must be one of auto, onnxruntime, tensorrt$"):
        select_backend("openvino", b)
    with pytest.raises(UserError, match="^--precision bf16: must be one of"), caller(CLI):
        select_backend("auto", b, "bf16")


def test_missing_precision_names_what_the_bundle_has(tiny_bundle):
    with pytest.raises(BundleError, match=r"no fp16 onnx encoder in this bundle \(it has encoder:fp32:onnx.*mmap-export --fp16"):
        select_backend("auto", load_bundle(tiny_bundle), "fp16")


def test_fusion_falls_back_to_fp32_when_only_the_encoder_has_the_precision(tiny_bundle, tmp_path):
    root = _copy(tiny_bundle, tmp_path)
    shutil.copy(root / "encoder.onnx", root / "encoder.fp16.onnx")
    _add_file(root, {"role": "encoder", "path": "encoder.fp16.onnx", "precision": "fp16", "format": "onnx"})
    plan = select_backend("onnxruntime", load_bundle(root), "fp16")
    assert (plan.encoder.path.name, plan.encoder.precision) == ("encoder.fp16.onnx", "fp16")
    assert (plan.fusion.path.name, plan.fusion.precision) == ("fusion.onnx", "fp32")
    with plan.open() as engines:
        assert engines.encoder.precision == "fp16"
        assert engines.describe()["fusion_precision"] == "fp32"


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt imports here")
def test_tensorrt_engine_without_tensorrt(tiny_bundle, tmp_path):
    """A bundle with a TensorRT engine on a machine without TensorRT: auto falls back, explicit fails."""
    root = _copy(tiny_bundle, tmp_path)
    (root / "encoder.fp16.engine").write_bytes(b"serialised engine")
    _add_file(root, {"role": "encoder", "path": "encoder.fp16.engine", "precision": "fp16", "format": "tensorrt",
                     "target": {"gpu": "NVIDIA H100", "compute_capability": "9.0", "tensorrt_version": "10.12.0"}})
    b = load_bundle(root)
    with pytest.raises(UserError, match=r"--backend tensorrt: tensorrt does not import .*pip install 'mmap-deploy\[tensorrt\]'"), \
            caller(CLI):
        select_backend("tensorrt", b, "fp16")
    # auto: no fp16 ONNX encoder either, so the error names what the bundle has
    with pytest.raises(BundleError, match="no fp16 onnx encoder"):
        select_backend("auto", b, "fp16")
    shutil.copy(root / "encoder.onnx", root / "encoder.fp16.onnx")
    _add_file(root, {"role": "encoder", "path": "encoder.fp16.onnx", "precision": "fp16", "format": "onnx"})
    plan = select_backend("auto", load_bundle(root), "fp16")
    assert plan.backend == "onnxruntime"
    assert "tensorrt does not import" in plan.reason


def test_tensorrt_backend_without_an_engine_says_how_to_build_one(tiny_bundle):
    with pytest.raises(UserError, match="mmap-export --tensorrt|tensorrt does not import"):
        select_backend("tensorrt", load_bundle(tiny_bundle))


def test_a_run_hashes_only_the_files_it_opens(tiny_bundle, tmp_path):
    """A bundle with fp16 files besides fp32: an fp32 run hashes encoder.onnx and fusion.onnx, once each."""
    root = _copy(tiny_bundle, tmp_path)
    for role in ("encoder", "fusion"):
        shutil.copy(root / f"{role}.onnx", root / f"{role}.fp16.onnx")
        _add_file(root, {"role": role, "path": f"{role}.fp16.onnx", "precision": "fp16", "format": "onnx"})
    b = load_bundle(root)
    assert b.hashed == []
    with open_engines("onnxruntime", b, "fp32", threads=1):
        pass
    with open_engines("onnxruntime", b, "fp32", threads=1):  # a second batch slide with the same bundle
        pass
    assert b.hashed == ["encoder.onnx", "fusion.onnx"]


def test_open_engines_runs_encoder_then_fusion(tiny_bundle):
    b = load_bundle(tiny_bundle)
    with open_engines("auto", b, threads=1) as engines:
        d = engines.describe()
        enc = engines.encoder.infer({"views": random_views(4)})
        bank = np.repeat(enc["f"][:1][None], 4, axis=0)  # (4, 1, D): every spot's bank is spot 0's f
        out = engines.fusion.infer({"f": enc["f"], "bank": bank, "mask": np.ones((4, 1), bool), "y1": enc["y1"]})
    assert out["prediction"].shape == (4, len(TINY_GENES))
    assert np.isfinite(out["prediction"]).all()
    assert all(isinstance(v, str) and v for v in d.values())  # anndata cannot store None
    assert d["encoder_file"] == "encoder.onnx" and d["fusion_file"] == "fusion.onnx"
    if not (HAS_GPU_EP or HAS_TENSORRT):
        assert d["encoder_providers"] == "CPUExecutionProvider"
