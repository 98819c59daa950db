#!/usr/bin/env python
"""One time-to-accuracy plot (test accuracy against training minutes) from several runs.

    python tools/experiments/plot_time_to_accuracy.py --out docs/fmnist_time_to_accuracy.png \\
        --run "Terminator fmnist=runs/fmnist/metrics.csv" \\
        --run "baseline CNN=runs/baseline_cnn/metrics.csv" --target 0.935 --target 0.949

Each metrics.csv needs ``train_seconds`` and ``test_acc`` columns (``terminator train``
with ``track_test: true``, or tools/experiments/baseline_cnn.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from terminator.train.plots import plot_time_to_accuracy


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, metavar="LABEL=CSV")
    p.add_argument("--target", action="append", type=float, default=[])
    p.add_argument("--y-min", type=float, default=None)
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    runs = {}
    for spec in args.run:
        label, sep, path = spec.rpartition("=")
        if not sep or not label or not Path(path).is_file():
            p.error(f"--run expects LABEL=CSV with an existing CSV, got {spec!r}")
        runs[label] = path
    plot_time_to_accuracy(runs, Path(args.out), tuple(args.target), args.y_min)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
