#!/usr/bin/env bash
# 20b LoRA r=16 at 4,096 tokens on one H100: compiled decoder layers and no recomputation, bf16 and
# MXFP4 bases, each benchmark with the transformers reference in the same invocation on the same card.
# Two benchmarks side by side on a 2-GPU machine (one after the other on one GPU).
#   OUT=/path/to/results bash scripts/gpu_perf4.sh
set -uo pipefail
OUT="${OUT:-$PWD/perf-out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1 COLUMNS=200
NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
B=("$PY" -m gptoss_cloud bench --model 20b --method lora --seq 4096 --steps 4 --warmup 2 --timeout 420 --profile --baseline)

bf16() {
  CUDA_VISIBLE_DEVICES=$1 "${B[@]}" --variant experts=fused --variant experts=fused,compile=yes \
    --variant experts=fused,recompute=none,compile=yes \
    --out "$OUT/20b-lora-4k-compile.json" > "$OUT/logs/20b-lora-4k-compile.log" 2>&1
}
mxfp4() {
  CUDA_VISIBLE_DEVICES=$1 "${B[@]}" --variant experts=fused,recompute=none \
    --variant experts=fused,base=mxfp4,dequant=triton,recompute=none \
    --variant experts=fused,base=mxfp4,dequant=triton,recompute=none,compile=yes \
    --out "$OUT/20b-lora-4k-mxfp4-none.json" > "$OUT/logs/20b-lora-4k-mxfp4-none.log" 2>&1
}
if [ "$NGPU" -ge 2 ]; then
  bf16 0 & p0=$!
  mxfp4 1 & p1=$!
  wait $p0 $p1
else
  bf16 0
  mxfp4 0
fi
for f in "$OUT"/logs/*.log; do echo "== $(basename "$f")"; grep -E "^│ (ours|transformers)|measured" "$f" | head -30; done
tar -C "$OUT" -czf "$OUT/logs.tar.gz" logs && rm -rf "$OUT/logs"
