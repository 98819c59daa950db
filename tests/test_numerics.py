"""Numerics at the edges (docs/NUMERICS.md): NaN/Inf propagation per path, and the FFT
path's error at the largest sizes the tolerances were measured for."""

from __future__ import annotations

import math

import pytest
import torch
from helpers import assert_close_scaled

import terminator.ops as ops
from terminator.ops import reference

NAN, INF = math.nan, math.inf


def _grads(fn, tensors, grad_y):
    leaves = [t.clone().requires_grad_() for t in tensors]
    y = fn(*leaves)
    return [y.detach(), *torch.autograd.grad(y, leaves, grad_y)]


def _classes(t: torch.Tensor) -> torch.Tensor:
    """0 finite, 1 NaN, 2 +Inf, 3 -Inf."""
    return t.isnan() * 1 + (t == INF) * 2 + (t == -INF) * 3


@pytest.mark.parametrize("form", ["C", "BC"])
def test_dot_mode_puts_nan_and_inf_exactly_where_the_reference_does(form):
    gen = torch.Generator().manual_seed(0)
    z = torch.randn(3, 2, 7, 5, generator=gen, dtype=torch.float64)
    k = torch.randn((2, 7, 5) if form == "C" else (3, 2, 7, 5), generator=gen, dtype=torch.float64)
    z[0, 1, 2, 3], z[2, 0, 0, 0], k[..., 1, 1] = NAN, INF, -INF
    k[..., 4, 4] = 0.0
    z[1, 1, 4, 4] = INF  # 0 · Inf = NaN
    grad_y = torch.randn(z.shape, generator=gen, dtype=torch.float64)
    ours = _grads(lambda k, z: ops.hyperzzw_global(k, z, mode="dot"), (k, z), grad_y)
    ref = _grads(lambda k, z: reference.hyperzzw_global(k, z, mode="dot"), (k, z), grad_y)
    for a, b, what in zip(ours, ref, ["y", "grad k", "grad z"]):
        assert torch.equal(_classes(a), _classes(b)), what
        finite = a.isfinite()
        torch.testing.assert_close(a[finite], b[finite], msg=what)


@pytest.mark.parametrize("algo", ["direct", "fft"])
def test_a_nan_in_x_reaches_the_outputs_whose_window_holds_it(algo):
    x = torch.randn(2, 2, 12, dtype=torch.float64)
    w = torch.randn(2, 3, dtype=torch.float64)
    x[0, 0, 5] = NAN
    y = ops.hyperkernel_conv(x, w, algo=algo)
    expected = reference.conv_same(x, w).isnan()
    assert bool(y.isnan()[expected].all())  # every output the reference makes NaN
    if algo == "direct" or ops.backend().name == "reference":  # the reference has one algorithm
        assert torch.equal(y.isnan(), expected)  # and no other
    else:
        assert bool(y[0, 0].isnan().all()) and not bool(y[1:].isnan().any()) and not bool(y[0, 1].isnan().any())
        # the FFT spreads it over its own plane, no further


def test_fft_path_spreads_an_inf_in_the_kernel_over_the_plane_only():
    x = torch.randn(2, 3, 9, 9, dtype=torch.float64)
    w = torch.randn(3, 4, 4, dtype=torch.float64)
    w[1, 0, 0] = INF
    y = ops.hyperkernel_conv(x, w, algo="fft")
    assert bool((~y[:, 1].isfinite()).all())
    assert bool(y[:, [0, 2]].isfinite().all())


# A NaN/Inf in the kernel over the zero padding, or an Inf in x, must not turn a
# gradient element that the reference computes as finite into NaN.
def test_direct_input_gradient_keeps_a_nan_kernel_tap_off_the_border():
    x = torch.randn(1, 1, 6, dtype=torch.float64)
    w = torch.tensor([[NAN, 1.0, 2.0]], dtype=torch.float64)
    grad_y = torch.ones(1, 1, 6, dtype=torch.float64)
    _, gx, _ = _grads(lambda x, w: ops.hyperkernel_conv(x, w, algo="direct"), (x, w), grad_y)
    _, gx_ref, _ = _grads(reference.conv_same, (x, w), grad_y)
    assert gx_ref[0, 0, 5].item() == 3.0  # w[1]·gy[4] + w[2]·gy[3]: the NaN tap never meets x[5]
    assert torch.equal(gx.isnan(), gx_ref.isnan())


@pytest.mark.parametrize("shared", [False, True])
def test_direct_2d_kernel_with_a_nan_tap_keeps_padding_out_of_the_input_gradient(shared):
    """A NaN tap sends the CPU kernel to its careful loop, which skips the taps over the
    border (one of the two readings docs/NUMERICS.md allows; the reference multiplies them)."""
    if ops.backend().name == "reference":
        pytest.skip("about the compiled CPU kernel (the reference is the other reading)")
    x = torch.randn(2, 2, 5, 6, dtype=torch.float64)
    w = torch.randn(*(() if shared else (2,)), 2, 3, 3, dtype=torch.float64)
    w[(..., 0, 0, 0) if shared else (0, 0, 0, 0)] = NAN
    grad_y = torch.ones(2, 2, 5, 6, dtype=torch.float64)
    y, gx, _ = _grads(lambda x, w: ops.hyperkernel_conv(x, w, algo="direct"), (x, w), grad_y)
    y_ref, gx_ref, _ = _grads(reference.conv_same, (x, w), grad_y)
    assert bool(y_ref.isnan()[y.isnan()].all())  # ours: NaN only where the reference is
    assert bool(y[0, 0, 0].isfinite().all())  # top row: the NaN tap hangs over the border only
    assert torch.equal(gx.isnan(), gx_ref.isnan())
    assert bool(gx_ref[0, 0, -1, -1].isfinite())  # the NaN tap never meets the last pixel


def test_direct_weight_gradient_keeps_an_inf_in_x_to_the_taps_that_meet_it():
    x = torch.randn(1, 1, 5, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    x[0, 0, 3] = INF
    w = torch.randn(1, 5, dtype=torch.float64)
    grad_y = torch.ones(1, 1, 5, dtype=torch.float64)
    _, _, gw = _grads(lambda x, w: ops.hyperkernel_conv(x, w, algo="direct"), (x, w), grad_y)
    _, _, gw_ref = _grads(reference.conv_same, (x, w), grad_y)
    assert bool(gw_ref[0, 0].isfinite())  # tap 0 only ever meets x[0..2]
    assert torch.equal(_classes(gw), _classes(gw_ref))


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("size", [3, 7])
def test_direct_weight_gradient_with_inf_and_nan_in_x_or_grad_y_matches_the_reference(size, shared):
    """The weight gradient sums whole vectors first and checks x only when a sum is not
    finite (csrc/cpu/conv_direct_backward.cpp, weight_grad_plane): an inf or NaN in x, in
    the last column (where the vector lanes past the row's end meet it) or the first, or in
    grad_y (x finite), or none, in different planes of one call."""
    gen = torch.Generator().manual_seed(3)
    # W = 19: lanes past the row's end exist at every vector width (16, 8, 4, 2 doubles).
    x = torch.randn(3, 2, 9, 19, dtype=torch.float64, generator=gen)
    grad_y = torch.randn(3, 2, 9, 19, dtype=torch.float64, generator=gen)
    grad_y[:, :, :, 10:] = 0.0  # zeros meeting the inf: 0 · inf must give NaN only where the reference has it
    x[0, 1, 4, 18] = INF
    x[1, 0, 0, 0] = NAN
    grad_y[2, 1, 3, 5] = -INF
    w = torch.randn(*((2,) if shared else (3, 2)), size, size, dtype=torch.float64, generator=gen)
    _, _, gw = _grads(lambda x, w: ops.hyperkernel_conv(x, w, algo="direct"), (x, w), grad_y)
    _, _, gw_ref = _grads(reference.conv_same, (x, w), grad_y)
    assert torch.equal(_classes(gw), _classes(gw_ref))
    finite = gw_ref.isfinite()
    assert bool(finite.any())
    torch.testing.assert_close(gw[finite], gw_ref[finite])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("spatial", [(4096,), (128, 128)])
def test_fft_error_at_full_kernel_size_stays_within_the_tolerance(spatial, dtype):
    """The largest sizes docs/NUMERICS.md measured; float64 reference: our direct kernel
    (F.conv would unfold 128^4 elements), which matches F.conv to ~1e-16."""
    gen = torch.Generator().manual_seed(2)
    x = torch.randn(1, 2, *spatial, generator=gen, dtype=torch.float64).to(dtype)
    w = torch.randn(2, *spatial, generator=gen, dtype=torch.float64).to(dtype)
    got = ops.hyperkernel_conv(x, w, algo="fft")
    expected = ops.hyperkernel_conv(x.double(), w.double(), algo="direct")
    scale = ops.hyperkernel_conv(x.double().abs(), w.double().abs(), algo="direct")
    assert_close_scaled(got, expected, scale, dtype, f"fft {spatial} {dtype}")


# ---- float16 / bfloat16 accumulate in float32 (docs/OPS.md) ---------------------------------------
# The general tolerances (tests/helpers.py) allow eight roundings, which a kernel that
# accumulated 3×3 or 9×9 windows in half precision would still meet (measured: 0.16 to 0.35
# of the bound). A long direct sum separates the two: accumulated in float32 the result is
# off by one final rounding (unit roundoff u), accumulated in half it is off by many.
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8}


def _half_accumulated(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What a kernel accumulating in x's half dtype computes: tap by tap, rounding each sum."""
    import torch.nn.functional as F

    sizes = w.shape[1:]
    pads = []
    for k in reversed(sizes):
        pads += [(k - 1) // 2, k - 1 - (k - 1) // 2]
    xp = F.pad(x.float(), pads)
    acc = torch.zeros(x.shape, dtype=x.dtype)
    for q in torch.cartesian_prod(*[torch.arange(k) for k in sizes]).view(-1, len(sizes)).tolist():
        window = xp[(..., *[slice(o, o + n) for o, n in zip(q, x.shape[2:])])]
        acc = (acc.float() + (w[(slice(None), *q)].float().view(1, -1, *[1] * len(sizes)) * window)).to(x.dtype)
    return acc


def _within_one_rounding(got, x, w, dtype) -> bool:
    ref = reference.conv_same(x.double(), w.double())
    scale = reference.conv_same(x.double().abs(), w.double().abs())
    u = UNIT_ROUNDOFF[dtype]
    return bool(((got.double() - ref).abs() <= 2 * u * ref.abs() + u * 1e-2 * scale.max()).all())


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("spatial,kernel", [((1, 1, 784), (1, 257)), ((1, 2, 28, 28), (2, 28, 28))])
def test_half_types_accumulate_in_float32(spatial, kernel, dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(spatial, generator=gen, dtype=torch.float64).to(dtype)
    w = (torch.rand(kernel, generator=gen, dtype=torch.float64) / kernel[-1]).to(dtype)  # positive: no cancellation
    x = x.abs()
    assert not _within_one_rounding(_half_accumulated(x, w), x, w, dtype)  # the check has teeth
    for algo in ("direct", "fft"):
        assert _within_one_rounding(ops.hyperkernel_conv(x, w, algo=algo), x, w, dtype), algo
