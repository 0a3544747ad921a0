"""Modules: ``ABN`` (BatchNorm + activation), ``InPlaceABN``, ``InPlaceABNSync`` and ``RecomputeMaxPool2d``.

Parameters and buffers are exactly those of ``nn.BatchNorm2d`` (weight, bias, running_mean, running_var,
num_batches_tracked), so state dicts of inplace-abn 1.1.0 load unchanged. Modules only call functions.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch import Tensor

from . import activations
from .functions import inplace_abn, inplace_abn_sync, max_pool2d

__all__ = ["ABN", "InPlaceABN", "InPlaceABNSync", "RecomputeMaxPool2d"]


class ABN(nn.Module):
    """Activated Batch Normalization: ``nn.BatchNorm`` followed by an activation, in one module.

    Unlike the in-place layers, ``ABN`` scales by the raw ``weight`` (exactly ``nn.BatchNorm``) and keeps
    the usual autograd buffers. It is the drop-in baseline with the same constructor and state dict.

    Args:
        num_features: C, the number of channels of the (N, C, *) input.
        eps: Added to the variance (and, in the in-place layers, to ``|weight|``).
        momentum: Running-statistics momentum, or None for a cumulative moving average.
        affine: Learn a per-channel weight and bias.
        track_running_stats: Keep running statistics; without them batch statistics are used in eval too.
        activation: ``"leaky_relu"``, ``"elu"``, ``"identity"`` or ``"relu"`` (legacy ``"none"`` = identity).
        activation_param: Negative slope of leaky_relu, or alpha of elu.

    Shape:
        Input (N, C, *), output the same shape.
    """

    _version = 2
    __constants__ = ["track_running_stats", "momentum", "eps", "num_features", "affine"]

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        activation: str = "leaky_relu",
        activation_param: float = 0.01,
    ) -> None:
        super().__init__()
        if isinstance(num_features, bool) or not isinstance(num_features, int) or num_features <= 0:
            raise ValueError(f"num_features must be a positive int, got {num_features!r}")
        if not eps > 0:
            raise ValueError(f"eps must be > 0, got {eps!r}")
        if momentum is not None and not 0.0 <= momentum <= 1.0:
            raise ValueError(f"momentum must be in [0, 1] or None (cumulative average), got {momentum!r}")
        activations.resolve(activation, activation_param)
        self.num_features = num_features
        self.eps = eps
        self.momentum = momentum
        self.affine = affine
        self.track_running_stats = track_running_stats
        self.activation = activation
        self.activation_param = activation_param
        if affine:
            self.weight = nn.Parameter(torch.empty(num_features))
            self.bias = nn.Parameter(torch.empty(num_features))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)
        if track_running_stats:
            self.register_buffer("running_mean", torch.zeros(num_features))
            self.register_buffer("running_var", torch.ones(num_features))
            self.register_buffer("num_batches_tracked", torch.tensor(0, dtype=torch.long))
        else:
            self.register_buffer("running_mean", None)
            self.register_buffer("running_var", None)
            self.register_buffer("num_batches_tracked", None)
        self.reset_parameters()

    def reset_running_stats(self) -> None:
        if self.track_running_stats:
            self.running_mean.zero_()
            self.running_var.fill_(1)
            self.num_batches_tracked.zero_()

    def reset_parameters(self) -> None:
        self.reset_running_stats()
        if self.affine:
            nn.init.ones_(self.weight)
            nn.init.zeros_(self.bias)

    def _batch_norm_args(self) -> tuple[bool, float, Tensor | None, Tensor | None]:
        """Applies nn.BatchNorm's rules; returns (use batch statistics, momentum, running_mean, running_var)
        for the functional call. Changes no state: the caller advances ``num_batches_tracked`` with
        :meth:`_count_batch` once the call succeeded, so a refused call leaves it alone.

        Rules: momentum None is a cumulative average over the batches counted so far, this one included;
        eval without buffers uses batch statistics; training without track_running_stats passes no buffers.
        """
        training, momentum = self.training, self.momentum
        running_mean, running_var = self.running_mean, self.running_var
        if training and self.track_running_stats:
            if momentum is None and self.num_batches_tracked is not None:
                momentum = 1.0 / (float(self.num_batches_tracked) + 1.0)
        elif training:
            running_mean = running_var = None
        if momentum is None:
            momentum = 0.0
        use_batch_stats = training or (running_mean is None and running_var is None)
        return use_batch_stats, momentum, running_mean, running_var

    def _count_batch(self) -> None:
        """Advances ``num_batches_tracked`` after a training step, as nn.BatchNorm does."""
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked.add_(1)

    def _check_input_dim(self, x: Tensor) -> None:
        if not isinstance(x, Tensor) or x.dim() < 2:
            shape = tuple(x.shape) if isinstance(x, Tensor) else type(x).__name__
            raise ValueError(f"{type(self).__name__} expects an input of shape (N, C, *), got {shape}")
        if x.size(1) != self.num_features:
            raise ValueError(
                f"{type(self).__name__}({self.num_features}) got an input with {x.size(1)} channels "
                f"(shape {tuple(x.shape)}); num_features must equal the size of dimension 1"
            )

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """``act(BN(x) [+ residual])``; ``residual`` (optional) has x's shape (N, C, *)."""
        self._check_input_dim(x)
        training, momentum, running_mean, running_var = self._batch_norm_args()
        activation, param = activations.resolve(self.activation, self.activation_param)
        y = F.batch_norm(x, running_mean, running_var, self.weight, self.bias, training, momentum, self.eps)
        self._count_batch()
        if residual is not None:
            y = y + residual  # out of place: y may be the input of ReLU's backward below, never the residual
        return activations.get(activation).apply_(y, param)

    def _load_from_state_dict(
        self,
        state_dict: dict,
        prefix: str,
        local_metadata: dict,
        strict: bool,
        missing_keys: list,
        unexpected_keys: list,
        error_msgs: list,
    ) -> None:
        version = local_metadata.get("version", None)
        key = prefix + "num_batches_tracked"
        if (version is None or version < 2) and self.track_running_stats and key not in state_dict:
            # Checkpoints from before num_batches_tracked existed: start the count at 0, as nn.BatchNorm.
            state_dict[key] = torch.tensor(0, dtype=torch.long)
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def extra_repr(self) -> str:
        rep = f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}, "
        rep += f"activation={self.activation}"
        if self.activation in ("leaky_relu", "elu"):
            rep += f"[{self.activation_param}]"
        return rep


class InPlaceABN(ABN):
    """In-Place Activated Batch Normalization (Rota Bulo et al., CVPR 2018).

    ``y = act((|weight| + eps) * (x - mean) / sqrt(var + eps) + bias)`` is written over the input, and
    only ``y`` is kept for backward: about half the training memory of BatchNorm + activation.
    Arguments as :class:`ABN`. ``relu`` (leaky_relu with slope 0) is accepted but not invertible: such a
    layer keeps its pre-activation and saves nothing (a RuntimeWarning says so).

    The forward takes an optional ``residual`` of the input's shape: ``act(BN(x) + residual)``, the fused
    end of a post-activation residual block, still keeping only the output (and the residual, by
    reference); see :func:`~inplace_abn.functions.inplace_abn`.

    Shape:
        Input (N, C, *), overwritten; the same tensor is returned. Residual: (N, C, *), read only.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        activation: str = "leaky_relu",
        activation_param: float = 0.01,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, activation, activation_param)
        if not activations.is_invertible(activation, activation_param):
            activations.warn_non_invertible()

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """Writes ``act(BN(x) [+ residual])`` over ``x`` (N, C, *) and returns it."""
        self._check_input_dim(x)
        training, momentum, running_mean, running_var = self._batch_norm_args()
        y = inplace_abn(
            x, self.weight, self.bias, running_mean, running_var, training, momentum, self.eps,
            self.activation, self.activation_param, residual=residual,
        )  # fmt: skip
        self._count_batch()
        return y


class InPlaceABNSync(ABN):
    """In-Place ABN whose training statistics are synchronised over a ``torch.distributed`` group.

    Arguments as :class:`ABN`, plus ``group`` (None = the default group). Per-process batch sizes may
    differ; the merged statistics equal those of one big batch.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        activation: str = "leaky_relu",
        activation_param: float = 0.01,
        group: Any | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, activation, activation_param)
        self.group = group

    def set_group(self, group: Any | None) -> None:
        """Sets the process group to synchronise with (None = default). Never call between forward and backward."""
        self.group = group

    def forward(self, x: Tensor, residual: Tensor | None = None) -> Tensor:
        """Writes ``act(BN(x) [+ residual])`` over ``x`` (N, C, *) and returns it; statistics of x alone."""
        self._check_input_dim(x)
        training, momentum, running_mean, running_var = self._batch_norm_args()
        y = inplace_abn_sync(
            x, self.weight, self.bias, running_mean, running_var, training, momentum, self.eps,
            self.activation, self.activation_param, self.group, residual=residual,
        )  # fmt: skip
        self._count_batch()
        return y


class RecomputeMaxPool2d(nn.MaxPool2d):
    """``nn.MaxPool2d`` that keeps only its input for backward (:func:`~inplace_abn.functions.max_pool2d`).

    Same constructor, output and gradients as ``nn.MaxPool2d`` (a subclass without ``return_indices``); the
    int64 argmax indices are recomputed in backward instead of kept. After an In-Place ABN layer, whose output
    (the pool's input) is kept anyway, the pool then adds nothing to the memory kept for backward.
    ``convert_model`` puts it in place of every ``nn.MaxPool2d``; ``to_batchnorm`` puts ``nn.MaxPool2d`` back.

    Shape:
        Input (N, C, H, W) or (C, H, W), output as ``nn.MaxPool2d``'s.
    """

    def __init__(
        self, kernel_size: Any, stride: Any = None, padding: Any = 0, dilation: Any = 1, ceil_mode: bool = False
    ):
        super().__init__(kernel_size, stride, padding, dilation, return_indices=False, ceil_mode=ceil_mode)

    def forward(self, x: Tensor) -> Tensor:
        return max_pool2d(x, self.kernel_size, self.stride, self.padding, self.dilation, self.ceil_mode)
