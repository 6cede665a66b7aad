"""The wheel carrier of the GPU suite (benchmarks/gpu/gpu_wheels.py): pack, stage part by part, unpack.

A real wheel-shaped zip is built here (the real onnxruntime-gpu wheel is 255 MB);
the packing, the sha256 checks and the unpacked files are exercised for real.
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu" / "gpu_wheels.py"
spec = importlib.util.spec_from_file_location("gpu_wheels", SCRIPT)
gpu_wheels = importlib.util.module_from_spec(spec)
spec.loader.exec_module(gpu_wheels)

TRT = "onnxruntime/capi/libonnxruntime_providers_tensorrt.so"


@pytest.fixture
def wheel(tmp_path: Path) -> Path:
    import numpy as np

    rng = np.random.default_rng(0)
    files = {
        "onnxruntime/__init__.py": b"__version__ = '0.0.test'\n",
        "onnxruntime/capi/libonnxruntime_providers_cuda.so": rng.integers(0, 256, 300_000, dtype=np.uint8).tobytes(),
        TRT: b"\x7fELF" + bytes(5000),
        "onnxruntime/capi/libonnxruntime_providers_shared.so": b"\x7fELF shared" * 100,
    }
    record = "".join(f"{name},sha256=x,{len(data)}\n" for name, data in files.items())
    files["onnxruntime_gpu-0.0.test.dist-info/RECORD"] = (record + "onnxruntime_gpu-0.0.test.dist-info/RECORD,,\n").encode()
    files["onnxruntime_gpu-0.0.test.dist-info/METADATA"] = b"Name: onnxruntime-gpu\nVersion: 0.0.test\n"
    path = tmp_path / "onnxruntime_gpu-0.0.test-cp312-cp312-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, data in files.items():
            zf.writestr(name, data)
    return path


def test_pack_stage_unpack_round_trip(wheel: Path, tmp_path: Path):
    out = tmp_path / "parts"
    rec = gpu_wheels.pack(wheel, out, part_mib=0.1)
    assert rec["dropped"] == [TRT]
    assert len(rec["parts"]) >= 3  # ~300 kB of incompressible data in 100 KiB parts
    for p in rec["parts"]:
        assert (out / p["folder"] / p["name"]).stat().st_size <= 0.1 * (1 << 20)
    staging = tmp_path / "staging"
    for k, p in enumerate(rec["parts"], start=1):
        missing = gpu_wheels.stage(out / p["folder"], staging)
        assert missing == [q["folder"] for q in rec["parts"][k:]]
    site = tmp_path / "site"
    gpu_wheels.unpack(staging, site)
    with zipfile.ZipFile(wheel) as zf:
        for name in zf.namelist():
            got = site / name
            if name == TRT:
                assert not got.exists()
            elif name.endswith("RECORD"):
                assert TRT not in got.read_text()
            else:
                assert got.read_bytes() == zf.read(name), name


def test_pack_is_deterministic(wheel: Path, tmp_path: Path):
    a = gpu_wheels.pack(wheel, tmp_path / "a", part_mib=0.1)
    b = gpu_wheels.pack(wheel, tmp_path / "b", part_mib=0.1)
    assert a["stream_sha256"] == b["stream_sha256"]


def test_missing_and_damaged_parts_are_refused(wheel: Path, tmp_path: Path):
    out = tmp_path / "parts"
    rec = gpu_wheels.pack(wheel, out, part_mib=0.1)
    staging = tmp_path / "staging"
    gpu_wheels.stage(out / "p1", staging)
    with pytest.raises(gpu_wheels.PartsError, match=r"part\(s\) p2, p3.* not staged yet"):
        gpu_wheels.unpack(staging, tmp_path / "site")
    damaged = out / "p2" / rec["parts"][1]["name"]
    damaged.write_bytes(b"x" + damaged.read_bytes()[1:])
    with pytest.raises(gpu_wheels.PartsError, match="damaged in transit"):
        gpu_wheels.stage(out / "p2", staging)
    other = gpu_wheels.pack(wheel, tmp_path / "other", part_mib=0.2, drop=())
    with pytest.raises(gpu_wheels.PartsError, match="another packing"):
        gpu_wheels.stage(tmp_path / "other" / "p1", staging)
    assert other["dropped"] == []


def test_cli_says_one_line_and_exits_2(tmp_path: Path):
    r = subprocess.run([sys.executable, str(SCRIPT), "unpack", str(tmp_path), "--target", str(tmp_path / "s")],
                       capture_output=True, text=True)
    assert r.returncode == 2
    assert r.stderr.strip().count("\n") == 0 and "parts.json: missing" in r.stderr
