#!/usr/bin/env bash
# FSDP2 with CPU offload on two H100s: the 20b shape at 6 layers, ours offloaded against transformers +
# torch FSDP2 (not offloaded) in the same invocation, each step profiled; then the trainer itself on one
# 120b layer with offload, async checkpoints and the end-of-run merge (scripts/gpu_offload_ckpt.sh).
#   OUT=/path/to/results bash scripts/gpu_perf6.sh
set -uo pipefail
OUT="${OUT:-$PWD/perf-out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1 COLUMNS=200 NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
"$PY" -m gptoss_cloud bench --method full --gpus 2 --seq 4096 --steps 3 --warmup 1 --timeout 200 --profile --baseline \
  --model 20b --layers 6 --variant experts=fused,compile=yes,offload=yes \
  --out "$OUT/20b-L6-full-2gpu-offload.json" > "$OUT/logs/20b-L6-full-2gpu-offload.log" 2>&1
grep -E "^│ (ours|transformers)|measured" "$OUT/logs/20b-L6-full-2gpu-offload.log"
OUT="$OUT/ckpt" MODES="${MODES:-async}" timeout "${CKPT_TIMEOUT:-300}" bash scripts/gpu_offload_ckpt.sh 2>&1 | tail -40
tar -C "$OUT" -czf "$OUT/logs.tar.gz" logs ckpt && rm -rf "$OUT/logs" "$OUT/ckpt"
