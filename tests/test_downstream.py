"""What a user's pipeline does with the ops and the network: in-place updates of outputs,
forward-mode AD, torch.func transforms, autocast, damaged checkpoints, and the habits that
already work (compile with dynamic shapes, export save/load in a fresh process, threads,
DataLoader workers)."""

from __future__ import annotations

import concurrent.futures
import itertools
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.autograd.forward_ad as fwAD
from helpers import TINY_TRAIN_ARGS
from torch.func import functional_call, grad, hessian, jacfwd, jacrev, jvp, vjp, vmap

import terminator.ops as ops
from terminator.ops import reference

ROOT = Path(__file__).resolve().parents[1]
F64 = torch.float64
COMPILED = ops.backend().name != "reference"  # the compiled ops' outputs are never views

GLOBAL_CASES = [  # (mode, spatial, x given, kernel form)
    (mode, spatial, has_x, form)
    for mode, spatial in [("dot", (6,)), ("dot", (4, 5)), ("matmul", (4, 4)), ("conv", (7,)), ("conv", (4, 5))]
    for has_x, form in [(False, "C"), (True, "BC"), (False, "1C")]
]
CONV_CASES = [
    (spatial, kernel, form, algo)
    for spatial, kernel in [((9,), (3,)), ((5, 6), (3, 2))]
    for form in ("C", "BC")
    for algo in ("direct", "fft")
]


def _randn(*shape, seed=0, dtype=F64):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=dtype)


def _kernel(form, batch, channels, spatial, seed):
    shape = {"C": (channels, *spatial), "1C": (1, channels, *spatial), "BC": (batch, channels, *spatial)}[form]
    return _randn(*shape, seed=seed)


def _global_args(mode, spatial, has_x, form, batch=3, channels=2):
    k = _kernel(form, batch, channels, spatial, 1)
    z = _randn(batch, channels, *spatial, seed=2)
    x = _randn(batch, channels, *spatial, seed=3) if has_x else None
    return k, z, x


def _conv_args(spatial, kernel, form, batch=3, channels=2):
    return _randn(batch, channels, *spatial, seed=4), _kernel(form, batch, channels, kernel, 5)


def _close(actual, expected, tol=1e-10):
    assert actual.shape == expected.shape, (actual.shape, expected.shape)
    err = (actual - expected).abs().max().item() if actual.numel() else 0.0
    assert err <= tol * (1 + expected.abs().max().item() if expected.numel() else 1), err


def _ours_and_reference(mode_or_algo, kind):
    if kind == "global":
        return (
            lambda k, z, x: ops.hyperzzw_global(k, z, x, mode=mode_or_algo),
            lambda k, z, x: reference.hyperzzw_global(k, z, x, mode=mode_or_algo),
        )
    return (lambda x, w: ops.hyperkernel_conv(x, w, algo=mode_or_algo), reference.hyperkernel_conv)


def _global_functions(mode, has_x):
    """The op as a function of its present tensors (k, z[, x]), ours and the reference."""
    ours, ref = _ours_and_reference(mode, "global")
    if has_x:
        return ours, ref
    return (lambda k, z: ours(k, z, None)), (lambda k, z: ref(k, z, None))


# ---- outputs are fresh tensors: in-place updates train correctly ------------------------


def _inplace_chain(y, bias):
    y += bias
    y.mul_(2)
    return torch.relu_(y)


@pytest.mark.parametrize("mode,spatial,has_x,form", GLOBAL_CASES)
def test_global_output_is_not_a_view_and_trains_in_place(mode, spatial, has_x, form):
    args = _global_args(mode, spatial, has_x, form)
    bias = torch.tensor(0.25, dtype=F64)
    grads = []
    for fn in _ours_and_reference(mode, "global"):
        leaves = [a.clone().requires_grad_() if a is not None else None for a in args]
        y = fn(*leaves)
        if COMPILED and not grads:  # ours (the reference may return views)
            assert y._base is None
        _inplace_chain(y, bias).square().sum().backward()
        grads.append([t.grad for t in leaves if t is not None])
    for ours, ref in zip(*grads):
        _close(ours, ref)


@pytest.mark.parametrize("spatial,kernel,form,algo", CONV_CASES)
def test_conv_output_is_not_a_view_and_trains_in_place(spatial, kernel, form, algo):
    args = _conv_args(spatial, kernel, form)
    grads = []
    for fn in _ours_and_reference(algo, "conv"):
        leaves = [a.clone().requires_grad_() for a in args]
        y = fn(*leaves)
        if COMPILED and not grads:  # ours (the reference may return views)
            assert y._base is None
        torch.nn.ReLU(inplace=True)(y).square().sum().backward()
        grads.append([t.grad for t in leaves])
    for ours, ref in zip(*grads):
        _close(ours, ref)


def test_backward_op_outputs_are_not_views(compiled):
    k, z, x = _global_args("dot", (4, 5), True, "C")
    for t in torch.ops.terminator.hyperzzw_global_backward(z, k, z, x, "dot"):
        assert t._base is None
    for t in torch.ops.terminator.hyperkernel_conv_backward(z, z, k[:, :3, :3], "direct"):
        assert t._base is None


# ---- forward-mode AD ----------------------------------------------------------------------


def _finite_difference(fn, args, tangents, eps=1e-6):
    plus = fn(*[a + eps * t if a is not None else None for a, t in zip(args, tangents)])
    minus = fn(*[a - eps * t if a is not None else None for a, t in zip(args, tangents)])
    return (plus - minus) / (2 * eps)


@pytest.mark.parametrize("mode,spatial,has_x,form", GLOBAL_CASES)
def test_global_forward_ad_matches_reference_and_finite_differences(mode, spatial, has_x, form):
    args = _global_args(mode, spatial, has_x, form)
    tangents = [torch.randn_like(a) if a is not None else None for a in args]
    ours, ref = _ours_and_reference(mode, "global")
    expected = (
        torch.func.jvp(
            lambda *a: ref(*a), tuple(a for a in args if a is not None), tuple(t for t in tangents if t is not None)
        )[1]
        if has_x
        else torch.func.jvp(lambda k, z: ref(k, z, None), args[:2], tuple(tangents[:2]))[1]
    )
    _close(_finite_difference(ref, args, tangents), expected, tol=1e-6)
    # a dual z alone, then every input dual, and an input that also requires grad
    for duals in ([False, True, False], [True, True, True]):
        with fwAD.dual_level():
            inputs = [
                fwAD.make_dual(a, t) if a is not None and dual else a for a, t, dual in zip(args, tangents, duals)
            ]
            inputs[0] = inputs[0].requires_grad_() if not duals[0] else inputs[0]
            tangent = fwAD.unpack_dual(ours(*inputs)).tangent
            ref_tangent = fwAD.unpack_dual(ref(*inputs)).tangent
        assert tangent is not None, "the op dropped the tangent"
        _close(tangent, ref_tangent)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(
            ours(*[fwAD.make_dual(a, t) if a is not None else None for a, t in zip(args, tangents)])
        ).tangent
    _close(tangent, expected)


def test_forward_ad_through_the_raw_op(compiled):
    k, z, x = _global_args("conv", (4, 5), True, "C")
    dz = torch.randn_like(z)
    with fwAD.dual_level():
        tangent = fwAD.unpack_dual(torch.ops.terminator.hyperzzw_global(k, fwAD.make_dual(z, dz), x, "conv")).tangent
    _close(tangent, reference.hyperzzw_global(k, dz, x, mode="conv"))


@pytest.mark.parametrize("spatial,kernel,form,algo", CONV_CASES)
def test_conv_forward_ad_matches_reference(spatial, kernel, form, algo):
    args = _conv_args(spatial, kernel, form)
    tangents = tuple(torch.randn_like(a) for a in args)
    ours, ref = _ours_and_reference(algo, "conv")
    expected = jvp(ref, args, tangents)[1]
    _close(jvp(ours, args, tangents)[1], expected)
    _close(_finite_difference(ref, args, tangents), expected, tol=1e-6)


# ---- torch.func ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode,spatial,has_x,form", GLOBAL_CASES)
def test_global_under_torch_func_transforms(mode, spatial, has_x, form):
    args = tuple(a for a in _global_args(mode, spatial, has_x, form) if a is not None)
    ours, ref = _global_functions(mode, has_x)
    argnums = tuple(range(len(args)))
    loss = lambda fn: lambda *a: fn(*a).sin().sum()  # noqa: E731
    for a, b in zip(grad(loss(ours), argnums)(*args), grad(loss(ref), argnums)(*args)):
        _close(a, b)
    (out, pullback), (_, ref_pullback) = vjp(ours, *args), vjp(ref, *args)
    cotangent = torch.randn_like(out)
    for a, b in zip(pullback(cotangent), ref_pullback(cotangent)):
        _close(a, b)
    _close(jacrev(ours, argnums=1)(*args), jacrev(ref, argnums=1)(*args))
    _close(jacfwd(ours, argnums=0)(*args), jacfwd(ref, argnums=0)(*args))
    _close(hessian(loss(ours), argnums=1)(*args), hessian(loss(ref), argnums=1)(*args))
    second = lambda fn: jacrev(jacrev(loss(fn), argnums=1), argnums=0)  # noqa: E731
    _close(second(ours)(*args), second(ref)(*args))


@pytest.mark.parametrize("mode,spatial,has_x,form", GLOBAL_CASES)
def test_global_vmap_over_every_argument_combination(mode, spatial, has_x, form):
    args = tuple(a for a in _global_args(mode, spatial, has_x, form) if a is not None)
    ours, ref = _global_functions(mode, has_x)
    batched = tuple(torch.stack([a * (i + 1) for i in range(3)]) for a in args)
    for in_dims in itertools.product((0, None), repeat=len(args)):
        if all(d is None for d in in_dims):
            continue
        inputs = [b if d == 0 else a for a, b, d in zip(args, batched, in_dims)]
        expected = torch.stack([ref(*[x[i] if d == 0 else x for x, d in zip(inputs, in_dims)]) for i in range(3)])
        _close(vmap(ours, in_dims=in_dims)(*inputs), expected)


@pytest.mark.parametrize("spatial,kernel,form,algo", CONV_CASES)
def test_conv_under_torch_func_transforms(spatial, kernel, form, algo):
    args = _conv_args(spatial, kernel, form)
    ours, ref = _ours_and_reference(algo, "conv")
    loss = lambda fn: lambda *a: fn(*a).sin().sum()  # noqa: E731
    for a, b in zip(grad(loss(ours), (0, 1))(*args), grad(loss(ref), (0, 1))(*args)):
        _close(a, b)
    _close(jacrev(ours, argnums=1)(*args), jacrev(ref, argnums=1)(*args))
    _close(hessian(loss(ours), argnums=1)(*args), hessian(loss(ref), argnums=1)(*args))
    batched = tuple(torch.stack([a * (i + 1) for i in range(3)]) for a in args)
    for in_dims in [(0, 0), (0, None), (None, 0)]:
        inputs = [b if d == 0 else a for a, b, d in zip(args, batched, in_dims)]
        expected = torch.stack([ref(*[x[i] if d == 0 else x for x, d in zip(inputs, in_dims)]) for i in range(3)])
        _close(vmap(ours, in_dims=in_dims)(*inputs), expected)


def test_vmap_runs_the_op_once_on_the_folded_batch(compiled):
    k, z, _ = _global_args("dot", (4, 5), False, "C")
    zs = torch.stack([z, 2 * z, 3 * z, 4 * z])
    with torch.profiler.profile(record_shapes=True) as prof:
        vmap(lambda z: ops.hyperzzw_global(k, z, mode="conv"))(zs)
        vmap(lambda w: ops.hyperkernel_conv(z, w))(zs[:, :, :, :3, :3])
    for name, folded in (("hyperzzw_global", [12, 2, 4, 5]), ("hyperkernel_conv", [12, 2, 4, 5])):
        calls = [e.input_shapes for e in prof.events() if e.name == f"terminator::{name}"]
        # the vmapped call and one call on the folded batch (V·B = 4·3), not one per sample
        assert len(calls) == 2 and any(folded in shapes for shapes in calls), (name, calls)


class _UserModel(torch.nn.Module):
    """A user's module: a parameter hyper-kernel, both ops, a linear head."""

    def __init__(self, channels=2, size=(4, 5)):
        super().__init__()
        self.kernel = torch.nn.Parameter(_randn(channels, *size, seed=7, dtype=torch.float32))
        self.local = torch.nn.Parameter(_randn(channels, 3, 3, seed=8, dtype=torch.float32))
        self.head = torch.nn.Linear(channels, 3)

    def forward(self, z):
        y = ops.hyperzzw_global(self.kernel, z, mode="conv")
        y = ops.hyperkernel_conv(torch.relu(y), self.local)
        return self.head(y.mean(dim=(-2, -1)))


def test_per_sample_gradients_with_vmap_of_grad():
    model = _UserModel().double()
    params = {name: p.detach() for name, p in model.named_parameters()}
    x, y = _randn(4, 2, 4, 5, seed=9), torch.tensor([0, 1, 2, 1])

    def loss(params, x, y):
        logits = functional_call(model, params, (x.unsqueeze(0),))
        return torch.nn.functional.cross_entropy(logits, y.unsqueeze(0))

    per_sample = vmap(grad(loss), in_dims=(None, 0, 0))(params, x, y)
    for i in range(len(y)):
        model.zero_grad()
        loss(dict(model.named_parameters()), x[i], y[i]).backward()
        for name, p in model.named_parameters():
            _close(per_sample[name][i], p.grad)


def test_raw_op_inside_a_grad_transform_names_the_op_and_the_way_out(compiled):
    k, z, _ = _global_args("dot", (4, 5), False, "C")
    with pytest.raises(RuntimeError, match="torch.ops.terminator.hyperzzw_global .*terminator.ops.hyperzzw_global"):
        grad(lambda z: torch.ops.terminator.hyperzzw_global(k, z, None, "dot").sum())(z)


# ---- autocast -----------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["dot", "conv"])
def test_ops_under_cpu_autocast_run_in_bfloat16(mode):
    k, z, _ = _global_args(mode, (4, 5), False, "C")
    k, z = k.float(), z.float()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = ops.hyperzzw_global(k, z.bfloat16(), mode=mode)  # a float32 kernel meets a bfloat16 activation
        c = ops.hyperkernel_conv(z, k[:, :3, :3])
    assert y.dtype == c.dtype == torch.bfloat16
    bf = lambda t: t.bfloat16().double()  # noqa: E731
    _close(y.double(), reference.hyperzzw_global(bf(k), bf(z), mode=mode), tol=3e-2)
    _close(c.double(), reference.hyperkernel_conv(bf(z), bf(k[:, :3, :3])), tol=3e-2)


def test_raw_ops_follow_autocast(compiled):
    k, z, _ = _global_args("dot", (4, 5), False, "C")
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert torch.ops.terminator.hyperzzw_global(k.float(), z.float(), None, "dot").dtype == torch.bfloat16


def test_user_module_trains_under_autocast():
    model = _UserModel()
    x = _randn(4, 2, 4, 5, seed=10, dtype=torch.float32).bfloat16()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = model(x).float().logsumexp(1).mean()
    loss.backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in model.parameters())


@pytest.mark.parametrize("preset", ["fmnist", "seq784", "mnist1d"])
def test_presets_train_and_evaluate_under_bfloat16_autocast(preset):
    from terminator.losses import TerminatorLoss
    from terminator.models import Terminator

    torch.manual_seed(0)
    model = Terminator.from_preset(preset)
    x = torch.randn(8, model.config.channels[0], *model.config.size)
    y = torch.randint(0, 10, (8,))
    objective = TerminatorLoss()
    loss32 = objective(model, *model(x, return_kernels=True)[:1], y, model(x, return_kernels=True)[1]).total
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits, kernels = model(x, return_kernels=True)
        loss16 = objective(model, logits, y, kernels).total
    loss16.backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
    assert abs(loss16.item() - loss32.item()) < 0.05 * abs(loss32.item())
    model.eval()
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.bfloat16):
        assert model(x).dtype == torch.bfloat16


# ---- unreadable and foreign checkpoints ---------------------------------------------------


def _cli(*args, cwd=None):
    env = dict(os.environ)
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    return subprocess.run(
        [sys.executable, "-m", "terminator", *args],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
        cwd=cwd or ROOT,
    )


def _snapshot(folder: Path) -> dict:
    return {p.name: (p.stat().st_size, p.stat().st_mtime_ns, p.read_bytes()) for p in sorted(folder.iterdir())}


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory):
    from terminator.cli import main

    run = tmp_path_factory.mktemp("run") / "run"
    assert main(["train", "--dataset", "digits", "--epochs", "1", "--out", str(run), *TINY_TRAIN_ARGS]) == 0
    return run


def _damaged_checkpoints(good: Path) -> dict[str, bytes]:
    data = good.read_bytes()
    state = torch.load(good, weights_only=True)
    foreign = good.with_name("plain.tmp.pt")
    torch.save({"weight": torch.zeros(3)}, foreign)
    wrong = dict(state, model={k: v[..., :1] if v.dim() else v for k, v in state["model"].items()})
    mismatched = good.with_name("mismatched.tmp.pt")
    torch.save(wrong, mismatched)
    no_history = dict(state)
    del no_history["history"]
    partial = good.with_name("partial.tmp.pt")
    torch.save(no_history, partial)
    cases = {
        "empty": b"",
        "truncated": data[: len(data) // 2],
        "garbage": os.urandom(4096),
        "foreign": foreign.read_bytes(),
        "mismatched": mismatched.read_bytes(),
        "partial": partial.read_bytes(),
    }
    for p in (foreign, mismatched, partial):
        p.unlink()
    return cases


def test_damaged_checkpoints_give_one_line_and_leave_the_run_untouched(trained_run, tmp_path):
    from terminator.train import CheckpointRefused, load_checkpoint
    from terminator.train.checkpoint import check_resumable, model_from_checkpoint

    for name, data in _damaged_checkpoints(trained_run / "last.pt").items():
        bad = tmp_path / f"{name}.pt"
        bad.write_bytes(data)
        if name != "partial":  # eval needs no training state
            r = _cli("eval", "--checkpoint", str(bad))
            assert r.returncode == 2, (name, r.stderr[-2000:])
            lines = r.stderr.strip().splitlines()
            assert len(lines) == 1 and str(bad) in lines[0] and "Traceback" not in r.stderr, (name, r.stderr)
            if name == "garbage":
                # no advice to retry with weights_only=False for a file that is no checkpoint
                assert "not a complete PyTorch checkpoint" in lines[0] and "weights_only" not in lines[0], lines[0]
        run = tmp_path / f"run-{name}"
        run.mkdir()
        (run / "last.pt").write_bytes(data)
        (run / "metrics.csv").write_text("epoch\n1\n")
        before = _snapshot(run)
        r = _cli("train", "--dataset", "digits", "--out", str(run), "--resume")
        assert r.returncode == 2, (name, r.stderr[-2000:])
        lines = r.stderr.strip().splitlines()
        assert len(lines) == 1 and "last.pt" in lines[0] and "Traceback" not in r.stderr, (name, r.stderr)
        assert _snapshot(run) == before, name
        with pytest.raises(CheckpointRefused, match=str(bad)):
            ckpt = load_checkpoint(bad)
            model_from_checkpoint(ckpt, bad)
            check_resumable(ckpt, bad)


# ---- the habits of a pipeline that already work --------------------------------------------


def test_compile_with_dynamic_shapes_matches_eager():
    model = _UserModel()
    compiled = torch.compile(model, dynamic=True, fullgraph=True)
    for batch in (2, 5, 3):
        x = _randn(batch, 2, 4, 5, seed=batch, dtype=torch.float32)
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_exported_program_loads_and_runs_in_a_fresh_process(tmp_path):
    model = _UserModel().eval()
    x = _randn(3, 2, 4, 5, seed=11, dtype=torch.float32)
    torch.export.save(torch.export.export(model, (x,)), tmp_path / "model.pt2")
    torch.save({"x": x, "y": model(x).detach()}, tmp_path / "io.pt")
    script = (
        "import sys, torch, terminator.ops\n"
        "program = torch.export.load(sys.argv[1])\n"
        "io = torch.load(sys.argv[2])\n"
        "torch.testing.assert_close(program.module()(io['x']), io['y'], rtol=1e-5, atol=1e-5)\n"
        "print('ok')\n"
    )
    r = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path / "model.pt2"), str(tmp_path / "io.pt")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-3000:]


def test_ops_from_several_threads_agree():
    k, z, _ = _global_args("conv", (6, 7), False, "BC", batch=4, channels=3)
    expected = ops.hyperzzw_global(k, z, mode="conv")
    with concurrent.futures.ThreadPoolExecutor(4) as pool:
        results = list(pool.map(lambda _: ops.hyperzzw_global(k, z, mode="conv"), range(16)))
    for r in results:
        assert torch.equal(r, expected)


class _OpDataset(torch.utils.data.Dataset):
    def __len__(self):
        return 6

    def __getitem__(self, i):
        z = _randn(1, 2, 4, 5, seed=i, dtype=torch.float32)
        return ops.hyperzzw_global(z[0], z, mode="dot")[0]


def test_ops_in_dataloader_worker_processes():
    loader = torch.utils.data.DataLoader(_OpDataset(), batch_size=2, num_workers=2)
    batches = torch.cat(list(loader))
    expected = torch.stack([_OpDataset()[i] for i in range(6)])
    assert torch.equal(batches, expected)


def test_cli_has_no_bench_command_and_readme_says_how_to_benchmark():
    r = _cli("bench")
    assert r.returncode == 2 and "invalid choice" in r.stderr
    readme = (ROOT / "README.md").read_text()
    assert "tools/bench/bench_ops.py" in readme
