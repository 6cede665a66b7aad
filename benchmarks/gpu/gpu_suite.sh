#!/usr/bin/env bash
# The GPU benchmark suite in one call, for a machine with an NVIDIA GPU and PyTorch:
#   OUT=/some/dir bash benchmarks/gpu/gpu_suite.sh
# Runs from a checkout without installing it (the three packages are linked onto
# PYTHONPATH under their import names), probes the machine, then runs
# `benchmarks/run.py --suite gpu`. Every step is guarded: what ran is kept.
# Writes under $OUT: probe.txt, gpu.json, gpu.md, gpu.log.
set -u
OUT=${OUT:-benchmarks/results/gpu-local}
PY=${PYTHON:-python3}
mkdir -p "$OUT"
source "$(dirname "$0")/checkout_packages.sh"
{
  echo "## nvidia-smi"; nvidia-smi 2>&1 | head -20
  echo "## python"; $PY --version 2>&1
  echo "## packages"; $PY -m pip list 2>/dev/null | grep -i -E "^(torch|onnx|tensorrt|timm|peft|numpy|nvidia-cu|cuda)" 
  echo "## TensorRT / CUDA libraries"; ldconfig -p 2>/dev/null | grep -i -E "nvinfer|libcudart|libcuda\.so" | head
  echo "## tensorrt import"; $PY -c "import tensorrt; print(tensorrt.__version__)" 2>&1 | tail -1
} > "$OUT/probe.txt" 2>&1
timeout "${GPU_SUITE_TIMEOUT:-470}" $PY benchmarks/run.py --suite gpu --json "$OUT/gpu.json" 2> "$OUT/gpu.log"
echo "run.py exit $?" >> "$OUT/gpu.log"
tail -5 "$OUT/gpu.log"
cat "$OUT/gpu.md" 2>/dev/null
