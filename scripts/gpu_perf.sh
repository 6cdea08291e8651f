#!/usr/bin/env bash
# The fast paths on one GPU: the GPU kernel tests, then 20b LoRA at 4,096 tokens with each of our
# expert paths (grouped_mm, fused, MXFP4 base) against the transformers reference, then long context.
#   OUT=/path/to/results bash scripts/gpu_perf.sh
set -uo pipefail
OUT="${OUT:-$PWD/perf-out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 COLUMNS=200 CUDA_VISIBLE_DEVICES="${CUDA_VISIBLE_DEVICES:-0}"
STEPS="${STEPS:-5}" WARMUP="${WARMUP:-2}"
status=0
echo "== GPU kernel tests"
"$PY" -m pytest -m gpu tests/gpu -q -x -p no:cacheprovider -s > "$OUT/gpu-tests.log" 2>&1 || status=1
grep -E "passed|failed|error|ms|GiB" "$OUT/gpu-tests.log" | tail -40
bench() {  # bench NAME ARGS...
  local name=$1; shift
  echo "== bench $name"
  timeout 260 "$PY" -m gptoss_cloud bench --model 20b --method lora --steps "$STEPS" --warmup "$WARMUP" --timeout 200 \
    --out "$OUT/$name.json" "$@" > "$OUT/$name.log" 2>&1 || status=1
  grep -E "^│" "$OUT/$name.log"
}
bench 20b-lora-4k --seq 4096 --baseline
bench 20b-lora-4k-fused --seq 4096 --experts fused
bench 20b-lora-4k-mxfp4 --seq 4096 --base-format mxfp4
bench 20b-lora-64k-mxfp4 --seq 65536 --base-format mxfp4 --steps 2 --warmup 1
exit $status
