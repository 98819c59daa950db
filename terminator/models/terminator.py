"""The Terminator network: a stack of SFNE blocks, global average pool, linear head."""

from __future__ import annotations

import copy
import dataclasses
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..nn.block import SFNEBlock
from ..nn.slow import DEFAULT_OMEGA_0

__all__ = ["Terminator", "TerminatorConfig", "PRESETS", "parameter_count", "preset_parameter_counts"]


@dataclass
class TerminatorConfig:
    """Everything that defines a :class:`Terminator` (``Terminator(**fields)``).

    The input is ``(B, channels[0], *size)``. ``patch`` > 1 first folds every
    ``patch``-wide cell of pixels into channels (space-to-depth, no parameters): the blocks
    then run at ``block_size = size / patch`` and block 0 takes ``channels[0]·patch^d``
    channels (``block_channels``). ``channels[i]`` (i ≥ 1) is block i's input width,
    ``factors[i]`` block i's bottleneck factor; block i's output
    (``block_channels[i]·factors[i]``) must be block i+1's input.
    ``previous[i]`` lists the earlier blocks whose outputs block i also takes (tiled
    along channels), at most two. ``faithful=True`` forces the release's choices:
    batch-mean local context and batch statistics at eval.
    """

    data_dim: int = 2
    size: tuple[int, ...] | None = None  # None: (32, 32) in 2D, (784,) in 1D
    patch: int = 1
    num_classes: int = 10
    channels: tuple[int, ...] = (3, 12, 36, 72, 144)
    factors: tuple[int, ...] = (4, 3, 2, 2, 2)
    previous: tuple[tuple[int, ...], ...] = ((), (), (0,), (1,), (2, 1))
    global_layers: tuple[int, ...] = (3, 2, 2, 2, 2)
    dropout: tuple[float, ...] = (0.0, 0.05, 0.05, 0.05, 0.05)
    mode: str | None = None  # None: "matmul" for square 2D inputs (the release), else "dot"
    global_hidden: int = 64
    local_sizes: tuple[int, ...] = (3, 9, 5, 7)
    local_hidden: int = 32
    local_layers: int = 2
    gc_hidden: int = 32
    gc_layers: int = 2
    hi_channel_hidden: int = 16
    hi_spatial_hidden: int = 64
    hi_layers: int = 2
    gibs_groups: int = 12
    omega_0: float = DEFAULT_OMEGA_0
    local_context: str = "sample"
    running_stats: bool = True
    faithful: bool = False

    def __post_init__(self):
        if self.data_dim not in (1, 2):
            raise ValueError(f"data_dim must be 1 or 2, got {self.data_dim}")
        if self.size is None:
            self.size = (32, 32) if self.data_dim == 2 else (784,)
        self.size = (self.size,) * self.data_dim if isinstance(self.size, int) else tuple(self.size)
        if len(self.size) != self.data_dim:
            raise ValueError(f"size must have {self.data_dim} entries for data_dim={self.data_dim}, got {self.size}")
        if not isinstance(self.patch, int) or self.patch < 1 or any(s % self.patch for s in self.size):
            raise ValueError(f"patch must be a positive integer that divides every size {self.size}, got {self.patch}")
        if self.mode is None:
            square = self.data_dim == 2 and self.size[0] == self.size[1]
            self.mode = "matmul" if square else "dot"
        self.channels = tuple(self.channels)
        self.factors = tuple(self.factors)
        self.previous = tuple(tuple(p) for p in self.previous)
        self.global_layers = tuple(self.global_layers)
        self.dropout = tuple(self.dropout)
        self.local_sizes = tuple(self.local_sizes)
        if self.faithful:
            self.local_context = "batch"
            self.running_stats = False
        n = len(self.channels)
        for name in ("factors", "previous", "global_layers", "dropout"):
            if len(getattr(self, name)) != n:
                raise ValueError(f"{name} must have one entry per block ({n}), got {getattr(self, name)}")
        for i in range(n - 1):
            width = self.block_channels[i]
            if width * self.factors[i] != self.channels[i + 1]:
                name = f"channels[{i}]" if i or self.patch == 1 else f"channels[0]*patch^{self.data_dim}"
                raise ValueError(
                    f"block {i} outputs {name}*factors[{i}] = {width * self.factors[i]} "
                    f"channels, but block {i + 1} takes channels[{i + 1}] = {self.channels[i + 1]}"
                )
        for i, prev in enumerate(self.previous):
            if len(prev) > 2 or any(not 0 <= j < i - 1 for j in prev):
                raise ValueError(f"previous[{i}] must list at most two blocks before block {i - 1}, got {prev}")

    @property
    def block_channels(self) -> tuple[int, ...]:
        """Each block's input width (block 0's after the space-to-depth of ``patch``)."""
        return (self.channels[0] * self.patch**self.data_dim, *self.channels[1:])

    @property
    def block_size(self) -> tuple[int, ...]:
        """The spatial size the blocks run at: ``size / patch``."""
        return tuple(s // self.patch for s in self.size)

    @property
    def out_channels(self) -> int:
        return self.block_channels[-1] * self.factors[-1]


#: Preset name → keyword arguments of :class:`TerminatorConfig`.
PRESETS: dict[str, dict[str, Any]] = {
    # The author's CIFAR-10 release, exactly (32×32×3, 5 blocks, matmul global branches).
    "cifar10": dict(data_dim=2, size=(32, 32), mode="matmul"),
    # Fashion-MNIST 28×28×1, small enough to train on two CPU cores.
    "fmnist": dict(
        data_dim=2,
        size=(28, 28),
        channels=(1, 4, 8),
        factors=(4, 2, 2),
        previous=((), (), (0,)),
        global_layers=(2, 2, 2),
        dropout=(0.0, 0.05, 0.05),
        mode="dot",
        global_hidden=32,
        hi_spatial_hidden=32,
    ),
    # Fashion-MNIST, the fmnist network 1.5× wider with a 48-channel last block (chosen on a
    # validation split, docs/RESULTS.md).
    "fmnist-wide": None,  # filled in below
    # Fashion-MNIST, the fmnist network 2× wider with a 64-channel last block (chosen on a
    # validation split, docs/RESULTS.md).
    "fmnist-large": None,  # filled in below
    # Fashion-MNIST with 2×2 cells of pixels folded into channels: the blocks run at 14×14,
    # 12 and 24 channels wide, a 96-channel last block (docs/RESULTS.md).
    "fmnist-patch": None,  # filled in below
    # Sequential 28×28 images (pixel sequences, length 784).
    "seq784": None,  # the fmnist network over the 784-long pixel sequence (filled in below)
    # MNIST-1D (length 40).
    "mnist1d": dict(
        data_dim=1,
        size=(40,),
        channels=(1, 12, 24, 48),
        factors=(12, 2, 2, 2),
        previous=((), (), (0,), (1,)),
        global_layers=(3, 2, 2, 2),
        dropout=(0.0, 0.05, 0.05, 0.05),
        mode="dot",
    ),
}
PRESETS["fmnist-wide"] = {**PRESETS["fmnist"], "channels": (1, 6, 12), "factors": (6, 2, 4)}
PRESETS["fmnist-large"] = {**PRESETS["fmnist"], "channels": (1, 8, 16), "factors": (8, 2, 4)}
PRESETS["fmnist-patch"] = {**PRESETS["fmnist"], "patch": 2, "channels": (1, 12, 24), "factors": (3, 2, 4)}
PRESETS["seq784"] = {**PRESETS["fmnist"], "data_dim": 1, "size": (784,)}


class Terminator(nn.Module):
    """Terminator: SFNE blocks without residual connections, pooling or affine norms.

    Input ``(B, channels[0], *size)``; output logits ``(B, num_classes)``. Block i gets
    the previous block's output plus a learnable scalar bias, and the raw outputs of
    the blocks in ``previous[i]``; after the last block: global average pool, + a
    scalar bias, linear head (kaiming-normal, bias 0).

    Build from keyword arguments (see :class:`TerminatorConfig`, defaults = the
    ``cifar10`` release) or ``Terminator.from_preset(name, num_classes=...)``.
    ``forward(x, return_kernels=True)`` also returns each block's global kernel
    ``K_g (C_i, *block_size)`` for :func:`terminator.losses.slow_neural_loss`.
    """

    def __init__(self, config: TerminatorConfig | None = None, **kwargs: Any):
        super().__init__()
        if config is None:
            config = TerminatorConfig(**kwargs)
        elif kwargs:
            config = dataclasses.replace(config, **kwargs)
        self.config = config
        c = config
        self.blocks = nn.ModuleList(
            SFNEBlock(
                c.data_dim,
                c.block_channels[i],
                c.factors[i],
                c.block_size,
                num_previous=len(c.previous[i]),
                mode=c.mode,
                global_hidden=c.global_hidden,
                global_layers=c.global_layers[i],
                local_sizes=c.local_sizes,
                local_hidden=c.local_hidden,
                local_layers=c.local_layers,
                gc_hidden=c.gc_hidden,
                gc_layers=c.gc_layers,
                hi_channel_hidden=c.hi_channel_hidden,
                hi_spatial_hidden=c.hi_spatial_hidden,
                hi_layers=c.hi_layers,
                gibs_groups=c.gibs_groups,
                dropout=c.dropout[i],
                omega_0=c.omega_0,
                local_context=c.local_context,
                running_stats=c.running_stats,
            )
            for i in range(len(c.channels))
        )
        # bias[i] is added to block i's output before the next block (or the head).
        self.bias = nn.Parameter(torch.zeros(len(c.channels)))
        self.head = nn.Linear(c.out_channels, c.num_classes)
        with torch.no_grad():
            nn.init.kaiming_normal_(self.head.weight)
            self.head.bias.zero_()

    @classmethod
    def from_preset(cls, name: str, num_classes: int | None = None, **overrides: Any) -> "Terminator":
        """A preset: ``"cifar10"`` (the release), ``"fmnist"``, ``"fmnist-wide"``,
        ``"fmnist-large"``, ``"fmnist-patch"``, ``"seq784"``, ``"mnist1d"``.

        ``overrides`` replace preset fields, e.g. ``faithful=True`` or ``mode="conv"``.
        """
        if name not in PRESETS:
            raise ValueError(f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
        kwargs = {**copy.deepcopy(PRESETS[name]), **overrides}
        if num_classes is not None:
            kwargs["num_classes"] = num_classes
        return cls(TerminatorConfig(**kwargs))

    @property
    def num_parameters(self) -> int:
        """Number of trainable scalars."""
        return parameter_count(self)

    def global_kernels(self) -> list[torch.Tensor]:
        """Each block's global hyper-kernel ``K_g (C_i, *block_size)`` (input-independent)."""
        return [block.global_hzzw.kernel() for block in self.blocks]

    def forward(self, x: torch.Tensor, return_kernels: bool = False):
        """``x (B, C_0, *size)`` → logits ``(B, num_classes)`` [, list of ``K_g``]."""
        c = self.config
        expected = (c.channels[0], *c.size)
        if x.dim() != 2 + c.data_dim or tuple(x.shape[1:]) != expected:
            raise ValueError(f"x must have shape (B, {', '.join(map(str, expected))}), got {tuple(x.shape)}")
        outputs: list[torch.Tensor] = []
        kernels: list[torch.Tensor] = []
        h = space_to_depth(x, c.patch)
        for i, block in enumerate(self.blocks):
            if i > 0:
                h = outputs[-1] + self.bias[i - 1]
            out, k_g = block(h, *(outputs[j] for j in c.previous[i]))
            outputs.append(out)
            kernels.append(k_g)
        pooled = outputs[-1].flatten(2).mean(dim=2) + self.bias[-1]
        logits = self.head(pooled)
        return (logits, kernels) if return_kernels else logits

    def summary(self) -> str:
        """A short table: one row per block (channels, earlier inputs, kernel, parameters)."""
        c = self.config
        size, block_size = (", ".join(map(str, s)) for s in (c.size, c.block_size))
        folded = f"patch {c.patch} → ({c.block_channels[0]}, {block_size}), " if c.patch > 1 else ""
        rows = [
            f"Terminator {c.data_dim}D, input ({c.channels[0]}, {size}), {folded}"
            f"mode={c.mode!r}, local_context={c.local_context!r}, running_stats={c.running_stats}"
        ]
        rows.append(
            f"{'block':>5}  {'in':>5} {'out':>5}  {'previous':<9} {'G layers':>8} {'dropout':>7} {'params':>10}"
        )
        for i, block in enumerate(self.blocks):
            prev = ",".join(map(str, c.previous[i])) or "-"
            rows.append(
                f"{i:>5}  {c.block_channels[i]:>5} {c.block_channels[i] * c.factors[i]:>5}  {prev:<9} "
                f"{c.global_layers[i]:>8} {c.dropout[i]:>7g} {parameter_count(block):>10,}"
            )
        rows.append(
            f"{'head':>5}  {c.out_channels:>5} {c.num_classes:>5}  {'':<9} {'':>8} {'':>7} "
            f"{parameter_count(self.head) + self.bias.numel():>10,}"
        )
        rows.append(f"total parameters: {parameter_count(self):,}")
        return "\n".join(rows)

    def extra_repr(self) -> str:
        c = self.config
        return (
            f"data_dim={c.data_dim}, size={c.size}, patch={c.patch}, channels={c.channels}, factors={c.factors}, "
            f"previous={c.previous}, mode={c.mode!r}, local_context={c.local_context!r}, "
            f"running_stats={c.running_stats}, parameters={parameter_count(self):,}"
        )


def space_to_depth(x: torch.Tensor, patch: int) -> torch.Tensor:
    """``(B, C, *S)`` → ``(B, C·patch^d, *S/patch)``: each ``patch``-wide cell of pixels becomes
    channels (channel-major, then the cell's rows and columns, as ``pixel_unshuffle``)."""
    if patch == 1:
        return x
    if x.dim() == 4:
        return F.pixel_unshuffle(x, patch)
    b, c, n = x.shape
    return x.reshape(b, c, n // patch, patch).transpose(2, 3).reshape(b, c * patch, n // patch)


def parameter_count(model: nn.Module) -> int:
    """Number of trainable scalars of ``model``."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def preset_parameter_counts(num_classes: int | None = None) -> dict[str, int]:
    """Parameter count of every preset (built on the CPU)."""
    return {name: Terminator.from_preset(name, num_classes=num_classes).num_parameters for name in PRESETS}
