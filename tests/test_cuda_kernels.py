"""The CUDA kernels (csrc/cuda/kernels.cu), verified without a GPU.

The per-thread logic of every CUDA kernel lives in csrc/device/*.h as plain
functions of (block, thread, grid) coordinates. tests/cuda_harness/emulate.cpp
compiles those headers with the host compiler and runs every kernel over its
exact launch grid on CPU tensors (threads one after another, phase by phase,
shared memory as a per-block buffer) and registers the result as
``torch.ops.terminator_emulated.*``: the five device kernels on their own, and
the four public ops exactly as the CUDA backend assembles them. This file checks
them against the pure-PyTorch reference on odd shapes (tile edges, primes, 1D as
H = 1, even and odd kernels, shared and per-sample kernels), in every dtype, and
with shrunken launch limits that push small inputs through the code paths of
large ones (grid-stride loops, split reductions, the non-tiled fallback).

On a machine with a CUDA device, ``test_cuda_device_*`` run the real kernels.
That the .cu file compiles for sm_80 / sm_90 is checked by tools/ci/check_cuda.sh.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.util
import os
import re
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

ROOT = Path(__file__).resolve().parents[1]
HARNESS = ROOT / "tests" / "cuda_harness" / "emulate.cpp"

NO_CUDA_REASON = (
    "no CUDA device on this machine; CUDA kernels are verified by compilation "
    "(tools/ci/check_cuda.sh) and by host emulation"
)


def _load_reference():
    """terminator.ops.reference, or the file itself if the package does not import."""
    try:
        from terminator.ops import reference

        return reference
    except Exception:  # the package is mid-change: the reference file stands alone
        spec = importlib.util.spec_from_file_location(
            "_terminator_reference", ROOT / "terminator" / "ops" / "reference.py"
        )
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module


reference = _load_reference()

# ---- building the harness -----------------------------------------------------------


def _build_dir() -> Path:
    cache = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    # One build folder per torch version and checkout; ninja rebuilds on source changes.
    checkout = hashlib.sha256(str(ROOT).encode()).hexdigest()[:10]
    path = cache / "terminator-hyperzzw" / f"cuda-emulation-torch{torch.__version__}-{checkout}"
    path.mkdir(parents=True, exist_ok=True)
    return path


@pytest.fixture(scope="module")
def emu():
    """torch.ops.terminator_emulated, built once per test session (~15 s cold)."""
    from torch.utils.cpp_extension import load

    load(
        name="terminator_cuda_emulation",
        sources=[str(HARNESS), str(ROOT / "csrc" / "fft_conv.cpp")],
        extra_include_paths=[str(ROOT / "csrc")],
        extra_cflags=["-O2"],
        build_directory=str(_build_dir()),
        is_python_module=False,
        verbose=False,
    )
    ops = torch.ops.terminator_emulated
    ops.reset_limits()
    yield ops
    ops.reset_limits()


# Launch limits: the CUDA defaults; no shared-memory tiles (the fallback path);
# two blocks for any grid and as many batch slices as samples (grid-stride loops
# over items, split reductions over the batch).
LIMIT_MODES = {
    "default": None,
    "simple": (2**31 - 1, 0, 1 << 17),
    "strided": (2, 16 * 1024, 1 << 40),
}


@contextlib.contextmanager
def limits(emu, mode):
    if LIMIT_MODES[mode] is not None:
        emu.set_limits(*LIMIT_MODES[mode])
    emu.clear_launch_log()
    try:
        yield
    finally:
        emu.reset_limits()


# ---- tolerances ------------------------------------------------------------------------

# |ours − reference| <= RTOL·scale + ATOL·max(scale) elementwise; the reference runs
# in float64 on the same (already rounded) inputs and `scale` is the same computation
# on |inputs|, a bound on the magnitude of what each output sums.
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (1e-5, 2e-6),
    torch.float16: (4e-3, 1e-3),
    torch.bfloat16: (3e-2, 8e-3),
}


def assert_close_scaled(actual, expected, scale, dtype, what):
    rtol, atol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    err = (actual.double() - expected).abs()
    bound = rtol * scale + atol * (scale.max() if scale.numel() else 0.0)
    bad = ~(err <= bound)  # NaN counts as bad
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} elements off ({dtype}); e.g. at {idx}: "
            f"got {actual[idx].item():.8g}, expected {expected[idx].item():.8g}, bound {bound[idx].item():.3g}"
        )


def with_grads(fn, tensors, grad_y):
    """fn(*tensors) and the gradients of <grad_y, fn(...)> for each tensor, in float64."""
    leaves = [t.detach().double().requires_grad_() for t in tensors]
    y = fn(*leaves)
    grads = torch.autograd.grad(y, leaves, grad_y.double(), allow_unused=True)
    return [y.detach()] + [torch.zeros_like(t) if g is None else g for t, g in zip(leaves, grads)]


def reference_and_scale(fn, tensors, grad_y):
    expected = with_grads(fn, tensors, grad_y)
    scale = with_grads(fn, [t.abs() for t in tensors], grad_y.abs())
    return expected, scale


def randn(gen, shape, dtype):
    return torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)


# ---- direct correlation: forward, input gradient, weight gradient ------------------------

# (B, C, H, W, Kh, Kw). 2D tiles are 8 × 32 for W >= 17 and 1D (H = 1) tiles 1 × 256:
# sizes at tile-1, tile, tile+1, smaller than a tile, primes, K = S, even K.
CONV_CASES = [
    (1, 1, 1, 1, 1, 1),
    (2, 3, 8, 32, 3, 3),
    (1, 2, 7, 31, 4, 4),
    (2, 1, 9, 33, 5, 2),
    (3, 2, 13, 17, 13, 6),
    (1, 2, 16, 64, 15, 15),
    (2, 2, 5, 3, 2, 3),
    (1, 2, 40, 2, 6, 1),
    (2, 3, 1, 255, 1, 7),
    (1, 2, 1, 257, 1, 8),
    (2, 1, 1, 256, 1, 1),
    (3, 1, 1, 5, 1, 5),
]


def conv_inputs(case, shared, dtype, seed=0):
    B, C, H, W, Kh, Kw = case
    gen = torch.Generator().manual_seed(seed)
    x = randn(gen, (B, C, H, W), dtype)
    w = randn(gen, (1 if shared else B, C, Kh, Kw), dtype)
    gy = randn(gen, (B, C, H, W), dtype)
    return x, w, gy


def check_direct_kernels(emu, x, w, gy, dtype):
    expected, scale = reference_and_scale(reference.conv_same, [x, w], gy)
    y = emu.conv_direct_forward(x, w)
    gx = emu.conv_direct_input_grad(gy, w)
    gw = emu.conv_direct_weight_grad(gy, x, w)
    for actual, e, s, what in zip([y, gx, gw], expected, scale, ["forward", "input grad", "weight grad"]):
        assert_close_scaled(actual, e, s, dtype, what)


@pytest.mark.parametrize("mode", list(LIMIT_MODES))
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_sample"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c)))
def test_direct_kernels_float64(emu, case, shared, mode):
    x, w, gy = conv_inputs(case, shared, torch.float64)
    with limits(emu, mode):
        check_direct_kernels(emu, x, w, gy, torch.float64)
        log = emu.launch_log()
    correlate = {"simple": "correlate_simple"}.get(mode, "correlate_tiled")
    assert log.count(correlate) == 2, log  # forward and input gradient
    assert "weight_grad" in log
    # Only a shared kernel's batch is ever split, and "strided" splits it fully.
    if not shared or case[0] == 1:
        assert "column_sum" not in log, log
    elif mode == "strided":
        assert "column_sum" in log, log


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_sample"])
@pytest.mark.parametrize("case", CONV_CASES[1:6] + CONV_CASES[8:10], ids=lambda c: "x".join(map(str, c)))
def test_direct_kernels_low_precision(emu, case, shared, dtype):
    x, w, gy = conv_inputs(case, shared, dtype, seed=1)
    check_direct_kernels(emu, x, w, gy, dtype)


def test_direct_kernels_uneven_batch_split(emu):
    """A shared kernel's batch of 5 cut into slices of 2, 2, 1 samples."""
    x, w, gy = conv_inputs((5, 2, 6, 7, 3, 2), True, torch.float64)
    threads = 64  # next power of two >= H·W = 42
    kernels_taps = 2 * 3 * 2
    with limits(emu, "default"):
        emu.set_limits(2**31 - 1, 16 * 1024, 3 * kernels_taps * threads)
        check_direct_kernels(emu, x, w, gy, torch.float64)
        assert "column_sum" in emu.launch_log()


def test_direct_kernels_empty(emu):
    for shared in (True, False):
        x, w, gy = conv_inputs((0, 2, 5, 6, 3, 3), shared, torch.float64)
        w = torch.randn(1 if shared else 0, 2, 3, 3, dtype=torch.float64)
        assert emu.conv_direct_forward(x, w).shape == x.shape
        assert emu.conv_direct_input_grad(gy, w).shape == x.shape
        gw = emu.conv_direct_weight_grad(gy, x, w)
        assert gw.shape == w.shape and (gw == 0).all()


@settings(max_examples=40)
@given(
    B=st.integers(1, 3),
    C=st.integers(1, 3),
    H=st.integers(1, 12),
    W=st.integers(1, 40),
    data=st.data(),
    shared=st.booleans(),
    mode=st.sampled_from(list(LIMIT_MODES)),
)
def test_direct_kernels_random_shapes(emu, B, C, H, W, data, shared, mode):
    Kh = data.draw(st.integers(1, H), label="Kh")
    Kw = data.draw(st.integers(1, W), label="Kw")
    x, w, gy = conv_inputs((B, C, H, W, Kh, Kw), shared, torch.float64, seed=B * 1000 + H * 50 + W)
    with limits(emu, mode):
        check_direct_kernels(emu, x, w, gy, torch.float64)


# ---- hyperzzw_global, mode="dot" ---------------------------------------------------------

# (B, C, N)
DOT_CASES = [(1, 1, 1), (3, 2, 7), (5, 3, 37), (4, 1, 300), (2, 4, 257)]


def dot_reference(k, z, x=None):
    return k * z * (z if x is None else x)


@pytest.mark.parametrize("mode", ["default", "strided"])
@pytest.mark.parametrize("has_x", [True, False], ids=["x", "x_is_z"])
@pytest.mark.parametrize("shared", [True, False], ids=["shared", "per_sample"])
@pytest.mark.parametrize("case", DOT_CASES, ids=lambda c: "x".join(map(str, c)))
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32, torch.bfloat16], ids=str)
def test_global_dot_kernels(emu, dtype, case, shared, has_x, mode):
    B, C, N = case
    gen = torch.Generator().manual_seed(B * 100 + N)
    k = randn(gen, (1 if shared else B, C, N), dtype)
    z, x, gy = (randn(gen, (B, C, N), dtype) for _ in range(3))
    inputs = [k, z, x] if has_x else [k, z]
    expected, scale = reference_and_scale(dot_reference, inputs, gy)
    with limits(emu, mode):
        y = emu.global_dot_forward(k, z, x if has_x else None)
        gk, gz, gx = emu.global_dot_backward(gy, k, z, x if has_x else None)
        log = emu.launch_log()
    actual = [y, gk, gz] + ([gx] if has_x else [])
    for a, e, s, what in zip(actual, expected, scale, ["forward", "grad k", "grad z", "grad x"]):
        assert_close_scaled(a, e, s, dtype, what)
    if not has_x:
        assert gx.numel() == 0
    if not shared or B == 1:
        assert "column_sum" not in log, log
    elif mode == "strided":
        assert "column_sum" in log, log


def test_global_dot_uneven_batch_split(emu):
    """Shared k, batch of 7 in slices of 3, 3, 1."""
    B, C, N = 7, 2, 5
    gen = torch.Generator().manual_seed(3)
    k = randn(gen, (1, C, N), torch.float64)
    z, x, gy = (randn(gen, (B, C, N), torch.float64) for _ in range(3))
    with limits(emu, "default"):
        emu.set_limits(3, 16 * 1024, 3 * C * N)
        gk, gz, gx = emu.global_dot_backward(gy, k, z, x)
        assert "column_sum" in emu.launch_log()
    torch.testing.assert_close(gk, (gy * z * x).sum(0, keepdim=True), rtol=1e-12, atol=1e-12)


def test_global_dot_empty(emu):
    z = torch.randn(0, 3, 4, dtype=torch.float64)
    k = torch.randn(1, 3, 4, dtype=torch.float64)
    assert emu.global_dot_forward(k, z, None).shape == z.shape
    gk, gz, gx = emu.global_dot_backward(z, k, z, z)
    assert gk.shape == k.shape and (gk == 0).all() and gz.shape == z.shape and gx.shape == z.shape


# ---- the public ops as the CUDA backend assembles them (Ops<DeviceKernels>) -----------------


def kernel_of_form(gen, form, B, C, ksize, dtype):
    shape = {"C": (C, *ksize), "1C": (1, C, *ksize), "BC": (B, C, *ksize)}[form]
    return randn(gen, shape, dtype)


def strided_copy(t):
    """Same values, non-contiguous layout (last two dims swapped in memory)."""
    if t.dim() < 2:
        return t
    return t.transpose(-1, -2).contiguous().transpose(-1, -2)


@pytest.mark.parametrize("contiguous", [True, False], ids=["contiguous", "strided"])
@pytest.mark.parametrize("form", ["C", "1C", "BC"])
@pytest.mark.parametrize(
    "spatial,ksize", [((37,), (6,)), ((9, 33), (4, 3)), ((8, 32), (1, 1)), ((5, 7), (5, 7))], ids=str
)
def test_emulated_hyperkernel_conv_op(emu, spatial, ksize, form, contiguous):
    B, C = 2, 3
    gen = torch.Generator().manual_seed(len(spatial) * 10 + ksize[-1])
    x = randn(gen, (B, C, *spatial), torch.float64)
    w = kernel_of_form(gen, form, B, C, ksize, torch.float64)
    gy = randn(gen, (B, C, *spatial), torch.float64)
    if not contiguous:
        x, w, gy = strided_copy(x), strided_copy(w), strided_copy(gy)
    expected, scale = reference_and_scale(reference.conv_same, [x, w], gy)
    for algo in ("direct", "auto", "fft"):
        y = emu.hyperkernel_conv(x, w, algo)
        gx, gw = emu.hyperkernel_conv_backward(gy, x, w, algo)
        for a, e, s, what in zip([y, gx, gw], expected, scale, ["forward", "grad x", "grad w"]):
            tol_dtype = torch.float64 if algo == "direct" else torch.float32  # FFT error is relative to the signal
            assert_close_scaled(a.to(tol_dtype), e, s, tol_dtype, f"{algo} {what}")


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
def test_emulated_hyperkernel_conv_op_low_precision(emu, dtype):
    gen = torch.Generator().manual_seed(7)
    x = randn(gen, (2, 3, 9, 33), dtype)
    w = randn(gen, (3, 3, 3), dtype)
    gy = randn(gen, (2, 3, 9, 33), dtype)
    expected, scale = reference_and_scale(reference.conv_same, [x, w], gy)
    y = emu.hyperkernel_conv(x, w, "direct")
    gx, gw = emu.hyperkernel_conv_backward(gy, x, w, "direct")
    for a, e, s, what in zip([y, gx, gw], expected, scale, ["forward", "grad x", "grad w"]):
        assert_close_scaled(a, e, s, dtype, what)


@pytest.mark.parametrize("has_x", [True, False], ids=["x", "x_is_z"])
@pytest.mark.parametrize("form", ["C", "1C", "BC"])
@pytest.mark.parametrize("spatial", [(40,), (7, 9)], ids=str)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float16], ids=str)
def test_emulated_hyperzzw_global_dot_op(emu, dtype, spatial, form, has_x):
    B, C = 3, 2
    gen = torch.Generator().manual_seed(len(spatial))
    k = kernel_of_form(gen, form, B, C, spatial, dtype)
    z, x, gy = (randn(gen, (B, C, *spatial), dtype) for _ in range(3))
    z = strided_copy(z)
    inputs = [k, z, x] if has_x else [k, z]
    expected, scale = reference_and_scale(lambda *t: reference.hyperzzw_global(*t, mode="dot"), inputs, gy)
    y = emu.hyperzzw_global(k, z, x if has_x else None, "dot")
    gk, gz, gx = emu.hyperzzw_global_backward(gy, k, z, x if has_x else None, "dot")
    actual = [y, gk, gz] + ([gx] if has_x else [])
    for a, e, s, what in zip(actual, expected, scale, ["forward", "grad k", "grad z", "grad x"]):
        assert_close_scaled(a, e, s, dtype, what)


def test_emulated_ops_empty_batch(emu):
    x = torch.randn(0, 3, 6, 5, dtype=torch.float64)
    w = torch.randn(3, 3, 2, dtype=torch.float64)
    assert emu.hyperkernel_conv(x, w, "direct").shape == x.shape
    gx, gw = emu.hyperkernel_conv_backward(x, x, w, "direct")
    assert gx.shape == x.shape and gw.shape == w.shape and (gw == 0).all()
    k = torch.randn(3, 6, 5, dtype=torch.float64)
    assert emu.hyperzzw_global(k, x, None, "dot").shape == x.shape
    gk, gz, _ = emu.hyperzzw_global_backward(x, k, x, None, "dot")
    assert gk.shape == k.shape and (gk == 0).all() and gz.shape == x.shape


# ---- launch shapes for sizes too large to run here -------------------------------------------

MAX_GRID_X = 2**31 - 1


@pytest.mark.parametrize(
    "planes,H,W,K,acc_bytes,tiled",
    [
        (1 << 20, 2048, 2048, 3, 4, True),  # 2^34 tiles: grid capped, blocks loop over items
        (64 * 288, 32, 32, 15, 8, True),  # 15 × 15 tiles in float64
        (64 * 288, 32, 32, 15, 4, True),
        (16, 64, 64, 31, 8, False),  # tile does not fit the shared-memory budget
        (8, 1, 10**6, 9, 4, True),  # 1D, long
        (8, 1, 10**6, 4000, 4, False),
    ],
)
def test_correlate_launch_plan(emu, planes, H, W, K, acc_bytes, tiled):
    Kh = min(K, H)
    got_tiled, grid, bx, by, bz, shared, tile_h, tile_w, items = emu.correlate_plan(planes, H, W, Kh, K, acc_bytes)
    assert bool(got_tiled) == tiled
    assert 1 <= grid <= MAX_GRID_X and bx * by * bz <= 256 and bz == 1
    if tiled:
        assert (bx, by) == (tile_w, tile_h) and shared <= 16 * 1024
        assert items == planes * -(-H // tile_h) * -(-W // tile_w)
        assert shared == ((tile_h + Kh - 1) * (tile_w + K - 1) + Kh * K) * acc_bytes
    else:
        assert shared == 0


def test_weight_grad_launch_plan(emu):
    # A shared kernel over a large batch is split; each slice covers the batch once.
    splits, grid, bx, by, bz, shared, per, items = emu.weight_grad_plan(4096, 3, 224, 224, 7, 7, True, 4)
    assert 1 < splits <= 4096 and splits * per >= 4096 > (splits - 1) * per
    assert items == splits * 3 * 49 and 1 <= grid <= MAX_GRID_X
    assert bx == 256 and by == bz == 1 and shared == 256 * 4
    # Per-sample kernels are never split; a small plane gets a small power-of-two block.
    splits, grid, bx, *_ = emu.weight_grad_plan(64, 288, 4, 4, 3, 3, False, 4)
    assert splits == 1 and bx == 32


# ---- static properties of the CUDA sources --------------------------------------------------


def cuda_sources():
    return sorted((ROOT / "csrc").rglob("*.cu")) + sorted((ROOT / "csrc" / "device").glob("*.h"))


def test_cuda_sources_have_no_atomics():
    """Reductions are ordered (tree sums, slice-ordered column sums): deterministic."""
    for path in cuda_sources():
        calls = re.findall(r"\b\w*[Aa]tomic\w*\s*\(", path.read_text())
        assert not calls, f"{path}: {calls}"


def test_every_cuda_launch_uses_current_stream_and_is_checked():
    for path in sorted((ROOT / "csrc").rglob("*.cu")):
        text = path.read_text()
        launches = re.findall(r"<<<(.*?)>>>", text, flags=re.DOTALL)
        assert launches, f"{path}: no kernel launch found"
        for launch in launches:
            assert "getCurrentCUDAStream()" in launch, f"{path}: {launch} not on the current stream"
        assert text.count("C10_CUDA_KERNEL_LAUNCH_CHECK()") >= len(launches), path
        assert "CUDAGuard" in text, path


# ---- the real kernels, where a CUDA device exists ----------------------------------------------

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason=NO_CUDA_REASON)


@pytest.fixture(scope="module")
def cuda_ops():
    import terminator.ops  # noqa: F401  (loads the compiled library, CUDA kernels included)

    return torch.ops.terminator


DTYPES = [torch.float64, torch.float32, torch.float16, torch.bfloat16]


@needs_cuda
@pytest.mark.parametrize("form", ["1C", "BC"])
@pytest.mark.parametrize("case", CONV_CASES, ids=lambda c: "x".join(map(str, c)))
def test_cuda_device_hyperkernel_conv(cuda_ops, case, form):
    for dtype in DTYPES:
        x, w, gy = conv_inputs(case, form == "1C", dtype, seed=5)
        if x.shape[2] == 1:  # 1D data as (B, C, L)
            x, w, gy = x.squeeze(2), w.squeeze(2), gy.squeeze(2)
        expected, scale = reference_and_scale(reference.conv_same, [x, w], gy)
        dx, dw, dgy = x.cuda(), w.cuda(), gy.cuda()
        for algo in ("direct", "auto"):
            y = cuda_ops.hyperkernel_conv(dx, dw, algo)
            gx, gw = cuda_ops.hyperkernel_conv_backward(dgy, dx, dw, algo)
            # The FFT path's error is relative to the whole signal: float32 bounds for float64.
            tol_dtype = torch.float32 if algo == "auto" and dtype == torch.float64 else dtype
            for a, e, s, what in zip([y, gx, gw], expected, scale, ["forward", "grad x", "grad w"]):
                assert a.is_cuda and a.dtype == dtype
                assert_close_scaled(a.cpu().to(tol_dtype), e, s, tol_dtype, f"{algo} {dtype} {what}")
            # Deterministic: a second run gives the same bits.
            gx2, gw2 = cuda_ops.hyperkernel_conv_backward(dgy, dx, dw, algo)
            assert torch.equal(gx, gx2) and torch.equal(gw, gw2)


@needs_cuda
@pytest.mark.parametrize("form", ["C", "1C", "BC"])
@pytest.mark.parametrize("spatial", [(300,), (7, 9)], ids=str)
def test_cuda_device_hyperzzw_global_dot(cuda_ops, spatial, form):
    B, C = 5, 3
    for dtype in DTYPES:
        for has_x in (True, False):
            gen = torch.Generator().manual_seed(11)
            k = kernel_of_form(gen, form, B, C, spatial, dtype)
            z, x, gy = (randn(gen, (B, C, *spatial), dtype) for _ in range(3))
            inputs = [k, z, x] if has_x else [k, z]
            expected, scale = reference_and_scale(lambda *t: reference.hyperzzw_global(*t, mode="dot"), inputs, gy)
            dk, dz, dgy = k.cuda(), z.cuda(), gy.cuda()
            dx = x.cuda() if has_x else None
            y = cuda_ops.hyperzzw_global(dk, dz, dx, "dot")
            gk, gz, gx = cuda_ops.hyperzzw_global_backward(dgy, dk, dz, dx, "dot")
            actual = [y, gk, gz] + ([gx] if has_x else [])
            for a, e, s, what in zip(actual, expected, scale, ["forward", "grad k", "grad z", "grad x"]):
                assert a.is_cuda
                assert_close_scaled(a.cpu(), e, s, dtype, f"{dtype} has_x={has_x} {what}")
            gk2, *_ = cuda_ops.hyperzzw_global_backward(dgy, dk, dz, dx, "dot")
            assert torch.equal(gk, gk2)


@needs_cuda
def test_cuda_device_empty_batch(cuda_ops):
    x = torch.randn(0, 3, 6, 5, device="cuda")
    w = torch.randn(3, 3, 2, device="cuda")
    assert cuda_ops.hyperkernel_conv(x, w, "direct").shape == x.shape
    gx, gw = cuda_ops.hyperkernel_conv_backward(x, x, w, "direct")
    assert gx.shape == x.shape and gw.shape == w.shape and (gw == 0).all()
