"""One process, or one rank of a DDP job started by torchrun: setup, collectives, teardown."""

from __future__ import annotations

import dataclasses
import gc
import os

import torch
import torch.distributed as dist

__all__ = ["Dist", "setup", "all_sum", "barrier", "wrap", "max_param_diff", "teardown"]


@dataclasses.dataclass
class Dist:
    """This process's place in the job (rank 0 of 1 without torchrun) and its device."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1


def setup(device: str) -> Dist:
    """Joins the process group when torchrun started this process; ``device`` is auto, cpu or cuda."""
    want_cuda = device == "cuda" or (device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        local = int(os.environ.get("LOCAL_RANK", "0"))
        if want_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if want_cuda else "gloo")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", "0"))
    else:
        rank, world, local = 0, 1, 0
    return Dist(rank, world, local, torch.device(f"cuda:{local}") if want_cuda else torch.device("cpu"))


def all_sum(d: Dist, values: list[float] | torch.Tensor) -> torch.Tensor:
    """``values`` summed over the ranks, as a float64 CPU tensor."""
    t = torch.as_tensor(values, dtype=torch.float64)
    if d.active:
        t = t.to(d.device)
        dist.all_reduce(t)
    return t.cpu()


def barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


def wrap(model: torch.nn.Module, d: Dist) -> torch.nn.Module:
    """``model`` in DistributedDataParallel when several ranks train it."""
    if not d.active:
        return model
    return torch.nn.parallel.DistributedDataParallel(
        model, device_ids=[d.local_rank] if d.device.type == "cuda" else None
    )


def max_param_diff(model: torch.nn.Module, d: Dist) -> float:
    """Largest difference between any rank's parameters and rank 0's (0 in one process)."""
    if not d.active:
        return 0.0
    flat = torch.cat([p.detach().reshape(-1).double().cpu() for p in model.parameters()])
    ref = flat.clone().to(d.device)
    dist.broadcast(ref, 0)
    diff = (flat.to(d.device) - ref).abs().max().reshape(1)
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


def teardown(d: Dist) -> None:
    """Every rank leaves together: a rank tearing down gloo while another still works can abort.

    Call it once nothing (a DDP wrapper included) references the process group any more, so
    that its threads and connections close here rather than during interpreter shutdown.
    """
    if d.active:
        barrier(d)
        dist.destroy_process_group()
        gc.collect()
