"""The training loop (one process, or DDP under torchrun): epochs, checkpoints, results."""

from __future__ import annotations

import dataclasses
import json
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
from .checkpoint import (
    CHECKPOINT_FORMAT,
    check_resumable,
    load_checkpoint,
    model_from_checkpoint,
    rng_state,
    save_atomic,
    set_rng_state,
    write_csv_atomic,
    write_text_atomic,
)
from .config import TrainConfig
from .data import Splits, augment_batch, default_preset, load_dataset
from .distributed import Dist
from .evaluation import evaluate

__all__ = ["train", "run_dir", "build_model", "METRIC_FIELDS"]

METRIC_FIELDS = [
    "epoch",
    "train_loss",
    "train_ce",
    "train_acc",
    "slow_loss",
    "val_loss",
    "val_acc",
    "lr",
    "seconds",
    "samples_per_s",
    "train_seconds",
    "test_acc",
]


def run_dir(cfg: TrainConfig) -> Path:
    """The run directory: ``cfg.out``, or ``runs/<dataset>-<preset>``."""
    if cfg.out:
        return Path(cfg.out)
    return Path("runs") / f"{cfg.dataset}-{cfg.preset or default_preset(cfg.dataset)[0]}"


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


@dataclasses.dataclass
class _Run:
    """What the loop carries from epoch to epoch (and a checkpoint restores)."""

    cfg: TrainConfig
    d: Dist
    out: Path
    splits: Splits
    model: Terminator
    net: torch.nn.Module  # the model, or its DDP wrapper
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    sampler: torch.utils.data.distributed.DistributedSampler
    per_rank: int  # batch size of this process
    epoch: int = 0
    history: list[dict] = dataclasses.field(default_factory=list)
    best: dict = dataclasses.field(default_factory=lambda: {"epoch": 0, "metric": -1.0})


def train(cfg: TrainConfig, resume: str | None = None, log=print) -> dict:
    """Trains per ``cfg``; ``resume``: a checkpoint path, or ``"auto"`` for ``OUT/last.pt`` if present.

    Returns the result dict (also written to ``OUT/results.json`` by rank 0).
    """
    d = distributed.setup(cfg.device)
    out = run_dir(cfg)
    ckpt, ckpt_path = _checkpoint_to_resume(out, resume, d, log)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
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
        _prepare_run_dir(run, log)

    objective = TerminatorLoss(eps=cfg.label_smoothing, l2=cfg.l2, slow_weight=cfg.slow_weight)
    end_epoch = cfg.epochs if not cfg.stop_after else min(cfg.epochs, run.epoch + cfg.stop_after)
    started = time.perf_counter()
    for epoch in range(run.epoch, end_epoch):
        row = _train_epoch(run, objective, epoch)
        _evaluate_epoch(run, row)
        _end_epoch(run, row, last=epoch + 1 == end_epoch, log=log)
    result = _finish(run, session_seconds=time.perf_counter() - started, log=log)
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


def _start(cfg: TrainConfig, d: Dist, out: Path, splits: Splits, model: Terminator) -> _Run:
    """Optimizer, sampler and learning-rate schedule around ``model``."""
    if cfg.optimizer == "kar3":
        opt = Kar3(model.parameters(), lr=cfg.lr, betas=cfg.betas)
    else:
        opt = Kar2(model.parameters(), lr=cfg.lr, beta=cfg.betas[-1])
    per_rank = max(1, cfg.batch_size // d.world)
    sampler = torch.utils.data.distributed.DistributedSampler(
        range(len(splits.train_y)), num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed, drop_last=True
    )
    steps_per_epoch = max(1, math.ceil(len(sampler) / per_rank))
    total, warmup = steps_per_epoch * cfg.epochs, int(round(cfg.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: lr_factor(s, total, warmup, cfg.min_lr_ratio))
    return _Run(cfg, d, out, splits, model, distributed.wrap(model, d), opt, sched, sampler, per_rank)


def _restore(run: _Run, ckpt: dict) -> None:
    run.opt.load_state_dict(ckpt["optimizer"])
    run.sched.load_state_dict(ckpt["scheduler"])
    run.epoch, run.history, run.best = int(ckpt["epoch"]), list(ckpt["history"]), dict(ckpt["best"])
    rngs = ckpt["rng"]
    set_rng_state(rngs[run.d.rank % len(rngs)])


def _prepare_run_dir(run: _Run, log) -> None:
    import yaml

    out, splits = run.out, run.splits
    out.mkdir(parents=True, exist_ok=True)
    for stale in out.glob(".*.tmp"):  # left by a process killed while writing
        stale.unlink(missing_ok=True)
    write_text_atomic(out / "config.yaml", yaml.safe_dump(run.cfg.to_dict(), sort_keys=False))
    write_csv_atomic(out / "metrics.csv", run.history, METRIC_FIELDS)
    log(
        f"run {out}: {run.cfg.dataset} {tuple(splits.shape)} train {len(splits.train_y)} "
        f"val {0 if splits.val_y is None else len(splits.val_y)} test {len(splits.test_y)}; "
        f"{run.model.num_parameters:,} parameters; {run.d.world} process(es) on {run.d.device}; "
        f"backend {_backend_name()}"
    )


def _train_epoch(run: _Run, objective: TerminatorLoss, epoch: int) -> dict:
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


def _evaluate_epoch(run: _Run, row: dict) -> None:
    cfg, splits = run.cfg, run.splits
    if splits.val_y is not None:
        v = evaluate(run.model, splits.val_x, splits.val_y, cfg.eval_batch_size, run.d, splits.num_classes)
        row["val_loss"], row["val_acc"] = v["loss"], v["acc"]
    if cfg.track_test:
        row["test_acc"] = evaluate(
            run.model, splits.test_x, splits.test_y, cfg.eval_batch_size, run.d, splits.num_classes
        )["acc"]


def _end_epoch(run: _Run, row: dict, last: bool, log) -> None:
    """Records the row; writes best.pt (best validation accuracy) and last.pt; logs."""
    d, has_val = run.d, run.splits.val_y is not None
    run.history.append(row)
    epoch = row["epoch"]
    metric = row["val_acc"] if has_val else float(epoch)  # without validation: the last epoch
    improved = metric > run.best["metric"]
    if improved:
        run.best = {"epoch": epoch, "metric": metric}
    if improved or last or epoch % max(1, run.cfg.checkpoint_every) == 0:
        state = _checkpoint(run, epoch)  # collective (RNG states of every rank)
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


def _checkpoint(run: _Run, epoch: int) -> dict:
    rngs = [rng_state()]
    if run.d.active:
        rngs = [None] * run.d.world
        torch.distributed.all_gather_object(rngs, rng_state())
    splits, model = run.splits, run.model
    data = {
        "mean": splits.mean,
        "std": splits.std,
        "num_classes": splits.num_classes,
        "shape": list(splits.shape),
        "info": dict(splits.info),
    }
    return {
        "format": CHECKPOINT_FORMAT,
        "epoch": epoch,
        "config": run.cfg.to_dict(),
        "model_config": _plain(dataclasses.asdict(model.config)),
        "model": model.state_dict(),
        "optimizer": run.opt.state_dict(),
        "scheduler": run.sched.state_dict(),
        "rng": rngs,
        "history": run.history,
        "best": run.best,
        "data": data,
        "world_size": run.d.world,
        "parameters": model.num_parameters,
    }


def _plain(v):
    """Tuples as lists, recursively: checkpoints hold plain data."""
    if isinstance(v, dict):
        return {k: _plain(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _finish(run: _Run, session_seconds: float, log) -> dict:
    """Test accuracy with the best checkpoint's weights; results.json and plots (rank 0)."""
    cfg, d, splits, model, out = run.cfg, run.d, run.splits, run.model, run.out
    best_path = out / "best.pt"
    if best_path.is_file():
        distributed.barrier(d)
        model.load_state_dict(load_checkpoint(best_path)["model"])
    test = evaluate(model, splits.test_x, splits.test_y, cfg.eval_batch_size, d, splits.num_classes)
    param_diff = distributed.max_param_diff(model, d)  # every rank must hold the same parameters
    result = {
        "dataset": cfg.dataset,
        "preset": cfg.preset or default_preset(cfg.dataset)[0],
        "test_acc": test["acc"],
        "test_loss": test["loss"],
        "test_correct": test["correct"],
        "test_n": test["n"],
        "best_epoch": run.best["epoch"],
        "best_val_acc": run.best["metric"] if splits.val_y is not None else None,
        "epochs": cfg.epochs,
        "epochs_done": len(run.history),
        "parameters": model.num_parameters,
        "world_size": d.world,
        "train_seconds": run.history[-1]["train_seconds"] if run.history else 0.0,
        "run": str(out),
        "confusion": test["confusion"],
        "diagnostics": {"session_seconds": session_seconds, "ddp_max_param_diff": param_diff},
    }
    if d.main:
        write_text_atomic(out / "results.json", json.dumps(result, indent=2) + "\n")
        if cfg.plots:
            _plot(run, log)
    return result


def _plot(run: _Run, log) -> None:
    try:
        from .plots import plot_curves, plot_kernels, plot_scores
    except ImportError as exc:  # pragma: no cover
        log(f"plots skipped: {exc}")
        return
    out, splits = run.out, run.splits
    plot_curves(run.history, out / "curves.png")
    plot_kernels(run.model, out / "kernels.png")
    plot_scores(run.model, splits.test_x[:4].to(run.d.device), splits.test_y[:4], out / "scores.png")


def _backend_name() -> str:
    try:
        import terminator.ops as ops

        return ops.backend().name
    except Exception as exc:  # pragma: no cover
        return f"unavailable ({exc})"
