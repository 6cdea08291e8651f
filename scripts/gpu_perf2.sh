#!/usr/bin/env bash
# Every GPU kernel test (no stop at the first failure), then 20b LoRA at 64K tokens with bf16 base weights.
#   OUT=/path/to/results bash scripts/gpu_perf2.sh
set -uo pipefail
OUT="${OUT:-$PWD/perf-out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 COLUMNS=200 CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
status=0
"$PY" -m pytest -m gpu tests/gpu -q -p no:cacheprovider -s -rA > "$OUT/gpu-tests.log" 2>&1 || status=1
grep -E "^(PASSED|FAILED|ERROR)|passed|failed| ms|GiB" "$OUT/gpu-tests.log" | tail -45
timeout 200 "$PY" -m gptoss_cloud bench --model 20b --method lora --seq 65536 --steps 2 --warmup 1 --timeout 170 \
  --out "$OUT/20b-lora-64k-bf16.json" > "$OUT/20b-lora-64k-bf16.log" 2>&1 || status=1
grep -E "^│" "$OUT/20b-lora-64k-bf16.log"
exit $status
