"""Memory-efficient dense-layer bottleneck: ``cat(features) -> In-Place ABN -> conv1x1`` as one autograd Function.

Forward concatenates the features into the dense block's SHARED buffer (:class:`SharedBuffer`, one
storage per block reused by every layer), normalises + activates it in place with the batch statistics
(training) or the running statistics (eval), updates the running statistics exactly once, and applies the
1x1 convolution. Only the input features (kept by the network anyway), the per-channel (mean, var) and the
parameters are saved: the buffer's content is dead as soon as the convolution has read it.

Backward rebuilds the buffer in the same shared storage (``torch.cat(out=)`` + ``_ops.forward_`` with the
SAVED statistics: no reduction, no running-stat update, the same activations as forward), back-propagates
through the 1x1 convolution, then through In-Place ABN (recovering x_hat from the activated buffer, as
:mod:`inplace_abn.functions`), and splits the input gradient back onto the features.

Memory per dense block becomes O(L k) saved activations instead of O(L^2 k) (Pleiss et al., 1707.06990,
strategies 1, 2 and 4; one shared buffer suffices since In-Place ABN writes over its input).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from inplace_abn import InPlaceABN, _ops, activations, validation
from inplace_abn._ops import opmath_dtype
from inplace_abn.functions import LayerConfig, layer_backward

__all__ = ["efficient_bottleneck", "EfficientBottleneckFunction", "SharedBuffer"]


class SharedBuffer:
    """One flat storage per (device, dtype), handed out as contiguous (N, C, H, W) views.

    A dense block gives the same instance to all its layers: each layer's concatenation lives in it only
    between its ``torch.cat`` and its 1x1 convolution (in forward, and again in backward), and autograd
    runs one layer at a time, so the block needs the largest concatenation once instead of one
    allocation per layer and pass. It grows on demand and is not part of the state dict.
    """

    def __init__(self) -> None:
        self._storage: dict[tuple[torch.device, torch.dtype], Tensor] = {}

    def view(self, shape: Sequence[int], like: Tensor) -> Tensor:
        """A contiguous tensor of ``shape`` on ``like``'s device and dtype, in the shared storage."""
        numel = math.prod(shape)
        key = (like.device, like.dtype)
        flat = self._storage.get(key)
        if flat is None or flat.numel() < numel:
            self._storage.pop(key, None)  # free the old one before allocating the larger one
            flat = self._storage[key] = torch.empty(numel, device=like.device, dtype=like.dtype)
        return flat[:numel].view(shape)

    def __deepcopy__(self, memo: dict[int, Any]) -> SharedBuffer:
        return SharedBuffer()  # copies of a model must not share (or copy) scratch memory

    def __getstate__(self) -> dict[str, Any]:
        return {"_storage": {}}  # pickling a model saves no scratch memory


class EfficientBottleneckFunction(torch.autograd.Function):
    """``conv2d(iabn(cat(features, 1)), conv_weight)`` saving only the features and per-channel statistics.

    Arguments of ``apply``: weight, bias, running_mean, running_var (tensors or None), conv_weight, the
    layer's :class:`~inplace_abn.functions.LayerConfig`, the block's :class:`SharedBuffer`, then the features
    as separate arguments (never one list, so autograd sees each of them).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: Any,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        conv_weight: Tensor,
        config: LayerConfig,
        shared: SharedBuffer,
        *features: Tensor,
    ) -> Tensor:
        training, momentum, eps = config.training, config.momentum, config.eps
        act, slope = config.activation, config.activation_param
        buf = _concat(shared, features)  # scratch: overwritten in place, never saved
        stat_dtype = opmath_dtype(buf.dtype)
        count = buf.numel() // buf.size(1)
        if training:
            validation.check_count(count, buf.shape)
            # The running statistics are updated here, once per step: backward recomputes nothing of them.
            mean, var = _ops.forward_train_(buf, weight, bias, running_mean, running_var, momentum, eps, act, slope)
        else:
            # Copies (C values): later in-place updates of the buffers must not invalidate this graph.
            mean = running_mean.to(stat_dtype, copy=True)
            var = running_var.to(stat_dtype, copy=True)
            _ops.forward_(buf, mean, var, weight, bias, eps, act, slope)
        out = torch.nn.functional.conv2d(buf, conv_weight)
        ctx.save_for_backward(mean, var, weight, bias, conv_weight, *features)
        ctx.config, ctx.shared = config, shared
        ctx.sizes = [f.size(1) for f in features]
        return out

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, grad_out: Tensor):  # type: ignore[override]
        config, shared = ctx.config, ctx.shared
        eps, act, slope = config.eps, config.activation, config.activation_param
        mean, var, weight, bias, conv_weight, *features = ctx.saved_tensors
        needs = ctx.needs_input_grad
        need_w, need_b, need_cw = needs[0], needs[1], needs[4]
        need_feats = needs[7:]
        need_dx = any(need_feats)

        # Rebuild the activated buffer exactly as in forward (saved statistics, no running-stat update).
        y = _concat(shared, features)
        _ops.forward_(y, mean, var, weight, bias, eps, act, slope)

        grad_out = grad_out.contiguous() if grad_out.layout == torch.strided else grad_out
        need_dy = need_dx or need_w or need_b
        dy, dconv_w, _ = torch.ops.aten.convolution_backward(
            grad_out, y, conv_weight, None, [1, 1], [0, 0], [1, 1], False, [0, 0], 1, [need_dy, need_cw, False]
        )

        dx = dweight = dbias = None
        if need_dy:
            count = y.numel() // y.size(1)
            dx, dweight, dbias, _ = layer_backward(
                y, dy, var, weight, bias, config, count, (need_dx, need_w, need_b, False)
            )
        del y
        if need_dx:
            parts = torch.split(dx, ctx.sizes, 1)
            dfeats = tuple(p if n else None for p, n in zip(parts, need_feats))
        else:
            dfeats = (None,) * len(ctx.sizes)
        return (dweight, dbias, None, None, dconv_w if need_cw else None, None, None) + dfeats


def _concat(shared: SharedBuffer, features: tuple[Tensor, ...]) -> Tensor:
    first = features[0]
    shape = (first.size(0), sum(f.size(1) for f in features)) + tuple(first.shape[2:])
    return torch.cat(features, 1, out=shared.view(shape, first))


def efficient_bottleneck(
    norm: InPlaceABN, conv: torch.nn.Conv2d, *features: Tensor, shared: SharedBuffer | None = None
) -> Tensor:
    """``conv(norm(torch.cat(features, 1)))`` with O(1) saved activations per layer beyond the features.

    Args:
        norm: an :class:`InPlaceABN` with an invertible activation (leaky_relu slope > 0, elu, identity).
        conv: a bias-free 1x1, stride-1, ungrouped convolution.
        *features: (N, C_i, H, W) tensors, sum(C_i) = norm.num_features.
        shared: The dense block's scratch storage for the concatenation (a private one when None).

    Returns:
        (N, conv.out_channels, H, W). Under no_grad (or when nothing needs a gradient) the plain modules run.
    """
    if not isinstance(norm, InPlaceABN):
        raise ValueError(f'memory="efficient" requires norm="iabn" (an InPlaceABN), got {type(norm).__name__}')
    act, slope = activations.resolve(norm.activation, norm.activation_param)
    if not activations.invertible(act, slope):
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
    training, momentum, running_mean, running_var = norm._batch_norm_args()
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required in eval mode")
    config = LayerConfig(bool(training), float(momentum), float(norm.eps), act, float(slope))
    out = EfficientBottleneckFunction.apply(
        norm.weight, norm.bias, running_mean, running_var, conv.weight, config, shared or SharedBuffer(), *features
    )
    norm._count_batch()
    return out
