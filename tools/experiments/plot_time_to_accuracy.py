#!/usr/bin/env python
"""One time-to-accuracy plot (test accuracy against training minutes) from several runs.

    python tools/experiments/plot_time_to_accuracy.py --out docs/fmnist_time_to_accuracy.png \\
        --run "Terminator fmnist=runs/fmnist/metrics.csv" \\
        --run "baseline CNN=runs/baseline_cnn/metrics.csv" --target 0.935 --target 0.949 \\
        --levels 0.88 0.90 0.92 0.93 0.935

``--levels`` also prints a Markdown table: minutes of training until each run's test
accuracy first reached each level, and its final accuracy. Each metrics.csv needs
``train_seconds`` and ``test_acc`` columns (``terminator train`` with ``track_test: true``,
or tools/experiments/baseline_cnn.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from terminator.train.plots import accuracy_curve, minutes_to_accuracy, plot_time_to_accuracy


def markdown_table(runs: dict[str, str], levels: tuple[float, ...]) -> str:
    """Rows: runs; columns: minutes until each level was first reached, then the final accuracy."""
    lines = [
        "| test accuracy | " + " | ".join(f"{level * 100:g} %" for level in levels) + " | final |",
        "|---" * (len(levels) + 2) + "|",
    ]
    for label, path in runs.items():
        curve = accuracy_curve(path)
        cells = ["—" if m is None else f"{m:.1f}" for m in minutes_to_accuracy(curve, levels)]
        last_minutes, last_acc = curve[-1]
        final = f"**{last_acc * 100:.2f} %** at {last_minutes:.1f} min"
        lines.append(f"| {label} | " + " | ".join(cells) + f" | {final} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", action="append", required=True, metavar="LABEL=CSV")
    p.add_argument("--target", action="append", type=float, default=[])
    p.add_argument("--y-min", type=float, default=None)
    p.add_argument("--out", required=True)
    p.add_argument("--levels", type=float, nargs="*", default=[], help="accuracies for the minutes-to-accuracy table")
    args = p.parse_args(argv)
    runs = {}
    for spec in args.run:
        label, sep, path = spec.rpartition("=")
        if not sep or not label or not Path(path).is_file():
            p.error(f"--run expects LABEL=CSV with an existing CSV, got {spec!r}")
        runs[label] = path
    plot_time_to_accuracy(runs, Path(args.out), tuple(args.target), args.y_min)
    print(f"wrote {args.out}")
    if args.levels:
        print(markdown_table(runs, tuple(args.levels)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
