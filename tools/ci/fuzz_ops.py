#!/usr/bin/env python3
"""Fuzzes the public ops with hypothesis, running every call in a worker subprocess.

Each case is a JSON description (op, entry point, mode/algo, and for each argument its
kind, shape, dtype, device, memory layout and values). A worker process builds the
tensors, calls the op, and checks that the call either

* equals the float64 reference (``terminator.ops.reference``) within the test
  tolerances (tests/helpers.py), forward and every gradient, with NaN/Inf where the
  reference has them (exactly, for dot and matmul; for the direct convolution between
  the two readings of "zero outside the input" with a NaN/Inf kernel; at least where
  the reference has them for the FFT path, which spreads a NaN/Inf over its plane: see
  ``_compare`` and docs/NUMERICS.md), returns a contiguous result of the right shape,
  dtype and device, and leaves its inputs unchanged; or
* raises a clean ``ValueError`` / ``TypeError`` / ``RuntimeError`` for an input that is
  invalid by docs/OPS.md (an oracle written here from that definition, not from ``_checks.py``).

A worker that dies (segfault, abort, sanitizer report) or hangs is named with its case
and replaced. Zero-size C or spatial dims may either give an empty result or a clean
error; B = 0 must give an empty result. A clean error whose message names no argument
is counted as "unclear" and listed, not failed.

    .venv/bin/python tools/ci/fuzz_ops.py --cases 5000          # the dedicated run
    .venv/bin/python tools/ci/fuzz_ops.py --cases 200 --seed 7  # reproducible
    .venv/bin/python tools/ci/fuzz_ops.py --shrink              # stop at the first failure, minimize it
    .venv/bin/python tools/ci/fuzz_ops.py --replay case.json    # one case (the JSON printed), in-process

tests/test_fuzz.py runs a few hundred cases of the same generator in CI.
"""

from __future__ import annotations

import argparse
import collections
import json
import math
import os
import selectors
import signal
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # this checkout's terminator (and its csrc), also in the workers

FLOATS = ("float32", "float64", "float16", "bfloat16")
OTHER_DTYPES = ("int8", "uint8", "int32", "int64", "bool", "complex64", "complex128", "float8_e4m3fn", "float8_e5m2")
MODES = ("dot", "matmul", "conv")
ALGOS = ("auto", "direct", "fft")
ODD_STRINGS = ("", "Dot", "conv ", "fft", "winograd", "DIRECT", "matmul\x00")
# What may be broken in a case (each usually makes it invalid; "zero_size" allows C = 0
# or a zero spatial size, which may give an empty result or a clean error).
MUTATIONS = (
    "rank",
    "mode",
    "zero_size",
    "matmul_shape",
    "dtype",
    "mixed_dtype",
    "device",
    "kernel",
    "not_a_tensor",
    "x_shape",
)
ARG_NAMES = ("k", "z", "x", "w", "mode", "algo", "grad_y")
CLEAN_ERRORS = (ValueError, TypeError, RuntimeError)

# ---- case generation (hypothesis) ------------------------------------------------------


def cases():
    """The hypothesis strategy of fuzz cases (JSON-serializable dicts)."""
    from hypothesis import strategies as st

    @st.composite
    def tensor_spec(draw, shape, dtype, device):
        rank = len(shape)
        layouts = ["contiguous", "contiguous", "sliced", "offset", "expanded", "overlapping"]
        if rank >= 2:
            layouts += ["transposed", "permuted"]
        if rank == 4:
            layouts += ["channels_last", "channels_last"]
        values = draw(st.sampled_from(["normal"] * 6 + ["specials", "specials", "wide", "zeros", "tiny"]))
        return {
            "kind": "tensor",
            "shape": list(shape),
            "dtype": dtype,
            "device": device,
            "layout": draw(st.sampled_from(layouts)),
            "values": values,
            "expand_dim": draw(st.integers(0, max(rank - 1, 0))),
            "perm_seed": draw(st.integers(0, 1000)),
        }

    @st.composite
    def not_a_tensor(draw):
        return {"kind": draw(st.sampled_from(["list", "scalar", "none"]))}

    @st.composite
    def case(draw):
        # A valid case first; then, four times in ten, one to three mutations that each
        # (usually) make it invalid.
        op = draw(st.sampled_from(["global", "conv"]))
        entry = draw(st.sampled_from(["python", "python", "op"]))
        mutations = set()
        if draw(st.integers(0, 19)) < 7:
            mutations = set(draw(st.lists(st.sampled_from(MUTATIONS), min_size=1, max_size=3)))
        d = draw(st.sampled_from([1, 2]))
        rank = draw(st.integers(0, 6)) if "rank" in mutations else d + 2
        mode = draw(st.sampled_from(MODES)) if op == "global" else None
        algo = draw(st.sampled_from(ALGOS)) if op == "conv" else None
        if "mode" in mutations:
            odd = draw(st.sampled_from(list(ODD_STRINGS) + [None, 3, 1.5]))
            mode, algo = (odd, None) if op == "global" else (None, odd)
        batch = draw(st.sampled_from([0, 1, 1, 2, 2, 2, 3, 3, 3, 3, 3]))
        channels = draw(st.integers(0, 3) if "zero_size" in mutations else st.integers(1, 3))
        top = 40 if d == 1 else 9
        spatial = [draw(st.integers(0 if "zero_size" in mutations else 1, top)) for _ in range(d)]
        if mode == "matmul" and d == 2 and "matmul_shape" not in mutations:
            spatial[1] = spatial[0]
        if mode == "matmul" and "matmul_shape" in mutations:
            d = draw(st.sampled_from([1, 2]))
            spatial = [draw(st.integers(1, top)) for _ in range(d)]
            rank = d + 2
        act_shape = (
            ([batch, channels] + spatial)[:rank] if rank >= 2 else [draw(st.integers(0, 3)) for _ in range(rank)]
        )
        act_shape += [draw(st.integers(0, 3)) for _ in range(rank - len(act_shape))]

        dtype = draw(st.sampled_from(FLOATS))
        if "dtype" in mutations:
            dtype = draw(st.sampled_from(OTHER_DTYPES))
        mixed = "mixed_dtype" in mutations
        dtype_of = lambda: draw(st.sampled_from(FLOATS + OTHER_DTYPES)) if mixed else dtype  # noqa: E731
        device = "meta" if draw(st.integers(0, 19)) == 0 else "cpu"
        one_meta = draw(st.integers(0, 2)) if "device" in mutations else -1
        device_of = lambda i: "meta" if device == "meta" or i == one_meta else "cpu"  # noqa: E731

        kernel_spatial = list(act_shape[2:])
        if op == "conv":
            kernel_spatial = [draw(st.integers(1, s)) if s >= 1 else 1 for s in kernel_spatial]
        form = draw(st.sampled_from(["C", "1C", "BC"]))
        if "kernel" in mutations:
            form = draw(st.sampled_from(["wrongB", "wrongC", "wrongS", "wrongRank"]))
        if form == "wrongS" and kernel_spatial:
            i = draw(st.integers(0, len(kernel_spatial) - 1))
            kernel_spatial[i] = draw(st.sampled_from([0, kernel_spatial[i] + 1, act_shape[2 + i] + 1]))
        C = act_shape[1] if rank >= 2 else channels
        B = act_shape[0] if rank >= 1 else batch
        shapes = {
            "C": [C] + kernel_spatial,
            "wrongS": [C] + kernel_spatial,
            "1C": [1, C] + kernel_spatial,
            "BC": [B, C] + kernel_spatial,
            "wrongB": [B + 2, C] + kernel_spatial,
            "wrongC": [C + 1] + kernel_spatial,
        }
        kshape = shapes.get(form) or [C] * draw(st.integers(0, 6))
        not_tensor = draw(st.integers(0, 2)) if "not_a_tensor" in mutations else -1

        def arg(i, shape):
            if i == not_tensor:
                return draw(not_a_tensor())
            return draw(tensor_spec(shape, dtype_of(), device_of(i)))

        if op == "global":
            x_kind = draw(st.sampled_from(["none", "same"]))
            x_shape = list(act_shape)
            if "x_shape" in mutations:
                x_kind = "wrong"
                x_shape = x_shape[:-1] + [(x_shape[-1] if x_shape else 0) + 1]
            tensors = {"k": arg(0, kshape), "z": arg(1, act_shape), "x": None if x_kind == "none" else arg(2, x_shape)}
        else:
            tensors = {"x": arg(0, act_shape), "w": arg(1, kshape)}
        return {
            "op": op,
            "entry": entry,
            "mode": mode,
            "algo": algo,
            "tensors": tensors,
            "grad": draw(st.booleans()),
            "seed": draw(st.integers(0, 2**31 - 1)),
            "mutations": sorted(mutations),
        }

    return case()


def describe(case: dict) -> str:
    """One line naming a case: what a person needs to reproduce it."""

    def arg(spec):
        if spec is None:
            return "None"
        if spec["kind"] != "tensor":
            return spec["kind"]
        return f"{spec['dtype']}{tuple(spec['shape'])}@{spec['device']}[{spec['layout']},{spec['values']}]"

    parts = [f"{name}={arg(spec)}" for name, spec in case["tensors"].items()]
    how = f"mode={case['mode']!r}" if case["op"] == "global" else f"algo={case['algo']!r}"
    fn = "hyperzzw_global" if case["op"] == "global" else "hyperkernel_conv"
    entry = "terminator.ops" if case["entry"] == "python" else "torch.ops.terminator"
    return f"{entry}.{fn}({', '.join(parts)}, {how}){' + backward' if case['grad'] else ''} seed={case['seed']}"


# ---- the oracle: is a case valid by docs/OPS.md? ----------------------------------------


def _is_tensor(spec) -> bool:
    return spec is not None and spec["kind"] == "tensor"


def validity(case: dict) -> str:
    """ "valid", "invalid", or "empty_ok" (zero-size C or spatial dim: empty result or clean error)."""
    t = case["tensors"]
    if case["op"] == "global":
        if not (isinstance(case["mode"], str) and case["mode"] in MODES):
            return "invalid"
        act, kern, extra = t["z"], t["k"], t["x"]
        if extra is not None and extra["kind"] == "none":
            extra = None  # x=None is x = z
    else:
        if not (isinstance(case["algo"], str) and case["algo"] in ALGOS):
            return "invalid"
        act, kern, extra = t["x"], t["w"], None
    if not (_is_tensor(act) and _is_tensor(kern)):
        return "invalid"
    if extra is not None and not _is_tensor(extra):
        return "invalid"
    shape = act["shape"]
    if len(shape) not in (3, 4) or act["dtype"] not in FLOATS:
        return "invalid"
    for other in (kern, extra):
        if other is not None and (other["dtype"] != act["dtype"] or other["device"] != act["device"]):
            return "invalid"
    if extra is not None and extra["shape"] != shape:
        return "invalid"
    if case["op"] == "global" and case["mode"] == "matmul" and not (len(shape) == 4 and shape[2] == shape[3]):
        return "invalid"
    ks = kern["shape"]
    if len(ks) == len(shape):
        if ks[0] not in (1, shape[0]):
            return "invalid"
        ks = ks[1:]
    elif len(ks) != len(shape) - 1:
        return "invalid"
    if ks[0] != shape[1]:
        return "invalid"
    spatial, kspatial = shape[2:], ks[1:]
    if case["op"] == "global":
        if kspatial != spatial:
            return "invalid"
    elif not all(1 <= k <= s for k, s in zip(kspatial, spatial)):
        return "invalid"
    if shape[1] == 0 or 0 in spatial:
        return "empty_ok"
    return "valid"


# ---- the worker side: build tensors, call, compare ----------------------------------------


def _torch_dtype(name):
    import torch

    return getattr(torch, name)


def _values(shape, spec, gen):
    """float64 values of ``shape`` for a spec's value kind."""
    import torch

    kind = spec["values"]
    if kind == "zeros":
        return torch.zeros(shape, dtype=torch.float64)
    v = torch.randn(shape, generator=gen, dtype=torch.float64)
    if kind == "wide":
        v = v * torch.pow(10.0, torch.empty(shape, dtype=torch.float64).uniform_(-2.0, 2.0, generator=gen))
    elif kind == "tiny":
        v = v * 1e-30
    elif kind == "specials" and v.numel():
        n = int(torch.randint(1, max(2, v.numel() // 8 + 1), (1,), generator=gen))
        where = torch.randint(0, v.numel(), (n,), generator=gen)
        which = torch.randint(0, 3, (n,), generator=gen)
        specials = torch.tensor([math.nan, math.inf, -math.inf], dtype=torch.float64)[which]
        v.view(-1)[where] = specials
    return v


def _cast(v, dtype_name, gen):
    import torch

    dtype = _torch_dtype(dtype_name)
    if dtype.is_complex:
        return torch.complex(v, torch.randn(v.shape, generator=gen, dtype=torch.float64)).to(dtype)
    if dtype == torch.bool:
        return v > 0
    if not dtype.is_floating_point:
        info = torch.iinfo(dtype)
        return torch.nan_to_num(v * 3).round().clamp(max(info.min, -100), min(info.max, 100)).to(dtype)
    if dtype_name.startswith("float8"):
        finfo = torch.finfo(dtype)
        v = torch.where(v.isfinite(), v.clamp(finfo.min, finfo.max), v)
    return v.to(dtype)


def _garbage(n, dtype):
    import torch

    if dtype.is_floating_point or dtype.is_complex:
        return torch.full((n,), math.nan, dtype=torch.float64).to(dtype)
    return torch.full((n,), 7, dtype=torch.int64).to(dtype)


def build_tensor(spec, gen):
    """(base, make): ``make(base)`` is the argument a spec describes, built from ``base`` by
    differentiable ops (so gradients can flow through the same strides); base is None
    for a non-tensor argument, and make then returns the argument itself."""
    import torch

    if spec is None or spec["kind"] == "none":
        return None, lambda _: None
    if spec["kind"] == "list":
        return None, lambda _: [1.0, 2.0]
    if spec["kind"] == "scalar":
        return None, lambda _: 1.5
    shape, layout = list(spec["shape"]), spec["layout"]
    rank = len(shape)
    make = lambda t: t  # noqa: E731
    if layout == "expanded" and rank:
        small = list(shape)
        small[spec["expand_dim"]] = 1
        base = _cast(_values(small, spec, gen), spec["dtype"], gen)
        make = lambda t: t.expand(shape)  # noqa: E731
    elif layout == "overlapping" and rank >= 2 and all(shape):
        # Rows that overlap in memory: dim -2 advances by one element, not by a row.
        strides = [1] * rank
        for i in range(rank - 3, -1, -1):
            strides[i] = strides[i + 1] * shape[i + 1] + shape[-1]
        need = 1 + sum((n - 1) * st for n, st in zip(shape, strides))
        base = _cast(_values([need], spec, gen), spec["dtype"], gen)
        make = lambda t: t.as_strided(shape, strides)  # noqa: E731
    else:
        base = _cast(_values(shape, spec, gen), spec["dtype"], gen)
        if layout == "sliced" and rank:
            make = lambda t: torch.stack([t, _garbage(t.numel(), t.dtype).view(t.shape)], dim=-1)[..., 0]  # noqa: E731
        elif layout == "offset":
            make = (
                lambda t: torch.cat([_garbage(3, t.dtype), t.reshape(-1), _garbage(2, t.dtype)])[  # noqa: E731
                    3 : 3 + t.numel()
                ].view(shape)
            )
        elif layout == "transposed" and rank >= 2:
            make = lambda t: t.transpose(-1, -2).contiguous().transpose(-1, -2)  # noqa: E731
        elif layout == "permuted" and rank >= 2:
            perm = torch.randperm(rank, generator=torch.Generator().manual_seed(spec["perm_seed"])).tolist()
            inverse = [perm.index(i) for i in range(rank)]
            make = lambda t: t.permute(perm).contiguous().permute(inverse)  # noqa: E731
        elif layout == "channels_last" and rank == 4:
            make = lambda t: t.contiguous(memory_format=torch.channels_last)  # noqa: E731
    if spec["device"] == "meta":
        real = make
        make = lambda t: (lambda v: torch.empty_strided(v.shape, v.stride(), dtype=v.dtype, device="meta"))(real(t))  # noqa: E731
    return base, make


def _tolerance(dtype):
    sys.path.insert(0, str(ROOT / "tests"))
    from helpers import TOLERANCES

    return TOLERANCES[dtype]


class Finding(Exception):
    """The op misbehaved on this case."""

    def __init__(self, kind: str, detail: str):
        super().__init__(f"{kind}: {detail}")
        self.kind = kind


def _bits_equal(a, b) -> bool:
    """Bitwise equality (NaN == NaN) of two CPU tensors of one dtype."""
    import torch

    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    if a.is_complex():
        return _bits_equal(torch.view_as_real(a), torch.view_as_real(b))
    if a.dtype == torch.bool or not a.is_floating_point():
        return torch.equal(a, b)
    ints = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
    return torch.equal(a.contiguous().view(ints), b.contiguous().view(ints))


def _compare(name, got, refs, clean_scale, dtype, policy):
    """got (dtype) against float64 references; clean_scale bounds each output's terms.

    ``refs``: one reference, or for a convolution with non-finite inputs two: (the
    term-by-term evaluation that skips the padding, F.conv's zero-padded evaluation).
    ``policy`` for non-finite values:
      "strict"  NaN / +Inf / -Inf exactly where the reference has them (dot, matmul);
      "bracket" non-finite wherever both references are, finite wherever both are
                (direct convolution: which of the two the kernel follows, and NaN vs
                Inf where 0·Inf meets, is left open);
      "contain" non-finite at least wherever both references are (FFT: a NaN or Inf
                spreads over the whole plane).
    Finite outputs must be within the test tolerance of the reference.
    """
    import torch

    refs = refs if isinstance(refs, tuple) else (refs,)
    ref64 = refs[-1]
    if got.shape != ref64.shape:
        raise Finding("wrong result", f"{name}: shape {tuple(got.shape)}, expected {tuple(ref64.shape)}")
    if got.dtype != dtype:
        raise Finding("wrong result", f"{name}: dtype {got.dtype}, expected {dtype}")
    if got.numel() == 0:
        return
    g = got.double()
    finfo = torch.finfo(dtype)
    got_finite = g.isfinite()
    # Where the exact value is not representable in dtype, anything goes (overflow).
    overflow = torch.zeros_like(got_finite)
    for r in refs:
        overflow |= r.isfinite() & (r.abs() > finfo.max)
    must = ~overflow
    may = torch.zeros_like(got_finite)
    for r in refs:
        must &= ~r.isfinite()
        may |= ~r.isfinite()
    may |= overflow

    def fail(kind, bad, what):
        idx = tuple(bad.nonzero()[0].tolist())
        raise Finding(
            kind,
            f"{name}: {int(bad.sum())} elements {what}, e.g. at {idx}: got {g[idx].item()}, "
            f"reference {' / '.join(str(r[idx].item()) for r in refs)}",
        )

    if policy == "strict":
        for label, r, o in (
            ("NaN", ref64.isnan(), g.isnan()),
            ("+Inf", ref64 == math.inf, g == math.inf),
            ("-Inf", ref64 == -math.inf, g == -math.inf),
        ):
            bad = (r != o) & ~overflow
            if bad.any():
                fail("wrong non-finite", bad, f"differ in {label}")
    bad = must & got_finite
    if bad.any():
        fail("lost non-finite", bad, "finite where the reference is not")
    if policy == "bracket":
        bad = ~got_finite & ~may
        if bad.any():
            fail("spurious non-finite", bad, "non-finite where the reference is finite")
    check = got_finite & ~may
    rtol, atol = _tolerance(dtype)
    bound = rtol * clean_scale + atol * clean_scale.max() + finfo.tiny
    err = (g - ref64).abs()
    bad = check & ~(err <= bound)
    if bad.any():
        idx = tuple(bad.nonzero()[0].tolist())
        raise Finding(
            "wrong value",
            f"{name}: {int(bad.sum())} of {g.numel()} elements off; at {idx} got "
            f"{g[idx].item():.6g}, reference {ref64[idx].item():.6g}, bound {bound[idx].item():.3g}",
        )


def conv_same_skipping_padding(x, w):
    """conv_same evaluated term by term over in-bounds taps only (float64).

    Equal to the reference on finite inputs. With NaN/Inf in the kernel it differs: the
    reference (F.conv) multiplies every tap, so a non-finite tap over the zero padding
    gives NaN (0·Inf, 0·NaN) where this gives a finite value. Together the two bound
    the non-finite outputs a convolution may have (docs/NUMERICS.md, "Non-finite values").
    """
    import torch
    import torch.nn.functional as F

    d = x.dim() - 2
    if w.dim() == x.dim() - 1:
        w = w.unsqueeze(0)
    sizes = w.shape[2:]
    pads = []
    for k in reversed(sizes):
        before = (k - 1) // 2
        pads += [before, k - 1 - before]
    xp = F.pad(x, pads)
    inside = F.pad(torch.ones_like(x, dtype=torch.bool), pads)
    for i, k in enumerate(sizes):
        xp = xp.unfold(2 + i, k, 1)
        inside = inside.unfold(2 + i, k, 1)
    wv = w.reshape(w.shape[0], w.shape[1], *([1] * d), *sizes)
    terms = torch.where(inside, wv * xp, torch.zeros((), dtype=x.dtype))
    return terms.sum(dim=tuple(range(-d, 0)))


def _names_an_argument(message: str) -> bool:
    import re

    return any(re.search(rf"(^|[^A-Za-z_]){re.escape(n)}([^A-Za-z_]|$)", message) for n in ARG_NAMES)


def run_case(case: dict) -> dict:
    """Runs one case in this process; returns {"outcome": ..., "detail": ...}.

    outcomes: "match" (equals the reference), "meta" (shape-only check on meta tensors),
    "empty" (empty result), "rejected" (clean error for invalid input), "unclear" (clean
    error whose message names no argument); raises Finding when the op misbehaves.
    """
    import torch

    import terminator.ops as ops
    from terminator.ops import reference

    if case["entry"] == "op" and ops.backend().name == "reference":
        return {"outcome": "skipped", "detail": "torch.ops.terminator is not registered on the reference backend"}
    gen = torch.Generator().manual_seed(case["seed"])
    specs = case["tensors"]
    names = list(specs)
    built = {n: build_tensor(s, gen) for n, s in specs.items()}
    verdict = validity(case)
    args = {n: make(base) for n, (base, make) in built.items()}
    tensors = {n: a for n, a in args.items() if isinstance(a, torch.Tensor)}
    want_grad = case["grad"] and verdict != "invalid" and all(a.device.type == "cpu" for a in tensors.values())
    if want_grad:  # the same arguments, built from leaves that require grad
        args = {
            n: make(base.clone().requires_grad_()) if isinstance(args[n], torch.Tensor) else args[n]
            for n, (base, make) in built.items()
        }
        tensors = {n: a for n, a in args.items() if isinstance(a, torch.Tensor)}
    before = {n: a.detach().clone() for n, a in tensors.items() if a.device.type == "cpu"}

    if case["op"] == "global":
        if case["entry"] == "python":
            call = lambda: ops.hyperzzw_global(args["k"], args["z"], args["x"], mode=case["mode"])  # noqa: E731
        else:
            call = lambda: torch.ops.terminator.hyperzzw_global(args["k"], args["z"], args["x"], case["mode"])  # noqa: E731
    else:
        if case["entry"] == "python":
            call = lambda: ops.hyperkernel_conv(args["x"], args["w"], algo=case["algo"])  # noqa: E731
        else:
            call = lambda: torch.ops.terminator.hyperkernel_conv(args["x"], args["w"], case["algo"])  # noqa: E731

    try:
        y = call()
    except CLEAN_ERRORS as exc:
        message = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        if verdict == "valid":
            raise Finding("rejected a valid input", f"{type(exc).__name__}: {message}") from None
        if not _names_an_argument(str(exc)):
            return {"outcome": "unclear", "detail": f"{type(exc).__name__}: {message[:200]}"}
        return {"outcome": "rejected", "detail": f"{type(exc).__name__}: {message[:120]}"}
    except Exception as exc:  # noqa: BLE001 - anything else is a finding
        raise Finding("unclean exception", f"{type(exc).__name__}: {exc}") from None
    if verdict == "invalid":
        raise Finding(
            "accepted an invalid input",
            f"returned {type(y).__name__} {tuple(y.shape) if isinstance(y, torch.Tensor) else ''}",
        )
    for n, a in before.items():
        if not _bits_equal(a, tensors[n].detach()):
            raise Finding("modified an input", n)

    act = args["z"] if case["op"] == "global" else args["x"]
    if not isinstance(y, torch.Tensor) or y.shape != act.shape or y.dtype != act.dtype or y.device != act.device:
        raise Finding(
            "wrong result",
            f"got {type(y).__name__} {getattr(y, 'shape', '')} {getattr(y, 'dtype', '')} "
            f"on {getattr(y, 'device', '')}, expected {tuple(act.shape)} {act.dtype} on {act.device}",
        )
    if act.device.type == "meta":
        return {"outcome": "meta", "detail": ""}
    if not y.is_contiguous():
        raise Finding("wrong result", f"not contiguous: strides {y.stride()}")

    present = [n for n in names if isinstance(args.get(n), torch.Tensor)]
    grad_y = None
    grads = None
    if want_grad:
        grad_y = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(y.dtype)
        try:
            grads = torch.autograd.grad(y, [args[n] for n in present], grad_y, allow_unused=True)
        except Exception as exc:  # noqa: BLE001
            raise Finding("backward failed", f"{type(exc).__name__}: {exc}") from None
        for n, g in zip(present, grads):
            if g is None or g.shape != args[n].shape or g.dtype != args[n].dtype:
                raise Finding("wrong gradient", f"grad of {n}: {None if g is None else (tuple(g.shape), g.dtype)}")
    if y.numel() == 0:
        if grads is not None:
            for n, g in zip(present, grads):
                if g.numel() and not bool((g == 0).all()):
                    raise Finding("wrong gradient", f"grad of {n} is not zero for an empty output")
        return {"outcome": "empty", "detail": ""}

    # The float64 reference on the same (already rounded) values, contiguous.
    as64 = {n: args[n].detach().double().contiguous() if isinstance(args.get(n), torch.Tensor) else None for n in names}
    clean = {
        n: (torch.nan_to_num(t, nan=0.0, posinf=0.0, neginf=0.0).abs() if t is not None else None)
        for n, t in as64.items()
    }
    finite = all(bool(t.isfinite().all()) for t in as64.values() if t is not None)
    # With NaN/Inf in a convolution, two references bracket what is acceptable (_compare).
    convs = [reference.conv_same] if finite else [conv_same_skipping_padding, reference.conv_same]
    if case["op"] == "global":

        def make_fn(conv):
            def fn(k, z, x):
                if case["mode"] == "conv":
                    return conv(z if x is None else x, k * z)
                return reference.hyperzzw_global(k, z, x, mode=case["mode"])

            return fn

        order = ["k", "z", "x"]
        conv_op = case["mode"] == "conv"
        policy = "contain" if conv_op else "strict"  # mode="conv" runs "auto": maybe the FFT
    else:
        make_fn = lambda conv: conv  # noqa: E731
        order = ["x", "w"]
        conv_op = True
        policy = "bracket" if case["algo"] == "direct" else "contain"
    fns = [make_fn(c) for c in (convs if conv_op else convs[-1:])]
    ref_in = [as64[n] for n in order]
    clean_in = [clean[n] for n in order]
    dtype = y.dtype
    present64 = [n for n in order if as64[n] is not None]

    def evaluate(fn, inputs, gy):
        """fn's output and, when gy is given, the gradients of <gy, fn> by input name."""
        if gy is None:
            with torch.no_grad():
                return fn(*inputs), {}
        leaves = [t.clone().requires_grad_() if t is not None else None for t in inputs]
        out = fn(*leaves)
        grads = torch.autograd.grad(out, [t for t in leaves if t is not None], gy)
        return out.detach(), dict(zip(present64, grads))

    gy64 = grad_y.double() if grads is not None else None
    results = [evaluate(fn, ref_in, gy64) for fn in fns]
    scale_y, scale_grads = evaluate(fns[-1], clean_in, gy64.abs() if gy64 is not None else None)
    _compare("output", y.detach(), tuple(r[0] for r in results), scale_y, dtype, policy)
    if grads is None:
        return {"outcome": "match", "detail": ""}
    for n, g in zip(present, grads):
        _compare(f"grad of {n}", g, tuple(r[1][n] for r in results), scale_grads[n], dtype, policy)
    return {"outcome": "match", "detail": "with gradients"}


# ---- the worker process and the parent's pool --------------------------------------------


def worker_main() -> int:
    """Reads one JSON case per line on stdin, answers one JSON line per case."""
    out = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)  # anything else printed goes to stderr, not into the protocol
    import warnings

    warnings.simplefilter("ignore")
    import terminator.ops as ops

    out.write(json.dumps({"ready": True, "backend": ops.backend().name, "library": ops.backend().library}) + "\n")
    for line in sys.stdin:
        case = json.loads(line)
        try:
            if case.get("selftest") == "abort":  # tests/test_fuzz.py: is a crash caught and named?
                os.abort()  # (SIGABRT, not SIGSEGV: under ASan a SEGV would be a sanitizer report)
            if case.get("selftest") == "hang":
                time.sleep(3600)
            result = run_case(case)
            result["ok"] = True
        except Finding as exc:
            result = {"ok": False, "outcome": exc.kind, "detail": str(exc)}
        except Exception as exc:  # noqa: BLE001 - a bug in the fuzzer itself
            result = {
                "ok": False,
                "outcome": "fuzzer error",
                "detail": f"{type(exc).__name__}: {exc}\n{traceback.format_exc()[-1500:]}",
            }
        out.write(json.dumps(result) + "\n")
    return 0


class Worker:
    """A worker subprocess; ``run`` sends a case and waits for its answer or the worker's end."""

    def __init__(self, timeout: float = 120.0, env: dict | None = None):
        self.timeout = timeout
        self.env = dict(os.environ if env is None else env)
        self.env.setdefault("PYTHONFAULTHANDLER", "1")
        self.proc = None
        self.backend = None
        self.restarts = 0

    def _start(self) -> None:
        self.stderr = tempfile.TemporaryFile(mode="w+b")
        self.proc = subprocess.Popen(
            [sys.executable, str(Path(__file__).resolve()), "--worker"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self.stderr,
            env=self.env,
            cwd=str(ROOT),
            text=True,
            bufsize=1,
        )
        hello = self._read(max(self.timeout, 300.0))
        if hello is None or not hello.get("ready"):
            raise RuntimeError(f"fuzz worker did not start: {self._stderr_tail()}")
        self.backend = hello["backend"]
        self.library = hello.get("library")

    def _read(self, timeout: float):
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        try:
            if not sel.select(timeout):
                return "timeout"
            line = self.proc.stdout.readline()
        finally:
            sel.close()
        return json.loads(line) if line else None

    def _stderr_tail(self, n: int = 2500) -> str:
        self.stderr.flush()
        self.stderr.seek(0)
        return self.stderr.read().decode(errors="replace")[-n:]

    def _stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.kill()
            self.proc.wait()
            self.proc = None

    def run(self, case: dict) -> dict:
        if self.proc is None:
            self._start()
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        answer = self._read(self.timeout)
        if answer == "timeout":
            self._stop()
            self.restarts += 1
            return {"ok": False, "outcome": "hang", "detail": f"no answer in {self.timeout:.0f} s"}
        if answer is None:
            code = self.proc.wait()
            tail = self._stderr_tail()
            self.proc = None
            self.restarts += 1
            how = f"signal {signal.Signals(-code).name}" if code < 0 else f"exit status {code}"
            return {"ok": False, "outcome": "crash", "detail": f"worker died with {how}\n{tail}"}
        return answer

    def close(self) -> None:
        if self.proc is not None:
            try:
                self.proc.stdin.close()
                self.proc.wait(timeout=30)
            except Exception:  # noqa: BLE001
                self._stop()
            self.proc = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ---- the dedicated run ---------------------------------------------------------------------


def fuzz(n_cases: int, seed: int | None, timeout: float, shrink: bool, report_every: int) -> int:
    from hypothesis import HealthCheck, Phase, given, settings
    from hypothesis import seed as hyp_seed

    counts = collections.Counter()
    failures = []
    examples = []
    start = time.monotonic()
    with Worker(timeout=timeout) as worker:
        phases = [Phase.generate] + ([Phase.shrink] if shrink else [])

        @settings(
            max_examples=n_cases, database=None, deadline=None, phases=phases, suppress_health_check=list(HealthCheck)
        )
        @given(case=cases())
        def one(case):
            result = worker.run(case)
            counts[result["outcome"]] += 1
            if result["outcome"] == "unclear" and len(examples) < 200:
                examples.append((case, result))
            n = sum(counts.values())
            if report_every and n % report_every == 0:
                print(f"  {n} cases, {time.monotonic() - start:.0f} s: {dict(counts)}", flush=True)
            if not result["ok"]:
                failures.append((case, result))
                if shrink:
                    raise AssertionError(f"{result['outcome']}: {result['detail']}")

        if seed is not None:
            one = hyp_seed(seed)(one)
        try:
            one()
        except AssertionError as exc:
            print(f"shrunk failure: {exc}")
        backend, library = worker.backend, worker.library
    total = sum(counts.values())
    print(
        f"\nfuzz_ops: {total} cases on the {backend} backend ({library}) in {time.monotonic() - start:.0f} s; "
        f"worker restarts {worker.restarts}"
    )
    for outcome, n in counts.most_common():
        print(f"  {outcome:26s} {n}")
    unclear = [(c, r) for c, r in examples if r["outcome"] == "unclear"]
    if unclear:
        print("clean errors whose message names no argument (not failures; docs/OPS.md asks for names):")
        for detail in sorted({r["detail"] for _, r in unclear})[:10]:
            example = next(c for c, r in unclear if r["detail"] == detail)
            print(f"  {detail}\n    e.g. {describe(example)}")
    kinds = collections.Counter(r["outcome"] for _, r in failures)
    print(f"failures: {len(failures)} {dict(kinds)}")
    shown = collections.Counter()
    for case, result in failures:
        if shown[result["outcome"]] >= 3:
            continue
        shown[result["outcome"]] += 1
        print(f"\n[{result['outcome']}] {describe(case)}\n  {result['detail'][:1500]}\n  case: {json.dumps(case)}")
    return 1 if failures else 0


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cases", type=int, default=2000, help="number of cases (default 2000)")
    parser.add_argument("--seed", type=int, default=None, help="hypothesis seed, for a reproducible run")
    parser.add_argument("--timeout", type=float, default=120.0, help="seconds a case may take before it is a hang")
    parser.add_argument("--shrink", action="store_true", help="stop at the first failure and shrink it")
    parser.add_argument("--report-every", type=int, default=500)
    parser.add_argument("--replay", type=Path, help="run one case (a JSON file) in this process and print the result")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return worker_main()
    if args.replay:
        case = json.loads(args.replay.read_text())
        print(describe(case))
        try:
            print(run_case(case))
        except Finding as exc:
            print(f"FAILED {exc}")
            return 1
        return 0
    return fuzz(args.cases, args.seed, args.timeout, args.shrink, args.report_every)


if __name__ == "__main__":
    sys.exit(main())
