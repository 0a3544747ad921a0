"""Functional In-Place Activated BatchNorm: ``inplace_abn`` and ``inplace_abn_sync``.

Both overwrite their input with ``act((|weight| + eps) * (x - mean) / sqrt(var + eps) + bias)`` and keep
only that output for backward; the backward inverts the activation and the affine map to recover what
it needs (Rota Bulo et al., CVPR 2018; math in shared spec ``math.md``).
"""

from __future__ import annotations

import warnings
from typing import Any, Optional, Tuple

import torch
import torch.distributed as dist
from torch import Tensor
from torch.autograd.function import once_differentiable

from . import _ops, _python_ops
from ._python_ops import _cast, opmath_dtype

__all__ = [
    "inplace_abn",
    "inplace_abn_sync",
    "ACTIVATIONS",
    "check_activation",
    "is_invertible",
    "recover_normalized_input",
]

#: Activations of the in-place layers ("relu" and the legacy "none" are accepted spellings).
ACTIVATIONS = ("leaky_relu", "elu", "identity", "relu", "none")

_warned_non_invertible = False


def check_activation(activation: Any, activation_param: Any) -> Tuple[str, float]:
    """Validates an activation and returns its canonical ``(name, param)``.

    ``relu`` becomes ``("leaky_relu", 0.0)`` and ``none`` becomes ``("identity", 0.0)``.

    Raises:
        ValueError: unknown name, negative leaky_relu slope, or ELU alpha <= 0.
    """
    if not isinstance(activation, str) or activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if activation == "relu":
        return "leaky_relu", 0.0
    if activation in ("identity", "none"):
        return "identity", 0.0
    try:
        param = float(activation_param)
    except (TypeError, ValueError):
        raise ValueError(f"activation_param must be a number for activation={activation!r}, got {activation_param!r}")
    if activation == "leaky_relu" and not param >= 0.0:
        raise ValueError(
            f"activation_param (the leaky_relu negative slope) must be >= 0, got {param}; a negative slope "
            "makes the activation non-monotonic and not invertible"
        )
    if activation == "elu" and not param > 0.0:
        raise ValueError(f"activation_param (the ELU alpha) must be > 0, got {param}; alpha <= 0 is not invertible")
    return activation, param


def is_invertible(activation: str, activation_param: float) -> bool:
    """True when the layer can recover its input from its output (everything but ReLU / slope 0)."""
    name, param = check_activation(activation, activation_param)
    return not (name == "leaky_relu" and param == 0.0)


def _warn_non_invertible() -> None:
    global _warned_non_invertible
    if not _warned_non_invertible:
        _warned_non_invertible = True
        warnings.warn(
            "inplace_abn: leaky_relu with slope 0 (ReLU) is not invertible, so this layer keeps its "
            "pre-activation for backward and saves no memory over BatchNorm + ReLU(inplace=True). Use "
            "activation='leaky_relu' with activation_param > 0 (e.g. 0.01) to get the in-place saving.",
            RuntimeWarning,
            stacklevel=4,
        )


_FLOAT_TYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def _check_inputs(
    x: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    running_mean: Optional[Tensor],
    running_var: Optional[Tensor],
    eps: float,
) -> None:
    """Validates the functional arguments; errors name the argument, the value and the fix."""
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (N, C, *) with at least 2 dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in _FLOAT_TYPES:
        raise TypeError(f"x must be float64, float32, float16 or bfloat16, got {x.dtype}; convert it with x.float()")
    shape, device = (x.size(1),), x.device
    for name, v, is_param in (
        ("weight", weight, True), ("bias", bias, True), ("running_mean", running_mean, False),
        ("running_var", running_var, False),
    ):  # fmt: skip
        if v is None:
            continue
        if not isinstance(v, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(v).__name__}")
        if v.shape != shape:
            raise ValueError(
                f"{name} must have shape {shape} to match the {shape[0]} channels of x {tuple(x.shape)}, "
                f"got {tuple(v.shape)}; check num_features of the layer"
            )
        if v.device != device:
            raise ValueError(f"{name} is on {v.device} but x is on {x.device}; move the layer with .to({x.device})")
        if v.dtype not in _FLOAT_TYPES:
            raise TypeError(f"{name} must be a floating-point tensor, got {v.dtype}")
        if is_param and v.dtype != x.dtype and v.dtype != opmath_dtype(x.dtype):
            raise TypeError(
                f"{name} has dtype {v.dtype} but x has dtype {x.dtype}; parameters must be {x.dtype}"
                + (f" or {opmath_dtype(x.dtype)}" if opmath_dtype(x.dtype) != x.dtype else "")
                + " (convert the layer with .to(dtype))"
            )
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be both tensors or both None")
    if not eps > 0:
        raise ValueError(f"eps must be > 0, got {eps}")


def _sync_statistics(mean: Tensor, var: Tensor, count: int, group: Any) -> Tuple[Tensor, Tensor, int]:
    """Merges per-process (mean, biased var, count) exactly (Chan's formula); equal to one big batch."""
    world = dist.get_world_size(group)
    if world <= 0:
        raise RuntimeError(
            "inplace_abn_sync: this process (rank "
            f"{dist.get_rank()}) is not a member of the layer's process group; in training every member must "
            "call the layer and non-members must not (give them their own group, e.g. with active_group(), "
            "or run the layer in eval mode)"
        )
    if count == 0:  # an empty local batch contributes nothing (its statistics are NaN)
        mean, var = torch.zeros_like(mean), torch.zeros_like(var)
    packed = torch.cat([mean, var, mean.new_tensor([float(count)])])
    gathered = [torch.empty_like(packed) for _ in range(world)]
    dist.all_gather(gathered, packed, group=group)
    stats = torch.stack(gathered)  # (world, 2C + 1)
    channels = mean.numel()
    means, variances, counts = stats[:, :channels], stats[:, channels : 2 * channels], stats[:, -1:]
    total = counts.sum()
    global_mean = (means * counts).sum(0) / total
    # sum of per-rank M2 plus the between-rank term: the pairwise merge generalised to k parts.
    m2 = (variances * counts).sum(0) + ((means - global_mean) ** 2 * counts).sum(0)
    return global_mean, m2 / total, int(total.item())


_warned_no_distributed = False


def _sync_enabled(group: Any) -> bool:
    global _warned_no_distributed
    if dist.is_available() and dist.is_initialized():
        return True
    if _warned_no_distributed:
        return False
    _warned_no_distributed = True
    warnings.warn(
        "inplace_abn_sync: torch.distributed is not initialised, so statistics are computed on this "
        "process only (as inplace_abn). Call torch.distributed.init_process_group() first to synchronise.",
        RuntimeWarning,
        stacklevel=4,
    )
    return False


def _check_count(count: int, shape: Any) -> None:
    """nn.BatchNorm's rule: training needs more than one value per channel."""
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(shape)}")


def _local_backward(
    y: Tensor,
    dy: Tensor,
    var: Tensor,
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    training: bool,
    need_dx: bool,
    need_w: bool,
    need_b: bool,
    eps: float,
    activation: str,
    activation_param: float,
) -> Tuple[Optional[Tensor], Optional[Tensor], Optional[Tensor]]:
    """(dx, dweight, dbias) of a layer on local statistics; None for what is not needed."""
    args = (eps, activation, activation_param)
    if training and need_dx:
        dx, dweight, dbias = _ops.backward_train_saved(y, dy, (var,), weight, bias, *args)
        return dx, dweight if need_w else None, dbias if need_b else None
    dweight = dbias = None
    if need_w or need_b:
        sum_dz, sum_dz_xhat = _ops.backward_reduce(y, dy, weight, bias, *args)
        dweight, dbias = _parameter_grads(weight, bias, sum_dz, sum_dz_xhat, need_w, need_b)
    # eval mode: the statistics are constants
    dx = _ops.backward(y, dy, var, weight, bias, None, None, *args) if need_dx else None
    return dx, dweight, dbias


def _parameter_grads(
    weight: Optional[Tensor],
    bias: Optional[Tensor],
    sum_dz: Tensor,
    sum_dz_xhat: Tensor,
    need_w: bool,
    need_b: bool,
) -> Tuple[Optional[Tensor], Optional[Tensor]]:
    """dweight = sum(dz * x_hat) * sign(w) with sign(0) = +1 (so a zero weight still learns); dbias = sum(dz)."""
    dweight = _python_ops.weight_grad(weight, sum_dz_xhat) if need_w else None
    dbias = _cast(sum_dz, bias.dtype) if need_b else None
    return dweight, dbias


class _InPlaceABN(torch.autograd.Function):
    # NB: an autograd.Function (not torch.library.register_autograd): register_autograd refuses ops that
    # mutate an input ("Cannot register autograd formula for non-functional operator"), and the whole
    # point of this layer is that forward_ writes y over x. The non-tensor arguments travel as one tuple:
    # Function.apply inspects every argument, and on small layers that per-call cost shows.

    @staticmethod
    def forward(
        ctx: Any,
        x: Tensor,
        weight: Optional[Tensor],
        bias: Optional[Tensor],
        running_mean: Optional[Tensor],
        running_var: Optional[Tensor],
        config: Tuple[bool, float, float, str, float, Any, bool],
    ) -> Tensor:
        training, momentum, eps, activation, activation_param, group, sync = config
        count = x.numel() // x.size(1)
        invertible = not (activation == "leaky_relu" and activation_param == 0.0)
        # ReLU loses the negative half: such a layer computes z, keeps a copy, then applies the ReLU.
        act, act_param = (activation, activation_param) if invertible else ("identity", 0.0)
        fused = training and not sync
        if fused:  # the op also updates the running statistics
            if count <= 1:
                _check_count(count, x.shape)
            state = _ops.forward_train_saving_(
                x, weight, bias, running_mean, running_var, momentum, eps, act, act_param
            )
        else:
            if training:
                mean, var = _ops.statistics(x)
                mean, var, count = _sync_statistics(mean, var, count, group)
                _check_count(count, x.shape)  # the GLOBAL count
            else:
                stat_dtype = opmath_dtype(x.dtype)
                mean, var = _cast(running_mean, stat_dtype), _cast(running_var, stat_dtype)
            _ops.forward_(x, mean, var, weight, bias, eps, act, act_param)
            if training and running_mean is not None:
                _python_ops.update_running_stats(running_mean, running_var, mean, var, count, momentum)
            state = (var,)

        if invertible:
            ctx.save_for_backward(x, weight, bias, *state)
        else:
            z = x.clone()
            x.relu_()
            ctx.save_for_backward(x, weight, bias, *state, z)
        ctx.mark_dirty(x)
        ctx.config = (training, eps, activation, activation_param, group, sync, count, invertible)
        return x

    @staticmethod
    def backward(ctx: Any, dy: Tensor):
        if torch.is_grad_enabled():
            # create_graph=True: the backward is not itself differentiable. once_differentiable lets the
            # graph be built and raises only if something differentiates through it (it costs
            # microseconds per call, so the usual grad-free backward skips it).
            return _backward_once(ctx, dy)
        return _backward(ctx, dy)


def _backward(ctx: Any, dy: Tensor) -> Tuple[Optional[Tensor], ...]:
    training, eps, activation, activation_param, group, sync, count, invertible = ctx.config
    y, weight, bias, *state = ctx.saved_tensors
    if not invertible:
        # ReLU's own backward (0 where z <= 0, PyTorch's convention); then the layer is BN + identity on z.
        y = state.pop()
        dy = torch.ops.aten.threshold_backward(dy, y, 0)
        activation, activation_param = "identity", 0.0
    need_dx, need_w, need_b = ctx.needs_input_grad[:3]
    if training and not sync and need_dx:  # the usual training step: whatever state the forward kept
        dx, dweight, dbias = _ops.backward_train_saved(y, dy, state, weight, bias, eps, activation, activation_param)
        return dx, dweight if need_w else None, dbias if need_b else None, None, None, None
    args = (eps, activation, activation_param)
    var = state[0] if len(state) == 1 else None  # (var,) everywhere but in fused training
    if sync and training and need_dx:
        sum_dz, sum_dz_xhat = _ops.backward_reduce(y, dy, weight, bias, *args)
        # Parameter gradients stay local (DDP averages them); dx needs the global sums.
        sums = torch.stack([sum_dz, sum_dz_xhat])
        dist.all_reduce(sums, group=group)
        dx = _ops.backward(y, dy, var, weight, bias, sums[0] / count, sums[1] / count, *args)
        dweight, dbias = _parameter_grads(weight, bias, sum_dz, sum_dz_xhat, need_w, need_b)
    else:
        dx, dweight, dbias = _local_backward(
            y, dy, var, weight, bias, training and not sync, need_dx, need_w, need_b, *args
        )
    return dx, dweight, dbias, None, None, None


_backward_once = once_differentiable(_backward)

# Function.apply is a Python layer over the C++ apply that only matters under torch.func transforms (it
# routes them, and unwraps tensors that outlived one, which this layer never gets: it refuses the
# transforms) and under torch.compile (dynamo recognises it). Outside both, calling the C++ apply
# directly is the same call, minus microseconds per layer in a training step (measured: about 2% of a
# step of an 8x32x28x28 layer). Kept working if a torch version lays these internals out differently.
try:
    _direct_apply = torch._C._FunctionBase.__dict__["apply"].__get__(None, _InPlaceABN)
    _functorch_active = torch._C._are_functorch_transforms_active
except (AttributeError, KeyError, TypeError):  # pragma: no cover - depends on torch internals
    _direct_apply = _functorch_active = None


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
    if activation == "leaky_relu":
        return torch.nn.functional.leaky_relu(y, activation_param)
    if activation == "elu":
        return torch.nn.functional.elu(y, activation_param)
    return y


def _apply(
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
    sync: bool,
) -> Tensor:
    _check_inputs(x, weight, bias, running_mean, running_var, eps)
    activation, activation_param = check_activation(activation, activation_param)
    if torch.is_grad_enabled() and x.is_leaf and x.requires_grad:
        # Checked before anything is written: autograd's own check would fire only after the overwrite.
        raise RuntimeError(
            "a leaf Variable that requires grad is being used in an in-place operation: inplace_abn overwrites "
            "its input x. Pass a non-leaf tensor (e.g. the output of the previous layer, or x.clone())."
        )
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")
    if activation == "leaky_relu" and activation_param == 0.0:
        _warn_non_invertible()
    if not training and _exporting():
        return _eval_standard_ops(x, weight, bias, running_mean, running_var, eps, activation, activation_param)
    if sync:
        # Eval mode uses the running statistics: no collective, and nothing to warn about.
        sync = bool(training) and _sync_enabled(group)
    config = (bool(training), float(momentum), float(eps), activation, activation_param, group, sync)
    if not torch.compiler.is_compiling() and _direct_apply is not None and not _functorch_active():
        return _direct_apply(x, weight, bias, running_mean, running_var, config)
    return _InPlaceABN.apply(x, weight, bias, running_mean, running_var, config)


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
    return _apply(
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
    return _apply(
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
    """Recovers ``x_hat = (x - mean) / sqrt(var + eps)`` from a layer output ``y`` (N, C, *).

    This is the inversion the backward pass performs, exposed to measure its accuracy.

    Raises:
        ValueError: for ReLU / slope 0, whose negative half cannot be recovered.
    """
    activation, activation_param = check_activation(activation, activation_param)
    if activation == "leaky_relu" and activation_param == 0.0:
        raise ValueError("activation leaky_relu with slope 0 (relu) is not invertible")
    return _ops.invert(y, weight, bias, eps, activation, activation_param)
