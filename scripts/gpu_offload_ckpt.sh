#!/usr/bin/env bash
# Issue 10 on GPUs: the trainer itself (FSDP2, CPU offload, full fine-tune) with the step split, sync and
# async checkpoint timings, the end-of-run merge, and the host memory of the rank processes.
#   OUT=/path/to/results bash scripts/gpu_offload_ckpt.sh                      # 2 GPUs, 120b at 1 layer
#   NPROC=8 SPEC=examples/h100x8-120b-full-offload.yaml OUT=... bash scripts/gpu_offload_ckpt.sh
#   MODES="sync" / MODES="async": one run only (each run fits a 10-minute slot); KEEP_HOME=1 keeps the run home.
# Under $OUT per run: <id>.log, <id>.metrics.jsonl, <id>.summary.json, <id>.mem.tsv (every second: time,
# summed and largest rank RSS in KiB), <id>.free.txt (`free -g` every 10 s), then a summary on stdout.
set -uo pipefail
OUT="${OUT:-$PWD/offload-out}"
PY="${PYTHON:-python3}"
NPROC="${NPROC:-2}"
SPEC="${SPEC:-examples/h100x2-120b-L1-full-offload.yaml}"
MODES="${MODES:-sync async}"
mkdir -p "$OUT"
export NCCL_NVLS_ENABLE="${NCCL_NVLS_ENABLE:-0}" TORCH_SYMM_MEM_DISABLE_MULTICAST="${TORCH_SYMM_MEM_DISABLE_MULTICAST:-1}"
export PYTHONUNBUFFERED=1
STORE="$("$PY" -c 'import sys; from gptoss_cloud.contract.spec import load_spec; print(load_spec(sys.argv[1]).output.store)' "$SPEC")"
NAME="$(basename "$SPEC" .yaml | tr "[:upper:]" "[:lower:]")"  # run ids are lowercase
status=0

sample_memory() {  # sample_memory RUN_ID FILE: the rank processes' RSS (KiB) every second until killed
  local id=$1 file=$2 n=0
  echo -e "t\tsum_rss_kib\tmax_rss_kib\tprocs" > "$file"
  while true; do
    ps -eo rss=,args= | awk -v id="--run-id $id" -v t="$(date +%s)" '
      index($0, id) && index($0, "gptoss_cloud.trainer") && !index($0, "torch.distributed.run") && !index($0, "awk") {
        s += $1; if ($1 > m) m = $1; n++ }
      END { printf "%s\t%d\t%d\t%d\n", t, s, m, n }' >> "$file"
    if [ $((n % 10)) -eq 0 ]; then { date +%T; free -g; } >> "${file%.mem.tsv}.free.txt"; fi
    n=$((n + 1)); sleep 1
  done
}

for mode in $MODES; do
  id="$NAME-$mode"
  spec="$OUT/$id.yaml"
  async=false; [ "$mode" = async ] && async=true
  # The trainer trains a resolved spec as written: resolve it here, with the step split on.
  "$PY" -c 'import sys; from gptoss_cloud.contract.spec import load_spec
print(load_spec(sys.argv[1], overrides={"checkpoint.async_save": sys.argv[2] == "true", "optim.step_split": True}).to_yaml(), end="")' \
    "$SPEC" "$async" > "$spec"
  rm -rf "$STORE/$id"
  echo "== $id ($NPROC GPU, async_save $async)"
  sample_memory "$id" "$OUT/$id.mem.tsv" & sampler=$!
  "$PY" -m torch.distributed.run --standalone --nproc-per-node "$NPROC" -m gptoss_cloud.trainer "$spec" --run-id "$id" \
    > "$OUT/$id.log" 2>&1 || { status=1; echo "failed: see $id.log"; }
  kill "$sampler" 2>/dev/null; wait "$sampler" 2>/dev/null
  tail -n 3 "$OUT/$id.log"
  for f in metrics.jsonl summary.json; do cp "$STORE/$id/$f" "$OUT/$id.$f" 2>/dev/null || true; done
  du -sh "$STORE/$id/checkpoints" "$STORE/$id/merged" 2>/dev/null | tee "$OUT/$id.du.txt"
  [ "${KEEP_HOME:-0}" = 1 ] || rm -rf "$STORE/$id"  # the next run needs the disk
done

"$PY" - "$OUT" $MODES <<'PY'
import json, sys
from pathlib import Path
from gptoss_cloud.trainer.checkpoint.stats import checkpoint_line
out, modes = Path(sys.argv[1]), sys.argv[2:]
for f in sorted(out.glob("*.metrics.jsonl")):
    rid = f.name[: -len(".metrics.jsonl")]
    rows = [json.loads(l) for l in f.read_text().splitlines() if l.strip()]
    steps = [r for r in rows if "loss" in r and "optimizer_s" in r]
    print(f"\n## {rid}")
    for r in steps:
        print(f"step {r['step']}: {r['step_s']:.2f}s = data {r['data_s']:.2f} + fwd+bwd {r['fwd_bwd_s']:.2f} + optimizer "
              f"{r['optimizer_s']:.2f} ({100 * r['optimizer_share']:.0f}%); {r['tokens_per_s_per_gpu']:.0f} tok/s/GPU, "
              f"GPU peak {r['mem_reserved_gib'] or 0:.1f} GiB reserved")
    late = steps[1:] or steps  # the first step includes warm-up
    if late:
        n = len(late)
        print(f"mean of steps {late[0]['step']}-{late[-1]['step']}: {sum(r['step_s'] for r in late) / n:.2f}s/step, optimizer "
              f"{100 * sum(r['optimizer_s'] for r in late) / sum(r['step_s'] for r in late):.0f}%, "
              f"{sum(r['tokens_per_s_per_gpu'] for r in late) / n:.0f} tok/s/GPU")
    for r in rows:
        if r.get("event") == "checkpoint":
            print(checkpoint_line(r))  # the trainer's own one-line form of the event
        if r.get("event") == "merge":
            print(f"merge: {r['wall_s']}s, {r['bytes_written'] / 1e9:.2f} GB written, peak host memory {r['peak_rss_gib']} GiB "
                  f"({r['peak_rss_scope']}; {r['rss_start_gib']} GiB at start)")
    mem = out / f"{rid}.mem.tsv"
    if mem.exists():
        vals = [l.split("\t") for l in mem.read_text().splitlines()[1:] if l.strip()]
        if vals:
            print(f"host RSS of the ranks: peak sum {max(int(v[1]) for v in vals) / 2**20:.1f} GiB, "
                  f"peak single rank {max(int(v[2]) for v in vals) / 2**20:.1f} GiB")
PY
exit $status
