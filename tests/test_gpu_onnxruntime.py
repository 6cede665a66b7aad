"""ONNX Runtime's CUDA execution provider: the runtime's GPU path (`pip install '.[gpu]'`).

The option and preloading checks run everywhere. Running models on CUDA needs
onnxruntime-gpu and an NVIDIA GPU: those tests skip with the reason where
either is missing.
"""

from __future__ import annotations

import contextlib
import io
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import onnxruntime as ort
import pytest
from conftest import random_views

from mmap_deploy.engines.onnxruntime import (
    CUDA_OPTIONS,
    OnnxRuntimeRunner,
    available_providers,
    preload_gpu_libraries,
    provider_options,
)
from mmap_deploy.errors import UserError, first_line
from mmap_deploy.model.bundle import load_bundle


def _cuda_reason() -> str:
    """Why CUDA tests cannot run here, or '' when they can."""
    if "CUDAExecutionProvider" not in available_providers():
        return f"needs onnxruntime-gpu (this onnxruntime {ort.__version__} offers {', '.join(available_providers())})"
    try:
        from mmap_deploy.engines.tensorrt import CudaDriver

        CudaDriver().release()
    except UserError as e:  # no NVIDIA driver, no device, or CUDA refuses it; a bug propagates
        return f"needs an NVIDIA GPU ({first_line(e)})"
    return ""


CUDA_REASON = _cuda_reason()
needs_cuda = pytest.mark.skipif(bool(CUDA_REASON), reason=CUDA_REASON)


def cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a, b = a.astype(np.float64), b.astype(np.float64)
    return (a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))


def test_gpu_providers_get_the_device_and_the_cuda_settings():
    opts = provider_options(["TensorrtExecutionProvider", "CUDAExecutionProvider", "CPUExecutionProvider"], device=1)
    assert opts[0] == {"device_id": "1"}
    assert opts[1] == {"device_id": "1", **CUDA_OPTIONS}
    assert opts[1]["arena_extend_strategy"] == "kSameAsRequested" and opts[2] == {}


def test_preloading_is_quiet_on_stdout():
    said = io.StringIO()
    with contextlib.redirect_stdout(said):
        preload_gpu_libraries()
        preload_gpu_libraries()  # once per process
    assert said.getvalue() == ""


def test_io_binding_gives_the_same_outputs(tiny_bundle):
    views = random_views(6, seed=8)
    with OnnxRuntimeRunner(tiny_bundle / "encoder.onnx", threads=1) as plain, \
            OnnxRuntimeRunner(tiny_bundle / "encoder.onnx", threads=1, io_binding=True) as bound:
        a, b = plain.infer({"views": views}), bound.infer({"views": views})
    for name in ("f", "y1"):
        np.testing.assert_array_equal(a[name], b[name])


# -- on a GPU with onnxruntime-gpu ------------------------------------------------------
@pytest.fixture(scope="module")
def fp16_bundle(tiny_bundle, tmp_path_factory) -> Path:
    from mmap_export.reduced import add_fp16

    root = tmp_path_factory.mktemp("gpu") / "bundle"
    shutil.copytree(tiny_bundle, root)
    add_fp16(root)
    return root


@needs_cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_cuda_runner_matches_the_cpu_at_every_batch_size(fp16_bundle, precision):
    b = load_bundle(fp16_bundle)
    path = b.path_of(b.select("encoder", precision))
    with OnnxRuntimeRunner(path, providers=["cuda"], precision=precision) as gpu, \
            OnnxRuntimeRunner(path, threads=1, precision=precision) as cpu:
        assert gpu.providers[0] == "CUDAExecutionProvider"  # not silently dropped to the CPU
        applied = gpu._session.get_provider_options()["CUDAExecutionProvider"]
        assert {k: applied[k] for k in CUDA_OPTIONS} == CUDA_OPTIONS
        for n in (1, 5, 33, 2):  # dynamic batch: new shapes after a larger one
            views = random_views(n, seed=n)
            got, ref = gpu.infer({"views": views}), cpu.infer({"views": views})
            assert got["f"].dtype == np.float32 and got["f"].shape == ref["f"].shape
            assert cosine_rows(got["f"], ref["f"]).min() >= 0.999
            assert cosine_rows(got["y1"], ref["y1"]).min() >= 0.999


@needs_cuda
def test_cuda_io_binding_gives_the_same_outputs(fp16_bundle):
    b = load_bundle(fp16_bundle)
    path = b.path_of(b.select("encoder", "fp16"))
    views = random_views(9, seed=1)
    with OnnxRuntimeRunner(path, providers=["cuda"], precision="fp16") as plain, \
            OnnxRuntimeRunner(path, providers=["cuda"], precision="fp16", io_binding=True) as bound:
        a, c = plain.infer({"views": views}), bound.infer({"views": views})
    np.testing.assert_allclose(a["f"], c["f"], rtol=1e-3, atol=1e-3)


@needs_cuda
def test_mmap_predict_runs_on_cuda(fp16_bundle, tmp_path):
    import anndata as ad
    from test_predict_cli import TIFF_MPP, TIFF_SIDE, tissue_like_image, write_coords, write_pyramidal_tiff

    pyramid = write_pyramidal_tiff(tmp_path / "slide.tif", tissue_like_image(TIFF_SIDE), TIFF_MPP)
    coords, ids, _ = write_coords(tmp_path / "c.csv", "xy")
    out = tmp_path / "o.h5ad"
    r = subprocess.run([sys.executable, "-m", "mmap_deploy.cli", str(pyramid), str(coords), "-o", str(out),
                        "--model", str(fp16_bundle), "--backend", "onnxruntime", "--precision", "fp16", "-q"],
                       capture_output=True, text=True, timeout=600, env=dict(os.environ))
    assert r.returncode == 0, r.stderr
    assert "engines: " in r.stderr and "CUDAExecutionProvider" in r.stderr
    a = ad.read_h5ad(out)
    assert a.n_obs == len(ids) and np.isfinite(a.X).all()
    assert a.uns["mmap"]["providers"].startswith("CUDAExecutionProvider")
