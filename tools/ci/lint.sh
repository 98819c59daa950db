#!/usr/bin/env bash
# Lint and format: ruff (pyproject.toml) for Python, clang-format (.clang-format) for C++/CUDA.
#   bash tools/ci/lint.sh          # check; fails on any finding
#   bash tools/ci/lint.sh --fix    # rewrite the files instead
set -euo pipefail
cd "$(dirname "$0")/../.."
bin=${LINT_BIN:-.venv/bin}
cxx=$(git ls-files 'csrc/*.h' 'csrc/*.cpp' 'csrc/*.cu' 'csrc/*.cuh' 'tests/cuda_harness/*.cpp')
if [ "${1:-}" = --fix ]; then
  "$bin/ruff" check --fix .
  "$bin/ruff" format .
  "$bin/clang-format" -i $cxx
  exit 0
fi
"$bin/ruff" check .
"$bin/ruff" format --check .
"$bin/clang-format" --dry-run --Werror $cxx
echo "lint: clean"
