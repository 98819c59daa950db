"""The HyperZ·Z·W ops: thin wrappers over the compiled kernels, or the reference.

Shapes: activations ``(B, C, *S)`` with ``S = (L,)`` (1D) or ``(H, W)`` (2D);
kernels ``(C, *K)``, ``(1, C, *K)`` (shared over the batch) or ``(B, C, *K)``
(per sample). float32, float64, float16 and bfloat16 (the half types accumulate in
float32); any strides; B = 0 gives an empty result. See SPEC §2 for the definitions.

The backend (compiled C++/CUDA or pure-PyTorch reference) is chosen when this
module is imported, building the extension on first use; ``backend()`` says which
and why. Tensors on a device the compiled backend has no kernels for run on the
reference.
"""

from __future__ import annotations

import torch

from . import _build, _checks, _library, reference
from ._build import BackendInfo, BuildError

__all__ = ["hyperzzw_global", "hyperkernel_conv", "backend", "reference", "BackendInfo", "BuildError"]

_BACKEND: BackendInfo = _build.select_backend()
if _BACKEND.name != "reference":
    _library.register()
_COMPILED_DEVICES = frozenset(_BACKEND.devices)


def backend() -> BackendInfo:
    """The active backend: ``.name`` ("cpp", "cuda" or "reference") and ``.reason``."""
    return _BACKEND


def _compiled(t: torch.Tensor) -> bool:
    return t.device.type in _COMPILED_DEVICES


def hyperzzw_global(
    k: torch.Tensor, z: torch.Tensor, x: torch.Tensor | None = None, *, mode: str = "dot"
) -> torch.Tensor:
    """Global HyperZ·Z·W: context-dependent fast weights ``Ŵ = k ⊙ z`` act on ``x``.

    Args:
        k: global hyper-kernel, ``(C, *S)``, ``(1, C, *S)`` or ``(B, C, *S)``.
        z: hidden activations ``(B, C, *S)``.
        x: ``(B, C, *S)``, or None for ``x = z`` (z's gradient then covers both roles).
        mode: ``"dot"``: ``Ŵ ⊙ x``; ``"matmul"``: ``Ŵ[b,c] @ x[b,c]`` (2D, H == W);
            ``"conv"``: "same" cross-correlation of ``x`` with ``Ŵ`` (full-size kernel).
    Returns:
        ``(B, C, *S)``, contiguous.
    """
    k, z, x = _library.autocast_inputs(z.device.type, k, z, x) if isinstance(z, torch.Tensor) else (k, z, x)
    _checks.check_global_args(k, z, x, mode)
    if _compiled(z):
        return _library.global_product(k, z, x, mode)
    # The reference's broadcasting products follow their inputs' strides (an expanded k
    # gives a non-contiguous result); the promise above holds for every backend.
    return reference.hyperzzw_global(k, z, x, mode=mode).contiguous()


def hyperkernel_conv(x: torch.Tensor, w: torch.Tensor, *, algo: str = "auto") -> torch.Tensor:
    """Depthwise "same" cross-correlation of ``x`` with a dynamic hyper-kernel ``w``.

    ``y[b,c][p] = Σ_q w[b,c][q] · x[b,c][p + q − ⌊(K−1)/2⌋]``, zero outside ``x``.

    Args:
        x: ``(B, C, *S)``.
        w: ``(C, *K)`` / ``(1, C, *K)`` shared, or ``(B, C, *K)`` per sample, ``1 <= K <= S``.
        algo: ``"direct"``, ``"fft"`` or ``"auto"`` (direct for small kernels, FFT for
            large ones, by a crossover measured on CPU).
    Returns:
        ``(B, C, *S)``, contiguous.
    """
    x, w = _library.autocast_inputs(x.device.type, x, w) if isinstance(x, torch.Tensor) else (x, w)
    _checks.check_conv_args(x, w, algo)
    if _compiled(x):
        return _library.conv(x, w, algo)
    return reference.hyperkernel_conv(x, w, algo=algo).contiguous()
