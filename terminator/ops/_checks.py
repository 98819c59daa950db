"""Argument checks of the public ops: one place, the same messages as csrc/common.h.

Every problem raises ValueError naming the argument and what was expected
(TypeError only for something that is not a tensor at all).
"""

from __future__ import annotations

import torch

MODES = ("dot", "matmul", "conv")
ALGOS = ("auto", "direct", "fft")
_FLOATING = (torch.float32, torch.float64, torch.float16, torch.bfloat16)


def _tensor(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _floating(t: torch.Tensor, name: str) -> None:
    if t.dtype not in _FLOATING:
        raise ValueError(
            f"{name} must be a floating-point tensor (float32, float64, float16 or bfloat16), "
            f"got {t.dtype}"
        )


def _activation(t: object, name: str) -> torch.Tensor:
    t = _tensor(t, name)
    if t.dim() not in (3, 4):
        raise ValueError(f"{name} must have shape (B, C, L) or (B, C, H, W), got {tuple(t.shape)}")
    _floating(t, name)
    return t


def _same_device_dtype(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(
            f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}"
        )
    if t.dtype != ref.dtype:
        raise ValueError(f"{name} must have the same dtype as {ref_name} ({ref.dtype}), got {t.dtype}")


def check_kernel(kernel: object, name: str, x: torch.Tensor, x_name: str, *, full_size: bool) -> int:
    """Checks a kernel (C, *K) / (1, C, *K) / (B, C, *K) for activations x (B, C, *S).

    Returns the kernel's batch size: 1 (shared) or B (per sample).
    """
    kernel = _tensor(kernel, name)
    _floating(kernel, name)
    _same_device_dtype(kernel, name, x, x_name)
    d = x.dim() - 2
    batch, channels = x.shape[0], x.shape[1]
    batched = kernel.dim() == x.dim()
    if not batched and kernel.dim() != x.dim() - 1:
        raise ValueError(
            f"{name} must have shape (C, *K), (1, C, *K) or (B, C, *K) with {d} spatial dim(s) "
            f"like {x_name} {tuple(x.shape)}, got {tuple(kernel.shape)}"
        )
    kernel_batch = kernel.shape[0] if batched else 1
    if kernel_batch not in (1, batch):
        raise ValueError(
            f"{name} batch size must be 1 or B={batch} ({x_name} {tuple(x.shape)}), got {tuple(kernel.shape)}"
        )
    off = 1 if batched else 0
    if kernel.shape[off] != channels:
        raise ValueError(
            f"{name} must have C={channels} channels like {x_name} {tuple(x.shape)}, got {tuple(kernel.shape)}"
        )
    k_spatial, x_spatial = tuple(kernel.shape[off + 1 :]), tuple(x.shape[2:])
    if full_size and k_spatial != x_spatial:
        raise ValueError(
            f"{name} must have the spatial size of {x_name} {tuple(x.shape)}, got {tuple(kernel.shape)}"
        )
    if not full_size and not all(1 <= k <= s for k, s in zip(k_spatial, x_spatial)):
        raise ValueError(
            f"{name} spatial size must be between 1 and the input size {x_spatial} in every dim, "
            f"got {tuple(kernel.shape)}"
        )
    return kernel_batch


def check_global_args(k: object, z: object, x: object, mode: object) -> int:
    """Checks hyperzzw_global's arguments; returns the kernel's batch size."""
    if mode not in MODES:
        raise ValueError(f"mode must be one of 'dot', 'matmul', 'conv', got {mode!r}")
    z = _activation(z, "z")
    if x is not None:
        x = _tensor(x, "x")
        _same_device_dtype(x, "x", z, "z")
        if x.shape != z.shape:
            raise ValueError(f"x must have the shape of z {tuple(z.shape)}, got {tuple(x.shape)}")
    if mode == "matmul" and not (z.dim() == 4 and z.shape[2] == z.shape[3]):
        raise ValueError(
            f"mode='matmul' needs square 2D activations z (B, C, H, W) with H == W, got {tuple(z.shape)}"
        )
    return check_kernel(k, "k", z, "z", full_size=True)


def check_conv_args(x: object, w: object, algo: object) -> int:
    """Checks hyperkernel_conv's arguments; returns the kernel's batch size."""
    if algo not in ALGOS:
        raise ValueError(f"algo must be one of 'auto', 'direct', 'fft', got {algo!r}")
    x = _activation(x, "x")
    return check_kernel(w, "w", x, "x", full_size=False)
