"""The pure-PyTorch definition of every op: correctness is defined here.

Written to be read, not to be fast. Every backend is tested against these
functions, and they are the fallback when no compiled backend is available.

Shapes: activations are ``(B, C, *S)`` with ``S = (L,)`` or ``(H, W)``; a kernel
is ``(C, *K)``, ``(1, C, *K)`` (shared over the batch) or ``(B, C, *K)`` (per sample).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["hyperzzw_global", "hyperkernel_conv", "conv_same"]


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
    y = conv(
        x.reshape(1, batch * channels, *spatial),
        w.reshape(batch * channels, 1, *kernel_size),
        padding="same",
        groups=batch * channels,
    )
    return y.reshape(x.shape)


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
