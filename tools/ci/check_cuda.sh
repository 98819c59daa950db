#!/usr/bin/env bash
# Compiles every .cu file under csrc/ with nvcc for sm_80 and sm_90 against the
# headers of a CUDA build of PyTorch, without linking or running anything: the
# check that the CUDA kernels build on a machine that has nvcc but no GPU (and
# a CPU-only torch). Exits non-zero, naming the file, on the first error.
#
#   bash tools/ci/check_cuda.sh            # uses nvcc from PATH or /usr/local/cuda/bin
#
# Environment:
#   TERMINATOR_CUDA_TORCH   torch version whose headers to use (default 2.14.1)
#   TERMINATOR_CUDA_HEADERS a torch/include directory to use instead of fetching one
#   PYTHON                  interpreter for pip and the Python include dir
#                           (default: .venv/bin/python if present, else python3)
#   NVCC                    the nvcc to use
#   CUDA_CHECK_JOBS         files compiled in parallel (default: number of cores)
set -euo pipefail

root="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
cd "$root"

torch_version="${TERMINATOR_CUDA_TORCH:-2.14.1}"
if [[ -n "${PYTHON:-}" ]]; then
  python="$PYTHON"
elif [[ -x .venv/bin/python ]]; then
  python=.venv/bin/python
else
  python=python3
fi

nvcc="${NVCC:-}"
if [[ -z "$nvcc" ]]; then
  if command -v nvcc >/dev/null 2>&1; then
    nvcc="$(command -v nvcc)"
  elif [[ -x /usr/local/cuda/bin/nvcc ]]; then
    nvcc=/usr/local/cuda/bin/nvcc
  else
    echo "check_cuda: nvcc not found (set NVCC or put it on PATH)" >&2
    exit 1
  fi
fi

# ---- the CUDA build's headers: torch/include from the torch wheel, cached ----
if [[ -n "${TERMINATOR_CUDA_HEADERS:-}" ]]; then
  include="$TERMINATOR_CUDA_HEADERS"
else
  cache="${XDG_CACHE_HOME:-$HOME/.cache}/terminator-hyperzzw/cuda-headers-$torch_version"
  include="$cache/torch/include"
  if [[ ! -f "$cache/.complete" ]]; then
    echo "check_cuda: fetching torch==$torch_version headers into $cache"
    download="$(mktemp -d)"
    trap 'rm -rf "$download"' EXIT
    "$python" -m pip download --quiet "torch==$torch_version" --no-deps \
      --only-binary=:all: -d "$download"
    wheel="$(ls "$download"/torch-*.whl | head -n 1)"
    rm -rf "$cache"
    mkdir -p "$cache"
    # Only torch/include/ (the wheel is ~0.5 GB, the headers ~60 MB).
    "$python" - "$wheel" "$cache" <<'PY'
import sys, zipfile
wheel, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as z:
    z.extractall(dest, [n for n in z.namelist() if n.startswith("torch/include/")])
PY
    rm -rf "$download"
    trap - EXIT
    touch "$cache/.complete"
  fi
fi
if [[ ! -f "$include/c10/cuda/CUDAGuard.h" ]]; then
  echo "check_cuda: $include has no c10/cuda/CUDAGuard.h (not a CUDA build's headers?)" >&2
  exit 1
fi
py_include="$("$python" -c 'import sysconfig; print(sysconfig.get_path("include"))')"

# ---- compile every .cu -------------------------------------------------------
mapfile -t sources < <(find csrc -name '*.cu' | sort)
if [[ ${#sources[@]} -eq 0 ]]; then
  echo "check_cuda: no .cu files under csrc/" >&2
  exit 1
fi

out="$(mktemp -d)"
trap 'rm -rf "$out"' EXIT

# The flags torch.utils.cpp_extension passes to nvcc (COMMON_NVCC_FLAGS, c++20,
# -fPIC), the extension define, and the two architectures we target.
flags=(
  -std=c++20 -O2
  -DTORCH_API_INCLUDE_EXTENSION_H -DTORCH_EXTENSION_NAME=terminator_cuda_check
  -D__CUDA_NO_HALF_OPERATORS__ -D__CUDA_NO_HALF_CONVERSIONS__
  -D__CUDA_NO_BFLOAT16_CONVERSIONS__ -D__CUDA_NO_HALF2_OPERATORS__
  --expt-relaxed-constexpr
  --compiler-options -fPIC
  -gencode arch=compute_80,code=sm_80
  -gencode arch=compute_90,code=sm_90
  -I csrc
  -isystem "$include"
  -isystem "$include/torch/csrc/api/include"
  -isystem "$py_include"
)

echo "check_cuda: $("$nvcc" --version | tail -n 1)"
echo "check_cuda: torch $torch_version headers, sm_80 + sm_90, ${#sources[@]} file(s)"
jobs="${CUDA_CHECK_JOBS:-$(nproc)}"
start=$SECONDS
failed=()
pids=()
for i in "${!sources[@]}"; do
  src="${sources[$i]}"
  (
    t0=$SECONDS
    if "$nvcc" "${flags[@]}" -c "$src" -o "$out/$i.o" >"$out/$i.log" 2>&1; then
      echo "check_cuda: ok    $src ($((SECONDS - t0)) s)"
      # Warnings, if any, are shown but do not fail the check.
      if [[ -s "$out/$i.log" ]]; then cat "$out/$i.log"; fi
    else
      echo "check_cuda: ERROR $src" >&2
      cat "$out/$i.log" >&2
      exit 1
    fi
  ) &
  pids+=("$!:$src")
  # Keep at most $jobs compilations running.
  while [[ $(jobs -rp | wc -l) -ge $jobs ]]; do sleep 1; done
done
for entry in "${pids[@]}"; do
  if ! wait "${entry%%:*}"; then failed+=("${entry#*:}"); fi
done
if [[ ${#failed[@]} -gt 0 ]]; then
  echo "check_cuda: FAILED to compile: ${failed[*]}" >&2
  exit 1
fi
echo "check_cuda: all ${#sources[@]} file(s) compiled in $((SECONDS - start)) s"
