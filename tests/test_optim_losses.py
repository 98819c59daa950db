"""Kar2/Kar3 against their formulas, determinism, state_dict round-trip; the losses."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from nn_helpers import single_thread, tiny_input, tiny_model  # noqa: F401 (autouse fixture)

import terminator.ops as ops
from terminator import optim
from terminator.losses import (
    LabelSmoothedCrossEntropy,
    TerminatorLoss,
    fast_l2_penalty,
    label_smoothed_cross_entropy,
    slow_neural_loss,
    split_parameters,
)
from terminator.nn import LocalContext, MAGNet, SlowNetL
from terminator.optim import Kar2, Kar3

# ---------------------------------------------------------------- optimizers


def _toy_grads(steps: int, shape=(3, 4), seed=0):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(shape, generator=gen, dtype=torch.float64) for _ in range(steps)]


@pytest.mark.parametrize("kind", ["kar2", "kar3"])
def test_kar_steps_equal_their_formula(kind):
    p0 = torch.randn(3, 4, dtype=torch.float64)
    p = torch.nn.Parameter(p0.clone())
    lr = 0.01
    opt = Kar3([p], lr=lr, betas=(0.5, 0.95)) if kind == "kar3" else Kar2([p], lr=lr, beta=0.9)
    betas = (0.5, 0.95) if kind == "kar3" else (0.9,)
    expected = p0.clone()
    means = [torch.zeros_like(p0) for _ in betas]
    for g in _toy_grads(6):
        p.grad = g.clone()
        opt.step()
        # The step uses the running means from before this gradient, then updates them.
        expected -= lr * (torch.sign(g) + sum(torch.sign(m) for m in means))
        means = [b * m + (1 - b) * g for m, b in zip(means, betas)]
        assert torch.allclose(p.detach(), expected, rtol=0, atol=1e-12)
        for n, m in enumerate(means):
            assert torch.allclose(opt.state[p][f"exp_avg_{n + 1}"], m, rtol=1e-12, atol=1e-15)
    assert int(opt.state[p]["step"]) == 6


def test_kar3_first_step_is_a_plain_sign_step():
    p = torch.nn.Parameter(torch.zeros(5))
    p.grad = torch.tensor([1.0, -2.0, 0.0, 3.0, -0.5])
    Kar3([p], lr=0.1).step()
    assert torch.allclose(p.detach(), torch.tensor([-0.1, 0.1, 0.0, -0.1, 0.1]))  # m1 = m2 = 0 before it


def test_kar_skips_parameters_without_grad_and_checks_arguments():
    a, b = torch.nn.Parameter(torch.ones(2)), torch.nn.Parameter(torch.ones(2))
    a.grad = torch.ones(2)
    opt = Kar3([a, b], lr=0.5)
    opt.step()
    assert torch.equal(b.detach(), torch.ones(2)) and b not in opt.state
    with pytest.raises(ValueError, match="lr"):
        Kar3([a], lr=-1)
    with pytest.raises(ValueError, match="betas"):
        Kar3([a], betas=(0.5, 1.0))
    with pytest.raises(ValueError, match="beta"):
        Kar2([a], beta=1.5)


def _train(opt_cls, steps, seed=0, **kw):
    model = tiny_model(1, seed=seed, dropout=(0.0, 0.0, 0.0))
    x = tiny_input(model, batch=6)
    target = torch.arange(6) % 5
    opt = opt_cls(model.parameters(), **kw)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), target).backward()
        opt.step()
    return model, opt, x, target


@pytest.mark.parametrize("opt_cls", [Kar2, Kar3])
def test_same_seed_gives_identical_steps(opt_cls):
    m1, *_ = _train(opt_cls, 3, seed=4)
    m2, *_ = _train(opt_cls, 3, seed=4)
    for (n, a), b in zip(m1.named_parameters(), m2.parameters()):
        assert torch.equal(a, b), n


@pytest.mark.parametrize("opt_cls", [Kar2, Kar3])
def test_state_dict_round_trip_resumes_exactly(opt_cls, tmp_path):
    model, opt, x, target = _train(opt_cls, 2)
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, tmp_path / "ckpt.pt")
    twin = copy.deepcopy(model)

    def step(m, o):
        o.zero_grad()
        F.cross_entropy(m(x), target).backward()
        o.step()

    step(model, opt)
    ckpt = torch.load(tmp_path / "ckpt.pt", weights_only=True)
    twin.load_state_dict(ckpt["model"])
    twin_opt = opt_cls(twin.parameters())
    twin_opt.load_state_dict(ckpt["opt"])
    assert twin_opt.param_groups[0]["lr"] == opt.param_groups[0]["lr"]
    step(twin, twin_opt)
    for (n, a), b in zip(model.named_parameters(), twin.parameters()):
        assert torch.equal(a, b), n


@pytest.mark.skipif(ops.backend().name == "reference", reason="compiled backend not active")
@pytest.mark.parametrize("opt_cls", [Kar2, Kar3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_one_call_step_equals_the_foreach_step_bitwise(opt_cls, dtype, monkeypatch):
    """torch.ops.terminator.kar_step_ against the foreach ops it replaces: zero, NaN and
    non-contiguous gradients, a parameter its loop does not take (float16), sizes with tails."""
    shapes = [(3, 4), (37,), (1,), (2, 5, 17)]
    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(s, generator=gen, dtype=torch.float64) for s in shapes]

    def run(fused: bool):
        monkeypatch.setattr(optim, "_fused_step_serves", lambda params: fused)
        params = [torch.nn.Parameter(t.to(dtype).clone()) for t in start]
        params.append(torch.nn.Parameter(torch.randn(6, generator=torch.Generator().manual_seed(1)).half()))
        opt = opt_cls(params, lr=0.01)
        for step in range(5):
            g_gen = torch.Generator().manual_seed(10 + step)
            for p in params:
                g = torch.randn(p.shape[::-1], generator=g_gen, dtype=torch.float64).to(p.dtype)
                g.view(-1)[0] = 0.0
                g = g.permute(*reversed(range(g.dim())))  # non-contiguous where dim > 1
                if step == 3 and p.numel() == 37:
                    g = g.clone()
                    g[5] = float("nan")
                p.grad = g
            opt.step()
        return params, opt

    fused, fused_opt = run(True)
    plain, plain_opt = run(False)
    for a, b in zip(fused, plain):
        assert torch.equal(a, b) or torch.allclose(a, b, equal_nan=True, rtol=0, atol=0)
        sa, sb = fused_opt.state[a], plain_opt.state[b]
        assert sa.keys() == sb.keys() and sa["step"].item() == sb["step"].item() == 5
        for key in sa:
            assert torch.allclose(sa[key], sb[key], equal_nan=True, rtol=0, atol=0), key


# ---------------------------------------------------------------- losses


def test_label_smoothed_cross_entropy_matches_formula():
    logits = torch.randn(7, 5, dtype=torch.float64)
    target = torch.randint(0, 5, (7,))
    eps = 0.09
    logp = logits.log_softmax(-1)
    expected = ((1 - eps) * -logp[torch.arange(7), target] + eps * -logp.mean(-1)).mean()
    assert torch.allclose(label_smoothed_cross_entropy(logits, target), expected)
    assert torch.allclose(LabelSmoothedCrossEntropy(eps)(logits, target), expected)


def test_slow_neural_loss_matches_release_tiling():
    k0, k1, k2 = torch.randn(2, 4, 4), torch.randn(4, 4, 4), torch.randn(8, 4, 4)
    expected = (
        (k0.repeat(2, 1, 1) - k1).pow(2).mean()
        + (k0.repeat(4, 1, 1) - k2).pow(2).mean()
        + (k1.repeat(2, 1, 1) - k2).pow(2).mean()
    )
    assert torch.allclose(slow_neural_loss([k0, k1, k2]), expected)
    assert slow_neural_loss([k0]) == 0


def test_split_parameters_by_module_type():
    model = tiny_model(2)
    fast, slow = split_parameters(model)
    assert len(fast) + len(slow) == len(list(model.parameters()))
    slow_ids, fast_ids = {id(p) for p in slow}, {id(p) for p in fast}
    for m in model.modules():
        if isinstance(m, MAGNet):
            assert all(id(p) in slow_ids for p in m.parameters())
        if isinstance(m, LocalContext):
            assert all(id(p) in fast_ids for p in m.parameters())
        if isinstance(m, SlowNetL):
            assert id(m.renorm_alpha) in slow_ids and id(m.renorm_beta) in slow_ids
    assert id(model.head.weight) in fast_ids and id(model.blocks[0].bottleneck.weight) in fast_ids


def test_fast_l2_penalty():
    model = tiny_model(1)
    fast, _ = split_parameters(model)
    expected = 5e-5 * sum(p.norm() for p in fast)
    assert torch.allclose(fast_l2_penalty(model), expected)
    expected_sq = 1e-3 * sum(p.pow(2).sum() for p in fast)
    assert torch.allclose(fast_l2_penalty(model, 1e-3, squared=True), expected_sq)
    # Only fast parameters receive its gradient.
    fast_l2_penalty(model).backward()
    assert all(p.grad is None for p in split_parameters(model)[1])


def test_terminator_loss_parts():
    model = tiny_model(2)
    x = tiny_input(model)
    target = torch.tensor([0, 1, 2, 3])
    logits, kernels = model(x, return_kernels=True)
    parts = TerminatorLoss()(model, logits, target, kernels)
    assert torch.allclose(parts.total, parts.cross_entropy + parts.slow + parts.l2)
    assert torch.allclose(parts.slow, slow_neural_loss(model.global_kernels()))
    assert parts.slow > 0 and parts.l2 > 0


@pytest.mark.skipif(ops.backend().name == "reference", reason="compiled backend not active")
def test_one_call_step_passes_opcheck():
    """Its schema's mutation annotations, fake kernel and torch.compile tracing."""
    params = [torch.randn(3, 4), torch.randn(5)]
    grads = [torch.randn_like(p) for p in params]
    means = [torch.randn_like(p) for _ in range(2) for p in params]
    steps = [torch.zeros(()) for _ in params]
    torch.library.opcheck(torch.ops.terminator.kar_step_.default, (params, grads, means, steps, 0.01, [0.5, 0.95]))
