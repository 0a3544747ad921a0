"""Functional In-Place Activated BatchNorm: ``inplace_abn``, ``inplace_abn_sync`` and their autograd Function.

Both functions overwrite their input with ``act((|weight| + eps) * (x - mean) / sqrt(var + eps) + bias)``
and keep only that output for backward; the backward inverts the activation and the affine map to
recover what it needs (Rota Bulo et al., CVPR 2018; the math is in docs/math.md).

One layer call, forward: ``inplace_abn`` validates (``validation.check_layer_args``) and calls
:class:`InPlaceABNFunction`, whose forward calls one op wrapper of ``_ops`` (``forward_train_`` in local
training; ``statistics`` + ``sync.merge_statistics`` + ``forward_`` when synchronised; ``forward_`` in
eval). Backward mirrors it: ``backward_train``, or ``backward_reduce`` (+ ``sync.all_reduce_sums``) +
``backward``.

With ``residual=r`` the same ops compute the fused ``act(BN(x) + r)`` that ends a post-activation residual
block (docs/math.md, "Residual fusion"); ``residual_lossy_channels`` decides which channels keep x_hat.
"""

from __future__ import annotations

import warnings
from typing import Any, NamedTuple

import torch
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _ops, activations, sync, validation
from .pure_backend import opmath_dtype, update_running_stats, weight_grad
from .reference import in_place_scale

__all__ = [
    "inplace_abn",
    "inplace_abn_sync",
    "recover_normalized_input",
    "InPlaceABNFunction",
    "LayerConfig",
    "layer_backward",
    "residual_amplification_limit",
    "residual_lossy_channels",
    "ACTIVATIONS",
    "check_activation",
    "is_invertible",
    "max_pool2d",
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


def residual_amplification_limit(dtype: torch.dtype) -> float:
    """The largest amplification A = (max|residual| + |bias|) / (|weight| + eps) of a channel for which a
    fused residual layer with output ``dtype`` still recovers x_hat from its output (docs/math.md,
    "Residual fusion"): min(2**14, 2**-5 / u), u the unit roundoff of ``dtype``.

    The recovered x_hat (unit scale) then errs by at most A * u beyond the plain layer's own rounding:
    at most 2**14 units in the last place (1e-3 absolute in float32), and never more than 2**-5 absolute,
    the rounding of bfloat16 on a normalised value of 8. That is A <= 16384 in float32 and float64, 64 in
    float16, 8 in bfloat16.
    """
    unit_roundoff = torch.finfo(dtype).eps / 2
    return min(2.0**14, 2.0**-5 / unit_roundoff)


def residual_lossy_channels(
    residual: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float,
    dtype: torch.dtype,
    activation: str = "leaky_relu",
    group: Any = None,
    sync_group: bool = False,
) -> Tensor | None:
    """The channels for which a fused residual layer must keep x_hat instead of recovering it from its output.

    The output y = act(gamma * x_hat + beta + r) is rounded to ``dtype`` relative to its own magnitude,
    and the backward divides z - r - beta by gamma: per channel the error of x_hat is at most
    u * (|gamma * x_hat| + |beta| + max|r|) / gamma, u the unit roundoff of ``dtype``. The x_hat term is
    the plain layer's own rounding; the rest, u * A with A = (max|r| + |beta|) / gamma, is what a
    zero-initialised weight (gamma = eps) or a half-precision output makes large. A channel is lossy when
    A exceeds :func:`residual_amplification_limit`. With ELU it is also lossy when the residual can push z
    into ELU's flat tail, where recovering z = log1p(y / alpha) amplifies the rounding of y by e^{-z} (and
    a saturated y == -alpha has lost z altogether): when e^{max|r| + |beta|} exceeds the same limit.

    Args:
        residual: The residual (N, C, *) of the call.
        weight, bias: The layer's (C,) parameters, or None.
        eps: The layer's eps (gamma = |weight| + eps).
        dtype: The dtype the output is stored in (x's).
        activation: The layer's canonical activation name.
        group, sync_group: With ``sync_group``, the decision is the union over the processes of ``group``
            (one small all-reduce), so that every process takes the same backward path and makes the same
            collectives.

    Returns:
        The lossy channels' indices (int64, ascending), or None when there are none; under torch.compile
        always the indices, possibly none (the graph cannot branch on their number). Always None on the
        meta device, which has no values to judge (memory counting assumes the steady state).
    """
    if residual.is_meta:
        return None
    limit = residual_amplification_limit(dtype)
    with torch.no_grad():  # a decision, not part of the graph: nothing for autograd to record or save
        reach = _ops.absmax(residual)  # (C,), opmath dtype: max|r| per channel
        if bias is not None:
            reach = reach + bias.abs().to(reach.dtype)
        shift = reach  # max|r| + |b|
        if weight is not None:
            reach = reach / weight.abs().to(reach.dtype).add(eps)
        if activation == "elu":
            reach = torch.maximum(reach, shift.exp())
        if sync_group:
            reach = sync.all_reduce_max(reach, group)
        lossy = torch.ops.inplace_abn.lossy_channels(reach, limit)
    if torch.compiler.is_compiling():
        return lossy  # its size is known only when the graph runs: an empty tensor stands for "none"
    return lossy if lossy.numel() > 0 else None


# Not in src/ops.cpp with the other schemas: this op must exist without the compiled extension too. It is
# torch.nonzero behind an op boundary, because the number of lossy channels depends on the data: dynamo always
# graph-breaks on nonzero itself, while an op with a fake kernel of data-dependent size traces under
# torch.compile(fullgraph=True) (without fullgraph dynamo still splits the graph there), so that the fused layer
# compiles into the model's graph.
@torch.library.custom_op("inplace_abn::lossy_channels", mutates_args=())
def _lossy_channels(amplification: Tensor, limit: float) -> Tensor:
    """Indices (int64, ascending) of the channels whose ``amplification`` (C,) exceeds ``limit``; says once
    per process when there are any. Runs when the layer runs, eager or compiled."""
    lossy = torch.nonzero(amplification > limit).flatten()
    global _warned_keep_xhat
    if lossy.numel() > 0 and not _warned_keep_xhat:
        _warned_keep_xhat = True
        warnings.warn(
            "inplace_abn: a fused residual layer keeps the normalised input of some channels for this step: "
            f"their weight is small against the residual (amplification above {limit:g} for its output "
            "dtype), so recovering it from the output would be lossy. Gradients stay accurate; the layer "
            "saves that fraction of an activation less while this lasts (typically the first steps of a "
            "zero-initialised residual branch). Said once.",
            RuntimeWarning,
            stacklevel=2,
        )
    return lossy


@_lossy_channels.register_fake
def _(amplification: Tensor, limit: float) -> Tensor:
    return amplification.new_empty((torch.library.get_ctx().new_dynamic_size(),), dtype=torch.int64)


_warned_keep_xhat = False


# Also an op, for the compiler's partitioner, and declared as writing ``x`` although it only reads it. The copy
# is used in backward only, and the partitioner computes such values in backward from what forward saved: as
# aten.index_select that was all of x (before the layer overwrote it). Declared as writing x, the op precedes
# the layer's write in forward, its result can only be saved, and backward keeps k channels, not C.
@torch.library.custom_op("inplace_abn::keep_channels_", mutates_args=("x",))
def _keep_channels_(x: Tensor, channels: Tensor) -> Tensor:
    """A contiguous copy (N, k, *) of the ``channels`` (k,) of ``x`` (N, C, *); ``x`` is unchanged."""
    return x.index_select(1, channels).contiguous()


@_keep_channels_.register_fake
def _(x: Tensor, channels: Tensor) -> Tensor:
    return x.new_empty((x.shape[0], channels.shape[0]) + tuple(x.shape[2:]))


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
    * ``xhat``, ``lossy``: the normalised input of the channels ``lossy`` (int64 indices), in x's dtype,
      for which the fused layer's inversion would be lossy in this call (:func:`residual_lossy_channels`);
      backward computes those channels' gradients from it and the rest from y.
    """

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Tensor | None,
        bias: Tensor | None,
        running_mean: Tensor | None,
        running_var: Tensor | None,
        residual: Tensor | None,
        lossy: Tensor | None,
        config: LayerConfig,
    ) -> Tensor:
        invertible = activations.invertible(config.activation, config.activation_param)
        act, act_param = (config.activation, config.activation_param) if invertible else ("identity", 0.0)
        count = x.numel() // x.size(1)
        # A copy of the lossy channels, normalised below once the statistics are known.
        xhat = None if lossy is None else _keep_channels_(x, lossy)
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
            _normalize_(xhat, mean.index_select(0, lossy), var.index_select(0, lossy), config.eps)
        if not invertible:
            z = x.clone()
            x.relu_()
        ctx.save_for_backward(x, weight, bias, var, z, residual, xhat, lossy)
        ctx.mark_dirty(x)
        ctx.config = config
        ctx.count = count
        return x

    @staticmethod
    @once_differentiable
    def backward(ctx: Any, dy: Tensor) -> tuple[Tensor | None, ...]:
        y, weight, bias, var, z, residual, xhat, lossy = ctx.saved_tensors
        config = needs_config = ctx.config
        needs = ctx.needs_input_grad[:3] + (residual is not None and ctx.needs_input_grad[5],)
        y_out, dy_out = y, dy
        if z is not None:  # ReLU's own backward (0 where z <= 0, PyTorch's convention), then BN + identity on z
            dy = torch.ops.aten.threshold_backward(dy, z, 0)
            y, config = z, config._replace(activation="identity", activation_param=0.0)
        dx, dweight, dbias, dresidual = layer_backward(y, dy, var, weight, bias, config, ctx.count, needs, residual)
        if xhat is not None:
            _exact_lossy_channels(dx, dweight, y_out, dy_out, xhat, lossy, var, weight, needs_config, ctx.count)
        return dx, dweight, dbias, None, None, dresidual, None, None


def _normalize_(x: Tensor, mean: Tensor, var: Tensor, eps: float) -> Tensor:
    """Writes ``x_hat = (x - mean) / sqrt(var + eps)`` over ``x`` (N, C, *), computed in the opmath dtype of
    ``mean`` / ``var`` (C,) and rounded once to x's dtype; returns ``x``."""
    shape = (1, -1) + (1,) * (x.dim() - 2)
    return x.copy_((x.to(mean.dtype) - mean.view(shape)) * (var + eps).rsqrt().view(shape))


def _exact_lossy_channels(
    dx: Tensor | None,
    dweight: Tensor | None,
    y: Tensor,
    dy: Tensor,
    xhat: Tensor,
    lossy: Tensor,
    var: Tensor,
    weight: Tensor | None,
    config: LayerConfig,
    count: int,
) -> None:
    """Overwrites dx (N, C, *) and dweight (C,) of the ``lossy`` channels with values computed from their kept
    ``xhat`` (N, k, *) instead of the inversion (docs/math.md, "Residual fusion").

    dz comes from (y, dy) exactly (it needs only the sign of y, or y + alpha); dbias = sum(dz) and the
    residual's gradient dz never used x_hat, so they are already exact. Channels are independent, so the
    other channels' results stand.
    """
    dtype = opmath_dtype(y.dtype)
    dims = (0,) + tuple(range(2, y.dim()))
    shape = (1, -1) + (1,) * (y.dim() - 2)
    act = activations.get(config.activation)
    dz = act.grad(dy.index_select(1, lossy), y.index_select(1, lossy), config.activation_param).to(dtype)
    xh = xhat.to(dtype)
    sum_dz, sum_dz_xhat = dz.sum(dims), (dz * xh).sum(dims)
    if dweight is not None:  # from the local sums: DDP averages parameter gradients itself
        dweight.index_copy_(0, lossy, weight_grad(weight.index_select(0, lossy), sum_dz_xhat))
    if dx is None:
        return
    gamma = 1.0 if weight is None else weight.detach().index_select(0, lossy).to(dtype).abs().add(config.eps)
    scale = (var.index_select(0, lossy).to(dtype) + config.eps).rsqrt().mul(gamma)
    if config.training:
        if config.sync:  # every process has the same lossy channels (residual_lossy_channels)
            sum_dz, sum_dz_xhat = sync.all_reduce_sums(sum_dz, sum_dz_xhat, config.group)
        dz = dz - (sum_dz / count).view(shape) - xh * (sum_dz_xhat / count).view(shape)
    dx.index_copy_(1, lossy, (dz * scale.view(shape)).to(dx.dtype))


def layer_backward(
    y: Tensor,
    dy: Tensor,
    var: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    config: LayerConfig,
    count: int,
    needs: tuple[bool, bool, bool, bool],
    residual: Tensor | None = None,
) -> tuple[Tensor | None, Tensor | None, Tensor | None, Tensor | None]:
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


def _standard_ops(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    activation: str,
    activation_param: float,
    residual: Tensor | None,
) -> Tensor:
    """The layer as standard differentiable ops: batch_norm with weight |w| + eps (gradient sign(w), sign(0) =
    +1, as the layer's), the residual add, then the activation. Returns the result; ``x`` is not written.

    Used where a graph of standard ops serves better than the in-place trick: while exporting (every runtime
    and graph pass, e.g. conv-BN folding, understands them), and under torch.compile with an activation-memory
    budget below 1 (see :func:`_compiler_recomputes`).
    """
    scale = None if weight is None else in_place_scale(weight, eps)
    y = torch.nn.functional.batch_norm(x, running_mean, running_var, scale, bias, training, momentum, eps)
    if residual is not None:
        y = y + residual
    # In place on the fresh y: autograd then keeps the activation's output, not its input (which, under a budget,
    # the partitioner would keep beside the output the next layer keeps anyway).
    return activations.get(activation).apply_(y, activation_param)


def _compiler_recomputes() -> bool:
    """True while torch.compile traces under ``torch._functorch.config.activation_memory_budget`` < 1.

    The budget's partitioner then recomputes forward work in backward to keep less than eager mode does, and
    it can recompute only standard ops: kept opaque, every layer's output would have to be kept (resnet50 at
    64x64 kept 3.5 MB per sample at budgets 0.5 and 0.2, against the compiler's 3.0 and 1.3 for BatchNorm).
    Traced as standard ops, the layer leaves what to keep to the compiler. (The budget's documented knob
    lives in torch._functorch.config; it is read while tracing, as the partitioner reads it.)
    """
    if not torch.compiler.is_compiling():
        return False
    import torch._functorch.config as functorch_config

    return functorch_config.activation_memory_budget < 1.0


def _apply(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    residual: Tensor | None,
    lossy: Tensor | None,
    config: LayerConfig,
) -> Tensor:
    """:class:`InPlaceABNFunction` on ``x``, which ends up holding the output, eager or compiled.

    Under torch.compile the Function writes into a copy, and the result is copied into ``x``: when ``x``
    is an input of the compiled graph (the model's input, or the first tensor after a graph break),
    AOTAutograd treats the Function's write into it as a mutation hidden from autograd, applies it outside
    autograd and hands back ``x`` with its old history, so that dx came out as dy, silently (torch 2.13 and
    2.14, aot_eager and inductor). ``copy_`` is a write autograd sees. Inside a graph, where ``x`` is an
    intermediate nobody reads again, the compiler drops that write; what backward keeps is unchanged (y).
    """
    if not torch.compiler.is_compiling():
        return InPlaceABNFunction.apply(x, weight, bias, running_mean, running_var, residual, lossy, config)
    y = InPlaceABNFunction.apply(x.clone(), weight, bias, running_mean, running_var, residual, lossy, config)
    x.copy_(y)
    return y  # not x: the graph would then keep both y (for this layer) and the copy (for the next)


def _layer(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    activation: str,
    activation_param: float,
    group: Any,
    sync_stats: bool,
    residual: Tensor | None,
) -> Tensor:
    """The body of :func:`inplace_abn` and :func:`inplace_abn_sync`: validate once, then the Function."""
    activation, activation_param = validation.check_layer_args(
        x, weight, bias, running_mean, running_var, training, momentum, eps, activation, activation_param
    )
    validation.check_residual(x, residual)
    if not activations.invertible(activation, activation_param):
        activations.warn_non_invertible()
    if not training and _exporting():
        return _standard_ops(
            x, weight, bias, running_mean, running_var, False, 0.0, eps, activation, activation_param, residual
        )
    # Eval mode uses the running statistics: no collective, and nothing to warn about.
    sync_stats = bool(training) and sync_stats and sync.sync_enabled(group)
    if training and not sync_stats:
        validation.check_count(x.numel() // x.size(1), x.shape)
    config = LayerConfig(bool(training), float(momentum), float(eps), activation, activation_param, group, sync_stats)
    if training and not sync_stats and _compiler_recomputes():
        # Out of place: x keeps its value. Written back, x would be a tensor batch_norm's backward may read
        # after the write when x is a graph input (the partitioner keeps inputs rather than copies of them).
        return _standard_ops(
            x, weight, bias, running_mean, running_var, True, momentum, eps, activation, activation_param, residual
        )
    try:
        if residual is not None:
            layer = _sync_residual_layer if sync_stats else _residual_layer
            return layer(x, weight, bias, running_mean, running_var, residual, config)
        return _apply(x, weight, bias, running_mean, running_var, None, None, config)
    except RuntimeError as e:
        if "functorch" not in str(e):  # only autograd.Function's refusal under torch.func gets a new message
            raise
        raise RuntimeError(
            "inplace_abn (InPlaceABN / InPlaceABNSync / ABN layers) cannot run under torch.func transforms "
            "(grad, vmap, jacrev, functional_call + grad, ...): the layer overwrites its input and keeps only its "
            "output, which these transforms do not support. Use loss.backward() / torch.autograd.grad, or swap "
            "the layers for nn.BatchNorm + activation with inplace_abn.convert.to_batchnorm(model) first."
        ) from e


def _residual_layer(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    residual: Tensor,
    config: LayerConfig,
) -> Tensor:
    """The fused residual layer: the lossy-channel decision, then the Function."""
    lossy = None
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (x, weight, bias, residual)):
        lossy = residual_lossy_channels(
            residual, weight, bias, config.eps, x.dtype, config.activation, config.group, config.sync
        )
    return _apply(x, weight, bias, running_mean, running_var, residual, lossy, config)


# The synchronised layer's decision makes a collective (sync.all_reduce_max), which dynamo does not trace: under
# torch.compile that layer runs eagerly, a graph break on each side (none inside: see _lossy_channels).
_sync_residual_layer = torch.compiler.disable(_residual_layer, recursive=True)


def inplace_abn(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-05,
    activation: str = "leaky_relu",
    activation_param: float = 0.01,
    *,
    residual: Tensor | None = None,
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
            raises its "modified by an inplace operation" error). For the channels where recovering x_hat
            from the output would be lossy (a weight tiny against the residual, or a half-precision
            output; see :func:`residual_lossy_channels`), the layer keeps their x_hat for that call and
            says so once.

    Returns:
        ``x`` itself, holding the output (N, C, *).
    """
    return _layer(
        x, weight, bias, running_mean, running_var, training, momentum, eps, activation, activation_param, None, False,
        residual,
    )  # fmt: skip


def inplace_abn_sync(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool = True,
    momentum: float = 0.1,
    eps: float = 1e-05,
    activation: str = "leaky_relu",
    activation_param: float = 0.01,
    group: Any | None = None,
    *,
    residual: Tensor | None = None,
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
    weight: Tensor | None,
    bias: Tensor | None,
    eps: float = 1e-05,
    activation: str = "leaky_relu",
    activation_param: float = 0.01,
    *,
    residual: Tensor | None = None,
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


class _MaxPool2dFunction(torch.autograd.Function):
    """2-D max pooling that keeps only its input for backward (by reference) and recomputes the argmax there."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, kernel_size: Any, stride: Any, padding: Any, dilation: Any, ceil_mode: bool):
        ctx.pool = (kernel_size, stride, padding, dilation, ceil_mode)
        ctx.save_for_backward(x)  # a later in-place change of x raises autograd's usual error
        return torch.nn.functional.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)

    @staticmethod
    def backward(ctx: Any, dy: Tensor):
        (x,) = ctx.saved_tensors
        kernel_size, stride, padding, dilation, ceil_mode = ctx.pool
        _, indices = torch.nn.functional.max_pool2d(
            x, kernel_size, stride, padding, dilation, ceil_mode, return_indices=True
        )
        # The op nn.MaxPool2d's own backward runs, so that the gradient is the same, bit for bit.
        dx = torch.ops.aten.max_pool2d_with_indices_backward(
            dy, x, kernel_size, stride, padding, dilation, ceil_mode, indices
        )
        return dx, None, None, None, None, None


def _pair(v: Any) -> list[int]:
    return [int(v), int(v)] if isinstance(v, int) else [int(e) for e in v]


def max_pool2d(
    x: Tensor,
    kernel_size: int | tuple[int, int],
    stride: int | tuple[int, int] | None = None,
    padding: int | tuple[int, int] = 0,
    dilation: int | tuple[int, int] = 1,
    ceil_mode: bool = False,
) -> Tensor:
    """``F.max_pool2d`` that keeps only its input for backward, not the int64 argmax indices.

    ``nn.MaxPool2d`` keeps its input and the indices of each window's maximum (8 bytes per output element:
    1.6 MB per sample after resnet50's stem at 224x224). When the input is kept anyway (an In-Place ABN
    layer's output, which that layer keeps), the indices are all the pool adds; this function recomputes
    them in backward from the input (one window max) and then runs the same backward op, so gradients are
    identical to ``F.max_pool2d``'s. Outside training (no gradient needed) and while exporting it is
    ``F.max_pool2d`` itself.

    Args:
        x: Input of shape (N, C, H, W) or (C, H, W).
        kernel_size, stride, padding, dilation, ceil_mode: As ``F.max_pool2d`` (``stride=None``: the kernel).

    Returns:
        The pooled tensor, as ``F.max_pool2d`` returns it.
    """
    if stride is None or (not isinstance(stride, int) and len(stride) == 0):
        stride = kernel_size
    if not (torch.is_grad_enabled() and x.requires_grad) or _exporting():
        return torch.nn.functional.max_pool2d(x, kernel_size, stride, padding, dilation, ceil_mode)
    args = (_pair(kernel_size), _pair(stride), _pair(padding), _pair(dilation), bool(ceil_mode))
    return _MaxPool2dFunction.apply(x, *args)
