"""Thin typed wrappers over ``torch.ops.inplace_abn`` (schemas in src/ops.cpp), with their fake kernels.

Each wrapper runs the compiled kernel when the active backend is "cpp" and the extension has a kernel for
the tensor's device; otherwise the pure-PyTorch twin in ``_python_ops`` (same contract) runs.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
from torch import Tensor

from . import _backend, _python_ops

__all__ = [
    "statistics",
    "forward_",
    "forward_train_",
    "backward_reduce",
    "backward",
    "backward_train",
    "invert",
    "forward_train_saving_",
    "backward_train_saved",
]


# device type -> has compiled kernels. Registrations are fixed once _C is loaded, so this is filled at
# import: a plain dict lookup at call time is also what lets torch.compile trace through without a break.
_KERNELS: dict = {device: device == "meta" or _backend.has_kernel(device) for device in ("cpu", "cuda", "meta")}


class _Overloads:
    """The ``.default`` overloads of torch.ops.inplace_abn, resolved once (attribute lookups through
    torch.ops cost microseconds per call, which is visible on small layers)."""

    def __init__(self) -> None:
        for name in ("statistics", "forward_", "backward_reduce", "backward", "invert", "forward_train_",
                     "backward_train"):  # fmt: skip
            setattr(self, name, getattr(torch.ops.inplace_abn, name).default)


# Resolved at import, never reassigned: a lazy first assignment inside a torch.compile'd call would
# invalidate dynamo's guard on it and force a recompile.
_overloads: Optional[_Overloads] = _Overloads() if _backend.extension_loaded() else None


def _native(t: Tensor) -> Optional[_Overloads]:
    """The compiled ops when they serve ``t`` (backend "cpp" with kernels for its device), else None."""
    if _backend._backend != "cpp" or not _KERNELS.get(t.device.type, False):  # the variable: no call
        return None
    return _overloads


def statistics(x: Tensor) -> Tuple[Tensor, Tensor]:
    """Per-channel mean and biased variance of ``x`` (N, C, *), in the opmath dtype (C,)."""
    ops = _native(x)
    return ops.statistics(x) if ops else _python_ops.statistics(x)


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
    """Overwrites ``x`` (N, C, *) with ``act((|w| + eps) * (x - mean) / sqrt(var + eps) + b)``."""
    ops = _native(x)
    args = (x, mean, var, weight, bias, eps, activation, activation_param)
    ops.forward_(*args) if ops else _python_ops.forward_(*args)


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
    """Training forward on local statistics: ``statistics`` then ``forward_``, and the running statistics
    (C,) (when given) updated as nn.BatchNorm does; returns (mean, biased var) (C,)."""
    ops = _native(x)
    args = (x, weight, bias, running_mean, running_var, momentum, eps, activation, activation_param)
    return ops.forward_train_(*args) if ops else _python_ops.forward_train_(*args)


def backward_reduce(
    y: Tensor,
    dy: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    activation: str,
    activation_param: float,
) -> Tuple[Tensor, Tensor]:
    """Per-channel (C,) sums of dz and dz * x_hat, recovered from the output ``y`` (N, C, *)."""
    ops = _native(y)
    args = (y, dy, weight, bias, eps, activation, activation_param)
    return ops.backward_reduce(*args) if ops else _python_ops.backward_reduce(*args)


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
    """dx (N, C, *) with ``y``'s strides; ``mean_dz``/``mean_dz_xhat`` None selects eval mode."""
    ops = _native(y)
    args = (y, dy, var, weight, bias, mean_dz, mean_dz_xhat, eps, activation, activation_param)
    return ops.backward(*args) if ops else _python_ops.backward(*args)


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
    """Training backward on local statistics; returns (dx (N, C, *), grad_weight (C,), grad_bias (C,)).

    grad_weight = sign(weight) * sum(dz * x_hat) with sign(0) = +1, grad_bias = sum(dz), each in its
    parameter's dtype (the opmath dtype when the parameter is None).

    The fused kernels make two passes (reduce, then dx); the pure-PyTorch path one ATen batch-norm backward.
    """
    ops = _native(y)
    args = (y, dy, var, weight, bias, eps, activation, activation_param)
    return ops.backward_train(*args) if ops else _python_ops.backward_train(*args)


def invert(
    y: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float,
    activation: str,
    activation_param: float,
) -> Tensor:
    """x_hat (N, C, *) recovered from the output ``y``, in ``y``'s dtype and strides."""
    ops = _native(y)
    args = (y, weight, bias, eps, activation, activation_param)
    return ops.invert(*args) if ops else _python_ops.invert(*args)


# The layer's training step: the ops above plus the per-channel state each backend keeps for backward.
# The compiled backward needs var; the pure-PyTorch one takes two (C,) vectors its forward has at hand
# instead, so that its backward makes no per-channel ATen calls (each costs microseconds).
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
) -> Tuple[Tensor, ...]:
    """``forward_train_`` returning only what to keep for ``backward_train_saved``: ``(var,)``, or the
    pure-PyTorch path's two (C,) constants."""
    ops = _native(x)
    if ops:
        return ops.forward_train_(x, weight, bias, running_mean, running_var, momentum, eps, activation,
                                  activation_param)[1:]  # fmt: skip
    return _python_ops.forward_train_saving_(
        x, weight, bias, running_mean, running_var, momentum, eps, activation, activation_param, False
    )[2]


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
    """``backward_train`` given the ``saved`` state of ``forward_train_saving_``. The compiled op takes
    ``(var,)``; the pure-PyTorch path takes either form, so a state stays usable if the backend changes
    between forward and backward."""
    ops = _native(y) if len(saved) == 1 else None
    if ops:
        return ops.backward_train(y, dy, saved[0], weight, bias, eps, activation, activation_param)
    return _python_ops.backward_train_saved(y, dy, saved, weight, bias, eps, activation, activation_param)


# Fake (meta) kernels: shapes, dtypes and strides only, for torch.compile, export and meta-device
# memory counting. forward_ returns nothing and mutates only its first argument, so it needs no fake
# kernel; a no-op Meta kernel lets whole models run on device="meta" (memory counting without memory).
if _backend.extension_loaded():

    @torch.library.impl("inplace_abn::forward_", "Meta")
    def _forward_meta(x, mean, var, weight, bias, eps, activation, activation_param):
        return None

    def _channel_vectors(t: Tensor, count: int) -> Tuple[Tensor, ...]:
        dtype = _python_ops.opmath_dtype(t.dtype)
        return tuple(t.new_empty((t.size(1),), dtype=dtype) for _ in range(count))

    @torch.library.register_fake("inplace_abn::statistics")
    def _statistics_fake(x):
        torch._check(x.dim() >= 2, lambda: f"x must have shape (N, C, *), got {tuple(x.shape)}")
        return _channel_vectors(x, 2)

    @torch.library.register_fake("inplace_abn::backward_reduce")
    def _backward_reduce_fake(y, dy, weight, bias, eps, activation, activation_param):
        torch._check(y.shape == dy.shape, lambda: "y and dy must have the same shape")
        return _channel_vectors(y, 2)

    @torch.library.register_fake("inplace_abn::backward")
    def _backward_fake(y, dy, var, weight, bias, mean_dz, mean_dz_xhat, eps, activation, activation_param):
        torch._check(y.shape == dy.shape, lambda: "y and dy must have the same shape")
        return torch.empty_like(y)

    @torch.library.register_fake("inplace_abn::forward_train_")
    def _forward_train_fake(x, weight, bias, running_mean, running_var, momentum, eps, activation, activation_param):
        torch._check(x.dim() >= 2, lambda: f"x must have shape (N, C, *), got {tuple(x.shape)}")
        return _channel_vectors(x, 2)

    @torch.library.register_fake("inplace_abn::backward_train")
    def _backward_train_fake(y, dy, var, weight, bias, eps, activation, activation_param):
        torch._check(y.shape == dy.shape, lambda: "y and dy must have the same shape")
        dtype = _python_ops.opmath_dtype(y.dtype)
        grads = tuple(
            y.new_empty((y.size(1),), dtype=dtype if p is None else p.dtype) for p in (weight, bias)
        )
        return (torch.empty_like(y),) + grads

    @torch.library.register_fake("inplace_abn::invert")
    def _invert_fake(y, weight, bias, eps, activation, activation_param):
        return torch.empty_like(y)
