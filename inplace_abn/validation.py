"""Argument checks of the functional layer: errors name the argument, the value and the fix.

Everything here runs before the layer writes anything (the input, the running statistics or
``num_batches_tracked``), so a refused call leaves no state changed.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor
from torch.multiprocessing.reductions import StorageWeakRef

from . import activations
from .pure_backend import opmath_dtype

__all__ = ["FLOAT_TYPES", "check_layer_args", "check_count", "check_residual", "has_internal_overlap"]

#: The input dtypes of the layer (parameters: the input's dtype or its opmath dtype).
FLOAT_TYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


def check_layer_args(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    training: bool,
    momentum: Any,
    eps: Any,
    activation: Any,
    activation_param: Any,
) -> tuple[str, float]:
    """Validates every argument of one layer call; returns the canonical ``(activation, activation_param)``.

    Raises:
        TypeError: a non-tensor or a non-floating dtype, or parameters of a dtype the kernels do not take.
        ValueError: a shape, device, eps, momentum or activation problem (including a slope / alpha whose
            reciprocal overflows in the compute dtype), x or a running statistic whose elements overlap in
            memory, or eval mode without running statistics.
        RuntimeError: ``x`` is a leaf that requires grad (the layer overwrites it).
    """
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < 2:
        raise ValueError(f"x must have shape (N, C, *) with at least 2 dimensions, got shape {tuple(x.shape)}")
    if x.dtype not in FLOAT_TYPES:
        raise TypeError(f"x must be float64, float32, float16 or bfloat16, got {x.dtype}; convert it with x.float()")
    if x.size(1) == 0:
        raise ValueError(f"x must have at least one channel (dimension 1), got shape {tuple(x.shape)}")
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
        if v.dtype not in FLOAT_TYPES:
            raise TypeError(f"{name} must be a floating-point tensor, got {v.dtype}")
        if is_param and v.dtype != x.dtype and v.dtype != opmath_dtype(x.dtype):
            raise TypeError(
                f"{name} has dtype {v.dtype} but x has dtype {x.dtype}; parameters must be {x.dtype}"
                + (f" or {opmath_dtype(x.dtype)}" if opmath_dtype(x.dtype) != x.dtype else "")
                + " (convert the layer with .to(dtype))"
            )
    for name, v in (("x", x), ("running_mean", running_mean), ("running_var", running_var)):
        if v is not None and has_internal_overlap(v):
            raise ValueError(
                f"{name} has internally overlapping memory (a view from expand, unfold or as_strided whose "
                f"elements share storage, shape {tuple(v.shape)} strides {tuple(v.stride())}): the layer writes "
                f"into {name}, so elements sharing a location would get several results; pass {name}.contiguous()"
                + (
                    " (and copy the result back into the original tensor if you need it there)"
                    if name == "x"
                    else " (a buffer of its own)"
                )
            )
    if (running_mean is None) != (running_var is None):
        raise ValueError("running_mean and running_var must be both tensors or both None")
    if not (_is_number(eps) and 0.0 < eps < math.inf):  # NaN fails both comparisons
        raise ValueError(f"eps must be > 0 and finite, got {eps!r}")
    if not (_is_number(momentum) and 0.0 <= momentum <= 1.0):
        raise ValueError(
            f"momentum must be a number in [0, 1], got {momentum!r}"
            + (
                "; the cumulative average (momentum=None) is an option of the modules, e.g. InPlaceABN(C, "
                "momentum=None)"
                if momentum is None
                else ""
            )
        )
    resolved = activations.resolve(activation, activation_param)
    _check_invertible_in(resolved, opmath_dtype(x.dtype))
    # The layer overwrites x: refuse a leaf that requires grad before anything is written (autograd's own
    # check would fire only after the overwrite).
    if torch.is_grad_enabled() and x.is_leaf and x.requires_grad:
        raise RuntimeError(
            "a leaf Variable that requires grad is being used in an in-place operation: inplace_abn overwrites "
            "its input x. Pass a non-leaf tensor (e.g. the output of the previous layer, or x.clone())."
        )
    if not training and running_mean is None:
        raise ValueError("running_mean and running_var are required when training=False")
    return resolved


def check_residual(x: Tensor, residual: Tensor | None, name: str = "x") -> None:
    """The fused layer's residual: a tensor of x's shape, dtype and device that shares no memory with x.

    Raises:
        TypeError: not a tensor, or another dtype.
        ValueError: another shape or device, or memory shared with x (which the layer overwrites).
    """
    if residual is None:
        return
    if not isinstance(residual, Tensor):
        raise TypeError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
    if residual.shape != x.shape:
        raise ValueError(
            f"residual must have the shape of {name} {tuple(x.shape)}, got {tuple(residual.shape)}; no broadcasting: "
            "a projected shortcut (downsample) must produce the block output's shape"
        )
    if residual.dtype != x.dtype:
        raise TypeError(
            f"residual has dtype {residual.dtype} but {name} has dtype {x.dtype}; convert it with .to({x.dtype})"
        )
    if residual.device != x.device:
        raise ValueError(f"residual is on {residual.device} but {name} is on {x.device}; move it with .to({x.device})")
    if name == "x" and _shares_memory(x, residual):
        raise ValueError(
            "residual shares memory with x, which the layer overwrites; pass a separate tensor (e.g. residual.clone())"
        )


def _shares_memory(a: Tensor, b: Tensor) -> bool:
    """Whether a and b view the same storage (compared as objects: meta and fake storages have no address)."""
    if torch.compiler.is_compiling():
        return False  # traced tensors: aliasing is autograd's and the functionaliser's business
    return StorageWeakRef(a.untyped_storage()) == StorageWeakRef(b.untyped_storage())


def has_internal_overlap(t: Tensor) -> bool:
    """Whether two elements of ``t`` share a memory location (``expand``, overlapping ``unfold`` /
    ``as_strided`` views), from its sizes and strides.

    Dimensions taken by increasing stride: when each stride exceeds the largest offset reachable by the
    smaller ones, every element has its own location (contiguous, channels_last, permuted, sliced and
    stepped views: no work). Otherwise the offsets are enumerated once (unusual strides only). Traced
    tensors are not checked (no data to enumerate; aliasing is the compiler's business).
    """
    if torch.compiler.is_compiling():
        return False
    dims = sorted((stride, size) for size, stride in zip(t.shape, t.stride()) if size > 1)
    reach = 0
    for stride, size in dims:
        if stride <= reach:
            break
        reach += stride * (size - 1)
    else:
        return False
    offsets = torch.zeros((), dtype=torch.int64)
    for stride, size in dims:
        offsets = (offsets.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride).reshape(-1)
    return int(offsets.unique().numel()) != offsets.numel()


def check_count(count: int, shape: Sequence[int]) -> None:
    """nn.BatchNorm's rule: training needs more than one value per channel (``count`` of them)."""
    if count <= 1:
        raise ValueError(f"Expected more than 1 value per channel when training, got input size {list(shape)}")


def _is_number(value: Any) -> bool:
    return isinstance(value, numbers.Real) and not isinstance(value, bool)


def _check_invertible_in(resolved: tuple[str, float], dtype: torch.dtype) -> None:
    """The backward divides by the leaky_relu slope / ELU alpha (docs/math.md, inverting the activations): a
    parameter whose reciprocal overflows in the compute dtype would give inf/NaN gradients."""
    name, param = resolved
    if name in ("leaky_relu", "elu") and param > 0.0 and param * torch.finfo(dtype).max < 1.0:
        what = "leaky_relu negative slope" if name == "leaky_relu" else "ELU alpha"
        raise ValueError(
            f"activation_param (the {what}) {param!r} is too small for {dtype} computation: the backward divides "
            f"by it and 1 / {param!r} overflows; use a value >= {1.0 / torch.finfo(dtype).max:.3g} (e.g. 0.01)"
        )
