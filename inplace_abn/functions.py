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

import warnings
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
    "residual_amplification_limit",
    "residual_inversion_lossy",
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
        keep_xhat: Keep the normalised input x_hat for backward instead of recovering it from the output
            (a fused residual layer whose inversion would be lossy, see :func:`residual_inversion_lossy`).
    """

    training: bool
    momentum: float
    eps: float
    activation: str
    activation_param: float
    group: Any = None
    sync: bool = False
    keep_xhat: bool = False


def residual_amplification_limit(dtype: torch.dtype) -> float:
    """The largest amplification A = (max|residual| + |bias|) / (|weight| + eps) of a channel for which a
    fused residual layer with output ``dtype`` still recovers x_hat from its output (docs/math.md,
    "Residual fusion"): min(2**10, 2**-5 / u), u the unit roundoff of ``dtype``.

    The recovered x_hat (unit scale) then errs by at most A * u beyond the plain layer's own rounding:
    at most 1024 units in the last place (float32, float64), and never more than 2**-5 absolute, the
    rounding of bfloat16 on a normalised value of 8. That is A <= 1024 in float32, 64 in float16, 8 in
    bfloat16.
    """
    unit_roundoff = torch.finfo(dtype).eps / 2
    return min(2.0**10, 2.0**-5 / unit_roundoff)


def residual_inversion_lossy(
    residual: Tensor, weight: Optional[Tensor], bias: Optional[Tensor], eps: float, dtype: torch.dtype
) -> bool:
    """Whether a fused residual layer must keep x_hat instead of recovering it from its output.

    The output y = act(gamma * x_hat + beta + r) is rounded to ``dtype`` relative to its own magnitude,
    and the backward divides z - r - beta by gamma: per channel the error of x_hat is at most
    u * (|gamma * x_hat| + |beta| + max|r|) / gamma, u the unit roundoff of ``dtype``. The x_hat term is
    the plain layer's own rounding; the rest, u * A with A = (max|r| + |beta|) / gamma, is what a
    zero-initialised weight (gamma = eps) or a half-precision output makes large. Lossy when A exceeds
    :func:`residual_amplification_limit` in any channel.

    Args:
        residual: The residual (N, C, *) of the call.
        weight, bias: The layer's (C,) parameters, or None.
        eps: The layer's eps (gamma = |weight| + eps).
        dtype: The dtype the output is stored in (x's).

    Returns:
        The decision; always False on the meta device, which has no values to judge.
    """
    if residual.is_meta:  # no values to judge (memory counting): the steady state, where the inversion is accurate
        return False
    reach = _ops.absmax(residual)  # (C,), opmath dtype: max|r| per channel
    if bias is not None:
        reach = reach + bias.detach().abs().to(reach.dtype)
    if weight is not None:
        reach = reach / weight.detach().abs().to(reach.dtype).add(eps)
    return bool((reach > residual_amplification_limit(dtype)).any())


def _warn_keep_xhat(dtype: torch.dtype) -> None:
    """Says once per process that a fused residual layer kept x_hat (see residual_inversion_lossy)."""
    global _warned_keep_xhat
    if not _warned_keep_xhat:
        _warned_keep_xhat = True
        warnings.warn(
            f"inplace_abn: a fused residual layer keeps its normalised input for this step: its weight is small "
            f"against the residual (amplification above {residual_amplification_limit(dtype):g} for a {dtype} "
            "output), so recovering it from the output would be lossy. Gradients stay accurate; the layer "
            "saves one activation less while this lasts (typically the first steps of a zero-initialised "
            "residual branch). Said once.",
            RuntimeWarning,
            stacklevel=4,
        )


_warned_keep_xhat = False


class InPlaceABNFunction(torch.autograd.Function):
    """The layer's autograd: forward writes y over x and keeps (y, weight, bias, var); backward inverts y.

    An ``autograd.Function``, not ``torch.library.register_autograd``: the latter refuses ops that mutate an
    input ("Cannot register autograd formula for non-functional operator"), and the layer's forward op
    writes y over x by design.

    Saved state, the same for every mode and backend: ``(y, weight, bias, var, z, residual, xhat)``, where
    ``var`` (C,) is the biased batch variance in training and the running variance in eval (opmath
    dtype); the others are None except:

    * ``z``: ReLU cannot be inverted, so that layer normalises with the identity, keeps a copy ``z`` of
      the pre-activation, then applies the ReLU.
    * ``residual``: the fused residual layer, y = act(BN(x) + residual), keeps the residual by reference
      (the block input, which the block's first convolution keeps anyway); autograd's version counter
      then refuses a residual modified before backward.
    * ``xhat``: with ``config.keep_xhat`` the normalised input itself, in x's dtype (the fused layer's
      inversion would be lossy for this call); ``z`` is then not needed even for ReLU, whose mask is y > 0.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        running_mean: Optional[Tensor],
        running_var: Optional[Tensor],
        residual: Optional[Tensor],
        config: LayerConfig,
    ) -> Tensor:
        invertible = activations.invertible(config.activation, config.activation_param)
        act, act_param = (config.activation, config.activation_param) if invertible else ("identity", 0.0)
        count = x.numel() // x.size(1)
        xhat = x.clone() if config.keep_xhat else None  # normalised below, once the statistics are known
        if config.training and not config.sync:  # the op also updates the running statistics
            mean, var = _ops.forward_train_(
                x, weight, bias, running_mean, running_var, config.momentum, config.eps, act, act_param, residual
            )
        elif config.training:
            mean, var = _ops.statistics(x)
            mean, var, count = sync.merge_statistics(mean, var, count, config.group)
            validation.check_count(count, x.shape)  # the GLOBAL count
            _ops.forward_(x, mean, var, weight, bias, config.eps, act, act_param, residual)
            if running_mean is not None:
                update_running_stats(running_mean, running_var, mean, var, count, config.momentum)
        else:
            stat_dtype = opmath_dtype(x.dtype)
            mean, var = running_mean.to(stat_dtype), running_var.to(stat_dtype)
            _ops.forward_(x, mean, var, weight, bias, config.eps, act, act_param, residual)
        z = None
        if xhat is not None:
            normalize_(xhat, mean, var, config.eps)
        if not invertible:
            if xhat is None:
                z = x.clone()
            x.relu_()
        ctx.save_for_backward(x, weight, bias, var, z, residual, xhat)
        ctx.mark_dirty(x)
        ctx.config = config
        ctx.count = count
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> Tuple[Optional[Tensor], ...]:
        y, weight, bias, var, z, residual, xhat = ctx.saved_tensors
        config = ctx.config
        needs = ctx.needs_input_grad[:3] + (residual is not None and ctx.needs_input_grad[5],)
        if xhat is not None:
            grads = _xhat_backward(y, dy, xhat, var, weight, bias, config, ctx.count, needs)
        else:
            if z is not None:  # ReLU's own backward (0 where z <= 0, PyTorch's convention), then BN + identity on z
                dy = torch.ops.aten.threshold_backward(dy, z, 0)
                y, config = z, config._replace(activation="identity", activation_param=0.0)
            grads = layer_backward(y, dy, var, weight, bias, config, ctx.count, needs, residual)
        dx, dweight, dbias, dresidual = grads
        return dx, dweight, dbias, None, None, dresidual, None


def normalize_(x: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    """Writes ``x_hat = (x - mean) / sqrt(var + eps)`` over ``x`` (N, C, *), computed in the opmath dtype of
    ``mean`` / ``var`` (C,) and rounded once to x's dtype; returns ``x``."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x.copy_((x.to(mean.dtype) - mean.view(shape)) * (var + eps).rsqrt().view(shape))


def _xhat_backward(
    y: Tensor,
    dy: Tensor,
    xhat: Tensor,
    var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    config: LayerConfig,
    count: int,
    needs: Tuple[bool, bool, bool, bool],
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dx, dweight, dbias, dresidual) of a fused residual layer that kept its ``xhat`` (N, C, *); None where
    ``needs`` (for x, weight, bias, residual) is False.

    dz comes from (y, dy) exactly (it needs only the sign of y, or y + alpha); then the layer's backward on
    x_hat is the kernels' backward of an identity layer without affine fed y = x_hat and dy = dz, with
    the affine scale gamma applied to dx and the weight's sign to its gradient afterwards.
    """
    need_dx, need_w, need_b, need_r = needs
    dz = activations.get(config.activation).grad(dy, y, config.activation_param)
    plain = config._replace(activation="identity", activation_param=0.0)
    dx, sum_dz_xhat, sum_dz, _ = layer_backward(xhat, dz, var, None, None, plain, count, (need_dx, need_w, need_b, False))
    if dx is not None and weight is not None:
        gamma = weight.detach().abs().to(opmath_dtype(dx.dtype)).add(config.eps)
        dx = dx.mul_(gamma.view((1, -1) + (1,) * (dx.dim() - 2)))  # computed in the opmath dtype, rounded once
    dweight = weight_grad(weight, sum_dz_xhat) if need_w else None
    dbias = sum_dz.to(bias.dtype) if need_b else None
    return dx, dweight, dbias, dz if need_r else None


def layer_backward(
    y: Tensor,
    dy: Tensor,
    var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    config: LayerConfig,
    count: int,
    needs: Tuple[bool, bool, bool, bool],
    residual: Optional[Tensor] = None,
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dx, dweight, dbias, dresidual) of one layer from its output ``y`` (N, C, *) and ``var`` (C,); None
    where ``needs`` (for x, weight, bias, residual) is False. ``count``: values per channel of the (global)
    batch. A fused residual layer passes its ``residual`` (the one its forward added).

    Without a weight (bias), dweight (dbias) is the raw sum of dz * x_hat (dz) in the opmath dtype.
    Also the backward of DenseNet's memory-efficient bottleneck, which rebuilds ``y`` itself.
    """
    need_dx, need_w, need_b, need_r = needs
    args = (config.eps, config.activation, config.activation_param)
    if config.training and not config.sync and need_dx:  # the usual training step: one op
        dx, dweight, dbias, dresidual = _ops.backward_train(y, dy, var, weight, bias, *args, residual)
        return dx, dweight if need_w else None, dbias if need_b else None, dresidual if need_r else None
    dx = dweight = dbias = dresidual = None
    sum_dz, sum_dz_xhat = _ops.backward_reduce(y, dy, weight, bias, *args, residual)
    if need_dx or need_r:  # the residual's gradient comes out of the dx pass
        mean_dz = mean_dz_xhat = None  # eval: the statistics are constants
        if config.training:  # synchronised: dx needs the global sums
            global_dz, global_dz_xhat = sync.all_reduce_sums(sum_dz, sum_dz_xhat, config.group)
            mean_dz, mean_dz_xhat = global_dz / count, global_dz_xhat / count
        dx, dresidual = _ops.backward(y, dy, var, weight, bias, mean_dz, mean_dz_xhat, *args, residual)
        dx, dresidual = dx if need_dx else None, dresidual if need_r else None
    if need_w:
        dweight = sum_dz_xhat if weight is None else weight_grad(weight, sum_dz_xhat)
    if need_b:
        dbias = sum_dz if bias is None else sum_dz.to(bias.dtype)
    return dx, dweight, dbias, dresidual


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
    residual: Optional[Tensor],
) -> Tensor:
    """The eval-mode layer as standard ops (batch_norm with weight |w| + eps, the residual add, then the
    activation).

    Used while exporting: exported graphs then contain only aten/ONNX standard operators, which every
    runtime and graph pass (e.g. conv-BN folding) understands. The result is returned, not written into
    ``x``: an exported graph has no use for the in-place storage trick.
    """
    scale = None if weight is None else weight.abs() + eps
    y = torch.nn.functional.batch_norm(x, running_mean, running_var, scale, bias, False, 0.0, eps)
    if residual is not None:
        y = y + residual
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
    residual: Optional[Tensor],
) -> Tensor:
    """The body of :func:`inplace_abn` and :func:`inplace_abn_sync`: validate once, then the Function."""
    activation, activation_param = validation.check_layer_args(
        x, weight, bias, running_mean, running_var, training, momentum, eps, activation, activation_param
    )
    validation.check_residual(x, residual)
    if not activations.invertible(activation, activation_param):
        activations.warn_non_invertible()
    if not training and _exporting():
        return _eval_standard_ops(
            x, weight, bias, running_mean, running_var, eps, activation, activation_param, residual
        )
    # Eval mode uses the running statistics: no collective, and nothing to warn about.
    sync_stats = bool(training) and sync_stats and sync.sync_enabled(group)
    if training and not sync_stats:
        validation.check_count(x.numel() // x.size(1), x.shape)
    keep_xhat = (
        residual is not None
        and torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in (x, weight, bias, residual))
        and residual_inversion_lossy(residual, weight, bias, eps, x.dtype)
    )
    if keep_xhat:
        _warn_keep_xhat(x.dtype)
    config = LayerConfig(
        bool(training), float(momentum), float(eps), activation, activation_param, group, sync_stats, keep_xhat
    )
    return InPlaceABNFunction.apply(x, weight, bias, running_mean, running_var, residual, config)


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
    *,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """In-Place Activated Batch Normalization.

    Computes, per channel c over all N * prod(*) elements,
    ``y = act((|weight[c]| + eps) * (x - mean[c]) / sqrt(var[c] + eps) + bias[c] [+ residual])`` and writes
    ``y`` over ``x``. In training the batch statistics are used and, when given, the running statistics are updated
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
        residual: Optional tensor of x's shape, dtype and device (any strides), added after the affine map
            and before the activation: the fused ``act(BN(x) + residual)`` that ends a post-activation
            residual block. It is kept for backward by reference (the block's first convolution keeps it
            anyway), receives its gradient, and must not be modified before backward (PyTorch then
            raises its "modified by an inplace operation" error). When recovering x_hat from the output
            would be lossy (a weight tiny against the residual, or a half-precision output; see
            :func:`residual_inversion_lossy`), the layer keeps x_hat for that call and says so once.

    Returns:
        ``x`` itself, holding the output (N, C, *).
    """
    return _layer(
        x, weight, bias, running_mean, running_var, training, momentum, eps, activation, activation_param, None, False,
        residual,
    )  # fmt: skip


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
    *,
    residual: Optional[Tensor] = None,
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
        residual: As in :func:`inplace_abn` (the statistics stay those of x alone).

    Returns:
        ``x`` itself, holding the output (N, C, *).
    """
    return _layer(
        x, weight, bias, running_mean, running_var, training, momentum, eps, activation, activation_param, group, True,
        residual,
    )  # fmt: skip


def recover_normalized_input(
    y: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    eps: float = 1e-05,
    activation: str = "leaky_relu",
    activation_param: float = 0.01,
    *,
    residual: Optional[Tensor] = None,
) -> Tensor:
    """Recovers ``x_hat = (x - mean) / sqrt(var + eps)`` (N, C, *) from a layer output ``y`` (N, C, *)
    (and the ``residual`` a fused layer added).

    This is the inversion the backward pass performs, exposed to measure its accuracy.

    Raises:
        ValueError: for ReLU / slope 0, whose negative half cannot be recovered.
    """
    activation, activation_param = activations.resolve(activation, activation_param)
    if not activations.invertible(activation, activation_param):
        raise ValueError("activation leaky_relu with slope 0 (relu) is not invertible")
    validation.check_residual(y, residual, "y")
    return _ops.invert(y, weight, bias, eps, activation, activation_param, residual)
