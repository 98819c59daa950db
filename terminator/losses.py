"""Training losses of the Terminator (docs/ARCHITECTURE.md).

* :func:`label_smoothed_cross_entropy` — cross-entropy with label smoothing ε (0.09).
* :func:`slow_neural_loss` — ties the blocks' global hyper-kernels together.
* :func:`fast_l2_penalty` — an L2 penalty (5e-5) on the *fast* parameters.
* :class:`TerminatorLoss` — the three together, as the release trained.

Fast and slow parameters (:func:`split_parameters`): a parameter is **slow** when it
belongs to a :class:`terminator.nn.MAGNet` (a coordinate MLP: filters, hidden and output
linears, bias map) or is the re-normalization α/β of a :class:`terminator.nn.SlowNetL`;
these generate hyper-kernels from coordinates and never see an activation. Every other
parameter is **fast**: channel mixers, bottlenecks, RGUs, the context path of the local
slow nets (:class:`terminator.nn.LocalContext`, which reads activations), scalar biases
and the head.
"""

from __future__ import annotations

import weakref
from typing import NamedTuple, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from .nn.block import tile_channels
from .nn.slow import MAGNet, SlowNetL

__all__ = [
    "label_smoothed_cross_entropy",
    "LabelSmoothedCrossEntropy",
    "slow_neural_loss",
    "split_parameters",
    "fast_parameters",
    "slow_parameters",
    "fast_l2_penalty",
    "TerminatorLoss",
    "LossParts",
]

DEFAULT_SMOOTHING = 0.09
DEFAULT_L2 = 5e-5


def label_smoothed_cross_entropy(
    logits: torch.Tensor, target: torch.Tensor, eps: float = DEFAULT_SMOOTHING, reduction: str = "mean"
) -> torch.Tensor:
    """``(1 − ε)·NLL(target) + ε·mean_c(−log p_c)``; logits ``(B, K)``, target ``(B,)`` class ids."""
    return F.cross_entropy(logits, target, label_smoothing=eps, reduction=reduction)


class LabelSmoothedCrossEntropy(nn.Module):
    """Module form of :func:`label_smoothed_cross_entropy`."""

    def __init__(self, eps: float = DEFAULT_SMOOTHING, reduction: str = "mean"):
        super().__init__()
        self.eps = eps
        self.reduction = reduction

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return label_smoothed_cross_entropy(logits, target, self.eps, self.reduction)

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}"


def slow_neural_loss(kernels: Sequence[torch.Tensor]) -> torch.Tensor:
    """``Σ_{j<i} mean((tile(K_j) − K_i)²)`` over the blocks' global kernels ``K_i (C_i, *S)``.

    ``tile`` repeats block j's kernel along channels to ``C_i`` (the release tiled by the
    product of the bottleneck factors in between, which is the same when channels grow by
    those factors). A local feedback error that pulls the slow nets toward each other.
    """
    if not kernels:
        raise ValueError("kernels must hold at least one global kernel")
    loss = kernels[0].new_zeros(())
    for i in range(1, len(kernels)):
        for j in range(i):
            tiled = tile_channels(kernels[j], kernels[i].shape[0], dim=0)
            loss = loss + (tiled - kernels[i]).pow(2).mean()
    return loss


def _slow_ids(model: nn.Module) -> set[int]:
    ids: set[int] = set()
    for module in model.modules():
        if isinstance(module, MAGNet):
            ids.update(id(p) for p in module.parameters())
        elif isinstance(module, SlowNetL):
            ids.update((id(module.renorm_alpha), id(module.renorm_beta)))
    return ids


# model → (its parameters, (fast, slow)) from the last split; a training step asks every time.
_SPLITS: "weakref.WeakKeyDictionary[nn.Module, tuple]" = weakref.WeakKeyDictionary()


def split_parameters(model: nn.Module) -> tuple[list[nn.Parameter], list[nn.Parameter]]:
    """``(fast, slow)`` parameter lists of ``model`` (see the module docstring)."""
    params = tuple(model.parameters())
    cached = _SPLITS.get(model)
    if cached is not None and len(cached[0]) == len(params) and all(a is b for a, b in zip(cached[0], params)):
        fast, slow = cached[1]
        return list(fast), list(slow)
    slow_ids = _slow_ids(model)
    fast, slow = [], []
    for p in params:
        (slow if id(p) in slow_ids else fast).append(p)
    _SPLITS[model] = (params, (tuple(fast), tuple(slow)))
    return fast, slow


def fast_parameters(model: nn.Module) -> list[nn.Parameter]:
    return split_parameters(model)[0]


def slow_parameters(model: nn.Module) -> list[nn.Parameter]:
    return split_parameters(model)[1]


def fast_l2_penalty(model: nn.Module, weight: float = DEFAULT_L2, squared: bool = False) -> torch.Tensor:
    """``weight · Σ_p ‖p‖₂`` over the fast parameters (``squared=True``: ``Σ_p ‖p‖₂²``).

    The release summed the (unsquared) L2 norms of its fast parameters; that is the
    default. ``squared=True`` is the usual weight-decay form.
    """
    fast = [p for p in fast_parameters(model) if p.requires_grad]
    if not fast:
        return torch.zeros(())
    if squared:
        return weight * torch.stack([p.pow(2).sum() for p in fast]).sum()
    return weight * torch.stack(torch._foreach_norm(fast)).sum()  # one call for all norms


class LossParts(NamedTuple):
    total: torch.Tensor
    cross_entropy: torch.Tensor
    slow: torch.Tensor
    l2: torch.Tensor


class TerminatorLoss(nn.Module):
    """The release's training objective: smoothed CE + slow neural loss + fast L2.

    ``loss(model, logits, target, kernels)`` with ``logits, kernels =
    model(x, return_kernels=True)``; returns :class:`LossParts` (``.total`` to backprop).
    """

    def __init__(
        self, eps: float = DEFAULT_SMOOTHING, l2: float = DEFAULT_L2, slow_weight: float = 1.0, squared_l2: bool = False
    ):
        super().__init__()
        self.eps = eps
        self.l2 = l2
        self.slow_weight = slow_weight
        self.squared_l2 = squared_l2

    def forward(
        self,
        model: nn.Module,
        logits: torch.Tensor,
        target: torch.Tensor,
        kernels: Sequence[torch.Tensor] | None = None,
    ) -> LossParts:
        ce = label_smoothed_cross_entropy(logits, target, self.eps)
        slow = slow_neural_loss(kernels) if kernels and self.slow_weight else ce.new_zeros(())
        l2 = fast_l2_penalty(model, self.l2, self.squared_l2).to(ce) if self.l2 else ce.new_zeros(())
        return LossParts(ce + self.slow_weight * slow + l2, ce, slow, l2)

    def extra_repr(self) -> str:
        return f"eps={self.eps:g}, l2={self.l2:g}, slow_weight={self.slow_weight:g}"
