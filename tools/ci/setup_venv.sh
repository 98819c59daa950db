#!/usr/bin/env bash
# Makes .venv (if missing) with the pinned CPU build of torch and this package,
# editable, with the extras named in $1 (e.g. "test,train").
# Used by tools/test.sh and tools/main_job.sh.
set -euo pipefail
cd "$(dirname "$0")/../.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# torch is pinned: 2.13.0's CPU wheel (a plain "torch" would pull a multi-GB CUDA build).
.venv/bin/python -m pip install --quiet --disable-pip-version-check "torch==2.13.0"
.venv/bin/python -m pip install --quiet --disable-pip-version-check -e ".[${1:?extras, e.g. test,train}]"
