"""The training loop, evaluation and checkpoints (single process or DDP under torchrun)."""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import pickle
import random
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F

from ..losses import TerminatorLoss
from ..models.terminator import Terminator, TerminatorConfig
from ..optim import Kar2, Kar3
from .config import TrainConfig
from .data import augment_batch, default_preset, load_dataset

__all__ = ["train", "evaluate_checkpoint", "load_checkpoint", "CheckpointRefused", "save_atomic",
           "METRIC_FIELDS"]

CHECKPOINT_FORMAT = "terminator-checkpoint-v1"
METRIC_FIELDS = ["epoch", "train_loss", "train_ce", "train_acc", "slow_loss", "val_loss", "val_acc", "lr",
                 "seconds", "samples_per_s", "train_seconds", "test_acc"]


class CheckpointRefused(RuntimeError):
    """A checkpoint that ``torch.load(weights_only=True)`` will not read (pickled objects)."""


# ---------------------------------------------------------------------------------------- processes
@dataclasses.dataclass
class Dist:
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


def _setup(cfg: TrainConfig) -> Dist:
    want_cuda = cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world > 1 and not dist.is_initialized():
        rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        if want_cuda:
            torch.cuda.set_device(local)
        dist.init_process_group("nccl" if want_cuda else "gloo")
    if dist.is_initialized():
        rank, world = dist.get_rank(), dist.get_world_size()
        local = int(os.environ.get("LOCAL_RANK", "0"))
    else:
        rank, world, local = 0, 1, 0
    device = torch.device(f"cuda:{local}" if want_cuda else "cpu") if want_cuda else torch.device("cpu")
    return Dist(rank, world, local, device)


def _all_sum(d: Dist, values: list[float] | torch.Tensor) -> torch.Tensor:
    t = torch.as_tensor(values, dtype=torch.float64)
    if d.active:
        t = t.to(d.device)
        dist.all_reduce(t)
    return t.cpu()


def _barrier(d: Dist) -> None:
    if d.active:
        dist.barrier()


# ------------------------------------------------------------------------------------ checkpoints
def save_atomic(obj: Any, path: Path) -> None:
    """``torch.save`` to a temporary file in the same folder, fsync, then ``os.replace``."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_text_atomic(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def load_checkpoint(path: str | Path, map_location="cpu") -> dict:
    """Loads with ``weights_only=True``; a checkpoint carrying pickled objects is refused."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint not found: {path}")
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointRefused(
            f"refusing to load {path}: it holds pickled objects other than tensors and plain data "
            f"(torch.load(weights_only=True) rejected it: {str(exc).splitlines()[0]})"
        ) from None
    if not isinstance(ckpt, dict) or ckpt.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointRefused(f"refusing to load {path}: not a terminator training checkpoint")
    return ckpt


def _rng_state() -> dict:
    np_state = np.random.get_state()
    state = {
        "torch": torch.get_rng_state(),
        "numpy": {"name": np_state[0], "keys": torch.from_numpy(np_state[1].astype(np.int64)),
                  "pos": int(np_state[2]), "has_gauss": int(np_state[3]), "cached": float(np_state[4])},
        "python": random.getstate(),
    }
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def _set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    n = state["numpy"]
    np.random.set_state((n["name"], n["keys"].numpy().astype(np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


# ------------------------------------------------------------------------------------------ model
def build_model(cfg: TrainConfig, shape: tuple[int, ...], num_classes: int) -> Terminator:
    preset, overrides = default_preset(cfg.dataset)
    preset = cfg.preset or preset
    if cfg.preset and cfg.preset != default_preset(cfg.dataset)[0]:
        overrides = {}
    kwargs = {**overrides, **cfg.model, "size": tuple(shape[1:]), "num_classes": num_classes,
              "data_dim": len(shape) - 1}
    kwargs = {k: tuple(tuple(x) if isinstance(x, list) else x for x in v) if isinstance(v, list) else v
              for k, v in kwargs.items()}
    model = Terminator.from_preset(preset, **kwargs)
    if model.config.channels[0] != shape[0]:
        raise ValueError(f"the model takes {model.config.channels[0]} input channels, the data has {shape[0]}")
    return model


def model_from_config(model_config: dict) -> Terminator:
    return Terminator(TerminatorConfig(**model_config))


def _plain(v):
    if isinstance(v, (list, tuple)):
        return [_plain(x) for x in v]
    return v


def _model_config_dict(model: Terminator) -> dict:
    return {k: _plain(v) for k, v in dataclasses.asdict(model.config).items()}


def _lr_factor(step: int, total: int, warmup: int, min_ratio: float) -> float:
    if warmup > 0 and step < warmup:
        return (step + 1) / warmup
    if total <= warmup:
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ----------------------------------------------------------------------------------------- eval
@torch.no_grad()
def _evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, d: Dist,
              num_classes: int) -> dict:
    """Loss (plain cross-entropy), accuracy and confusion matrix, sharded over ranks and reduced."""
    model.eval()
    idx = torch.arange(d.rank, len(y), d.world)
    conf = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    loss_sum = 0.0
    for i in range(0, len(idx), batch):
        b = idx[i:i + batch]
        xb, yb = x[b].to(d.device), y[b].to(d.device)
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        pred = logits.argmax(1).cpu()
        conf.index_put_((y[b], pred), torch.ones(len(b), dtype=torch.float64), accumulate=True)
    conf = _all_sum(d, conf)
    loss_sum = float(_all_sum(d, [loss_sum])[0])
    n = float(conf.sum())
    correct = float(conf.diag().sum())
    return {"loss": loss_sum / max(n, 1), "acc": correct / max(n, 1), "correct": int(correct), "n": int(n),
            "confusion": conf.long().tolist()}


def format_confusion(conf: list[list[int]]) -> str:
    k = len(conf)
    width = max(5, max(len(str(v)) for row in conf for v in row) + 1)
    lines = ["confusion matrix (rows: true class, columns: predicted)",
             "true\\pred" + "".join(f"{j:>{width}}" for j in range(k))]
    for i, row in enumerate(conf):
        lines.append(f"{i:>9}" + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


# ---------------------------------------------------------------------------------------- train
def _run_dir(cfg: TrainConfig) -> Path:
    if cfg.out:
        return Path(cfg.out)
    preset = cfg.preset or default_preset(cfg.dataset)[0]
    return Path("runs") / f"{cfg.dataset}-{preset}"


def train(cfg: TrainConfig, resume: str | None = None, log=print) -> dict:
    """Trains per ``cfg``; ``resume``: a checkpoint path, or ``"auto"`` for ``OUT/last.pt`` if present.

    Returns the result dict (also written to ``OUT/results.json`` by rank 0).
    """
    d = _setup(cfg)
    out = _run_dir(cfg)
    ckpt = None
    if resume:
        path = out / "last.pt" if resume == "auto" else Path(resume)
        if path.is_file():
            ckpt = load_checkpoint(path)
        elif resume != "auto":
            raise FileNotFoundError(f"--resume: no checkpoint at {path}")
        elif d.main:
            log(f"no checkpoint at {path}: starting a new run")
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    torch.manual_seed(cfg.seed)
    np.random.seed(cfg.seed)
    random.seed(cfg.seed)

    splits = load_dataset(cfg)
    model = build_model(cfg, splits.shape, splits.num_classes)
    if ckpt is not None:
        model = model_from_config(ckpt["model_config"])
        model.load_state_dict(ckpt["model"])
    model.to(d.device)
    net = model
    if d.active:
        net = torch.nn.parallel.DistributedDataParallel(
            model, device_ids=[d.local_rank] if d.device.type == "cuda" else None)
    opt_cls = Kar3 if cfg.optimizer == "kar3" else Kar2
    opt = opt_cls(model.parameters(), lr=cfg.lr, **({"betas": cfg.betas} if cfg.optimizer == "kar3"
                                                    else {"beta": cfg.betas[-1]}))
    objective = TerminatorLoss(eps=cfg.label_smoothing, l2=cfg.l2, slow_weight=cfg.slow_weight)

    per_rank = max(1, cfg.batch_size // d.world)
    sampler = torch.utils.data.distributed.DistributedSampler(
        range(len(splits.train_y)), num_replicas=d.world, rank=d.rank, shuffle=True, seed=cfg.seed,
        drop_last=True)
    steps_per_epoch = max(1, math.ceil(len(sampler) / per_rank))
    total = steps_per_epoch * cfg.epochs
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    sched = torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: _lr_factor(s, total, warmup, cfg.min_lr_ratio))

    start_epoch, history, best = 0, [], {"epoch": 0, "metric": -1.0}
    if ckpt is not None:
        opt.load_state_dict(ckpt["optimizer"])
        sched.load_state_dict(ckpt["scheduler"])
        start_epoch, history, best = int(ckpt["epoch"]), list(ckpt["history"]), dict(ckpt["best"])
        rngs = ckpt["rng"]
        _set_rng_state(rngs[d.rank % len(rngs)])
        if d.main:
            log(f"resumed from epoch {start_epoch} ({out})")

    if d.main:
        out.mkdir(parents=True, exist_ok=True)
        for stale in out.glob(".*.tmp"):  # left by a process killed while writing
            stale.unlink(missing_ok=True)
        import yaml

        _write_text_atomic(out / "config.yaml", yaml.safe_dump(cfg.to_dict(), sort_keys=False))
        _write_metrics(out, history)
        log(f"run {out}: {cfg.dataset} {tuple(splits.shape)} train {len(splits.train_y)} "
            f"val {0 if splits.val_y is None else len(splits.val_y)} test {len(splits.test_y)}; "
            f"{model.num_parameters:,} parameters; {d.world} process(es) on {d.device}; "
            f"backend {_backend_name()}")
    data_meta = {"mean": splits.mean, "std": splits.std, "num_classes": splits.num_classes,
                 "shape": list(splits.shape), "info": {k: v for k, v in splits.info.items()}}

    def checkpoint(epoch: int) -> dict:
        rngs = [_rng_state()]
        if d.active:
            rngs = [None] * d.world
            dist.all_gather_object(rngs, _rng_state())
        return {"format": CHECKPOINT_FORMAT, "epoch": epoch, "config": cfg.to_dict(),
                "model_config": _model_config_dict(model), "model": model.state_dict(),
                "optimizer": opt.state_dict(), "scheduler": sched.state_dict(), "rng": rngs,
                "history": history, "best": best, "data": data_meta, "world_size": d.world,
                "parameters": model.num_parameters}

    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        tqdm = None
    t_run = time.perf_counter()
    end_epoch = cfg.epochs if not cfg.stop_after else min(cfg.epochs, start_epoch + cfg.stop_after)
    for epoch in range(start_epoch, end_epoch):
        net.train()
        sampler.set_epoch(epoch)
        order = torch.tensor(list(iter(sampler)), dtype=torch.long)
        gen = torch.Generator().manual_seed(cfg.seed * 100003 + epoch * 101 + d.rank)
        sums = torch.zeros(5, dtype=torch.float64)  # total, ce, slow, correct, n (sums over samples)
        t0 = time.perf_counter()
        batches = range(0, len(order), per_rank)
        bar = None
        if tqdm is not None and d.main and cfg.progress:
            bar = tqdm(total=len(batches), desc=f"epoch {epoch + 1}/{cfg.epochs}", leave=False,
                       file=sys.stderr, dynamic_ncols=True)
        for i in batches:
            b = order[i:i + per_rank]
            xb = splits.train_x[b]
            if cfg.augment:
                xb = augment_batch(xb, cfg.shift, cfg.flip, gen)
            xb, yb = xb.to(d.device), splits.train_y[b].to(d.device)
            opt.zero_grad(set_to_none=True)
            logits, kernels = net(xb, return_kernels=True)
            parts = objective(model, logits, yb, kernels)
            parts.total.backward()
            opt.step()
            sched.step()
            n = len(b)
            total_value = parts.total.item()
            sums += torch.tensor([total_value * n, parts.cross_entropy.item() * n, parts.slow.item() * n,
                                  float((logits.argmax(1) == yb).sum()), n], dtype=torch.float64)
            if bar is not None:
                bar.update(1)
                bar.set_postfix(loss=f"{total_value:.3f}", lr=f"{sched.get_last_lr()[0]:.2e}")
        if bar is not None:
            bar.close()
        sums = _all_sum(d, sums)
        seconds = time.perf_counter() - t0
        n = max(float(sums[4]), 1.0)
        row = {"epoch": epoch + 1, "train_loss": float(sums[0]) / n, "train_ce": float(sums[1]) / n,
               "train_acc": float(sums[3]) / n, "slow_loss": float(sums[2]) / n,
               "val_loss": float("nan"), "val_acc": float("nan"), "lr": float(sched.get_last_lr()[0]),
               "seconds": seconds, "samples_per_s": n / seconds}
        # training seconds summed over epochs (and sessions): the x axis of time-to-accuracy
        row["train_seconds"] = (history[-1].get("train_seconds") or 0.0) + seconds if history else seconds
        if splits.val_y is not None:
            v = _evaluate(model, splits.val_x, splits.val_y, cfg.eval_batch_size, d, splits.num_classes)
            row["val_loss"], row["val_acc"] = v["loss"], v["acc"]
        if cfg.track_test:
            row["test_acc"] = _evaluate(model, splits.test_x, splits.test_y, cfg.eval_batch_size, d,
                                        splits.num_classes)["acc"]
        history.append(row)
        # best.pt: the best validation accuracy; without a validation split, the last epoch
        metric = row["val_acc"] if splits.val_y is not None else float(epoch + 1)
        improved = metric > best["metric"]
        if improved:
            best = {"epoch": epoch + 1, "metric": metric}
        last = epoch + 1 == end_epoch
        if improved or last or (epoch + 1) % max(1, cfg.checkpoint_every) == 0:
            state = checkpoint(epoch + 1)  # collective (RNG states of every rank)
            if d.main:
                if improved:
                    save_atomic(state, out / "best.pt")
                save_atomic(state, out / "last.pt")
        if d.main:
            _write_metrics(out, history)
            val = (f"val loss {row['val_loss']:.4f} acc {row['val_acc']:.4f}" if splits.val_y is not None
                   else "no validation split")
            log(f"epoch {epoch + 1:>3}/{cfg.epochs}  train loss {row['train_loss']:.4f} acc {row['train_acc']:.4f}"
                f"  {val}" + (f"  test acc {row['test_acc']:.4f}" if cfg.track_test else "") + f"  lr {row['lr']:.2e}"
                f"  {seconds:.1f}s {row['samples_per_s']:.0f}/s")
        _barrier(d)
    train_seconds = time.perf_counter() - t_run

    # test with the best checkpoint's weights (by validation accuracy; last epoch without validation)
    best_path = out / "best.pt"
    if best_path.is_file():
        _barrier(d)
        model.load_state_dict(load_checkpoint(best_path)["model"])
    test = _evaluate(model, splits.test_x, splits.test_y, cfg.eval_batch_size, d, splits.num_classes)
    param_diff = 0.0
    if d.active:  # every rank must hold the same parameters
        flat = torch.cat([p.detach().reshape(-1).double().cpu() for p in model.parameters()])
        ref = flat.clone().to(d.device)
        dist.broadcast(ref, 0)
        diff = (flat.to(d.device) - ref).abs().max().reshape(1)
        dist.all_reduce(diff, op=dist.ReduceOp.MAX)
        param_diff = float(diff)
    result = {"dataset": cfg.dataset, "preset": cfg.preset or default_preset(cfg.dataset)[0],
              "test_acc": test["acc"], "test_loss": test["loss"], "test_correct": test["correct"],
              "test_n": test["n"], "best_epoch": best["epoch"], "best_val_acc": best["metric"] if splits.val_y is not None else None,
              "epochs": cfg.epochs, "epochs_done": len(history), "parameters": model.num_parameters, "world_size": d.world,
              "train_seconds_this_session": train_seconds, "run": str(out),
              "confusion": test["confusion"], "ddp_max_param_diff": param_diff,
              "param_checksum": float(sum(p.detach().double().sum() for p in model.parameters()))}
    if d.main:
        _write_text_atomic(out / "results.json", json.dumps(result, indent=2) + "\n")
        if cfg.plots:
            try:
                from .plots import plot_curves, plot_kernels, plot_scores

                plot_curves(history, out / "curves.png")
                plot_kernels(model, out / "kernels.png")
                plot_scores(model, splits.test_x[:4].to(d.device), splits.test_y[:4], out / "scores.png")
            except ImportError as exc:  # pragma: no cover
                log(f"plots skipped: {exc}")
    if d.active:
        # Every rank tears down together: in one clean-clone CI run (2026-11-22) rank 1
        # aborted in its teardown ("terminate called without an active exception") while
        # rank 0 was still writing the results.
        _barrier(d)
        dist.destroy_process_group()
    return result


def _backend_name() -> str:
    try:
        import terminator.ops as ops

        return ops.backend().name
    except Exception as exc:  # pragma: no cover
        return f"unavailable ({exc})"


def write_csv_atomic(path: Path, rows: list[dict], fields: list[str]) -> None:
    """Writes ``rows`` (only ``fields``, in that order) as CSV to a temporary file, then renames it."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, fieldnames=fields)
        w.writeheader()
        for row in rows:
            w.writerow({k: row.get(k) for k in fields})
    os.replace(tmp, path)


def _write_metrics(out: Path, history: list[dict]) -> None:
    """Rewrites ``metrics.csv`` from the history (a resumed run never duplicates or loses a row)."""
    write_csv_atomic(out / "metrics.csv", history, METRIC_FIELDS)


# ------------------------------------------------------------------------------------------ eval
def evaluate_checkpoint(path: str | Path, dataset: str | None = None, data_dir: str | None = None,
                        split: str = "test", out: str | Path | None = None, batch_size: int | None = None,
                        threads: int | None = None) -> dict:
    """Accuracy and confusion matrix of a checkpoint (``weights_only=True``) on a split.

    Runs with ``threads`` intra-op threads (default: the run's ``threads`` setting).
    """
    ckpt = load_checkpoint(path)
    cfg = TrainConfig.from_dict(ckpt["config"])
    if threads or cfg.threads:
        torch.set_num_threads(threads or cfg.threads)
    if data_dir is not None:
        cfg.data_dir = data_dir
    if dataset is not None:
        cfg.dataset = dataset
    splits = load_dataset(cfg)
    model = model_from_config(ckpt["model_config"])
    model.load_state_dict(ckpt["model"])
    if split == "val" and splits.val_y is None:
        raise ValueError("this run has no validation split (val_fraction = 0)")
    x, y = (splits.test_x, splits.test_y) if split == "test" else (splits.val_x, splits.val_y)
    if tuple(x.shape[1:]) != (model.config.channels[0], *model.config.size):
        raise ValueError(f"dataset {cfg.dataset} has samples of shape {tuple(x.shape[1:])}, the model takes "
                         f"{(model.config.channels[0], *model.config.size)}")
    r = _evaluate(model, x, y, batch_size or cfg.eval_batch_size, Dist(), model.config.num_classes)
    result = {"checkpoint": str(path), "epoch": ckpt["epoch"], "dataset": cfg.dataset, "split": split,
              "accuracy": r["acc"], "loss": r["loss"], "correct": r["correct"], "n": r["n"],
              "confusion": r["confusion"]}
    out_dir = Path(out) if out else Path(path).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    _write_text_atomic(out_dir / "eval.json", json.dumps(result, indent=2) + "\n")
    return result
