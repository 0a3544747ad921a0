"""Float64 reference implementation of (In-Place) Activated BatchNorm, for tests and benchmarks.

Written from the definitions, not from the kernels: plain ``(x - mean) / sqrt(var + eps)``, then the
affine map and the activation (``activations.Activation.apply``), differentiated by autograd. It is slow
and out-of-place on purpose, and it is not a backend: the pure-PyTorch backend the layer falls back to
is ``pure_backend``, which this reference tests.
"""

from __future__ import annotations

import torch
from torch import Tensor

from . import activations

__all__ = ["batch_norm_act", "normalized_input", "in_place_scale"]


def _dims(x: Tensor) -> tuple[int, ...]:
    return (0,) + tuple(range(2, x.dim()))


def _channel(v: Tensor, x: Tensor) -> Tensor:
    return v.reshape((1, -1) + (1,) * (x.dim() - 2))


def in_place_scale(weight: Tensor, eps: float) -> Tensor:
    """``|weight| + eps`` whose gradient is sign(weight) with sign(0) = +1 (autograd's abs gives 0 at 0).

    Written as ``where(weight >= 0, weight, -weight)``: its backward needs only the comparison, which a compiler
    recomputes from the weight. (Multiplying by a precomputed sign kept that sign tensor for backward, one per
    layer, which shifted what torch.compile's activation-memory budget kept on resnet50 by +4%.)
    """
    return torch.where(weight >= 0, weight, -weight) + eps


def normalized_input(x: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    """``x_hat = (x - mean) / sqrt(var + eps)`` in float64, for (N, C, *) ``x`` and (C,) statistics."""
    x = x.double()
    return (x - _channel(mean.double(), x)) / torch.sqrt(_channel(var.double(), x) + eps)


def batch_norm_act(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-5,
    activation: str = "leaky_relu",
    activation_param: float = 0.01,
    in_place_weight: bool = True,
) -> Tensor:
    """Out-of-place float64 In-Place ABN (or ABN with ``in_place_weight=False``), differentiable.

    Args:
        x: Input (N, C, *); computed in float64 (gradients flow back to ``x``'s dtype).
        weight, bias: (C,) or None.
        running_mean, running_var: (C,) or None; updated in place in training (unbiased variance).
        training, momentum, eps, activation, activation_param: As ``inplace_abn.functions.inplace_abn``.
        in_place_weight: Scale by ``|weight| + eps`` (In-Place ABN) instead of ``weight`` (BatchNorm).

    Returns:
        The float64 output (N, C, *).
    """
    xd = x.double()
    if training:
        mean = xd.mean(_dims(xd))
        var = ((xd - _channel(mean, xd)) ** 2).mean(_dims(xd))
        if running_mean is not None:
            n = x.numel() // x.size(1)
            with torch.no_grad():
                running_mean.mul_(1 - momentum).add_(mean.detach().to(running_mean.dtype), alpha=momentum)
                unbiased = var.detach() * n / (n - 1)
                running_var.mul_(1 - momentum).add_(unbiased.to(running_var.dtype), alpha=momentum)
    else:
        mean, var = running_mean.double(), running_var.double()
    z = (xd - _channel(mean, xd)) / torch.sqrt(_channel(var, xd) + eps)
    if weight is not None:
        w = weight.double()
        z = z * _channel(in_place_scale(w, eps) if in_place_weight else w, xd)
    if bias is not None:
        z = z + _channel(bias.double(), xd)
    name, param = activations.resolve(activation, activation_param)
    return activations.get(name).apply(z, param)
