"""Process-group helpers of the synchronised layer (same names as inplace-abn 1.1.0)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
import torch.nn as nn

__all__ = ["active_group", "set_active_group"]

_GROUP_CACHE: dict[frozenset[int], Any] = {}


def active_group(active: bool) -> Any | None:
    """Builds (and caches) the group of the processes that pass ``active=True``.

    Must be called by every process of the default group. Works with any backend (gloo on CPU, nccl
    on GPU): the exchange runs on the device the backend needs.

    Args:
        active: Whether this process takes part.

    Returns:
        The group of active processes: ``dist.group.WORLD`` if all are active, None if none is.
    """
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("active_group needs torch.distributed; call torch.distributed.init_process_group() first")
    world, rank = dist.get_world_size(), dist.get_rank()
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
    flag = torch.tensor([rank if active else -1], dtype=torch.long, device=device)
    flags = [torch.empty_like(flag) for _ in range(world)]
    dist.all_gather(flags, flag)
    members = frozenset(int(f.item()) for f in flags if int(f.item()) >= 0)
    if not members:
        return None
    if len(members) == world:
        return dist.group.WORLD
    if members not in _GROUP_CACHE:
        # new_group is collective: every process creates it, in the same order, whether member or not.
        _GROUP_CACHE[members] = dist.new_group(sorted(members))
    return _GROUP_CACHE[members]


def set_active_group(module: nn.Module, group: Any | None) -> None:
    """Passes ``group`` to every submodule of ``module`` that has ``set_group`` (e.g. InPlaceABNSync)."""

    def _set(m: nn.Module) -> None:
        if hasattr(m, "set_group"):
            m.set_group(group)

    module.apply(_set)
