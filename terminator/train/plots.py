"""PNG plots (matplotlib, Agg): learning curves and the learned global hyper-kernels."""

from __future__ import annotations

import math
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import torch  # noqa: E402

__all__ = ["plot_curves", "plot_kernels", "plot_scores", "plot_time_to_accuracy", "read_metrics"]


def plot_curves(history: list[dict], path: Path) -> None:
    """Loss and accuracy per epoch (train and validation) and the learning rate."""
    if not history:
        return
    ep = [r["epoch"] for r in history]
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    axes[0].plot(ep, [r["train_ce"] for r in history], label="train CE (smoothed)")
    has_val = any(math.isfinite(r["val_acc"]) for r in history)
    if has_val:
        axes[0].plot(ep, [r["val_loss"] for r in history], label="val CE")
    axes[0].plot(ep, [r["slow_loss"] for r in history], label="slow loss", alpha=0.7)
    axes[0].set_yscale("log")
    axes[0].set_title("loss")
    axes[1].plot(ep, [r["train_acc"] for r in history], label="train")
    if has_val:
        axes[1].plot(ep, [r["val_acc"] for r in history], label="val")
    tested = [(r["epoch"], r["test_acc"]) for r in history if _finite(r.get("test_acc"))]
    if tested:
        axes[1].plot(*zip(*tested), label="test (tracked)")
    axes[1].set_title("accuracy")
    axes[2].plot(ep, [r["lr"] for r in history])
    axes[2].set_title("learning rate (end of epoch)")
    for ax in axes:
        ax.set_xlabel("epoch")
        ax.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def plot_kernels(model, path: Path, max_channels: int = 8) -> None:
    """Each block's global hyper-kernel K_g: 1D as a (channel × position) map, 2D as images."""
    was = model.training
    model.eval()
    kernels = [k.detach().float().cpu().numpy() for k in model.global_kernels()]
    model.train(was)
    if kernels[0].ndim == 2:  # 1D: (C, L)
        fig, axes = plt.subplots(len(kernels), 1, figsize=(8, 1.6 * len(kernels) + 0.5), squeeze=False)
        for i, k in enumerate(kernels):
            ax = axes[i, 0]
            im = ax.imshow(k, aspect="auto", cmap="RdBu_r", interpolation="nearest")
            ax.set_ylabel(f"block {i}\nchannel")
            fig.colorbar(im, ax=ax)
        axes[-1, 0].set_xlabel("position")
    else:  # 2D: (C, H, W)
        cols = min(max_channels, max(k.shape[0] for k in kernels))
        fig, axes = plt.subplots(len(kernels), cols, figsize=(1.6 * cols, 1.7 * len(kernels)), squeeze=False)
        for i, k in enumerate(kernels):
            for j in range(cols):
                ax = axes[i, j]
                ax.axis("off")
                if j < k.shape[0]:
                    lim = float(abs(k[j]).max()) or 1.0
                    ax.imshow(k[j], cmap="RdBu_r", vmin=-lim, vmax=lim)
                    ax.set_title(f"b{i} c{j}", fontsize=7)
    fig.suptitle("learned global hyper-kernels K_g")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


@torch.no_grad()
def pixel_scores(model, x: torch.Tensor) -> list[torch.Tensor]:
    """Each block's pixel-level score ``score_s = k_s ⊙ y_s ⊙ y_s`` (its hyper interaction) for ``x``.

    ``y_s (B, 1, *S)`` is the channel mean of the block's high-level activation and ``k_s``
    the interaction's global spatial slow-net kernel; returns one ``(B, *S)`` tensor per block.
    """
    from ..ops import hyperzzw_global

    captured: list[torch.Tensor] = []

    def hook(module, args, output):
        y_s = args[0].mean(dim=1, keepdim=True)
        captured.append(hyperzzw_global(module.spatial_slow_net(), y_s, mode="dot")[:, 0].detach().float().cpu())

    handles = [block.hi.register_forward_hook(hook) for block in model.blocks]
    was = model.training
    model.eval()
    try:
        model(x)
    finally:
        model.train(was)
        for h in handles:
            h.remove()
    return captured


def plot_scores(model, x: torch.Tensor, y: torch.Tensor | None, path: Path) -> None:
    """A few samples (one column each): the input, then each block's pixel-level score."""
    scores = pixel_scores(model, x)
    n, rows = x.shape[0], 1 + len(scores)
    fig, axes = plt.subplots(rows, n, figsize=(2.4 * n, 1.5 * rows + 0.4), squeeze=False)
    for j in range(n):
        inp = x[j, 0].float().cpu()
        if inp.dim() == 1:
            axes[0, j].plot(inp.numpy())
        else:
            axes[0, j].imshow(inp.numpy(), cmap="gray")
        axes[0, j].set_title(f"input (label {int(y[j])})" if y is not None else "input", fontsize=8)
        for i, s in enumerate(scores):
            ax = axes[i + 1, j]
            s = s[j].numpy()
            lim = float(abs(s).max()) or 1.0
            ax.imshow(s[None] if s.ndim == 1 else s, aspect="auto", cmap="RdBu_r", vmin=-lim, vmax=lim)
            ax.set_yticks([])
            if j == 0:
                ax.set_ylabel(f"block {i}", fontsize=8)
    for ax in axes.flat:
        ax.tick_params(labelsize=6)
    fig.suptitle("pixel-level scores of the hyper interaction (k_s ⊙ y_s ⊙ y_s) per block")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _finite(v) -> bool:
    try:
        return math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def read_metrics(path: str | Path) -> list[dict]:
    """A ``metrics.csv`` (ours or tools/experiments/baseline_cnn.py's) as a list of float dicts."""
    import csv

    with open(path, newline="", encoding="utf-8") as f:
        return [{k: float(v) if _finite(v) else float("nan") for k, v in row.items()} for row in csv.DictReader(f)]


def accuracy_curve(csv_path: str | Path) -> list[tuple[float, float]]:
    """``(training minutes, test accuracy)`` of each epoch that logged both, in order."""
    return [
        (r["train_seconds"] / 60, r["test_acc"])
        for r in read_metrics(csv_path)
        if _finite(r.get("train_seconds")) and _finite(r.get("test_acc"))
    ]


def minutes_to_accuracy(curve: list[tuple[float, float]], levels: tuple[float, ...]) -> list[float | None]:
    """Minutes of an :func:`accuracy_curve` until the accuracy first reached each level (None: never)."""
    return [next((minutes for minutes, acc in curve if acc >= level), None) for level in levels]


def plot_time_to_accuracy(
    runs: dict[str, str | Path], path: Path, targets: tuple[float, ...] = (), y_min: float | None = None
) -> None:
    """Test accuracy after each epoch against training seconds, one line per run.

    ``runs``: label → metrics.csv holding ``train_seconds`` and ``test_acc`` columns.
    ``targets``: accuracies drawn as horizontal dashed lines.
    """
    fig, ax = plt.subplots(figsize=(7, 4.2))
    for label, csv_path in runs.items():
        pts = accuracy_curve(csv_path)
        if pts:
            ax.plot(*zip(*pts), marker="o", markersize=3, label=label)
    for t in targets:
        ax.axhline(t, ls="--", lw=0.8, color="gray")
        ax.text(ax.get_xlim()[0], t, f" {t:.1%}", va="bottom", fontsize=7, color="gray")
    if y_min is not None:
        ax.set_ylim(bottom=y_min)
    ax.set_xlabel("training time (minutes, evaluation excluded)")
    ax.set_ylabel("test accuracy")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
