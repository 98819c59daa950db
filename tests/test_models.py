"""The Terminator network: presets, gradients, save/load, batch independence, backends,
torch.compile and torch.export."""

from __future__ import annotations

import io
import re

import pytest
import torch
from nn_helpers import single_thread, tiny_config, tiny_input, tiny_model, warm_up  # noqa: F401 (autouse fixture)

import terminator.ops as ops
from terminator.losses import TerminatorLoss
from terminator.models import PRESETS, Terminator, TerminatorConfig, preset_parameter_counts
from terminator.models.terminator import space_to_depth
from terminator.optim import Kar3

PRESET_SHAPES = {
    "cifar10": (3, 32, 32),
    "fmnist": (1, 28, 28),
    "fmnist-wide": (1, 28, 28),
    "fmnist-large": (1, 28, 28),
    "fmnist-patch": (1, 28, 28),
    "seq784": (1, 784),
    "mnist1d": (1, 40),
}


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_output_shape(name):
    torch.manual_seed(0)
    model = Terminator.from_preset(name, num_classes=7).eval()
    assert (model.config.channels[0], *model.config.size) == PRESET_SHAPES[name]
    with torch.no_grad():
        logits = model(torch.randn(2, *PRESET_SHAPES[name]))
    assert logits.shape == (2, 7)
    assert torch.isfinite(logits).all()


def test_cifar10_preset_is_the_release():
    c = Terminator.from_preset("cifar10").config
    assert c.channels == (3, 12, 36, 72, 144) and c.factors == (4, 3, 2, 2, 2) and c.out_channels == 288
    assert c.previous == ((), (), (0,), (1,), (2, 1))
    assert c.global_layers == (3, 2, 2, 2, 2) and c.global_hidden == 64
    assert c.local_sizes == (3, 9, 5, 7) and c.local_hidden == 32 and c.local_layers == 2
    assert (c.gc_hidden, c.hi_channel_hidden, c.hi_spatial_hidden) == (32, 16, 64)
    assert c.dropout == (0.0, 0.05, 0.05, 0.05, 0.05) and c.mode == "matmul" and c.gibs_groups == 12
    model = Terminator.from_preset("cifar10")
    assert [b.bottleneck.in_channels for b in model.blocks] == [30, 120, 396, 792, 1728]


def test_parameter_counts():
    counts = preset_parameter_counts()
    assert set(counts) == set(PRESETS)
    for name, n in counts.items():
        model = Terminator.from_preset(name)
        assert n == model.num_parameters == sum(p.numel() for p in model.parameters())
    assert counts["cifar10"] > counts["mnist1d"] > counts["fmnist"]


def test_faithful_switch_and_config_checks():
    c = Terminator.from_preset("fmnist", faithful=True).config
    assert c.local_context == "batch" and c.running_stats is False
    with pytest.raises(ValueError, match="unknown preset"):
        Terminator.from_preset("imagenet")
    with pytest.raises(ValueError, match="block 1 takes"):
        TerminatorConfig(**tiny_config(2, channels=(2, 5, 8)))
    with pytest.raises(ValueError, match="one entry per block"):
        TerminatorConfig(**tiny_config(2, dropout=(0.0,)))
    with pytest.raises(ValueError, match="x must have shape"):
        tiny_model(2)(torch.randn(2, 2, 9, 9))


@pytest.mark.parametrize("data_dim", [1, 2])
def test_patch_folds_cells_of_pixels_into_channels(data_dim):
    p = 2
    x = torch.randn(3, 2, *((8, 8) if data_dim == 2 else (16,)))
    y = space_to_depth(x, p)
    if data_dim == 2:
        assert torch.equal(y, torch.nn.functional.pixel_unshuffle(x, p))
    else:  # y[b, c·p + j, n] = x[b, c, n·p + j]
        for c in range(2):
            for j in range(p):
                assert torch.equal(y[:, c * p + j], x[:, c, j::p])
    # The patched network is the unpatched one over the folded input, with the same parameters.
    widths = dict(factors=(16 // (2 * p**data_dim), 2, 2), local_sizes=(3, 3, 3, 3))
    patched = tiny_model(data_dim, patch=p, channels=(2, 16, 32), **widths).eval()
    c = patched.config
    assert c.block_channels == (2 * p**data_dim, 16, 32) and c.block_size == tuple(n // p for n in c.size)
    plain = tiny_model(data_dim, size=c.block_size, channels=c.block_channels, **widths).eval()
    plain.load_state_dict(patched.state_dict())
    with torch.no_grad():
        logits, kernels = patched(x, return_kernels=True)
        expected, expected_kernels = plain(space_to_depth(x, p), return_kernels=True)
    assert torch.allclose(logits, expected, atol=1e-6)
    assert all(k.shape == (w, *c.block_size) for k, w in zip(kernels, c.block_channels))
    assert all(torch.allclose(a, b) for a, b in zip(kernels, expected_kernels))


def test_patch_checks_name_the_field():
    with pytest.raises(ValueError, match="patch must be a positive integer that divides every size"):
        TerminatorConfig(**tiny_config(2, patch=3))
    with pytest.raises(ValueError, match="patch must be"):
        TerminatorConfig(**tiny_config(2, patch=0))
    with pytest.raises(ValueError, match=r"channels\[0\]\*patch\^2\*factors\[0\] = 16 .* channels\[1\] = 4"):
        TerminatorConfig(**tiny_config(2, patch=2))


def test_print_is_readable():
    text = repr(Terminator.from_preset("cifar10"))
    assert text.startswith("Terminator(")
    assert "parameters=" in text and "SFNEBlock(" in text and "mode='matmul'" in text
    assert re.search(r"omega_0=", text)
    summary = Terminator.from_preset("cifar10").summary()
    assert "total parameters: 1,339,420" in summary and len(summary.splitlines()) == 9


@pytest.mark.parametrize("data_dim", [1, 2])
def test_every_parameter_gets_a_gradient(data_dim):
    model = tiny_model(data_dim).double()
    x = tiny_input(model, dtype=torch.float64)
    logits, kernels = model(x, return_kernels=True)
    target = torch.arange(x.shape[0]) % model.config.num_classes
    TerminatorLoss()(model, logits, target, kernels).total.backward()
    # Biases right before a standardization and the HCI branch (IN(x ⊙ positive per-channel
    # score) = IN(x)) are structurally (near-)inert, in the release as here (docs/ARCHITECTURE.md).
    inert = re.compile(r"(mixer\.bias|w_y\.bias|bottleneck\.bias|local\.\d\.bias|\.hci\.)")
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        if not inert.search(name):
            assert p.grad.abs().max() > 1e-13, f"{name} gets no gradient"


@pytest.mark.parametrize("data_dim", [1, 2])
def test_save_load_round_trip(data_dim, tmp_path):
    model = tiny_model(data_dim)
    x = tiny_input(model)
    warm_up(model, x)
    model.eval()
    path = tmp_path / "model.pt"
    torch.save(model.state_dict(), path)
    other = tiny_model(data_dim, seed=123)
    other.load_state_dict(torch.load(path, weights_only=True))
    other.eval()
    with torch.no_grad():
        assert torch.equal(model(x), other(x))
    # The whole module pickles too.
    buf = io.BytesIO()
    torch.save(model, buf)
    buf.seek(0)
    with torch.no_grad():
        assert torch.equal(torch.load(buf, weights_only=False)(x), model(x))


def _alone_vs_batch(model, x):
    with torch.no_grad():
        batched = model(x)
        alone = torch.cat([model(x[i : i + 1]) for i in range(x.shape[0])])
        mixed = model(torch.cat([x[:2], torch.randn_like(x[:3]) * 5]))[:2]
    return batched, alone, mixed


@pytest.mark.parametrize("data_dim", [1, 2])
def test_eval_predictions_are_batch_independent(data_dim):
    model = tiny_model(data_dim)
    x = tiny_input(model, batch=5)
    warm_up(model, x)
    model.eval()
    batched, alone, mixed = _alone_vs_batch(model, x)
    assert torch.allclose(batched, alone, rtol=1e-5, atol=1e-5), (batched - alone).abs().max()
    assert torch.allclose(mixed, alone[:2], rtol=1e-5, atol=1e-5)


def test_fmnist_preset_is_batch_independent():
    torch.manual_seed(0)
    model = Terminator.from_preset("fmnist")
    x = torch.randn(4, 1, 28, 28)
    warm_up(model, x, steps=1)
    model.eval()
    batched, alone, _ = _alone_vs_batch(model, x)
    assert torch.allclose(batched, alone, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("data_dim", [1, 2])
def test_faithful_switch_depends_on_the_batch(data_dim):
    model = tiny_model(data_dim, faithful=True)
    x = tiny_input(model, batch=5)
    model.eval()
    batched, alone, mixed = _alone_vs_batch(model, x)
    assert (batched - alone).abs().max() > 1e-3
    assert (mixed - alone[:2]).abs().max() > 1e-3


def test_eval_uses_cached_global_kernels():
    model = tiny_model(2).eval()
    x = tiny_input(model)
    with torch.no_grad():
        model(x)
        cached = [b.global_hzzw.slow_net._kernel_cache[1] for b in model.blocks]
        again = model.global_kernels()
    assert all(a is b for a, b in zip(again, cached))
    model.train()
    fresh = model.global_kernels()
    assert all(torch.equal(a, b) for a, b in zip(fresh, cached))


def test_a_few_kar3_steps_lower_the_loss():
    model = tiny_model(2, dropout=(0.0, 0.0, 0.0))
    x = tiny_input(model, batch=16)
    target = torch.arange(16) % model.config.num_classes
    loss_fn = TerminatorLoss()
    opt = Kar3(model.parameters(), lr=3e-3)
    losses = []
    for _ in range(8):
        opt.zero_grad()
        logits, kernels = model(x, return_kernels=True)
        loss = loss_fn(model, logits, target, kernels).total
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("data_dim", [1, 2])
def test_same_outputs_and_gradients_on_compiled_and_reference_backends(data_dim, monkeypatch):
    if ops.backend().name == "reference":
        pytest.skip(f"compiled backend not active: {ops.backend().reason}")
    model = tiny_model(data_dim).double()
    x = tiny_input(model, dtype=torch.float64).requires_grad_()

    def run():
        model.zero_grad()
        x.grad = None
        torch.manual_seed(5)  # same dropout masks
        logits = model(x)
        (logits * torch.linspace(-1, 1, logits.numel(), dtype=logits.dtype).view_as(logits)).sum().backward()
        return [logits.detach(), x.grad.clone()] + [p.grad.clone() for p in model.parameters()]

    compiled = run()
    monkeypatch.setattr(ops, "_COMPILED_DEVICES", frozenset())  # the reference backend, in this process
    monkeypatch.setattr(torch.ops, "terminator", None)  # which calls no compiled op
    reference = run()
    names = ["logits", "grad x"] + [n for n, _ in model.named_parameters()]
    for name, a, b in zip(names, compiled, reference):
        scale = b.abs().max().clamp_min(1e-30)
        assert (a - b).abs().max() <= 1e-9 * scale + 1e-12, name


def test_torch_compile_runs():
    """aot_eager (dynamo + AOTAutograd, forward and backward graphs, fake kernels of
    the ops) with fullgraph=True: no graph breaks. Inductor works too but takes minutes."""
    torch._dynamo.reset()
    model = tiny_model(1, channels=(2,), factors=(2,), previous=((),), global_layers=(1,), dropout=(0.1,))
    x = tiny_input(model)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    torch.manual_seed(3)
    y = compiled(x)
    torch.manual_seed(3)
    expected = model(x)
    assert torch.allclose(y, expected, atol=1e-6)
    y.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


def test_torch_export_of_eval_model():
    model = tiny_model(2)
    x = tiny_input(model, batch=3)
    warm_up(model, x)
    model.eval()
    exported = torch.export.export(model, (x,))
    with torch.no_grad():
        assert torch.allclose(exported.module()(x), model(x), atol=1e-6)
