#!/usr/bin/env bash
# GPU smoke benchmark: one H100 LoRA run against the transformers reference, then a 2-GPU FSDP2
# run at reduced depth with its reference. Writes JSON reports and logs under $OUT.
#
#   OUT=/path/to/results bash scripts/gpu_smoke.sh
#
# Needs: python3 with torch, transformers, peft, accelerate, and gptoss-cloud installed (the wheel,
# --no-deps, plus pydantic/openai-harmony/boto3 wheels). No network. About 8 minutes of GPU time:
# each variant is built fresh in its own process (3 warm-up + 5 timed steps) and is cut off after
# $VARIANT_TIMEOUT seconds, so a stuck variant is recorded as failed instead of eating the budget.
# BASELINE_EAGER=1 adds the reference with eager experts and attention to (a) (~1 more minute).
set -uo pipefail

OUT="${OUT:-$PWD/bench-out}"
PY="${PYTHON:-python3}"
STEPS="${STEPS:-5}"
WARMUP="${WARMUP:-3}"
VARIANT_TIMEOUT="${VARIANT_TIMEOUT:-240}"
mkdir -p "$OUT"
# NVLink multicast stays off on shared hosts (the machines' own setting; kept if already set).
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}" TORCH_SYMM_MEM_DISABLE_MULTICAST="${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}"
export PYTHONUNBUFFERED=1
DATE="$(date -u +%Y-%m-%d)"
status=0

echo "== nvidia-smi"
nvidia-smi || { echo "no nvidia-smi: not a GPU machine"; exit 1; }
echo "== versions"
"$PY" "$(dirname "$0")/versions.py" transformers peft accelerate gptoss-cloud pydantic openai-harmony
NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"

EXTRA=()
[ "${BASELINE_EAGER:-0}" = "1" ] && EXTRA+=(--baseline-eager)

echo "== (a) 20b LoRA r=16, seq 4096, 1 GPU: ours vs transformers + peft"
CUDA_VISIBLE_DEVICES=0 "$PY" -m gptoss_cloud bench --model 20b --method lora --seq 4096 --baseline "${EXTRA[@]}" \
  --steps "$STEPS" --warmup "$WARMUP" --timeout "$VARIANT_TIMEOUT" --out "$OUT/$DATE-20b-lora-1gpu.json" \
  2>&1 | tee "$OUT/20b-lora-1gpu.log" || status=1

if [ "$NGPU" -ge 2 ]; then
  echo "== (b) 20b shape at 6 layers, full fine-tuning, FSDP2 over 2 GPUs: ours vs transformers + FSDP2"
  CUDA_VISIBLE_DEVICES=0,1 "$PY" -m gptoss_cloud bench --model 20b --layers 6 --method full --seq 4096 --gpus 2 \
    --baseline --steps "$STEPS" --warmup "$WARMUP" --timeout "$VARIANT_TIMEOUT" \
    --out "$OUT/$DATE-20b-L6-full-2gpu.json" 2>&1 | tee "$OUT/20b-L6-full-2gpu.log" || status=1
else
  echo "== (b) skipped: $NGPU GPU(s) visible, the FSDP2 run needs 2"
fi
echo "== reports in $OUT"
ls -l "$OUT"
exit $status
