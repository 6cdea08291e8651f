#!/usr/bin/env bash
# One-GPU measurements for performance I and II, two benchmarks side by side (one per GPU; on a
# one-GPU machine they run one after the other):
#   GPU 0: 20b LoRA r=16 at 4,096 tokens — transformers' best configuration against our expert
#          kernels and recomputation policies, each step profiled.
#   GPU 1: the GPU kernel tests, then the MXFP4 base (torch vs Triton dequantisation, recomputation
#          policies), then the full 36-layer 120b LoRA on the MXFP4 base on this one GPU.
#   OUT=/path/to/results bash scripts/gpu_perf3.sh
set -uo pipefail
OUT="${OUT:-$PWD/perf-out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT/logs"
export PYTHONUNBUFFERED=1 COLUMNS=200
NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
B=("$PY" -m gptoss_cloud bench --method lora --seq 4096 --steps 4 --warmup 2 --timeout 300 --profile)

gpu0() {
  CUDA_VISIBLE_DEVICES=0 "${B[@]}" --model 20b --baseline \
    --variant experts=grouped_mm --variant experts=fused --variant experts=fused,recompute=selective \
    --variant experts=fused,recompute=none --out "$OUT/20b-lora-4k-kernels.json" > "$OUT/logs/20b-lora-4k-kernels.log" 2>&1
}
gpu1() {
  local dev=$1
  CUDA_VISIBLE_DEVICES=$dev "$PY" -m pytest -m gpu tests/gpu -q -p no:cacheprovider -rA > "$OUT/gpu-tests.log" 2>&1
  CUDA_VISIBLE_DEVICES=$dev "${B[@]}" --model 20b --base-format mxfp4 \
    --variant experts=fused,dequant=torch --variant experts=fused,dequant=triton \
    --variant experts=fused,dequant=triton,recompute=selective --variant experts=fused,dequant=triton,recompute=none \
    --out "$OUT/20b-lora-4k-mxfp4.json" > "$OUT/logs/20b-lora-4k-mxfp4.log" 2>&1
  CUDA_VISIBLE_DEVICES=$dev "$PY" -m gptoss_cloud bench --model 120b --method lora --seq 4096 --steps 3 --warmup 1 \
    --timeout 400 --base-format mxfp4 --dequant triton --experts fused --profile \
    --out "$OUT/120b-lora-4k-mxfp4-1gpu.json" > "$OUT/logs/120b-lora-4k-mxfp4-1gpu.log" 2>&1
}

if [ "$NGPU" -ge 2 ]; then
  gpu0 & p0=$!
  gpu1 1 & p1=$!
  wait $p0 $p1
else
  gpu0
  gpu1 0
fi
tail -n 3 "$OUT/gpu-tests.log"
for f in "$OUT"/logs/*.log; do echo "== $(basename "$f")"; grep -E "^│ (ours|transformers)|measured" "$f" | head -30; done
tar -C "$OUT" -czf "$OUT/logs.tar.gz" logs && rm -rf "$OUT/logs"
