"""The HyperZ·Z·W layers of an SFNE block.

Every HyperZ·Z·W product goes through :func:`terminator.ops.hyperzzw_global` and every
hyper-kernel convolution through :func:`terminator.ops.hyperkernel_conv` (looked up at
call time), so the backend choice (C++/CUDA or reference) applies to the whole network.
Activations are ``(B, C, *S)`` with ``S = (L,)`` or ``(H, W)``.
"""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .. import ops
from .norm import BatchStandardization, InstanceStandardization
from .pointwise import Pointwise
from .slow import DEFAULT_OMEGA_0, SlowNetG, SlowNetGC, SlowNetL, _sizes

__all__ = [
    "GlobalHyperZZW",
    "LocalHyperZZW",
    "RGU",
    "HyperChannelInteraction",
    "HyperInteraction",
    "SiGLU",
    "channel_mixer",
]

MODES = ("dot", "matmul", "conv")


def channel_mixer(cin: int, cout: int, init: str = "kaiming_normal") -> Pointwise:
    """A 1×1 convolution ``cin → cout`` (a channel mixer) with bias 0.

    init: ``"kaiming_normal"`` (mixers, bottleneck) or ``"kaiming_uniform_linear"`` (RGU).
    """
    conv = Pointwise(cin, cout)
    with torch.no_grad():
        if init == "kaiming_normal":
            nn.init.kaiming_normal_(conv.weight)
        else:
            nn.init.kaiming_uniform_(conv.weight, nonlinearity="linear")
        conv.bias.zero_()
    return conv


class GlobalHyperZZW(nn.Module):
    """Global HyperZ·Z·W with a slow-net kernel: ``y = (K_g ⊙ z) ⊗ x``.

    ``K_g = SlowNetG()`` is ``(C, *S)``, as large as the input; ⊗ is ``mode``: ``"dot"``
    (elementwise, linear time, the paper's global branch), ``"matmul"`` (2D square inputs
    only, what the release ran) or ``"conv"`` (a "same" convolution with a kernel as large
    as the input). ``forward(z, x=None, kernel=None)``: ``x=None`` means ``x = z``; pass
    ``kernel`` to reuse one ``K_g`` for several branches.
    """

    def __init__(
        self,
        data_dim: int,
        channels: int,
        size: int | Sequence[int],
        mode: str = "dot",
        hidden: int = 64,
        num_layers: int = 2,
        omega_0: float = DEFAULT_OMEGA_0,
    ):
        super().__init__()
        size = _sizes(size, data_dim)
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        if mode == "matmul" and not (data_dim == 2 and size[0] == size[1]):
            raise ValueError(f"mode='matmul' needs square 2D inputs (H == W), got data_dim={data_dim}, size={size}")
        self.mode = mode
        self.slow_net = SlowNetG(data_dim, size, channels, hidden, num_layers, omega_0)

    def kernel(self) -> torch.Tensor:
        """``K_g (C, *S)`` (cached in eval mode)."""
        return self.slow_net()

    def forward(self, z: torch.Tensor, x: torch.Tensor | None = None, kernel: torch.Tensor | None = None):
        k = self.kernel() if kernel is None else kernel
        return ops.hyperzzw_global(k, z, x, mode=self.mode)

    def extra_repr(self) -> str:
        return f"mode={self.mode!r}"


class LocalHyperZZW(nn.Module):
    """Local HyperZ·Z·W branch: ``GELU(BS(Mixer(hyperkernel_conv(u, SlowNetL(ctx))))) + b``.

    The kernel ``(B, C, *K)`` is generated from the context ``ctx`` (per sample by
    default, ``local_context="batch"`` for the release's batch mean) and slides over
    ``u`` as a depthwise "same" convolution; then a 1×1 channel mixer, batch
    standardization, GELU and a learnable scalar bias.
    """

    def __init__(
        self,
        data_dim: int,
        channels: int,
        kernel_size: int | Sequence[int],
        hidden: int = 32,
        num_layers: int = 2,
        omega_0: float = DEFAULT_OMEGA_0,
        local_context: str = "sample",
        running_stats: bool = True,
    ):
        super().__init__()
        self.slow_net = SlowNetL(data_dim, channels, kernel_size, hidden, num_layers, omega_0, local_context)
        self.mixer = channel_mixer(channels, channels)
        self.batch_std = BatchStandardization(channels, running_stats=running_stats)
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, context: torch.Tensor, u: torch.Tensor) -> torch.Tensor:
        kernel = self.slow_net(context)
        y = ops.hyperkernel_conv(u, kernel)
        return self.batch_std(self.mixer(y), gelu=True, bias=self.bias)


class RGU(nn.Module):
    """Recursive gated unit: ``W_y(GELU(IN(W_k u ⊙ W_q(W_v u))) + P)``.

    ``W_*`` are 1×1 convolutions ``C → C`` (kaiming-uniform, bias 0); ``P`` is a
    learnable bias map of the input's spatial shape, shared by the channels.
    """

    def __init__(self, data_dim: int, channels: int, size: int | Sequence[int]):
        super().__init__()
        size = _sizes(size, data_dim)
        init = "kaiming_uniform_linear"
        self.w_k = channel_mixer(channels, channels, init)
        self.w_v = channel_mixer(channels, channels, init)
        self.w_q = channel_mixer(channels, channels, init)
        self.w_y = channel_mixer(channels, channels, init)
        self.instance_std = InstanceStandardization()
        self.bias_map = nn.Parameter(torch.zeros(size))

    def weights(self) -> ops.RguWeights:
        return ops.RguWeights(
            self.w_k.weight,
            self.w_k.bias,
            self.w_v.weight,
            self.w_v.bias,
            self.w_q.weight,
            self.w_q.bias,
            self.w_y.weight,
            self.w_y.bias,
            self.bias_map,
        )

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return ops.rgu(u, self.weights())


class HyperChannelInteraction(nn.Module):
    """Hyper-channel interaction: ``x ⊙ sigmoid(k ⊙ y ⊙ y)``.

    ``y (B, 1, C)`` is the per-channel spatial mean of ``x``; ``k (1, C)`` comes from a
    channel slow net (:class:`SlowNetGC`); computed by :func:`terminator.ops.hyper_interaction`.
    """

    def __init__(
        self, data_dim: int, channels: int, hidden: int = 32, num_layers: int = 2, omega_0: float = DEFAULT_OMEGA_0
    ):
        super().__init__()
        self.data_dim = data_dim
        self.slow_net = SlowNetGC(channels, 1, hidden, num_layers, omega_0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.hyper_interaction(x, None, self.slow_net())


class HyperInteraction(nn.Module):
    """Hyper interaction: ``x ⊙ sigmoid(score_c ⊙ score_s)`` from a high-level ``y``.

    ``score_c = k_c ⊙ y_c ⊙ y_c`` with ``y_c (B, 1, C)`` the per-channel mean of ``y``
    and ``k_c`` from a channel slow net; ``score_s = k_s ⊙ y_s ⊙ y_s`` with ``y_s
    (B, 1, *S)`` the channel mean of ``y`` and ``k_s (1, *S)`` from a global slow net.
    """

    def __init__(
        self,
        data_dim: int,
        channels: int,
        size: int | Sequence[int],
        channel_hidden: int = 16,
        spatial_hidden: int = 64,
        num_layers: int = 2,
        omega_0: float = DEFAULT_OMEGA_0,
    ):
        super().__init__()
        self.data_dim = data_dim
        self.channel_slow_net = SlowNetGC(channels, 1, channel_hidden, num_layers, omega_0)
        self.spatial_slow_net = SlowNetG(data_dim, size, 1, spatial_hidden, num_layers, omega_0)

    def forward(self, y: torch.Tensor, x: torch.Tensor | None = None) -> torch.Tensor:
        return ops.hyper_interaction(y, x, self.channel_slow_net(), self.spatial_slow_net())


class SiGLU(nn.Module):
    """Sigmoid gated linear unit ``sigmoid(u) ⊙ u``."""

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(u) * u
