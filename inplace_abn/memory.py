"""Exact accounting of the memory autograd keeps for backward (docs/measuring.md).

Counts the bytes of every tensor saved for backward while a function runs, de-duplicated by storage,
excluding parameter storages. Deterministic, allocator-independent, and it works on ``device="meta"``,
so the saving of a large model can be counted without allocating it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any

import torch
from torch import nn
from torch.multiprocessing.reductions import StorageWeakRef

__all__ = ["saved_tensor_bytes", "parameters_of"]


def _storage_key(t: torch.Tensor) -> Any:
    # The identity of the storage object itself, not its data pointer: meta storages all report
    # data_ptr 0. Stable while the tensor lives, and saved_tensor_bytes keeps every counted tensor alive.
    return StorageWeakRef(t.untyped_storage())


def saved_tensor_bytes(
    fn: Callable[[], Any],
    exclude: Iterable[torch.Tensor] = (),
    on_save: Callable[[Any, torch.Tensor], None] | None = None,
) -> tuple[int, Any, dict[Any, int]]:
    """Runs ``fn()`` and returns (bytes saved for backward, fn's result, bytes per storage).

    Args:
        fn: Runs the forward pass (and returns whatever should stay alive, e.g. the loss).
        exclude: Tensors whose storages are not counted (typically ``model.parameters()``).
        on_save: Called as ``on_save(storage_key, tensor)`` the first time a counted storage is saved
            (e.g. to attribute it to the module running at that moment; saved-tensor hooks do not nest).

    Returns:
        The total, the result of ``fn`` (keep it alive until you are done: the saved tensors die with it),
        and a dict storage-key -> nbytes.
    """
    excluded = {_storage_key(t) for t in exclude}
    storages: dict[Any, int] = {}
    keep: list = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        key = _storage_key(t)
        if key not in excluded:
            if on_save is not None and key not in storages:
                on_save(key, t)
            storages[key] = t.untyped_storage().nbytes()
            keep.append(t)  # keeps storages alive so ids/pointers are not reused during fn
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        result = fn()
    return sum(storages.values()), result, storages


def parameters_of(*modules: nn.Module) -> list:
    """Parameters and buffers of ``modules``: the usual ``exclude`` argument of :func:`saved_tensor_bytes`
    (they are resident whether or not autograd keeps a reference)."""
    return [t for m in modules for t in list(m.parameters()) + list(m.buffers())]
