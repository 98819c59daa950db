#!/usr/bin/env python
"""The plain-CNN baselines on Fashion-MNIST (what a user would train instead).

2D images (``--dataset fashion-mnist``): conv 32-BN-ReLU, conv 64-BN-ReLU, max-pool, conv
128-BN-ReLU, max-pool, dropout 0.25, linear 256-ReLU, dropout 0.5, linear 10 (≈1.7 M
parameters). Pixel sequences (``fashion-mnist-seq`` / ``-pseq``, length 784): four
conv1d-BN-ReLU-max-pool stages (32, 64, 128, 128 channels, kernels 7, 5, 5, 3), global
average pool, linear 10 (≈103 k parameters, about the size of the ``seq784`` preset).
Adam 2e-3, cosine over the epochs (15), batch 128, standardized inputs, no augmentation.
Writes one CSV row per epoch (elapsed training seconds, test accuracy: a time-to-accuracy
curve) and results.json.

    python tools/experiments/baseline_cnn.py                          # 15 epochs, runs/baseline_cnn
    python tools/experiments/baseline_cnn.py --dataset fashion-mnist-seq --out runs/baseline_cnn1d
    python tools/experiments/baseline_cnn.py --epochs 1 --limit-train 2000 --out /tmp/cnn   # a smoke run
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from terminator.train.checkpoint import write_csv_atomic
from terminator.train.config import TrainConfig
from terminator.train.data import load_dataset


def baseline_cnn(num_classes: int = 10) -> nn.Module:
    return nn.Sequential(
        nn.Conv2d(1, 32, 3, padding=1),
        nn.BatchNorm2d(32),
        nn.ReLU(),
        nn.Conv2d(32, 64, 3, padding=1),
        nn.BatchNorm2d(64),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(64, 128, 3, padding=1),
        nn.BatchNorm2d(128),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Dropout(0.25),
        nn.Flatten(),
        nn.Linear(128 * 7 * 7, 256),
        nn.ReLU(),
        nn.Dropout(0.5),
        nn.Linear(256, num_classes),
    )


def baseline_cnn1d(num_classes: int = 10) -> nn.Module:
    layers: list[nn.Module] = []
    for c_in, c_out, k in ((1, 32, 7), (32, 64, 5), (64, 128, 5), (128, 128, 3)):
        layers += [nn.Conv1d(c_in, c_out, k, padding=k // 2), nn.BatchNorm1d(c_out), nn.ReLU(), nn.MaxPool1d(2)]
    return nn.Sequential(*layers, nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(128, num_classes))


@torch.no_grad()
def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 1000) -> float:
    model.eval()
    correct = sum(int((model(x[i : i + batch]).argmax(1) == y[i : i + batch]).sum()) for i in range(0, len(y), batch))
    return correct / len(y)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--dataset", default="fashion-mnist", choices=["fashion-mnist", "fashion-mnist-seq", "fashion-mnist-pseq"]
    )
    p.add_argument("--epochs", type=int, default=15)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--data-dir", default=None)
    p.add_argument("--limit-train", type=int, default=None)
    p.add_argument("--out", default="runs/baseline_cnn")
    args = p.parse_args(argv)
    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    cfg = TrainConfig(dataset=args.dataset, data_dir=args.data_dir, val_fraction=0.0, limit_train=args.limit_train)
    d = load_dataset(cfg)
    sequence = args.dataset != "fashion-mnist"
    model = (baseline_cnn1d if sequence else baseline_cnn)(d.num_classes)
    params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.Adam(model.parameters(), lr=args.lr)
    steps = args.epochs * ((len(d.train_y) + args.batch_size - 1) // args.batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=steps)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    rows, elapsed = [], 0.0
    name = "baseline CNN1d" if sequence else "baseline CNN"
    print(f"{name} on {args.dataset}: {params:,} parameters; train {len(d.train_y)}, test {len(d.test_y)}")
    for epoch in range(args.epochs):
        model.train()
        t0 = time.perf_counter()
        perm = torch.randperm(len(d.train_y))
        for i in range(0, len(perm), args.batch_size):
            b = perm[i : i + args.batch_size]
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(d.train_x[b]), d.train_y[b]).backward()
            opt.step()
            sched.step()
        elapsed += time.perf_counter() - t0
        acc = accuracy(model, d.test_x, d.test_y)
        rows.append({"epoch": epoch + 1, "train_seconds": elapsed, "test_acc": acc})
        print(f"epoch {epoch + 1:>2}/{args.epochs}  {elapsed:7.1f} s  test acc {acc:.4f}", flush=True)
        # every epoch: a stopped run keeps its curve
        write_csv_atomic(out / "metrics.csv", rows, ["epoch", "train_seconds", "test_acc"])
    result = {
        "model": "baseline_cnn1d" if sequence else "baseline_cnn",
        "dataset": args.dataset,
        "parameters": params,
        "test_acc": rows[-1]["test_acc"] if rows else None,
        "train_seconds": elapsed,
        "epochs": args.epochs,
        "seed": args.seed,
        "threads": args.threads,
    }
    (out / "results.json").write_text(json.dumps(result, indent=2) + "\n")
    print(f"result: test_acc={result['test_acc']:.4f} train_seconds={elapsed:.0f} params={params}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
