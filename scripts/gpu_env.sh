#!/usr/bin/env bash
# The one install step a bare GPU machine needs, then one benchmark suite (cli/suites/suites.toml):
#
#   OUT=results bash scripts/gpu_env.sh SUITE [--dry-run]      # e.g. perf3-defaults, offload-ckpt, gpu-tests
#   bash scripts/gpu_env.sh --list
#
# No network. The machine's python3 holds torch (CUDA), transformers, peft and accelerate; whatever else
# gptoss-cloud needs (pydantic, openai-harmony, boto3, torchao; moto[server] for the rehearse suites) comes
# as wheels in $WHEELS (default .whl), installed with pip --no-index --no-deps into $SITE (default
# /tmp/gptoss-site), which then leads PYTHONPATH, so the machine's own packages stay as they are. Without a
# gptoss_cloud wheel there, this checkout itself is installed into $SITE (its build needs only setuptools).
# nvidia-smi and the versions go to $OUT/env.txt; everything else (the environment each step gets, its log
# and report under $OUT, the stop at the first failing step) is `gptoss-cloud bench --suite`.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
PY="${PYTHON:-python3}"
WHEELS="${WHEELS:-.whl}"
SITE="${SITE:-/tmp/gptoss-site}"
[ $# -ge 1 ] || { echo "usage: OUT=DIR bash scripts/gpu_env.sh SUITE [--dry-run] | --list" >&2; exit 2; }

wheels=()
[ -d "$WHEELS" ] && wheels=("$WHEELS"/*.whl)
[ -e "${wheels[0]:-}" ] || wheels=()
pip=("$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$SITE")
if [ ${#wheels[@]} -gt 0 ]; then
  echo "== installing ${#wheels[@]} wheel(s) from $WHEELS into $SITE"
  "${pip[@]}" "${wheels[@]}"
fi
ours=0
for w in "${wheels[@]}"; do
  case "$(basename "$w")" in gptoss_cloud-*) ours=1 ;; esac
done
if [ "$ours" = 0 ]; then
  echo "== installing gptoss-cloud from $REPO into $SITE"
  "${pip[@]}" --no-build-isolation "$REPO"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"

if [ "$1" = --list ]; then
  exec "$PY" -m gptoss_cloud bench --list
fi
SUITE="$1"
shift
OUT="${OUT:-$PWD/bench-out/$SUITE}"
mkdir -p "$OUT"
{ nvidia-smi || echo "no nvidia-smi"
  "$PY" "$REPO/scripts/versions.py" transformers peft accelerate torchao gptoss-cloud pydantic openai-harmony moto
  date -u +%Y-%m-%dT%H:%M:%SZ; } > "$OUT/env.txt" 2>&1 || true
cd "$REPO"  # the suites name examples/ and tests/ relative to the checkout
exec "$PY" -m gptoss_cloud bench --suite "$SUITE" --out "$OUT" "$@"
