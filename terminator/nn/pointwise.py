"""A 1×1 convolution (channel mixer) written as a batched matrix product."""

from __future__ import annotations

import math

import torch
from torch import nn

from .. import ops

__all__ = ["Pointwise"]


class Pointwise(nn.Module):
    """``y[b, :, p] = W x[b, :, p] + bias`` for ``x (B, in, *S)`` → ``(B, out, *S)``, any ``S``.

    The same function as ``nn.Conv1d/Conv2d(in, out, kernel_size=1)`` with the same
    default init (weight ``(out, in)``), computed by :func:`terminator.ops.pointwise`
    (a matrix product: no per-shape oneDNN kernel creation).
    """

    def __init__(self, in_channels: int, out_channels: int, bias: bool = True):
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels))
        self.bias = nn.Parameter(torch.empty(out_channels)) if bias else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """``nn.Conv*d``'s default: kaiming-uniform (a=√5) weight, uniform ±1/√fan_in bias."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            bound = 1 / math.sqrt(self.in_channels)
            nn.init.uniform_(self.bias, -bound, bound)

    def forward(self, x: torch.Tensor | list[torch.Tensor]) -> torch.Tensor:
        """``x (B, in, *S)``, or a list of ``(B, C_j, *S)`` with ``Σ C_j = in`` taken as
        their concatenation along channels (never materialized by the fused kernel)."""
        return ops.pointwise(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        return f"{self.in_channels}, {self.out_channels}, bias={self.bias is not None}"
