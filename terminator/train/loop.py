"""The training loop (one process, or DDP under torchrun): setup, resume, epochs, checkpoints."""

from __future__ import annotations

import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

from ..losses import TerminatorLoss
from ..models.terminator import Terminator
from ..optim import Kar2, Kar3
from . import distributed
from .allocator import keep_freed_memory
from .checkpoint import (
    check_resumable,
    load_checkpoint,
    model_from_checkpoint,
    save_atomic,
    set_rng_state,
    write_csv_atomic,
)
from .config import TrainConfig
from .data import Splits, augment_batch, default_preset, load_dataset
from .distributed import Dist
from .evaluation import evaluate
from .run import METRIC_FIELDS, Run, checkpoint_state, finish, prepare_run_dir, run_dir

__all__ = ["train", "build_model", "lr_factor"]


def build_model(cfg: TrainConfig, shape: tuple[int, ...], num_classes: int) -> Terminator:
    """The configured network for samples of ``shape`` ``(C, *S)``."""
    preset, overrides = default_preset(cfg.dataset)
    if cfg.preset and cfg.preset != preset:
        preset, overrides = cfg.preset, {}
    kwargs = {
        **overrides,
        **cfg.model,
        "size": tuple(shape[1:]),
        "num_classes": num_classes,
        "data_dim": len(shape) - 1,
    }
    kwargs = {
        k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
        for k, v in kwargs.items()
    }
    model = Terminator.from_preset(preset, **kwargs)
    if model.config.channels[0] != shape[0]:
        raise ValueError(f"the model takes {model.config.channels[0]} input channels, the data has {shape[0]}")
    return model


def lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    """Linear warm-up over ``warmup`` steps, then cosine decay to ``min_ratio``."""
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


def train(cfg: TrainConfig, resume: str | None = None, log=print) -> dict:
    """Trains per ``cfg``; ``resume``: a checkpoint path, or ``"auto"`` for ``OUT/last.pt`` if present.

    Returns the result dict (also written to ``OUT/results.json`` by rank 0).
    """
    d = distributed.setup(cfg.device)
    out = run_dir(cfg)
    ckpt, ckpt_path = _checkpoint_to_resume(out, resume, d, log)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)
    splits = load_dataset(cfg)
    if ckpt is not None:
        model = model_from_checkpoint(ckpt, ckpt_path)
    else:
        model = build_model(cfg, splits.shape, splits.num_classes)
    run = _start(cfg, d, out, splits, model.to(d.device))
    if ckpt is not None:
        _restore(run, ckpt)
        if d.main:
            log(f"resumed from epoch {run.epoch} ({out})")
    if d.main:
        prepare_run_dir(run, log)

    objective = TerminatorLoss(eps=cfg.label_smoothing, l2=cfg.l2, slow_weight=cfg.slow_weight)
    end_epoch = cfg.epochs if not cfg.stop_after else min(cfg.epochs, run.epoch + cfg.stop_after)
    started = time.perf_counter()
    for epoch in range(run.epoch, end_epoch):
        row = _train_epoch(run, objective, epoch)
        _evaluate_epoch(run, row)
        _end_epoch(run, row, last=epoch + 1 == end_epoch, log=log)
    result = finish(run, session_seconds=time.perf_counter() - started, log=log)
    del run, model  # the DDP wrapper holds the process group: free it before the group is destroyed
    distributed.teardown(d)
    return result


def _checkpoint_to_resume(out: Path, resume: str | None, d: Dist, log) -> tuple[dict | None, Path | None]:
    if not resume:
        return None, None
    path = out / "last.pt" if resume == "auto" else Path(resume)
    if path.is_file():
        ckpt = load_checkpoint(path)
        check_resumable(ckpt, path)
        return ckpt, path
    if resume != "auto":
        raise FileNotFoundError(f"--resume: no checkpoint at {path}")
    if d.main:
        log(f"no checkpoint at {path}: starting a new run")
    return None, None


def _start(cfg: TrainConfig, d: Dist, out: Path, splits: Splits, model: Terminator) -> Run:
    """Optimizer, sampler and learning-rate schedule around ``model``."""
    if cfg.optimizer == "kar3":
        opt = Kar3(model.parameters(), lr=cfg.lr, betas=cfg.betas)
    elif cfg.optimizer == "kar2":
        opt = Kar2(model.parameters(), lr=cfg.lr, beta=cfg.betas[-1])
    else:
        opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, betas=cfg.betas)
    per_rank = max(1, cfg.batch_size // d.world)
    sampler = torch.utils.data.distributed.DistributedSampler(
        range(len(splits.train_y)), num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed, drop_last=True
    )
    steps_per_epoch = max(1, math.ceil(len(sampler) / per_rank))
    total, warmup = steps_per_epoch * cfg.epochs, int(round(cfg.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, cfg.min_lr_ratio))
    net = distributed.wrap(model, d)
    if cfg.compile:
        # Static shapes: an epoch's last, smaller batch gets its own graph instead of a symbolic one.
        net = torch.compile(net, dynamic=False)
    return Run(cfg, d, out, splits, model, net, opt, sched, sampler, per_rank)


def _restore(run: Run, ckpt: dict) -> None:
    run.opt.load_state_dict(ckpt["optimizer"])
    run.sched.load_state_dict(ckpt["scheduler"])
    run.epoch, run.history, run.best = int(ckpt["epoch"]), list(ckpt["history"]), dict(ckpt["best"])
    rngs = ckpt["rng"]
    set_rng_state(rngs[run.d.rank % len(rngs)])


def _train_epoch(run: Run, objective: TerminatorLoss, epoch: int) -> dict:
    """One pass over this rank's share of the training set; the epoch's metrics row."""
    cfg, d, splits = run.cfg, run.d, run.splits
    run.net.train()
    run.sampler.set_epoch(epoch)
    order = torch.tensor(list(iter(run.sampler)), dtype=torch.long)
    gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch * 101 + d.rank)
    sums = torch.zeros(5, dtype=torch.float64)  # total, ce, slow, correct, n (sums over samples)
    batches = range(0, len(order), run.per_rank)
    bar = _progress_bar(len(batches), epoch, cfg) if d.main and cfg.progress else None
    t0 = time.perf_counter()
    for i in batches:
        b = order[i : i + run.per_rank]
        xb = splits.train_x[b]
        if cfg.augment:
            xb = augment_batch(xb, cfg.shift, cfg.flip, gen)
        xb, yb = xb.to(d.device), splits.train_y[b].to(d.device)
        run.opt.zero_grad(set_to_none=True)
        logits, kernels = run.net(xb, return_kernels=True)
        parts = objective(run.model, logits, yb, kernels)
        parts.total.backward()
        run.opt.step()
        run.sched.step()
        n, total = len(b), parts.total.item()
        sums += torch.tensor(
            [
                total * n,
                parts.cross_entropy.item() * n,
                parts.slow.item() * n,
                float((logits.argmax(1) == yb).sum()),
                n,
            ],
            dtype=torch.float64,
        )
        if bar is not None:
            bar.update(1)
            bar.set_postfix(loss=f"{total:.3f}", lr=f"{run.sched.get_last_lr()[0]:.2e}")
    if bar is not None:
        bar.close()
    sums = distributed.all_sum(d, sums)
    seconds = time.perf_counter() - t0
    n = max(float(sums[4]), 1.0)
    previous = (run.history[-1].get("train_seconds") or 0.0) if run.history else 0.0
    return {
        "epoch": epoch + 1,
        "train_loss": float(sums[0]) / n,
        "train_ce": float(sums[1]) / n,
        "train_acc": float(sums[3]) / n,
        "slow_loss": float(sums[2]) / n,
        "val_loss": float("nan"),
        "val_acc": float("nan"),
        "lr": float(run.sched.get_last_lr()[0]),
        "seconds": seconds,
        "samples_per_s": n / seconds,
        # training seconds summed over epochs (and sessions): the x axis of time-to-accuracy
        "train_seconds": previous + seconds,
    }


def _progress_bar(total: int, epoch: int, cfg: TrainConfig):
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return None
    return tqdm(total=total, desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False, file=sys.stderr, dynamic_ncols=True)


def _evaluate_epoch(run: Run, row: dict) -> None:
    cfg, splits = run.cfg, run.splits
    if splits.val_y is not None:
        v = evaluate(run.model, splits.val_x, splits.val_y, cfg.eval_batch_size, run.d, splits.num_classes)
        row["val_loss"], row["val_acc"] = v["loss"], v["acc"]
    if cfg.track_test:
        row["test_acc"] = evaluate(
            run.model, splits.test_x, splits.test_y, cfg.eval_batch_size, run.d, splits.num_classes
        )["acc"]


def _end_epoch(run: Run, row: dict, last: bool, log) -> None:
    """Records the row; writes best.pt (best validation accuracy) and last.pt; logs."""
    d, has_val = run.d, run.splits.val_y is not None
    run.history.append(row)
    epoch = row["epoch"]
    metric = row["val_acc"] if has_val else float(epoch)  # without validation: the last epoch
    improved = metric > run.best["metric"]
    if improved:
        run.best = {"epoch": epoch, "metric": metric}
    if improved or last or epoch % max(1, run.cfg.checkpoint_every) == 0:
        state = checkpoint_state(run, epoch)  # collective (RNG states of every rank)
        if d.main:
            if improved:
                save_atomic(state, run.out / "best.pt")
            save_atomic(state, run.out / "last.pt")
    if d.main:
        write_csv_atomic(run.out / "metrics.csv", run.history, METRIC_FIELDS)
        val = f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}" if has_val else "no validation split"
        test = f"  test acc {row['test_acc']:.4f}" if run.cfg.track_test else ""
        log(
            f"epoch {epoch:>3}/{run.cfg.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
            f"  {val}{test}  lr {row['lr']:.2e}  {row['seconds']:.1f}s {row['samples_per_s']:.0f}/s"
        )
    distributed.barrier(d)
