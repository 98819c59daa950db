#!/usr/bin/env python
"""Training and inference speed of the Terminator presets: this package's fused network
against the same network in plain PyTorch (TERMINATOR_BACKEND=reference), each eager and
under torch.compile, and for the Fashion-MNIST presets the plain CNN baseline.

    python tools/bench/train_speed.py                          # the presets of the targets, 2 rounds
    python tools/bench/train_speed.py --presets fmnist --rounds 3 --profile
    python tools/bench/train_speed.py --no-compile --json /tmp/speed.json

Each measurement is a worker process (the backend is fixed when terminator.ops is
imported), and the workers of a round alternate between the paths so that all see the
same machine load. A training step is the training loop's: forward with the hyper-kernels,
TerminatorLoss, backward, Kar3 step, on a fixed random batch of the preset's input shape
(the time does not depend on pixel values); an inference step is an eval-mode forward of
the same batch without gradients. The first --warmup steps of each worker are excluded
(under torch.compile, the first is the compilation, reported apart). Ratios are the
comparator's median time over ours, with the range of the per-round ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

# preset → batch size
PRESETS = {"fmnist": 128, "seq784": 64, "mnist1d": 128, "cifar10": 16, "fmnist-large": 128, "fmnist-patch": 128}
# The presets the targets name, run by default; the others on request.
DEFAULT_PRESETS = ("fmnist", "seq784", "mnist1d", "cifar10")
# path → (TERMINATOR_BACKEND, torch.compile)
PATHS = {
    "ours": ("auto", False),
    "ours+compile": ("auto", True),
    "reference": ("reference", False),
    "reference+compile": ("reference", True),
    "cnn": ("auto", False),
}
# ATen's matrix products (BLAS), inside the fused kernels or not: the reference network
# computes products of the same sizes, so their time bounds how far ours can pull ahead.
MATRIX_PRODUCTS = ("aten::mm", "aten::addmm", "aten::addmm_", "aten::bmm", "aten::baddbmm", "aten::matmul")
# The targets: (ours path, comparator path, mode, threshold, presets)
TARGETS = [
    ("ours", "reference", "train", 3.0, ("fmnist", "seq784", "mnist1d", "cifar10")),
    ("ours", "reference+compile", "train", 3.0, ("fmnist", "seq784", "mnist1d")),
    ("ours", "reference", "eval", 3.0, ("fmnist", "seq784", "mnist1d")),
]


def _model_and_batch(preset: str, batch: int, path: str, seed: int):
    import torch

    torch.manual_seed(seed)
    if path == "cnn":
        sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "experiments"))
        from baseline_cnn import baseline_cnn

        model = baseline_cnn(10)
        x = torch.randn(batch, 1, 28, 28)
    else:
        from terminator.models import Terminator

        model = Terminator.from_preset(preset)
        x = torch.randn(batch, model.config.channels[0], *model.config.size)
    return model, x, torch.randint(0, 10, (batch,))


def _steps(preset: str, batch: int, path: str, seed: int):
    """(train_step, eval_step) closures for one model; each switches the model's mode only
    when it is in the other one, as the training loop sets it once per epoch."""
    import torch
    import torch.nn.functional as F

    from terminator.losses import TerminatorLoss
    from terminator.optim import Kar3

    model, x, y = _model_and_batch(preset, batch, path, seed)
    net = torch.compile(model) if PATHS[path][1] else model
    if path == "cnn":
        opt = torch.optim.Adam(model.parameters(), lr=2e-3)

        def train():
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(net(x), y).backward()
            opt.step()
    else:
        opt, objective = Kar3(model.parameters(), lr=1e-3), TerminatorLoss()

        def train():
            opt.zero_grad(set_to_none=True)
            logits, kernels = net(x, return_kernels=True)
            objective(model, logits, y, kernels).total.backward()
            opt.step()

    def infer():
        with torch.no_grad():
            net(x)

    def in_mode(step, training: bool):
        def step_in_mode():
            if model.training != training:
                model.train(training)
            step()

        return step_in_mode

    return in_mode(train, True), in_mode(infer, False)


def _timed(fn, warmup: int, steps: int) -> tuple[list[float], float]:
    t0 = time.perf_counter()
    fn()
    first = time.perf_counter() - t0
    for _ in range(max(0, warmup - 1)):
        fn()
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times, first


def worker(args) -> None:
    import torch

    import terminator.ops as ops
    from terminator.train.allocator import keep_freed_memory

    torch.set_num_threads(args.threads)
    keep_freed_memory()  # every path, as `terminator train` runs
    train, infer = _steps(args.preset, args.batch_size, args.path, args.seed)
    train_times, first_train = _timed(train, args.warmup, args.steps)
    eval_times, first_eval = _timed(infer, args.warmup, args.steps)
    print(
        json.dumps(
            {
                "backend": ops.backend().name,
                "train": train_times,
                "eval": eval_times,
                "first_train_s": first_train,
                "first_eval_s": first_eval,
            }
        )
    )


def profile(preset: str, batch: int, threads: int, top: int, reference_ms: float | None = None) -> dict:
    """Self CPU time of one training step of ours, by operator: where the time goes.

    Also the share of BLAS matrix products and, with ``reference_ms`` (the reference
    network's step, measured in the same run), the ratio a step would reach if it took
    the products' time alone."""
    import torch
    from torch.profiler import ProfilerActivity
    from torch.profiler import profile as torch_profile

    from terminator.train.allocator import keep_freed_memory

    torch.set_num_threads(threads)
    keep_freed_memory()
    train, _ = _steps(preset, batch, "ours", 0)
    warmup = 2
    for _ in range(warmup):
        train()
    # One profiled step: over a longer session the profiler's records fragment the heap, the
    # step's large tensors land on fresh pages, and page faults inflate the ops allocating them.
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        train()
    events = sorted(
        ((e.key, e.self_cpu_time_total / 1e3, e.count) for e in prof.key_averages()),
        key=lambda e: -e[1],
    )
    total = sum(ms for _, ms, _ in events)
    print(
        f"\nwhere a training step of ours goes ({preset}, batch {batch}, {threads} threads; self CPU time, "
        f"one step after {warmup} warm-up steps): {total:.1f} ms"
    )
    print(f"  {'operator':<56} {'ms':>8} {'share':>7} {'calls':>6}")
    for name, ms, calls in events[:top]:
        print(f"  {name[:56]:<56} {ms:8.2f} {ms / total:7.1%} {calls:6d}")
    products = sum(ms for name, ms, _ in events if name in MATRIX_PRODUCTS)
    line = f"  matrix products (BLAS, in the fused kernels or not): {products:.1f} ms ({products / total:.1%})"
    if reference_ms and products > 0:
        line += f"; a step of these alone would be {reference_ms / products:.2f}x the reference's {reference_ms:.0f} ms"
    print(line)
    return {
        "total_ms": total,
        "matrix_products_ms": products,
        "top": [{"op": n, "ms": ms, "calls": c} for n, ms, c in events[:top]],
    }


def _batch(args, preset: str) -> int:
    return args.batch or PRESETS[preset]


def _run_worker(args, preset: str, path: str) -> dict | str:
    """The worker's measurements, or the reason it failed (its last line of output)."""
    cmd = [
        sys.executable,
        os.path.abspath(__file__),
        "--worker",
        "--preset",
        preset,
        "--path",
        path,
        "--batch-size",
        str(_batch(args, preset)),
        "--threads",
        str(args.threads),
        "--steps",
        str(args.steps),
        "--warmup",
        str(args.warmup),
        "--seed",
        str(args.seed),
    ]
    env = {**os.environ, "TERMINATOR_BACKEND": PATHS[path][0]}
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if out.returncode != 0:
        last = (out.stderr.strip().splitlines() or ["no output"])[-1]
        return f"exit {out.returncode}: {last[:200]}"
    return json.loads(out.stdout.strip().splitlines()[-1])


def _pooled_median(rounds: list[list[float]]) -> float:
    """The median of every step of every round."""
    return statistics.median([t for r in rounds for t in r])


def _ratio(times: dict, preset: str, mode: str, ours: str, other: str):
    """Median time ratio other/ours and the range of the per-round ratios."""
    a, b = times[preset][ours][mode], times[preset][other][mode]
    per_round = [statistics.median(y) / statistics.median(x) for x, y in zip(a, b)]
    whole = _pooled_median(b) / _pooled_median(a)
    return whole, min(per_round), max(per_round)


def report(result: dict) -> list[str]:
    """The tables and target verdicts of a result (a run or a saved JSON)."""
    times, lines = result["times"], []
    lines.append(
        f"training and inference speed, {result['threads']} threads, {result['rounds']} rounds x "
        f"{result['steps']} steps per path (medians; ms per batch, samples/s)"
    )
    for preset, paths in times.items():
        batch = result["batches"][preset]
        lines.append(f"\n{preset} (batch {batch})")
        lines.append(
            f"  {'path':<19} {'train ms':>9} {'samples/s':>10} {'eval ms':>9} {'samples/s':>10}"
            f" {'train vs ours':>14}  first step (s)"
        )
        ours_train = _pooled_median(paths["ours"]["train"]) if "ours" in paths else None
        for path, data in paths.items():
            tr, ev = _pooled_median(data["train"]), _pooled_median(data["eval"])
            rel = f"{tr / ours_train:13.2f}x" if ours_train else ""
            lines.append(
                f"  {path:<19} {tr * 1e3:9.1f} {batch / tr:10.0f} {ev * 1e3:9.1f} {batch / ev:10.0f}"
                f" {rel:>14}  {statistics.median(data['first_train_s']):.1f}"
            )
    for preset, failed in result.get("failures", {}).items():
        for path, why in failed.items():
            lines.append(f"  {preset} {path}: failed ({why})")
    lines.append("\ntargets (ratio = comparator's median time / ours; [range of the per-round ratios]):")
    for ours, other, mode, threshold, presets in TARGETS:
        for preset in presets:
            if preset not in times or ours not in times[preset] or other not in times[preset]:
                why = result.get("failures", {}).get(preset, {}).get(other)
                if why:
                    lines.append(f"  n/a    {preset:<8} {mode:<5} {ours} vs {other}: the comparator failed ({why})")
                continue
            whole, lo, hi = _ratio(times, preset, mode, ours, other)
            verdict = "met   " if whole >= threshold else "MISSED"
            lines.append(
                f"  {verdict} {preset:<8} {mode:<5} {ours} vs {other}: {whole:.2f}x [{lo:.2f}-{hi:.2f}]"
                f" (target >= {threshold:g}x)"
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--presets",
        default=",".join(DEFAULT_PRESETS),
        help="comma-separated: " + ", ".join(PRESETS) + " (default: " + ", ".join(DEFAULT_PRESETS) + ")",
    )
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=2, help="rounds of one worker per path")
    p.add_argument("--steps", type=int, default=5, help="timed steps per worker and mode")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--batch", type=int, default=None, help="one batch size for every preset (smoke runs)")
    p.add_argument("--no-compile", action="store_true", help="skip the torch.compile paths")
    p.add_argument(
        "--compile-presets",
        default="fmnist,seq784,mnist1d",
        help="presets that also run the torch.compile paths (the targets compare those)",
    )
    p.add_argument("--profile", action="store_true", help="also show where a training step of ours goes")
    p.add_argument("--top", type=int, default=20)
    p.add_argument("--json", default=None, help="write the measurements here")
    p.add_argument("--report", default=None, metavar="JSON", help="print the tables of a saved run")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--path", help=argparse.SUPPRESS)
    p.add_argument("--batch-size", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0
    if args.report:
        with open(args.report, encoding="utf-8") as f:
            print("\n".join(report(json.load(f))))
        return 0
    presets = [s for s in args.presets.split(",") if s]
    unknown = [s for s in presets if s not in PRESETS]
    if unknown:
        raise SystemExit(f"unknown preset(s) {unknown}; choose from {list(PRESETS)}")
    times: dict = {}
    failures: dict = {}
    for r in range(args.rounds):
        for preset in presets:
            compiled = not args.no_compile and preset in args.compile_presets.split(",")
            paths = [q for q in PATHS if (q != "cnn" or preset.startswith("fmnist")) and (compiled or not PATHS[q][1])]
            for path in paths:
                got = _run_worker(args, preset, path)
                if isinstance(got, str):  # e.g. torch.compile of the reference crashing
                    failures.setdefault(preset, {})[path] = got
                    print(
                        f"round {r + 1}/{args.rounds} {preset:<8} {path:<18} failed: {got}", file=sys.stderr, flush=True
                    )
                    continue
                entry = times.setdefault(preset, {}).setdefault(
                    path, {"train": [], "eval": [], "first_train_s": [], "first_eval_s": []}
                )
                for key in ("train", "eval"):
                    entry[key].append(got[key])
                entry["first_train_s"].append(got["first_train_s"])
                entry["first_eval_s"].append(got["first_eval_s"])
                print(
                    f"round {r + 1}/{args.rounds} {preset:<8} {path:<18} train "
                    f"{statistics.median(got['train']) * 1e3:8.1f} ms  "
                    f"eval {statistics.median(got['eval']) * 1e3:8.1f} ms",
                    file=sys.stderr,
                    flush=True,
                )
    import torch

    result = {
        "threads": args.threads,
        "rounds": args.rounds,
        "steps": args.steps,
        "torch": torch.__version__,
        "batches": {preset: _batch(args, preset) for preset in presets},
        "date": time.strftime("%Y-%m-%d"),
        "commit": git_commit(),
        "cpu": cpu_summary(),
        "times": times,
    }
    print("\n".join(report(result)))
    if args.profile:
        reference = times.get(presets[0], {}).get("reference")
        reference_ms = _pooled_median(reference["train"]) * 1e3 if reference else None
        result["profile"] = profile(presets[0], _batch(args, presets[0]), args.threads, args.top, reference_ms)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=1)
    return 0


def git_commit() -> str:
    """The checkout's short commit hash, or "unknown" outside a git checkout."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(os.path.abspath(__file__)),
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def cpu_summary() -> str:
    """The CPU's model and its widest vector instructions, e.g. "AMD EPYC (family 25, model 1),
    AVX2": the compiled kernels are built for this machine's, and their speed follows them."""
    from terminator.ops._build import cpuinfo

    fields = {k.strip(): v.strip() for k, _, v in (line.partition(":") for line in cpuinfo().splitlines())}
    flags = set(fields.get("flags", "").split())
    model = fields.get("model name", platform.machine())
    if "cpu family" in fields and "model" in fields:
        model += f" (family {fields['cpu family']}, model {fields['model']})"
    widest = (("avx512f", "AVX-512"), ("avx2", "AVX2"), ("sse2", "SSE2"), ("asimd", "NEON"))
    isa = next((name for flag, name in widest if flag in flags), "")
    return f"{model}, {isa}" if isa else model


if __name__ == "__main__":
    raise SystemExit(main())
