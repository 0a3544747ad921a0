"""Pure-PyTorch implementations of the five inplace_abn ops, with the C++ ops' exact contracts.

Used when the extension is not built (or ``INPLACE_ABN_BACKEND=python``) and for devices without
compiled kernels. Same signatures, same dtype rules (statistics in the opmath dtype: float64 for
float64 inputs, float32 otherwise), same in-place behaviour of ``forward_``. Unlike the fused kernels,
the backward functions here materialise full-size temporaries; the autograd graph still stores only y.
"""

from __future__ import annotations

import functools
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
    "forward_train_saving_",
    "backward_train_saved",
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


@functools.lru_cache(maxsize=256)
def _constant(value: float, dtype: torch.dtype, device: torch.device) -> Tensor:
    """``value`` as a 0-dim tensor. As an operand of an elementwise op it acts as a Python number would,
    without the new wrapped-number tensor ATen makes from a Python number on every call."""
    return torch.tensor(value, dtype=dtype, device=device)


@functools.lru_cache(maxsize=64)
def _mean_weights(n: int, count: int, dtype: torch.dtype, device: torch.device) -> Tensor:
    """(n, 1) of 1 / count: ``vecdot(row_sums, this, dim=0)`` is the per-channel mean in one call."""
    return torch.full((n, 1), 1.0 / count, dtype=dtype, device=device)


@functools.lru_cache(maxsize=None)
def _spatial_dims(dim: int) -> Tuple[Tuple[int, ...], Tuple[int, ...]]:
    """The dims after (N, C) of a ``dim``-D input, and the view shape of a (C,) vector broadcast over it."""
    return tuple(range(2, dim)), (-1,) + (1,) * (dim - 2)


def _cast(t: Tensor, dtype: torch.dtype) -> Tensor:
    # A Python check instead of a no-op ``.to``: each ATen call costs microseconds on small layers.
    return t if t.dtype == dtype else t.to(dtype)


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
    gamma = torch.ones(channels, dtype=dtype, device=x.device) if weight is None else _gamma(weight, eps, dtype)
    beta = torch.zeros(channels, dtype=dtype, device=x.device) if bias is None else _cast(bias, dtype)
    return gamma, beta


def _gamma(weight: Tensor, eps: float, dtype: torch.dtype) -> Tensor:
    """The layer's scale ``|weight| + eps`` (C,), in ``dtype``."""
    return _cast(weight, dtype).abs().add_(eps)


def _scale(var: Tensor, gamma: Optional[Tensor], eps: float, dtype: torch.dtype) -> Tensor:
    """The normalisation's per-channel factor ``gamma / sqrt(var + eps)`` (C,), in ``dtype`` (gamma None: 1)."""
    scale = _cast(var, dtype).add(eps).rsqrt_()
    return scale if gamma is None else scale.mul_(gamma)


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
    scale = _scale(var, gamma, eps, dtype)
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
    _lerp_running_stats(running_mean, running_var, mean, var * (count / (count - 1)), momentum)


def _lerp_running_stats(
    running_mean: Tensor, running_var: Tensor, mean: Tensor, unbiased: Tensor, momentum: float
) -> None:
    # Two lerp_ calls: measured faster in a training step than one _foreach_lerp_ over both.
    running_mean.lerp_(_cast(mean, running_mean.dtype), momentum)
    running_var.lerp_(_cast(unbiased, running_var.dtype), momentum)


def weight_grad(weight: Tensor, sum_dz_xhat: Tensor) -> Tensor:
    """``sign(weight) * sum(dz * x_hat)`` with sign(0) = +1 (gamma = |w| + eps), in ``weight``'s dtype."""
    return _cast(_signed(sum_dz_xhat, weight), weight.dtype)


def _signed(values: Tensor, weight: Tensor) -> Tensor:
    """``sign(weight) * values`` with sign(0) = +1 (exact: v - 2 * v == -v)."""
    return torch.addcmul(values, values, weight < 0, value=-2.0)


def _batch_norm_backward_weights(
    scale: Tensor, gamma: Optional[Tensor], weight: Optional[Tensor]
) -> Tuple[Tensor, Tensor]:
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


def forward_train_saving_(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    momentum: float,
    eps: float,
    activation: str,
    activation_param: float,
    with_var: bool = True,
) -> Tuple[Tensor, Optional[Tensor], Tuple[Tensor, ...]]:
    """``forward_train_`` that also returns what ``backward_train_saved`` needs: (mean, var, saved).

    ``saved`` holds the two (C,) constants of ``_batch_norm_backward_weights`` (kept instead of var,
    so that backward makes no per-channel ATen calls of its own), or ``(var,)`` when the input takes the
    general path. ``with_var=False``: the caller needs no var, and the fast path returns None for it.
    """
    if running_mean is not None and x.numel() <= max(x.size(1), 1):  # count <= 1, as the compiled op checks
        raise RuntimeError(
            "running_var: the unbiased batch variance needs more than 1 value per channel, got input size "
            f"{list(x.shape)}"
        )
    dtype = x.dtype
    if (
        dtype in _ROWS_DTYPES and x.is_contiguous() and x.dim() > 2 and x.numel() > 0
        and (weight is None or weight.dtype == dtype) and (bias is None or bias.dtype == dtype)
    ):  # fmt: skip
        # Contiguous float32/float64 with parameters of its dtype: in place, no full-size temporary.
        # Every full-size pass is one ATen call over the rows of S = prod(*) elements (dims 2, ...):
        # row sums, centring, row norms, the affine map, the activation. On CPU the rows split over
        # threads the same way in every pass (a reduction over dims (0, 2, ...) splits differently, and
        # the next pass then reads half its data from the other core's cache). On small layers the
        # number of ATen calls, not the bytes, is what costs: in a training step, with the caches full
        # of activations, each per-channel call takes several microseconds. Hence the (C,) math below
        # in as few calls as it takes, with cached 0-dim constants instead of Python numbers, and all
        # of it inline here.
        n, c = x.shape[:2]
        count = x.numel() // c
        spatial, column = _spatial_dims(x.dim())
        device = x.device
        mean = torch.linalg.vecdot(x.sum(spatial), _mean_weights(n, count, dtype, device), dim=0)
        x.sub_(mean.view(column))
        norms = torch.linalg.vector_norm(x, 2, spatial)
        sumsq = torch.linalg.vecdot(norms, norms, dim=0)
        count_t, eps_t = _constant(count, dtype, device), _constant(eps, dtype, device)
        if with_var:
            var = sumsq.div(count_t)
            scale = var.add(eps_t).rsqrt_()
        else:
            var = None
            scale = torch.addcdiv(eps_t, sumsq, count_t).rsqrt_()
        if weight is None:
            saved = (scale, torch.ones_like(scale))
        else:
            gamma = weight.abs()
            # weight < |weight| is weight < 0 (-0.0 included: it is not negative) without a wrapped scalar
            negative = weight < gamma
            scale.mul_(gamma.add_(eps_t))
            signed = torch.addcmul(gamma, gamma, negative, value=-2.0)
            saved = (scale.mul(signed), signed.reciprocal_())  # _batch_norm_backward_weights, inline
        if running_mean is not None:
            unbiased = sumsq.div_(_constant(count - 1, dtype, device))
            _lerp_running_stats(running_mean, running_var, mean, unbiased, momentum)
        # The full-size passes last, after all the per-channel calls.
        x.mul_(scale.view(column))
        if bias is not None:
            x.add_(bias.view(column))
        if activation == "leaky_relu":
            torch.nn.functional.leaky_relu_(x, activation_param)
        elif activation != "identity":
            _activation_into(x, x, activation, activation_param)
        return mean, var, saved
    mean, var = statistics(x)
    forward_(x, mean, var, weight, bias, eps, activation, activation_param)
    if running_mean is not None:
        update_running_stats(running_mean, running_var, mean, var, x.numel() // x.size(1), momentum)
    return mean, var, (var,)


_ROWS_DTYPES = (torch.float32, torch.float64)


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

    A contiguous float32/float64 input is processed without any full-size temporary (see
    ``forward_train_saving_``).
    """
    mean, var, _ = forward_train_saving_(
        x, weight, bias, running_mean, running_var, momentum, eps, activation, activation_param
    )
    return mean, var


# The ATen kernels of the backward, resolved once: each lookup through torch.ops / torch.nn.functional is
# a Python call of its own, and the pure backward of a small layer makes only three kernel calls.
_leaky_relu = torch._C._nn.leaky_relu
_leaky_relu_backward = torch.ops.aten.leaky_relu_backward.default
_batch_norm_backward = torch.ops.aten.native_batch_norm_backward.default


def _invert_z(
    y: Tensor, dy: Optional[Tensor], activation: str, activation_param: float, dtype: torch.dtype
) -> Tuple[Tensor, Optional[Tensor]]:
    """(z, dz) recovered from (y, dy) in ``dtype`` (math.md step 1), with ATen's activation kernels.

    The positive branch is y > 0, as in src/activation.h and PyTorch's own activation backwards.
    """
    if y.dtype != dtype:
        y = y.to(dtype)
    if dy is not None and dy.dtype != dtype:
        dy = dy.to(dtype)
    if activation == "leaky_relu":
        # leaky_relu is inverted by leaky_relu with the reciprocal slope.
        z = _leaky_relu(y, 1.0 / activation_param)
        dz = None if dy is None else _leaky_relu_backward(dy, y, activation_param, True)
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
    gamma_rstd = _scale(var, gamma, eps, dtype).view(_channel_shape(y))
    if mean_dz is not None:
        dz = dz - _per_channel(mean_dz, y, dtype) - xhat * _per_channel(mean_dz_xhat, y, dtype)
    return torch.empty_like(y).copy_(dz * gamma_rstd)


def backward_train_saved(
    y: Tensor,
    dy: Tensor,
    saved: Tuple[Tensor, ...],
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    activation: str,
    activation_param: float,
) -> Tuple[Tensor, Tensor, Tensor]:
    """``backward_train`` from the state ``forward_train_saving_`` returned: its two constants, or ``(var,)``.

    z and dz are formed in the opmath dtype, as the fused kernels do: rounding z to half would lose the
    recovered pre-activation (badly so for ELU near saturation). Then ONE ATen batch-norm backward gives
    dx and both parameter gradients (see ``_batch_norm_backward_weights``). (Measured against forming
    dx in place in the buffers of z and dz: one allocation less, but eight more ATen calls, and on small
    layers the calls cost more than the allocation.)
    """
    if len(saved) == 2:
        # The state of the forward's fast path: y is contiguous float32/float64 and the parameters share its
        # dtype, so nothing below needs a cast or a copy to y's layout.
        nb_weight, nb_invstd = saved
        z, dz = _invert_z(y, dy, activation, activation_param, y.dtype)
        beta = torch.zeros_like(nb_invstd) if bias is None else bias
        return _batch_norm_backward(dz, z, nb_weight, None, None, beta, nb_invstd, True, eps, [True, True, True])
    dtype = opmath_dtype(y.dtype)
    z, dz = _invert_z(y, dy, activation, activation_param, dtype)
    gamma = None if weight is None else _gamma(weight, eps, dtype)
    nb_weight, nb_invstd = _batch_norm_backward_weights(_scale(saved[0], gamma, eps, dtype), gamma, weight)
    beta = torch.zeros_like(nb_invstd) if bias is None else _cast(bias, dtype)
    dx, grad_weight, grad_bias = _batch_norm_backward(
        dz, z, nb_weight, None, None, beta, nb_invstd, True, eps, [True, True, True]
    )
    if dx.dtype != y.dtype or dx.stride() != y.stride():
        dx = torch.empty_like(y).copy_(dx)
    if weight is not None:
        grad_weight = _cast(grad_weight, weight.dtype)
    if bias is not None:
        grad_bias = _cast(grad_bias, bias.dtype)
    return dx, grad_weight, grad_bias


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
    """``backward_reduce`` then training ``backward`` on local statistics; returns (dx, grad_weight, grad_bias)."""
    return backward_train_saved(y, dy, (var,), weight, bias, eps, activation, activation_param)


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
