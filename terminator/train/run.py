"""A training run: the state the loop carries, and what it writes into its directory.

The run directory holds ``config.yaml``, ``metrics.csv``, ``best.pt`` / ``last.pt`` (their
contents: :func:`checkpoint_state`), ``results.json`` and the plots.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from ..models.terminator import Terminator
from . import distributed
from .checkpoint import CHECKPOINT_FORMAT, load_checkpoint, rng_state, write_csv_atomic, write_text_atomic
from .config import TrainConfig
from .data import Splits, default_preset
from .distributed import Dist
from .evaluation import evaluate

__all__ = ["Run", "METRIC_FIELDS", "run_dir", "prepare_run_dir", "checkpoint_state", "finish"]

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


@dataclasses.dataclass
class Run:
    """What the loop carries from epoch to epoch (and a checkpoint restores)."""

    cfg: TrainConfig
    d: Dist
    out: Path
    splits: Splits
    model: Terminator
    net: torch.nn.Module  # the model, or its DDP wrapper, compiled if cfg.compile
    opt: torch.optim.Optimizer
    sched: torch.optim.lr_scheduler.LRScheduler
    sampler: torch.utils.data.distributed.DistributedSampler
    per_rank: int  # batch size of this process
    epoch: int = 0
    history: list[dict] = dataclasses.field(default_factory=list)
    best: dict = dataclasses.field(default_factory=lambda: {"epoch": 0, "metric": -1.0})


def prepare_run_dir(run: Run, log) -> None:
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


def checkpoint_state(run: Run, epoch: int) -> dict:
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


def finish(run: Run, session_seconds: float, log) -> dict:
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
            plot_run(run, log)
    return result


def plot_run(run: Run, log) -> None:
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
