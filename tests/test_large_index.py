"""64-bit indexing: outputs past 2^31 elements (opt-in: TERMINATOR_LARGE_TESTS=1).

Each test holds 8 to 13 GiB (bfloat16 tensors of 2^31 + a few elements) and runs for
minutes on 2 cores, so it is not in CI:

    TERMINATOR_LARGE_TESTS=1 .venv/bin/python -m pytest -m large tests/test_large_index.py

An int32 somewhere in the kernels' index arithmetic would wrap at 2^31 elements and read
or write the wrong place (or crash); the tests compare every plane past that point with
the reference, chunk by chunk (in float32: products of bfloat16 values are exact there,
and float32's rounding is far below bfloat16's tolerance). The gradient checks pass
``grad_y = z`` (or ``x``) to the backward op, so no third 4 GiB tensor is needed.
Measured: 3 tests, peak resident memory 14 GB.
"""

from __future__ import annotations

import gc
import os

import pytest
import torch
from helpers import assert_close_scaled

import terminator.ops as ops
from terminator.ops import reference

pytestmark = [
    pytest.mark.large,
    pytest.mark.skipif(
        os.environ.get("TERMINATOR_LARGE_TESTS") != "1",
        reason="needs ~12 GiB and minutes; set TERMINATOR_LARGE_TESTS=1",
    ),
]

DTYPE = torch.bfloat16
PAST = 2**31 + 2**10  # elements: just past what an int32 can index
CHUNK = 2**24


def _randn_(t: torch.Tensor, seed: int) -> torch.Tensor:
    """Fills t with normals chunk by chunk (no full-size float32 temporary)."""
    gen = torch.Generator().manual_seed(seed)
    for part in t.view(-1).split(CHUNK):
        part.normal_(generator=gen)
    return t


def _check_chunks(actual: torch.Tensor, expected_fn, scale_fn, what: str) -> None:
    """Compares actual (flat, split in chunks) with expected_fn(i0, i1) / scale_fn(i0, i1)."""
    flat = actual.view(-1)
    for i0 in range(0, flat.numel(), CHUNK * 2):
        i1 = min(flat.numel(), i0 + CHUNK * 2)
        assert_close_scaled(flat[i0:i1], expected_fn(i0, i1), scale_fn(i0, i1), DTYPE, f"{what}[{i0}:{i1}]")


@pytest.fixture(autouse=True)
def _free_memory():
    yield
    gc.collect()


def test_dot_mode_with_batch_offsets_past_2_31():
    """z (2, 1, L) with 2·L > 2^31 and a shared k (1, L): sample 1 starts past 2^30,
    ends past 2^31; forward and the backward op (shared-kernel gradient summed over b)."""
    L = PAST // 2
    z = _randn_(torch.empty(2, 1, L, dtype=DTYPE), 1)
    k = _randn_(torch.empty(1, L, dtype=DTYPE), 2)
    assert z.numel() > 2**31
    y = ops.hyperzzw_global(k, z, mode="dot")
    kf, zf = k.view(-1), z.view(-1)

    def k_at(i0, i1):  # k for flat positions of z
        return torch.cat([kf[a % L : (a % L) + (b - a)] for a, b in _split_at(i0, i1, L)]).float()

    _check_chunks(
        y,
        lambda i0, i1: k_at(i0, i1) * zf[i0:i1].float() ** 2,
        lambda i0, i1: (k_at(i0, i1) * zf[i0:i1].float() ** 2).abs(),
        "y",
    )
    del y
    gc.collect()
    # grad_y = z: dk = Σ_b z^3, dz = 2 z k z.
    gk, gz, gx = torch.ops.terminator.hyperzzw_global_backward(z, k, z, None, "dot")
    assert gx.numel() == 0 and gk.shape == k.shape and gz.shape == z.shape
    _check_chunks(
        gz,
        lambda i0, i1: 2 * k_at(i0, i1) * zf[i0:i1].float() ** 2,
        lambda i0, i1: (2 * k_at(i0, i1) * zf[i0:i1].float() ** 2).abs(),
        "grad z",
    )
    z0, z1 = z[0, 0], z[1, 0]
    _check_chunks(
        gk,
        lambda i0, i1: z0[i0:i1].float() ** 3 + z1[i0:i1].float() ** 3,
        lambda i0, i1: z0[i0:i1].float().abs() ** 3 + z1[i0:i1].float().abs() ** 3,
        "grad k",
    )


def _split_at(i0: int, i1: int, period: int):
    """[i0, i1) cut at multiples of period."""
    while i0 < i1:
        end = min(i1, (i0 // period + 1) * period)
        yield i0, end
        i0 = end


def test_dot_mode_with_a_single_plane_past_2_31():
    """One (b, c) plane of more than 2^31 elements: positions inside a plane past 2^31."""
    z = _randn_(torch.empty(1, 1, PAST, dtype=DTYPE), 3)
    k = _randn_(torch.empty(1, PAST, dtype=DTYPE), 4)
    y = ops.hyperzzw_global(k, z, mode="dot")
    kf, zf = k.view(-1), z.view(-1)
    _check_chunks(
        y,
        lambda i0, i1: kf[i0:i1].float() * zf[i0:i1].float() ** 2,
        lambda i0, i1: (kf[i0:i1].float() * zf[i0:i1].float() ** 2).abs(),
        "y",
    )


def test_direct_conv_with_plane_offsets_past_2_31():
    """x (2, C, 256, 256) with more than 2^31 elements, a shared 3×3 kernel: forward,
    input gradient and the shared kernel's gradient (summed over the batch)."""
    H = W = 256
    C = PAST // (2 * H * W) + 1
    x = _randn_(torch.empty(2, C, H, W, dtype=DTYPE), 5)
    w = _randn_(torch.empty(C, 3, 3, dtype=DTYPE), 6)
    assert x.numel() > 2**31
    y = ops.hyperkernel_conv(x, w, algo="direct")
    planes = 2**24 // (H * W)  # channels per reference chunk

    def ref(t, kernel, c0, c1):
        return reference.conv_same(t[:, c0:c1].float(), kernel[c0:c1].float())

    for c0 in range(0, C, planes):
        c1 = min(C, c0 + planes)
        assert_close_scaled(y[:, c0:c1], ref(x, w, c0, c1), ref(x.abs(), w.abs(), c0, c1), DTYPE, f"y[:, {c0}:{c1}]")
    del y
    gc.collect()
    gx, gw = torch.ops.terminator.hyperkernel_conv_backward(x, x, w, "direct")  # grad_y = x
    flipped = w.flip(-1, -2)
    for c0 in range(0, C, planes):
        c1 = min(C, c0 + planes)
        # Even-free 3×3: the input gradient is the correlation with the flipped kernel.
        assert_close_scaled(
            gx[:, c0:c1], ref(x, flipped, c0, c1), ref(x.abs(), flipped.abs(), c0, c1), DTYPE, f"grad x[:, {c0}:{c1}]"
        )
    expected_gw = torch.empty(C, 3, 3, dtype=torch.float64)
    scale_gw = torch.empty_like(expected_gw)
    for c0 in range(0, C, planes):
        c1 = min(C, c0 + planes)
        xs = x[:, c0:c1].float()
        expected_gw[c0:c1] = _weight_grad(xs, xs)  # grad_y = x
        scale_gw[c0:c1] = _weight_grad(xs.abs(), xs.abs())
    assert_close_scaled(gw, expected_gw, scale_gw, DTYPE, "grad w")


def _weight_grad(x: torch.Tensor, grad_y: torch.Tensor) -> torch.Tensor:
    """The reference gradient of a shared 3×3 kernel (it does not depend on the kernel)."""
    w = torch.zeros(x.shape[1], 3, 3, dtype=x.dtype, requires_grad=True)
    (g,) = torch.autograd.grad(reference.conv_same(x, w), [w], grad_y)
    return g
