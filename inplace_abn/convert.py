"""Model conversion helpers: local <-> synchronised In-Place ABN layers."""

from __future__ import annotations

from typing import Any, Optional

import torch
from torch import nn

from .abn import InPlaceABN, InPlaceABNSync

__all__ = ["convert_sync", "convert_local"]


def _copy_state(src: nn.Module, dst: nn.Module) -> nn.Module:
    """Gives ``dst`` the device, dtypes, state and train/eval mode of ``src`` (bit-exact)."""
    for name, t in list(src.named_parameters(recurse=False)) + list(src.named_buffers(recurse=False)):
        target = getattr(dst, name)
        if t is not None and target is not None:
            # move first, then load: loading into float32 and casting afterwards would round float64 state
            target.data = target.data.to(device=t.device, dtype=t.dtype)
    with torch.no_grad():
        dst.load_state_dict(src.state_dict())
    return dst.train(src.training)


def _swap(module: nn.Module, make) -> nn.Module:
    replacement = make(module)
    if replacement is not None:
        return replacement
    for name, child in module.named_children():
        new_child = _swap(child, make)
        if new_child is not child:
            setattr(module, name, new_child)
    return module


def _args(m: InPlaceABN) -> tuple:
    return (m.num_features, m.eps, m.momentum, m.affine, m.track_running_stats, m.activation, m.activation_param)


def convert_sync(module: nn.Module, group: Optional[Any] = None) -> nn.Module:
    """Replaces every :class:`InPlaceABN` in ``module`` by an :class:`InPlaceABNSync` (state kept).

    Like ``nn.SyncBatchNorm.convert_sync_batchnorm``: returns the converted module (the same object,
    changed in place, unless ``module`` itself is an ``InPlaceABN``).

    Args:
        module: A model, or a single layer.
        group: Process group of the new layers (None = the default group).
    """

    def make(m: nn.Module) -> Optional[nn.Module]:
        if type(m) is InPlaceABN:
            return _copy_state(m, InPlaceABNSync(*_args(m), group=group))
        return None

    return _swap(module, make)


def convert_local(module: nn.Module) -> nn.Module:
    """Replaces every :class:`InPlaceABNSync` in ``module`` by a local :class:`InPlaceABN` (state kept).

    The reverse of :func:`convert_sync`, e.g. for single-process evaluation or export.
    """

    def make(m: nn.Module) -> Optional[nn.Module]:
        if type(m) is InPlaceABNSync:
            return _copy_state(m, InPlaceABN(*_args(m)))
        return None

    return _swap(module, make)
