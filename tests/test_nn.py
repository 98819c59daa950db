"""Layers of terminator.nn: shapes, init, registration, caching, standardizations."""

from __future__ import annotations

import math

import pytest
import torch
from nn_helpers import single_thread  # noqa: F401 (autouse fixture)

import terminator.nn as tnn
from terminator.optim import Kar3


@pytest.mark.parametrize("size", [(7,), (5, 6)])
def test_coordinate_grid(size):
    grid = tnn.coordinate_grid(size)
    assert grid.shape == (math.prod(size), len(size))
    assert grid.min() == -1 and grid.max() == 1
    assert torch.equal(grid.view(*size, len(size))[..., -1].flatten()[: size[-1]], torch.linspace(-1, 1, size[-1]))


def test_magnet_init_follows_release():
    torch.manual_seed(0)
    net = tnn.MAGNet(2, (6, 6), out_channels=3, hidden=16, num_layers=2, omega_0=5.0)
    assert len(net.filters) == 3 and len(net.linears) == 2
    for lin in net.linears:
        assert torch.all(lin.bias == 1.0)
    assert torch.all(net.output.bias == 0) and torch.all(net.bias_map == 0)
    for f in net.filters:
        assert torch.all(f.bias == 0)
    # Output weights are scaled by sqrt(1/36) relative to kaiming-uniform (bound sqrt(3/fan_in)).
    assert net.output.weight.abs().max() <= math.sqrt(3 / 16) / 6 + 1e-7
    # Deeper filters have a smaller Gamma shape (α/(i+1)), so smaller frequencies on average.
    scales = [f.weight.abs().mean().item() for f in net.filters]
    assert scales[0] > scales[2]
    assert net(None).shape == (1, 36, 3)


@pytest.mark.parametrize("data_dim,size", [(1, (11,)), (2, (5, 7))])
def test_slow_net_shapes(data_dim, size):
    g = tnn.SlowNetG(data_dim, size, out_channels=3, hidden=8, num_layers=2)
    assert g().shape == (3, *size)
    gc = tnn.SlowNetGC(channels=6, hidden=8)
    assert gc().shape == (1, 6)
    local = tnn.SlowNetL(data_dim, channels=3, kernel_size=3, hidden=8)
    u = torch.randn(4, 3, *size)
    assert local(u).shape == (4, 3, *((3,) * data_dim))
    batch = tnn.SlowNetL(data_dim, channels=3, kernel_size=3, hidden=8, local_context="batch")
    assert batch(u).shape == (1, 3, *((3,) * data_dim))


def test_local_kernels_are_per_sample():
    torch.manual_seed(0)
    local = tnn.SlowNetL(2, channels=3, kernel_size=5, hidden=8)
    u = torch.randn(3, 3, 9, 9)
    k = local(u)
    assert not torch.allclose(k[0], k[1])
    assert torch.allclose(local(u[1:2])[0], k[1], atol=1e-6)


def test_renorm_parameters_are_registered_and_trained():
    local = tnn.SlowNetL(1, channels=2, kernel_size=3, hidden=4, num_layers=3)
    names = dict(local.named_parameters())
    assert names["renorm_alpha"].shape == (3, 4) and names["renorm_beta"].shape == (3, 4)
    assert "renorm_alpha" in local.state_dict()
    local(torch.randn(2, 2, 10)).sum().backward()
    assert local.renorm_alpha.grad is not None and local.renorm_beta.grad.abs().sum() > 0


def test_modules_follow_dtype():
    g = tnn.SlowNetG(2, (4, 4), out_channels=2, hidden=4).double()
    assert g.magnet.coords.dtype == torch.float64
    assert g().dtype == torch.float64
    block = tnn.SFNEBlock(
        1, 2, 2, (12,), global_hidden=4, local_hidden=4, gc_hidden=4, hi_channel_hidden=4, hi_spatial_hidden=4
    ).double()
    out, k = block(torch.randn(2, 2, 12, dtype=torch.float64))
    assert out.dtype == k.dtype == torch.float64


def _cached_g():
    torch.manual_seed(0)
    return tnn.SlowNetG(2, (6, 6), out_channels=3, hidden=8, num_layers=2)


def test_global_kernel_cached_in_eval_and_equal_to_recomputed():
    g = _cached_g().eval()
    with torch.no_grad():
        k1 = g()
        k2 = g()
    assert k1 is k2  # served from the cache
    assert torch.equal(k1, g.compute_kernel())
    g.eval()
    with torch.no_grad():
        assert g() is k1  # eval() keeps a valid cache
    g.train()
    assert g._kernel_cache is None  # training drops the cache
    k3 = g()
    assert k3 is not g() and torch.equal(k3, k1)


@pytest.mark.parametrize("optimizer", ["sgd", "kar3"])
def test_global_kernel_cache_invalidated_by_optimizer_step(optimizer):
    """Kar3's one-call step on the compiled CPU backend writes through data pointers: it must
    bump the version counters as an in-place ATen op does."""
    g = _cached_g().eval()
    with torch.no_grad():
        before = g()
    opt = torch.optim.SGD(g.parameters(), lr=0.1) if optimizer == "sgd" else Kar3(g.parameters(), lr=0.1)
    g().pow(2).sum().backward()  # eval with grad enabled: computed afresh, never cached
    opt.step()
    with torch.no_grad():
        after = g()
    assert after is not before
    assert not torch.allclose(after, before)
    assert torch.equal(after, g.compute_kernel())


def test_global_kernel_cache_invalidated_by_load_state_dict_and_dtype():
    g = _cached_g().eval()
    other = tnn.SlowNetG(2, (6, 6), out_channels=3, hidden=8, num_layers=2)
    with torch.no_grad():
        before = g()
        g.load_state_dict(other.state_dict())
        after = g()
        assert torch.equal(after, other.eval()())
        assert not torch.equal(before, after)
        g.double()
        assert g().dtype == torch.float64


def test_global_kernel_not_cached_when_grad_needed():
    g = _cached_g().eval()
    k = g()
    assert k.requires_grad and g._kernel_cache is None


def test_instance_and_batch_standardization():
    x = torch.randn(5, 3, 6, 7) * 4 + 2
    y = tnn.InstanceStandardization()(x)
    assert torch.allclose(y.mean(dim=(2, 3)), torch.zeros(5, 3), atol=1e-5)
    bs = tnn.BatchStandardization(3)
    y = bs(x)
    assert torch.allclose(y.mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)
    assert not torch.allclose(bs.running_mean, torch.zeros(3))
    bs.eval()
    assert torch.allclose(
        bs(x[:1]),
        (x[:1] - bs.running_mean.view(1, 3, 1, 1)) / (bs.running_var.view(1, 3, 1, 1) + 1e-5).sqrt(),
        atol=1e-5,
    )
    faithful = tnn.BatchStandardization(3, running_stats=False).eval()
    assert "running_mean" not in faithful.state_dict()
    assert torch.allclose(faithful(x).mean(dim=(0, 2, 3)), torch.zeros(3), atol=1e-5)


@pytest.mark.parametrize("channels,groups", [(24, 12), (12, 12), (4, 12), (26, 12)])
def test_gibs_alternates_batch_and_instance(channels, groups):
    gibs = tnn.GIBS(channels, groups)
    assert sum(gibs.splits) == channels and len(gibs.splits) == min(groups, channels)
    x = torch.randn(6, channels, 5, 5) * 3 + 1
    y = gibs(x)
    start = 0
    for i, size in enumerate(gibs.splits):
        part_in, part_out = x[:, start : start + size], y[:, start : start + size]
        expected = (
            torch.nn.functional.batch_norm(part_in, None, None, training=True)
            if i % 2 == 0
            else torch.nn.functional.instance_norm(part_in)
        )
        assert torch.allclose(part_out, expected, atol=1e-5), f"group {i}"
        start += size


@pytest.mark.parametrize("data_dim", [1, 2])
def test_rgu_hci_hi_siglu_shapes(data_dim):
    size = (9,) * data_dim
    x = torch.randn(3, 4, *size)
    assert tnn.RGU(data_dim, 4, size)(x).shape == x.shape
    assert tnn.HyperChannelInteraction(data_dim, 4, hidden=8)(x).shape == x.shape
    assert tnn.HyperInteraction(data_dim, 4, size, 4, 8)(x, x).shape == x.shape
    assert torch.allclose(tnn.SiGLU()(x), torch.nn.functional.silu(x))


def test_global_hyperzzw_modes():
    x, f = torch.randn(2, 3, 6, 6), torch.randn(2, 3, 6, 6)
    for mode in ("dot", "matmul", "conv"):
        layer = tnn.GlobalHyperZZW(2, 3, (6, 6), mode=mode, hidden=8)
        k = layer.kernel()
        expected = terminator_reference().hyperzzw_global(k, x, f, mode=mode)
        assert torch.allclose(layer(x, f), expected, atol=1e-5)
    with pytest.raises(ValueError, match="matmul"):
        tnn.GlobalHyperZZW(1, 3, (6,), mode="matmul")
    with pytest.raises(ValueError, match="matmul"):
        tnn.GlobalHyperZZW(2, 3, (6, 5), mode="matmul")
    with pytest.raises(ValueError, match="mode"):
        tnn.GlobalHyperZZW(2, 3, (6, 6), mode="nope")


def terminator_reference():
    from terminator.ops import reference

    return reference


@pytest.mark.parametrize("data_dim", [1, 2])
def test_sfne_block(data_dim):
    size = (10,) * data_dim
    block = tnn.SFNEBlock(
        data_dim,
        3,
        4,
        size,
        num_previous=2,
        global_hidden=8,
        local_hidden=8,
        gc_hidden=8,
        hi_channel_hidden=4,
        hi_spatial_hidden=8,
        local_sizes=(3, 5, 3, 7),
    )
    x = torch.randn(2, 3, *size)
    out, k = block(x, torch.randn(2, 1, *size), torch.randn(2, 3, *size))
    assert out.shape == (2, 12, *size) and k.shape == (3, *size)
    assert block.bottleneck.in_channels == 3 * 12
    with pytest.raises(ValueError, match="earlier outputs"):
        block(x)
    with pytest.raises(ValueError, match="x must have shape"):
        block(torch.randn(2, 3, *((11,) * data_dim)), x, x)


def test_tile_channels():
    t = torch.arange(6.0).view(1, 3, 2)
    assert torch.equal(tnn.tile_channels(t, 6), torch.cat([t, t], 1))
    assert torch.equal(tnn.tile_channels(t, 4), torch.cat([t, t[:, :1]], 1))
