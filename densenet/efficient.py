"""Memory-efficient dense-layer bottleneck: ``cat(features) -> In-Place ABN -> conv1x1`` as one autograd Function.

Forward concatenates the features into a fresh buffer, normalises + activates it in place with the batch
statistics (training) or the running statistics (eval), updates the running statistics exactly once, and
applies the 1x1 convolution. Only the input features (kept by the network anyway), the per-channel
(mean, var) and the parameters are saved: the concatenated / normalised buffer is freed after forward.

Backward rebuilds the buffer (``torch.cat`` + ``_ops.forward_`` with the SAVED statistics: no reduction, no
running-stat update, the same activations as forward), back-propagates through the 1x1 convolution, then
through In-Place ABN (recovering x_hat from the activated buffer, as :mod:`inplace_abn.functions`), and
splits the input gradient back onto the features.

Memory per dense block becomes O(L k) saved activations instead of O(L^2 k) (Pleiss et al., 1707.06990,
strategies 1, 2 and 4; one shared buffer suffices since In-Place ABN writes over its input).
"""

from __future__ import annotations

from typing import Any, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from inplace_abn import InPlaceABN, _ops
from inplace_abn._python_ops import opmath_dtype
from inplace_abn.functions import (
    _cast,
    _check_count,
    _local_backward,
    _parameter_grads,
    _update_running_stats,
    check_activation,
)

__all__ = ["efficient_bottleneck", "EfficientBottleneckFunction"]


class EfficientBottleneckFunction(torch.autograd.Function):
    """``conv2d(iabn(cat(features, 1)), conv_weight)`` saving only the features and per-channel statistics.

    Arguments of ``apply``: weight, bias, running_mean, running_var (tensors or None), conv_weight,
    config = (training, momentum, eps, activation, activation_param), then the features as separate
    arguments (never one list, so autograd sees each of them).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        running_mean: Optional[Tensor],
        running_var: Optional[Tensor],
        conv_weight: Tensor,
        config: Tuple[bool, float, float, str, float],
        *features: Tensor,
    ) -> Tensor:
        training, momentum, eps, act, slope = config
        buf = torch.cat(features, 1)  # fresh: may be overwritten
        stat_dtype = opmath_dtype(buf.dtype)
        count = buf.numel() // buf.size(1)
        if training:
            _check_count(count, buf.shape)
            mean, var = _ops.forward_train_(buf, weight, bias, eps, act, slope)
            if running_mean is not None:
                # The update of inplace_abn.functions, once per forward: nothing is recomputed.
                _update_running_stats(running_mean, running_var, mean, var, count, momentum)
        else:
            # Copies (C values): later in-place updates of the buffers must not invalidate this graph.
            mean = running_mean.to(stat_dtype, copy=True)
            var = running_var.to(stat_dtype, copy=True)
            _ops.forward_(buf, mean, var, weight, bias, eps, act, slope)
        out = torch.nn.functional.conv2d(buf, conv_weight)
        ctx.save_for_backward(mean, var, weight, bias, conv_weight, *features)
        ctx.config = (training, eps, act, slope)
        ctx.sizes = [f.size(1) for f in features]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor):  # type: ignore[override]
        training, eps, act, slope = ctx.config
        mean, var, weight, bias, conv_weight, *features = ctx.saved_tensors
        needs = ctx.needs_input_grad
        need_w, need_b, need_cw = needs[0], needs[1], needs[4]
        need_feats = needs[6:]
        need_dx = any(need_feats)

        # Rebuild the activated buffer exactly as in forward (saved statistics, no running-stat update).
        y = torch.cat(features, 1)
        _ops.forward_(y, mean, var, weight, bias, eps, act, slope)

        grad_out = grad_out.contiguous() if grad_out.layout == torch.strided else grad_out
        need_dy = need_dx or need_w or need_b
        dy, dconv_w, _ = torch.ops.aten.convolution_backward(
            grad_out, y, conv_weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [need_dy, need_cw, False]
        )

        dx = sum_dz = sum_dz_xhat = None
        if need_dy:
            dx, sum_dz, sum_dz_xhat = _local_backward(
                y, dy, var, weight, bias, training, need_dx, need_w or need_b, eps, act, slope
            )
        del y
        dweight, dbias = _parameter_grads(weight, bias, sum_dz, sum_dz_xhat, need_w, need_b)
        if need_dx:
            parts = torch.split(dx, ctx.sizes, 1)
            dfeats = tuple(p if n else None for p, n in zip(parts, need_feats))
        else:
            dfeats = (None,) * len(ctx.sizes)
        return (dweight, dbias, None, None, dconv_w if need_cw else None, None) + dfeats


def efficient_bottleneck(norm: InPlaceABN, conv: torch.nn.Conv2d, *features: Tensor) -> Tensor:
    """``conv(norm(torch.cat(features, 1)))`` with O(1) saved activations per layer beyond the features.

    Args:
        norm: an :class:`InPlaceABN` with an invertible activation (leaky_relu slope > 0, elu, identity).
        conv: a bias-free 1x1, stride-1, ungrouped convolution.
        *features: (N, C_i, H, W) tensors, sum(C_i) = norm.num_features.

    Returns:
        (N, conv.out_channels, H, W). Under no_grad (or when nothing needs a gradient) the plain modules run.
    """
    if not isinstance(norm, InPlaceABN):
        raise ValueError(f'memory="efficient" requires norm="iabn" (an InPlaceABN), got {type(norm).__name__}')
    act, slope = check_activation(norm.activation, norm.activation_param)
    if act == "leaky_relu" and slope == 0.0:
        raise ValueError('memory="efficient" needs an invertible activation (leaky_relu slope > 0, elu, identity)')
    if (
        conv.bias is not None or conv.kernel_size != (1, 1) or conv.stride != (1, 1) or conv.groups != 1
        or conv.padding not in ((0, 0), "valid") or conv.dilation != (1, 1)
    ):  # fmt: skip
        raise ValueError("efficient_bottleneck expects a bias-free 1x1 stride-1 ungrouped convolution")
    params = [p for p in (norm.weight, norm.bias, conv.weight) if p is not None]
    if not torch.is_grad_enabled() or not any(t.requires_grad for t in list(features) + params):
        return conv(norm(torch.cat(features, 1)))
    if sum(f.size(1) for f in features) != norm.num_features:
        raise ValueError(
            f"efficient_bottleneck: the features have {sum(f.size(1) for f in features)} channels in all, "
            f"norm has num_features={norm.num_features}"
        )
    momentum, training = norm._momentum_and_training()  # advances num_batches_tracked once
    running_mean, running_var = norm._running_stats()
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required in eval mode")
    config = (bool(training), float(momentum), float(norm.eps), act, float(slope))
    return EfficientBottleneckFunction.apply(
        norm.weight, norm.bias, running_mean, running_var, conv.weight, config, *features
    )
