"""Tiny Terminator configurations shared by the network tests (seconds on 2 cores)."""

from __future__ import annotations

import pytest
import torch

from terminator.models import Terminator


def tiny_config(data_dim: int = 2, **overrides) -> dict:
    """Three blocks (block 2 also takes block 0's output), small widths, all branches."""
    size = (8, 8) if data_dim == 2 else (16,)
    cfg = dict(
        data_dim=data_dim,
        size=size,
        num_classes=5,
        channels=(2, 4, 8),
        factors=(2, 2, 2),
        previous=((), (), (0,)),
        global_layers=(1, 2, 1),
        dropout=(0.0, 0.1, 0.1),
        mode="matmul" if data_dim == 2 else "dot",
        global_hidden=8,
        local_sizes=(3, 5, 3, 7),
        local_hidden=8,
        local_layers=2,
        gc_hidden=8,
        hi_channel_hidden=4,
        hi_spatial_hidden=8,
    )
    cfg.update(overrides)
    return cfg


def tiny_model(data_dim: int = 2, seed: int = 0, **overrides) -> Terminator:
    torch.manual_seed(seed)
    return Terminator(**tiny_config(data_dim, **overrides))


def tiny_input(model: Terminator, batch: int = 4, seed: int = 1, dtype=None) -> torch.Tensor:
    c = model.config
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(batch, c.channels[0], *c.size, generator=gen, dtype=dtype or torch.get_default_dtype())


def warm_up(model: Terminator, x: torch.Tensor, steps: int = 3) -> None:
    """A few training-mode forwards so running statistics move away from (0, 1)."""
    model.train()
    with torch.no_grad():
        for _ in range(steps):
            model(x)


@pytest.fixture(autouse=True, scope="module")
def single_thread():
    """One intra-op thread for a module's tests: the tensors are tiny, and two threads
    only add synchronization (badly so when the machine is shared)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
