"""The public ops and the network on a CUDA device, against the float64 reference on the
CPU: float32/float16/bfloat16, odd sizes, empty batches, non-contiguous inputs, every mode
and algorithm. Skipped without a GPU (tools/gpu_check.sh runs them where there is one)."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close_scaled, reference_and_scale, run_with_grads

import terminator.ops as ops
from terminator.ops import reference

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(shapes, dtype, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=gen, dtype=torch.float64).to(dtype) if s is not None else None for s in shapes]


def _check(ours, ref, tensors, dtype, tol_dtype=None, transpose_last=False):
    out_shape = ref(*[t.double() if t is not None else None for t in tensors]).shape
    grad_y = torch.randn(out_shape, generator=torch.Generator().manual_seed(9), dtype=torch.float64).to(dtype)
    expected, scale = reference_and_scale(ref, tensors, grad_y)

    def on_device(t):
        if t is None:
            return None
        t = t.cuda()
        # non-contiguous: the same values through a transposed copy
        return t.transpose(-1, -2).contiguous().transpose(-1, -2) if transpose_last and t.dim() >= 2 else t

    actual = run_with_grads(ours, [on_device(t) for t in tensors], grad_y.cuda())
    for a, e, s in zip(actual, expected, scale):
        assert a.is_cuda and a.dtype == dtype
        assert_close_scaled(a.cpu().to(tol_dtype or dtype), e, s, tol_dtype or dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize(
    "mode,spatial", [("dot", (7, 9)), ("dot", (301,)), ("matmul", (9, 9)), ("conv", (7, 9)), ("conv", (61,))]
)
@pytest.mark.parametrize("form,has_x", [("C", False), ("BC", True), ("1C", False)])
def test_global_on_cuda(dtype, mode, spatial, form, has_x):
    B, C = 3, 5
    k_shape = {"C": (C, *spatial), "1C": (1, C, *spatial), "BC": (B, C, *spatial)}[form]
    k, z, x = _inputs([k_shape, (B, C, *spatial), (B, C, *spatial) if has_x else None], dtype, 1)
    tol = torch.float32 if mode == "conv" and dtype == torch.float32 else None
    _check(
        lambda k, z, x: ops.hyperzzw_global(k, z, x, mode=mode),
        lambda k, z, x: reference.hyperzzw_global(k, z, x, mode=mode),
        [k, z, x],
        dtype,
        tol,
        transpose_last=True,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("algo", ["direct", "fft", "auto"])
@pytest.mark.parametrize("spatial,kernel", [((7, 9), (3, 4)), ((61,), (9,)), ((28, 28), (7, 7))])
@pytest.mark.parametrize("shared", [False, True])
def test_hyperkernel_conv_on_cuda(dtype, algo, spatial, kernel, shared):
    B, C = 3, 4
    x, w = _inputs([(B, C, *spatial), (C, *kernel) if shared else (B, C, *kernel)], dtype, 2)
    _check(
        lambda x, w: ops.hyperkernel_conv(x, w, algo=algo),
        reference.hyperkernel_conv,
        [x, w],
        dtype,
        transpose_last=True,
    )


def test_empty_batch_on_cuda():
    z = torch.randn(0, 3, 6, 5, device="cuda", requires_grad=True)
    k = torch.randn(3, 6, 5, device="cuda", requires_grad=True)
    for mode in ("dot", "conv"):
        y = ops.hyperzzw_global(k, z, mode=mode)
        y.sum().backward()
        assert y.shape == z.shape and (k.grad == 0).all()
    y = ops.hyperkernel_conv(z, torch.randn(3, 3, 2, device="cuda"))
    assert y.shape == z.shape


@pytest.mark.parametrize("preset", ["fmnist", "seq784", "mnist1d"])
def test_network_on_cuda_matches_the_cpu(preset):
    from terminator.models import Terminator

    torch.manual_seed(0)
    model = Terminator.from_preset(preset).double()
    x = torch.randn(4, model.config.channels[0], *model.config.size, dtype=torch.float64)
    model.eval()
    with torch.no_grad():
        cpu = model(x)
        gpu = model.cuda()(x.cuda()).cpu()
    torch.testing.assert_close(gpu, cpu, rtol=1e-9, atol=1e-9)
    model.train()
    model(x.cuda()).square().sum().backward()
    assert all(p.grad is None or torch.isfinite(p.grad).all() for p in model.parameters())
