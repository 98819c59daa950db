"""Evaluation: loss, accuracy and confusion matrix of a model on a split, or of a checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from .allocator import keep_freed_memory
from .checkpoint import load_checkpoint, model_from_checkpoint, write_text_atomic
from .config import TrainConfig
from .data import load_dataset
from .distributed import Dist, all_sum

__all__ = ["evaluate", "format_confusion", "evaluate_checkpoint"]


@torch.no_grad()
def evaluate(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int, d: Dist, num_classes: int) -> dict:
    """Loss (plain cross-entropy), accuracy and confusion matrix, sharded over ranks and reduced.

    ``x (N, C, *S)``, ``y (N,)`` class ids; puts ``model`` in eval mode.
    """
    model.eval()
    idx = torch.arange(d.rank, len(y), d.world)
    conf = torch.zeros(num_classes, num_classes, dtype=torch.float64)
    loss_sum = 0.0
    for i in range(0, len(idx), batch):
        b = idx[i : i + batch]
        xb, yb = x[b].to(d.device), y[b].to(d.device)
        logits = model(xb)
        loss_sum += float(F.cross_entropy(logits, yb, reduction="sum"))
        pred = logits.argmax(1).cpu()
        conf.index_put_((y[b], pred), torch.ones(len(b), dtype=torch.float64), accumulate=True)
    conf = all_sum(d, conf)
    loss_sum = float(all_sum(d, [loss_sum])[0])
    n = float(conf.sum())
    correct = float(conf.diag().sum())
    return {
        "loss": loss_sum / max(n, 1),
        "acc": correct / max(n, 1),
        "correct": int(correct),
        "n": int(n),
        "confusion": conf.long().tolist(),
    }


def format_confusion(conf: list[list[int]]) -> str:
    k = len(conf)
    width = max(5, max(len(str(v)) for row in conf for v in row) + 1)
    lines = [
        "confusion matrix (rows: true class, columns: predicted)",
        "true\\pred" + "".join(f"{j:>{width}}" for j in range(k)),
    ]
    for i, row in enumerate(conf):
        lines.append(f"{i:>9}" + "".join(f"{v:>{width}}" for v in row))
    return "\n".join(lines)


def evaluate_checkpoint(
    path: str | Path,
    dataset: str | None = None,
    data_dir: str | None = None,
    split: str = "test",
    out: str | Path | None = None,
    batch_size: int | None = None,
    threads: int | None = None,
) -> dict:
    """Accuracy and confusion matrix of a checkpoint (``weights_only=True``) on a split.

    Runs with ``threads`` intra-op threads (default: the run's ``threads`` setting) and
    writes ``eval.json`` into ``out`` (default: the checkpoint's folder).
    """
    ckpt = load_checkpoint(path)
    model = model_from_checkpoint(ckpt, path)
    cfg = TrainConfig.from_dict(ckpt["config"])
    if threads or cfg.threads:
        torch.set_num_threads(threads or cfg.threads)
    keep_freed_memory()
    if data_dir is not None:
        cfg.data_dir = data_dir
    if dataset is not None:
        cfg.dataset = dataset
    splits = load_dataset(cfg)
    if split == "val" and splits.val_y is None:
        raise ValueError("this run has no validation split (val_fraction = 0)")
    x, y = (splits.test_x, splits.test_y) if split == "test" else (splits.val_x, splits.val_y)
    if tuple(x.shape[1:]) != (model.config.channels[0], *model.config.size):
        raise ValueError(
            f"dataset {cfg.dataset} has samples of shape {tuple(x.shape[1:])}, the model takes "
            f"{(model.config.channels[0], *model.config.size)}"
        )
    r = evaluate(model, x, y, batch_size or cfg.eval_batch_size, Dist(), model.config.num_classes)
    result = {
        "checkpoint": str(path),
        "epoch": ckpt["epoch"],
        "dataset": cfg.dataset,
        "split": split,
        "accuracy": r["acc"],
        "loss": r["loss"],
        "correct": r["correct"],
        "n": r["n"],
        "confusion": r["confusion"],
    }
    out_dir = Path(out) if out else Path(path).parent
    out_dir.mkdir(parents=True, exist_ok=True)
    write_text_atomic(out_dir / "eval.json", json.dumps(result, indent=2) + "\n")
    return result
