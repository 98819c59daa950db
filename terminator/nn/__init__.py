"""Layers of the Terminator network: slow nets, HyperZ·Z·W layers, SFNE block.

Every HyperZ·Z·W product and hyper-kernel convolution runs through
:mod:`terminator.ops`, so the active backend applies. See docs/ARCHITECTURE.md.
"""

from .block import SFNEBlock, tile_channels
from .layers import (
    RGU,
    GlobalHyperZZW,
    HyperChannelInteraction,
    HyperInteraction,
    LocalHyperZZW,
    SiGLU,
    channel_mixer,
)
from .norm import GIBS, BatchStandardization, InstanceStandardization
from .pointwise import Pointwise
from .slow import (
    DEFAULT_OMEGA_0,
    CachedKernel,
    LocalContext,
    MAGNet,
    SlowNetG,
    SlowNetGC,
    SlowNetL,
    coordinate_grid,
)

__all__ = [
    "DEFAULT_OMEGA_0",
    "coordinate_grid",
    "MAGNet",
    "CachedKernel",
    "SlowNetG",
    "SlowNetGC",
    "SlowNetL",
    "LocalContext",
    "GlobalHyperZZW",
    "LocalHyperZZW",
    "RGU",
    "HyperChannelInteraction",
    "HyperInteraction",
    "SiGLU",
    "InstanceStandardization",
    "BatchStandardization",
    "GIBS",
    "SFNEBlock",
    "tile_channels",
    "channel_mixer",
    "Pointwise",
]
