#!/usr/bin/env bash
# The op tests against an AddressSanitizer + UndefinedBehaviorSanitizer build of the C++ ops.
#
#   bash tools/ci/sanitize.sh              # build (TERMINATOR_SANITIZE=1), self-test, op tests
#   bash tools/ci/sanitize.sh -k conv      # extra pytest arguments go to the op tests
#
# TERMINATOR_SANITIZE=1 makes terminator/ops/_build.py compile the extension with
# -fsanitize=address,undefined -fno-omit-frame-pointer -g -O1, in its own cache entry.
# Python is not instrumented, so the ASan runtime must be the first library in the
# process: it is LD_PRELOADed, together with libstdc++ (ASan's __cxa_throw interceptor
# needs the real one at start-up; without it the first C++ exception thrown from our
# code, e.g. a ValueError from an argument check, trips an ASan CHECK). UBSan's runtime
# is linked into the extension and loads with it.
#
# Leak detection is off (detect_leaks=0): CPython and torch keep interned objects,
# caches and module state alive until exit on purpose, so LeakSanitizer would report
# thousands of "leaks" that are not bugs and not ours. Every other report counts: ASan
# writes its reports to files (log_path); UBSan (gcc 12's libubsan ignores log_path when
# loaded by a library) writes to stderr, which is kept, so the tests run with -s (pytest's
# capture would swallow a report printed just before halt_on_error stops the process).
# Any report file, any "runtime error:" / "AddressSanitizer" line on stderr, or a crash,
# fails this script.
#
# Before the tests, a self-test compiles a small library with the same flags and checks
# that an out-of-bounds read and a signed overflow in it are reported, so a broken setup
# (no runtime, wrong preload, options ignored) cannot pass silently.
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
CC_FOR_RUNTIME=${CC_FOR_RUNTIME:-gcc}

runtime() {  # the real path of a runtime library the compiler ships, or nothing
  local path
  path=$("$CC_FOR_RUNTIME" -print-file-name="$1" 2>/dev/null || true)
  if [ -n "$path" ] && [ -e "$path" ]; then readlink -f "$path"; fi
}
ASAN_LIB=$(runtime libasan.so)
if [ -z "$ASAN_LIB" ] && [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
  # gcc's sanitizer runtimes come with libgcc-N-dev (libasan, libubsan) on Debian/Ubuntu.
  echo "sanitize: installing the ASan runtime (libgcc-$("$CC_FOR_RUNTIME" -dumpversion | cut -d. -f1)-dev)"
  apt-get install -y -qq "libgcc-$("$CC_FOR_RUNTIME" -dumpversion | cut -d. -f1)-dev" >/dev/null \
    || { apt-get update -qq && apt-get install -y -qq "libgcc-$("$CC_FOR_RUNTIME" -dumpversion | cut -d. -f1)-dev" >/dev/null; }
  ASAN_LIB=$(runtime libasan.so)
fi
STDCXX_LIB=$(runtime libstdc++.so.6)
if [ -z "$ASAN_LIB" ]; then
  echo "sanitize: no ASan runtime ($CC_FOR_RUNTIME -print-file-name=libasan.so); install gcc's libasan (apt-get install libasan8 or gcc)" >&2
  exit 1
fi

LOGS=$(mktemp -d "${TMPDIR:-/tmp}/terminator-sanitize.XXXXXX")
# Only the Python processes get the runtimes (SAN prefix); the shell's own tools (tee,
# find, the compiler of the self-test) run as usual.
PRELOAD="$ASAN_LIB${STDCXX_LIB:+:$STDCXX_LIB}${LD_PRELOAD:+:$LD_PRELOAD}"
SAN=(env "LD_PRELOAD=$PRELOAD")
export ASAN_OPTIONS="detect_leaks=0:halt_on_error=1:log_path=$LOGS/asan${ASAN_OPTIONS:+:$ASAN_OPTIONS}"
export UBSAN_OPTIONS="halt_on_error=1:print_stacktrace=1:log_path=$LOGS/ubsan${UBSAN_OPTIONS:+:$UBSAN_OPTIONS}"
export TERMINATOR_SANITIZE=1 TERMINATOR_BACKEND=cpp
echo "sanitize: LD_PRELOAD=$PRELOAD"
echo "sanitize: reports go to $LOGS"

OUTPUT=$(mktemp "${TMPDIR:-/tmp}/terminator-sanitize-output.XXXXXX")
reports() {
  find "$LOGS" -type f | sort
  if grep -qE "runtime error:|ERROR: AddressSanitizer|AddressSanitizer: CHECK failed" "$OUTPUT"; then echo "$OUTPUT"; fi
}
fail_on_reports() {
  local found
  found=$(reports)
  if [ -n "$found" ]; then
    echo "sanitize: FAILED: $(echo "$found" | wc -l) sanitizer report(s):" >&2
    for f in $found; do echo "---- $f" >&2; head -60 "$f" >&2; done
    exit 1
  fi
}

echo "== sanitizer build"
"${SAN[@]}" "$PY" -m terminator build 2> >(tee -a "$OUTPUT" >&2)
fail_on_reports

echo "== sanitizer self-test (a deliberate out-of-bounds read and signed overflow must be reported)"
SELF=$(mktemp -d "${TMPDIR:-/tmp}/terminator-sanitize-self.XXXXXX")
trap 'rm -rf "$SELF"' EXIT
cat > "$SELF/bad.cpp" <<'EOF'
#include <climits>
#include <cstdlib>
extern "C" int read_past_end(int n) {
  int* a = static_cast<int*>(std::malloc(n * sizeof(int)));
  for (int i = 0; i < n; ++i) a[i] = i;
  volatile int v = a[n];  // one past the end
  std::free(a);
  return v;
}
extern "C" int overflow(int x) { return INT_MAX - 1 + x; }  // x = 5: signed overflow
EOF
read -r -a FLAGS <<< "$(TERMINATOR_BACKEND=reference "$PY" -c 'from terminator.ops import _build; print(" ".join(_build.SANITIZE_FLAGS))')"
"${CXX:-c++}" "${FLAGS[@]}" -shared -fPIC "$SELF/bad.cpp" -o "$SELF/bad.so"
for fn in read_past_end overflow; do
  rm -rf "$SELF/logs" && mkdir "$SELF/logs"
  if ASAN_OPTIONS="detect_leaks=0:log_path=$SELF/logs/asan" UBSAN_OPTIONS="halt_on_error=1" \
     "${SAN[@]}" "$PY" -c "import ctypes, sys; ctypes.CDLL(sys.argv[1]).$fn(5)" "$SELF/bad.so" 2>"$SELF/logs/stderr"; then
    echo "sanitize: self-test FAILED: $fn ran to the end without a sanitizer stopping it" >&2; exit 1
  fi
  if ! grep -qE "heap-buffer-overflow|signed integer overflow" "$SELF"/logs/* 2>/dev/null; then
    echo "sanitize: self-test FAILED: no report for $fn" >&2; exit 1
  fi
  echo "sanitize: self-test $fn: reported ($(grep -ohE "heap-buffer-overflow|signed integer overflow" "$SELF"/logs/* | head -1))"
done
rm -rf "$SELF"

echo "== op tests under ASan + UBSan"
# gradcheck/gradgradcheck (thousands of tiny calls; the same paths as the reference
# tests) and torch.compile (compiles and runs Inductor's code, not ours) are left out.
status=0
TERMINATOR_FUZZ_CASES=${TERMINATOR_FUZZ_CASES:-150} "${SAN[@]}" "$PY" -m pytest -q -s -p no:cacheprovider \
  tests/test_ops.py tests/test_errors.py tests/test_numerics.py tests/test_fuzz.py tests/test_network_ops.py \
  -k "not gradcheck and not gradgradcheck and not torch_compile and not second_derivatives" "$@" 2> >(tee -a "$OUTPUT" >&2) || status=$?
fail_on_reports
if [ "$status" -ne 0 ]; then
  echo "sanitize: the op tests failed under the sanitizers (exit status $status)" >&2
  exit "$status"
fi
rm -rf "$LOGS" "$OUTPUT"
echo "sanitize: passed, no sanitizer reports"
