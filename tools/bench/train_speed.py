#!/usr/bin/env python
"""Training speed of a preset on the compiled backend against the reference backend, and
a profile of one training step (docs/RESULTS.md).

    python tools/bench/train_speed.py                         # fmnist preset, batch 128, 2 threads
    python tools/bench/train_speed.py --profile               # also: where one step's time goes
    python tools/bench/train_speed.py --preset seq784 --rounds 3 --steps 3

The backend is fixed when ``terminator.ops`` is imported, so each measurement is a worker
process (``TERMINATOR_BACKEND=cpp`` or ``reference``); the workers alternate round by
round (cpp, reference, cpp, reference, …) so both see the same machine load, and the
median step time over all rounds is reported. A step is the training loop's: forward
with the hyper-kernels, TerminatorLoss, backward, Kar3 step, on a fixed random batch of
the preset's input shape (the time does not depend on pixel values). The first
``--warmup`` steps of each worker are excluded.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time


def _step_fn(preset: str, batch: int, seed: int):
    import torch

    from terminator.losses import TerminatorLoss
    from terminator.models import Terminator
    from terminator.optim import Kar3

    torch.manual_seed(seed)
    model = Terminator.from_preset(preset)
    shape = (model.config.channels[0], *model.config.size)
    x = torch.randn(batch, *shape)
    y = torch.randint(0, model.config.num_classes, (batch,))
    opt = Kar3(model.parameters(), lr=1e-3)
    objective = TerminatorLoss()
    model.train()

    def step():
        opt.zero_grad(set_to_none=True)
        logits, kernels = model(x, return_kernels=True)
        objective(model, logits, y, kernels).total.backward()
        opt.step()

    return model, step


def worker(args) -> None:
    import torch

    import terminator.ops as ops

    torch.set_num_threads(args.threads)
    _, step = _step_fn(args.preset, args.batch_size, args.seed)
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        step()
        times.append(time.perf_counter() - t0)
    print(json.dumps({"backend": ops.backend().name, "times": times}))


def profile(args) -> dict:
    """Self CPU time of one step by operator, grouped: where the time goes."""
    import torch
    from torch.profiler import ProfilerActivity, profile as torch_profile

    import terminator.ops as ops

    torch.set_num_threads(args.threads)
    _, step = _step_fn(args.preset, args.batch_size, args.seed)
    for _ in range(args.warmup):
        step()
    with torch_profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(args.profile_steps):
            step()
    events = [(e.key, e.self_cpu_time_total / args.profile_steps / 1e3, e.count // args.profile_steps)
              for e in prof.key_averages()]
    total = sum(ms for _, ms, _ in events)
    groups: dict[str, float] = {}
    for name, ms, _ in events:
        groups[_group(name)] = groups.get(_group(name), 0.0) + ms
    print(f"\nprofile of one training step ({args.preset}, batch {args.batch_size}, {args.threads} threads, "
          f"backend {ops.backend().name}; self CPU time, mean of {args.profile_steps} steps): {total:.1f} ms")
    print(f"{'group':<44} {'ms':>8} {'share':>7}")
    for name, ms in sorted(groups.items(), key=lambda kv: -kv[1]):
        print(f"{name:<44} {ms:8.2f} {ms / total:7.1%}")
    print(f"\ntop operators\n{'operator':<52} {'ms':>8} {'share':>7} {'calls':>6}")
    for name, ms, calls in sorted(events, key=lambda e: -e[1])[:args.top]:
        print(f"{name[:52]:<52} {ms:8.2f} {ms / total:7.1%} {calls:6d}")
    return {"total_ms": total, "groups": groups,
            "top": [{"op": n, "ms": ms, "calls": c} for n, ms, c in sorted(events, key=lambda e: -e[1])[:args.top]]}


def _group(op: str) -> str:
    if op.startswith("terminator::"):
        return "terminator ops (" + ("backward" if "backward" in op else "forward") + ")"
    if "convolution_backward" in op:
        return "convolution backward (ATen)"
    if "conv" in op or "mkldnn_convolution" in op:
        return "convolution forward (ATen)"
    if op in ("aten::mm", "aten::addmm", "aten::bmm", "aten::matmul", "aten::linear", "aten::baddbmm"):
        return "matmul / linear (ATen)"
    if "batch_norm" in op or "native_layer_norm" in op or "group_norm" in op:
        return "normalization (ATen)"
    if "Optimizer" in op or "_foreach" in op:
        return "optimizer"
    if "Backward" in op or "backward" in op:
        return "autograd nodes (other backward glue)"
    return "other ATen ops (elementwise, reductions, copies)"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="fmnist")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--rounds", type=int, default=3, help="worker pairs (cpp, reference)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per worker")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--profile", action="store_true", help="also profile one step on the compiled backend")
    p.add_argument("--profile-steps", type=int, default=3)
    p.add_argument("--top", type=int, default=15)
    p.add_argument("--json", default=None, help="write the figures here")
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        worker(args)
        return 0

    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--preset", args.preset,
           "--batch-size", str(args.batch_size), "--threads", str(args.threads), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--seed", str(args.seed)]
    times: dict[str, list[float]] = {"cpp": [], "reference": []}
    for r in range(args.rounds):
        for backend in times:
            env = {**os.environ, "TERMINATOR_BACKEND": backend}
            out = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
            if out.returncode != 0:
                sys.stderr.write(out.stderr)
                raise SystemExit(f"the {backend} worker failed (exit {out.returncode})")
            got = json.loads(out.stdout.strip().splitlines()[-1])
            if got["backend"] != backend:
                raise SystemExit(f"asked for backend {backend}, the worker ran {got['backend']}")
            times[backend] += got["times"]
            print(f"round {r + 1}/{args.rounds} {backend:<9} median step "
                  f"{statistics.median(got['times']) * 1e3:8.1f} ms", file=sys.stderr, flush=True)
    med = {b: statistics.median(t) for b, t in times.items()}
    rate = {b: args.batch_size / m for b, m in med.items()}
    ratio = rate["cpp"] / rate["reference"]
    print(f"training speed, preset {args.preset}, batch {args.batch_size}, {args.threads} threads, "
          f"{args.rounds} rounds x {args.steps} steps per backend (medians):")
    for b in times:
        print(f"  {b:<9} {med[b] * 1e3:8.1f} ms/step  {rate[b]:8.1f} samples/s")
    print(f"  compiled / reference: {ratio:.2f}x")
    result = {"preset": args.preset, "batch_size": args.batch_size, "threads": args.threads,
              "median_step_s": med, "samples_per_s": rate, "ratio": ratio, "step_times_s": times}
    if args.profile:
        result["profile"] = profile(args)
    if args.json:
        with open(args.json, "w", encoding="utf-8") as f:
            json.dump(result, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
