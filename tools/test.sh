#!/usr/bin/env bash
# The test command (README "Tests"; CI runs it through .ci/run).
#   1. a virtual environment in .venv with the CPU build of torch and this package
#   2. `terminator build`: compiles the C++ ops on the fly; in CI it must be the C++ backend
#   3. every .cu compiled with nvcc against the CUDA build of torch's headers
#   4. the op tests again on the pure-PyTorch fallback (TERMINATOR_BACKEND=reference)
#   5. the op tests under AddressSanitizer + UBSan (tools/sanitize.sh)
#   6. the whole suite on the compiled backend
set -euo pipefail
cd "$(dirname "$0")/.."

bash tools/setup_venv.sh "test,train"

echo "== terminator build"
.venv/bin/python -m terminator build

echo "== CUDA compile check (every .cu with nvcc, sm_80 and sm_90)"
if command -v nvcc >/dev/null || [ "${CI:-}" = true ]; then
  bash tools/check_cuda.sh
else
  echo "skipped: nvcc not on PATH (CI requires it)"
fi

echo "== op tests on the reference backend"
TERMINATOR_BACKEND=reference .venv/bin/python -m pytest -q -p no:cacheprovider tests/test_ops.py tests/test_errors.py

# ---- hardening (issue 7) ------------------------------------------------------------
# The op tests (and a fuzz sample) against an ASan + UBSan build of the C++ ops; any
# sanitizer report fails CI. The fuzz sample (tests/test_fuzz.py), determinism and
# build-fault tests run in the full suite below; tests/test_large_index.py is opt-in.
echo "== op tests under AddressSanitizer + UndefinedBehaviorSanitizer (tools/sanitize.sh)"
bash tools/sanitize.sh
# ---- end of hardening -----------------------------------------------------------------

echo "== full suite on the compiled backend"
.venv/bin/python -m pytest -q -p no:cacheprovider "$@"
