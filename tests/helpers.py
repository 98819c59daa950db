"""Shared by the op tests: building inputs, running ops with gradients, tolerances."""

from __future__ import annotations

import torch

from terminator.ops import reference

# |ours − reference| <= RTOL·scale + ATOL·max(scale), elementwise, where the reference
# runs in float64 on the same (already rounded) inputs and `scale` is the same
# computation on |inputs| (a bound on the magnitude of what each output sums).
# float16/bfloat16 round k⊙z and each op's result once more than float32 does, so
# their bounds allow a few roundings (unit roundoff 2^-11 and 2^-8). The FFT path's
# error is relative to the whole signal, which the ATOL term covers.
TOLERANCES = {
    torch.float64: (1e-12, 1e-12),
    torch.float32: (2e-6, 2e-6),
    torch.float16: (4e-3, 1e-3),
    torch.bfloat16: (3e-2, 8e-3),
}


def kernel_shape(form: str, batch: int, channels: int, spatial: tuple[int, ...]) -> tuple[int, ...]:
    """form: "C" (C, *K), "1C" (1, C, *K) or "BC" (B, C, *K)."""
    return {"C": (channels, *spatial), "1C": (1, channels, *spatial), "BC": (batch, channels, *spatial)}[form]


def run_with_grads(fn, tensors, grad_y):
    """fn(*tensors) and the gradients of <grad_y, fn> for every tensor that is not None."""
    leaves = [t.detach().clone().requires_grad_() if t is not None else None for t in tensors]
    y = fn(*leaves)
    present = [t for t in leaves if t is not None]
    grads = torch.autograd.grad(y, present, grad_y) if y.requires_grad else [torch.zeros_like(t) for t in present]
    return [y.detach(), *grads]


def reference_and_scale(ref_fn, tensors, grad_y):
    """The float64 reference outputs and their magnitude bounds (same op on |inputs|)."""
    as64 = [t.double() if t is not None else None for t in tensors]
    expected = run_with_grads(ref_fn, as64, grad_y.double())
    scale = run_with_grads(ref_fn, [t.abs() if t is not None else None for t in as64], grad_y.double().abs())
    return expected, scale


def assert_close_scaled(actual, expected, scale, dtype, what=""):
    rtol, atol = TOLERANCES[dtype]
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert actual.dtype == dtype, f"{what}: dtype {actual.dtype} != {dtype}"
    err = (actual.double() - expected).abs()
    bound = rtol * scale + atol * (scale.max() if scale.numel() else 0.0)
    bad = ~(err <= bound)  # also catches NaN
    if bad.any():
        idx = bad.nonzero()[0].tolist()
        raise AssertionError(
            f"{what}: {int(bad.sum())} of {err.numel()} elements off; worst error {err.max().item():.3g}, "
            f"e.g. at {idx}: got {actual[tuple(idx)].item():.6g}, expected {expected[tuple(idx)].item():.6g}, "
            f"bound {bound[tuple(idx)].item():.3g} ({dtype})"
        )


def check_against_reference(ours_fn, ref_fn, tensors, names, dtype, seed=0):
    """Compares forward and every gradient of ours_fn with the float64 reference."""
    gen = torch.Generator().manual_seed(seed)
    out_shape = ref_fn(*[t.double() if t is not None else None for t in tensors]).shape
    grad_y = torch.randn(out_shape, generator=gen, dtype=torch.float64).to(dtype)
    actual = run_with_grads(ours_fn, tensors, grad_y)
    expected, scale = reference_and_scale(ref_fn, tensors, grad_y)
    labels = ["output"] + [f"grad of {n}" for n, t in zip(names, tensors) if t is not None]
    for a, e, s, label in zip(actual, expected, scale, labels):
        assert_close_scaled(a, e, s, dtype, label)


def global_inputs(batch, channels, spatial, form, has_x, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    k = make(*kernel_shape(form, batch, channels, spatial))
    z = make(batch, channels, *spatial)
    x = make(batch, channels, *spatial) if has_x else None
    return k, z, x


def conv_inputs(batch, channels, spatial, kernel, form, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    make = lambda *shape: torch.randn(shape, generator=gen, dtype=torch.float64).to(dtype)  # noqa: E731
    return make(batch, channels, *spatial), make(*kernel_shape(form, batch, channels, kernel))


def global_ref(mode):
    return lambda k, z, x: reference.hyperzzw_global(k, z, x, mode=mode)


# `terminator train` arguments for a network and data small enough to train in seconds.
TINY_TRAIN_ARGS = [
    "--set",
    "model.channels=[1,4]",
    "--set",
    "model.factors=[4,2]",
    "--set",
    "model.previous=[[],[]]",
    "--set",
    "model.global_layers=[1,1]",
    "--set",
    "model.dropout=[0,0.05]",
    "--set",
    "model.global_hidden=8",
    "--set",
    "model.local_hidden=8",
    "--set",
    "model.hi_spatial_hidden=8",
    "--set",
    "model.gc_hidden=8",
    "--set",
    "model.hi_channel_hidden=8",
    "--set",
    "limit_train=320",
    "--set",
    "limit_test=120",
    "--set",
    "val_fraction=0.2",
    "--set",
    "plots=false",
    "--set",
    "threads=1",
    "--set",
    "device=cpu",
    "--no-progress",
    "--batch-size",
    "64",
]
