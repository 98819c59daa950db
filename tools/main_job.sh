#!/usr/bin/env bash
# The main job (README "Two commands on a fresh machine"):
#   1. .venv with the CPU build of torch (pinned) and this package with the "train" extra
#   2. `terminator build`: compiles the C++ ops (about a minute on 2 cores, cached afterwards)
#   3. trains the mnist1d preset on MNIST-1D (configs/mnist1d.yaml) and prints the test accuracy;
#      metrics.csv, curves.png, kernels.png, config.yaml, results.json, best.pt, last.pt in runs/mnist1d
# Extra arguments go to `terminator train` (e.g. --epochs 20, --set seed=1, --out runs/x).
# Re-running it continues an interrupted run (--resume) and starts over after a finished one.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$(date +%s)

bash tools/ci/setup_venv.sh "train"

echo "== terminator build"
.venv/bin/python -m terminator build

echo "== terminator train --config configs/mnist1d.yaml $*"
out=runs/mnist1d
for ((i = 1; i <= $#; i++)); do
  if [ "${!i}" = "--out" ]; then j=$((i + 1)); out=${!j}; fi
done
# A finished run starts over; an interrupted one (last.pt without a complete results.json) is resumed.
if [ -f "$out/results.json" ] && .venv/bin/python -c \
    'import json, sys; r = json.load(open(sys.argv[1])); sys.exit(r["epochs_done"] < r["epochs"])' "$out/results.json"; then
  rm -f "$out"/{best.pt,last.pt,metrics.csv,results.json,eval.json,curves.png,kernels.png,scores.png,config.yaml,train.log}
fi
mkdir -p "$out"
.venv/bin/python -m terminator train --config configs/mnist1d.yaml --resume "$@" | tee "$out/train.log"
echo "main job: $(( $(date +%s) - start )) s wall-clock (run directory $out)"
