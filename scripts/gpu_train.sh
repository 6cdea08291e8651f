#!/usr/bin/env bash
# The trainer itself (not the benchmark harness) on GPUs: 20b LoRA on one GPU, then FSDP2 full
# fine-tuning of a 6-layer 20b over two GPUs through NCCL. metrics.jsonl and logs land under $OUT.
#   OUT=/path/to/results bash scripts/gpu_train.sh
set -uo pipefail
OUT="${OUT:-$PWD/train-out}"
PY="${PYTHON:-python3}"
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}" TORCH_SYMM_MEM_DISABLE_MULTICAST="${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}"
export PYTHONUNBUFFERED=1
status=0
run() {  # run NAME NPROC SPEC
  local name=$1 nproc=$2 spec=$3
  echo "== $name ($nproc GPU)"
  "$PY" -m torch.distributed.run --standalone --nproc-per-node "$nproc" -m gptoss_cloud.trainer "$spec" --run-id "$name" \
    > "$OUT/$name.log" 2>&1 || { status=1; echo "failed: see $name.log"; }
  tail -n 3 "$OUT/$name.log"
  cp "/tmp/gptoss-runs/$name/metrics.jsonl" "$OUT/$name.metrics.jsonl" 2>/dev/null || true
  cp "/tmp/gptoss-runs/$name/summary.json" "$OUT/$name.summary.json" 2>/dev/null || true
}
CUDA_VISIBLE_DEVICES=0 run h100-20b-lora 1 examples/h100-20b-lora.yaml
NGPU="$("$PY" -c 'import torch; print(torch.cuda.device_count())')"
if [ "$NGPU" -ge 2 ]; then
  CUDA_VISIBLE_DEVICES=0,1 run h100x2-20b-l6-full 2 examples/h100x2-20b-L6-full.yaml
fi
exit $status
