#!/usr/bin/env bash
# The CUDA path on a real GPU, in one command of at most ~8 minutes (docs/CUDA.md):
#   bash tools/gpu_check.sh OUTDIR             # on a machine with an NVIDIA GPU
#   bash tools/gpu_check.sh --dry-run OUTDIR   # the same script on the CPU, tiny shapes (CI runs it)
# Uses the machine's own torch (this checkout on PYTHONPATH; nothing is downloaded or
# installed) and writes into OUTDIR: build.txt (the build and `terminator build`'s report),
# tests.txt (the device tests), ops.json (op timings against the eager reference and
# torch.compile of it, peak memory), train.json (an epoch of mnist1d, an fmnist step),
# summary.json (each part's status, seconds and limit) and gpu_check.log. Each part stops at
# its own time limit, so the whole fits and a stuck part still leaves the others' results.
set -uo pipefail
cd "$(dirname "$0")/.."
root=$(pwd)

dry=0
if [ "${1:-}" = --dry-run ]; then dry=1; shift; fi
out=${1:?usage: bash tools/gpu_check.sh [--dry-run] OUTDIR}
mkdir -p "$out"
out=$(cd "$out" && pwd)
log="$out/gpu_check.log"
: >"$log"
python=${PYTHON:-python3}
if [ -x .venv/bin/python ] && [ -z "${PYTHON:-}" ] && [ "$dry" = 1 ]; then python=.venv/bin/python; fi
export PYTHONPATH="$root${PYTHONPATH:+:$PYTHONPATH}"
export TERMINATOR_CACHE_DIR="${TERMINATOR_CACHE_DIR:-$out/build-cache}"
if [ "$dry" = 1 ]; then
  export CUDA_VISIBLE_DEVICES=""  # the CUDA parts report themselves skipped
  limits=(build=600 tests=300 ops=120 train=120)
else
  limits=(build=210 tests=120 ops=90 train=60)  # 8 minutes in all
fi
limit() { for kv in "${limits[@]}"; do [ "${kv%%=*}" = "$1" ] && echo "${kv#*=}"; done; }

summary=()
part() {  # part NAME COMMAND...: runs COMMAND under NAME's limit, logs it, records the outcome
  local name=$1; shift
  local seconds start status
  seconds=$(limit "$name")
  start=$(date +%s)
  echo "== $name (limit ${seconds}s): $*" | tee -a "$log"
  timeout --kill-after=10 "$seconds" "$@" >>"$log" 2>&1
  status=$?
  local took=$(($(date +%s) - start))
  local state=passed
  [ "$status" -ne 0 ] && state="failed (exit $status)"
  [ "$status" -eq 124 ] && state="stopped at its time limit"
  echo "== $name: $state in ${took}s" | tee -a "$log"
  summary+=("{\"part\": \"$name\", \"status\": \"$state\", \"seconds\": $took, \"limit\": $seconds}")
}

echo "gpu_check $(date -u +%Y-%m-%dT%H:%M:%SZ) commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown)" \
  "dry_run=$dry" | tee -a "$log"
"$python" - <<'EOF' | tee -a "$log" "$out/machine.txt"
import platform, torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda})")
print("gpu:", torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none")
EOF

part build bash -c "
  start=\$(date +%s%N)
  '$python' -m terminator build | tee '$out/build.txt'
  status=\${PIPESTATUS[0]}
  echo \"build milliseconds: \$(( (\$(date +%s%N) - start) / 1000000 ))\" | tee -a '$out/build.txt'
  exit \$status"

part tests bash -c "'$python' -m pytest -q -p no:cacheprovider tests/test_cuda_device.py \
  tests/test_cuda_kernels.py -k 'cuda_device or on_cuda' 2>&1 | tee '$out/tests.txt'; exit \${PIPESTATUS[0]}"

dry_flag=()
[ "$dry" = 1 ] && dry_flag=(--dry-run)
part ops "$python" tools/bench/gpu_check.py ops "$out/ops.json" "${dry_flag[@]}"
part train "$python" tools/bench/gpu_check.py train "$out/train.json" "${dry_flag[@]}"

{
  echo "{\"dry_run\": $dry, \"commit\": \"$(git rev-parse --short HEAD 2>/dev/null || echo unknown)\", \"parts\": ["
  (IFS=,; echo "${summary[*]}")
  echo "]}"
} >"$out/summary.json"
echo "gpu_check: wrote $out (summary.json, gpu_check.log)" | tee -a "$log"
grep -q '"status": "failed\|"status": "stopped' "$out/summary.json" && exit 1
exit 0
