"""Thin typed wrappers over ``torch.ops.inplace_abn`` (schemas in src/ops.cpp), and their fake kernels.

One wrapper per op, same arguments as its schema. Each runs the compiled kernel when the active backend
is "cpp" and the extension registered a kernel for the tensor's device; otherwise the pure-PyTorch
twin of the same name in ``pure_backend`` runs (same contract).
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import _backend, pure_backend
from .pure_backend import opmath_dtype

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
]

# Device types the compiled kernels serve ("meta": the fake kernels below). Registrations are fixed once
# _C is loaded, so this is computed at import; a constant set is also what torch.compile traces through.
_COMPILED_DEVICES = frozenset(
    [device for device in ("cpu", "cuda") if _backend.has_kernel(device)]
    + (["meta"] if _backend.extension_loaded() else [])
)


def _compiled(t: Tensor) -> bool:
    """True when the compiled kernels serve ``t``: backend "cpp" and kernels for its device."""
    return _backend.get_backend() == "cpp" and t.device.type in _COMPILED_DEVICES


def statistics(x: Tensor) -> tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` (N, C, *), in the opmath dtype (C,)."""
    if _compiled(x):
        return torch.ops.inplace_abn.statistics(x)
    return pure_backend.statistics(x)


def absmax(x: Tensor) -> Tensor:
    """Per-channel ``max |x|`` of ``x`` (N, C, *), in the opmath dtype (C,); NaN where a channel holds one."""
    if _compiled(x):
        return torch.ops.inplace_abn.absmax(x)
    return pure_backend.absmax(x)


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
    """Overwrites ``x`` (N, C, *) with ``act((|w| + eps) * (x - mean) / sqrt(var + eps) + b [+ residual])``."""
    args = (x, mean, var, weight, bias, eps, activation, activation_param, residual)
    if _compiled(x):
        torch.ops.inplace_abn.forward_(*args)
    else:
        pure_backend.forward_(*args)


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
    """Training forward on local statistics: ``statistics`` then ``forward_``, and the running statistics
    (C,) (when given) updated as nn.BatchNorm does; returns (mean, biased var) (C,)."""
    args = (x, weight, bias, running_mean, running_var, momentum, eps, activation, activation_param, residual)
    if _compiled(x):
        return torch.ops.inplace_abn.forward_train_(*args)
    return pure_backend.forward_train_(*args)


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
    """Per-channel (C,) sums of dz and dz * x_hat, recovered from the output ``y`` (N, C, *) (and the
    ``residual`` the forward added, if any)."""
    args = (y, dy, weight, bias, eps, activation, activation_param, residual)
    if _compiled(y):
        return torch.ops.inplace_abn.backward_reduce(*args)
    return pure_backend.backward_reduce(*args)


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
    """(dx (N, C, *) with ``y``'s strides, grad_residual); ``mean_dz``/``mean_dz_xhat`` None selects eval mode.

    grad_residual is dL/dresidual = dz (N, C, *) with a ``residual``, an empty (0,) tensor without.
    """
    args = (y, dy, var, weight, bias, mean_dz, mean_dz_xhat, eps, activation, activation_param, residual)
    if _compiled(y):
        return torch.ops.inplace_abn.backward(*args)
    return pure_backend.backward(*args)


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

    grad_weight = sign(weight) * sum(dz * x_hat) with sign(0) = +1, grad_bias = sum(dz), each in its
    parameter's dtype (the opmath dtype when the parameter is None). grad_residual is dz (N, C, *) with a
    ``residual``, an empty (0,) tensor without.
    """
    args = (y, dy, var, weight, bias, eps, activation, activation_param, residual)
    if _compiled(y):
        return torch.ops.inplace_abn.backward_train(*args)
    return pure_backend.backward_train(*args)


def invert(
    y: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    activation: str,
    activation_param: float,
    residual: Tensor | None = None,
) -> Tensor:
    """x_hat (N, C, *) recovered from the output ``y`` (and the ``residual`` the forward added), in ``y``'s
    dtype and strides."""
    args = (y, weight, bias, eps, activation, activation_param, residual)
    if _compiled(y):
        return torch.ops.inplace_abn.invert(*args)
    return pure_backend.invert(*args)


# Fake (meta) kernels: shapes, dtypes and strides only, for torch.compile, export and meta-device memory
# counting. forward_ returns nothing and mutates only its first argument, so it needs no fake kernel; a
# no-op Meta kernel lets whole models run on device="meta" (memory counting without memory).
if _backend.extension_loaded():

    def _check_input(x: Tensor, name: str) -> None:
        if x.dim() < 2:
            raise RuntimeError(f"{name} must have shape (N, C, *) with at least 2 dimensions, got {tuple(x.shape)}")

    def _check_same_shape(y: Tensor, dy: Tensor) -> None:
        if y.shape != dy.shape:
            raise RuntimeError(f"dy must have the shape of y {tuple(y.shape)}, got {tuple(dy.shape)}")

    def _check_residual(x: Tensor, residual: Tensor | None) -> None:
        if residual is not None and residual.shape != x.shape:
            raise RuntimeError(f"residual must have the shape of x {tuple(x.shape)}, got {tuple(residual.shape)}")

    def _channel_vectors(t: Tensor, count: int) -> tuple[Tensor, ...]:
        return tuple(t.new_empty((t.size(1),), dtype=opmath_dtype(t.dtype)) for _ in range(count))

    @torch.library.impl("inplace_abn::forward_", "Meta")
    def _forward_meta(x, mean, var, weight, bias, eps, activation, activation_param, residual=None):
        return None

    @torch.library.register_fake("inplace_abn::absmax")
    def _absmax_fake(x):
        _check_input(x, "x")
        return _channel_vectors(x, 1)[0]

    @torch.library.register_fake("inplace_abn::statistics")
    def _statistics_fake(x):
        _check_input(x, "x")
        return _channel_vectors(x, 2)

    @torch.library.register_fake("inplace_abn::forward_train_")
    def _forward_train_fake(
        x, weight, bias, running_mean, running_var, momentum, eps, activation, activation_param, residual=None
    ):
        _check_input(x, "x")
        _check_residual(x, residual)
        return _channel_vectors(x, 2)

    @torch.library.register_fake("inplace_abn::backward_reduce")
    def _backward_reduce_fake(y, dy, weight, bias, eps, activation, activation_param, residual=None):
        _check_same_shape(y, dy)
        _check_residual(y, residual)
        return _channel_vectors(y, 2)

    def _grad_residual_fake(y: Tensor, residual: Tensor | None) -> Tensor:
        return torch.empty_like(y) if residual is not None else y.new_empty((0,))

    @torch.library.register_fake("inplace_abn::backward")
    def _backward_fake(
        y, dy, var, weight, bias, mean_dz, mean_dz_xhat, eps, activation, activation_param, residual=None
    ):
        _check_same_shape(y, dy)
        _check_residual(y, residual)
        return torch.empty_like(y), _grad_residual_fake(y, residual)

    @torch.library.register_fake("inplace_abn::backward_train")
    def _backward_train_fake(y, dy, var, weight, bias, eps, activation, activation_param, residual=None):
        _check_same_shape(y, dy)
        _check_residual(y, residual)
        dtype = opmath_dtype(y.dtype)
        grads = tuple(y.new_empty((y.size(1),), dtype=dtype if p is None else p.dtype) for p in (weight, bias))
        return (torch.empty_like(y),) + grads + (_grad_residual_fake(y, residual),)

    @torch.library.register_fake("inplace_abn::invert")
    def _invert_fake(y, weight, bias, eps, activation, activation_param, residual=None):
        _check_residual(y, residual)
        return torch.empty_like(y)
