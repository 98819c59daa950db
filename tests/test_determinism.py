"""Determinism on CPU: bitwise-identical outputs and gradients for repeated calls, and
across thread counts (docs/NUMERICS.md, "Determinism").

The direct, elementwise and matmul kernels (planes up to 64×64) sum in a fixed order
(each output, and each gradient of a shared kernel or each of its batch chunks, is
summed by one thread in index order, the chunks added in order), so their results do not
depend on the thread count. The FFT path (pocketfft
through ATen) is measured by ``python tests/test_determinism.py --threads N``, which
prints a SHA-256 per output and gradient; the test below compares the thread counts in
subprocesses.

Sizes are large enough that every parallel loop is split into several tasks.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys

if __name__ == "__main__":  # run as a script: this checkout's package, not an installed one
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import pytest
import torch

import terminator.ops as ops

# (name, op, kwargs, input shapes) with k/w forms that take each parallel code path:
# a shared kernel (gradient summed over the batch) and per-sample kernels.
B, C, H, W = 4, 16, 40, 40
CASES = {
    "global dot, shared k": ("global", {"mode": "dot"}, [(C, H, W), (B, C, H, W), None]),
    "global dot, per-sample k, x": ("global", {"mode": "dot"}, [(B, C, H, W), (B, C, H, W), (B, C, H, W)]),
    "global matmul, shared k": ("global", {"mode": "matmul"}, [(1, C, H, W), (B, C, H, W), None]),
    "global matmul, per-sample k, x": ("global", {"mode": "matmul"}, [(B, C, H, W), (B, C, H, W), (B, C, H, W)]),
    "global conv, shared k": ("global", {"mode": "conv"}, [(C, H, W), (B, C, H, W), None]),
    "global conv 1D, per-sample k, x": ("global", {"mode": "conv"}, [(B, C, 784), (B, C, 784), (B, C, 784)]),
    "conv direct 3x3, shared w": ("conv", {"algo": "direct"}, [(B, C, H, W), (C, 3, 3)]),
    "conv direct 7x7, per-sample w": ("conv", {"algo": "direct"}, [(B, C, H, W), (B, C, 7, 7)]),
    "conv direct 1D 9, shared w": ("conv", {"algo": "direct"}, [(B, C, 784), (1, C, 9)]),
    "conv fft 15x15, shared w": ("conv", {"algo": "fft"}, [(B, C, H, W), (C, 15, 15)]),
    "conv fft 1D 101, per-sample w": ("conv", {"algo": "fft"}, [(B, C, 784), (B, C, 101)]),
    "conv auto 31x31, shared w": ("conv", {"algo": "auto"}, [(B, C, H, W), (1, C, 31, 31)]),
    "conv fft 32x32 full, 3x5 planes": ("conv", {"algo": "fft"}, [(3, 5, 32, 32), (5, 32, 32)]),
    "global conv 64x64, shared k": ("global", {"mode": "conv"}, [(C, 64, 64), (B, C, 64, 64), None]),
    # Fewer than 32 channels: a shared kernel's gradient sums the batch in chunks.
    "global matmul, shared k, 2 channels": ("global", {"mode": "matmul"}, [(2, 24, 24), (42, 2, 24, 24), None]),
    "conv direct 5x5, shared w, 1 channel": ("conv", {"algo": "direct"}, [(42, 1, 20, 20), (1, 5, 5)]),
    # 3×3 takes both gradients in one pass per channel, in the same batch chunks.
    "conv direct 3x3, shared w, 2 channels": ("conv", {"algo": "direct"}, [(42, 2, 20, 20), (2, 3, 3)]),
}
# Designed to be thread-count independent (fixed summation order in our own kernels).
THREAD_INDEPENDENT = [name for name in CASES if "fft" not in name and "auto" not in name and "global conv" not in name]
DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16}


def run_case(name: str, dtype: torch.dtype, seed: int = 0) -> list[torch.Tensor]:
    """Output and every input's gradient for one case (fixed inputs per seed)."""
    op, kwargs, shapes = CASES[name]
    gen = torch.Generator().manual_seed(seed)
    inputs = [
        torch.randn(s, generator=gen, dtype=torch.float64).to(dtype).requires_grad_() if s else None for s in shapes
    ]
    if op == "global":
        y = ops.hyperzzw_global(*inputs, **kwargs)
    else:
        y = ops.hyperkernel_conv(*inputs, **kwargs)
    grad_y = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(dtype)
    grads = torch.autograd.grad(y, [t for t in inputs if t is not None], grad_y)
    return [y.detach(), *grads]


def digest(tensors: list[torch.Tensor]) -> list[str]:
    return [hashlib.sha256(t.contiguous().view(torch.uint8).numpy().tobytes()).hexdigest()[:16] for t in tensors]


def _bitwise_equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    return (
        a.dtype == b.dtype
        and a.shape == b.shape
        and torch.equal(a.contiguous().view(torch.uint8), b.contiguous().view(torch.uint8))
    )


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", list(CASES))
def test_repeated_calls_are_bitwise_identical(name, dtype):
    first = run_case(name, DTYPES[dtype])
    for _ in range(2):
        again = run_case(name, DTYPES[dtype])
        for label, a, b in zip(["output", "grad 0", "grad 1", "grad 2"], first, again):
            assert _bitwise_equal(a, b), f"{name} {dtype}: {label} differs between two identical calls"


def thread_digests(threads: int, dtype: str = "float32") -> dict[str, list[str]]:
    """Digests of every case computed in a fresh process with ``threads`` intra-op threads."""
    out = subprocess.run(
        [sys.executable, __file__, "--threads", str(threads), "--dtype", dtype],
        capture_output=True,
        text=True,
        timeout=900,
        env=dict(os.environ, OMP_NUM_THREADS=str(threads)),
    )
    assert out.returncode == 0, out.stderr[-3000:]
    return json.loads(out.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_thread_count_does_not_change_our_kernels(compiled):
    """1, 2 and 3 threads (the machine may have fewer cores: the split still differs)."""
    runs = {n: thread_digests(n) for n in (1, 2, 3)}
    for name in THREAD_INDEPENDENT:
        assert runs[1][name] == runs[2][name] == runs[3][name], (
            f"{name}: results depend on the thread count: {[runs[n][name] for n in (1, 2, 3)]}"
        )


def main() -> int:
    parser = argparse.ArgumentParser(description="SHA-256 digests of every case's output and gradients")
    parser.add_argument("--threads", type=int, required=True)
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if ops.backend().name == "reference":
        print(f"the compiled backend is not active: {ops.backend().reason}", file=sys.stderr)
        return 1
    result = {name: digest(run_case(name, DTYPES[args.dtype])) for name in CASES}
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
