"""The network's fused layers (terminator.ops.pointwise, standardize, rgu, local_kernel,
hyper_interaction) against their reference compositions, and the whole network on the
compiled backend against the same network on the reference backend."""

from __future__ import annotations

import copy

import pytest
import torch

import terminator.ops as ops
from terminator.models import Terminator
from terminator.nn import GIBS, RGU, SlowNetL

COMPILED = ops.backend().name != "reference"
requires_compiled = pytest.mark.skipif(not COMPILED, reason="compiled backend not active")


def _randn(*shape, dtype=torch.float64, seed=0, scale=1.0):
    return (torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * scale).to(dtype)


def _grads(fn, inputs, seed=1):
    """fn(*inputs) and the gradients of <g, fn> for every input that requires grad."""
    out = fn(*inputs)
    g = _randn(*out.shape, dtype=out.dtype, seed=seed)
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    return [out.detach(), *torch.autograd.grad(out, leaves, g)]


def _reference_backend(monkeypatch=None):
    """A context in which the layers take their reference compositions."""

    class _Ctx:
        def __enter__(self):
            self.saved = ops._COMPILED_DEVICES
            ops._COMPILED_DEVICES = frozenset()

        def __exit__(self, *exc):
            ops._COMPILED_DEVICES = self.saved

    return _Ctx()


def _compare(fn, inputs, dtype):
    """Fused (compiled backend) against the reference composition, outputs and gradients.

    float64 agrees to rounding; in float32 both are compared with the float64 reference and
    the fused error may be at most a few times the reference composition's own plus the op
    tests' float32 bound (2e-6 of the magnitude).
    """
    leaves = [t.to(dtype).requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in inputs]
    fused = _grads(fn, leaves)
    with _reference_backend():
        ref = _grads(fn, leaves)
        exact = (
            _grads(
                fn, [t.double().requires_grad_(t.requires_grad) if isinstance(t, torch.Tensor) else t for t in leaves]
            )
            if dtype != torch.float64
            else ref
        )
    for i, (a, b, e) in enumerate(zip(fused, ref, exact)):
        scale = e.abs().max().item() if e.numel() else 0.0
        if dtype == torch.float64:
            assert (a - b).abs().max().item() <= 1e-10 * scale + 1e-300, i
        else:
            ours, theirs = (a.double() - e).abs().max().item(), (b.double() - e).abs().max().item()
            assert ours <= 4 * theirs + 2e-6 * scale, (i, ours, theirs, scale)


DTYPES = [torch.float64, torch.float32]


@requires_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spatial", [(13,), (5, 7), (28, 28)])
@pytest.mark.parametrize("inputs", [[3], [4, 1, 2]])
def test_pointwise_matches_its_composition(dtype, spatial, inputs):
    xs = [_randn(3, c, *spatial, seed=j).requires_grad_() for j, c in enumerate(inputs)]
    w = _randn(5, sum(inputs), seed=7).requires_grad_()
    b = _randn(5, seed=8).requires_grad_()
    _compare(lambda w, b, *xs: ops.pointwise(list(xs), w, b), [w, b, *xs], dtype)
    _compare(lambda w, *xs: ops.pointwise(list(xs), w), [w, *xs], dtype)


@requires_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,spatial", [(128, (40,)), (2, (20, 20)), (3, (23, 29))])
def test_wide_pointwise_over_several_inputs_matches_its_composition(dtype, batch, spatial):
    """Mixes wide enough for BLAS, whose inputs are gathered into one block of samples."""
    inputs = [24, 30, 40]
    xs = [_randn(batch, c, *spatial, seed=j).requires_grad_() for j, c in enumerate(inputs)]
    w = _randn(48, sum(inputs), seed=7, scale=0.1).requires_grad_()
    b = _randn(48, seed=8).requires_grad_()
    _compare(lambda w, b, *xs: ops.pointwise(list(xs), w, b), [w, b, *xs], dtype)


@requires_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kind", ["instance", "batch", "groups"])
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("spatial", [(11,), (6, 5)])
def test_standardize_matches_its_composition(dtype, kind, training, spatial):
    x = _randn(4, 12, *spatial, scale=3.0).add(1.0).requires_grad_()
    bias = _randn(seed=3).reshape(()).requires_grad_()
    if kind == "instance":
        channels, stats = "instance", None
    elif kind == "batch":
        channels, stats = "batch", 12
    else:
        gibs = GIBS(12, groups=5)
        channels = ops.ChannelGroups(gibs.bs_index, gibs.in_index, gibs.order)
        stats = len(gibs.bs_index)
    for gelu in (False, True):
        running = (
            [_randn(stats, seed=4).to(dtype), _randn(stats, seed=5).abs().add(0.5).to(dtype)] if stats else [None, None]
        )
        pristine = [t.clone() if t is not None else None for t in running]

        def fn(x, bias, running=running, gelu=gelu):
            running = [r.to(x.dtype) if r is not None else None for r in running]  # copies: updates are checked below
            return ops.standardize(x, channels, *running, use_batch_stats=training, gelu=gelu, bias=bias)

        _compare(fn, [x, bias], dtype)
        if stats and training:  # both paths update their running statistics alike
            fused_running = [t.clone() for t in pristine]
            ops.standardize(x.detach().to(dtype), channels, *fused_running, use_batch_stats=True)
            with _reference_backend():
                ref_running = [t.clone() for t in pristine]
                ops.standardize(x.detach().to(dtype), channels, *ref_running, use_batch_stats=True)
            for a, b in zip(fused_running, ref_running):
                torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@requires_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch,spatial", [(3, (9,)), (3, (6, 7)), (40, (9,)), (100, (13,))])
def test_rgu_matches_its_composition(dtype, batch, spatial):
    """Batches above 16 put several short planes side by side in the backward's blocks."""
    torch.manual_seed(0)
    rgu = RGU(len(spatial), 5, spatial).double()
    with torch.no_grad():
        rgu.bias_map.normal_()
    u = _randn(batch, 5, *spatial).requires_grad_()
    params = list(rgu.weights())
    _compare(lambda u, *w: ops.rgu(u, ops.RguWeights(*w)), [u, *params], dtype)


def _local_kernel_args(data_dim, spatial, kernel, channels, context):
    torch.manual_seed(0)
    net = SlowNetL(data_dim, channels, kernel, hidden=8, local_context=context).double()
    with torch.no_grad():
        net.magnet.bias_map.normal_()
        net.renorm_beta.normal_()
    return net


@requires_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("data_dim,spatial,kernel", [(1, (40,), 7), (2, (9, 8), 3), (2, (28, 28), 9)])
@pytest.mark.parametrize("context", ["sample", "batch"])
def test_local_kernel_matches_its_composition(dtype, data_dim, spatial, kernel, context):
    net = _local_kernel_args(data_dim, spatial, kernel, 3, context)
    u = _randn(4, 3, *spatial).requires_grad_()
    names = [n for n, _ in net.named_parameters()] + [n for n, _ in net.named_buffers()]
    tensors = list(net.parameters()) + list(net.buffers())  # the coordinates follow the dtype too

    def fn(u, *p):
        return torch.func.functional_call(net, dict(zip(names, p)), (u,))

    _compare(fn, [u, *tensors], dtype)


@requires_compiled
def test_local_kernel_differentiates_coordinates_that_require_grad():
    net = _local_kernel_args(1, (20,), 5, 3, "sample")
    u = _randn(2, 3, 20).requires_grad_()
    context = net.context.weights(net.renorm_alpha, net.renorm_beta)
    coords = net.magnet.coords.clone().requires_grad_()
    magnet = net.magnet.weights()._replace(coords=coords)

    def fn(u, coords):
        return ops.local_kernel(u, (5,), magnet._replace(coords=coords), context)

    _compare(fn, [u, coords], torch.float64)
    g_coords = torch.autograd.grad(ops.local_kernel(u, (5,), magnet, context).square().sum(), coords)[0]
    assert g_coords.abs().max() > 0


@requires_compiled
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("spatial", [(40,), (5, 7)])
@pytest.mark.parametrize("has_x,has_ks", [(False, False), (True, True), (False, True)])
def test_hyper_interaction_matches_its_composition(dtype, spatial, has_x, has_ks):
    y = _randn(3, 4, *spatial).requires_grad_()
    x = _randn(3, 4, *spatial, seed=2).requires_grad_() if has_x else None
    k_c = _randn(1, 4, seed=3).requires_grad_()
    k_s = _randn(1, *spatial, seed=4).requires_grad_() if has_ks else None
    inputs = [t for t in (y, x, k_c, k_s) if t is not None]

    def fn(*ts):
        it = iter(ts)
        return ops.hyper_interaction(next(it), next(it) if has_x else None, next(it), next(it) if has_ks else None)

    _compare(fn, inputs, dtype)


@requires_compiled
def test_second_derivatives_through_the_fused_layers():
    torch.manual_seed(0)
    x = _randn(3, 2, 5).requires_grad_()
    w = _randn(3, 2).requires_grad_()
    torch.autograd.gradgradcheck(lambda x, w: ops.pointwise([x], w), (x, w))
    torch.autograd.gradgradcheck(lambda x: ops.standardize(x, "batch", gelu=True), (x,))
    rgu = RGU(1, 2, 5).double()
    torch.autograd.gradgradcheck(lambda u, *w: ops.rgu(u, ops.RguWeights(*w)), (x, *rgu.weights()))
    k_c, k_s = _randn(1, 2).requires_grad_(), _randn(1, 5).requires_grad_()
    torch.autograd.gradgradcheck(lambda y, a, b: ops.hyper_interaction(y, None, a, b), (x, k_c, k_s))
    net = _local_kernel_args(1, (5,), 3, 2, "sample")
    torch.autograd.gradcheck(lambda u: net(u), (x,))
    torch.autograd.gradgradcheck(lambda u: net(u), (x,))


@requires_compiled
def test_raw_ops_pass_opcheck():
    x = _randn(2, 3, 5, dtype=torch.float32).requires_grad_()
    w = _randn(4, 3, dtype=torch.float32).requires_grad_()
    t = torch.ops.terminator
    torch.library.opcheck(t.pointwise.default, ([x], w, None))
    torch.library.opcheck(t.standardize.default, (x, torch.arange(3), None, None, True, 1e-5, True, None))
    torch.library.opcheck(t.hyper_interaction.default, (x, None, _randn(1, 3, dtype=torch.float32), None))
    rgu = RGU(1, 3, 5)
    torch.library.opcheck(t.rgu.default, (x, *rgu.weights()))


@requires_compiled
def test_fused_layers_do_not_depend_on_the_thread_count():
    """Each fused kernel sums in a fixed order (chunks fixed by the shapes): bitwise the same
    results for one thread and two."""
    torch.manual_seed(0)
    x = torch.randn(40, 6, 28, 28)
    rgu, local = RGU(2, 6, (28, 28)), SlowNetL(2, 6, 5, hidden=8)
    gibs = GIBS(6, groups=3)

    def run():
        leaves = [x.clone().requires_grad_(), *[p for m in (rgu, local) for p in m.parameters()]]
        for p in leaves[1:]:
            p.grad = None
        u = leaves[0]
        out = ops.rgu(u, rgu.weights()) + ops.pointwise([u, u], torch.ones(6, 12) / 12)
        out = gibs(out, gelu=True) * ops.hyper_interaction(u, None, torch.ones(1, 6), torch.ones(1, 28, 28))
        loss = out.square().sum() + local(u).square().sum()
        return torch.autograd.grad(loss, leaves)

    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        one = run()
        torch.set_num_threads(2)
        two = run()
    finally:
        torch.set_num_threads(threads)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@requires_compiled
def test_bad_arguments_name_the_argument():
    x = _randn(2, 3, 5, dtype=torch.float32)
    with pytest.raises(ValueError, match=r"weight must have shape \(any, 3\)"):
        ops.pointwise([x], _randn(4, 2, dtype=torch.float32))
    with pytest.raises(ValueError, match="weight must have shape"):
        torch.ops.terminator.pointwise([x], _randn(4, 2, dtype=torch.float32), None)
    with pytest.raises(ValueError, match="running_mean must have shape"):
        ops.standardize(x, "batch", torch.zeros(2), torch.ones(2))
    with pytest.raises(ValueError, match="batch_channels must list distinct channels"):
        torch.ops.terminator.standardize(x, torch.tensor([0, 0]), None, None, True, 1e-5, False, None)
    with pytest.raises(ValueError, match="k_c must have shape"):
        ops.hyper_interaction(x, None, torch.zeros(1, 4))
    with pytest.raises(ValueError, match="bias_map must have the spatial shape"):
        rgu = RGU(1, 3, 4)
        ops.rgu(x, rgu.weights())
    with pytest.raises(ValueError, match="must be float32 or float64"):
        torch.ops.terminator.pointwise([x.half()], _randn(4, 3).half(), None)


# ---- the whole network ----------------------------------------------------------------------


def _network_run(model, x, y, train):
    from terminator.losses import TerminatorLoss

    model.zero_grad()
    model.train(train)
    torch.manual_seed(5)  # the same dropout masks
    if not train:
        with torch.no_grad():
            return [model(x)]
    logits, kernels = model(x, return_kernels=True)
    TerminatorLoss()(model, logits, y, kernels).total.backward()
    return [logits.detach()] + [p.grad.clone() for p in model.parameters()]


@requires_compiled
@pytest.mark.parametrize("preset", ["fmnist", "fmnist-patch", "seq784", "mnist1d", "cifar10"])
@pytest.mark.parametrize("train", [True, False])
def test_network_matches_the_reference_backend(preset, train):
    """Outputs and every parameter's gradient: fused against the network's reference
    compositions, float64 to rounding and float32 within a few times the reference's own
    float32 error (both against the float64 reference)."""
    torch.manual_seed(0)
    base = Terminator.from_preset(preset).double()
    batch = 2 if preset == "cifar10" else 4
    x = torch.randn(batch, base.config.channels[0], *base.config.size, dtype=torch.float64)
    y = torch.randint(0, 10, (batch,))
    results = {}
    for dtype in (torch.float64, torch.float32):
        for backend in ("fused", "reference"):
            model = copy.deepcopy(base).to(dtype)
            if backend == "reference":
                with _reference_backend():
                    results[dtype, backend] = _network_run(model, x.to(dtype), y, train)
            else:
                results[dtype, backend] = _network_run(model, x.to(dtype), y, train)
    exact = results[torch.float64, "reference"]
    floor = max(t.abs().max().item() for t in exact[1:]) if train else 0.0  # for gradients that are 0
    for i, e in enumerate(exact):
        scale = e.abs().max().item()
        a64 = results[torch.float64, "fused"][i]
        assert (a64 - e).abs().max().item() <= 1e-9 * scale + 1e-12 * floor, (preset, i)
        ours = (results[torch.float32, "fused"][i].double() - e).abs().max().item()
        theirs = (results[torch.float32, "reference"][i].double() - e).abs().max().item()
        assert ours <= 4 * theirs + 8e-6 * scale + 1e-6 * floor, (preset, i, ours, theirs, scale)
