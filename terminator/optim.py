"""The Kar optimizers of the Terminator release: sign steps with running means.

``Kar3`` (two running means ``m1``, ``m2`` of the gradient, betas (0.5, 0.95)) takes,
for every parameter with a gradient ``g``::

    p  ← p − lr · (sign(g) + sign(m1) + sign(m2))     # m1, m2 from before this step
    m1 ← β1·m1 + (1 − β1)·g
    m2 ← β2·m2 + (1 − β2)·g

``Kar2`` is the same with one running mean (β = 0.95). The step uses the running means
*before* they take in the current gradient (pre-step values), as the release did: the
first step is a plain sign step (``sign(0) = 0``) and the means then lag one gradient
behind. No weight decay (the release removed it; use :func:`terminator.losses.fast_l2_penalty`).
"""

from __future__ import annotations

from typing import Callable, Iterable

import torch
from torch.optim import Optimizer

__all__ = ["Kar2", "Kar3"]

DEFAULT_LR = 1.215e-3  # the release's CIFAR-10 learning rate


def _check_beta(beta: float, name: str) -> None:
    if not 0.0 <= beta < 1.0:
        raise ValueError(f"{name} must be in [0, 1), got {beta}")


def _fused_step_serves(params) -> bool:
    """Whether ``torch.ops.terminator.kar_step_`` (the compiled CPU backend's one-call step;
    it runs ATen's operations for tensors its loop does not take) serves these parameters;
    else the foreach ops do (other devices, torch.compile, ``TERMINATOR_BACKEND=reference``)."""
    from . import ops

    if "cpu" not in ops.backend().devices or torch.compiler.is_compiling():
        return False
    return all(p.device.type == "cpu" for p in params)  # the op has no kernel for other devices


class _Kar(Optimizer):
    def __init__(self, params: Iterable, defaults: dict):
        if not defaults["lr"] >= 0.0:
            raise ValueError(f"lr must be >= 0, got {defaults['lr']}")
        super().__init__(params, defaults)

    def _betas(self, group: dict) -> tuple[float, ...]:
        raise NotImplementedError

    @torch.no_grad()
    def step(self, closure: Callable[[], torch.Tensor] | None = None):
        """One Kar step over every parameter that has a gradient; returns the closure's loss."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            lr = group["lr"]
            betas = self._betas(group)
            params = [p for p in group["params"] if p.grad is not None]
            if not params:
                continue
            grads = [p.grad for p in params]
            if any(g.is_sparse for g in grads):
                raise RuntimeError(f"{type(self).__name__} does not support sparse gradients")
            for p in params:
                state = self.state[p]
                if not state:
                    state["step"] = torch.zeros((), dtype=torch.float32)
                    for n in range(len(betas)):
                        state[f"exp_avg_{n + 1}"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            states = [self.state[p] for p in params]
            means = [[st[f"exp_avg_{n + 1}"] for st in states] for n in range(len(betas))]
            steps = [st["step"] for st in states]
            if _fused_step_serves(params):
                flat_means = [m for ms in means for m in ms]
                torch.ops.terminator.kar_step_(params, grads, flat_means, steps, float(lr), list(betas))
                continue
            # One multi-tensor kernel per operation instead of one kernel per parameter.
            direction = torch._foreach_sign(grads)
            for m in means:
                torch._foreach_add_(direction, torch._foreach_sign(m))
            torch._foreach_add_(params, direction, alpha=-lr)
            for m, beta in zip(means, betas):
                torch._foreach_lerp_(m, grads, 1.0 - beta)
            torch._foreach_add_(steps, 1)
        return loss


class Kar3(_Kar):
    """Kar3: ``p -= lr·(sign(g) + sign(m1) + sign(m2))``, then update ``m1``, ``m2``.

    Args:
        params: parameters or parameter groups.
        lr: step size (default 1.215e-3, the release's).
        betas: decay of the two running means of the gradient (default (0.5, 0.95)).
    """

    def __init__(self, params: Iterable, lr: float = DEFAULT_LR, betas: tuple[float, float] = (0.5, 0.95)):
        betas = tuple(float(b) for b in betas)
        if len(betas) != 2:
            raise ValueError(f"betas must hold two values, got {betas}")
        _check_beta(betas[0], "betas[0]")
        _check_beta(betas[1], "betas[1]")
        super().__init__(params, dict(lr=lr, betas=betas))

    def _betas(self, group: dict) -> tuple[float, ...]:
        return tuple(group["betas"])


class Kar2(_Kar):
    """Kar2: ``p -= lr·(sign(g) + sign(m))``, then update ``m``.

    Args:
        params: parameters or parameter groups.
        lr: step size (default 1.215e-3).
        beta: decay of the running mean of the gradient (default 0.95).
    """

    def __init__(self, params: Iterable, lr: float = DEFAULT_LR, beta: float = 0.95):
        _check_beta(float(beta), "beta")
        super().__init__(params, dict(lr=lr, beta=float(beta)))

    def _betas(self, group: dict) -> tuple[float, ...]:
        return (group["beta"],)
