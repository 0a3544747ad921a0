"""Pure-PyTorch implementations of the five inplace_abn ops, with the C++ ops' exact contracts.

Used when the extension is not built (or ``INPLACE_ABN_BACKEND=python``) and for devices without
compiled kernels. Same signatures, same dtype rules (statistics in the opmath dtype: float64 for
float64 inputs, float32 otherwise), same in-place behaviour of ``forward_``. Unlike the fused kernels,
the backward functions here materialise full-size temporaries; the autograd graph still stores only y.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

__all__ = ["statistics", "forward_", "backward_reduce", "backward", "invert", "opmath_dtype"]


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of ``dtype``: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channel_shape(x: Tensor) -> Tuple[int, ...]:
    return (1, -1) + (1,) * (x.dim() - 2)


def _reduce_dims(x: Tensor) -> Tuple[int, ...]:
    return (0,) + tuple(range(2, x.dim()))


def _per_channel(v: Optional[Tensor], x: Tensor, dtype: torch.dtype) -> Optional[Tensor]:
    return None if v is None else v.to(dtype).view(_channel_shape(x))


def _affine(
    weight: Optional[Tensor], bias: Optional[Tensor], x: Tensor, eps: float, dtype: torch.dtype
) -> Tuple[Tensor | float, Tensor | float]:
    gamma = 1.0 if weight is None else _per_channel(weight, x, dtype).abs() + eps
    beta = 0.0 if bias is None else _per_channel(bias, x, dtype)
    return gamma, beta


def statistics(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` (N, C, *), in the opmath dtype."""
    dtype = opmath_dtype(x.dtype)
    if x.numel() == 0:
        nan = torch.full((x.size(1),), float("nan"), dtype=dtype, device=x.device)
        return nan, nan.clone()
    # ATen's batch-norm statistics kernels are the fastest reduction PyTorch offers on every device
    # (var_mean over (0, 2, 3) is several times slower on CPU). eps=0 makes invstd = 1/std exactly, so
    # the variance comes back without an eps round trip.
    xs = x.to(dtype) if x.dtype != dtype and x.device.type == "cpu" and x.dtype == torch.float16 else x
    _, mean, invstd = torch.native_batch_norm(xs, None, None, None, None, True, 0.0, 0.0)
    var = invstd.to(dtype).reciprocal().square()
    return mean.to(dtype), var


def _activation_inplace(z: Tensor, activation: str, activation_param: float) -> Tensor:
    if activation == "leaky_relu":
        return torch.nn.functional.leaky_relu_(z, activation_param)
    if activation == "elu":
        return torch.nn.functional.elu_(z, activation_param)
    if activation == "identity":
        return z
    raise ValueError(f"activation must be one of 'identity', 'leaky_relu', 'elu', got {activation!r}")


def forward_(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    activation: str,
    activation_param: float,
) -> None:
    """Writes ``act(gamma * (x - mean) / sqrt(var + eps) + beta)`` over ``x`` (N, C, *)."""
    dtype = opmath_dtype(x.dtype)
    gamma, beta = _affine(weight, bias, x, eps, dtype)
    rstd = (_per_channel(var, x, dtype) + eps).rsqrt()
    scale = gamma * rstd
    shift = beta - _per_channel(mean, x, dtype) * scale
    if dtype == x.dtype:
        x.mul_(scale).add_(shift)
        _activation_inplace(x, activation, activation_param)
    else:  # half types: compute in float32, round once
        z = torch.addcmul(shift, x.to(dtype), scale)
        x.copy_(_activation_inplace(z, activation, activation_param))


def _invert(
    y: Tensor,
    dy: Optional[Tensor],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    activation: str,
    activation_param: float,
) -> Tuple[Tensor, Optional[Tensor]]:
    """Recovers (x_hat, dz) from the output (math.md steps 1-2), in the opmath dtype."""
    dtype = opmath_dtype(y.dtype)
    yo = y.to(dtype)
    dyo = None if dy is None else dy.to(dtype)
    if activation == "leaky_relu":
        neg = yo < 0
        z = torch.where(neg, yo * (1.0 / activation_param), yo)
        dz = None if dyo is None else torch.where(neg, dyo * activation_param, dyo)
    elif activation == "elu":
        neg = yo < 0
        # Clamp above -1 so a saturated output gives a finite z (see src/activation.h).
        lowest = -1.0 + torch.finfo(dtype).eps / 2
        z = torch.where(neg, torch.log1p((yo * (1.0 / activation_param)).clamp_min(lowest)), yo)
        dz = None if dyo is None else torch.where(neg, dyo * (yo + activation_param), dyo)
    elif activation == "identity":
        z, dz = yo, dyo
    else:
        raise ValueError(f"activation must be one of 'identity', 'leaky_relu', 'elu', got {activation!r}")
    gamma, beta = _affine(weight, bias, y, eps, dtype)
    xhat = (z - beta) * (1.0 / gamma) if isinstance(gamma, float) else (z - beta) * gamma.reciprocal()
    return xhat, dz


def backward_reduce(
    y: Tensor,
    dy: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    activation: str,
    activation_param: float,
) -> Tuple[Tensor, Tensor]:
    """Per-channel sums of dz and dz * x_hat, recovered from the output ``y`` (N, C, *)."""
    xhat, dz = _invert(y, dy, weight, bias, eps, activation, activation_param)
    dims = _reduce_dims(y)
    return dz.sum(dims), (dz * xhat).sum(dims)


def backward(
    y: Tensor,
    dy: Tensor,
    var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    mean_dz: Optional[Tensor],
    mean_dz_xhat: Optional[Tensor],
    eps: float,
    activation: str,
    activation_param: float,
) -> Tensor:
    """dx of the layer (N, C, *); ``mean_dz``/``mean_dz_xhat`` None means eval mode."""
    dtype = opmath_dtype(y.dtype)
    xhat, dz = _invert(y, dy, weight, bias, eps, activation, activation_param)
    gamma, _ = _affine(weight, bias, y, eps, dtype)
    gamma_rstd = gamma * (_per_channel(var, y, dtype) + eps).rsqrt()
    if mean_dz is not None:
        dz = dz - _per_channel(mean_dz, y, dtype) - xhat * _per_channel(mean_dz_xhat, y, dtype)
    dx = (dz * gamma_rstd).to(y.dtype)
    return dx if dx.stride() == torch.empty_like(y).stride() else torch.empty_like(y).copy_(dx)


def invert(
    y: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    activation: str,
    activation_param: float,
) -> Tensor:
    """x_hat recovered from the output ``y`` (N, C, *), in ``y``'s dtype."""
    xhat, _ = _invert(y, None, weight, bias, eps, activation, activation_param)
    out = torch.empty_like(y)
    return out.copy_(xhat)
