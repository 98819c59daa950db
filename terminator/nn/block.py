"""The slow-fast neural encoding (SFNE) block (docs/ARCHITECTURE.md)."""

from __future__ import annotations

from typing import Sequence

import torch
from torch import nn

from .layers import (
    RGU,
    GlobalHyperZZW,
    HyperChannelInteraction,
    HyperInteraction,
    LocalHyperZZW,
    SiGLU,
    channel_mixer,
)
from .norm import GIBS, InstanceStandardization
from .slow import DEFAULT_OMEGA_0, _sizes

__all__ = ["SFNEBlock", "tile_channels"]


def tile_channels(t: torch.Tensor, channels: int, dim: int = 1) -> torch.Tensor:
    """Repeats ``t`` along ``dim`` until it has ``channels`` entries (cut to size)."""
    have = t.shape[dim]
    if have == channels:
        return t
    reps = [1] * t.dim()
    reps[dim] = -(-channels // have)
    return t.repeat(*reps).narrow(dim, 0, channels)


class SFNEBlock(nn.Module):
    """Slow-fast neural encoding block: ``x (B, C, *S)`` → ``(B, C·factor, *S)`` and ``K_g``.

    1. ``K_g = SlowNet_G()``, ``Ŵ = K_g ⊙ x``.
    2. ``fast = IN(RGU_a(Ŵ) + RGU_b(x))``.
    3. ``m = IN(Mixer(x))``; ``h = IN(HCI(x))``.
    4. ``o1 = Ŵ ⊗ fast``, ``o2 = Ŵ ⊗ m``, ``o3 = Ŵ ⊗ h`` (``hyperzzw_global(K_g, x, ·, mode)``);
       ``o4 = SiGLU(o1)``.
    5. ``o5 = HI(o1, x)``.
    6. ``l1 = LC(SL_3(x), h)``, ``l2 = LC(SL_9(h), x)``, ``l3 = LC(SL_5(m), x)``,
       ``l4 = LC(SL_7(x), m)`` (:class:`LocalHyperZZW`, kernel sizes ``local_sizes``).
    7. Concatenate the 10 branches and the ``num_previous`` earlier block outputs (tiled
       along channels to C) → bottleneck 1×1 conv to ``C·factor`` → G-IBS → GELU →
       Dropout(channel) of (· + scalar bias).

    ``forward(x, *previous)`` returns ``(out, K_g)``; ``previous`` holds exactly
    ``num_previous`` tensors ``(B, C_j, *S)``.
    """

    def __init__(
        self,
        data_dim: int,
        channels: int,
        factor: int,
        size: int | Sequence[int],
        *,
        num_previous: int = 0,
        mode: str = "dot",
        global_hidden: int = 64,
        global_layers: int = 2,
        local_sizes: Sequence[int] = (3, 9, 5, 7),
        local_hidden: int = 32,
        local_layers: int = 2,
        gc_hidden: int = 32,
        gc_layers: int = 2,
        hi_channel_hidden: int = 16,
        hi_spatial_hidden: int = 64,
        hi_layers: int = 2,
        gibs_groups: int = 12,
        dropout: float = 0.0,
        omega_0: float = DEFAULT_OMEGA_0,
        local_context: str = "sample",
        running_stats: bool = True,
    ):
        super().__init__()
        if data_dim not in (1, 2):
            raise ValueError(f"data_dim must be 1 or 2, got {data_dim}")
        size = _sizes(size, data_dim)
        if len(local_sizes) != 4:
            raise ValueError(f"local_sizes must have 4 kernel sizes, got {tuple(local_sizes)}")
        for k in local_sizes:
            if not 1 <= k <= min(size):
                raise ValueError(f"local kernel size {k} must be between 1 and the input size {size}")
        self.data_dim = data_dim
        self.channels = channels
        self.factor = factor
        self.size = size
        self.num_previous = num_previous
        d, c = data_dim, channels

        self.global_hzzw = GlobalHyperZZW(d, c, size, mode, global_hidden, global_layers, omega_0)
        self.rgu_a = RGU(d, c, size)  # on Ŵ = K_g ⊙ x
        self.rgu_b = RGU(d, c, size)  # on x
        self.mixer = channel_mixer(c, c)
        self.hci = HyperChannelInteraction(d, c, gc_hidden, gc_layers, omega_0)
        self.siglu = SiGLU()
        self.hi = HyperInteraction(d, c, size, hi_channel_hidden, hi_spatial_hidden, hi_layers, omega_0)
        self.local = nn.ModuleList(
            LocalHyperZZW(d, c, k, local_hidden, local_layers, omega_0, local_context, running_stats)
            for k in local_sizes
        )
        self.instance_std = InstanceStandardization()
        self.bottleneck = channel_mixer(c * (10 + num_previous), c * factor)
        self.gibs = GIBS(c * factor, gibs_groups, running_stats)
        self.dropout = (nn.Dropout1d if d == 1 else nn.Dropout2d)(dropout)
        self.bias = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor, *previous: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        if len(previous) != self.num_previous:
            raise ValueError(f"this block takes {self.num_previous} earlier outputs, got {len(previous)}")
        if tuple(x.shape[1:]) != (self.channels, *self.size):
            raise ValueError(
                f"x must have shape (B, {self.channels}, {', '.join(map(str, self.size))}), got {tuple(x.shape)}"
            )
        ins = self.instance_std
        k_g = self.global_hzzw.kernel()  # (C, *S)
        w_hat = k_g * x
        fast = ins(self.rgu_a(w_hat) + self.rgu_b(x))
        m = ins(self.mixer(x))
        h = ins(self.hci(x))

        o1 = self.global_hzzw(x, fast, kernel=k_g)
        o2 = self.global_hzzw(x, m, kernel=k_g)
        o3 = self.global_hzzw(x, h, kernel=k_g)
        o4 = self.siglu(o1)
        o5 = self.hi(o1, x)

        l3, l9, l5, l7 = self.local
        b1 = l3(x, h)
        b2 = l9(h, x)
        b3 = l5(m, x)
        b4 = l7(x, m)

        prev = [tile_channels(p, self.channels) for p in previous]
        # The release's order (the bottleneck sees a permutation of the same channels).
        branches = [o1, b2, *prev[:1], fast, o2, b1, o4, b3, o3, b4, *prev[1:], o5]
        out = self.bottleneck(branches)  # of their concatenation, never materialized
        return self.dropout(self.gibs(out, gelu=True, bias=self.bias)), k_g

    def extra_repr(self) -> str:
        return f"channels={self.channels}, factor={self.factor}, size={self.size}, num_previous={self.num_previous}"
