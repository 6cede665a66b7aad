#!/usr/bin/env bash
# The deployed GPU path, measured: mmap-predict on ONNX Runtime's CUDA provider.
#
# For a GPU host that has PyTorch and CUDA 13 libraries as Python packages but
# only the CPU onnxruntime, no package index, and at most 64 MiB per transfer.
# PyPI's onnxruntime-gpu (CUDA 13 build, ~255 MB) goes there in parts:
#
#   # 1. here, once (with the package index):
#   (.gpuwheel/ and .gpudata/ are in .gitignore: the device tool carries ignored paths)
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#       --platform manylinux_2_28_x86_64 -d /tmp/w onnxruntime-gpu==1.31.1
#   python benchmarks/gpu/gpu_wheels.py pack /tmp/w/onnxruntime_gpu-*.whl -o .gpuwheel --part-mib 44
#   mkdir -p .gpudata && cp "$MMAP_DATA_DIR"/her2st/images/C6.jpg .gpudata/
#   # and the runtime's own packages the host lacks: see benchmarks/gpu/gpu_runtime_wheels.txt (-> .whl/)
#   #    (44 MiB parts leave room for the ~13 MB checkout and the slide in each 64 MiB transfer;
#   #     the slimmed, xz-compressed wheel is about 200 MB: 5 parts)
#
#   # 2. there, one call per part but the last, back to back (the host keeps /tmp while warm):
#   python3 benchmarks/gpu/gpu_wheels.py stage .gpuwheel/p1 --into /tmp/mmap-wheel     # carry .gpuwheel/p1
#   ...                                                                             # p2 .. p(n-1)
#   # 3. there, the last part and the suite in one call (carry .gpuwheel/pN, .gpudata and .whl):
#   OUT=/some/dir bash benchmarks/gpu/gpu_ort_suite.sh .gpuwheel/pN
#
# Step 3 stages the last part, checks the sha256 of every part, unpacks the
# wheel into /tmp/mmap-ort-site (ahead of the host's CPU onnxruntime on
# PYTHONPATH), preloads the CUDA/cuDNN libraries that ship as Python packages,
# probes the providers, then runs `benchmarks/run.py --suite gpu-ort`.
# Writes under $OUT: probe.txt, gpu_ort.json, gpu_ort.md, gpu_ort.log.
set -u
OUT=${OUT:-benchmarks/results/gpu-ort-local}
PY=${PYTHON:-python3}
PARTS=${MMAP_WHEEL_PARTS:-/tmp/mmap-wheel}
SITE=${MMAP_ORT_SITE:-/tmp/mmap-ort-site}
mkdir -p "$OUT"
here=$(dirname "$0")
if [ $# -ge 1 ]; then
  $PY "$here/gpu_wheels.py" stage "$1" --into "$PARTS" || exit 2
fi
if [ ! -d "$SITE/onnxruntime" ]; then
  $PY "$here/gpu_wheels.py" unpack "$PARTS" --target "$SITE" || exit 2
fi
if ls .whl/*.whl >/dev/null 2>&1; then
  $PY -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE" .whl/*.whl || exit 2
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
source "$here/checkout_packages.sh"
{
  echo "## nvidia-smi"; nvidia-smi 2>&1 | head -15
  echo "## python"; $PY --version 2>&1
  echo "## onnxruntime"
  $PY - <<'EOF' 2>&1
import onnxruntime as ort
print("version", ort.__version__, "from", ort.__file__)
if hasattr(ort, "preload_dlls"):
    ort.preload_dlls()  # CUDA/cuDNN from the nvidia-* Python packages
print("providers", ort.get_available_providers())
EOF
  echo "## packages"; $PY -m pip list 2>/dev/null | grep -i -E "^(torch|onnx|timm|peft|numpy|nvidia-cu|openslide|tifffile)"
} > "$OUT/probe.txt" 2>&1
cat "$OUT/probe.txt"
timeout "${GPU_SUITE_TIMEOUT:-480}" $PY "$here/../run.py" --suite gpu-ort --json "$OUT/gpu_ort.json" 2> "$OUT/gpu_ort.log"
echo "run.py exit $?" >> "$OUT/gpu_ort.log"
tail -5 "$OUT/gpu_ort.log"
cat "$OUT/gpu_ort.md" 2>/dev/null
