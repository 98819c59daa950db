"""The HyperZ·Z·W ops and the network's fused layers: thin wrappers over the compiled
kernels, or the reference.

Shapes: activations ``(B, C, *S)`` with ``S = (L,)`` (1D) or ``(H, W)`` (2D);
kernels ``(C, *K)``, ``(1, C, *K)`` (shared over the batch) or ``(B, C, *K)``
(per sample). The HyperZ·Z·W ops take float32, float64, float16 and bfloat16 (the
half types accumulate in float32), any strides; B = 0 gives an empty result. The
definitions are in docs/OPS.md and :mod:`terminator.ops.reference`.

The network's layers (:func:`pointwise`, :func:`standardize`, :func:`rgu`,
:func:`local_kernel`, :func:`hyper_interaction`) run as one fused CPU kernel each for float32/float64 tensors, and
as their reference composition otherwise (other dtypes and devices, autocast, forward-
mode AD, torch.func transforms).

The backend (compiled C++/CUDA or pure-PyTorch reference) is chosen when this
module is imported, building the extension on first use; ``backend()`` says which
and why. Tensors on a device the compiled backend has no kernels for run on the
reference.
"""

from __future__ import annotations

from typing import Sequence

import torch

from . import _build, _checks, _library, _network, reference
from ._build import BackendInfo, BuildError
from .reference import ChannelGroups, LocalContextWeights, MagnetWeights, RguWeights

__all__ = [
    "hyperzzw_global",
    "hyperkernel_conv",
    "pointwise",
    "standardize",
    "rgu",
    "local_kernel",
    "hyper_interaction",
    "ChannelGroups",
    "RguWeights",
    "MagnetWeights",
    "LocalContextWeights",
    "backend",
    "reference",
    "BackendInfo",
    "BuildError",
]

_BACKEND: BackendInfo = _build.select_backend()
if _BACKEND.name != "reference":
    _library.register()
    _network.register()
_COMPILED_DEVICES = frozenset(_BACKEND.devices)


def backend() -> BackendInfo:
    """The active backend: ``.name`` ("cpp", "cuda" or "reference") and ``.reason``."""
    return _BACKEND


def _compiled(t: torch.Tensor) -> bool:
    return t.device.type in _COMPILED_DEVICES


def hyperzzw_global(
    k: torch.Tensor, z: torch.Tensor, x: torch.Tensor | None = None, *, mode: str = "dot"
) -> torch.Tensor:
    """Global HyperZ·Z·W: context-dependent fast weights ``Ŵ = k ⊙ z`` act on ``x``.

    Args:
        k: global hyper-kernel, ``(C, *S)``, ``(1, C, *S)`` or ``(B, C, *S)``.
        z: hidden activations ``(B, C, *S)``.
        x: ``(B, C, *S)``, or None for ``x = z`` (z's gradient then covers both roles).
        mode: ``"dot"``: ``Ŵ ⊙ x``; ``"matmul"``: ``Ŵ[b,c] @ x[b,c]`` (2D, H == W);
            ``"conv"``: "same" cross-correlation of ``x`` with ``Ŵ`` (full-size kernel).
    Returns:
        ``(B, C, *S)``, contiguous.
    """
    k, z, x = _library.autocast_inputs(z.device.type, k, z, x) if isinstance(z, torch.Tensor) else (k, z, x)
    _checks.check_global_args(k, z, x, mode)
    if _compiled(z):
        return _library.global_product(k, z, x, mode)
    # The reference's broadcasting products follow their inputs' strides (an expanded k
    # gives a non-contiguous result); the promise above holds for every backend.
    return reference.hyperzzw_global(k, z, x, mode=mode).contiguous()


def hyperkernel_conv(x: torch.Tensor, w: torch.Tensor, *, algo: str = "auto") -> torch.Tensor:
    """Depthwise "same" cross-correlation of ``x`` with a dynamic hyper-kernel ``w``.

    ``y[b,c][p] = Σ_q w[b,c][q] · x[b,c][p + q − ⌊(K−1)/2⌋]``, zero outside ``x``.

    Args:
        x: ``(B, C, *S)``.
        w: ``(C, *K)`` / ``(1, C, *K)`` shared, or ``(B, C, *K)`` per sample, ``1 <= K <= S``.
        algo: ``"direct"``, ``"fft"`` or ``"auto"`` (direct for small kernels, FFT for
            large ones, by a crossover measured on CPU).
    Returns:
        ``(B, C, *S)``, contiguous.
    """
    x, w = _library.autocast_inputs(x.device.type, x, w) if isinstance(x, torch.Tensor) else (x, w)
    _checks.check_conv_args(x, w, algo)
    if _compiled(x):
        return _library.conv(x, w, algo)
    return reference.hyperkernel_conv(x, w, algo=algo).contiguous()


# ---- the network's layers ---------------------------------------------------------------------


def _fused(*tensors: torch.Tensor) -> bool:
    return _network.fusable(_compiled(tensors[0]), *tensors)


def _autocast(t: torch.Tensor) -> bool:
    """Autocast on for t's device: the layers run their reference compositions, whose ATen
    ops follow autocast's policies (and mix dtypes as autocast makes them)."""
    device = t.device.type
    return torch.amp.is_autocast_available(device) and torch.is_autocast_enabled(device)


def pointwise(
    xs: torch.Tensor | Sequence[torch.Tensor], weight: torch.Tensor, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """A channel mixer (1×1 convolution) of one input, or of several concatenated along
    channels without materializing the concatenation.

    Args:
        xs: ``(B, C, *S)``, or a sequence of ``(B, C_j, *S)``.
        weight: ``(C_out, Σ C_j)``.
        bias: ``(C_out,)`` or None.
    Returns:
        ``(B, C_out, *S)``, equal to ``reference.pointwise``.
    """
    xs = [xs] if isinstance(xs, torch.Tensor) else list(xs)
    if _autocast(xs[0]):
        return reference.pointwise(xs, weight, bias)
    _checks.check_pointwise_args(xs, weight, bias)
    if _fused(*xs, weight, *(() if bias is None else (bias,))):
        return _network.pointwise(xs, weight, bias)
    return reference.pointwise(xs, weight, bias)


_INDEX_CACHE: dict = {}


def _batch_channel_index(channels, count: int, device: torch.device) -> torch.Tensor:
    if isinstance(channels, ChannelGroups):
        return channels.batch
    key = (channels, count, device)
    if key not in _INDEX_CACHE:
        n = count if channels == "batch" else 0
        _INDEX_CACHE[key] = torch.arange(n, device=device)
    return _INDEX_CACHE[key]


def standardize(
    x: torch.Tensor,
    channels: str | ChannelGroups = "instance",
    running_mean: torch.Tensor | None = None,
    running_var: torch.Tensor | None = None,
    *,
    use_batch_stats: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    gelu: bool = False,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-channel standardization (no affine), optionally followed by GELU and a scalar bias.

    Args:
        x: ``(B, C, *S)``.
        channels: ``"instance"`` (statistics over ``S``, per sample), ``"batch"`` (over the
            batch and ``S``), or :class:`ChannelGroups` (G-IBS: some channels of each kind).
        running_mean, running_var: ``(number of batch channels,)`` running statistics or
            None; updated in place when ``use_batch_stats``, used in place of the batch's
            statistics otherwise (eval).
        momentum, eps: as ``torch.nn.functional.batch_norm``.
        gelu: apply GELU. bias: a scalar tensor added last, or None.
    Returns:
        ``(B, C, *S)``, equal to ``reference.standardize``.
    """
    use_reference = _autocast(x)
    if not use_reference:
        _checks.check_standardize_args(x, channels, running_mean, running_var, bias)
        extra = [t for t in (running_mean, running_var, bias) if t is not None]
        use_reference = not _fused(x, *extra) or x.numel() == 0
    if use_reference:
        return reference.standardize(
            x,
            channels,
            running_mean,
            running_var,
            use_batch_stats=use_batch_stats,
            momentum=momentum,
            eps=eps,
            gelu=gelu,
            bias=bias,
        )
    batch_channels = _batch_channel_index(channels, x.shape[1], x.device)
    use_batch = use_batch_stats or running_mean is None
    if use_batch and batch_channels.numel() and x.numel() // x.shape[1] <= 1:
        raise ValueError(f"batch standardization needs more than one value per channel, got x {tuple(x.shape)}")
    y, _, moments = _network.standardize(x, batch_channels, running_mean, running_var, use_batch, eps, gelu, bias)
    if use_batch and running_mean is not None:
        count = x.numel() // x.shape[1]
        with torch.no_grad():
            running_mean.mul_(1 - momentum).add_(moments[0], alpha=momentum)
            running_var.mul_(1 - momentum).add_(moments[1], alpha=momentum * count / (count - 1))
    return y


def rgu(u: torch.Tensor, weights: RguWeights) -> torch.Tensor:
    """Recursive gated unit ``W_y(GELU(IN(W_k u ⊙ W_q(W_v u))) + P)``.

    Args:
        u: ``(B, C, *S)``.
        weights: :class:`RguWeights`: four ``(C, C)`` mixers with ``(C,)`` biases, and the
            bias map ``P`` of shape ``S``.
    Returns:
        ``(B, C, *S)``, equal to ``reference.rgu``.
    """
    if _autocast(u):
        return reference.rgu(u, weights)
    _checks.check_rgu_args(u, weights)
    if _fused(u, *weights) and u.numel():
        return _network.rgu(u, weights)
    return reference.rgu(u, weights)


def local_kernel(
    u: torch.Tensor,
    kernel_size: Sequence[int],
    magnet_weights: MagnetWeights,
    context_weights: LocalContextWeights,
    batch_context: bool = False,
) -> torch.Tensor:
    """Context-dependent local hyper-kernels (the local slow net).

    Args:
        u: the context ``(B, C, *S)``.
        kernel_size: ``K``, one entry per spatial dim, each between 1 and ``S``.
        magnet_weights: the coordinate MLP over the ``prod(K)`` kernel positions
            (:class:`MagnetWeights`, output ``C`` channels).
        context_weights: the context path, gates and re-normalization
            (:class:`LocalContextWeights`).
        batch_context: average the context over the batch (one kernel for all samples).
    Returns:
        ``(B, C, *K)``, or ``(1, C, *K)`` with ``batch_context``; equal to ``reference.local_kernel``.
    """
    if _autocast(u):
        return reference.local_kernel(u, kernel_size, magnet_weights, context_weights, batch_context)
    _checks.check_local_kernel_args(u, kernel_size, magnet_weights, context_weights)
    tensors = [
        u,
        *magnet_weights.filter_w,
        *magnet_weights.linear_w,
        magnet_weights.out_w,
        context_weights.reduce_w,
        context_weights.alpha,
    ]
    # The fused op differentiates the weights, not the coordinates (a buffer in SlowNetL).
    if _fused(*tensors) and u.numel() and not magnet_weights.coords.requires_grad:
        return _network.local_kernel(u, kernel_size, batch_context, magnet_weights, context_weights)
    return reference.local_kernel(u, kernel_size, magnet_weights, context_weights, batch_context)


def hyper_interaction(
    y: torch.Tensor, x: torch.Tensor | None, k_c: torch.Tensor, k_s: torch.Tensor | None = None
) -> torch.Tensor:
    """``x ⊙ sigmoid(s_c ⊙ s_s)``: ``x`` gated by scores of a high-level ``y``.

    Args:
        y: ``(B, C, *S)``; its per-channel mean ``y_c`` gives ``s_c = k_c ⊙ y_c²`` and its
            mean over channels ``y_s`` gives ``s_s = k_s ⊙ y_s²``.
        x: ``(B, C, *S)``, or None for ``x = y``.
        k_c: ``(1, C)``. k_s: ``(1, *S)``, or None for the channel score alone (the
            hyper-channel interaction, ``x ⊙ sigmoid(s_c)``).
    Returns:
        ``(B, C, *S)``, equal to ``reference.hyper_interaction``.
    """
    if _autocast(y):
        return reference.hyper_interaction(y, x, k_c, k_s)
    _checks.check_hyper_interaction_args(y, x, k_c, k_s)
    tensors = [t for t in (y, x, k_c, k_s) if t is not None]
    if _fused(*tensors) and y.numel():
        return _network.hyper_interaction(y, x, k_c, k_s)
    return reference.hyper_interaction(y, x, k_c, k_s)
