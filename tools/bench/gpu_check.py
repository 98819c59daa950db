#!/usr/bin/env python
"""The timed parts of tools/gpu_check.sh: op timings and training on a CUDA device.

    python tools/bench/gpu_check.py ops OUT.json [--dry-run]
    python tools/bench/gpu_check.py train OUT.json [--dry-run]

`ops`: forward+backward of every op against the eager reference and torch.compile of it
at the benchmark's shapes, plus the 1D global convolution at L = 1K, 4K, 16K, 64K, each
with peak memory. `train`: one epoch of the mnist1d preset (MNIST-1D where the data can be
had offline, else random data of its shape, said so) and the median training step of the
fmnist preset. `--dry-run` runs the same code on the CPU with tiny shapes (a check that the
script works, not a measurement). Each part writes its JSON as it goes, so a part stopped
by its time limit leaves what it finished.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

import terminator.ops as ops
from terminator.ops import reference


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, device: str, repeats: int) -> float:
    """Median seconds of fn() over repeats, after one warm-up call."""
    fn()
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _peak_mb(fn, device: str) -> float | None:
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    fn()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() / 2**20


def _fwdbwd(fn, inputs):
    def run():
        leaves = [t.detach().requires_grad_() for t in inputs]
        y = fn(*leaves)
        y.backward(torch.ones_like(y))

    return run


def op_cases(dry: bool):
    """(name, ours, reference, inputs maker) at the benchmark's shapes (tiny for a dry run)."""
    B, C = (2, 3) if dry else (64, 36)
    sizes2d = [(8, 8)] if dry else [(28, 28), (32, 32), (64, 64)]
    lengths = [16, 64] if dry else [784, 1024, 4096, 16384, 65536]
    cases = []

    def global_case(mode, batch, channels, spatial):
        def make(device, dtype):
            g = torch.Generator().manual_seed(0)
            return [
                torch.randn(s, generator=g).to(device, dtype)
                for s in ((channels, *spatial), (batch, channels, *spatial), (batch, channels, *spatial))
            ]

        name = f"global {mode} B={batch} C={channels} {'x'.join(map(str, spatial))}"
        cases.append(
            (
                name,
                lambda k, z, x: ops.hyperzzw_global(k, z, x, mode=mode),
                lambda k, z, x: reference.hyperzzw_global(k, z, x, mode=mode),
                make,
            )
        )

    def conv_case(batch, channels, spatial, ksize):
        kernel = tuple(min(ksize, s) for s in spatial)

        def make(device, dtype):
            g = torch.Generator().manual_seed(0)
            return [
                torch.randn(batch, channels, *spatial, generator=g).to(device, dtype),
                torch.randn(batch, channels, *kernel, generator=g).to(device, dtype),
            ]

        name = f"hkconv {'x'.join(map(str, kernel))} B={batch} C={channels} {'x'.join(map(str, spatial))}"
        cases.append((name, lambda x, w: ops.hyperkernel_conv(x, w), reference.hyperkernel_conv, make))

    for spatial in sizes2d:
        for mode in ("dot", "matmul", "conv"):
            global_case(mode, B if spatial[0] < 64 else max(1, B // 4), C, spatial)
        for ksize in (3, 7):
            conv_case(B, C, spatial, ksize)
    for length in lengths:
        batch = B if length <= 4096 else max(1, B // 16)
        global_case("dot", batch, C, (length,))
        global_case("conv", batch, C, (length,))  # FlashFFTConv's range of lengths
        conv_case(batch, C, (length,), 7)
    return cases


def run_ops(out: Path, dry: bool) -> None:
    device = "cpu" if dry else "cuda"
    repeats = 2 if dry else 10
    results = {
        "device": device,
        "dry_run": dry,
        "torch": torch.__version__,
        "backend": str(ops.backend()),
        "gpu": torch.cuda.get_device_name(0) if device == "cuda" else None,
        "cases": [],
    }
    dtypes = [torch.float32] if dry else [torch.float32, torch.bfloat16]
    for name, ours, ref, make in op_cases(dry):
        for dtype in dtypes:
            inputs = make(device, dtype)
            row = {"case": name, "dtype": str(dtype).removeprefix("torch.")}
            impls = {"ours": ours, "eager": ref}
            if not dry:
                impls["compiled"] = torch.compile(ref, dynamic=False)
            for label, fn in impls.items():
                try:
                    row[f"{label}_ms"] = _time(_fwdbwd(fn, inputs), device, repeats) * 1e3
                    row[f"{label}_peak_mb"] = _peak_mb(_fwdbwd(fn, inputs), device)
                except Exception as exc:  # an eager reference out of memory at 64K, say
                    row[f"{label}_error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"
                    if device == "cuda":
                        torch.cuda.empty_cache()
            if "ours_ms" in row and "eager_ms" in row:
                row["vs_eager"] = row["eager_ms"] / row["ours_ms"]
            if "ours_ms" in row and "compiled_ms" in row:
                row["vs_compiled"] = row["compiled_ms"] / row["ours_ms"]
            results["cases"].append(row)
            print(json.dumps(row), flush=True)
            out.write_text(json.dumps(results, indent=1))


def _mnist1d(dry: bool):
    """MNIST-1D (train x, y) if it can be had offline, else random data of its shape."""
    try:
        from terminator.train.config import TrainConfig
        from terminator.train.data import load_dataset

        splits = load_dataset(TrainConfig(dataset="mnist1d", val_fraction=0.0))
        return splits.train_x, splits.train_y, "MNIST-1D"
    except Exception as exc:  # no mnist1d package and no cached copy on this machine
        g = torch.Generator().manual_seed(0)
        n = 256 if dry else 4000
        return (
            torch.randn(n, 1, 40, generator=g),
            torch.randint(0, 10, (n,), generator=g),
            f"random data of MNIST-1D's shape ({type(exc).__name__}: {str(exc)[:120]})",
        )


def run_train(out: Path, dry: bool) -> None:
    from terminator.losses import TerminatorLoss
    from terminator.models import Terminator
    from terminator.optim import Kar3

    device = "cpu" if dry else "cuda"
    result = {"device": device, "dry_run": dry}
    torch.manual_seed(0)
    x, y, source = _mnist1d(dry)
    model = Terminator.from_preset("mnist1d").to(device)
    opt, objective = Kar3(model.parameters()), TerminatorLoss()
    batch = 128
    _sync(device)
    t0 = time.perf_counter()
    losses = []
    perm = torch.randperm(len(y))
    for i in range(0, len(perm), batch):
        b = perm[i : i + batch]
        xb, yb = x[b].to(device), y[b].to(device)
        opt.zero_grad(set_to_none=True)
        logits, kernels = model(xb, return_kernels=True)
        loss = objective(model, logits, yb, kernels).total
        loss.backward()
        opt.step()
        losses.append(loss.item())
    _sync(device)
    result["mnist1d_epoch"] = {
        "data": source,
        "samples": len(y),
        "seconds": time.perf_counter() - t0,
        "first_loss": losses[0],
        "last_loss": losses[-1],
    }
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["mnist1d_epoch"]), flush=True)

    fm = Terminator.from_preset("fmnist").to(device)
    opt = Kar3(fm.parameters())
    fb = 8 if dry else 128
    xb, yb = torch.randn(fb, 1, 28, 28, device=device), torch.randint(0, 10, (fb,), device=device)

    def step():
        opt.zero_grad(set_to_none=True)
        logits, kernels = fm(xb, return_kernels=True)
        objective(fm, logits, yb, kernels).total.backward()
        opt.step()

    result["fmnist_step"] = {
        "batch": fb,
        "median_ms": _time(step, device, 3 if dry else 20) * 1e3,
        "peak_mb": _peak_mb(step, device),
    }
    out.write_text(json.dumps(result, indent=1))
    print(json.dumps(result["fmnist_step"]), flush=True)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("part", choices=["ops", "train"])
    p.add_argument("out", type=Path)
    p.add_argument("--dry-run", action="store_true", help="tiny shapes on the CPU")
    args = p.parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print("gpu_check: no CUDA device (torch.cuda.is_available() is False); use --dry-run", file=sys.stderr)
        return 2
    (run_ops if args.part == "ops" else run_train)(args.out, args.dry_run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
