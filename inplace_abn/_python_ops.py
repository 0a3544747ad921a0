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

__all__ = [
    "statistics",
    "forward_",
    "forward_train_",
    "backward_reduce",
    "backward",
    "backward_train",
    "invert",
    "opmath_dtype",
    "update_running_stats",
    "weight_grad",
]


def opmath_dtype(dtype: torch.dtype) -> torch.dtype:
    """The accumulation dtype of ``dtype``: float64 stays float64, everything else computes in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _channel_shape(x: Tensor) -> Tuple[int, ...]:
    return (1, -1) + (1,) * (x.dim() - 2)


def _reduce_dims(x: Tensor) -> Tuple[int, ...]:
    return (0,) + tuple(range(2, x.dim()))


def _per_channel(v: Optional[Tensor], x: Tensor, dtype: torch.dtype) -> Optional[Tensor]:
    return None if v is None else v.to(dtype).view(_channel_shape(x))


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    # A Python check instead of a no-op ``.to``: each ATen call costs microseconds on small layers.
    return t if t.dtype == dtype else t.to(dtype)


def _is_ncs(t: Tensor) -> bool:
    """Contiguous (N, C, *) with a non-empty spatial part: every (n, c) row is one run of memory."""
    return t.is_contiguous() and t.dim() > 2 and t.numel() > 0


def _sum_of_squares(x: Tensor) -> Tensor:
    """Per-channel ``sum(x * x)`` of a contiguous (N, C, *) tensor, without a full-size temporary.

    One batched dot product of the (N*C, 1, S) rows: a fresh full-size buffer costs more on CPU (its
    first-touch page faults) than the pass itself.
    """
    n, c = x.shape[:2]
    rows = x.view(n * c, 1, -1)
    # The columns as transposed rows: MKL's batched gemm takes its fast path only for these strides
    # (a (N*C, S, 1) view with unit strides is ~15x slower).
    return torch.bmm(rows, rows.transpose(1, 2)).view(n, c).sum(0)


def statistics(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` (N, C, *), in the opmath dtype.

    Two passes (mean, then the centred sum of squares): no cancellation, and on CPU ``sum`` over
    (0, 2, ...) is several times faster than ATen's batch-norm statistics or ``var_mean``.
    """
    dtype = opmath_dtype(x.dtype)
    if x.numel() == 0:
        nan = torch.full((x.size(1),), float("nan"), dtype=dtype, device=x.device)
        return nan, nan.clone()
    dims, count = _reduce_dims(x), x.numel() // x.size(1)
    xs = x if x.dtype == dtype else x.to(dtype)
    mean = xs.sum(dims) / count
    centred = xs - mean.view(_channel_shape(x))
    return mean, centred.mul_(centred).sum(dims) / count


def _activation_into(z: Tensor, out: Tensor, activation: str, activation_param: float) -> None:
    """Writes act(z) into ``out`` in one pass (ATen's out= kernels; ``out`` may have any strides)."""
    if z.dtype != out.dtype:  # out= kernels need one dtype: activate z (opmath) in place, round once
        _activation_into(z, z, activation, activation_param)
        out.copy_(z)
        return
    if z is out:
        if activation == "leaky_relu":
            torch.nn.functional.leaky_relu_(out, activation_param)
        elif activation == "elu":
            torch.nn.functional.elu_(out, activation_param)
        return
    if activation == "leaky_relu":
        torch.ops.aten.leaky_relu.out(z, activation_param, out=out)
    elif activation == "elu":
        torch.ops.aten.elu.out(z, activation_param, 1.0, 1.0, out=out)
    elif activation == "identity":
        out.copy_(z)
    else:
        raise ValueError(f"activation must be one of 'identity', 'leaky_relu', 'elu', got {activation!r}")


def _gamma_beta(
    weight: Optional[Tensor], bias: Optional[Tensor], x: Tensor, eps: float, dtype: torch.dtype
) -> Tuple[Tensor, Tensor]:
    """(C,) vectors ``|w| + eps`` and ``b`` (ones / zeros without affine), in ``dtype``."""
    channels = x.size(1)
    gamma = torch.ones(channels, dtype=dtype, device=x.device) if weight is None else _cast(weight, dtype).abs().add_(eps)
    beta = torch.zeros(channels, dtype=dtype, device=x.device) if bias is None else _cast(bias, dtype)
    return gamma, beta


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
    gamma, beta = _gamma_beta(weight, bias, x, eps, dtype)
    scale = gamma * (var.to(dtype) + eps).rsqrt()
    shift = beta - mean.to(dtype) * scale
    shape = _channel_shape(x)
    if x.dtype == dtype:
        _activation_into(x.mul_(scale.view(shape)).add_(shift.view(shape)), x, activation, activation_param)
    else:  # half types: normalise in float32, round once
        _activation_into(torch.addcmul(shift.view(shape), x.to(dtype), scale.view(shape)), x, activation,
                         activation_param)  # fmt: skip


def update_running_stats(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, count: int, momentum: float
) -> None:
    """nn.BatchNorm's update, ``running += momentum * (batch - running)``, with the unbiased variance."""
    unbiased = var * (count / (count - 1))
    if running_mean.dtype == mean.dtype and running_var.dtype == var.dtype:
        torch._foreach_lerp_([running_mean, running_var], [mean, unbiased], momentum)  # one call for both
    else:
        running_mean.lerp_(_cast(mean, running_mean.dtype), momentum)
        running_var.lerp_(_cast(unbiased, running_var.dtype), momentum)


def weight_grad(weight: Tensor, sum_dz_xhat: Tensor) -> Tensor:
    """``sign(weight) * sum(dz * x_hat)`` with sign(0) = +1 (gamma = |w| + eps), in ``weight``'s dtype."""
    return _cast(torch.addcmul(sum_dz_xhat, sum_dz_xhat, weight < 0, value=-2.0), weight.dtype)


def forward_train_(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    momentum: float,
    eps: float,
    activation: str,
    activation_param: float,
) -> Tuple[Tensor, Tensor]:
    """``statistics`` then ``forward_``, and the running statistics updated; returns (mean, biased var).

    A contiguous float32/float64 input is processed without any full-size temporary: the mean, then
    ``x`` centred in place, the centred sum of squares as a batched dot product, then the affine map and
    the activation in place.
    """
    if x.dtype in (torch.float32, torch.float64) and _is_ncs(x):
        count = x.numel() // x.size(1)
        shape = _channel_shape(x)
        mean = x.mean(_reduce_dims(x), keepdim=True)
        x.sub_(mean)
        var = _sum_of_squares(x).div_(count)
        gamma, beta = _gamma_beta(weight, bias, x, eps, x.dtype)
        scale = (var + eps).rsqrt_().mul_(gamma)
        torch.addcmul(beta.view(shape), x, scale.view(shape), out=x)  # exact aliasing: elementwise, safe
        _activation_into(x, x, activation, activation_param)
        mean = mean.view(-1)
    else:
        mean, var = statistics(x)
        forward_(x, mean, var, weight, bias, eps, activation, activation_param)
    if running_mean is not None:
        update_running_stats(running_mean, running_var, mean, var, x.numel() // x.size(1), momentum)
    return mean, var


def _invert_z(
    y: Tensor, dy: Optional[Tensor], activation: str, activation_param: float, dtype: torch.dtype
) -> Tuple[Tensor, Optional[Tensor]]:
    """(z, dz) recovered from (y, dy) in ``dtype`` (math.md step 1), with ATen's activation kernels.

    The positive branch is y > 0, as in src/activation.h and PyTorch's own activation backwards.
    """
    F = torch.nn.functional
    y = _cast(y, dtype)
    dy = None if dy is None else _cast(dy, dtype)
    if activation == "leaky_relu":
        # leaky_relu is inverted by leaky_relu with the reciprocal slope.
        z = F.leaky_relu(y, 1.0 / activation_param)
        dz = None if dy is None else torch.ops.aten.leaky_relu_backward(dy, y, activation_param, True)
    elif activation == "elu":
        # z = y for y > 0, log1p(y / alpha) otherwise, written without torch.where (slow on CPU). The
        # clamp above -1 keeps a saturated output finite (see src/activation.h).
        lowest = -1.0 + torch.finfo(dtype).eps / 2
        z = torch.log1p((y * (1.0 / activation_param)).clamp_(lowest, 0.0)).add_(y.clamp_min(0.0))
        dz = None if dy is None else torch.ops.aten.elu_backward(dy, activation_param, 1.0, 1.0, True, y)
    elif activation == "identity":
        z, dz = y, dy
    else:
        raise ValueError(f"activation must be one of 'identity', 'leaky_relu', 'elu', got {activation!r}")
    return z, dz


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
    z, dz = _invert_z(y, dy, activation, activation_param, dtype)
    gamma, beta = _gamma_beta(weight, bias, y, eps, dtype)
    shape = _channel_shape(y)
    return (z - beta.view(shape)) / gamma.view(shape), dz


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
    gamma, _ = _gamma_beta(weight, bias, y, eps, dtype)
    gamma_rstd = gamma.view(_channel_shape(y)) * (_per_channel(var, y, dtype) + eps).rsqrt()
    if mean_dz is not None:
        dz = dz - _per_channel(mean_dz, y, dtype) - xhat * _per_channel(mean_dz_xhat, y, dtype)
    return torch.empty_like(y).copy_(dz * gamma_rstd)


def backward_train(
    y: Tensor,
    dy: Tensor,
    var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    activation: str,
    activation_param: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``backward_reduce`` then training ``backward`` on local statistics; returns (dx, grad_weight, grad_bias).

    One ATen batch-norm backward does both: fed z as its "input" with mean beta and invstd 1 / gamma,
    it recovers x_hat = (z - beta) / gamma itself, and a weight of gamma^2 * rstd turns its
    ``weight * invstd`` factor into the gamma * rstd that dx needs. (Measured against forming dx in
    place in the buffers of z and dz: one allocation less, but eight more ATen calls, and on small
    layers the calls cost more than the allocation.)
    """
    dtype = opmath_dtype(y.dtype)
    # z and dz in the opmath dtype, as the fused kernels do: rounding z to half would lose the
    # recovered pre-activation (badly so for ELU near saturation).
    z, dz = _invert_z(y, dy, activation, activation_param, dtype)
    gamma, beta = _gamma_beta(weight, bias, y, eps, dtype)
    rstd = (_cast(var, dtype) + eps).rsqrt_()
    dx, sum_dz_xhat, sum_dz = torch.ops.aten.native_batch_norm_backward(
        dz, z, rstd.mul_(gamma).mul_(gamma), None, None, beta, gamma.reciprocal(), True, eps, [True, True, True]
    )
    if dx.dtype != y.dtype or dx.stride() != y.stride():
        dx = torch.empty_like(y).copy_(dx)
    grad_weight = sum_dz_xhat if weight is None else weight_grad(weight, sum_dz_xhat)
    grad_bias = sum_dz if bias is None else _cast(sum_dz, bias.dtype)
    return dx, grad_weight, grad_bias


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
