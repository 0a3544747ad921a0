"""The cross-process part of the synchronised layer: merging batch statistics and gradient sums.

Forward: each process computes its per-channel (mean, biased variance, count); :func:`merge_statistics`
combines them exactly (Chan's parallel formula), so the result equals one big batch even when per-process
batch sizes differ. Backward: :func:`all_reduce_sums` adds the two per-channel sums every process needs
for dx. Parameter gradients stay local (DDP averages them). Derivation: docs/math.md, "Synchronised layer".
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

__all__ = ["sync_enabled", "merge_statistics", "all_reduce_sums", "all_reduce_max"]

_warned_no_distributed = False


def sync_enabled(group: Any) -> bool:
    """True when torch.distributed is initialised; otherwise warns once that statistics stay local."""
    global _warned_no_distributed
    if dist.is_available() and dist.is_initialized():
        return True
    if not _warned_no_distributed:
        _warned_no_distributed = True
        warnings.warn(
            "inplace_abn_sync: torch.distributed is not initialised, so statistics are computed on this "
            "process only (as inplace_abn). Call torch.distributed.init_process_group() first to synchronise.",
            RuntimeWarning,
            stacklevel=4,
        )
    return False


def merge_statistics(mean: Tensor, var: Tensor, count: int, group: Any) -> tuple[Tensor, Tensor, int]:
    """Merges per-process (mean (C,), biased var (C,), count) over ``group``; returns the global triple."""
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
    # The sum of per-process M2 plus the between-process term: the pairwise merge generalised to k parts.
    m2 = (variances * counts).sum(0) + ((means - global_mean) ** 2 * counts).sum(0)
    return global_mean, m2 / total, int(total.item())


def all_reduce_sums(sum_dz: Tensor, sum_dz_xhat: Tensor, group: Any) -> tuple[Tensor, Tensor]:
    """The global per-channel sums of dz and dz * x_hat (one all-reduce for both)."""
    sums = torch.stack([sum_dz, sum_dz_xhat])
    dist.all_reduce(sums, group=group)
    return sums[0], sums[1]


def all_reduce_max(values: Tensor, group: Any) -> Tensor:
    """The element-wise maximum of ``values`` over ``group`` (a new tensor)."""
    values = values.clone()
    dist.all_reduce(values, op=dist.ReduceOp.MAX, group=group)
    return values
