"""Fake kernels and autograd for the compiled ops ``torch.ops.terminator.*``.

The schema and the device kernels come from C++ (csrc/terminator.cpp); this file
makes the ops traceable (fake kernels for torch.compile / export) and
differentiable. First derivatives use the compiled backward ops; derivatives of
those (double backward, e.g. gradient penalties) go through the reference.
"""

from __future__ import annotations

import torch

from . import _checks, reference

_ops = None  # torch.ops.terminator once registered


def _no_grad_x(z: torch.Tensor) -> torch.Tensor:
    return z.new_empty((0,))


# ---- fake kernels: shapes only, contiguous like the real kernels' outputs -------


def _fake_global(k, z, x, mode):
    _checks.check_global_args(k, z, x, mode)
    return z.new_empty(z.shape)


def _fake_global_backward(grad_y, k, z, x, mode):
    _checks.check_global_args(k, z, x, mode)
    grad_x = z.new_empty(z.shape) if x is not None else _no_grad_x(z)
    return k.new_empty(k.shape), z.new_empty(z.shape), grad_x


def _fake_conv(x, w, algo):
    _checks.check_conv_args(x, w, algo)
    return x.new_empty(x.shape)


def _fake_conv_backward(grad_y, x, w, algo):
    _checks.check_conv_args(x, w, algo)
    return x.new_empty(x.shape), w.new_empty(w.shape)


# ---- first derivatives: the compiled backward ops -------------------------------


def _setup_global(ctx, inputs, output):
    k, z, x, mode = inputs
    ctx.mode = mode
    ctx.save_for_backward(k, z, x)


def _backward_global(ctx, grad_y):
    k, z, x = ctx.saved_tensors
    grad_k, grad_z, grad_x = _ops.hyperzzw_global_backward(grad_y, k, z, x, ctx.mode)
    return grad_k, grad_z, (grad_x if x is not None else None), None


def _setup_conv(ctx, inputs, output):
    x, w, algo = inputs
    ctx.algo = algo
    ctx.save_for_backward(x, w)


def _backward_conv(ctx, grad_y):
    x, w = ctx.saved_tensors
    grad_x, grad_w = _ops.hyperkernel_conv_backward(grad_y, x, w, ctx.algo)
    return grad_x, grad_w, None


# ---- second derivatives: differentiate the reference's first derivatives --------


def _reference_vjp_of_vjp(forward, tensors, grad_y, grads_of_outputs):
    """d/d(grad_y, *tensors) of <grads_of_outputs, vjp(forward, tensors, grad_y)>.

    ``tensors`` may contain None (an absent optional input); the matching entry of
    ``grads_of_outputs`` is ignored and its gradient is None.
    """
    with torch.enable_grad():
        grad_y = grad_y.detach().requires_grad_()
        inputs = [t.detach().requires_grad_() if t is not None else None for t in tensors]
        present = [t for t in inputs if t is not None]
        first = torch.autograd.grad(forward(*inputs), present, grad_y, create_graph=True)
        outer = [g for t, g in zip(inputs, grads_of_outputs) if t is not None]
        pairs = [(f, g) for f, g in zip(first, outer) if g is not None and f.requires_grad]
        if not pairs:
            return (None,) * (1 + len(inputs))
        second = iter(
            torch.autograd.grad(
                [f for f, _ in pairs], [grad_y, *present], [g for _, g in pairs], allow_unused=True
            )
        )
        grad_grad_y = next(second)
        return (grad_grad_y, *[next(second) if t is not None else None for t in inputs])


def _setup_global_backward(ctx, inputs, output):
    grad_y, k, z, x, mode = inputs
    ctx.mode = mode
    ctx.save_for_backward(grad_y, k, z, x)


def _backward_global_backward(ctx, grad_grad_k, grad_grad_z, grad_grad_x):
    grad_y, k, z, x = ctx.saved_tensors
    forward = lambda k, z, x: reference.hyperzzw_global(k, z, x, mode=ctx.mode)  # noqa: E731
    grads = _reference_vjp_of_vjp(forward, (k, z, x), grad_y, (grad_grad_k, grad_grad_z, grad_grad_x))
    return (*grads, None)


def _setup_conv_backward(ctx, inputs, output):
    grad_y, x, w, algo = inputs
    ctx.save_for_backward(grad_y, x, w)


def _backward_conv_backward(ctx, grad_grad_x, grad_grad_w):
    grad_y, x, w = ctx.saved_tensors
    grads = _reference_vjp_of_vjp(reference.conv_same, (x, w), grad_y, (grad_grad_x, grad_grad_w))
    return (*grads, None)


def register() -> None:
    """Registers fakes and autograd once the compiled library is loaded."""
    global _ops
    if _ops is not None:
        return
    _ops = torch.ops.terminator
    for name, fake, setup, backward in (
        ("hyperzzw_global", _fake_global, _setup_global, _backward_global),
        ("hyperzzw_global_backward", _fake_global_backward, _setup_global_backward, _backward_global_backward),
        ("hyperkernel_conv", _fake_conv, _setup_conv, _backward_conv),
        ("hyperkernel_conv_backward", _fake_conv_backward, _setup_conv_backward, _backward_conv_backward),
    ):
        qualname = f"terminator::{name}"
        torch.library.register_fake(qualname)(fake)
        torch.library.register_autograd(qualname, backward, setup_context=setup)
