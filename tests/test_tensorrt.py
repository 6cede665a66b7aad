"""TensorRT: engine targets and their check, build profiles, and (where TensorRT and a GPU exist) engines.

The target check and the profile shapes are plain Python and run everywhere.
Building and running engines needs `tensorrt` and an NVIDIA GPU: those tests
skip with the reason where either is missing.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from conftest import random_views
from mmap_export.tensorrt_build import BatchProfile, input_profiles

from mmap_deploy.engines import tensorrt_importable
from mmap_deploy.engines.tensorrt import TARGET_FIELDS, check_engine_target
from mmap_deploy.errors import BundleError, EngineMismatchError, UserError
from mmap_deploy.model.bundle import load_bundle, sha256_file

HAS_TENSORRT, TRT_INFO = tensorrt_importable()
HERE = {"gpu": "NVIDIA H100 80GB HBM3", "compute_capability": "9.0", "tensorrt": "10.13.0.35"}


def _has_gpu() -> bool:
    try:
        from mmap_deploy.engines.tensorrt import CudaDriver

        CudaDriver()
        return True
    except UserError:  # no NVIDIA driver, no device, or CUDA refuses it: said in one line; a bug propagates
        return False


needs_tensorrt = pytest.mark.skipif(
    not (HAS_TENSORRT and _has_gpu()),
    reason=f"needs tensorrt and an NVIDIA GPU ({TRT_INFO if not HAS_TENSORRT else 'no CUDA device'})",
)


def test_matching_target_passes():
    check_engine_target("e.engine", dict(HERE, batch_profile="1,32,128"), HERE)


@pytest.mark.parametrize("field,value", [("gpu", "NVIDIA A100-SXM4-80GB"), ("compute_capability", "8.0"),
                                         ("tensorrt", "10.12.0.36")])
def test_engine_for_another_target_is_refused_with_both_values(field, value):
    recorded = dict(HERE, **{field: value})
    with pytest.raises(EngineMismatchError) as err:
        check_engine_target("enc.engine", recorded, HERE)
    msg = str(err.value)
    assert field in msg and repr(value) in msg and repr(HERE[field]) in msg
    assert "mmap-export --tensorrt" in msg and "backend='onnxruntime'" in msg and "\n" not in msg


def test_engine_without_a_recorded_target_is_refused():
    with pytest.raises(EngineMismatchError, match="does not record the engine's gpu, tensorrt"):
        check_engine_target("e.engine", {"compute_capability": "9.0"}, HERE)
    assert isinstance(EngineMismatchError("x"), BundleError)  # the CLI shows it as a one-line user error


def test_an_engine_in_a_subfolder_is_planned_with_its_recorded_target(tiny_bundle, tmp_path, monkeypatch):
    """The runner gets the engine's target from the checked manifest entry, wherever the engine lies."""
    import mmap_deploy.engines.select as select

    root = tmp_path / "b"
    shutil.copytree(tiny_bundle, root)
    (root / "engines").mkdir()
    (root / "engines" / "encoder.fp16.engine").write_bytes(b"not an engine")
    data = json.loads((root / "manifest.json").read_text())
    data["files"].append({"role": "encoder", "path": "engines/encoder.fp16.engine",
                          "sha256": sha256_file(root / "engines" / "encoder.fp16.engine"),
                          "precision": "fp16", "format": "tensorrt", "target": HERE, "parity": {}})
    (root / "manifest.json").write_text(json.dumps(data))
    # Planning only: loading the engine needs TensorRT and a GPU (the test below runs it where they exist).
    monkeypatch.setattr(select, "tensorrt_importable", lambda: (True, HERE["tensorrt"]))
    plan = select.select_backend("tensorrt", load_bundle(root), "fp16")
    assert plan.encoder.backend == "tensorrt" and plan.encoder.precision == "fp16"
    assert plan.encoder.path == root / "engines" / "encoder.fp16.engine"
    assert plan.encoder.model_file.target == HERE
    assert plan.fusion.backend == "onnxruntime" and plan.fusion.path.name == "fusion.onnx"


def test_batch_profile_parsing():
    assert BatchProfile.parse("1,16,64") == BatchProfile(1, 16, 64)
    for bad in ("1,2", "a,b,c", "0,1,2", "4,2,8"):
        with pytest.raises(UserError, match="--trt-batch"):
            BatchProfile.parse(bad)


def test_profiles_cover_batch_and_bank_length(tiny_bundle):
    m = load_bundle(tiny_bundle).manifest
    p = input_profiles(m, BatchProfile(2, 8, 32))
    s, v, d, g = m.view.input_size, m.view.n_views, m.embed_dim, len(m.genes)
    assert p["encoder"]["views"] == ((2, v, s, s, 3), (8, v, s, s, 3), (32, v, s, s, 3))
    lmax = m.prototypes.max_bank
    assert p["fusion"]["bank"] == ((2, 1, d), (8, lmax, d), (32, lmax, d))
    assert p["fusion"]["mask"] == ((2, 1), (8, lmax), (32, lmax))
    assert p["fusion"]["f"][2] == (32, d) and p["fusion"]["y1"][0] == (2, g)


@pytest.mark.skipif(HAS_TENSORRT, reason="tensorrt imports here")
def test_runner_without_tensorrt_is_a_user_error(tmp_path):
    from mmap_deploy.engines.tensorrt import TensorRTRunner

    with pytest.raises(UserError, match=r"TensorRT is not available here.*mmap-deploy\[tensorrt\]"):
        TensorRTRunner(tmp_path / "encoder.fp16.engine", target=HERE, precision="fp16")


def test_target_fields_are_what_the_manifest_records():
    assert TARGET_FIELDS == ("gpu", "compute_capability", "tensorrt")


# -- on a GPU with TensorRT ------------------------------------------------------
@pytest.fixture(scope="module")
def engine_bundle(tiny_bundle, tmp_path_factory) -> Path:
    from mmap_export.reduced import add_fp16
    from mmap_export.tensorrt_build import add_tensorrt

    root = tmp_path_factory.mktemp("trt") / "bundle"
    shutil.copytree(tiny_bundle, root)
    add_fp16(root)
    add_tensorrt(root, batch=BatchProfile(1, 4, 8), workspace_gib=1)
    return root


@needs_tensorrt
def test_engines_are_recorded_with_target_and_parity(engine_bundle):
    from mmap_deploy.engines.tensorrt import current_target

    b = load_bundle(engine_bundle)
    here = current_target()
    for role in ("encoder", "fusion"):
        mf = b.select(role, "fp16", "tensorrt")
        assert {k: mf.target[k] for k in TARGET_FIELDS} == here
        assert mf.parity["cosine_min"] >= 0.999
    assert (engine_bundle / "tensorrt.timing-cache").stat().st_size > 0


@needs_tensorrt
def test_runner_matches_onnxruntime_and_splits_large_batches(engine_bundle):
    from mmap_export.parity import cosine_rows

    from mmap_deploy.engines import OnnxRuntimeRunner
    from mmap_deploy.engines.tensorrt import TensorRTRunner

    b = load_bundle(engine_bundle)
    views = random_views(11, seed=4)  # > the profile's max batch of 8
    with TensorRTRunner.from_bundle(b, b.select("encoder", "fp16", "tensorrt")) as trt_runner, \
            OnnxRuntimeRunner(b.path_of(b.select("encoder"))) as ort_runner:
        got, ref = trt_runner.infer({"views": views}), ort_runner.infer({"views": views})
        assert trt_runner.name == "tensorrt" and trt_runner.precision == "fp16"
    assert got["f"].shape == ref["f"].shape and got["f"].dtype == np.float32
    assert cosine_rows(got["f"], ref["f"]).min() >= 0.999


@needs_tensorrt
def test_runner_refuses_an_engine_for_another_gpu(engine_bundle, tmp_path):
    from mmap_deploy.engines import open_engines
    from mmap_deploy.engines.tensorrt import TensorRTRunner

    root = tmp_path / "b"
    shutil.copytree(engine_bundle, root)
    data = json.loads((root / "manifest.json").read_text())
    for f in data["files"]:
        if f["format"] == "tensorrt":
            f["target"]["gpu"] = "Some Other GPU"
    (root / "manifest.json").write_text(json.dumps(data))
    b = load_bundle(root)
    with pytest.raises(EngineMismatchError, match="Some Other GPU"):
        TensorRTRunner.from_bundle(b, b.select("encoder", "fp16", "tensorrt"))
    with open_engines("auto", load_bundle(root), "fp16") as engines:  # falls back, and says why
        assert engines.encoder.name == "onnxruntime"
        assert "does not fit here" in engines.plan.reason


@needs_tensorrt
def test_engines_listed_in_a_subfolder_run(engine_bundle, tmp_path):
    from mmap_deploy.engines import open_engines

    root = tmp_path / "b"
    shutil.copytree(engine_bundle, root)
    (root / "engines").mkdir()
    data = json.loads((root / "manifest.json").read_text())
    for f in data["files"]:
        if f["format"] == "tensorrt":
            (root / f["path"]).rename(root / "engines" / f["path"])
            f["path"] = f"engines/{f['path']}"
    (root / "manifest.json").write_text(json.dumps(data))
    views = random_views(3, seed=2)
    with open_engines("tensorrt", load_bundle(root), "fp16") as engines:
        assert engines.encoder.name == "tensorrt" and engines.encoder.path.parent.name == "engines"
        out = engines.encoder.infer({"views": views})
    assert out["f"].shape[0] == 3 and np.isfinite(out["f"]).all()


def test_uint8_input_is_cast_first_without_changing_results(tiny_bundle, tmp_path):
    """TensorRT takes uint8 only as network I/O feeding a cast: the cast moves to the front."""
    import onnx
    import onnxruntime as ort
    from mmap_export.precision import convert_fp16
    from mmap_export.tensorrt_build import cast_uint8_inputs_first

    convert_fp16(tiny_bundle / "encoder.onnx", tmp_path / "encoder.fp16.onnx")
    views = random_views(3, seed=1)
    for path in (tiny_bundle / "encoder.onnx", tmp_path / "encoder.fp16.onnx"):
        model = onnx.load(str(path))
        assert cast_uint8_inputs_first(model) == 1
        consumers = [n for n in model.graph.node if "views" in n.input]
        assert [n.op_type for n in consumers] == ["Cast"]
        assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.UINT8  # still uint8 in
        before = ort.InferenceSession(str(path)).run(None, {"views": views})
        after = ort.InferenceSession(model.SerializeToString()).run(None, {"views": views})
        assert all(np.array_equal(a, b) for a, b in zip(before, after))
    fusion = onnx.load(str(tiny_bundle / "fusion.onnx"))
    assert cast_uint8_inputs_first(fusion) == 0  # no uint8 inputs: untouched
