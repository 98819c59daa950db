"""The network's own ops, ``torch.ops.terminator.{pointwise, standardize, rgu, local_kernel}``:
fake kernels, autograd, and the calls the public wrappers make.

Each op fuses one layer of :mod:`terminator.nn` into a single CPU kernel whose backward is
its own op; :mod:`terminator.ops.reference` holds the composition it computes. Derivatives
of the backward ops (double backward) differentiate that composition. Forward-mode AD and
torch.func transforms take the composition too (the public wrappers route them there), so
the raw ops' autograd only serves reverse mode.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import _C

from . import reference
from ._library import _forward_ad_active

_ops = None  # torch.ops.terminator once registered
_lib = None

FUSED_DTYPES = (torch.float32, torch.float64)


def fusable(device_compiled: bool, *tensors: torch.Tensor) -> bool:
    """Whether the fused kernel serves these tensors (else the reference composition does):
    a compiled CPU backend, float32/float64, no autocast, no torch.func transform or
    forward-mode AD (which differentiate the composition)."""
    if not device_compiled or _ops is None:
        return False
    first = tensors[0]
    if first.device.type != "cpu" or first.dtype not in FUSED_DTYPES:
        return False
    if any(t.dtype != first.dtype or t.device != first.device for t in tensors):
        return False
    if torch.is_autocast_enabled("cpu"):
        return False
    if torch.compiler.is_compiling():
        return True
    return not (_C._are_functorch_transforms_active() or _forward_ad_active())


def _reference_vjp_of_vjp(forward, tensors, grad_y, grads_of_outputs):
    """d/d(grad_y, *tensors) of <grads_of_outputs, vjp(forward, tensors, grad_y)>.

    Entries of ``tensors`` may be None (absent); their gradients are None.
    """
    with torch.enable_grad():
        grad_y = grad_y.detach().requires_grad_()
        inputs = [t.detach().requires_grad_() if t is not None else None for t in tensors]
        present = [t for t in inputs if t is not None]
        first = torch.autograd.grad(forward(*inputs), present, grad_y, create_graph=True, allow_unused=True)
        outer = [g for t, g in zip(inputs, grads_of_outputs) if t is not None]
        pairs = [(f, g) for f, g in zip(first, outer) if g is not None and f is not None and f.requires_grad]
        if not pairs:
            return (None,) * (1 + len(inputs))
        second = iter(
            torch.autograd.grad([f for f, _ in pairs], [grad_y, *present], [g for _, g in pairs], allow_unused=True)
        )
        grad_grad_y = next(second)
        return (grad_grad_y, *[next(second) if t is not None else None for t in inputs])


def _no_forward_ad(name):
    def jvp(ctx, *tangents):
        raise NotImplementedError(
            f"forward-mode AD through torch.ops.terminator.{name} is not supported; call "
            f"terminator.ops.{name.removesuffix('_backward')}, which differentiates its reference composition"
        )

    return staticmethod(jvp)


def _autograd_kernel(name, op, differentiable):
    """The op's Autograd kernel: ``differentiable`` (an autograd.Function's apply) when a
    derivative can be asked for, else the op below autograd."""

    def kernel(*args):
        if _C._are_functorch_transforms_active():
            raise RuntimeError(
                f"torch.ops.terminator.{name} was called directly inside a torch.func transform; call "
                f"terminator.ops.{name.removesuffix('_backward')}, which supports every transform"
            )
        if (_C.is_grad_enabled() and _C._any_requires_grad(*args)) or _forward_ad_active():
            return differentiable(*args)
        with _C._AutoDispatchBelowAutograd():
            return op(*args)

    return kernel


class _ReverseModeFunction(torch.autograd.Function):
    """An autograd.Function that torch.func transforms never reach (the wrappers route them
    to the reference composition, and the ops' Autograd kernel refuses them), so ``apply``
    skips what ``Function.apply`` does for them: binding the arguments to ``forward``'s
    signature with ``inspect`` on every call, two thirds of a fused layer's call overhead."""

    @classmethod
    def apply(cls, *args):
        return super(torch.autograd.Function, cls).apply(*args)


def _below_autograd(op, *args):
    with _C._AutoDispatchBelowAutograd():
        return op(*args)


def _backward_op(function, *args):
    """A layer's backward op through ``function`` (its autograd.Function) when autograd
    records it (``create_graph``: double backward), else ``function.forward`` alone: a plain
    backward pass skips building a node nobody differentiates."""
    if _C.is_grad_enabled():
        return function.apply(*args)
    return function.forward(*args)


# ---- pointwise: y = weight · cat(xs) + bias ------------------------------------------------


def _fake_pointwise(xs, weight, bias):
    return xs[0].new_empty((xs[0].shape[0], weight.shape[0], *xs[0].shape[2:]))


def _fake_pointwise_backward(grad_y, xs, weight, has_bias):
    return (
        [x.new_empty(x.shape) for x in xs],
        weight.new_empty(weight.shape),
        weight.new_empty((weight.shape[0],) if has_bias else (0,)),
    )


class _PointwiseFunction(_ReverseModeFunction):
    @staticmethod
    def forward(weight, bias, *xs):
        return _below_autograd(_ops.pointwise.default, list(xs), weight, bias)

    @staticmethod
    def setup_context(ctx, inputs, output):
        weight, bias, *xs = inputs
        ctx.has_bias = bias is not None
        ctx.save_for_backward(weight, *xs)

    @staticmethod
    def backward(ctx, grad_y):
        weight, *xs = ctx.saved_tensors
        *grad_xs, grad_w, grad_b = _backward_op(_PointwiseBackwardFunction, grad_y, weight, ctx.has_bias, *xs)
        return (grad_w, grad_b if ctx.has_bias else None, *grad_xs)

    jvp = _no_forward_ad("pointwise")


class _PointwiseBackwardFunction(_ReverseModeFunction):
    @staticmethod
    def forward(grad_y, weight, has_bias, *xs):
        grad_xs, grad_w, grad_b = _below_autograd(_ops.pointwise_backward.default, grad_y, list(xs), weight, has_bias)
        return (*grad_xs, grad_w, grad_b)  # flat: an autograd.Function's outputs are tensors

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_y, weight, has_bias, *xs = inputs
        ctx.has_bias = has_bias
        ctx.save_for_backward(grad_y, weight, *xs)

    @staticmethod
    def backward(ctx, *grads_of_outputs):
        grad_y, weight, *xs = ctx.saved_tensors
        n = len(xs)
        gg_xs, gg_w, gg_b = grads_of_outputs[:n], grads_of_outputs[n], grads_of_outputs[n + 1]
        forward = lambda w, b, *xs_: reference.pointwise(xs_, w, b)  # noqa: E731
        bias = weight.new_zeros(weight.shape[0]) if ctx.has_bias else None
        grads = _reference_vjp_of_vjp(
            forward, (weight, bias, *xs), grad_y, (gg_w, gg_b if ctx.has_bias else None, *gg_xs)
        )
        return (grads[0], grads[1], None, *grads[3 : 3 + n])

    jvp = _no_forward_ad("pointwise_backward")


def _pointwise_kernel(xs, weight, bias):
    return _PointwiseFunction.apply(weight, bias, *xs)


def _pointwise_backward_kernel(grad_y, xs, weight, has_bias):
    *grad_xs, grad_w, grad_b = _PointwiseBackwardFunction.apply(grad_y, weight, has_bias, *xs)
    return grad_xs, grad_w, grad_b


# ---- standardize: act((x − mean)·rstd) + bias, batch or instance statistics per channel ----


def _fake_standardize(x, batch_channels, running_mean, running_var, use_batch_stats, eps, gelu, bias):
    B, C = x.shape[:2]
    return x.new_empty(x.shape), x.new_empty((2, B, C)), x.new_empty((2, batch_channels.shape[0]))


def _fake_standardize_backward(grad_y, x, stats, batch_channels, use_batch_stats, gelu, has_bias):
    return x.new_empty(x.shape), x.new_empty(() if has_bias else (0,))


class _StandardizeFunction(_ReverseModeFunction):
    """Inputs: x, bias (or None); the rest are not differentiable."""

    @staticmethod
    def forward(x, bias, batch_channels, running_mean, running_var, use_batch_stats, eps, gelu):
        return _below_autograd(
            _ops.standardize.default, x, batch_channels, running_mean, running_var, use_batch_stats, eps, gelu, bias
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        x, bias, batch_channels, running_mean, running_var, use_batch_stats, eps, gelu = inputs
        _, stats, moments = output
        ctx.mark_non_differentiable(stats, moments)
        ctx.flags = (use_batch_stats, gelu, bias is not None)
        ctx.save_for_backward(x, stats, batch_channels)

    @staticmethod
    def backward(ctx, grad_y, _stats, _moments):
        x, stats, batch_channels = ctx.saved_tensors
        use_batch_stats, gelu, has_bias = ctx.flags
        grad_x, grad_bias = _ops.standardize_backward(grad_y, x, stats, batch_channels, use_batch_stats, gelu, has_bias)
        return grad_x, (grad_bias if has_bias else None), None, None, None, None, None, None

    jvp = _no_forward_ad("standardize")


class _StandardizeBackwardFunction(_ReverseModeFunction):
    @staticmethod
    def forward(grad_y, x, stats, batch_channels, use_batch_stats, gelu, has_bias):
        return _below_autograd(
            _ops.standardize_backward.default, grad_y, x, stats, batch_channels, use_batch_stats, gelu, has_bias
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        grad_y, x, stats, batch_channels, use_batch_stats, gelu, has_bias = inputs
        ctx.flags = (use_batch_stats, gelu, has_bias)
        ctx.save_for_backward(grad_y, x, stats, batch_channels)

    @staticmethod
    def backward(ctx, gg_x, gg_bias):
        grad_y, x, stats, batch_channels = ctx.saved_tensors
        use_batch_stats, gelu, has_bias = ctx.flags
        channels = _reference_channels(batch_channels, x.shape[1])

        def forward(x, bias):
            if use_batch_stats:
                return reference.standardize(x, channels, use_batch_stats=True, gelu=gelu, bias=bias)
            # running statistics: x̂ = (x − mean)·rstd with the saved (constant) statistics
            mean, rstd = (
                stats[0].reshape(*stats.shape[1:], *(1,) * (x.dim() - 2)),
                stats[1].reshape(*stats.shape[1:], *(1,) * (x.dim() - 2)),
            )
            y = (x - mean) * rstd
            y = torch.nn.functional.gelu(y) if gelu else y
            return y + bias if bias is not None else y

        bias = x.new_zeros(()) if has_bias else None
        grads = _reference_vjp_of_vjp(forward, (x, bias), grad_y, (gg_x, gg_bias if has_bias else None))
        return grads[0], grads[1], None, None, None, None, None

    jvp = _no_forward_ad("standardize_backward")


def _reference_channels(batch_channels: torch.Tensor, channels: int):
    """The reference's description of a batch-channel index (all, none or groups)."""
    if batch_channels.numel() == 0:
        return "instance"
    if batch_channels.numel() == channels and torch.equal(batch_channels.cpu(), torch.arange(channels)):
        return "batch"
    mask = torch.ones(channels, dtype=torch.bool)
    mask[batch_channels.cpu()] = False
    instance = torch.arange(channels)[mask].to(batch_channels.device)
    order = torch.empty(channels, dtype=torch.long)
    order[torch.cat([batch_channels.cpu(), instance.cpu()])] = torch.arange(channels)
    return reference.ChannelGroups(batch_channels, instance, order.to(batch_channels.device))


def _standardize_kernel(x, batch_channels, running_mean, running_var, use_batch_stats, eps, gelu, bias):
    return _StandardizeFunction.apply(x, bias, batch_channels, running_mean, running_var, use_batch_stats, eps, gelu)


def _standardize_backward_kernel(grad_y, x, stats, batch_channels, use_batch_stats, gelu, has_bias):
    return _StandardizeBackwardFunction.apply(grad_y, x, stats, batch_channels, use_batch_stats, gelu, has_bias)


# ---- rgu: the recursive gated unit ---------------------------------------------------------


def _fake_rgu(u, *weights):
    return u.new_empty(u.shape)


def _fake_rgu_backward(grad_r, u, *weights):
    return [u.new_empty(u.shape), *[w.new_empty(w.shape) for w in weights]]


class _RguFunction(_ReverseModeFunction):
    @staticmethod
    def forward(u, *weights):
        return _below_autograd(_ops.rgu.default, u, *weights)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad_r):
        return tuple(_backward_op(_RguBackwardFunction, grad_r, *ctx.saved_tensors))

    jvp = _no_forward_ad("rgu")


class _RguBackwardFunction(_ReverseModeFunction):
    @staticmethod
    def forward(grad_r, u, *weights):
        return tuple(_below_autograd(_ops.rgu_backward.default, grad_r, u, *weights))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, *grads_of_outputs):
        grad_r, u, *weights = ctx.saved_tensors
        shape = weights[-1].shape
        forward = lambda u, *w: reference.rgu(u, reference.RguWeights(*w[:-1], w[-1].reshape(shape)))  # noqa: E731
        return _reference_vjp_of_vjp(forward, (u, *weights), grad_r, grads_of_outputs)

    jvp = _no_forward_ad("rgu_backward")


def _rgu_kernel(u, *weights):
    return _RguFunction.apply(u, *weights)


def _rgu_backward_kernel(grad_r, u, *weights):
    return list(_RguBackwardFunction.apply(grad_r, u, *weights))


# ---- local_kernel: the local slow net ------------------------------------------------------
# Arguments after u, kernel_size, batch_context: coords, filter_w[L+1], filter_b[L+1],
# linear_w[L], linear_b[L], out_w, out_b, bias_map, alpha, beta, reduce_w, reduce_b, fc_w,
# fc_b, gate_w[L], gate_b[L]; the backward returns the gradient of u, then of each of these
# but coords, in that order.


def _flat_local_weights(coords, fw, fb, lw, lb, ow, ob, p, alpha, beta, rw, rb, cw, cb, gw, gb):
    return [coords, *fw, *fb, *lw, *lb, ow, ob, p, alpha, beta, rw, rb, cw, cb, *gw, *gb]


def _split_local_weights(flat, layers):
    it = iter(flat)
    take = lambda n: [next(it) for _ in range(n)]  # noqa: E731
    coords = next(it)
    fw, fb, lw, lb = take(layers + 1), take(layers + 1), take(layers), take(layers)
    ow, ob, p, alpha, beta, rw, rb, cw, cb = take(9)
    gw, gb = take(layers), take(layers)
    return coords, fw, fb, lw, lb, ow, ob, p, alpha, beta, rw, rb, cw, cb, gw, gb


def _reference_local_kernel(u, kernel_size, batch_context, layers, flat):
    coords, fw, fb, lw, lb, ow, ob, p, alpha, beta, rw, rb, cw, cb, gw, gb = _split_local_weights(flat, layers)
    return reference.local_kernel(
        u,
        kernel_size,
        reference.MagnetWeights(coords, fw, fb, lw, lb, ow, ob, p),
        reference.LocalContextWeights(rw, rb, cw, cb, gw, gb, alpha, beta),
        batch_context,
    )


class _LocalKernelFunction(_ReverseModeFunction):
    @staticmethod
    def forward(u, kernel_size, batch_context, layers, *flat):
        return _below_autograd(
            _ops.local_kernel.default, u, kernel_size, batch_context, *_split_local_weights(flat, layers)
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        u, kernel_size, batch_context, layers, *flat = inputs
        ctx.args = (kernel_size, batch_context, layers)
        ctx.save_for_backward(u, *flat)

    @staticmethod
    def backward(ctx, g_kernel):
        kernel_size, batch_context, layers = ctx.args
        u, *flat = ctx.saved_tensors
        grads = _backward_op(_LocalKernelBackwardFunction, g_kernel, u, kernel_size, batch_context, layers, *flat)
        return (grads[0], None, None, None, None, *grads[1:])

    jvp = _no_forward_ad("local_kernel")


class _LocalKernelBackwardFunction(_ReverseModeFunction):
    @staticmethod
    def forward(g_kernel, u, kernel_size, batch_context, layers, *flat):
        return tuple(
            _below_autograd(
                _ops.local_kernel_backward.default,
                g_kernel,
                u,
                kernel_size,
                batch_context,
                *_split_local_weights(flat, layers),
            )
        )

    @staticmethod
    def setup_context(ctx, inputs, output):
        g_kernel, u, kernel_size, batch_context, layers, *flat = inputs
        ctx.args = (kernel_size, batch_context, layers)
        ctx.save_for_backward(g_kernel, u, *flat)

    @staticmethod
    def backward(ctx, *grads_of_outputs):
        kernel_size, batch_context, layers = ctx.args
        g_kernel, u, coords, *weights = ctx.saved_tensors

        def forward(u, *w):
            return _reference_local_kernel(u, kernel_size, batch_context, layers, [coords, *w])

        grads = _reference_vjp_of_vjp(forward, (u, *weights), g_kernel, grads_of_outputs)
        return (grads[0], grads[1], None, None, None, None, *grads[2:])

    jvp = _no_forward_ad("local_kernel_backward")


def _local_kernel_kernel(
    u, kernel_size, batch_context, coords, fw, fb, lw, lb, ow, ob, p, alpha, beta, rw, rb, cw, cb, gw, gb
):
    flat = _flat_local_weights(coords, fw, fb, lw, lb, ow, ob, p, alpha, beta, rw, rb, cw, cb, gw, gb)
    return _LocalKernelFunction.apply(u, list(kernel_size), batch_context, len(lw), *flat)


def _local_kernel_backward_kernel(
    g_kernel, u, kernel_size, batch_context, coords, fw, fb, lw, lb, ow, ob, p, alpha, beta, rw, rb, cw, cb, gw, gb
):
    flat = _flat_local_weights(coords, fw, fb, lw, lb, ow, ob, p, alpha, beta, rw, rb, cw, cb, gw, gb)
    return list(_LocalKernelBackwardFunction.apply(g_kernel, u, list(kernel_size), batch_context, len(lw), *flat))


def _fake_local_kernel_op(
    u, kernel_size, batch_context, coords, fw, fb, lw, lb, ow, ob, p, alpha, beta, rw, rb, cw, cb, gw, gb
):
    return u.new_empty((1 if batch_context else u.shape[0], ow.shape[0], *kernel_size))


def _fake_local_kernel_backward_op(
    g_kernel, u, kernel_size, batch_context, coords, fw, fb, lw, lb, ow, ob, p, alpha, beta, rw, rb, cw, cb, gw, gb
):
    flat = _flat_local_weights(coords, fw, fb, lw, lb, ow, ob, p, alpha, beta, rw, rb, cw, cb, gw, gb)
    return [u.new_empty(u.shape), *[w.new_empty(w.shape) for w in flat[1:]]]


# ---- hyper_interaction: x gated by channel (and spatial) scores of y ---------------------


def _fake_hyper_interaction(y, x, k_c, k_s):
    return y.new_empty(y.shape)


def _fake_hyper_interaction_backward(grad, y, x, k_c, k_s):
    return [
        y.new_empty(y.shape),
        y.new_empty(y.shape if x is not None else (0,)),
        k_c.new_empty(k_c.shape),
        y.new_empty(k_s.shape if k_s is not None else (0,)),
    ]


class _HyperInteractionFunction(_ReverseModeFunction):
    @staticmethod
    def forward(y, x, k_c, k_s):
        return _below_autograd(_ops.hyper_interaction.default, y, x, k_c, k_s)

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, grad):
        y, x, k_c, k_s = ctx.saved_tensors
        g_y, g_x, g_kc, g_ks = _backward_op(_HyperInteractionBackwardFunction, grad, y, x, k_c, k_s)
        return g_y, (g_x if x is not None else None), g_kc, (g_ks if k_s is not None else None)

    jvp = _no_forward_ad("hyper_interaction")


class _HyperInteractionBackwardFunction(_ReverseModeFunction):
    @staticmethod
    def forward(grad, y, x, k_c, k_s):
        return tuple(_below_autograd(_ops.hyper_interaction_backward.default, grad, y, x, k_c, k_s))

    @staticmethod
    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(*inputs)

    @staticmethod
    def backward(ctx, gg_y, gg_x, gg_kc, gg_ks):
        grad, y, x, k_c, k_s = ctx.saved_tensors
        grads = _reference_vjp_of_vjp(
            reference.hyper_interaction,
            (y, x, k_c, k_s),
            grad,
            (gg_y, gg_x if x is not None else None, gg_kc, gg_ks if k_s is not None else None),
        )
        return grads

    jvp = _no_forward_ad("hyper_interaction_backward")


def _hyper_interaction_kernel(y, x, k_c, k_s):
    return _HyperInteractionFunction.apply(y, x, k_c, k_s)


def _hyper_interaction_backward_kernel(grad, y, x, k_c, k_s):
    return list(_HyperInteractionBackwardFunction.apply(grad, y, x, k_c, k_s))


# ---- registration and the wrappers' calls --------------------------------------------------


def register() -> None:
    """Fakes and autograd of the network ops, once the compiled library is loaded."""
    global _ops, _lib
    if _ops is not None or not hasattr(torch.ops.terminator, "hyper_interaction"):
        return
    ops = torch.ops.terminator
    _lib = torch.library.Library("terminator", "IMPL")
    for name, fake, kernel in (
        ("pointwise", _fake_pointwise, _pointwise_kernel),
        ("pointwise_backward", _fake_pointwise_backward, _pointwise_backward_kernel),
        ("standardize", _fake_standardize, _standardize_kernel),
        ("standardize_backward", _fake_standardize_backward, _standardize_backward_kernel),
        ("rgu", _fake_rgu, _rgu_kernel),
        ("rgu_backward", _fake_rgu_backward, _rgu_backward_kernel),
        ("local_kernel", _fake_local_kernel_op, _local_kernel_kernel),
        ("local_kernel_backward", _fake_local_kernel_backward_op, _local_kernel_backward_kernel),
        ("hyper_interaction", _fake_hyper_interaction, _hyper_interaction_kernel),
        ("hyper_interaction_backward", _fake_hyper_interaction_backward, _hyper_interaction_backward_kernel),
    ):
        op = getattr(ops, name).default
        torch.library.register_fake(f"terminator::{name}", fake, lib=_lib)
        _lib.impl(name, _autograd_kernel(name, op, kernel), "Autograd")
    # The optimizer's step mutates its arguments in place and returns nothing.
    torch.library.register_fake("terminator::kar_step_", lambda *args: None, lib=_lib)
    _ops = ops


def pointwise(xs: Sequence[torch.Tensor], weight, bias):
    return _ops.pointwise(list(xs), weight, bias)


def standardize(x, batch_channels, running_mean, running_var, use_batch_stats, eps, gelu, bias):
    return _ops.standardize(x, batch_channels, running_mean, running_var, use_batch_stats, eps, gelu, bias)


def rgu(u, weights):
    return _ops.rgu(u, *weights)


def local_kernel(u, kernel_size, batch_context, magnet_weights, context_weights):
    m, c = magnet_weights, context_weights
    return _ops.local_kernel(
        u,
        list(kernel_size),
        batch_context,
        m.coords,
        list(m.filter_w),
        list(m.filter_b),
        list(m.linear_w),
        list(m.linear_b),
        m.out_w,
        m.out_b,
        m.bias_map.reshape(-1),
        c.alpha,
        c.beta,
        c.reduce_w,
        c.reduce_b,
        c.fc_w,
        c.fc_b,
        list(c.gate_w),
        list(c.gate_b),
    )


def hyper_interaction(y, x, k_c, k_s):
    return _ops.hyper_interaction(y, x, k_c, k_s)
