"""The pure-PyTorch backend: the eight ``inplace_abn`` ops (schemas in src/ops.cpp) written with ATen calls.

It runs when the compiled extension is not built, when ``INPLACE_ABN_BACKEND=python`` is set, and for
devices without compiled kernels. Same signatures, same dtype rules (statistics in the opmath dtype:
float64 for float64 inputs, float32 otherwise), same in-place behaviour as the compiled kernels. It is
a backend, not a reference: it computes in the input's precision and is tested against the float64
reference in ``reference.py``. The activation math comes from ``activations.py``; the derivation of
every step is in ``docs/math.md``.

Unlike the fused kernels, the backward functions here materialise full-size temporaries; the autograd
graph still keeps only the layer's output.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import activations

__all__ = [
    "statistics",
    "absmax",
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


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    return t if t.dtype == dtype else t.to(dtype)


def _channel_shape(x: Tensor) -> tuple[int, ...]:
    """The view shape that broadcasts a (C,) vector over an (N, C, *) tensor."""
    return (1, -1) + (1,) * (x.dim() - 2)


def _reduce_dims(x: Tensor) -> tuple[int, ...]:
    return (0,) + tuple(range(2, x.dim()))


def _gamma_beta(
    weight: Tensor | None, bias: Tensor | None, x: Tensor, eps: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor]:
    """(C,) vectors ``gamma = |w| + eps`` and ``beta = b`` (ones / zeros without affine), in ``dtype``."""
    channels = x.size(1)
    gamma = torch.ones(channels, dtype=dtype, device=x.device) if weight is None else _gamma(weight, eps, dtype)
    beta = torch.zeros(channels, dtype=dtype, device=x.device) if bias is None else _cast(bias, dtype)
    return gamma, beta


def _gamma(weight: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """The layer's scale ``|weight| + eps`` (C,), in ``dtype``."""
    return _cast(weight, dtype).abs().add_(eps)


def _scale(var: Tensor, gamma: Tensor | None, eps: float, dtype: torch.dtype) -> Tensor:
    """The normalisation's per-channel factor ``gamma / sqrt(var + eps)`` (C,), in ``dtype`` (gamma None: 1)."""
    scale = _cast(var, dtype).add(eps).rsqrt_()
    return scale if gamma is None else scale.mul_(gamma)


def _centre_(xs: Tensor) -> tuple[Tensor, Tensor]:
    """Subtracts the per-channel mean from ``xs`` (N, C, *) in place; returns (mean, biased var) (C,).

    Two passes over the data (the mean, then the norms of the centred values), so there is no
    cancellation and no full-size temporary. Both reductions run over the contiguous trailing dims
    first, then over N: on CPU a single reduction over dims (0, 2, ...) is several times slower.
    """
    count = xs.numel() // xs.size(1) if xs.size(1) else 0
    rows = xs if xs.dim() > 2 else xs.unsqueeze(-1)  # a view: (N, C) gets one trailing dim to reduce
    spatial = tuple(range(2, rows.dim()))
    mean = rows.sum(spatial).sum(0).div_(count)
    rows.sub_(mean.view((-1,) + (1,) * len(spatial)))
    var = torch.linalg.vector_norm(rows, 2, spatial).square_().sum(0).div_(count)
    return mean, var


def _normalise_(
    xc: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str,
    activation_param: float,
    residual: Tensor | None,
) -> None:
    """Turns centred values ``xc`` (N, C, *), in the opmath dtype, into ``act(gamma * xc * rstd + beta [+ r])``
    in place (docs/math.md, forward and "Residual fusion")."""
    gamma = None if weight is None else _gamma(weight, eps, xc.dtype)
    shape = _channel_shape(xc)
    xc.mul_(_scale(var, gamma, eps, xc.dtype).view(shape))
    if bias is not None:
        xc.add_(_cast(bias, xc.dtype).view(shape))
    if residual is not None:
        xc.add_(residual)  # type promotion: a half residual is added in xc's float32
    activations.get(activation).apply_(xc, activation_param)


def statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` (N, C, *), in the opmath dtype (C,)."""
    return _centre_(x.to(opmath_dtype(x.dtype), copy=True))  # a copy: statistics writes nothing


def absmax(x: Tensor) -> Tensor:
    """Per-channel ``max |x|`` of ``x`` (N, C, *), in the opmath dtype (C,); NaN where a channel holds one."""
    return torch.linalg.vector_norm(x, float("inf"), _reduce_dims(x), dtype=opmath_dtype(x.dtype))


def forward_(
    x: Tensor,
    mean: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str,
    activation_param: float,
    residual: Tensor | None = None,
) -> None:
    """Writes ``act(gamma * (x - mean) / sqrt(var + eps) + beta [+ residual])`` over ``x`` (N, C, *)."""
    _check_residual(x, "x", residual)
    xs = _cast(x, opmath_dtype(x.dtype))  # half types: computed in float32, rounded once below
    xs.sub_(_cast(mean, xs.dtype).view(_channel_shape(x)))
    _normalise_(xs, var, weight, bias, eps, activation, activation_param, residual)
    if xs is not x:
        x.copy_(xs)


def update_running_stats(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, var: Tensor, count: int, momentum: float
) -> None:
    """nn.BatchNorm's update, ``running += momentum * (batch - running)``, with the unbiased variance."""
    running_mean.lerp_(_cast(mean, running_mean.dtype), momentum)
    running_var.lerp_(_cast(var * (count / (count - 1)), running_var.dtype), momentum)


def forward_train_(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    momentum: float,
    eps: float,
    activation: str,
    activation_param: float,
    residual: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """``statistics`` then ``forward_`` in one pass structure (x is centred in place, so no full-size
    temporary for float32/float64), and the running statistics (when given) updated; returns
    (mean, biased var) (C,)."""
    count = x.numel() // x.size(1) if x.size(1) else 0
    if running_mean is not None and count <= 1:  # the compiled op's check, with its message
        raise RuntimeError(
            "running_var: the unbiased batch variance needs more than 1 value per channel, got input size "
            f"{list(x.shape)}"
        )
    _check_residual(x, "x", residual)
    xs = _cast(x, opmath_dtype(x.dtype))  # half types: computed in float32, rounded once below
    mean, var = _centre_(xs)
    _normalise_(xs, var, weight, bias, eps, activation, activation_param, residual)
    if xs is not x:
        x.copy_(xs)
    if running_mean is not None:
        update_running_stats(running_mean, running_var, mean, var, count, momentum)
    return mean, var


def _invert(
    y: Tensor,
    dy: Tensor | None,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str,
    activation_param: float,
    residual: Tensor | None,
) -> tuple[Tensor, Tensor | None]:
    """Recovers (x_hat, dz) from the output (docs/math.md steps 1-2; the residual, if any, is removed first),
    in the opmath dtype."""
    _check_residual(y, "y", residual)
    dtype = opmath_dtype(y.dtype)
    z, dz = _invert_activation(y, dy, activation, activation_param, dtype)
    if residual is not None:
        z = z - residual
    gamma, beta = _gamma_beta(weight, bias, y, eps, dtype)
    shape = _channel_shape(y)
    return (z - beta.view(shape)) / gamma.view(shape), dz


def _invert_activation(
    y: Tensor, dy: Tensor | None, activation: str, activation_param: float, dtype: torch.dtype
) -> tuple[Tensor, Tensor | None]:
    """(z, dz) recovered from (y, dy) in ``dtype`` (docs/math.md step 1).

    In the opmath dtype, as the fused kernels do: rounding z to half would lose the recovered
    pre-activation (badly so for ELU near saturation).
    """
    y = _cast(y, dtype)
    act = activations.get(activation)
    dz = None if dy is None else act.grad(_cast(dy, dtype), y, activation_param)
    return act.inverse(y, activation_param), dz


def backward_reduce(
    y: Tensor,
    dy: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str,
    activation_param: float,
    residual: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Per-channel sums (C,) of dz and dz * x_hat, recovered from the output ``y`` (N, C, *)."""
    xhat, dz = _invert(y, dy, weight, bias, eps, activation, activation_param, residual)
    dims = _reduce_dims(y)
    return dz.sum(dims), (dz * xhat).sum(dims)


def backward(
    y: Tensor,
    dy: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    mean_dz: Tensor | None,
    mean_dz_xhat: Tensor | None,
    eps: float,
    activation: str,
    activation_param: float,
    residual: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """(dx, grad_residual) of the layer (N, C, *) with ``y``'s dtype and strides; ``mean_dz``/``mean_dz_xhat``
    None: eval mode. grad_residual = dz with a residual, an empty (0,) tensor without."""
    dtype = opmath_dtype(y.dtype)
    xhat, dz = _invert(y, dy, weight, bias, eps, activation, activation_param, residual)
    grad_residual = _grad_residual(y, dz, residual)
    gamma, _ = _gamma_beta(weight, bias, y, eps, dtype)
    shape = _channel_shape(y)
    gamma_rstd = _scale(var, gamma, eps, dtype).view(shape)
    if mean_dz is not None:
        dz = dz - _cast(mean_dz, dtype).view(shape) - xhat * _cast(mean_dz_xhat, dtype).view(shape)
    return torch.empty_like(y).copy_(dz * gamma_rstd), grad_residual


def _check_residual(x: Tensor, name: str, residual: Tensor | None) -> None:
    """The compiled ops' rule: the residual has x's shape, dtype and device (no broadcasting)."""
    if residual is not None and (residual.shape != x.shape or residual.dtype != x.dtype or residual.device != x.device):
        raise RuntimeError(
            f"residual and {name} must have the same shape, dtype and device, got {list(residual.shape)} "
            f"{residual.dtype} {residual.device} and {list(x.shape)} {x.dtype} {x.device}"
        )


def _grad_residual(y: Tensor, dz: Tensor, residual: Tensor | None) -> Tensor:
    """dL/dresidual = dz in y's dtype and strides, or an empty (0,) tensor without a residual."""
    return y.new_empty((0,)) if residual is None else torch.empty_like(y).copy_(dz)


def weight_grad(weight: Tensor, sum_dz_xhat: Tensor) -> Tensor:
    """``sign(weight) * sum(dz * x_hat)`` with sign(0) = +1 (gamma = |w| + eps), in ``weight``'s dtype."""
    return _cast(_signed(sum_dz_xhat, weight), weight.dtype)


def _signed(values: Tensor, weight: Tensor) -> Tensor:
    """``sign(weight) * values`` with sign(0) = +1 (exact: v - 2 * v == -v)."""
    return torch.addcmul(values, values, weight < 0, value=-2.0)


def _batch_norm_backward_weights(scale: Tensor, gamma: Tensor | None, weight: Tensor | None) -> tuple[Tensor, Tensor]:
    """The (weight, invstd) that make ATen's batch-norm backward compute this layer's backward from z,
    given ``scale`` = gamma * rstd (reused in place) and gamma = |w| + eps (None without affine).

    Fed z as its "input", mean beta and invstd 1 / g with g = sign(w) * gamma, ATen recovers
    x_hat' = (z - beta) / g = sign(w) * x_hat, so its weight gradient sum(dz * x_hat') is already
    sign(w) * sum(dz * x_hat); its dx term x_hat' * mean(dz * x_hat') is sign-free. A weight of
    g * gamma * rstd turns its ``weight * invstd`` factor into the gamma * rstd that dx needs.
    """
    if weight is None:
        return scale, torch.ones_like(scale)
    signed = _signed(gamma, weight)
    return scale.mul_(signed), signed.reciprocal()


def backward_train(
    y: Tensor,
    dy: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str,
    activation_param: float,
    residual: Tensor | None = None,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Training backward on local statistics; returns (dx (N, C, *), grad_weight (C,), grad_bias (C,),
    grad_residual).

    z and dz are recovered in the opmath dtype, then ONE ATen batch-norm backward gives dx and both
    parameter gradients (see ``_batch_norm_backward_weights``). With a residual, z - residual is the
    batch-norm output, and grad_residual = dz (an empty (0,) tensor without a residual).
    """
    _check_residual(y, "y", residual)
    dtype = opmath_dtype(y.dtype)
    z, dz = _invert_activation(y, dy, activation, activation_param, dtype)
    if residual is not None:
        z = z - residual
    grad_residual = _grad_residual(y, dz, residual)
    gamma = None if weight is None else _gamma(weight, eps, dtype)
    nb_weight, nb_invstd = _batch_norm_backward_weights(_scale(var, gamma, eps, dtype), gamma, weight)
    beta = torch.zeros_like(nb_invstd) if bias is None else _cast(bias, dtype)
    dx, grad_weight, grad_bias = torch.ops.aten.native_batch_norm_backward(
        dz, z, nb_weight, None, None, beta, nb_invstd, True, eps, [True, True, True]
    )
    if dx.dtype != y.dtype or dx.stride() != y.stride():
        dx = torch.empty_like(y).copy_(dx)
    if weight is not None:
        grad_weight = _cast(grad_weight, weight.dtype)
    if bias is not None:
        grad_bias = _cast(grad_bias, bias.dtype)
    return dx, grad_weight, grad_bias, grad_residual


def invert(
    y: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str,
    activation_param: float,
    residual: Tensor | None = None,
) -> Tensor:
    """x_hat recovered from the output ``y`` (N, C, *) (and the ``residual`` the forward added), in ``y``'s
    dtype and strides."""
    xhat, _ = _invert(y, None, weight, bias, eps, activation, activation_param, residual)
    return torch.empty_like(y).copy_(xhat)
