#!/usr/bin/env python
"""Times every op against the eager reference and torch.compile(reference).

In one process, interleaved (each repeat runs every implementation once, so a
noisy neighbour hits all of them alike), warm-up excluded, medians over repeats.
Prints a table, then the project's performance goals (docs/PERFORMANCE.md, "Goals"),
each marked met or MISSED with the ratios of this run (evaluate_targets), and writes both
as JSON. For memory-bound ops also the bytes a perfect kernel
moves and %copy: the time of a tensor copy of those same bytes, timed in the same
interleaved rounds, as a share of ours (100 % = copy speed); for every case the peak
memory of forward+backward: measured in a worker process whose allocator maps
every block of 128 KiB or more on its own (MALLOC_MMAP_THRESHOLD_), so the
resident-set high-water mark (reset through /proc/self/clear_refs before each
measurement; Linux only) follows the live tensors, after one warm-up call.

The timing process fixes glibc's allocator (mallopt: mmap threshold 32 MiB, no trimming),
so a tensor under 32 MiB reuses freed heap memory. Left to adapt, glibc hands out fresh,
page-faulting memory or reused memory depending on what ran before: the same 3×3
convolution forward measured 0.48 ms and 1.87 ms, and the eager reference 0.73 and 5.71 ms,
in the first case of two processes. --default-malloc leaves glibc as it is.

    python tools/bench/bench_ops.py                    # all cases, 2 threads
    python tools/bench/bench_ops.py --only dot --repeats 30
    python tools/bench/bench_ops.py --tiny --json /tmp/b.json   # seconds: the test's smoke run
    python tools/bench/bench_ops.py --report docs/bench_ops.json  # a saved run's table and targets again
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import functools
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

import terminator
from terminator.ops import reference


@dataclasses.dataclass
class Case:
    name: str  # e.g. "global dot 2D 28x28"
    group: str  # dot | matmul | conv | hkconv | hkconv-shared
    make: Callable[[], tuple]  # -> input tensors (float32)
    ours: Callable
    ref: Callable
    bytes_fwd: int | None = None  # memory-bound ops: bytes a perfect kernel moves
    bytes_fwdbwd: int | None = None
    extra: dict[str, Callable] = dataclasses.field(default_factory=dict)  # more baselines
    # What the goals select cases by: op, spatial, and for hkconv ksize, algo, shared.
    tags: dict = dataclasses.field(default_factory=dict)


def _global_case(mode: str, batch: int, channels: int, spatial: tuple[int, ...]) -> Case:
    def make():
        g = torch.Generator().manual_seed(0)
        k = torch.randn(channels, *spatial, generator=g)
        z = torch.randn(batch, channels, *spatial, generator=g)
        x = torch.randn(batch, channels, *spatial, generator=g)
        return k, z, x

    n = channels * int(torch.tensor(spatial).prod())
    size = "x".join(map(str, spatial))
    elem = 4
    return Case(
        name=f"global {mode} {len(spatial)}D B={batch} C={channels} {size}",
        group=mode,
        make=make,
        ours=lambda k, z, x: terminator.ops.hyperzzw_global(k, z, x, mode=mode),
        ref=lambda k, z, x: reference.hyperzzw_global(k, z, x, mode=mode),
        # dot: forward reads k, z, x and writes y; backward reads gy, k, z, x and
        # writes gk, gz, gx (k is shared, so its traffic is one plane).
        bytes_fwd=elem * n * (3 * batch + 1) if mode == "dot" else None,
        bytes_fwdbwd=elem * n * ((3 * batch + 1) + (6 * batch + 2)) if mode == "dot" else None,
        tags={"op": mode, "spatial": spatial},
        # A full-size kernel's other way: the zero-padded FFT correlation a user would write.
        extra={"eager FFT": fft_global_conv} if mode == "conv" else {},
    )


def fft_same_correlation(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """``conv_same(x, w)`` for ``x (B, C, *S)``, ``w (B, C, *K)`` by zero-padded real FFTs."""
    d = x.dim() - 2
    dims = tuple(range(-d, 0))
    kernel = w.shape[-d:]
    size = [s + k - 1 for s, k in zip(x.shape[-d:], kernel)]
    full = torch.fft.irfftn(
        torch.fft.rfftn(x, s=size, dim=dims) * torch.fft.rfftn(w, s=size, dim=dims).conj(), s=size, dim=dims
    )
    # full[m] = Σ_n x[n + m]·w[n] (m mod the padded size); "same" takes m = p − ⌊(K−1)/2⌋.
    full = full.roll(shifts=[(k - 1) // 2 for k in kernel], dims=dims)
    for dim, s in zip(dims, x.shape[-d:]):
        full = full.narrow(dim, 0, s)
    return full


def fft_global_conv(k, z, x):
    return fft_same_correlation(x, k * z)


def _hkconv_case(
    batch: int, channels: int, spatial: tuple[int, ...], ksize: int, shared: bool, algo: str = "auto"
) -> Case:
    kernel = tuple(min(ksize, s) for s in spatial)

    def make():
        g = torch.Generator().manual_seed(0)
        x = torch.randn(batch, channels, *spatial, generator=g)
        w = torch.randn(*((channels,) if shared else (batch, channels)), *kernel, generator=g)
        return x, w

    size = "x".join(map(str, spatial))
    ks = "x".join(map(str, kernel))
    # Kernels of up to 9 taps (3×3; 1D kernels of 3 to 9) are bound by memory (they run
    # near a copy's speed; 9 taps do as much arithmetic per value as 3×3), so they get a
    # same-size copy as a yardstick: forward reads x and w and writes y; backward reads grad_y, x and w and
    # writes grad_x and grad_w. Larger kernels are bound by their arithmetic.
    n, taps = batch * channels * math.prod(spatial), (1 if shared else batch) * channels * math.prod(kernel)
    memory_bound = math.prod(kernel) <= 9 and algo != "fft"
    case = Case(
        name=f"hkconv {'shared' if shared else 'per-sample'} {ks} {algo} B={batch} C={channels} {size}",
        group="hkconv-shared" if shared else "hkconv",
        make=make,
        ours=lambda x, w: terminator.ops.hyperkernel_conv(x, w, algo=algo),
        ref=lambda x, w: reference.hyperkernel_conv(x, w),
        bytes_fwd=4 * (2 * n + taps) if memory_bound else None,
        bytes_fwdbwd=4 * (5 * n + 3 * taps) if memory_bound else None,
        tags={"op": "hkconv", "spatial": spatial, "ksize": ksize, "algo": algo, "shared": shared},
    )
    if shared:
        conv = F.conv1d if len(spatial) == 1 else F.conv2d
        case.extra["F.conv groups=C"] = lambda x, w: conv(x, w.unsqueeze(1), padding="same", groups=channels)
    elif algo == "auto":
        # auto's goal is against the better of the two, so both run in the same rounds
        # (as separate cases, run minutes apart, auto and the direct kernel it picks
        # differed by 13 % in one run).
        for other in ("direct", "fft"):
            case.extra[other] = lambda x, w, other=other: terminator.ops.hyperkernel_conv(x, w, algo=other)
    return case


def all_cases(tiny: bool) -> list[Case]:
    if tiny:
        return [
            _global_case("dot", 2, 3, (8, 8)),
            _global_case("matmul", 2, 3, (8, 8)),
            _global_case("conv", 2, 3, (8, 8)),
            _global_case("conv", 2, 3, (16,)),
            _hkconv_case(2, 3, (8, 8), 3, shared=False),
            _hkconv_case(2, 3, (8, 8), 3, shared=True),
        ]
    B, C = 64, 36
    cases = []
    for spatial in [(28, 28), (32, 32), (784,)]:
        cases.append(_global_case("dot", B, C, spatial))
    cases += [_global_case("dot", 16, 64, (64, 64)), _global_case("dot", B, C, (4096,))]
    for spatial in [(28, 28), (32, 32)]:
        cases.append(_global_case("matmul", B, C, spatial))
    cases.append(_global_case("matmul", 16, 64, (64, 64)))
    for spatial in [(28, 28), (32, 32), (784,)]:
        cases.append(_global_case("conv", B, C, spatial))
    # L = 4096 with B = 4: the eager reference's direct 4096-tap convolution takes
    # seconds per call at B = 64.
    cases += [_global_case("conv", 16, 64, (64, 64)), _global_case("conv", 4, C, (4096,))]
    for ksize in (3, 5, 7, 9):
        for algo in ("auto", "direct", "fft"):
            cases.append(_hkconv_case(B, C, (28, 28), ksize, shared=False, algo=algo))
    for spatial in [(32, 32), (784,)]:
        cases.append(_hkconv_case(B, C, spatial, 7, shared=False))
    cases.append(_hkconv_case(16, 64, (64, 64), 7, shared=False))
    cases.append(_hkconv_case(B, C, (4096,), 9, shared=False))
    for ksize in (3, 7):
        cases.append(_hkconv_case(B, C, (28, 28), ksize, shared=True))
    return cases


# ---- measurement ----------------------------------------------------------------------


def _fwd(fn, inputs):
    with torch.no_grad():
        fn(*inputs)


# The upstream gradient, one per output shape and case: making it is the next layer's
# work, not the op's, so it is made once and not timed.
_upstream_grads: dict[tuple, torch.Tensor] = {}


def _upstream_grad(y: torch.Tensor) -> torch.Tensor:
    key = (tuple(y.shape), y.dtype, y.device)
    if key not in _upstream_grads:
        _upstream_grads[key] = torch.ones_like(y, memory_format=torch.contiguous_format)
    return _upstream_grads[key]


def _fwdbwd(fn, inputs):
    leaves = [t.detach().requires_grad_() for t in inputs]
    y = fn(*leaves)
    y.backward(_upstream_grad(y))


def _rss_bytes(field: str) -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def peak_memory(run: Callable[[], None]) -> int | None:
    """Peak resident memory above the starting point while run() executes (Linux)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    before = _rss_bytes("VmRSS")
    run()
    return max(0, _rss_bytes("VmHWM") - before)


def copy_bandwidth(repeats: int) -> float:
    """Bytes/s of a large tensor copy (read + write), the memory-bound yardstick."""
    # 256 MB each way: far past any last-level cache, whose hits would make it drift.
    src = torch.randn(64 * 2**20)
    dst = torch.empty_like(src)
    times = []
    for _ in range(repeats + 3):
        start = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - start)
    return 2 * src.numel() * src.element_size() / statistics.median(times[3:])


PLATFORM_ALLOCATOR = "as the platform sets it"


def steady_allocator() -> str:
    """Makes glibc serve tensors under 32 MiB from reused heap memory (see the module doc)."""
    M_TRIM_THRESHOLD, M_MMAP_THRESHOLD = -1, -3
    try:
        libc = ctypes.CDLL("libc.so.6")
        fixed = libc.mallopt(M_MMAP_THRESHOLD, 32 << 20) and libc.mallopt(M_TRIM_THRESHOLD, 2**31 - 1)
    except (OSError, AttributeError):
        fixed = False
    return "glibc, mmap threshold 32 MiB, no trimming" if fixed else PLATFORM_ALLOCATOR


def balanced_orders(n: int) -> list[list[int]]:
    """Orders of n implementations in which each one directly follows every other equally
    often (a Williams design: n orders for even n, 2n for odd n)."""
    first, low, high = [0], 1, n - 1
    for k in range(1, n):
        if k % 2:
            first.append(low)
            low += 1
        else:
            first.append(high)
            high -= 1
    orders = [[(i + shift) % n for i in first] for shift in range(n)]
    return orders + [order[::-1] for order in orders] if n % 2 else orders


def time_interleaved(
    impls: dict[str, Callable[[], None]], repeats: int, warmup: int, budget: float
) -> dict[str, float]:
    """Median seconds per call (of time_rounds)."""
    return {name: statistics.median(s) for name, s in time_rounds(impls, repeats, warmup, budget).items()}


def time_rounds(
    impls: dict[str, Callable[[], None]], repeats: int, warmup: int, budget: float
) -> dict[str, list[float]]:
    """Seconds of each call, one list per implementation, entry r from round r;
    fewer repeats (at least 3) when a round exceeds the budget.

    What ran just before a call leaves caches and the allocator in its own state: our 3×3
    convolution took 0.96 ms right after itself, 1.32 after eager and 1.56 after
    torch.compile(reference). So the rounds go through balanced_orders, in which every
    implementation follows every other equally often (in one fixed order, auto measured
    1.55 ms and the same direct kernel 1.15).
    """
    round_time = 0.0  # from the last warm-up call of each (with none: no budget cap)
    for run in impls.values():
        elapsed = 0.0
        for _ in range(warmup):
            start = time.perf_counter()
            run()
            elapsed = time.perf_counter() - start
        round_time += elapsed
    repeats = max(3, min(repeats, int(budget / max(round_time, 1e-9))))
    samples: dict[str, list[float]] = {name: [] for name in impls}
    names = list(impls)
    orders = balanced_orders(len(names))
    if repeats >= len(orders):  # whole cycles of the design, or its balance is lost
        repeats -= repeats % len(orders)
    for r in range(repeats):
        for name in (names[i] for i in orders[r % len(orders)]):
            start = time.perf_counter()
            impls[name]()
            samples[name].append(time.perf_counter() - start)
    return samples


def implementations(case: Case, args, compiled: bool = True) -> dict[str, Callable]:
    impls = {"ours": case.ours, "eager": case.ref, **case.extra}
    if compiled and not args.no_compile:
        impls["compiled"] = torch.compile(case.ref, dynamic=False)
        if case.group == "conv":
            impls["compiled FFT"] = torch.compile(fft_global_conv, dynamic=False)
    return impls


def same_bytes_copy(moved: int) -> Callable[[], None]:
    """A tensor copy that reads and writes `moved` bytes in all, like a perfect kernel."""
    src = torch.randn(max(1, moved // 8))
    dst = torch.empty_like(src)
    return lambda: dst.copy_(src)


def bench_case(case: Case, args) -> dict:
    _upstream_grads.clear()
    inputs = case.make()
    impls = implementations(case, args)
    result = {"name": case.name, "group": case.group, "tags": case.tags}
    if {"direct", "fft"} <= case.extra.keys():
        result["auto_runs"] = algorithm_run_by_auto(case, inputs)
    for phase, runner in (("fwd", _fwd), ("fwdbwd", _fwdbwd)):
        runs = {name: (lambda fn=fn, runner=runner: runner(fn, inputs)) for name, fn in impls.items()}
        moved = case.bytes_fwd if phase == "fwd" else case.bytes_fwdbwd
        if moved:
            # The yardstick in the same rounds as the kernels: this VM's memory bandwidth
            # drifts by up to 3x within minutes.
            runs["copy"] = same_bytes_copy(moved)
        rounds = time_rounds(runs, args.repeats, args.warmup, args.budget)
        result[phase] = {name: statistics.median(s) * 1e3 for name, s in rounds.items()}  # ms
        result.setdefault("rounds", {})[phase] = {name: [t * 1e3 for t in s] for name, s in rounds.items()}
    result["bytes_fwd"], result["bytes_fwdbwd"] = case.bytes_fwd, case.bytes_fwdbwd
    return result


def algorithm_run_by_auto(case: Case, inputs: tuple) -> str | None:
    """Which of direct and fft algo="auto" ran, told by its output: the two round
    differently, and each is deterministic. None if neither (or both) match bitwise."""
    with torch.no_grad():
        y = case.ours(*inputs)
        same = [name for name in ("direct", "fft") if torch.equal(y, case.extra[name](*inputs))]
    return same[0] if len(same) == 1 else None


def memory_worker(cases: list[Case], args) -> dict[str, dict[str, float | None]]:
    """Peak MB of one forward+backward per case and implementation (run in the worker).

    torch.compile(reference) is left out: the memory target compares ours with eager, and
    compiling every case a second time would double the benchmark's length.
    """
    peaks = {}
    for case in cases:
        _upstream_grads.clear()
        inputs = case.make()
        peaks[case.name] = {}
        for name, fn in implementations(case, args, compiled=False).items():
            _fwdbwd(fn, inputs)  # warm-up: plans, compilation, first-touch allocations
            peak = peak_memory(lambda fn=fn, inputs=inputs: _fwdbwd(fn, inputs))
            peaks[case.name][name] = None if peak is None else peak / 2**20
    return peaks


def measure_memory(argv: list[str]) -> dict[str, dict[str, float | None]]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(
        [sys.executable, __file__, *argv, "--memory-worker"], env=env, capture_output=True, text=True, check=True
    )
    return json.loads(out.stdout.strip().splitlines()[-1])


def _fmt(x: float | None, spec: str) -> str:
    return "-" if x is None else format(x, spec)


HEADER = (
    f"{'case':<52} {'phase':<6} {'ours ms':>8} {'eager ms':>9} {'comp ms':>8} "
    f"{'x eager':>7} {'x comp':>7} {'%copy':>6} {'peak MB ours/eager':>19} {'other':>20}"
)


def load_results(path: Path) -> tuple[dict, list[dict]]:
    """A saved run's meta and results (:func:`saved_results`)."""
    saved = json.loads(path.read_text())
    return saved["meta"], saved_results(saved)


def saved_results(saved: dict) -> list[dict]:
    """The results of a saved run's JSON, their tags as the cases make them (JSON turns the
    spatial tuples into lists, and the targets select cases by them)."""
    for r in saved["results"]:
        r["tags"] = {k: tuple(v) if isinstance(v, list) else v for k, v in r["tags"].items()}
    return saved["results"]


def print_run(results: list[dict], bandwidth: float, allocator: str | None) -> list[dict]:
    """What a run prints after measuring (and --report prints again): the allocator, the
    table and the targets; returns the targets."""
    print(f"allocator: {allocator}")
    print_table(results, bandwidth)
    targets = evaluate_targets(results)
    print_targets(targets)
    return targets


def print_table(results: list[dict], bandwidth: float) -> None:
    print(
        f"copy bandwidth: {bandwidth / 1e9:.1f} GB/s (read+write, 256 MB, at the start; %copy is "
        "against a copy of the same bytes timed in the same rounds)"
    )
    print(HEADER)
    print("-" * len(HEADER))
    for r in results:
        print_rows(r)


def print_rows(r: dict, file=None) -> None:
    """The fwd and fwdbwd rows of one case."""
    for phase in ("fwd", "fwdbwd"):
        t = r[phase]
        ours, eager, comp = t["ours"], t["eager"], t.get("compiled")
        frac = t["copy"] / ours * 100 if "copy" in t else None  # a copy of the same bytes, same rounds
        others = " ".join(f"{k} x{t[k] / ours:.2f}" for k in t if k not in ("ours", "eager", "compiled", "copy"))
        peak = r.get("peak_mb", {})
        peak_s = f"{_fmt(peak.get('ours'), '.0f')}/{_fmt(peak.get('eager'), '.0f')}" if phase == "fwdbwd" else ""
        print(
            f"{r['name']:<52} {phase:<6} {ours:8.2f} {eager:9.2f} {_fmt(comp, '8.2f')} "
            f"{eager / ours:7.2f} {_fmt(comp / ours if comp else None, '7.2f')} {_fmt(frac, '6.0f')} "
            f"{peak_s:>19} {others:>20}",
            file=file,
            flush=True,
        )


# ---- the performance goals ------------------------------------------------------------------


def _time_of(comparator: str | Callable[[dict], float | None]) -> Callable[[dict], float | None]:
    """A comparator's time from one timing dict (name -> ms): by name, or a function of it."""
    return comparator if callable(comparator) else (lambda t: t.get(comparator))


def _ratio(r: dict, comparator) -> float | None:
    """comparator's forward+backward time over ours (> 1: ours is faster), of the medians."""
    t = r["fwdbwd"]
    theirs = _time_of(comparator)(t)
    return theirs / t["ours"] if theirs else None


def _round_spread(r: dict, comparator) -> tuple[float, float] | None:
    """Interquartile range of the same ratio taken round by round (each round's two
    times come from one round, so the VM's slow drifts over minutes cancel); None for a
    result without per-round times."""
    rounds = r.get("rounds", {}).get("fwdbwd")
    if not rounds:
        return None
    of = _time_of(comparator)
    per_round = [dict(zip(rounds, times)) for times in zip(*rounds.values())]
    ratios = [of(t) / t["ours"] for t in per_round if of(t)]
    if len(ratios) < 2:
        return None
    q1, _, q3 = statistics.quantiles(ratios, n=4, method="inclusive")
    return q1, q3


def _label(r: dict) -> str:
    tags = r["tags"]
    size = "x".join(map(str, tags["spatial"]))
    return size if tags["op"] != "hkconv" else f"{tags['ksize']}@{size}"


def _better_of_direct_and_fft(t: dict) -> float | None:
    return min(t["direct"], t["fft"]) if {"direct", "fft"} <= t.keys() else None


def _faster_of_direct_and_fft(t: dict) -> str:
    return "direct" if t["direct"] <= t["fft"] else "fft"


def evaluate_targets(results: list[dict]) -> list[dict]:
    """The performance goals (forward+backward, ratios from this run): each with the measured
    values (ratios of the medians), whether every value reaches the threshold (None: no
    case measured), and each value's round-to-round interquartile range (`spreads`, as
    label, q1, q3; None where the results hold no per-round times). A target is judged on
    the values alone; `near` names the values whose range holds the threshold, i.e. the
    ones on which a rerun may well judge otherwise."""

    def by(op: str, **want) -> list[dict]:
        return [r for r in results if r["tags"].get("op") == op and all(r["tags"].get(k) in v for k, v in want.items())]

    dot = by("dot")
    per_sample = by("hkconv", shared=[False], algo=["auto"])
    conv = by("conv")
    rows = [
        ("dot no slower than torch.compile(reference)", 1.0, dot, "compiled"),
        ("dot >= 60 % of a same-size copy", 0.60, dot, "copy"),
        ("global conv no slower than an eager FFT correlation", 1.0, conv, "eager FFT"),
        ("global conv no slower than torch.compile of the FFT correlation", 1.0, conv, "compiled FFT"),
        ("matmul >= 1.5x eager", 1.5, by("matmul"), "eager"),
        (
            "per-sample kernels of 5 to 9 taps >= 5x eager",
            5.0,
            [r for r in per_sample if r["tags"]["ksize"] in (5, 7, 9)],
            "eager",
        ),
        ("per-sample 3-tap kernels >= 2x eager", 2.0, [r for r in per_sample if r["tags"]["ksize"] == 3], "eager"),
        ("shared kernels no slower than F.conv(groups=C)", 1.0, by("hkconv", shared=[True]), "F.conv groups=C"),
        # auto within 10 % of the better of direct and fft, timed in the same rounds.
        (
            "algo='auto' within 10 % of the better of direct and fft",
            1 / 1.10,
            by("hkconv", algo=["auto"]),
            _better_of_direct_and_fft,
        ),
    ]
    out = []
    for target, threshold, cases, comparator in rows:
        measured = [(r, v) for r in cases if (v := _ratio(r, comparator)) is not None]
        values = [(_label(r), v) for r, v in measured]
        spreads = [(_label(r), *spread) for r, _ in measured if (spread := _round_spread(r, comparator))]
        if len(spreads) != len(values):  # some results without per-round times: none shown
            spreads = []
        met = all(v >= threshold for _, v in values) if values else None
        near = [label for label, q1, q3 in spreads if q1 < threshold <= q3]
        out.append(
            {
                "target": target,
                "threshold": threshold,
                "values": values,
                "met": met,
                "spreads": spreads or None,
                "near": near,
            }
        )
        at_copy_speed = [
            (_label(r), r["fwdbwd"]["eager"] / r["fwdbwd"]["copy"])
            for r, _ in measured
            if comparator == "eager" and "copy" in r["fwdbwd"]
        ]
        if at_copy_speed:
            # What a kernel moving its bytes at a same-size copy's speed would reach against
            # eager (memory-bound cases): a threshold above it asks more than the memory gives.
            out[-1]["at_copy_speed"] = at_copy_speed
        if comparator is _better_of_direct_and_fft and all("auto_runs" in r for r, _ in measured):
            # auto runs one of the two kernels it is timed against, so its ratio is partly
            # one kernel timed twice; the algorithm it ran tells whether it chose well.
            out[-1]["choices"] = [
                (_label(r), r["auto_runs"], _faster_of_direct_and_fft(r["fwdbwd"])) for r, _ in measured
            ]
    # Peak memory: ours <= eager, in MB (a ratio would divide by a 0 MB peak on tiny shapes).
    peaks = [
        (r["name"], r["peak_mb"]["ours"], r["peak_mb"]["eager"])
        for r in results
        if r.get("peak_mb", {}).get("ours") is not None and r["peak_mb"].get("eager") is not None
    ]
    out.append(
        {
            "target": "peak memory of forward+backward <= eager",
            "threshold": None,
            "values": peaks,
            "met": all(o <= e for _, o, e in peaks) if peaks else None,
        }
    )
    return out


def print_targets(targets: list[dict]) -> None:
    print(
        "goals (docs/PERFORMANCE.md; forward+backward; ratio = comparator's time / ours, of the medians, met at "
        "or above the threshold; in brackets the interquartile range of the ratio taken round by round):"
    )
    for t in targets:
        status = {True: "met", False: "MISSED", None: "n/a"}[t["met"]]
        if t["threshold"] is None:  # peak memory: one line per case would drown the rest
            over = [name for name, ours, eager in t["values"] if ours > eager]
            shown = f"{len(t['values'])} cases" + (f"; above eager: {', '.join(over)}" if over else "")
            print(f"  {status:<7} {t['target']}: {shown}")
            continue
        spreads = {label: (q1, q3) for label, q1, q3 in t["spreads"] or []}
        shown = (
            ", ".join(
                f"{label} {v:.2f}" + (" [{:.2f}-{:.2f}]".format(*spreads[label]) if label in spreads else "")
                for label, v in t["values"]
            )
            or "no case in this run"
        )
        print(f"  {status:<7} {t['target']} (>= {t['threshold']:.2f}): {shown}")
        if t["near"]:
            print(
                f"          threshold inside the round-to-round range, a rerun may judge otherwise: "
                f"{', '.join(t['near'])}"
            )
        if t.get("at_copy_speed"):
            print(
                "          at a same-size copy's speed it would be: "
                + ", ".join(f"{label} {v:.2f}" for label, v in t["at_copy_speed"])
            )
        if t.get("choices"):
            print("          " + describe_auto_choices(t["choices"]))


def describe_auto_choices(choices: list[tuple[str, str | None, str]]) -> str:
    """One line: did auto run the faster algorithm (by the medians of this run)?"""
    wrong = [f"{label} ran {ran}, {faster} faster" for label, ran, faster in choices if ran and ran != faster]
    unknown = [label for label, ran, _ in choices if ran is None]
    ran = sorted({ran for _, ran, _ in choices if ran})
    line = (
        "auto ran the faster of direct and fft at every size"
        if not wrong and not unknown
        else "; ".join(filter(None, [", ".join(wrong), unknown and f"not told: {', '.join(unknown)}"]))
    )
    return f"{line} (ran: {', '.join(ran) or 'unknown'}; told by its output, bitwise)"


def good_fft_size(m: int) -> int:
    """csrc/common.h good_fft_size: the smallest even n >= m with factors 2, 3, 5, 7 only."""
    if m <= 1:
        return 1
    n = m + m % 2
    while True:
        rest = n
        for p in (2, 3, 5, 7):
            while rest % p == 0:
                rest //= p
        if rest == 1:
            return n
        n += 2


def indifference_constant(spatial: tuple[int, ...], ksize: int) -> float:
    """The kFftCostPerPoint at which csrc/cpu/crossover.cpp's cost model (direct H·W·Kh·Kw
    against the constant times n·log2 n for n padded points) costs both algorithms the
    same: below it, algo="auto" runs the FFT."""
    kernel = [min(ksize, s) for s in spatial]
    work = math.prod(spatial) * math.prod(kernel)
    points = math.prod(1 if s == 1 else good_fft_size(s + kk - 1 - (kk - 1) // 2) for s, kk in zip(spatial, kernel))
    return work / (points * math.log2(points + 1))


def time_lost(rows: list[dict], constant: float) -> float:
    """How much slower than the faster algorithm the model's choices with this constant
    run, summed over the measured pairs (each pair's excess relative to its faster time)."""
    return sum(
        (r["fft"] if constant < r["indifferent"] else r["direct"]) / min(r["fft"], r["direct"]) - 1 for r in rows
    )


def crossover_group(row: dict) -> tuple[str, int]:
    """What kFftCostPerPoint is fitted per: the kind of kernel and the number of spatial dims."""
    return row["kernel"], len(row["spatial"])


def fit_fft_cost(rows: list[dict]) -> dict[tuple[str, int], float]:
    """Per kind of kernel ("per-sample", "shared") and number of spatial dims, the median
    over the pairs whose times are within 3x of each other (near the crossover, where the
    choice matters; the model's fixed costs skew the constant far from it), or over all of
    the group's pairs, of the constant that would make the model's cost ratio equal the
    measured one: the indifference constant times t_fft / t_direct. (The constant whose
    choices lose the least time, time_lost, is a whole range between two measured kernel
    sizes, as wide as the grid is coarse; this median places the constant inside it.)"""
    fitted = {}
    for group in sorted({crossover_group(r) for r in rows}):
        mine = [r for r in rows if crossover_group(r) == group]
        implied = [(r["indifferent"] * r["fft"] / r["direct"], r["fft"] / r["direct"]) for r in mine]
        near = [constant for constant, ratio in implied if 1 / 3 <= ratio <= 3]
        fitted[group] = statistics.median(near or [constant for constant, _ in implied])
    return fitted


def crossover_shapes(tiny: bool) -> list[tuple[tuple[int, ...], tuple[int, ...]]]:
    """(spatial size, kernel sizes): up to the input size, as large as a global conv's."""
    if tiny:
        return [((8, 8), (3, 8)), ((16,), (3, 16))]
    return [
        ((28, 28), (3, 7, 11, 15, 19, 23, 27, 28)),
        ((64, 64), (5, 13, 21, 29, 41, 53, 63, 64)),
        ((784,), (9, 63, 127, 255, 511, 783, 784)),
    ]


def measure_crossover(args) -> dict[tuple[str, int], float]:
    """Fits kFftCostPerPoint of csrc/cpu/crossover.cpp: direct and fft, forward + backward,
    per-sample and shared kernels, timed in the same rounds at each kernel size; prints
    each pair with the constant at which the model is indifferent between them
    (indifference_constant), and the fit per kind and dimension (fit_fft_cost)."""
    rows = []
    for kernel in ("per-sample", "shared"):
        for spatial, sizes in crossover_shapes(args.tiny):
            batch = 2 if args.tiny else 16 if len(spatial) == 2 and spatial[0] >= 64 else 64
            for k in sizes:
                impls = {}
                for algo in ("direct", "fft"):
                    case = _hkconv_case(batch, 4 if args.tiny else 36, spatial, k, shared=kernel == "shared", algo=algo)
                    impls[algo] = functools.partial(_fwdbwd, case.ours, case.make())
                times = time_interleaved(impls, args.repeats, args.warmup, args.budget)
                rows.append(
                    {
                        "kernel": kernel,
                        "spatial": spatial,
                        "ksize": k,
                        **times,
                        "indifferent": indifference_constant(spatial, k),
                    }
                )
                size = "x".join(map(str, spatial))
                print(
                    f"{kernel:>10} {size:>6} K={k:<4} direct {times['direct'] * 1e3:8.2f} ms  "
                    f"fft {times['fft'] * 1e3:8.2f} ms  (the model is indifferent at {rows[-1]['indifferent']:6.2f})",
                    flush=True,
                )
    fitted = fit_fft_cost(rows)
    for (kernel, dims), constant in fitted.items():
        mine = [r for r in rows if crossover_group(r) == (kernel, dims)]
        print(
            f"kFftCostPerPoint, {kernel} kernels, {dims}D: {constant:.2f} "
            f"(time lost to wrong choices: {100 * time_lost(mine, constant):.0f} % of a pair's time, summed)"
        )
    return fitted


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--budget", type=float, default=20.0, help="seconds of timed rounds per case and phase")
    parser.add_argument("--only", default="", help="run cases whose name contains this text")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes (a smoke run)")
    parser.add_argument("--no-compile", action="store_true", help="skip torch.compile(reference)")
    parser.add_argument("--json", type=Path, default=Path("docs/bench_ops.json"))
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory worker")
    parser.add_argument(
        "--default-malloc", action="store_true", help="leave glibc's adaptive mmap and trim thresholds as they are"
    )
    parser.add_argument("--memory-worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--crossover", action="store_true", help="fit algo=auto's direct/FFT crossover")
    parser.add_argument(
        "--report",
        type=Path,
        metavar="JSON",
        help="measure nothing: print a saved run's table and its targets judged again",
    )
    args = parser.parse_args(argv)
    if args.report:
        meta, results = load_results(args.report)
        print(
            f"saved run: {meta.get('date')}, torch {meta.get('torch')}, {meta.get('threads')} threads, "
            f"backend {meta.get('backend')}"
        )
        print_run(results, meta["copy_bandwidth_GBps"] * 1e9, meta.get("allocator"))
        return 0

    torch.set_num_threads(args.threads)
    # Not in the memory worker, whose own allocator settings make its RSS follow the tensors.
    timing = not args.memory_worker and not args.default_malloc
    allocator = steady_allocator() if timing else PLATFORM_ALLOCATOR
    if args.crossover:
        print(f"allocator: {allocator}")
        measure_crossover(args)
        return 0
    cases = [c for c in all_cases(args.tiny) if args.only in c.name]
    if args.memory_worker:
        print(json.dumps(memory_worker(cases, args)))
        return 0
    bandwidth = copy_bandwidth(args.repeats)
    results = []
    for case in cases:
        print(f"... {case.name}", file=sys.stderr, flush=True)
        results.append(bench_case(case, args))
        print_rows(results[-1], file=sys.stderr)  # progress: timings so far
    if not args.no_memory:
        worker_argv = [a for a in (argv if argv is not None else sys.argv[1:])]
        peaks = measure_memory(worker_argv)
        for r in results:
            r["peak_mb"] = peaks[r["name"]]
    targets = print_run(results, bandwidth, allocator)
    from train_speed import cpu_summary, git_commit  # this script's folder is on sys.path

    meta = {
        "machine": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "threads": args.threads,
        "torch": torch.__version__,
        "backend": str(terminator.ops.backend()),
        "repeats": args.repeats,
        "copy_bandwidth_GBps": bandwidth / 1e9,
        "allocator": allocator,
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "commit": git_commit(),
        "cpu": cpu_summary(),
    }
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps({"meta": meta, "results": results, "targets": targets}, indent=1))
    print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
