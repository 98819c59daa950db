"""The pure-PyTorch definition of every op: correctness is defined here.

Written to be read, not to be fast. Every backend is tested against these
functions, and they are the fallback when no compiled backend is available.

Shapes: activations are ``(B, C, *S)`` with ``S = (L,)`` or ``(H, W)``; a kernel
is ``(C, *K)``, ``(1, C, *K)`` (shared over the batch) or ``(B, C, *K)`` (per sample).
"""

from __future__ import annotations

from typing import Callable, NamedTuple, Sequence

import torch
import torch.nn.functional as F

__all__ = [
    "hyperzzw_global",
    "hyperkernel_conv",
    "conv_same",
    "pointwise",
    "standardize",
    "rgu",
    "magnet",
    "local_kernel",
    "hyper_interaction",
    "ChannelGroups",
    "RguWeights",
    "MagnetWeights",
    "LocalContextWeights",
]


def conv_same(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """Depthwise ``padding="same"`` cross-correlation of each plane with its kernel.

    ``conv_same(u, w)[p] = Σ_q w[q] · u[p + q − ⌊(K−1)/2⌋]`` per spatial dim, zero
    outside the input; the batch is folded into the groups of a grouped convolution.

    Args:
        x: ``(B, C, *S)``.
        w: ``(C, *K)``, ``(1, C, *K)`` or ``(B, C, *K)`` with ``1 <= K <= S``.
    Returns:
        ``(B, C, *S)``.
    """
    batch, channels, *spatial = x.shape
    if w.dim() == x.dim() - 1:
        w = w.unsqueeze(0)
    kernel_size = w.shape[2:]
    if x.numel() == 0 or w.numel() == 0:
        # B, C or a spatial size of 0 (grouped convolutions refuse them): an empty result
        # that still belongs to both inputs' graphs.
        return x * (w.sum() * 0)
    w = w.expand(batch, channels, *kernel_size)
    conv = F.conv1d if len(spatial) == 1 else F.conv2d
    # ATen's CPU float16 convolution can take minutes on a full-size kernel: accumulate in
    # float32 and round once, as the compiled kernels do.
    compute_dtype = torch.float32 if x.dtype == torch.float16 and x.device.type == "cpu" else None
    y = conv(
        x.reshape(1, batch * channels, *spatial).to(compute_dtype),
        w.reshape(batch * channels, 1, *kernel_size).to(compute_dtype),
        padding="same",
        groups=batch * channels,
    )
    return y.reshape(x.shape).to(x.dtype)


def hyperzzw_global(
    k: torch.Tensor, z: torch.Tensor, x: torch.Tensor | None = None, *, mode: str = "dot"
) -> torch.Tensor:
    """Global HyperZ·Z·W: fast weights ``Ŵ = k ⊙ z`` act on ``x`` (``x = z`` if None).

    Args:
        k: global hyper-kernel ``(C, *S)``, ``(1, C, *S)`` or ``(B, C, *S)``.
        z: ``(B, C, *S)``.
        x: ``(B, C, *S)`` or None.
        mode: ``"dot"`` (``Ŵ ⊙ x``), ``"matmul"`` (``Ŵ[b,c] @ x[b,c]``, 2D square)
            or ``"conv"`` (``conv_same(x, Ŵ)``, a kernel as large as the input).
    Returns:
        ``(B, C, *S)``.
    """
    if x is None:
        x = z
    w_hat = k * z
    if mode == "dot":
        return w_hat * x
    if mode == "matmul":
        return w_hat @ x
    if mode == "conv":
        return conv_same(x, w_hat)
    raise ValueError(f"mode must be one of 'dot', 'matmul', 'conv', got {mode!r}")


def hyperkernel_conv(x: torch.Tensor, w: torch.Tensor, *, algo: str = "auto") -> torch.Tensor:
    """Depthwise "same" convolution of ``x (B, C, *S)`` with a dynamic hyper-kernel ``w``.

    ``algo`` only picks how a compiled backend computes it; the definition is one.
    """
    return conv_same(x, w)


# ---- the network's own ops ----------------------------------------------------------------
# The layers of terminator.nn as functions of their weights. A compiled backend fuses each
# one into a single kernel; these compositions define what it computes.


def pointwise(xs: Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A channel mixer (1×1 convolution) of the inputs concatenated along channels.

    Args:
        xs: tensors ``(B, C_j, *S)``.
        weight: ``(C_out, Σ C_j)``.
        bias: ``(C_out,)`` or None.
    Returns:
        ``(B, C_out, *S)``: ``y[b, :, p] = weight · cat(xs)[b, :, p] + bias``.
    """
    x = xs[0] if len(xs) == 1 else torch.cat(list(xs), dim=1)
    flat = x.flatten(2)
    # bmm with the weight expanded over the batch (torch.matmul's 2D @ 3D folding hits an
    # AOTAutograd stride bug under torch.compile when the incoming gradient is a slice).
    y = torch.bmm(weight.expand(flat.shape[0], -1, -1), flat)
    if bias is not None:
        y = y + bias.unsqueeze(-1)
    return y.reshape(x.shape[0], weight.shape[0], *x.shape[2:])


class ChannelGroups(NamedTuple):
    """Which channels a standardization takes over the batch, and which per sample.

    ``batch`` and ``instance`` are channel indices (the running statistics follow the
    order of ``batch``); ``order`` puts ``cat(batch, instance)`` back in channel order.
    """

    batch: torch.Tensor
    instance: torch.Tensor
    order: torch.Tensor


def standardize(
    x: torch.Tensor,
    channels: str | ChannelGroups,
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    *,
    use_batch_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    gelu: bool = False,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Zero mean, unit variance per channel, then optionally GELU and a scalar bias.

    Args:
        x: ``(B, C, *S)``.
        channels: ``"instance"`` (statistics over ``S`` per sample), ``"batch"`` (over the
            batch and ``S``) or :class:`ChannelGroups` (some of each, G-IBS).
        running_mean, running_var: the batch channels' running statistics, updated in
            place when ``use_batch_stats``, used instead of the batch's otherwise; None for
            none (then the batch's statistics are always used).
        gelu: apply GELU after standardizing. bias: a scalar added last, or None.
    Returns:
        ``(B, C, *S)``.
    """
    use_batch = use_batch_stats or running_mean is None
    if channels == "instance":
        y = F.instance_norm(x, eps=eps)
    elif channels == "batch":
        y = F.batch_norm(x, running_mean, running_var, None, None, use_batch, momentum, eps)
    else:
        parts = [
            F.batch_norm(
                x.index_select(1, channels.batch), running_mean, running_var, None, None, use_batch, momentum, eps
            )
        ]
        if channels.instance.numel():
            parts.append(F.instance_norm(x.index_select(1, channels.instance), eps=eps))
        y = torch.cat(parts, dim=1).index_select(1, channels.order)
    if gelu:
        y = F.gelu(y)
    return y + bias if bias is not None else y


class RguWeights(NamedTuple):
    """The recursive gated unit's 1×1 convolutions ``(C, C)`` with biases ``(C,)``, and
    its bias map (the input's spatial shape)."""

    w_k: torch.Tensor
    b_k: torch.Tensor
    w_v: torch.Tensor
    b_v: torch.Tensor
    w_q: torch.Tensor
    b_q: torch.Tensor
    w_y: torch.Tensor
    b_y: torch.Tensor
    bias_map: torch.Tensor


def rgu(u: torch.Tensor, weights: RguWeights, eps: float = 1e-5) -> torch.Tensor:
    """Recursive gated unit ``W_y(GELU(IN(W_k u ⊙ W_q(W_v u))) + P)``; ``u (B, C, *S)`` → same shape."""
    w = weights
    gated = pointwise([u], w.w_k, w.b_k) * pointwise([pointwise([u], w.w_v, w.b_v)], w.w_q, w.b_q)
    return pointwise([F.gelu(F.instance_norm(gated, eps=eps)) + w.bias_map], w.w_y, w.b_y)


class MagnetWeights(NamedTuple):
    """A MAGNet over a fixed grid: ``coords (N, d)``; filters ``(H, d)``, ``(H,)`` (L + 1 of
    each); hidden linears ``(H, H)``, ``(H,)`` (L of each); output ``(C, H)``, ``(C,)``;
    bias map ``(N,)``."""

    coords: torch.Tensor
    filter_w: Sequence[torch.Tensor]
    filter_b: Sequence[torch.Tensor]
    linear_w: Sequence[torch.Tensor]
    linear_b: Sequence[torch.Tensor]
    out_w: torch.Tensor
    out_b: torch.Tensor
    bias_map: torch.Tensor


def magnet(weights: MagnetWeights, gates: Callable[[int, torch.Tensor], torch.Tensor] | None = None) -> torch.Tensor:
    """``h_0 = sin(F_0 c)``, ``h_i = sin(F_i c) ⊙ (W_{i-1} h_{i-1} + b_{i-1}) + P``, output
    ``W_out h_L + b_out``: ``(G, N, C)`` with ``G`` = 1, or the batch of ``gates(i, h)``
    (applied after each hidden layer ``i >= 1``)."""
    w = weights
    c = w.coords
    p = w.bias_map.reshape(-1, 1)  # (N, 1): one value per position
    h = torch.sin(F.linear(c, w.filter_w[0], w.filter_b[0])).unsqueeze(0)  # (1, N, H)
    for i in range(1, len(w.filter_w)):
        h = torch.sin(F.linear(c, w.filter_w[i], w.filter_b[i])) * F.linear(h, w.linear_w[i - 1], w.linear_b[i - 1]) + p
        if gates is not None:
            h = gates(i, h)
    return F.linear(h, w.out_w, w.out_b)


class LocalContextWeights(NamedTuple):
    """The local slow net's context path and re-normalization: reduce ``(H, C)``, ``(H,)``;
    fc ``(H, H)``, ``(H,)``; one gate ``(H, H)``, ``(H,)`` per hidden layer; α, β ``(L, H)``."""

    reduce_w: torch.Tensor
    reduce_b: torch.Tensor
    fc_w: torch.Tensor
    fc_b: torch.Tensor
    gate_w: Sequence[torch.Tensor]
    gate_b: Sequence[torch.Tensor]
    alpha: torch.Tensor
    beta: torch.Tensor


def local_context(
    u: torch.Tensor, kernel_size: Sequence[int], weights: LocalContextWeights, batch_context: bool = False
) -> torch.Tensor:
    """``u (B, C, *S)`` → adaptive average pool to ``kernel_size`` → 1×1 conv → (batch mean)
    → 1×1 conv → GELU: ``(B', N, H)`` with ``N = prod(kernel_size)``, ``B'`` = B or 1."""
    pool = F.adaptive_avg_pool1d if u.dim() == 3 else F.adaptive_avg_pool2d
    c = pointwise([pool(u, tuple(kernel_size))], weights.reduce_w, weights.reduce_b)
    if batch_context:
        c = c.mean(dim=0, keepdim=True)
    c = F.gelu(pointwise([c], weights.fc_w, weights.fc_b))
    return c.flatten(2).transpose(1, 2)


def local_kernel(
    u: torch.Tensor,
    kernel_size: Sequence[int],
    magnet_weights: MagnetWeights,
    context_weights: LocalContextWeights,
    batch_context: bool = False,
) -> torch.Tensor:
    """The local slow net: hyper-kernels ``(B, C, *K)`` (``(1, C, *K)`` with ``batch_context``)
    from the context ``u (B, C, *S)``.

    Each hidden layer ``i`` of the MAGNet is re-normalized as ``α_i·h + β_i·normalize(h)``
    (L2 over the kernel positions, per sample and unit) and multiplied by the gate
    ``gate_i(context)``.
    """
    cw = context_weights
    ctx = local_context(u, kernel_size, cw, batch_context)

    def gate(i: int, h: torch.Tensor) -> torch.Tensor:
        h = cw.alpha[i - 1] * h + cw.beta[i - 1] * F.normalize(h, dim=1)
        return h * F.linear(ctx, cw.gate_w[i - 1], cw.gate_b[i - 1])

    out = magnet(magnet_weights, gate)  # (B', N, C)
    return out.transpose(1, 2).reshape(out.shape[0], out.shape[2], *kernel_size)


def hyper_interaction(
    y: torch.Tensor, x: torch.Tensor | None, k_c: torch.Tensor, k_s: torch.Tensor | None = None
) -> torch.Tensor:
    """``x ⊙ sigmoid(s_c ⊙ s_s)`` gated by scores of ``y`` (``x = None``: ``x = y``).

    ``s_c = k_c ⊙ y_c ⊙ y_c`` with ``y_c (B, 1, C)`` the per-channel spatial mean of ``y``;
    ``s_s = k_s ⊙ y_s ⊙ y_s`` with ``y_s (B, 1, *S)`` the mean over channels. Without
    ``k_s`` (hyper-channel interaction) the gate is ``sigmoid(s_c)``.

    Args:
        y, x: ``(B, C, *S)``. k_c: ``(1, C)``. k_s: ``(1, *S)`` or None.
    Returns:
        ``(B, C, *S)``.
    """
    x = y if x is None else x
    unpool = (y.shape[0], y.shape[1], *((1,) * (y.dim() - 2)))
    y_c = y.flatten(2).mean(dim=2).unsqueeze(1)  # (B, 1, C)
    score_c = hyperzzw_global(k_c, y_c, mode="dot")
    if k_s is None:
        return x * torch.sigmoid(score_c).reshape(unpool)
    score_s = hyperzzw_global(k_s, y.mean(dim=1, keepdim=True), mode="dot")
    return x * torch.sigmoid(score_c.reshape(unpool) * score_s)
