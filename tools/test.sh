#!/usr/bin/env bash
# The test command (README "Tests"; CI runs it through .ci/run).
#   1. a virtual environment in .venv with the CPU build of torch and this package
#   2. `terminator build`: compiles the C++ ops on the fly; in CI it must be the C++ backend
#   3. every .cu compiled with nvcc against the CUDA build of torch's headers
#   4. the op tests and a fuzz sample again on the pure-PyTorch fallback (TERMINATOR_BACKEND=reference)
#   5. the op tests under AddressSanitizer + UBSan (tools/ci/sanitize.sh)
#   6. the op and numerics tests on AVX2 and SSE2 builds (x86-64 Linux)
#   7. the whole suite on the compiled backend
set -euo pipefail
cd "$(dirname "$0")/.."

bash tools/ci/setup_venv.sh "test,train"

echo "== terminator build"
.venv/bin/python -m terminator build

echo "== CUDA compile check (every .cu with nvcc, sm_80 and sm_90)"
if command -v nvcc >/dev/null || [ "${CI:-}" = true ]; then
  bash tools/ci/check_cuda.sh
else
  echo "skipped: nvcc not on PATH (CI requires it)"
fi

echo "== op tests on the reference backend"
TERMINATOR_BACKEND=reference .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_errors.py \
  tests/test_fuzz.py

# ---- hardening (issue 7) ------------------------------------------------------------
# The op tests (and a fuzz sample) against an ASan + UBSan build of the C++ ops; any
# sanitizer report fails CI. The fuzz sample (tests/test_fuzz.py), determinism and
# build-fault tests run in the full suite below; tests/test_large_index.py is opt-in.
echo "== op tests under AddressSanitizer + UndefinedBehaviorSanitizer (tools/ci/sanitize.sh)"
bash tools/ci/sanitize.sh
# ---- end of hardening -----------------------------------------------------------------

# ---- narrower vectors (issue 3) -------------------------------------------------------
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
      tests/test_ops.py tests/test_numerics.py
  done
fi
# ---- end of narrower vectors ------------------------------------------------------------

echo "== full suite on the compiled backend"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
