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
            f"{name} must be a floating-point tensor (float32, float64, float16 or bfloat16), got {t.dtype}"
        )


def _activation(t: object, name: str) -> torch.Tensor:
    t = _tensor(t, name)
    if t.dim() not in (3, 4):
        raise ValueError(f"{name} must have shape (B, C, L) or (B, C, H, W), got {tuple(t.shape)}")
    _floating(t, name)
    return t


def _same_device_dtype(t: torch.Tensor, name: str, ref: torch.Tensor, ref_name: str) -> None:
    if t.device != ref.device:
        raise ValueError(f"{name} must be on the same device as {ref_name} ({ref.device}), got {t.device}")
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
        raise ValueError(f"{name} must have the spatial size of {x_name} {tuple(x.shape)}, got {tuple(kernel.shape)}")
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
        raise ValueError(f"mode='matmul' needs square 2D activations z (B, C, H, W) with H == W, got {tuple(z.shape)}")
    return check_kernel(k, "k", z, "z", full_size=True)


def check_conv_args(x: object, w: object, algo: object) -> int:
    """Checks hyperkernel_conv's arguments; returns the kernel's batch size."""
    if algo not in ALGOS:
        raise ValueError(f"algo must be one of 'auto', 'direct', 'fft', got {algo!r}")
    x = _activation(x, "x")
    return check_kernel(w, "w", x, "x", full_size=False)


# ---- the network's layers -------------------------------------------------------------------


def _matrix(t: object, name: str, rows: int | None, cols: int | None, like: torch.Tensor) -> torch.Tensor:
    t = _tensor(t, name)
    _same_device_dtype(t, name, like, "x")
    if t.dim() != 2 or (rows is not None and t.shape[0] != rows) or (cols is not None and t.shape[1] != cols):
        want = f"({rows if rows is not None else 'any'}, {cols if cols is not None else 'any'})"
        raise ValueError(f"{name} must have shape {want}, got {tuple(t.shape)}")
    return t


def _vector(t: object, name: str, length: int, like: torch.Tensor) -> torch.Tensor:
    t = _tensor(t, name)
    _same_device_dtype(t, name, like, "x")
    if tuple(t.shape) != (length,):
        raise ValueError(f"{name} must have shape ({length},), got {tuple(t.shape)}")
    return t


def _activations(t: object, name: str) -> torch.Tensor:
    t = _tensor(t, name)
    if t.dim() < 3:
        raise ValueError(f"{name} must have shape (B, C, *S) with at least one spatial dim, got {tuple(t.shape)}")
    _floating(t, name)
    return t


def check_pointwise_args(xs: list, weight: object, bias: object) -> None:
    """Checks pointwise's arguments: inputs (B, C_j, *S) alike but for C_j; weight (C_out, Σ C_j)."""
    if not xs:
        raise ValueError("xs must hold at least one tensor")
    first = _activations(xs[0], "xs[0]")
    for j, x in enumerate(xs[1:], 1):
        x = _activations(x, f"xs[{j}]")
        _same_device_dtype(x, f"xs[{j}]", first, "xs[0]")
        if x.shape[0] != first.shape[0] or x.shape[2:] != first.shape[2:]:
            raise ValueError(
                f"xs[{j}] must have the batch and spatial sizes of xs[0] {tuple(first.shape)}, got {tuple(x.shape)}"
            )
    weight = _matrix(weight, "weight", None, sum(x.shape[1] for x in xs), first)
    if bias is not None:
        _vector(bias, "bias", weight.shape[0], first)


def check_standardize_args(
    x: object, channels: object, running_mean: object, running_var: object, bias: object
) -> None:
    x = _activations(x, "x")
    count = x.shape[1] if channels == "batch" else None
    if channels not in ("instance", "batch"):
        if not (isinstance(channels, tuple) and hasattr(channels, "batch")):
            raise ValueError(f"channels must be 'instance', 'batch' or a ChannelGroups, got {channels!r}")
        count = channels.batch.numel()
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must both be given or both be None")
    if running_mean is not None:
        if count is None:
            raise ValueError("channels='instance' has no running statistics; pass running_mean=None")
        _vector(running_mean, "running_mean", count, x)
        _vector(running_var, "running_var", count, x)
    if bias is not None:
        bias = _tensor(bias, "bias")
        _same_device_dtype(bias, "bias", x, "x")
        if bias.dim() != 0:
            raise ValueError(f"bias must be a scalar tensor, got shape {tuple(bias.shape)}")


def check_rgu_args(u: object, weights: tuple) -> None:
    u = _activations(u, "u")
    channels = u.shape[1]
    for name in ("w_k", "w_v", "w_q", "w_y"):
        _matrix(getattr(weights, name), name, channels, channels, u)
    for name in ("b_k", "b_v", "b_q", "b_y"):
        _vector(getattr(weights, name), name, channels, u)
    bias_map = _tensor(weights.bias_map, "bias_map")
    _same_device_dtype(bias_map, "bias_map", u, "x")
    if tuple(bias_map.shape) != tuple(u.shape[2:]):
        raise ValueError(f"bias_map must have the spatial shape of u {tuple(u.shape[2:])}, got {tuple(bias_map.shape)}")


def check_local_kernel_args(u: object, kernel_size: object, magnet: tuple, context: tuple) -> None:
    u = _activations(u, "u")
    spatial = tuple(u.shape[2:])
    kernel_size = tuple(kernel_size)
    if len(kernel_size) != len(spatial) or not all(1 <= k <= s for k, s in zip(kernel_size, spatial)):
        raise ValueError(
            f"kernel_size must have one entry per spatial dim of u {spatial}, each between 1 and "
            f"that size, got {kernel_size}"
        )
    layers = len(magnet.linear_w)
    if len(magnet.filter_w) != layers + 1 or len(context.gate_w) != layers:
        raise ValueError(
            f"a MAGNet with {layers} hidden layers needs {layers + 1} filters and {layers} gates, "
            f"got {len(magnet.filter_w)} and {len(context.gate_w)}"
        )
    hidden = magnet.out_w.shape[1]
    positions = 1
    for k in kernel_size:
        positions *= k
    _matrix(magnet.coords, "coords", positions, len(spatial), u)
    _matrix(magnet.out_w, "out_w", u.shape[1], hidden, u)
    _matrix(context.reduce_w, "reduce_w", hidden, u.shape[1], u)
    if magnet.bias_map.numel() != positions:
        raise ValueError(
            f"bias_map must have {positions} entries (the kernel positions), got {tuple(magnet.bias_map.shape)}"
        )
    for name, t in (("alpha", context.alpha), ("beta", context.beta)):
        if tuple(t.shape) != (layers, hidden):
            raise ValueError(f"{name} must have shape ({layers}, {hidden}), got {tuple(t.shape)}")


def check_hyper_interaction_args(y: object, x: object, k_c: object, k_s: object) -> None:
    y = _activations(y, "y")
    if x is not None:
        x = _tensor(x, "x")
        _same_device_dtype(x, "x", y, "y")
        if x.shape != y.shape:
            raise ValueError(f"x must have the shape of y {tuple(y.shape)}, got {tuple(x.shape)}")
    k_c = _tensor(k_c, "k_c")
    _same_device_dtype(k_c, "k_c", y, "y")
    if tuple(k_c.shape) != (1, y.shape[1]):
        raise ValueError(f"k_c must have shape (1, {y.shape[1]}), got {tuple(k_c.shape)}")
    if k_s is not None:
        k_s = _tensor(k_s, "k_s")
        _same_device_dtype(k_s, "k_s", y, "y")
        if tuple(k_s.shape) != (1, *y.shape[2:]):
            raise ValueError(f"k_s must have shape (1, {', '.join(map(str, y.shape[2:]))}), got {tuple(k_s.shape)}")
