#!/usr/bin/env bash
# Start script of a gptoss-cloud training job on Baseten (the rendered config.py runs it on every node).
#
# Baseten starts the same container on each node and exports the topology as BT_* variables; this
# script maps them onto the trainer's torchrun launch. Everything about the run itself travels in
# spec.yaml beside this script. Followers need no wait-for-leader loop: torchrun's c10d rendezvous
# retries the leader's endpoint until its join timeout.
set -euo pipefail

here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
spec="${GPTOSS_SPEC_FILE:-$here/spec.yaml}"
run_id="${GPTOSS_RUN_ID:?GPTOSS_RUN_ID is not set (the rendered config.py sets it)}"

nnodes="${BT_GROUP_SIZE:-1}"
node_rank="${BT_NODE_RANK:-0}"
gpus="${BT_NUM_GPUS:-${GPTOSS_GPUS_PER_NODE:-8}}"
leader="${BT_LEADER_ADDR:-127.0.0.1}"
port="${GPTOSS_RDZV_PORT:-29500}"
join_timeout="${GPTOSS_RDZV_JOIN_TIMEOUT:-1800}"
attempt="${BT_RETRY_COUNT:-0}"

# The job was rendered for a node count; a different group would train a different global batch.
if [[ -n "${GPTOSS_NODES:-}" && "$nnodes" != "$GPTOSS_NODES" ]]; then
  echo "gptoss-cloud: this job was rendered for $GPTOSS_NODES nodes but Baseten started $nnodes (BT_GROUP_SIZE)" >&2
  exit 2
fi

# Node layout reaches the trainer as options (it trains spec.yaml as written and refuses environment
# variables that name spec settings).
node_opts=()

# Baseten's checkpoint folder is node-local scratch only: the trainer stages shards there and
# publishes every checkpoint to the run's store, so merge, serve and --resume work as on any backend.
if [[ -n "${BT_CHECKPOINT_DIR:-}" ]]; then
  node_opts+=(--local-dir "$BT_CHECKPOINT_DIR/$run_id")
fi

# The project cache outlives the job and is shared by its nodes: base weights download once.
if [[ -n "${BT_PROJECT_CACHE_DIR:-}" ]]; then
  export HF_HOME="${HF_HOME:-$BT_PROJECT_CACHE_DIR/huggingface}"
  node_opts+=(--weights-cache "$BT_PROJECT_CACHE_DIR/models")
fi

# A retried job continues from the run's latest published checkpoint, whatever the first attempt said.
if [[ "$attempt" != "0" ]]; then
  node_opts+=(--retried)
fi

echo "gptoss-cloud: run $run_id, node $node_rank of $nnodes, $gpus GPUs, rendezvous $leader:$port, attempt $attempt"
exec torchrun \
  --nnodes "$nnodes" \
  --nproc-per-node "$gpus" \
  --node-rank "$node_rank" \
  --rdzv-backend c10d \
  --rdzv-endpoint "$leader:$port" \
  --rdzv-id "$run_id" \
  --rdzv-conf "join_timeout=$join_timeout" \
  -m gptoss_cloud.trainer "$spec" --run-id "$run_id" ${node_opts[@]+"${node_opts[@]}"}
