"""Bad input: one test per class of error in docs/OPS.md ("Errors"), on both sides of the op.

"python" calls the public wrapper (terminator.ops); "cpp" calls the registered op
directly (torch.ops.terminator), whose C++ kernel checks with the same messages.
"""

from __future__ import annotations

import pytest
import torch

import terminator.ops as ops


def _global(entry):
    if entry == "python":
        return lambda k, z, x=None, mode="dot": ops.hyperzzw_global(k, z, x, mode=mode)
    return lambda k, z, x=None, mode="dot": torch.ops.terminator.hyperzzw_global(k, z, x, mode)


def _conv(entry):
    if entry == "python":
        return lambda x, w, algo="auto": ops.hyperkernel_conv(x, w, algo=algo)
    return lambda x, w, algo="auto": torch.ops.terminator.hyperkernel_conv(x, w, algo)


@pytest.fixture(params=["python", "cpp"])
def entry(request):
    if request.param == "cpp" and ops.backend().name == "reference":
        pytest.skip("compiled backend not active")
    return request.param


def test_wrong_rank(entry):
    with pytest.raises(ValueError, match=r"z must have shape \(B, C, L\) or \(B, C, H, W\), got \(3, 4\)"):
        _global(entry)(torch.randn(4), torch.randn(3, 4))
    with pytest.raises(ValueError, match=r"x must have shape \(B, C, L\) or \(B, C, H, W\), got \(1, 2, 3, 4, 5\)"):
        _conv(entry)(torch.randn(1, 2, 3, 4, 5), torch.randn(2, 3, 3))
    with pytest.raises(
        ValueError, match=r"w must have shape \(C, \*K\), \(1, C, \*K\) or \(B, C, \*K\) with 2 spatial"
    ):
        _conv(entry)(torch.randn(1, 2, 5, 5), torch.randn(3))


def test_none_for_a_tensor(entry):
    with pytest.raises(TypeError, match=r"w must be a torch.Tensor, got NoneType"):
        _conv(entry)(torch.randn(1, 2, 5, 5), None)
    with pytest.raises(TypeError, match=r"k must be a torch.Tensor, got NoneType"):
        _global(entry)(None, torch.randn(1, 2, 5))
    with pytest.raises(TypeError, match=r"z must be a torch.Tensor, got NoneType"):
        _global(entry)(torch.randn(2, 5), None)


def test_mismatched_channels(entry):
    with pytest.raises(ValueError, match=r"k must have C=3 channels like z \(2, 3, 5\), got \(4, 5\)"):
        _global(entry)(torch.randn(4, 5), torch.randn(2, 3, 5))
    with pytest.raises(ValueError, match=r"w must have C=3 channels like x \(2, 3, 5, 5\), got \(2, 3, 3\)"):
        _conv(entry)(torch.randn(2, 3, 5, 5), torch.randn(2, 3, 3))


def test_mismatched_spatial_size(entry):
    with pytest.raises(ValueError, match=r"k must have the spatial size of z \(2, 3, 5, 6\), got \(3, 5, 5\)"):
        _global(entry)(torch.randn(3, 5, 5), torch.randn(2, 3, 5, 6))
    with pytest.raises(ValueError, match=r"x must have the shape of z \(2, 3, 5\), got \(2, 3, 6\)"):
        _global(entry)(torch.randn(3, 5), torch.randn(2, 3, 5), torch.randn(2, 3, 6))


def test_kernel_batch_size(entry):
    with pytest.raises(ValueError, match=r"k batch size must be 1 or B=2 \(z \(2, 3, 5\)\), got \(3, 3, 5\)"):
        _global(entry)(torch.randn(3, 3, 5), torch.randn(2, 3, 5))


def test_kernel_larger_than_allowed(entry):
    with pytest.raises(
        ValueError, match=r"w spatial size must be between 1 and the input size \(5, 5\) in every dim, got \(3, 6, 3\)"
    ):
        _conv(entry)(torch.randn(2, 3, 5, 5), torch.randn(3, 6, 3))


def test_integer_dtype(entry):
    with pytest.raises(
        ValueError,
        match=r"z must be a floating-point tensor \(float32, float64, float16 or bfloat16\), got torch\.int64",
    ):
        _global(entry)(torch.ones(3, 5, dtype=torch.long), torch.ones(2, 3, 5, dtype=torch.long))
    with pytest.raises(ValueError, match=r"x must be a floating-point tensor .*got torch\.bool"):
        _conv(entry)(torch.ones(2, 3, 5, dtype=torch.bool), torch.ones(3, 3, dtype=torch.bool))
    with pytest.raises(ValueError, match=r"x must be a floating-point tensor .*got torch\.complex64"):
        _conv(entry)(torch.ones(2, 3, 5, dtype=torch.complex64), torch.ones(3, 3, dtype=torch.complex64))


def test_mismatched_dtype(entry):
    with pytest.raises(ValueError, match=r"k must have the same dtype as z \(torch\.float32\), got torch\.float64"):
        _global(entry)(torch.randn(3, 5, dtype=torch.float64), torch.randn(2, 3, 5))


def test_different_devices(entry):
    with pytest.raises(ValueError, match=r"w must be on the same device as x \(cpu\), got meta"):
        _conv(entry)(torch.randn(2, 3, 5), torch.randn(3, 3, device="meta"))
    with pytest.raises(ValueError, match=r"x must be on the same device as z \(cpu\), got meta"):
        _global(entry)(torch.randn(3, 5), torch.randn(2, 3, 5), torch.randn(2, 3, 5, device="meta"))


def test_unknown_mode(entry):
    with pytest.raises(ValueError, match=r"mode must be one of 'dot', 'matmul', 'conv', got 'cross'"):
        _global(entry)(torch.randn(3, 5), torch.randn(2, 3, 5), mode="cross")


def test_matmul_needs_square_2d(entry):
    with pytest.raises(
        ValueError, match=r"mode='matmul' needs square 2D activations z \(B, C, H, W\) with H == W, got \(2, 3, 4, 5\)"
    ):
        _global(entry)(torch.randn(3, 4, 5), torch.randn(2, 3, 4, 5), mode="matmul")
    with pytest.raises(ValueError, match=r"mode='matmul' needs square 2D"):
        _global(entry)(torch.randn(3, 5), torch.randn(2, 3, 5), mode="matmul")


def test_unknown_algo(entry):
    with pytest.raises(ValueError, match=r"algo must be one of 'auto', 'direct', 'fft', got 'winograd'"):
        _conv(entry)(torch.randn(2, 3, 5), torch.randn(3, 3), algo="winograd")


def test_not_a_tensor():
    with pytest.raises(TypeError, match=r"k must be a torch.Tensor, got list"):
        ops.hyperzzw_global([1.0], torch.randn(2, 3, 5))


def test_backward_op_checks_grad_shape(entry):
    if entry == "python":
        pytest.skip("the backward ops are internal")
    with pytest.raises(ValueError, match=r"grad_y must have the shape of x \(2, 3, 5\), got \(2, 3, 4\)"):
        torch.ops.terminator.hyperkernel_conv_backward(
            torch.randn(2, 3, 4), torch.randn(2, 3, 5), torch.randn(3, 3), "auto"
        )
