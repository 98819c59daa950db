"""Fake kernels, autograd, forward-mode AD, vmap and autocast for ``torch.ops.terminator.*``.

The schema and the device kernels come from C++ (csrc/terminator.cpp); this file makes
the ops traceable (fake kernels for torch.compile / export) and usable under every
autodiff mode and transform:

* reverse mode: each forward op's backward is its own compiled op; derivatives of those
  (double backward) are written with the same ops;
* forward mode (``torch.autograd.forward_ad``, ``torch.func.jvp``, ``jacfwd``): every op
  is multilinear in its tensor arguments, so its tangent is a sum of calls of the op
  itself, one per dual input;
* ``torch.func`` (grad, vjp, jacrev, vmap): the autograd kernel is an
  ``autograd.Function`` with ``setup_context`` and ``generate_vmap_rule``, and every op
  has a batching rule that folds the vmapped dimension into the batch and runs the op
  once;
* autocast: the forward ops run in the autocast dtype, as PyTorch's convolutions do.

The global product ``G(k, z, x) = (k ⊙ z) ⊗ x`` is linear in each of k, z, x separately
(with ``x = z`` it is quadratic in z); ``C(x, w) = conv_same(x, w)`` is bilinear. The
backward ops are the gradients of ``<grad_y, G>`` and ``<grad_y, C>``, so each of their
outputs is linear in each argument it depends on.
"""

from __future__ import annotations

import torch
import torch.autograd.forward_ad as fwAD
from torch import _C
from torch._functorch.utils import unwrap_dead_wrappers

from . import _checks

_ops = None  # torch.ops.terminator once registered
_lib = None  # the torch.library.Library holding this file's registrations


class _OpFunction(torch.autograd.Function):
    """An autograd.Function whose ``apply`` skips, outside torch.func transforms, what
    ``Function.apply`` does for them: binding the arguments to ``forward``'s signature with
    ``inspect`` on every call (every argument here is positional, none has a default).
    _network.py's ``_ReverseModeFunction`` skips it always: transforms never reach those."""

    @classmethod
    def apply(cls, *args):
        if _C._are_functorch_transforms_active():
            return super().apply(*args)
        return super(torch.autograd.Function, cls).apply(*unwrap_dead_wrappers(args))


def _empty_grad_x(z: torch.Tensor) -> torch.Tensor:
    return z.new_empty((0,))


def _added(*terms):
    """Sum of the terms that are not None (None if all are)."""
    total = None
    for term in terms:
        if term is not None:
            total = term if total is None else total + term
    return total


# ---- fake kernels: shapes only, contiguous like the real kernels' outputs -------


def _fake_global(k, z, x, mode):
    _checks.check_global_args(k, z, x, mode)
    return z.new_empty(z.shape)


def _fake_global_backward(grad_y, k, z, x, mode):
    _checks.check_global_args(k, z, x, mode)
    grad_x = z.new_empty(z.shape) if x is not None else _empty_grad_x(z)
    return k.new_empty(k.shape), z.new_empty(z.shape), grad_x


def _fake_conv(x, w, algo):
    _checks.check_conv_args(x, w, algo)
    return x.new_empty(x.shape)


def _fake_conv_backward(grad_y, x, w, algo):
    _checks.check_conv_args(x, w, algo)
    return x.new_empty(x.shape), w.new_empty(w.shape)


# ---- the ops and their derivatives, written with the ops -------------------------


# Derivative formulas call the ops through their autograd.Functions (Python, before the
# dispatcher), which is where torch.func transforms handle them.


def _global(k, z, x, mode):
    """``G(k, z, x)`` (``x = None``: ``x = z``), differentiable."""
    return _GlobalFunction.apply(k, z, x, mode)


def _global_grads(grad_y, k, z, x, mode):
    """``(grad_k, grad_z, grad_x or None)`` of ``<grad_y, G(k, z, x)>``, differentiable."""
    grad_k, grad_z, grad_x = _GlobalBackwardFunction.apply(grad_y, k, z, x, mode)
    return grad_k, grad_z, (grad_x if x is not None else None)


def _conv(x, w, algo):
    return _ConvFunction.apply(x, w, algo)


def _conv_grads(grad_y, x, w, algo):
    return _ConvBackwardFunction.apply(grad_y, x, w, algo)


def _global_tangent(k, z, x, dk, dz, dx, mode):
    """Tangent of ``G(k, z, x)`` along ``(dk, dz, dx)`` (None = no tangent)."""
    if x is None:  # G(k, z, z): z in both roles
        x, dx = z, dz
    return _added(
        _global(dk, z, x, mode) if dk is not None else None,
        _global(k, dz, x, mode) if dz is not None else None,
        _global(k, z, dx, mode) if dx is not None else None,
    )


def _conv_tangent(x, w, dx, dw, algo):
    """Tangent of ``C(x, w)`` along ``(dx, dw)`` (None = no tangent)."""
    return _added(
        _conv(dx, w, algo) if dx is not None else None,
        _conv(x, dw, algo) if dw is not None else None,
    )


class _GlobalFunction(_OpFunction):
    """``hyperzzw_global``: backward by its compiled backward op, tangents by itself."""

    generate_vmap_rule = True

    @staticmethod
    def forward(k, z, x, mode):
        with _C._AutoDispatchBelowAutograd():
            return _ops.hyperzzw_global(k, z, x, mode)

    @staticmethod
    def setup_context(ctx, inputs, output):
        k, z, x, mode = inputs
        ctx.mode = mode
        ctx.save_for_backward(k, z, x)
        ctx.save_for_forward(k, z, x)

    @staticmethod
    def backward(ctx, grad_y):
        k, z, x = ctx.saved_tensors
        return (*_global_grads(grad_y, k, z, x, ctx.mode), None)

    @staticmethod
    def jvp(ctx, dk, dz, dx, _):
        k, z, x = ctx.saved_tensors
        return _global_tangent(k, z, x, dk, dz, dx, ctx.mode)


class _GlobalBackwardFunction(_OpFunction):
    """``hyperzzw_global_backward``: its derivatives, both modes, from the ops."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_y, k, z, x, mode):
        with _C._AutoDispatchBelowAutograd():
            return _ops.hyperzzw_global_backward(grad_y, k, z, x, mode)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_y, k, z, x, mode = inputs
        ctx.mode = mode
        ctx.save_for_backward(grad_y, k, z, x)
        ctx.save_for_forward(grad_y, k, z, x)

    @staticmethod
    def backward(ctx, gg_k, gg_z, gg_x):
        # <(gg_k, gg_z, gg_x), grads(grad_y, k, z, x)> = <grad_y, tangent of G along gg>.
        grad_y, k, z, x = ctx.saved_tensors
        mode = ctx.mode
        gg_x = gg_x if x is not None else None
        grad_grad_y = _global_tangent(k, z, x, gg_k, gg_z, gg_x, mode)
        u = z if x is None else x  # what Ŵ acts on
        # G(gg_k, z, u): gradients into z (and into x, or z's second role).
        # G(k, gg_z, u): into k and u.   G(k, z, gg_x or gg_z if x is None): into k and z.
        grad_k = grad_z = grad_x = None
        if gg_k is not None:
            _, g_z, g_u = _global_grads(grad_y, gg_k, z, u, mode)
            grad_z = _added(grad_z, g_z)
            grad_x = _added(grad_x, g_u)
        if gg_z is not None:
            g_k, _, g_u = _global_grads(grad_y, k, gg_z, u, mode)
            grad_k = _added(grad_k, g_k)
            grad_x = _added(grad_x, g_u)
        second = gg_z if x is None else gg_x
        if second is not None:
            g_k, g_z, _ = _global_grads(grad_y, k, z, second, mode)
            grad_k = _added(grad_k, g_k)
            grad_z = _added(grad_z, g_z)
        if x is None:  # u is z: its gradient belongs to z
            grad_z, grad_x = _added(grad_z, grad_x), None
        return grad_grad_y, grad_k, grad_z, grad_x, None

    @staticmethod
    def jvp(ctx, d_grad_y, dk, dz, dx, _):
        grad_y, k, z, x = ctx.saved_tensors
        mode = ctx.mode
        # With x given, grad_k does not depend on k, grad_z not on z, grad_x not on x, and
        # each is linear in the others. x = None is x = z with both roles' gradients summed.
        u, du = (z, dz) if x is None else (x, dx)
        tangents = [None, None, None]
        for args, used in (
            ((d_grad_y, k, z, u), (True, True, True)),
            ((grad_y, dk, z, u), (False, True, True)),
            ((grad_y, k, dz, u), (True, False, True)),
            ((grad_y, k, z, du), (True, True, False)),
        ):
            if args[0] is None or any(a is None for a in args[1:]):
                continue
            grads = _global_grads(*args, mode)
            tangents = [_added(t, g) if use else t for t, g, use in zip(tangents, grads, used)]
        d_k, d_z, d_u = (t if t is not None else torch.zeros_like(like) for t, like in zip(tangents, (k, z, u)))
        if x is None:
            return d_k, d_z + d_u, _empty_grad_x(z)
        return d_k, d_z, d_u


class _ConvFunction(_OpFunction):
    """``hyperkernel_conv``: backward by its compiled backward op, tangents by itself."""

    generate_vmap_rule = True

    @staticmethod
    def forward(x, w, algo):
        with _C._AutoDispatchBelowAutograd():
            return _ops.hyperkernel_conv(x, w, algo)

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, w, algo = inputs
        ctx.algo = algo
        ctx.save_for_backward(x, w)
        ctx.save_for_forward(x, w)

    @staticmethod
    def backward(ctx, grad_y):
        x, w = ctx.saved_tensors
        grad_x, grad_w = _conv_grads(grad_y, x, w, ctx.algo)
        return grad_x, grad_w, None

    @staticmethod
    def jvp(ctx, dx, dw, _):
        x, w = ctx.saved_tensors
        return _conv_tangent(x, w, dx, dw, ctx.algo)


class _ConvBackwardFunction(_OpFunction):
    """``hyperkernel_conv_backward``: its derivatives, both modes, from the ops."""

    generate_vmap_rule = True

    @staticmethod
    def forward(grad_y, x, w, algo):
        with _C._AutoDispatchBelowAutograd():
            return _ops.hyperkernel_conv_backward(grad_y, x, w, algo)

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_y, x, w, algo = inputs
        ctx.algo = algo
        ctx.save_for_backward(grad_y, x, w)
        ctx.save_for_forward(grad_y, x, w)

    @staticmethod
    def backward(ctx, gg_x, gg_w):
        # <(gg_x, gg_w), grads(grad_y, x, w)> = <grad_y, C(gg_x, w) + C(x, gg_w)>.
        grad_y, x, w = ctx.saved_tensors
        grad_grad_y = _conv_tangent(x, w, gg_x, gg_w, ctx.algo)
        grad_x = _conv_grads(grad_y, x, gg_w, ctx.algo)[0] if gg_w is not None else None
        grad_w = _conv_grads(grad_y, gg_x, w, ctx.algo)[1] if gg_x is not None else None
        return grad_grad_y, grad_x, grad_w, None

    @staticmethod
    def jvp(ctx, d_grad_y, dx, dw, _):
        grad_y, x, w = ctx.saved_tensors
        algo = ctx.algo
        # grad_x is linear in grad_y and w (not x); grad_w in grad_y and x (not w).
        grad_x = grad_w = None
        if d_grad_y is not None:
            grad_x, grad_w = _conv_grads(d_grad_y, x, w, algo)
        if dw is not None:
            grad_x = _added(grad_x, _conv_grads(grad_y, x, dw, algo)[0])
        if dx is not None:
            grad_w = _added(grad_w, _conv_grads(grad_y, dx, w, algo)[1])
        return (
            grad_x if grad_x is not None else torch.zeros_like(x),
            grad_w if grad_w is not None else torch.zeros_like(w),
        )


def _forward_ad_active() -> bool:
    return fwAD._current_level >= 0


def call(function, op, *args):
    """Runs ``op`` for the public wrappers: through ``function`` where torch.func or
    forward-mode AD need it (they handle autograd.Functions before the dispatcher), else
    as the op (one opaque call for torch.compile and export)."""
    if not torch.compiler.is_compiling() and (_C._are_functorch_transforms_active() or _forward_ad_active()):
        return function.apply(*args)
    return op(*args)


def _autograd_kernel(name, op, function):
    """The op's Autograd kernel: ``function`` when a derivative can be asked for."""

    def kernel(*args):
        if _C._are_functorch_transforms_active():
            public = "hyperzzw_global" if name.startswith("hyperzzw_global") else "hyperkernel_conv"
            raise RuntimeError(
                f"torch.ops.terminator.{name} was called directly inside a torch.func transform "
                f"(grad, vjp, jvp, jacrev, jacfwd, vmap over grad), which cannot differentiate it "
                f"there; call terminator.ops.{public}, which supports every transform"
            )
        if (_C.is_grad_enabled() and _C._any_requires_grad(*args)) or _forward_ad_active():
            return function.apply(*args)
        with _C._AutoDispatchBelowAutograd():
            return op(*args)

    return kernel


# ---- vmap: the vmapped dimension folded into the batch ---------------------------


def _fold_activation(t, bdim, size):
    """``t (B, C, *S)`` with vmapped dim ``bdim`` (or None) → ``(V·B, C, *S)``."""
    if bdim is None:
        return t.unsqueeze(0).expand(size, *t.shape).flatten(0, 1)
    return t.movedim(bdim, 0).flatten(0, 1)


def _fold_kernel(t, bdim, size, batch, spatial_dims, keep_shared):
    """A kernel ``(C, *K)`` / ``(1, C, *K)`` / ``(B, C, *K)`` for the folded batch ``V·B``.

    Returns ``(kernel, unfold)``. With ``keep_shared`` (forward ops), a kernel shared by
    the batch and not vmapped stays as it is (``unfold`` None). Anything else becomes per
    sample, ``(V·B, C, *K)``, and ``unfold(grad)`` sums the gradient of that back to the
    kernel's own shape per vmapped example (a shared kernel's gradient must not sum across
    the vmapped dimension).
    """
    unbatched_form = t.dim() - (bdim is not None) == spatial_dims + 1  # (C, *K)
    if bdim is None:
        if keep_shared and (unbatched_form or t.shape[0] == 1):
            return t, None
        t = t.unsqueeze(0)
    else:
        t = t.movedim(bdim, 0)
    if unbatched_form:
        t = t.unsqueeze(1)
    own_batch = t.shape[1]
    folded = t.expand(size, batch, *t.shape[2:]).flatten(0, 1)

    def unfold(grad):
        grad = grad.unflatten(0, (size, batch))  # (V, B, C, *K)
        if unbatched_form:
            return grad.sum(1)
        return grad.sum(1, keepdim=True) if own_batch != batch else grad

    return folded, unfold


def _unfold(t, size):
    return t.unflatten(0, (size, -1))


def _vmap_global(info, in_dims, k, z, x, mode):
    kd, zd, xd, _ = in_dims
    size = info.batch_size
    z_f = _fold_activation(z, zd, size)
    batch = z_f.shape[0] // size
    x_f = _fold_activation(x, xd, size) if x is not None else None
    k_f, _ = _fold_kernel(k, kd, size, batch, z_f.dim() - 2, keep_shared=True)
    return _unfold(_ops.hyperzzw_global(k_f, z_f, x_f, mode), size), 0


def _vmap_global_backward(info, in_dims, grad_y, k, z, x, mode):
    gd, kd, zd, xd, _ = in_dims
    size = info.batch_size
    z_f = _fold_activation(z, zd, size)
    batch = z_f.shape[0] // size
    spatial_dims = z_f.dim() - 2
    x_f = _fold_activation(x, xd, size) if x is not None else None
    k_f, unfold = _fold_kernel(k, kd, size, batch, spatial_dims, keep_shared=False)
    gy_f = _fold_activation(grad_y, gd, size)
    grad_k, grad_z, grad_x = _ops.hyperzzw_global_backward(gy_f, k_f, z_f, x_f, mode)
    grad_x, x_dim = (_unfold(grad_x, size), 0) if x is not None else (grad_x, None)
    return (unfold(grad_k), _unfold(grad_z, size), grad_x), (0, 0, x_dim)


def _vmap_conv(info, in_dims, x, w, algo):
    xd, wd, _ = in_dims
    size = info.batch_size
    x_f = _fold_activation(x, xd, size)
    w_f, _ = _fold_kernel(w, wd, size, x_f.shape[0] // size, x_f.dim() - 2, keep_shared=True)
    return _unfold(_ops.hyperkernel_conv(x_f, w_f, algo), size), 0


def _vmap_conv_backward(info, in_dims, grad_y, x, w, algo):
    gd, xd, wd, _ = in_dims
    size = info.batch_size
    x_f = _fold_activation(x, xd, size)
    batch = x_f.shape[0] // size
    spatial_dims = x_f.dim() - 2
    w_f, unfold = _fold_kernel(w, wd, size, batch, spatial_dims, keep_shared=False)
    grad_x, grad_w = _ops.hyperkernel_conv_backward(_fold_activation(grad_y, gd, size), x_f, w_f, algo)
    return (_unfold(grad_x, size), unfold(grad_w)), (0, 0)


# ---- autocast: the forward ops in the autocast dtype -------------------------------


def autocast_inputs(device_type: str, *tensors):
    """``tensors`` cast to the autocast dtype when autocast is on for ``device_type``.

    The policy of PyTorch's convolutions: floating inputs run in the lower precision.
    """
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def _autocast_kernel(op, device_type):
    key = getattr(_C.DispatchKey, "Autocast" + _C._dispatch_key_for_device(device_type))

    def kernel(*args):
        args = autocast_inputs(device_type, *args)
        with _C._ExcludeDispatchKeyGuard(_C.DispatchKeySet(key)):
            return op(*args)

    return kernel


def register() -> None:
    """Registers fakes, autograd, vmap and autocast once the compiled library is loaded."""
    global _ops, _lib
    if _ops is not None:
        return
    _ops = torch.ops.terminator
    _lib = torch.library.Library("terminator", "IMPL")
    for name, fake, function, vmap in (
        ("hyperzzw_global", _fake_global, _GlobalFunction, _vmap_global),
        ("hyperzzw_global_backward", _fake_global_backward, _GlobalBackwardFunction, _vmap_global_backward),
        ("hyperkernel_conv", _fake_conv, _ConvFunction, _vmap_conv),
        ("hyperkernel_conv_backward", _fake_conv_backward, _ConvBackwardFunction, _vmap_conv_backward),
    ):
        op = getattr(_ops, name).default
        torch.library.register_fake(f"terminator::{name}", fake, lib=_lib)
        _lib.impl(name, _autograd_kernel(name, op, function), "Autograd")
        torch.library.register_vmap(f"terminator::{name}", vmap, lib=_lib)
    for name in ("hyperzzw_global", "hyperkernel_conv"):
        op = getattr(_ops, name).default
        for device_type in ("cpu", "cuda"):
            key = "Autocast" + _C._dispatch_key_for_device(device_type)
            _lib.impl(name, _autocast_kernel(op, device_type), key)


def global_product(k, z, x, mode):
    """The compiled ``hyperzzw_global`` for the public wrapper (checked arguments)."""
    return call(_GlobalFunction, _ops.hyperzzw_global, k, z, x, mode)


def conv(x, w, algo):
    """The compiled ``hyperkernel_conv`` for the public wrapper (checked arguments)."""
    return call(_ConvFunction, _ops.hyperkernel_conv, x, w, algo)
