"""Standardizations without affine parameters: instance, batch, and G-IBS.

Activations are ``(B, C, *S)`` (1D or 2D); none of these has learnable parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from .. import ops

__all__ = ["InstanceStandardization", "BatchStandardization", "GIBS"]


class InstanceStandardization(nn.Module):
    """Zero mean, unit variance per sample and channel over the spatial positions."""

    def __init__(self, eps: float = 1e-5):
        super().__init__()
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.standardize(x, "instance", eps=self.eps)

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}"


class BatchStandardization(nn.Module):
    """Zero mean, unit variance per channel over the batch and the spatial positions.

    In training it uses the batch's statistics. At eval:

    * ``running_stats=True`` (default): running mean/variance tracked in training (as
      ``BatchNorm`` without affine), so a sample's output does not depend on its batch.
    * ``running_stats=False`` (the release, ``faithful=True``): the batch's statistics
      at eval too; predictions then depend on the other samples of the batch.
    """

    def __init__(self, channels: int, running_stats: bool = True, momentum: float = 0.1, eps: float = 1e-5):
        super().__init__()
        self.channels = channels
        self.running_stats = running_stats
        self.momentum = momentum
        self.eps = eps
        if running_stats:
            self.register_buffer("running_mean", torch.zeros(channels))
            self.register_buffer("running_var", torch.ones(channels))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)

    def forward(self, x: torch.Tensor, gelu: bool = False, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Standardized ``x``; with ``gelu``, GELU of it; with ``bias`` (scalar), plus that."""
        return self.standardize(x, "batch", gelu, bias)

    def standardize(
        self, x: torch.Tensor, channels: str | ops.ChannelGroups, gelu: bool = False, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``ops.standardize`` of ``x (B, C, *S)`` with this module's running statistics and
        settings for its batch-standardized channels (all of them, or those of ``channels``)."""
        return ops.standardize(
            x,
            channels,
            self.running_mean,
            self.running_var,
            use_batch_stats=self.training or not self.running_stats,
            momentum=self.momentum,
            eps=self.eps,
            gelu=gelu,
            bias=bias,
        )

    def extra_repr(self) -> str:
        return f"{self.channels}, running_stats={self.running_stats}"


class GIBS(nn.Module):
    """Group-based instance-batch standardization.

    The channels are split into ``min(groups, C)`` consecutive groups of (near) equal
    size; even-numbered groups get :class:`BatchStandardization`, odd-numbered ones
    :class:`InstanceStandardization`. (The release needs ``C`` divisible by 12; here a
    remainder is spread over the first groups, same result when it divides.)
    """

    def __init__(self, channels: int, groups: int = 12, running_stats: bool = True):
        super().__init__()
        n = min(groups, channels)
        base, extra = divmod(channels, n)
        self.splits = [base + (1 if i < extra else 0) for i in range(n)]
        starts = [sum(self.splits[:i]) for i in range(n)]
        bs = [c for i in range(0, n, 2) for c in range(starts[i], starts[i] + self.splits[i])]
        ins = [c for i in range(1, n, 2) for c in range(starts[i], starts[i] + self.splits[i])]
        # Batch-standardized channels first, then instance-standardized; `order` undoes it.
        self.register_buffer("bs_index", torch.tensor(bs, dtype=torch.long), persistent=False)
        self.register_buffer("in_index", torch.tensor(ins, dtype=torch.long), persistent=False)
        order = torch.empty(channels, dtype=torch.long)
        order[torch.tensor(bs + ins, dtype=torch.long)] = torch.arange(channels)
        self.register_buffer("order", order, persistent=False)
        # One module for all batch-standardized groups: per-channel statistics are the same.
        self.batch_std = BatchStandardization(len(bs), running_stats=running_stats)
        self.instance_std = InstanceStandardization()

    def forward(self, x: torch.Tensor, gelu: bool = False, bias: torch.Tensor | None = None) -> torch.Tensor:
        """Standardized ``x``; with ``gelu``, GELU of it; with ``bias`` (scalar), plus that."""
        groups = ops.ChannelGroups(self.bs_index, self.in_index, self.order)
        return self.batch_std.standardize(x, groups, gelu, bias)

    def extra_repr(self) -> str:
        return f"channels={sum(self.splits)}, groups={len(self.splits)}"
