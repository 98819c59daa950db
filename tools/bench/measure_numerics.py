#!/usr/bin/env python3
"""Measures the ops' numerical error and determinism; writes docs/NUMERICS.md's tables.

1. Error of every op / mode / algo and dtype against the float64 reference
   (forward and every gradient), in the terms of tests/helpers.py's tolerance
   ``|ours - ref| <= rtol*scale + atol*max(scale)``: the largest ``err/scale``
   (what rtol must cover), the largest ``err/max(scale)`` (what atol must cover), and
   the fraction of the current bound used (must stay below 1).
2. The FFT path against the direct path (and both against float64) as sizes grow:
   1D lengths 8..4096 and 2D sizes 8..256 per dim, kernels from 3 to full size.
3. Determinism: SHA-256 of every output and gradient of tests/test_determinism.py's
   cases computed in fresh processes with 1..4 threads.

    .venv/bin/python tools/bench/measure_numerics.py --write docs/NUMERICS.md   # everything (~15 min)
    .venv/bin/python tools/bench/measure_numerics.py --quick                    # smaller sizes, prints only

The tables go between ``<!-- measured:NAME -->`` and ``<!-- /measured:NAME -->`` markers
in the document, so the prose around them stays as written.
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT), str(ROOT / "tests")]  # this checkout's terminator and test helpers

from helpers import TOLERANCES, kernel_shape, reference_and_scale, run_with_grads  # noqa: E402

import terminator.ops as ops  # noqa: E402
from terminator.ops import reference  # noqa: E402

DTYPES = {"float64": torch.float64, "float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---- 1. error against the float64 reference ------------------------------------------


def _op_cases(quick: bool):
    """(label, ours, ref, shapes-per-size) for every op/mode/algo."""
    sizes_2d = [(2, 3, (28, 28)), (2, 3, (32, 32))] + ([] if quick else [(1, 2, (64, 64))])
    sizes_1d = [(3, 2, (40,)), (2, 3, (784,))] + ([] if quick else [(1, 2, (4096,))])
    sizes = sizes_2d + sizes_1d

    def glob(mode, form, has_x):
        ours = lambda k, z, x: ops.hyperzzw_global(k, z, x, mode=mode)  # noqa: E731
        ref = lambda k, z, x: reference.hyperzzw_global(k, z, x, mode=mode)  # noqa: E731

        def shapes(b, c, s):
            return [kernel_shape(form, b, c, s), (b, c, *s), (b, c, *s) if has_x else None]

        return ours, ref, shapes

    def conv(algo, size, form):
        ours = lambda x, w: ops.hyperkernel_conv(x, w, algo=algo)  # noqa: E731

        def shapes(b, c, s):
            k = tuple(s) if size == "full" else tuple(min(size, n) for n in s)
            return [(b, c, *s), kernel_shape(form, b, c, k)]

        return ours, reference.conv_same, shapes

    yield "global dot, k (C,*S), x=None", *glob("dot", "C", False), sizes
    yield "global dot, k (B,C,*S), x given", *glob("dot", "BC", True), sizes
    yield "global matmul, k (1,C,H,W), x=None", *glob("matmul", "1C", False), sizes_2d
    yield "global matmul, k (B,C,H,W), x given", *glob("matmul", "BC", True), sizes_2d
    yield "global conv, k (C,*S), x=None", *glob("conv", "C", False), sizes
    yield "global conv, k (B,C,*S), x given", *glob("conv", "BC", True), sizes
    for algo in ("direct", "fft"):
        for size in (3, 7, "full"):
            yield f"conv {algo}, w (C,*K) K={size}", *conv(algo, size, "C"), sizes
            yield f"conv {algo}, w (B,C,*K) K={size}", *conv(algo, size, "BC"), sizes
    yield "conv auto, w (1,C,*K) K=9", *conv("auto", 9, "1C"), sizes


def measure_errors(quick: bool, seeds: int) -> list[dict]:
    rows = []
    for label, ours, ref, shapes_of, sizes in _op_cases(quick):
        for dname, dtype in DTYPES.items():
            worst = collections.defaultdict(float)
            for b, c, s in sizes:
                for seed in range(seeds):
                    gen = torch.Generator().manual_seed(seed)
                    tensors = [
                        torch.randn(sh, generator=gen, dtype=torch.float64).to(dtype) if sh else None
                        for sh in shapes_of(b, c, s)
                    ]
                    grad_y = torch.randn((b, c, *s), generator=gen, dtype=torch.float64).to(dtype)
                    actual = run_with_grads(ours, tensors, grad_y)
                    expected, scale = reference_and_scale(ref, tensors, grad_y)
                    rtol, atol = TOLERANCES[dtype]
                    for i, (a, e, sc) in enumerate(zip(actual, expected, scale)):
                        part = "output" if i == 0 else "grads"
                        err = (a.double() - e).abs()
                        smax = float(sc.max())
                        bound = rtol * sc + atol * smax
                        # err/scale where the scale is a normal number of the dtype (below
                        # it the output underflows and only the atol term can cover it)
                        normal = sc >= torch.finfo(dtype).tiny
                        rel = float((err[normal] / sc[normal]).max()) if normal.any() else 0.0
                        worst[f"{part}_rel"] = max(worst[f"{part}_rel"], rel)
                        worst[f"{part}_abs"] = max(worst[f"{part}_abs"], float(err.max()) / max(smax, 1e-300))
                        worst[f"{part}_use"] = max(worst[f"{part}_use"], float((err / bound).max()))
            rows.append({"op": label, "dtype": dname, **worst})
            print(
                f"  {label:38s} {dname:9s} out: rel {worst['output_rel']:.2e} abs {worst['output_abs']:.2e} "
                f"use {worst['output_use']:.3f} | grads: rel {worst['grads_rel']:.2e} abs {worst['grads_abs']:.2e} "
                f"use {worst['grads_use']:.3f}",
                flush=True,
            )
    return rows


# ---- 2. FFT against direct as sizes grow ------------------------------------------------


def measure_fft_growth(quick: bool) -> list[dict]:
    rows = []
    lengths = [8, 32, 128, 512, 1024] + ([] if quick else [4096])
    sides = [8, 16, 32, 64] + ([] if quick else [128, 256])
    plans = [((n,), k) for n in lengths for k in sorted({3, max(1, n // 4), n})]
    plans += [((n, n), (k, k)) for n in sides for k in sorted({3, max(1, n // 4), n})]
    for dname in ("float32", "float64", "bfloat16"):
        dtype = DTYPES[dname]
        for spatial, kernel in plans:
            kernel = kernel if isinstance(kernel, tuple) else (kernel,)
            gen = torch.Generator().manual_seed(0)
            x = torch.randn(1, 2, *spatial, generator=gen, dtype=torch.float64).to(dtype)
            w = torch.randn(2, *kernel, generator=gen, dtype=torch.float64).to(dtype)
            t0 = time.perf_counter()
            fft = ops.hyperkernel_conv(x, w, algo="fft").double()
            t1 = time.perf_counter()
            direct = ops.hyperkernel_conv(x, w, algo="direct").double()
            t2 = time.perf_counter()
            # F.conv's float64 path unfolds the input (H·W·Kh·Kw elements: 34 GB at 256², full
            # kernel), so large sizes take our direct kernel in float64 as the reference; it
            # agrees with F.conv to ~1e-16 wherever both fit (the error table above).
            big = torch.Size(spatial).numel() * torch.Size(kernel).numel() > 2**24
            ref_fn = (lambda a, b: ops.hyperkernel_conv(a, b, algo="direct")) if big else reference.conv_same
            ref = ref_fn(x.double(), w.double())
            scale = float(ref_fn(x.double().abs(), w.double().abs()).max())
            row = {
                "dtype": dname,
                "size": "x".join(map(str, spatial)),
                "kernel": "x".join(map(str, kernel)),
                "reference": "ours, direct, float64" if big else "F.conv, float64",
                "fft_vs_ref": float((fft - ref).abs().max()) / scale,
                "direct_vs_ref": float((direct - ref).abs().max()) / scale,
                "fft_vs_direct": float((fft - direct).abs().max()) / scale,
                "fft_ms": (t1 - t0) * 1e3,
                "direct_ms": (t2 - t1) * 1e3,
            }
            rows.append(row)
            print(
                f"  {dname:9s} S={row['size']:9s} K={row['kernel']:9s} fft-ref {row['fft_vs_ref']:.2e} "
                f"direct-ref {row['direct_vs_ref']:.2e} fft-direct {row['fft_vs_direct']:.2e}",
                flush=True,
            )
    return rows


# ---- 3. determinism across thread counts -----------------------------------------------


def measure_threads(threads=(1, 2, 3, 4), dtypes=("float32", "float64", "bfloat16")) -> dict:
    script = ROOT / "tests" / "test_determinism.py"
    result = {}
    for dname in dtypes:
        runs = {}
        for n in threads:
            out = subprocess.run(
                [sys.executable, str(script), "--threads", str(n), "--dtype", dname],
                capture_output=True,
                text=True,
                env=dict(os.environ, OMP_NUM_THREADS=str(n)),
            )
            if out.returncode:  # e.g. the compiled backend did not build in the child
                raise RuntimeError(out.stderr[-2000:])
            runs[n] = json.loads(out.stdout.strip().splitlines()[-1])
        for name in runs[threads[0]]:
            parts = len(runs[threads[0]][name])
            differing = {n for n in threads[1:] for i in range(parts) if runs[n][name][i] != runs[threads[0]][name][i]}
            result.setdefault(name, {})[dname] = sorted(differing)
        print(f"  {dname}: done", flush=True)
    return result


# ---- the document ---------------------------------------------------------------------------


def _fmt(v: float) -> str:
    return "0" if v == 0 else f"{v:.1e}"


def error_table(rows: list[dict]) -> str:
    lines = [
        "| op | dtype | output err/scale | output err/max(scale) | output bound used | "
        "grads err/scale | grads err/max(scale) | grads bound used |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['op']} | {r['dtype']} | {_fmt(r['output_rel'])} | {_fmt(r['output_abs'])} | "
            f"{r['output_use']:.3f} | {_fmt(r['grads_rel'])} | {_fmt(r['grads_abs'])} | {r['grads_use']:.3f} |"
        )
    return "\n".join(lines)


def summary_table(rows: list[dict]) -> str:
    lines = [
        "| dtype | rtol, atol (tests/helpers.py) | worst err/max(scale) | worst bound used | by |",
        "|---|---|---|---|---|",
    ]
    for dname, dtype in DTYPES.items():
        mine = [r for r in rows if r["dtype"] == dname]
        worst_abs = max(max(r["output_abs"], r["grads_abs"]) for r in mine)
        worst = max(mine, key=lambda r: max(r["output_use"], r["grads_use"]))
        use = max(worst["output_use"], worst["grads_use"])
        rtol, atol = TOLERANCES[dtype]
        lines.append(f"| {dname} | {rtol:g}, {atol:g} | {_fmt(worst_abs)} | {use:.3f} | {worst['op']} |")
    return "\n".join(lines)


def fft_table(rows: list[dict]) -> str:
    lines = [
        "| dtype | size | kernel | FFT − float64 | direct − float64 | FFT − direct | float64 reference |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['dtype']} | {r['size']} | {r['kernel']} | {_fmt(r['fft_vs_ref'])} | "
            f"{_fmt(r['direct_vs_ref'])} | {_fmt(r['fft_vs_direct'])} | {r.get('reference', '')} |"
        )
    return "\n".join(lines)


def thread_table(result: dict, threads=(1, 2, 3, 4)) -> str:
    dtypes = list(next(iter(result.values())))
    lines = ["| case (tests/test_determinism.py) | " + " | ".join(dtypes) + " |", "|---|" + "---|" * len(dtypes)]
    for name, by_dtype in result.items():
        cells = []
        for d in dtypes:
            diff = by_dtype[d]
            cells.append("identical" if not diff else "differs with " + ", ".join(f"{n} threads" for n in diff))
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def replace_section(text: str, name: str, body: str) -> str:
    pattern = re.compile(rf"(<!-- measured:{name} -->\n).*?(\n<!-- /measured:{name} -->)", re.S)
    if not pattern.search(text):
        return text + f"\n<!-- measured:{name} -->\n{body}\n<!-- /measured:{name} -->\n"
    return pattern.sub(lambda m: m.group(1) + body + m.group(2), text)


def _environment(quick: bool) -> str:
    from terminator.ops import _build

    src = _build.source_dir()
    commit = (
        subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip()
        or "?"
    )
    dirty = subprocess.run(
        ["git", "status", "--porcelain", "--", "csrc"], cwd=ROOT, capture_output=True, text=True
    ).stdout.strip()
    return (
        f"Measured {datetime.date.today().isoformat()} on {platform.machine()} ({os.cpu_count()} cores), "
        f"torch {torch.__version__}, backend {ops.backend().name}, {torch.get_num_threads()} threads; "
        f"sources: commit {commit}{' + local changes' if dirty else ''}, csrc hash "
        f"{_build.source_hash(src, _build.cpp_sources(src))}; by `tools/bench/measure_numerics.py"
        f"{' --quick' if quick else ''}`."
    )


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--write", type=Path, help="update the measured sections of this Markdown file")
    parser.add_argument("--quick", action="store_true", help="smaller sizes, one seed")
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--only", choices=["errors", "fft", "threads"], action="append")
    parser.add_argument("--json", type=Path, help="also save the raw measurements")
    parser.add_argument("--from-json", type=Path, help="write the document from saved measurements (--json)")
    args = parser.parse_args()
    if args.from_json:
        raw = json.loads(args.from_json.read_text())
    else:
        if ops.backend().name == "reference":
            print(f"measure_numerics: the compiled backend is not active ({ops.backend().reason})", file=sys.stderr)
            return 1
        parts = args.only or ["errors", "fft", "threads"]
        raw = {"environment": _environment(args.quick)}
        if "errors" in parts:
            print("errors against the float64 reference:")
            raw["errors"] = measure_errors(args.quick, 1 if args.quick else args.seeds)
        if "fft" in parts:
            print("FFT against direct:")
            raw["fft"] = measure_fft_growth(args.quick)
        if "threads" in parts:
            print("thread counts:")
            raw["threads"] = measure_threads()
        if args.json:
            args.json.write_text(json.dumps(raw, indent=1))
    env = raw.get("environment", "")
    sections = {}
    if "errors" in raw:
        sections["summary"] = env + "\n\n" + summary_table(raw["errors"])
        sections["errors"] = error_table(raw["errors"])
    if "fft" in raw:
        sections["fft"] = env + "\n\n" + fft_table(raw["fft"])
    if "threads" in raw:
        sections["threads"] = env + "\n\n" + thread_table(raw["threads"])
    if args.write:
        text = args.write.read_text() if args.write.exists() else "# Numerics\n"
        for name, body in sections.items():
            text = replace_section(text, name, body)
        args.write.write_text(text)
        print(f"updated {args.write}: {', '.join(sections)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
