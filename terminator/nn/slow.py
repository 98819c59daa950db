"""Slow networks: MAGNet coordinate MLPs that generate hyper-kernels.

A slow net maps a grid of coordinates in ``[-1, 1]^d`` to a hyper-kernel with one
value per coordinate and output channel (docs/ARCHITECTURE.md). Three variants:

* :class:`SlowNetG` — global: the kernel is as large as the input, ``(C, *S)``.
* :class:`SlowNetGC` — over the channel axis (``d = 1``, length ``C``), ``(out, C)``.
* :class:`SlowNetL` — local ``k`` / ``k×k`` kernels whose hidden layers are modulated by
  the input (context-dependent), ``(B, C, *K)`` per sample or ``(1, C, *K)`` per batch.

G and GC do not look at the input: in eval mode they compute their kernel once and
reuse it until a parameter changes (see :class:`CachedKernel`).
"""

from __future__ import annotations

import math
from typing import Sequence

import torch
from torch import nn

from .. import ops
from .pointwise import Pointwise

__all__ = [
    "DEFAULT_OMEGA_0",
    "coordinate_grid",
    "MAGNet",
    "CachedKernel",
    "SlowNetG",
    "SlowNetGC",
    "LocalContext",
    "SlowNetL",
]

#: ω0 of every MAGNet filter unless given (chosen by the sweep in docs/ARCHITECTURE.md).
DEFAULT_OMEGA_0 = 30.0


def _sizes(size: int | Sequence[int], data_dim: int | None = None) -> tuple[int, ...]:
    sizes = (int(size),) * (data_dim or 1) if isinstance(size, int) else tuple(int(s) for s in size)
    if data_dim is not None and len(sizes) != data_dim:
        raise ValueError(f"size must have {data_dim} entries for data_dim={data_dim}, got {sizes}")
    if not sizes or any(s < 1 for s in sizes):
        raise ValueError(f"size must be positive in every dim, got {sizes}")
    return sizes


def coordinate_grid(sizes: Sequence[int], dtype: torch.dtype | None = None) -> torch.Tensor:
    """Coordinates of a ``sizes`` grid in ``[-1, 1]^d``, flattened: ``(prod(sizes), d)``.

    Row-major ("ij") order, so ``grid.view(*sizes, d)[i, j] = (lin_0[i], lin_1[j])``.
    """
    axes = [torch.linspace(-1.0, 1.0, s, dtype=dtype) for s in sizes]
    grid = torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1)
    return grid.reshape(-1, len(sizes))


class MAGNet(nn.Module):
    """Multiplicative Gabor-like filter network over a fixed coordinate grid.

    ``h_0 = g_0(c)``, ``h_i = g_i(c) ⊙ (W_{i-1} h_{i-1} + b_{i-1}) + P``, output
    ``W_out h_L + b_out``, with filters ``g_i(c) = sin(A_i c + a_i)``.

    Init (as the release): ``A_i`` is a fan-in uniform draw ``U(-1/√d, 1/√d)`` times
    ``2π·ω0·γ`` with ``γ ~ Gamma(α/(i+1), β)`` per (hidden unit, coordinate dim), ``a_i = 0``;
    hidden linears kaiming-uniform (linear gain) with bias 1; output linear
    kaiming-uniform scaled by ``sqrt(1 / #kernel elements)`` with bias 0; ``P = 0``.

    ``forward(context_gates=None)`` returns the hidden-to-output result as
    ``(G, N, out_channels)`` with ``N = prod(size)`` and ``G`` = 1 or the batch of the
    gates. ``context_gates`` (used by :class:`SlowNetL`) is a callable ``(i, h) -> h``
    applied after each hidden layer ``i >= 1``.

    All parameters here are *slow* (see :func:`terminator.losses.split_parameters`).
    """

    def __init__(
        self,
        data_dim: int,
        size: int | Sequence[int],
        out_channels: int,
        hidden: int,
        num_layers: int,
        omega_0: float = DEFAULT_OMEGA_0,
        alpha: float = 6.0,
        beta: float = 1.0,
    ):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        self.data_dim = data_dim
        self.size = _sizes(size, data_dim)
        self.out_channels = out_channels
        self.hidden = hidden
        self.num_layers = num_layers
        self.omega_0 = float(omega_0)
        numel = math.prod(self.size)
        # Coordinates follow the module's device and dtype; rebuilt, so not saved.
        self.register_buffer("coords", coordinate_grid(self.size), persistent=False)
        self.filters = nn.ModuleList(nn.Linear(data_dim, hidden) for _ in range(num_layers + 1))
        self.linears = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(num_layers))
        self.output = nn.Linear(hidden, out_channels)
        self.bias_map = nn.Parameter(torch.zeros(self.size))  # P, shared by hidden layers and units
        with torch.no_grad():
            for i, filt in enumerate(self.filters):
                gamma = torch.distributions.Gamma(alpha / (i + 1), beta).sample((hidden, data_dim))
                filt.weight.mul_(2 * math.pi * self.omega_0 * gamma.to(filt.weight.dtype))
                filt.bias.zero_()
            for lin in self.linears:
                nn.init.kaiming_uniform_(lin.weight, nonlinearity="linear")
                lin.bias.fill_(1.0)
            nn.init.kaiming_uniform_(self.output.weight, nonlinearity="linear")
            self.output.weight.mul_(math.sqrt(1.0 / numel))
            self.output.bias.zero_()

    def weights(self) -> ops.MagnetWeights:
        return ops.MagnetWeights(
            self.coords,
            [f.weight for f in self.filters],
            [f.bias for f in self.filters],
            [lin.weight for lin in self.linears],
            [lin.bias for lin in self.linears],
            self.output.weight,
            self.output.bias,
            self.bias_map,
        )

    def forward(self, context_gates=None) -> torch.Tensor:
        return ops.reference.magnet(self.weights(), context_gates)  # (G, N, out)

    def extra_repr(self) -> str:
        return f"size={self.size}, hidden={self.hidden}, num_layers={self.num_layers}, omega_0={self.omega_0:g}"


class CachedKernel(nn.Module):
    """Base of the input-independent slow nets: caches the kernel in eval mode.

    ``forward()`` returns ``compute_kernel()``. In training mode, under
    ``torch.compile``/``torch.export``, or when autograd would need the graph (grad
    enabled and a parameter requires grad), it computes afresh. Otherwise (eval
    inference) it computes once and reuses the result while the parameters and
    buffers are the same tensors with the same version counters, device and dtype:
    an optimizer step, ``load_state_dict``, ``.to()`` or any in-place update through
    the tensor itself makes it recompute; ``train()`` drops the cache (``eval()`` keeps a
    valid one, so inference loops that call ``eval()`` per batch reuse it). Writes through
    ``.data`` bypass version counters: call :meth:`clear_kernel_cache` after those.
    """

    def __init__(self):
        super().__init__()
        self._kernel_cache: tuple | None = None

    def compute_kernel(self) -> torch.Tensor:
        raise NotImplementedError

    def clear_kernel_cache(self) -> None:
        self._kernel_cache = None

    def train(self, mode: bool = True):
        if mode:
            self._kernel_cache = None
        return super().train(mode)

    def _state_key(self) -> tuple:
        tensors = [*self.parameters(), *self.buffers()]
        return (torch.is_inference_mode_enabled(),) + tuple(
            (id(t), t.data_ptr(), t._version, t.dtype, t.device) for t in tensors
        )

    def forward(self) -> torch.Tensor:
        if (
            self.training
            or torch.compiler.is_compiling()
            or (torch.is_grad_enabled() and any(p.requires_grad for p in self.parameters()))
        ):
            return self.compute_kernel()
        key = self._state_key()
        if self._kernel_cache is None or self._kernel_cache[0] != key:
            self._kernel_cache = (key, self.compute_kernel())
        return self._kernel_cache[1]


class SlowNetG(CachedKernel):
    """Global slow net: a hyper-kernel ``(out_channels, *size)`` as large as the input.

    Args:
        data_dim: 1 or 2.
        size: the input's spatial size ``(L,)`` or ``(H, W)`` (an int means square).
        out_channels: kernel channels (the block's C; 1 for the spatial score of HI).
        hidden, num_layers, omega_0: MAGNet width, depth (hidden linears) and ω0.
    """

    def __init__(
        self,
        data_dim: int,
        size: int | Sequence[int],
        out_channels: int,
        hidden: int = 64,
        num_layers: int = 2,
        omega_0: float = DEFAULT_OMEGA_0,
    ):
        super().__init__()
        self.size = _sizes(size, data_dim)
        self.out_channels = out_channels
        self.magnet = MAGNet(data_dim, self.size, out_channels, hidden, num_layers, omega_0)

    def compute_kernel(self) -> torch.Tensor:
        out = self.magnet()[0]  # (N, C)
        return out.t().reshape(self.out_channels, *self.size)


class SlowNetGC(CachedKernel):
    """Channel slow net: a kernel over ``C`` channel coordinates, ``(out_channels, C)``.

    It scores a pooled channel vector ``y (B, out_channels, C)`` as a 1D activation of
    length ``C`` (hyper-channel interaction).
    """

    def __init__(
        self,
        channels: int,
        out_channels: int = 1,
        hidden: int = 32,
        num_layers: int = 2,
        omega_0: float = DEFAULT_OMEGA_0,
    ):
        super().__init__()
        self.channels = channels
        self.out_channels = out_channels
        self.magnet = MAGNet(1, (channels,), out_channels, hidden, num_layers, omega_0)

    def compute_kernel(self) -> torch.Tensor:
        return self.magnet()[0].t().reshape(self.out_channels, self.channels)


class LocalContext(nn.Module):
    """The context path of a local slow net (fast parameters: it reads activations).

    ``u (B, C, *S)`` → adaptive average pool to the kernel size → 1×1 conv ``C → hidden``
    → (``"batch"``: mean over the batch, as the release) → 1×1 conv → GELU →
    ``(B', N, hidden)`` with ``B' = B`` (``"sample"``) or 1 (``"batch"``); then one linear
    per hidden layer (kaiming-uniform, bias 1) makes the gate of that layer.
    """

    def __init__(
        self,
        data_dim: int,
        channels: int,
        kernel_size: tuple[int, ...],
        hidden: int,
        num_layers: int,
        local_context: str = "sample",
    ):
        super().__init__()
        if local_context not in ("sample", "batch"):
            raise ValueError(f"local_context must be 'sample' or 'batch', got {local_context!r}")
        self.data_dim = data_dim
        self.kernel_size = kernel_size
        self.local_context = local_context
        self.reduce = Pointwise(channels, hidden)
        self.fc = Pointwise(hidden, hidden)
        self.gates = nn.ModuleList(nn.Linear(hidden, hidden) for _ in range(num_layers))
        with torch.no_grad():
            for lin in self.gates:
                nn.init.kaiming_uniform_(lin.weight, nonlinearity="linear")
                lin.bias.fill_(1.0)

    def weights(self, alpha: torch.Tensor, beta: torch.Tensor) -> ops.LocalContextWeights:
        """With the slow net's re-normalization ``alpha``, ``beta`` ``(L, hidden)``."""
        return ops.LocalContextWeights(
            self.reduce.weight,
            self.reduce.bias,
            self.fc.weight,
            self.fc.bias,
            [g.weight for g in self.gates],
            [g.bias for g in self.gates],
            alpha,
            beta,
        )

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """``u (B, C, *S)`` → the context ``(B', N, hidden)``."""
        weights = self.weights(torch.empty(0), torch.empty(0))
        return ops.reference.local_context(u, self.kernel_size, weights, self.local_context == "batch")

    def extra_repr(self) -> str:
        return f"local_context={self.local_context!r}"


class SlowNetL(nn.Module):
    """Local, context-dependent slow net: kernels ``(B', C, *K)`` for ``hyperkernel_conv``.

    Each hidden layer ``i`` of the MAGNet is re-normalized as
    ``α_i·h + β_i·normalize(h)`` (learnable per hidden unit, α = 1, β = 0.1; normalize =
    L2 over the kernel positions, per sample and unit) and then multiplied by the
    context gate ``linear_i(context)``. ``local_context="sample"`` (default) gives each
    sample its own kernel; ``"batch"`` averages the context over the batch (the release).
    """

    def __init__(
        self,
        data_dim: int,
        channels: int,
        kernel_size: int | Sequence[int],
        hidden: int = 32,
        num_layers: int = 2,
        omega_0: float = DEFAULT_OMEGA_0,
        local_context: str = "sample",
    ):
        super().__init__()
        self.kernel_size = _sizes(kernel_size, data_dim)
        self.channels = channels
        self.magnet = MAGNet(data_dim, self.kernel_size, channels, hidden, num_layers, omega_0)
        self.renorm_alpha = nn.Parameter(torch.ones(num_layers, hidden))
        self.renorm_beta = nn.Parameter(torch.full((num_layers, hidden), 0.1))
        self.context = LocalContext(data_dim, channels, self.kernel_size, hidden, num_layers, local_context)

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """``u (B, C, *S)`` (the context) → kernel ``(B, C, *K)``, or ``(1, C, *K)`` for "batch"."""
        return ops.local_kernel(
            u,
            self.kernel_size,
            self.magnet.weights(),
            self.context.weights(self.renorm_alpha, self.renorm_beta),
            batch_context=self.context.local_context == "batch",
        )
