"""Functional In-Place Activated BatchNorm: ``inplace_abn``, ``inplace_abn_sync`` and their autograd Function.

Both functions overwrite their input with ``act((|weight| + eps) * (x - mean) / sqrt(var + eps) + bias)``
and keep only that output for backward; the backward inverts the activation and the affine map to
recover what it needs (Rota Bulo et al., CVPR 2018; the math is in docs/math.md).

One layer call, forward: ``inplace_abn`` validates (``validation.check_layer_args``) and calls
:class:`InPlaceABNFunction`, whose forward calls one op wrapper of ``_ops`` (``forward_train_`` in local
training; ``statistics`` + ``sync.merge_statistics`` + ``forward_`` when synchronised; ``forward_`` in
eval). Backward mirrors it: ``backward_train``, or ``backward_reduce`` (+ ``sync.all_reduce_sums``) +
``backward``.
"""

from __future__ import annotations

from typing import Any, NamedTuple, Optional, Tuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _ops, activations, sync, validation
from .pure_backend import opmath_dtype, update_running_stats, weight_grad

__all__ = [
    "inplace_abn",
    "inplace_abn_sync",
    "recover_normalized_input",
    "InPlaceABNFunction",
    "LayerConfig",
    "layer_backward",
    "ACTIVATIONS",
    "check_activation",
    "is_invertible",
]

#: Activation names the layers accept (kept here for inplace-abn 1.1.0 era imports; see ``activations``).
ACTIVATIONS = activations.NAMES
#: Validates an activation, returning its canonical ``(name, param)`` (an alias of ``activations.resolve``).
check_activation = activations.resolve
is_invertible = activations.is_invertible


class LayerConfig(NamedTuple):
    """The non-tensor arguments of one layer call, validated and canonical.

    Attributes:
        training: Batch statistics (and a running-statistics update) when True, running statistics otherwise.
        momentum: Running-statistics momentum.
        eps: Added to the variance and to ``|weight|``.
        activation: Canonical activation name (``activations.resolve``).
        activation_param: Its slope / alpha.
        group: ``torch.distributed`` process group of the synchronised layer (None: the default group).
        sync: Merge the batch statistics over ``group`` (synchronised layer in training).
    """

    training: bool
    momentum: float
    eps: float
    activation: str
    activation_param: float
    group: Any = None
    sync: bool = False


class InPlaceABNFunction(torch.autograd.Function):
    """The layer's autograd: forward writes y over x and keeps (y, weight, bias, var); backward inverts y.

    An ``autograd.Function``, not ``torch.library.register_autograd``: the latter refuses ops that mutate an
    input ("Cannot register autograd formula for non-functional operator"), and the layer's forward op
    writes y over x by design.

    Saved state, the same for every mode and backend: ``(y, weight, bias, var, z)``, where ``var`` (C,) is
    the biased batch variance in training and the running variance in eval (opmath dtype), and ``z`` is
    None except for ReLU, which cannot be inverted: that layer normalises with the identity, keeps a
    copy ``z`` of the pre-activation, then applies the ReLU.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        running_mean: Optional[Tensor],
        running_var: Optional[Tensor],
        config: LayerConfig,
    ) -> Tensor:
        invertible = activations.invertible(config.activation, config.activation_param)
        act, act_param = (config.activation, config.activation_param) if invertible else ("identity", 0.0)
        count = x.numel() // x.size(1)
        if config.training and not config.sync:  # the op also updates the running statistics
            _, var = _ops.forward_train_(
                x, weight, bias, running_mean, running_var, config.momentum, config.eps, act, act_param
            )
        elif config.training:
            mean, var = _ops.statistics(x)
            mean, var, count = sync.merge_statistics(mean, var, count, config.group)
            validation.check_count(count, x.shape)  # the GLOBAL count
            _ops.forward_(x, mean, var, weight, bias, config.eps, act, act_param)
            if running_mean is not None:
                update_running_stats(running_mean, running_var, mean, var, count, config.momentum)
        else:
            stat_dtype = opmath_dtype(x.dtype)
            var = running_var.to(stat_dtype)
            _ops.forward_(x, running_mean.to(stat_dtype), var, weight, bias, config.eps, act, act_param)
        z = None
        if not invertible:
            z = x.clone()
            x.relu_()
        ctx.save_for_backward(x, weight, bias, var, z)
        ctx.mark_dirty(x)
        ctx.config = config
        ctx.count = count
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> Tuple[Optional[Tensor], ...]:
        y, weight, bias, var, z = ctx.saved_tensors
        config = ctx.config
        if z is not None:  # ReLU's own backward (0 where z <= 0, PyTorch's convention), then BN + identity on z
            dy = torch.ops.aten.threshold_backward(dy, z, 0)
            y, config = z, config._replace(activation="identity", activation_param=0.0)
        dx, dweight, dbias = layer_backward(y, dy, var, weight, bias, config, ctx.count, ctx.needs_input_grad[:3])
        return dx, dweight, dbias, None, None, None


def layer_backward(
    y: Tensor,
    dy: Tensor,
    var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    config: LayerConfig,
    count: int,
    needs: Tuple[bool, bool, bool],
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dx, dweight, dbias) of one layer from its output ``y`` (N, C, *) and ``var`` (C,); None where
    ``needs`` (for x, weight, bias) is False. ``count``: values per channel of the (global) batch.

    Also the backward of DenseNet's memory-efficient bottleneck, which rebuilds ``y`` itself.
    """
    need_dx, need_w, need_b = needs
    args = (config.eps, config.activation, config.activation_param)
    if config.training and not config.sync and need_dx:  # the usual training step: one op
        dx, dweight, dbias = _ops.backward_train(y, dy, var, weight, bias, *args)
        return dx, dweight if need_w else None, dbias if need_b else None
    dx = dweight = dbias = None
    sum_dz, sum_dz_xhat = _ops.backward_reduce(y, dy, weight, bias, *args)
    if need_dx:
        mean_dz = mean_dz_xhat = None  # eval: the statistics are constants
        if config.training:  # synchronised: dx needs the global sums
            global_dz, global_dz_xhat = sync.all_reduce_sums(sum_dz, sum_dz_xhat, config.group)
            mean_dz, mean_dz_xhat = global_dz / count, global_dz_xhat / count
        dx = _ops.backward(y, dy, var, weight, bias, mean_dz, mean_dz_xhat, *args)
    if need_w:
        dweight = weight_grad(weight, sum_dz_xhat)
    if need_b:
        dbias = sum_dz.to(bias.dtype)
    return dx, dweight, dbias


def _exporting() -> bool:
    """True under torch.export, the ONNX exporter, or TorchScript tracing/scripting."""
    return (
        torch.compiler.is_exporting()
        or torch.onnx.is_in_onnx_export()
        or torch.jit.is_tracing()
        or torch.jit.is_scripting()
    )


def _eval_standard_ops(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Tensor,
    running_var: Tensor,
    eps: float,
    activation: str,
    activation_param: float,
) -> Tensor:
    """The eval-mode layer as standard ops (batch_norm with weight |w| + eps, then the activation).

    Used while exporting: exported graphs then contain only aten/ONNX standard operators, which every
    runtime and graph pass (e.g. conv-BN folding) understands. The result is returned, not written into
    ``x``: an exported graph has no use for the in-place storage trick.
    """
    scale = None if weight is None else weight.abs() + eps
    y = torch.nn.functional.batch_norm(x, running_mean, running_var, scale, bias, False, 0.0, eps)
    return activations.get(activation).apply(y, activation_param)


def _layer(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool,
    momentum: float,
    eps: float,
    activation: str,
    activation_param: float,
    group: Any,
    sync_stats: bool,
) -> Tensor:
    """The body of :func:`inplace_abn` and :func:`inplace_abn_sync`: validate once, then the Function."""
    activation, activation_param = validation.check_layer_args(
        x, weight, bias, running_mean, running_var, training, momentum, eps, activation, activation_param
    )
    if not activations.invertible(activation, activation_param):
        activations.warn_non_invertible()
    if not training and _exporting():
        return _eval_standard_ops(x, weight, bias, running_mean, running_var, eps, activation, activation_param)
    # Eval mode uses the running statistics: no collective, and nothing to warn about.
    sync_stats = bool(training) and sync_stats and sync.sync_enabled(group)
    if training and not sync_stats:
        validation.check_count(x.numel() // x.size(1), x.shape)
    config = LayerConfig(bool(training), float(momentum), float(eps), activation, activation_param, group, sync_stats)
    return InPlaceABNFunction.apply(x, weight, bias, running_mean, running_var, config)


def inplace_abn(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-05,
    activation: str = "leaky_relu",
    activation_param: float = 0.01,
) -> Tensor:
    """In-Place Activated Batch Normalization.

    Computes, per channel c over all N * prod(*) elements,
    ``y = act((|weight[c]| + eps) * (x - mean[c]) / sqrt(var[c] + eps) + bias[c])`` and writes ``y`` over
    ``x``. In training the batch statistics are used and, when given, the running statistics are updated
    in place: ``running = (1 - momentum) * running + momentum * batch`` (unbiased variance). Otherwise the
    running statistics are used.

    Note:
        The input tensor is overwritten and returned; only this output is kept for backward, which
        recovers the normalised input by inverting the activation. Do not modify the output in place
        before backward (PyTorch then raises its "modified by an inplace operation" error). The scale is
        ``|weight| + eps``, so weights are not interchangeable with ``nn.BatchNorm`` ones.

    Args:
        x: Input of shape (N, C, *), float64/float32/float16/bfloat16. Overwritten with the output.
        weight: Scale of shape (C,) or None.
        bias: Shift of shape (C,) or None.
        running_mean: Running mean of shape (C,) or None.
        running_var: Running variance of shape (C,) or None.
        training: Use batch statistics (and update the running ones) when True.
        momentum: Running-statistics momentum.
        eps: Added to the variance and to ``|weight|``.
        activation: ``"leaky_relu"``, ``"elu"``, ``"identity"`` (``"relu"`` keeps its pre-activation).
        activation_param: Negative slope of leaky_relu, or alpha of elu.

    Returns:
        ``x`` itself, holding the output (N, C, *).
    """
    return _layer(
        x, weight, bias, running_mean, running_var, training, momentum, eps, activation, activation_param, None, False
    )


def inplace_abn_sync(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-05,
    activation: str = "leaky_relu",
    activation_param: float = 0.01,
    group: Optional[Any] = None,
) -> Tensor:
    """In-Place Activated Batch Normalization with statistics synchronised over a process group.

    Same as :func:`inplace_abn`, with the batch statistics of training computed over every process of
    ``group`` (None = the default group); per-process batch sizes may differ. Without an initialised
    ``torch.distributed`` it warns and uses local statistics.

    Args:
        x: Input of shape (N, C, *). Overwritten with the output.
        weight, bias, running_mean, running_var, training, momentum, eps, activation, activation_param:
            As in :func:`inplace_abn`.
        group: ``torch.distributed`` process group, or None for the default group.

    Returns:
        ``x`` itself, holding the output (N, C, *).
    """
    return _layer(
        x, weight, bias, running_mean, running_var, training, momentum, eps, activation, activation_param, group, True
    )


def recover_normalized_input(
    y: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float = 1e-05,
    activation: str = "leaky_relu",
    activation_param: float = 0.01,
) -> Tensor:
    """Recovers ``x_hat = (x - mean) / sqrt(var + eps)`` (N, C, *) from a layer output ``y`` (N, C, *).

    This is the inversion the backward pass performs, exposed to measure its accuracy.

    Raises:
        ValueError: for ReLU / slope 0, whose negative half cannot be recovered.
    """
    activation, activation_param = activations.resolve(activation, activation_param)
    if not activations.invertible(activation, activation_param):
        raise ValueError("activation leaky_relu with slope 0 (relu) is not invertible")
    return _ops.invert(y, weight, bias, eps, activation, activation_param)
