#!/usr/bin/env bash
# Two-node rehearsal on one GPU host (issue 12): two torchrun node groups started with exactly the
# environment the rendered JobSet gives its pods, training the 20b shape at 1 layer (full fine-tune)
# together, checkpoints to a local S3-compatible server (moto) started here. Node group 1 is
# SIGKILLed once step $KILL_AT_STEP's checkpoint is published; all groups restart as JobSet's failure
# policy would, and the losses after the resume are compared with an uninterrupted run of the same spec.
#
#   OUT=/path/to/results GPUS_PER_NODE=1 bash scripts/gpu_rehearse.sh     # 2-GPU host: 2 groups x 1 GPU
#   OUT=/path/to/results GPUS_PER_NODE=4 bash scripts/gpu_rehearse.sh     # 8-GPU host: 2 groups x 4 GPUs
#
# No network. Needs python3 with torch (CUDA) and gptoss-cloud with its [train] and moto[server]
# installed; WHEELS=/folder installs gptoss-cloud and moto[server] from that folder first (pip --no-index).
# Or keep the S3 server's packages apart from the trainer's (they must not shadow torch's jinja2 & co.):
#   pip install --no-index --no-deps --target /tmp/moto-site <moto, flask, werkzeug, ... wheels>
#   MOTO_SITE=/tmp/moto-site OUT=... bash scripts/gpu_rehearse.sh    # the server alone runs with it
# Disk and memory: one checkpoint is ~24 GB. The S3 server keeps objects in memory (MOTO_IN_MEMORY=1,
# the default; host RAM >= 128 GiB); the reference run's home (only its metrics are compared) and the
# node groups' pod folders (local checkpoint copies) go under $WORK (default /tmp). $OUT receives only small files: report.json, node logs, metrics, versions.
set -uo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
OUT="${OUT:-$PWD/rehearse-out}"
PY="${PYTHON:-python3}"
GPUS_PER_NODE="${GPUS_PER_NODE:-1}"
SPEC="${SPEC:-$REPO/examples/gpu-rehearse-20b-L1-full.yaml}"
KILL_AT_STEP="${KILL_AT_STEP:-3}"
TOLERANCE="${TOLERANCE:-5e-3}"   # relative per-step loss difference; bf16 GPU kernels are not bitwise deterministic
TIMEOUT="${TIMEOUT:-3000}"
WORK="${WORK:-/tmp/gptoss-rehearse-work}"
BUCKET="${BUCKET:-rehearse}"
mkdir -p "$OUT" "$WORK"
OUT="$(cd "$OUT" && pwd)"
# NVLink multicast stays off on shared hosts (the machines' own setting; kept if already set).
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}" TORCH_SYMM_MEM_DISABLE_MULTICAST="${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}"
export PYTHONUNBUFFERED=1 TMPDIR="$WORK"
if [ -z "${TIKTOKEN_ENCODINGS_BASE:-}" ]; then  # the harmony vocabulary, offline
  for d in "$REPO/shared/tokenizers" "$REPO/../shared/tokenizers"; do
    [ -d "$d" ] && export TIKTOKEN_ENCODINGS_BASE="$(cd "$d" && pwd)" && break
  done
fi

if [ -n "${WHEELS:-}" ]; then
  echo "== installing gptoss-cloud and moto[server] from $WHEELS (offline)"
  "$PY" -m pip install -q --no-index --find-links "$WHEELS" gptoss-cloud "moto[server]" || exit 1
fi

echo "== host" | tee "$OUT/env.txt"
{ nvidia-smi --query-gpu=index,name,memory.total,driver_version --format=csv,noheader || echo "no nvidia-smi"
  df -h "$WORK" | tail -1; free -g | sed -n 2p
  "$PY" "$(dirname "$0")/versions.py" transformers accelerate gptoss-cloud moto
  date -u +%Y-%m-%dT%H:%M:%SZ; } 2>&1 | tee -a "$OUT/env.txt"

echo "== S3-compatible server (moto) on 127.0.0.1"
S3_PORT="${S3_PORT:-$("$PY" -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}"
if [ "${MOTO_IN_MEMORY:-1}" = 1 ]; then
  export MOTO_S3_DEFAULT_KEY_BUFFER_SIZE=$((64 * 1024 * 1024 * 1024))  # objects up to 64 GiB stay in RAM
fi
PYTHONPATH="${MOTO_SITE:+$MOTO_SITE:}${PYTHONPATH:-}" "$PY" -c "from moto.server import main; main()" -H 127.0.0.1 -p "$S3_PORT" > "$OUT/moto.log" 2>&1 &
MOTO_PID=$!
trap 'kill "$MOTO_PID" 2>/dev/null; wait "$MOTO_PID" 2>/dev/null' EXIT
unset AWS_PROFILE AWS_SESSION_TOKEN AWS_ENDPOINT_URL_S3
export AWS_ACCESS_KEY_ID=testing AWS_SECRET_ACCESS_KEY=testing AWS_DEFAULT_REGION=us-east-1
export AWS_ENDPOINT_URL="http://127.0.0.1:$S3_PORT"
"$PY" - "$BUCKET" <<'PY' || { echo "the S3 server did not start; see moto.log"; exit 1; }
import os, socket, sys, time
import boto3
deadline = time.time() + 60
while True:
    try:
        socket.create_connection(("127.0.0.1", int(os.environ["AWS_ENDPOINT_URL"].rsplit(":", 1)[1])), 0.2).close()
        break
    except OSError:
        if time.time() > deadline:
            sys.exit(1)
        time.sleep(0.2)
boto3.client("s3").create_bucket(Bucket=sys.argv[1])
print("bucket", sys.argv[1], "at", os.environ["AWS_ENDPOINT_URL"])
PY

RUN_ID="${RUN_ID:-rehearse-20b-l1-$(date -u +%Y%m%d-%H%M%S)}"
CMD=(gptoss-cloud rehearse "$SPEC" --nodes 2 --gpus-per-node "$GPUS_PER_NODE" --kill-node 1
     --kill-at-step "$KILL_AT_STEP" --reference --reference-store "$WORK/reference-runs" --store "s3://$BUCKET/runs" --run-id "$RUN_ID"
     --out "$OUT/report.json" --out-dir "$OUT/logs" --tolerance "$TOLERANCE" --timeout "$TIMEOUT" --grace 30)
echo "== ${CMD[*]}" | tee "$OUT/command.txt"
"$PY" -m gptoss_cloud.main "${CMD[@]:1}" 2>&1 | tee "$OUT/rehearse.log"
status=${PIPESTATUS[0]}

# The small outputs of both runs (metrics, summary, spec) beside the report.
"$PY" - "$OUT" <<'PY'
import json, sys
from gptoss_cloud.contract.store.objects import open_store
out = sys.argv[1]
try:
    rep = json.load(open(f"{out}/report.json"))
except (OSError, ValueError):
    sys.exit(0)
for home in [rep["home"]] + ([rep["reference"]["home"]] if rep.get("reference") else []):
    st, run = open_store(home), home.rsplit("/", 1)[-1]
    for key in ("metrics.jsonl", "summary.json", "spec.yaml"):
        if st.exists(key):
            st.download_file(key, f"{out}/{run}.{key}")
PY
echo "== exit $status; results in $OUT"
exit $status
