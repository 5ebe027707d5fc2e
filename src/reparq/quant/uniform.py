"""Uniform affine fake-quantizer: the building block of every recipe.

``q = clamp(round(x / s) + z, qmin, qmax)``, ``x_hat = s * (q - z)``. Rounding uses a
straight-through estimator, written so that autograd also gives the LSQ gradient with
respect to the scale; that is what lets reconstruction recipes learn step sizes.
"""

from __future__ import annotations

import torch
import torch.nn as nn

from reparq.errors import ReparqError

KEEP_BITS = 16  # bits >= 16 means "leave this tensor in float"


def round_ste(x: torch.Tensor) -> torch.Tensor:
    """Round in the forward pass, identity in the backward pass."""
    return x + (torch.round(x) - x).detach()


def int_range(bits: int, symmetric: bool, narrow: bool = False) -> tuple[int, int]:
    """Integer grid: signed ``[-2^(b-1), 2^(b-1)-1]`` when symmetric, unsigned ``[0, 2^b-1]`` otherwise.

    ``narrow`` drops the lone ``-2^(b-1)`` of the signed grid so that it is closed under negation,
    which folding a negative per-channel gain (QPRep) into integer weights needs.
    """
    if symmetric:
        return -(2 ** (bits - 1)) + int(narrow), 2 ** (bits - 1) - 1
    return 0, 2 ** bits - 1


def check_bits(bits: int, what: str = "bits") -> int:
    if not isinstance(bits, int) or isinstance(bits, bool) or not (2 <= bits <= 8 or bits == KEEP_BITS):
        raise ReparqError(f"{what} must be an integer in 2..8 (or {KEEP_BITS} to keep float), got {bits!r}")
    return bits


def broadcast_shape(x: torch.Tensor, axis: int | None) -> list[int]:
    """Shape that broadcasts a per-channel vector along ``axis`` of ``x``."""
    if axis is None:
        return [1] * x.ndim
    shape = [1] * x.ndim
    shape[axis] = x.shape[axis]
    return shape


def fake_quant(x: torch.Tensor, scale: torch.Tensor, zero_point: torch.Tensor, qmin: int, qmax: int) -> torch.Tensor:
    q = torch.clamp(round_ste(x / scale) + zero_point, qmin, qmax)
    return (q - zero_point) * scale


class UniformQuantizer(nn.Module):
    """Fake-quantizer with per-tensor or per-channel (any axis) scale and integer zero-point.

    ``scale`` is a parameter (frozen unless a recipe makes it learnable); ``zero_point`` is a
    buffer of integer values stored as float so it broadcasts without casts.

    ``group_size`` (weights of a Linear, ``channel_axis=0``): one scale per output row and per
    run of ``group_size`` input columns, stored flat as ``[out * in / group_size]``. At 4 bits one
    scale per row lets a row's largest weight set the step for all of it; a scale per 32-128
    columns follows the weights' local range, which is what weight-only LLM runtimes (GPTQ, AWQ,
    compressed-tensors' ``group`` strategy) read.
    """

    def __init__(self, bits: int = 8, symmetric: bool = False, channel_axis: int | None = None,
                 narrow: bool = False, group_size: int | None = None) -> None:
        super().__init__()
        self.bits = check_bits(bits)
        self.symmetric = symmetric
        self.narrow = narrow and symmetric
        self.channel_axis = channel_axis
        if group_size is not None and (channel_axis != 0 or group_size < 1):
            raise ReparqError(f"group_size needs per-output-channel weights (channel_axis=0) and a positive size, "
                              f"got group_size={group_size!r}, channel_axis={channel_axis!r}")
        self.group_size = group_size
        self.scale = nn.Parameter(torch.ones(1), requires_grad=False)
        self.register_buffer("zero_point", torch.zeros(1))
        self.enabled = True
        self.initialized = False
        # QDrop: while > 0, each element keeps its float value with this probability.
        self.drop_prob = 0.0
        self.drop_generator: torch.Generator | None = None

    @property
    def qmin(self) -> int:
        return int_range(self.bits, self.symmetric, self.narrow)[0]

    @property
    def qmax(self) -> int:
        return int_range(self.bits, self.symmetric, self.narrow)[1]

    @property
    def is_float(self) -> bool:
        return self.bits >= KEEP_BITS

    def set_params(self, scale: torch.Tensor, zero_point: torch.Tensor | None = None) -> None:
        """Install quantization parameters (vectors for per-channel, scalars otherwise)."""
        scale = torch.as_tensor(scale, dtype=torch.float32).detach().reshape(-1).clone()
        if zero_point is None:
            zero_point = torch.zeros_like(scale)
        zero_point = torch.as_tensor(zero_point, dtype=torch.float32).detach().reshape(-1).clone()
        if self.symmetric and bool((zero_point != 0).any()):
            raise ReparqError("a symmetric quantizer needs zero_point == 0")
        if bool((scale <= 0).any()) or not bool(torch.isfinite(scale).all()):
            raise ReparqError("quantization scales must be positive and finite")
        # Stay where the quantizer lives (its layer may be on a GPU while statistics were on the CPU).
        device = self.scale.device
        self.scale = nn.Parameter(scale.to(device), requires_grad=self.scale.requires_grad)
        self.zero_point = torch.round(zero_point).to(device)
        self.initialized = True

    def _check_groups(self, x: torch.Tensor) -> int:
        """The number of groups per row of ``x`` [out, in], or an error saying why it does not fit."""
        if x.ndim != 2 or x.shape[1] % self.group_size:
            raise ReparqError(f"group_size {self.group_size} needs a [out, in] weight whose in-features it divides, "
                              f"got shape {tuple(x.shape)}")
        return x.shape[1] // self.group_size

    def estimation_view(self, x: torch.Tensor) -> tuple[torch.Tensor, int | None]:
        """(data, axis) for a range estimator: with groups, one row per (output row, group), in
        the order the flat scale vector stores them; otherwise ``x`` on its channel axis."""
        if self.group_size is None:
            return x, self.channel_axis
        self._check_groups(x)
        return x.reshape(-1, self.group_size), 0

    def shaped_params(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Scale and zero-point reshaped to broadcast against ``x`` (with groups: expanded to
        ``x``'s shape, each group's scale repeated over its columns)."""
        if self.group_size is not None and self.scale.numel() > 1:
            groups = self._check_groups(x)
            if self.scale.numel() != x.shape[0] * groups:
                raise ReparqError(f"quantizer has {self.scale.numel()} group scales, which do not fit a weight of "
                                  f"shape {tuple(x.shape)} in groups of {self.group_size}")
            return tuple(p.reshape(x.shape[0], groups, 1).expand(-1, -1, self.group_size).reshape(x.shape)
                         for p in (self.scale, self.zero_point))
        if self.scale.numel() == 1:
            shape = [1] * x.ndim
        elif self.channel_axis is None or self.scale.numel() != x.shape[self.channel_axis]:
            raise ReparqError(f"quantizer has {self.scale.numel()} channel scales, which do not fit a tensor "
                              f"of shape {tuple(x.shape)} on axis {self.channel_axis}")
        else:
            shape = broadcast_shape(x, self.channel_axis)
        return self.scale.reshape(shape), self.zero_point.reshape(shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.enabled or self.is_float:
            return x
        if not self.initialized:
            raise RuntimeError("quantizer used before its range was set (run calibration first)")
        scale, zero_point = self.shaped_params(x)
        x_hat = fake_quant(x, scale, zero_point, self.qmin, self.qmax)
        if self.drop_prob > 0:
            keep_float = (torch.rand(x.shape, generator=self.drop_generator, device="cpu") < self.drop_prob).to(x.device)
            return torch.where(keep_float, x, x_hat)
        return x_hat

    @torch.no_grad()
    def to_int(self, x: torch.Tensor) -> torch.Tensor:
        """The integers the deployed kernel sees (int32 tensor)."""
        scale, zero_point = self.shaped_params(x)
        return torch.clamp(torch.round(x / scale) + zero_point, self.qmin, self.qmax).to(torch.int32)

    def extra_repr(self) -> str:
        gran = "tensor" if self.channel_axis is None else f"channel(axis={self.channel_axis})"
        if self.group_size is not None:
            gran = f"group({self.group_size})"
        narrow = ", narrow" if self.narrow else ""
        return f"bits={self.bits}, symmetric={self.symmetric}{narrow}, granularity={gran}, enabled={self.enabled}"
