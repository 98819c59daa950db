"""Every op against terminator.ops.reference: values, gradients, dtypes, layouts.

Runs on whichever backend is active (C++ by default; TERMINATOR_BACKEND=reference
runs the same tests on the pure-PyTorch fallback).
"""

from __future__ import annotations

import pytest
import torch
from helpers import (
    check_against_reference,
    conv_inputs,
    global_inputs,
    global_ref,
    run_with_grads,
)
from hypothesis import given
from hypothesis import strategies as st

import terminator.ops as ops
from terminator.ops import reference

KERNEL_FORMS = ["C", "1C", "BC"]
EXACT_DTYPES = [torch.float64, torch.float32]
HALF_DTYPES = [torch.float16, torch.bfloat16]


def ours_global(mode):
    return lambda k, z, x: ops.hyperzzw_global(k, z, x, mode=mode)


def ours_conv(algo):
    return lambda x, w: ops.hyperkernel_conv(x, w, algo=algo)


@st.composite
def global_cases(draw):
    dim = draw(st.sampled_from([1, 2]))
    mode = draw(st.sampled_from(["dot", "conv", "matmul"] if dim == 2 else ["dot", "conv"]))
    if dim == 1:
        spatial = (draw(st.integers(1, 40)),)
    else:
        h = draw(st.integers(1, 12))
        spatial = (h, h if mode == "matmul" else draw(st.integers(1, 12)))
    return dict(
        batch=draw(st.integers(0, 3)),
        channels=draw(st.integers(1, 4)),
        spatial=spatial,
        form=draw(st.sampled_from(KERNEL_FORMS)),
        has_x=draw(st.booleans()),
        mode=mode,
        seed=draw(st.integers(0, 2**16)),
    )


@st.composite
def conv_cases(draw):
    dim = draw(st.sampled_from([1, 2]))
    spatial = tuple(draw(st.integers(1, 40 if dim == 1 else 12)) for _ in range(dim))
    kernel = tuple(draw(st.integers(1, s)) for s in spatial)
    return dict(
        batch=draw(st.integers(0, 3)),
        channels=draw(st.integers(1, 4)),
        spatial=spatial,
        kernel=kernel,
        form=draw(st.sampled_from(KERNEL_FORMS)),
        algo=draw(st.sampled_from(["auto", "direct", "fft"])),
        seed=draw(st.integers(0, 2**16)),
    )


# ---- values and gradients against the reference ----------------------------------


@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@given(case=global_cases())
def test_global_matches_reference(case, dtype):
    k, z, x = global_inputs(
        case["batch"], case["channels"], case["spatial"], case["form"], case["has_x"], dtype, case["seed"]
    )
    check_against_reference(ours_global(case["mode"]), global_ref(case["mode"]), (k, z, x), "kzx", dtype)


@pytest.mark.parametrize("dtype", EXACT_DTYPES)
@given(case=conv_cases())
def test_conv_matches_reference(case, dtype):
    x, w = conv_inputs(
        case["batch"], case["channels"], case["spatial"], case["kernel"], case["form"], dtype, case["seed"]
    )
    check_against_reference(ours_conv(case["algo"]), reference.conv_same, (x, w), "xw", dtype)


# The network's real sizes: 28×28 and 32×32 images, 784- and 40-long sequences.
REAL_SIZES = [(2, 3, (28, 28)), (2, 3, (32, 32)), (2, 3, (784,)), (3, 2, (40,))]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("batch,channels", [(42, 1), (9, 3), (40, 31), (8, 32)])
def test_shared_kernel_gradients_with_few_channels(batch, channels, dtype):
    """With fewer than 32 channels a shared kernel's gradient sums the batch in chunks of
    at least 4 samples (csrc/cpu/parallel.h, shared_batch_chunks): 42 samples with one
    channel as 8 chunks of 5 and one of 2, 9 samples with 3 as 5 + 4, 40 with 31 as
    20 + 20; 32 channels take one chunk."""
    k, z, x = global_inputs(batch, channels, (12, 12), "1C", True, dtype, seed=3)
    check_against_reference(ours_global("matmul"), global_ref("matmul"), (k, z, x), "kzx", dtype)
    for kernel in [(5, 3), (3, 3)]:  # 3×3: both gradients in one pass
        x, w = conv_inputs(batch, channels, (12, 13), kernel, "C", dtype, seed=3)
        check_against_reference(ours_conv("direct"), reference.conv_same, (x, w), "xw", dtype)


@pytest.mark.parametrize("dtype", EXACT_DTYPES + HALF_DTYPES)
@pytest.mark.parametrize("batch,channels,spatial", REAL_SIZES)
@pytest.mark.parametrize("mode", ["dot", "matmul", "conv"])
@pytest.mark.parametrize("has_x", [False, True])
def test_global_real_sizes_and_dtypes(batch, channels, spatial, mode, has_x, dtype):
    if mode == "matmul" and len(spatial) == 1:
        pytest.skip("matmul is 2D only")
    for form in KERNEL_FORMS:
        k, z, x = global_inputs(batch, channels, spatial, form, has_x, dtype, seed=1)
        check_against_reference(ours_global(mode), global_ref(mode), (k, z, x), "kzx", dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("side", [3, 5, 17, 28, 40, 63, 64, 65])
@pytest.mark.parametrize("form", KERNEL_FORMS)
def test_global_matmul_vector_spans_and_the_fused_kernels_limit(side, form, dtype):
    """The CPU kernel multiplies planes up to 64×64 itself and hands larger ones to ATen.

    Its GEMM works in whole vectors per row, the last one running into the next row when
    the side is not a multiple of the vector's lanes. With AVX-512's 64-byte vectors: one
    vector for several rows (5), two with a spill (17, 28), three (40: a single-vector group
    before a pair), four (63 with a spill, 64 without); float64 has half the lanes. CI runs
    this file against AVX2 and SSE2 builds too (32- and 16-byte vectors, where 3 is one vector
    for several rows too in float32). float16 and bfloat16 planes are converted a vector at a
    time and the rest one by one: side² leaves every remainder.
    """
    k, z, x = global_inputs(2, 2, (side, side), form, True, dtype, seed=2)
    check_against_reference(ours_global("matmul"), global_ref("matmul"), (k, z, x), "kzx", dtype)
    check_against_reference(ours_global("matmul"), global_ref("matmul"), (k, z, None), "kz", dtype)


@pytest.mark.parametrize("form", ["BC", "C"])
@pytest.mark.parametrize("dtype", EXACT_DTYPES + HALF_DTYPES)
@pytest.mark.parametrize("width", [3, 16, 17, 28, 33, 40])
@pytest.mark.parametrize("height", [3, 4, 5, 6, 7, 9, 13])
def test_direct_3x3_one_pass_backward_tile_edges(height, width, dtype, form):
    """A 3×3 kernel's backward, per-sample or shared, takes both gradients in one pass over
    tiles of 4 rows × 2 vectors (2 × 1 with 16 registers), the rows left over one at a
    time, the last vector of a row partly past W (csrc/cpu/conv_direct_backward.cpp,
    backward_plane_fused): heights leave 0 to 3 rows, widths one vector or several, full
    or not, at every vector width CI builds for."""
    x, w = conv_inputs(2, 3, (height, width), (3, 3), form, dtype, seed=4)
    check_against_reference(ours_conv("direct"), reference.conv_same, (x, w), "xw", dtype)


@pytest.mark.parametrize("form", ["BC", "C"])
@pytest.mark.parametrize("dtype", EXACT_DTYPES + HALF_DTYPES)
@pytest.mark.parametrize("size", [3, 5, 7, 9])
@pytest.mark.parametrize("length", [3, 9, 16, 17, 40, 64, 65, 100, 130])
def test_direct_1d_one_pass_backward_tile_edges(length, size, dtype, form):
    """1D kernels of 3 to 9 taps take both gradients in one pass too, in tiles of one row
    × 4 vectors (2 with 16 registers), the rest one vector at a time, the last one partly
    past the end: lengths of one vector or several, whole tiles or not, at every vector
    width CI builds for."""
    if size > length:
        pytest.skip("kernel longer than the input")
    x, w = conv_inputs(2, 3, (length,), (size,), form, dtype, seed=5)
    check_against_reference(ours_conv("direct"), reference.conv_same, (x, w), "xw", dtype)


@pytest.mark.parametrize("dtype", EXACT_DTYPES + HALF_DTYPES)
@pytest.mark.parametrize("batch,channels,spatial", REAL_SIZES)
@pytest.mark.parametrize("size", [1, 2, 3, 7, 9])
@pytest.mark.parametrize("algo", ["auto", "direct", "fft"])
def test_conv_real_sizes_and_dtypes(batch, channels, spatial, size, algo, dtype):
    kernel = tuple(min(size, s) for s in spatial)
    for form in KERNEL_FORMS:
        x, w = conv_inputs(batch, channels, spatial, kernel, form, dtype, seed=2)
        check_against_reference(ours_conv(algo), reference.conv_same, (x, w), "xw", dtype)


@pytest.mark.parametrize("algo", ["direct", "fft"])
def test_direct_and_fft_agree_on_full_size_kernels(algo):
    x, w = conv_inputs(2, 3, (28, 28), (28, 28), "BC", torch.float64, seed=3)
    check_against_reference(ours_conv(algo), reference.conv_same, (x, w), "xw", torch.float64)


# ---- layouts: any strides give the values of contiguous inputs ---------------------


def _layouts(t: torch.Tensor) -> dict[str, torch.Tensor]:
    """Views of t's values with other strides."""
    views = {
        "sliced": torch.stack([t, torch.full_like(t, float("nan"))], dim=-1)[..., 0],
        "transposed": t.transpose(-1, -2).contiguous().transpose(-1, -2) if t.dim() >= 2 else t,
    }
    if t.dim() == 4:
        views["channels_last"] = t.contiguous(memory_format=torch.channels_last)
    return views


@pytest.mark.parametrize("spatial", [(6, 5), (5, 5), (9,)])
@pytest.mark.parametrize("mode", ["dot", "matmul", "conv"])
def test_global_any_strides(spatial, mode):
    if mode == "matmul" and (len(spatial) != 2 or spatial[0] != spatial[1]):
        pytest.skip("matmul needs 2D with H == W")
    k, z, x = global_inputs(3, 4, spatial, "1C", True, torch.float64, seed=4)
    expected = ops.hyperzzw_global(k, z, x, mode=mode)
    for name, kv in _layouts(k).items():
        for name_z, zv in _layouts(z).items():
            got = ops.hyperzzw_global(kv, zv, _layouts(x)[name], mode=mode)
            torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13, msg=f"k {name}, z {name_z}")
            assert got.is_contiguous(), f"k {name}, z {name_z}: strides {got.stride()}"  # as documented
    # An expanded kernel (stride 0 over the batch) and expanded activations.
    got = ops.hyperzzw_global(k.expand(3, *k.shape[1:]), z[:1].expand_as(z), x, mode=mode)
    torch.testing.assert_close(
        got, ops.hyperzzw_global(k.expand(3, *k.shape[1:]).contiguous(), z[:1].expand_as(z).contiguous(), x, mode=mode)
    )


@pytest.mark.parametrize("spatial,kernel", [((7, 6), (3, 4)), ((11,), (5,))])
@pytest.mark.parametrize("algo", ["direct", "fft"])
def test_conv_any_strides(spatial, kernel, algo):
    x, w = conv_inputs(3, 4, spatial, kernel, "BC", torch.float64, seed=5)
    expected = ops.hyperkernel_conv(x, w, algo=algo)
    for name, xv in _layouts(x).items():
        for name_w, wv in _layouts(w).items():
            got = ops.hyperkernel_conv(xv, wv, algo=algo)
            torch.testing.assert_close(got, expected, rtol=1e-13, atol=1e-13, msg=f"x {name}, w {name_w}")
            assert got.is_contiguous(), f"x {name}, w {name_w}: strides {got.stride()}"  # as documented
    shared = w[:1]
    got = ops.hyperkernel_conv(x, shared.expand_as(w), algo=algo)
    torch.testing.assert_close(got, ops.hyperkernel_conv(x, shared, algo=algo), rtol=1e-13, atol=1e-13)


def test_expanded_input_gradient_is_reduced():
    """A kernel broadcast by expand gets its gradient summed over the batch."""
    k, z, x = global_inputs(4, 3, (5, 5), "1C", True, torch.float64, seed=6)
    k1 = k.clone().requires_grad_()
    k2 = k.clone().requires_grad_()
    ops.hyperzzw_global(k1.expand(4, -1, -1, -1), z, x, mode="conv").sum().backward()
    ops.hyperzzw_global(k2, z, x, mode="conv").sum().backward()
    torch.testing.assert_close(k1.grad, k2.grad)


@pytest.mark.parametrize("has_x", [True, False])
@pytest.mark.parametrize("length", [*range(1, 18), 40, 100])
@pytest.mark.parametrize("dtype", HALF_DTYPES)
def test_dot_half_types_round_each_product_once(compiled, dtype, length, has_x):
    """float16 and bfloat16 dot convert whole vectors at a time (F16C; bfloat16 by bit
    shifts and c10's rounding) and the rest one by one: either way each product is taken
    in float32 and rounded once, as torch's own float32 arithmetic gives it, exactly,
    infinities, NaN, subnormals and overflow included. Lengths across the vector widths
    (4, 8, 16 lanes) leave every tail size."""
    gen = torch.Generator().manual_seed(length)
    z = (torch.randn(3, 2, length, generator=gen) * 4).to(dtype)
    x = (torch.randn(3, 2, length, generator=gen) * 4).to(dtype) if has_x else None
    k = (torch.randn(2, length, generator=gen) * 4).to(dtype)
    gy = torch.randn(3, 2, length, generator=gen).to(dtype)
    z.view(-1)[0], z.view(-1)[-1] = float("inf"), float("nan")
    # A subnormal; a product past the largest finite value.
    tiny, huge = (6e-8, 60000.0) if dtype == torch.float16 else (1e-40, 3e38)
    k.view(-1)[-1], z.view(-1)[length // 2] = tiny, huge
    u = (x if has_x else z).float()
    y = ops.hyperzzw_global(k, z, x, mode="dot")
    exact = dict(rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(y, (k.float() * z.float() * u).to(dtype), **exact)
    gk, gz, gx = torch.ops.terminator.hyperzzw_global_backward(gy, k, z, x, "dot")
    g = gy.float()
    if has_x:
        torch.testing.assert_close(gz, (g * k.float() * u).to(dtype), **exact)
        torch.testing.assert_close(gx, (g * k.float() * z.float()).to(dtype), **exact)
    else:
        torch.testing.assert_close(gz, (2 * g * k.float() * z.float()).to(dtype), **exact)
    # gk sums over the batch (possibly with fused multiply-adds): close, not exact.
    rtol = 2e-3 if dtype == torch.float16 else 1e-2  # (bfloat16 keeps 8 bits)
    torch.testing.assert_close(gk, (g * z.float() * u).sum(0).to(dtype), rtol=rtol, atol=1e-3, equal_nan=True)


# ---- what autograd keeps -------------------------------------------------------------


def _saved_while(run):
    """The tensors autograd saves for backward while run() builds the graph."""
    saved = []

    def pack(t):
        saved.append(t)
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return saved, out


@pytest.mark.parametrize("mode", ["dot", "matmul", "conv"])
def test_global_saves_only_its_inputs_for_backward(compiled, mode):
    """dot keeps nothing for backward beyond its inputs (nor do matmul and conv):
    no product, spectrum or copy stays alive from forward to backward."""
    k, z, x = (t.requires_grad_() for t in global_inputs(4, 3, (6, 6), "C", True, torch.float32, seed=2))
    saved, y = _saved_while(lambda: ops.hyperzzw_global(k, z, x, mode=mode))
    assert sorted(t.data_ptr() for t in saved) == sorted(t.data_ptr() for t in (k, z, x))
    y.sum().backward()
    assert all(t.grad is not None for t in (k, z, x))


@pytest.mark.parametrize("algo", ["direct", "fft"])
def test_conv_saves_only_its_inputs_for_backward(compiled, algo):
    x, w = (t.requires_grad_() for t in conv_inputs(2, 3, (7, 7), (3, 3), "BC", torch.float32, seed=2))
    saved, y = _saved_while(lambda: ops.hyperkernel_conv(x, w, algo=algo))
    assert sorted(t.data_ptr() for t in saved) == sorted(t.data_ptr() for t in (x, w))


# ---- empty batches -------------------------------------------------------------------


@pytest.mark.parametrize("form", KERNEL_FORMS)
@pytest.mark.parametrize("mode", ["dot", "matmul", "conv"])
def test_global_empty_batch(form, mode):
    k, z, x = global_inputs(0, 3, (4, 4), form, True, torch.float32, seed=7)
    k.requires_grad_(), z.requires_grad_(), x.requires_grad_()
    y = ops.hyperzzw_global(k, z, x, mode=mode)
    assert y.shape == (0, 3, 4, 4)
    y.sum().backward()
    assert k.grad.shape == k.shape and torch.all(k.grad == 0)
    assert z.grad.shape == z.shape and x.grad.shape == x.shape


@pytest.mark.parametrize("mode", ["dot", "conv"])
@pytest.mark.parametrize("shape", [(2, 0, 5, 5), (2, 3, 0, 0), (2, 0, 7), (2, 3, 0)])
def test_global_empty_channels_or_space(mode, shape):
    """C = 0 or a spatial size of 0: an empty result and empty gradients, as the reference."""
    z = torch.randn(shape, requires_grad=True)
    k = torch.randn(shape[1:], requires_grad=True)
    y = ops.hyperzzw_global(k, z, mode=mode)
    expected = reference.hyperzzw_global(k.detach(), z.detach(), mode=mode)
    assert y.shape == expected.shape == shape
    y.sum().backward()
    assert k.grad.shape == k.shape and z.grad.shape == z.shape


@pytest.mark.parametrize("form", KERNEL_FORMS)
@pytest.mark.parametrize("algo", ["direct", "fft"])
def test_conv_empty_batch(form, algo):
    x, w = conv_inputs(0, 2, (9,), (3,), form, torch.float32, seed=8)
    x.requires_grad_(), w.requires_grad_()
    y = ops.hyperkernel_conv(x, w, algo=algo)
    assert y.shape == (0, 2, 9)
    y.sum().backward()
    assert w.grad.shape == w.shape and torch.all(w.grad == 0)


# ---- float64 gradcheck of every input, and of the gradients themselves --------------

GRADCHECK_GLOBAL = [
    (mode, spatial, form, has_x)
    for mode, spatial in [("dot", (5,)), ("dot", (3, 4)), ("conv", (6,)), ("conv", (4, 3)), ("matmul", (3, 3))]
    for form in KERNEL_FORMS
    for has_x in (False, True)
]


@pytest.mark.parametrize("mode,spatial,form,has_x", GRADCHECK_GLOBAL)
def test_global_gradcheck(mode, spatial, form, has_x):
    for seed in range(2):
        k, z, x = global_inputs(2, 2, spatial, form, has_x, torch.float64, seed)
        inputs = [t.requires_grad_() for t in (k, z, x) if t is not None]
        fn = (
            (lambda k, z, x: ops.hyperzzw_global(k, z, x, mode=mode))
            if has_x
            else (lambda k, z: ops.hyperzzw_global(k, z, mode=mode))
        )
        assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("algo", ["direct", "fft"])
@pytest.mark.parametrize("spatial,kernel", [((7,), (4,)), ((5, 6), (3, 2)), ((5, 6), (3, 3)), ((4, 4), (4, 4))])
@pytest.mark.parametrize("form", KERNEL_FORMS)
def test_conv_gradcheck(algo, spatial, kernel, form):
    for seed in range(2):
        x, w = conv_inputs(2, 2, spatial, kernel, form, torch.float64, seed)
        fn = lambda x, w: ops.hyperkernel_conv(x, w, algo=algo)  # noqa: E731
        assert torch.autograd.gradcheck(fn, (x.requires_grad_(), w.requires_grad_()))


@pytest.mark.parametrize("mode", ["dot", "matmul", "conv"])
def test_global_gradgradcheck(mode):
    k, z, x = global_inputs(2, 2, (3, 3), "1C", True, torch.float64, seed=9)
    fn = lambda k, z, x: ops.hyperzzw_global(k, z, x, mode=mode)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, [t.requires_grad_() for t in (k, z, x)])
    fn_zz = lambda k, z: ops.hyperzzw_global(k, z, mode=mode)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn_zz, [k, z])


@pytest.mark.parametrize("algo", ["direct", "fft"])
def test_conv_gradgradcheck(algo):
    x, w = conv_inputs(2, 2, (5, 4), (3, 2), "C", torch.float64, seed=10)
    fn = lambda x, w: ops.hyperkernel_conv(x, w, algo=algo)  # noqa: E731
    assert torch.autograd.gradgradcheck(fn, (x.requires_grad_(), w.requires_grad_()))


# ---- the dispatcher: opcheck and torch.compile ----------------------------------------


def _opcheck_samples():
    for mode, spatial in [("dot", (5,)), ("dot", (4, 3)), ("conv", (5, 4)), ("matmul", (4, 4)), ("conv", (7,))]:
        for form in KERNEL_FORMS:
            for has_x in (False, True):
                k, z, x = global_inputs(2, 3, spatial, form, has_x, torch.float32, seed=11)
                yield "hyperzzw_global", (k, z, x, mode)
    for algo in ["direct", "fft", "auto"]:
        for form in KERNEL_FORMS:
            x, w = conv_inputs(2, 3, (6, 5), (3, 2), form, torch.float32, seed=12)
            yield "hyperkernel_conv", (x, w, algo)
    k, z, x = global_inputs(0, 3, (4, 4), "C", True, torch.float32, seed=13)
    yield "hyperzzw_global", (k, z, x, "dot")


@pytest.mark.parametrize("requires_grad", [False, True])
def test_opcheck(compiled, requires_grad):
    for name, args in _opcheck_samples():
        args = tuple(a.clone().requires_grad_(requires_grad) if isinstance(a, torch.Tensor) else a for a in args)
        torch.library.opcheck(getattr(torch.ops.terminator, name).default, args)


def test_opcheck_backward_ops(compiled):
    k, z, x = global_inputs(2, 3, (4, 4), "1C", True, torch.float32, seed=14)
    for mode in ["dot", "matmul", "conv"]:
        torch.library.opcheck(
            torch.ops.terminator.hyperzzw_global_backward.default, (torch.randn_like(z), k, z, x, mode)
        )
        torch.library.opcheck(
            torch.ops.terminator.hyperzzw_global_backward.default, (torch.randn_like(z), k, z, None, mode)
        )
    x, w = conv_inputs(2, 3, (6, 5), (3, 2), "C", torch.float32, seed=15)
    for algo in ["direct", "fft"]:
        torch.library.opcheck(torch.ops.terminator.hyperkernel_conv_backward.default, (torch.randn_like(x), x, w, algo))


class _TinyHyperNet(torch.nn.Module):
    """Every op and mode in one small differentiable model."""

    def __init__(self, channels: int, size: int):
        super().__init__()
        gen = torch.Generator().manual_seed(16)
        self.k = torch.nn.Parameter(torch.randn(channels, size, size, generator=gen))
        self.w = torch.nn.Parameter(torch.randn(1, channels, 3, 3, generator=gen))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        a = ops.hyperzzw_global(self.k, z, mode="dot")
        b = ops.hyperzzw_global(self.k, torch.tanh(a), z, mode="matmul")
        c = ops.hyperzzw_global(self.k, torch.tanh(b), mode="conv")
        return ops.hyperkernel_conv(torch.tanh(c), self.w, algo="direct") + ops.hyperkernel_conv(c, self.w, algo="fft")


def test_torch_compile_fullgraph_matches_eager():
    torch._dynamo.reset()
    model = _TinyHyperNet(3, 6).double()
    compiled_model = torch.compile(model, fullgraph=True)
    z = torch.randn(2, 3, 6, 6, dtype=torch.float64, requires_grad=True)
    eager_out = model(z)
    eager_grads = torch.autograd.grad(eager_out.square().sum(), [z, model.k, model.w])
    comp_out = compiled_model(z)
    comp_grads = torch.autograd.grad(comp_out.square().sum(), [z, model.k, model.w])
    torch.testing.assert_close(comp_out, eager_out)
    for a, b in zip(comp_grads, eager_grads):
        torch.testing.assert_close(a, b)


# ---- outputs of 32 MiB or more ------------------------------------------------------
# The CPU kernels advise transparent huge pages on outputs this large before writing
# them (fresh mappings whose 4 KiB first-touch faults cost more than dot itself).


@pytest.mark.parametrize("form", ["1C", "BC"])
def test_outputs_past_the_huge_page_threshold(form):
    spatial = (2**21 + 5,)  # B·C·L·4 bytes = 32 MiB + 80 bytes per float32 tensor
    k, z, x = global_inputs(2, 2, spatial, form, True, torch.float32, seed=7)
    check_against_reference(ours_global("dot"), global_ref("dot"), (k, z, x), "kzx", torch.float32)
    x, w = conv_inputs(2, 2, spatial, (3,), form, torch.float32, seed=8)
    check_against_reference(ours_conv("direct"), reference.hyperkernel_conv, (x, w), "xw", torch.float32)


# ---- the FFT path in batch chunks -------------------------------------------------
# Large planes go through the FFT a few samples at a time (in float64, the spectra of
# one sample of 64 channels at 40×40 with a full-size kernel fill a chunk, so a batch
# of 3 is three chunks): no sample may see another's data, and a shared kernel's
# gradient sums every chunk.


@pytest.mark.parametrize("form", KERNEL_FORMS)
def test_fft_path_in_batch_chunks_matches_direct(form):
    x, w = conv_inputs(3, 64, (40, 40), (40, 40), form, torch.float64, seed=4)
    grad_y = torch.randn(x.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    fft = run_with_grads(ours_conv("fft"), (x, w), grad_y)
    direct = run_with_grads(ours_conv("direct"), (x, w), grad_y)
    for a, b in zip(fft, direct):
        torch.testing.assert_close(a, b, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("form", KERNEL_FORMS)
def test_global_conv_in_batch_chunks_matches_reference(form):
    k, z, x = global_inputs(3, 64, (40, 40), form, True, torch.float64, seed=6)
    check_against_reference(ours_global("conv"), global_ref("conv"), (k, z, x), "kzx", torch.float64)
