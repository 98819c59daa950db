#!/usr/bin/env bash
# The test command (README "Tests and development"; CI runs it through .ci/run).
#   1. a virtual environment in .venv with the CPU build of torch and this package
#   2. lint (ruff, clang-format), the word check, PERFORMANCE.md's tables against their JSON
#   3. `terminator build`: compiles the C++ ops on the fly; in CI it must be the C++ backend
#   4. every .cu compiled with nvcc against the CUDA build of torch's headers
#   5. the GPU check's dry run (tools/gpu_check.sh --dry-run, on the CPU)
#   6. the op tests, the layer ops and a fuzz sample on the pure-PyTorch reference backend
#   7. the op tests under AddressSanitizer + UBSan (tools/ci/sanitize.sh)
#   8. the op and numerics tests on AVX2 and SSE2 builds (x86-64 Linux)
#   9. the whole suite on the compiled backend
# Extra arguments go to the last pytest.
set -euo pipefail
cd "$(dirname "$0")/.."

bash tools/ci/setup_venv.sh "test,train,lint"

echo "== lint, word check, generated tables"
bash tools/ci/lint.sh
bash tools/ci/check_words.sh
.venv/bin/python tools/bench/perf_tables.py --check

echo "== terminator build"
.venv/bin/python -m terminator build

echo "== CUDA compile check (every .cu with nvcc, sm_80 and sm_90)"
if command -v nvcc >/dev/null || [ "${CI:-}" = true ]; then
  bash tools/ci/check_cuda.sh
else
  echo "skipped: nvcc not on PATH (CI requires it)"
fi

echo "== GPU check, dry run on the CPU (tools/gpu_check.sh --dry-run)"
gpu_out=$(mktemp -d)
# the dry run reuses the build above (on a GPU machine it builds its own)
TERMINATOR_CACHE_DIR=$(.venv/bin/python -c "from terminator.ops._build import cache_root; print(cache_root())") \
  bash tools/gpu_check.sh --dry-run "$gpu_out"
rm -rf "$gpu_out"

echo "== op tests on the reference backend"
TERMINATOR_BACKEND=reference .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_errors.py \
  tests/test_fuzz.py tests/test_network_ops.py tests/test_downstream.py

# The op tests (and a fuzz sample) against an ASan + UBSan build of the C++ ops; any
# sanitizer report fails CI. tests/test_large_index.py is opt-in.
echo "== op tests under AddressSanitizer + UndefinedBehaviorSanitizer (tools/ci/sanitize.sh)"
bash tools/ci/sanitize.sh

# The CPU kernels size their vectors and register blockings by the build's target
# (csrc/cpu/vec.h: AVX-512, AVX2, SSE2/NEON), and -march=native builds only this
# machine's. The op and numerics tests again against an AVX2 (x86-64-v3) and an SSE2
# (x86-64) build.
if [ "$(uname -s)-$(uname -m)" = Linux-x86_64 ]; then
  for arch in x86-64-v3 x86-64; do
    if [ "$arch" = x86-64-v3 ] && ! grep -qw avx2 /proc/cpuinfo; then
      echo "skipped -march=$arch: this CPU has no AVX2"
      continue
    fi
    echo "== op tests on a -march=$arch build (TERMINATOR_MARCH)"
    TERMINATOR_MARCH=$arch TERMINATOR_BACKEND=cpp .venv/bin/python -m terminator build | grep '^flags:'
    TERMINATOR_MARCH=$arch TERMINATOR_BACKEND=cpp .venv/bin/python -m pytest -q -p no:cacheprovider \
      tests/test_ops.py tests/test_numerics.py tests/test_network_ops.py
  done
fi

echo "== full suite on the compiled backend"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
