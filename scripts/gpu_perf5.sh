#!/usr/bin/env bash
# Full fine-tuning over two H100s with FSDP2 (performance II): ours with and without compiled layers and
# with CPU offload, against transformers + torch FSDP2 in the same invocation — the 20b shape at 6
# layers, then one 120b layer (128 experts) — each step profiled (compute, communication, optimizer).
#   OUT=/path/to/results bash scripts/gpu_perf5.sh
set -uo pipefail
OUT="${OUT:-$PWD/perf-out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1 COLUMNS=200 NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}"
B=("$PY" -m gptoss_cloud bench --method full --gpus 2 --seq 4096 --steps 3 --warmup 2 --timeout 240 --profile --baseline)
"${B[@]}" --model 20b --layers 6 --variant experts=fused --variant experts=fused,compile=yes \
  --variant experts=fused,compile=yes,offload=yes \
  --out "$OUT/20b-L6-full-2gpu.json" > "$OUT/logs/20b-L6-full-2gpu.log" 2>&1
"${B[@]}" --model 120b --layers 1 --variant experts=fused,compile=yes --variant experts=fused,compile=yes,offload=yes \
  --out "$OUT/120b-L1-full-2gpu.json" > "$OUT/logs/120b-L1-full-2gpu.log" 2>&1
for f in "$OUT"/logs/*.log; do echo "== $(basename "$f")"; grep -E "^│ (ours|transformers)|measured" "$f" | head -30; done
tar -C "$OUT" -czf "$OUT/logs.tar.gz" logs && rm -rf "$OUT/logs"
