#!/usr/bin/env bash
# GPU smoke check of the training path, in one call on a GPU machine:
#   DATA=DIR_WITH_her2st OUT=/some/dir bash benchmarks/gpu/gpu_train_check.sh
# phase 1 (UNI geometry, random weights, LoRA, bf16 autocast) for a few steps,
# the feature cache, phase 2 from it, evaluate, and export of the result; each
# step's wall time and exit code go to $OUT/train_check.json, its log beside it.
# Runs from a checkout without installing it (packages linked onto PYTHONPATH).
set -u
OUT=${OUT:-/tmp/gpu-train-check}
DATA=${DATA:?set DATA to a folder holding her2st/}
PY=${PYTHON:-python3}
BACKBONE=${BACKBONE:-uni}
STEPS=${STEPS:-30}
mkdir -p "$OUT"
source "$(dirname "$0")/checkout_packages.sh"
W=$(mktemp -d)
nvidia-smi --query-gpu=name,compute_cap,memory.total --format=csv,noheader > "$OUT/gpu.txt" 2>&1
$PY -c "import torch; print('torch', torch.__version__, 'cuda', torch.cuda.is_available())" >> "$OUT/gpu.txt" 2>&1
results=()
step() {  # step NAME CMD...
  local name=$1; shift
  local t0=$EPOCHREALTIME
  "$@" > "$OUT/$name.log" 2>&1
  local rc=$?
  local t1=$EPOCHREALTIME
  results+=("{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $(awk "BEGIN{print $t1 - $t0}")}")
  tail -3 "$OUT/$name.log"
  return $rc
}
G="$DATA/her2st"
step phase1 $PY -m mmap_train.cli phase1 --data-dir "$DATA" --val-sections B4v --backbone "$BACKBONE" \
  --max-steps "$STEPS" --epochs 2 --batch-size 16 --loader-threads 4 --out "$W/p1" &&
step features $PY -m mmap_train.cli features --data-dir "$DATA" --checkpoint "$W/p1/checkpoint.pt" --out "$W/cache" &&
step phase2 $PY -m mmap_train.cli phase2 --features "$W/cache" --counts "$G/counts" --spots "$G/spots" \
  --genes "$G/genes_785.txt" --init "$W/p1/checkpoint.pt" --out "$W/p2" &&
step evaluate $PY -m mmap_train.cli evaluate --checkpoint "$W/p2/checkpoint.pt" --features "$W/cache" \
  --counts "$G/counts" --spots "$G/spots" --genes "$G/genes_785.txt" --json "$OUT/evaluate.json" &&
step export $PY -m mmap_export.cli "$W/p2/checkpoint.pt" -o "$W/bundle"
cp "$W/p1/log.json" "$OUT/phase1_log.json" 2>/dev/null
(IFS=,; echo "{\"gpu\": \"$(head -1 "$OUT/gpu.txt")\", \"backbone\": \"$BACKBONE\", \"steps\": [${results[*]}]}") > "$OUT/train_check.json"
cat "$OUT/train_check.json"
