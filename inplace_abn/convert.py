"""Swaps of whole layers in a model: local <-> synchronised In-Place ABN, and ABN layers -> ``nn.BatchNorm``.

* :func:`convert_sync` / :func:`convert_local`: swap local <-> synchronised In-Place ABN layers (exact).
* :func:`to_batchnorm`: ABN-family layers -> ``nn.BatchNorm`` (+ residual add) + activation module
  (deployment / export), as :class:`BatchNormAct`.

The other conversions live in their own modules and are re-exported here, where inplace-abn 1.1.0-era
and user code imports them from:

* :func:`convert_model` (:mod:`inplace_abn.fx_convert`): the BatchNorm -> activation pairs of an existing
  network -> In-Place ABN layers, found in the real dataflow with ``torch.fx``.
* :func:`load_inplace_abn_v1_state_dict` (:mod:`inplace_abn.checkpoint_v1`): load checkpoints written by
  the original inplace-abn 1.1.0.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

from . import activations
from .abn import ABN, InPlaceABN, InPlaceABNSync, RecomputeMaxPool2d

__all__ = [
    "convert_sync",
    "convert_local",
    "to_batchnorm",
    "BatchNormNd",
    "BatchNormAct",
    "convert_model",
    "ConversionReport",
    "LayerConversion",
    "load_inplace_abn_v1_state_dict",
]


def _copy_state(src: nn.Module, dst: nn.Module, state: Mapping[str, Any] | None = None) -> nn.Module:
    """Gives ``dst`` the device, dtypes, state and train/eval mode of ``src`` (bit-exact).

    Args:
        src: The module replaced.
        dst: Its replacement, with parameters / buffers of the same names.
        state: The state dict to load into ``dst`` (default: ``src.state_dict()``), e.g. one with
            transformed weights.

    Returns:
        ``dst``.
    """
    for name, t in list(src.named_parameters(recurse=False)) + list(src.named_buffers(recurse=False)):
        target = getattr(dst, name)
        if t is not None and target is not None:
            # move first, then load: loading into float32 and casting afterwards would round float64 state
            target.data = target.data.to(device=t.device, dtype=t.dtype)
    with torch.no_grad():
        dst.load_state_dict(src.state_dict() if state is None else state)
    return dst.train(src.training)


def _swap(module: nn.Module, make: Callable[[nn.Module], nn.Module | None]) -> nn.Module:
    """Replaces, depth first, every submodule for which ``make`` returns a module (``module`` itself too)."""
    replacement = make(module)
    if replacement is not None:
        return replacement
    for name, child in module.named_children():
        new_child = _swap(child, make)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def _args(m: InPlaceABN) -> tuple:
    """The constructor arguments of an in-place layer, in :class:`InPlaceABN` order (group excluded)."""
    return (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, m.activation, m.activation_param)


def convert_sync(module: nn.Module, group: Any | None = None) -> nn.Module:
    """Replaces every :class:`InPlaceABN` in ``module`` by an :class:`InPlaceABNSync` (state kept).

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm``: returns the converted module (the same object,
    changed in place, unless ``module`` itself is an ``InPlaceABN``).

    Args:
        module: A model, or a single layer.
        group: Process group of the new layers (None = the default group).
    """

    def make(m: nn.Module) -> nn.Module | None:
        if type(m) is InPlaceABN:
            return _copy_state(m, InPlaceABNSync(*_args(m), group=group))
        return None

    return _swap(module, make)


def convert_local(module: nn.Module) -> nn.Module:
    """Replaces every :class:`InPlaceABNSync` in ``module`` by a local :class:`InPlaceABN` (state kept).

    The reverse of :func:`convert_sync`, e.g. for single-process evaluation or export.
    """

    def make(m: nn.Module) -> nn.Module | None:
        if type(m) is InPlaceABNSync:
            return _copy_state(m, InPlaceABN(*_args(m)))
        return None

    return _swap(module, make)


# ----------------------------------------------------------------------------------------------------------
# In-Place ABN -> nn.BatchNorm + activation
# ----------------------------------------------------------------------------------------------------------


class BatchNormNd(nn.BatchNorm1d):
    """``nn.BatchNorm`` for any (N, C, *) input with at least 2 dimensions (what ABN layers accept).

    Same parameters, buffers, state dict and arithmetic as ``nn.BatchNorm1d/2d/3d`` (it is a
    ``BatchNorm1d`` whose input-rank check accepts every rank). Used by :func:`to_batchnorm` with
    ``dims=None``.
    """

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected an input of shape (N, C, *) with at least 2 dims (got {input.dim()}D input)")


_BN_BY_DIMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d, None: BatchNormNd}


class BatchNormAct(nn.Sequential):
    """``nn.Sequential(batchnorm, activation)`` whose forward also takes the ``residual`` of a fused layer.

    What :func:`to_batchnorm` makes of an ABN-family layer. ``forward(x)`` is the plain Sequential;
    ``forward(x, residual)`` is ``activation(batchnorm(x) + residual)``: BatchNorm, add and activation as
    three standard ops, so a call written for the fused layer (``layer(x, residual=shortcut)``, e.g. in a
    model converted by :func:`convert_model` or a hand-written residual block) keeps working. The add is
    out of place: neither ``x`` nor ``residual`` is modified.
    """

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``act(bn(input) [+ residual])``."""
        if residual is None:
            return super().forward(input)
        bn, act = self
        return act(bn(input) + residual)


def to_batchnorm(module: nn.Module, dims: int | None = 2) -> nn.Module:
    """Replaces every ABN-family layer by a ``BatchNormAct(nn.BatchNorm*, activation)`` with equal outputs.

    :class:`InPlaceABN` and :class:`InPlaceABNSync` scale by ``|weight| + eps``, so the new BatchNorm gets
    ``weight = |w| + eps``; :class:`ABN` scales by the raw weight, which is copied unchanged. Bias, running
    statistics, ``num_batches_tracked``, eps, momentum, affine, track_running_stats, dtype, device and the
    train/eval mode are kept, so eval outputs are equal up to float rounding (the fused kernels and
    ``F.batch_norm`` round differently) and training continues with plain BatchNorm semantics.
    The activation becomes ``nn.LeakyReLU(slope)`` (``nn.ReLU`` for slope 0 / ``"relu"``), ``nn.ELU(alpha)``
    or ``nn.Identity()``, all with ``inplace=True`` (safe: BatchNorm's output is a fresh tensor). The sync
    layer becomes a local BatchNorm (use ``nn.SyncBatchNorm.convert_sync_batchnorm`` afterwards if needed).
    :class:`BatchNormAct` is an ``nn.Sequential`` (indexing, state dict and ``forward(x)`` as before) whose
    forward also takes the ``residual`` a fused layer is called with (``layer(x, residual=r)``, as
    :func:`convert_model` writes for BatchNorm -> add -> activation): it then computes BatchNorm, the add
    and the activation, so fused models convert back with equal outputs too. :class:`RecomputeMaxPool2d`
    (which :func:`convert_model` puts in place of ``nn.MaxPool2d``) becomes ``nn.MaxPool2d`` again.

    State-dict keys move from ``<name>.weight`` to ``<name>.0.weight`` (the BatchNorm is item 0).
    Like :func:`convert_sync`, ``module`` is changed in place and returned (a new module is returned only
    when ``module`` itself is an ABN layer).

    Args:
        module: A model or a single layer.
        dims: The BatchNorm class: 1, 2 (default) or 3 for ``nn.BatchNorm1d/2d/3d`` -- these check the input
            rank, so pick the one matching your data (``BatchNorm1d`` takes (N, C) and (N, C, L)) -- or None
            for :class:`BatchNormNd`, which accepts every rank like the ABN layers do.
    """
    if dims not in _BN_BY_DIMS:
        raise ValueError(f"dims must be 1, 2, 3 or None, got {dims!r}")
    bn_cls = _BN_BY_DIMS[dims]

    def make(m: nn.Module) -> nn.Module | None:
        if isinstance(m, RecomputeMaxPool2d):
            return nn.MaxPool2d(m.kernel_size, m.stride, m.padding, m.dilation, ceil_mode=m.ceil_mode).train(m.training)
        if not isinstance(m, ABN):
            return None
        bn = bn_cls(m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats)
        _copy_state(m, bn)
        if m.affine and isinstance(m, (InPlaceABN, InPlaceABNSync)):
            with torch.no_grad():
                bn.weight.copy_(m.weight.detach().abs() + m.eps)
        name, param = activations.resolve(m.activation, m.activation_param)
        act = activations.get(name).module(param)
        return BatchNormAct(bn, act).train(m.training)

    return _swap(module, make)


# Re-exports (see the module docstring). At the end: fx_convert imports _copy_state from this module.
from .checkpoint_v1 import load_inplace_abn_v1_state_dict  # noqa: E402
from .fx_convert import ConversionReport, LayerConversion, convert_model  # noqa: E402
