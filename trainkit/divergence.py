"""Stopping a diverged run: a non-finite loss or non-finite weights end training before anything is saved."""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.distributed as dist
from torch import Tensor, nn

__all__ = ["DivergenceError", "first_nonfinite", "check_finite_step"]


class DivergenceError(FloatingPointError):
    """Training produced a non-finite loss or non-finite weights (the run cannot continue)."""


def _floating_state(model: nn.Module) -> Iterator[tuple[str, Tensor]]:
    """The model's floating-point parameters and buffers (running statistics included), by name."""
    for name, t in model.state_dict(keep_vars=True).items():
        if isinstance(t, Tensor) and t.is_floating_point():
            yield name, t.detach()


def first_nonfinite(model: nn.Module) -> str | None:
    """The name of the first parameter or floating buffer of ``model`` holding a NaN or an infinity, or None.

    One synchronisation in all: the float64 sums of every tensor are added up (a sum is finite exactly when
    all its terms are, as float32/bfloat16/float16 values cannot overflow a float64 sum), and only when the
    total is not finite are the tensors searched one by one.

    Args:
        model: Any module.
    """
    state = list(_floating_state(model))
    if not state:
        return None
    total = torch.stack([t.sum(dtype=torch.float64) for _, t in state]).sum()
    if math.isfinite(float(total)):
        return None
    for name, t in state:
        if not bool(torch.isfinite(t).all()):
            return name
    return "(sum of the weights)"  # float64 weights so large that their sum overflows


def check_finite_step(
    model: nn.Module,
    loss: Tensor | float | None,
    iteration: int,
    epoch: int | None = None,
    distributed: bool = False,
) -> None:
    """Raises :class:`DivergenceError` when ``loss`` or the weights after an optimizer step are not finite.

    Call it after every optimizer step, before anything is logged or saved, so a diverged run stops with a
    message naming the iteration and the last good checkpoint stays on disk. Under DDP every rank must call
    it (one ``all_reduce``), so all ranks stop together even when only one rank's loss is non-finite.

    Args:
        model: The (unwrapped) model whose parameters and floating buffers are checked.
        loss: This iteration's loss, or None when it is not checked (float16 AMP with a GradScaler, which
            skips the steps whose gradients overflow).
        iteration: Optimizer steps done so far, this one included (1-based), for the message.
        epoch: The epoch (1-based), for the message.
        distributed: All-reduce the verdict over the default process group.

    Raises:
        DivergenceError: naming the iteration and the non-finite loss or the first non-finite tensor.
    """
    value = float(loss.detach().float()) if isinstance(loss, Tensor) else loss
    bad_weight = first_nonfinite(model)
    problem = None
    if value is not None and not math.isfinite(value):
        problem = f"loss {value}"
    elif bad_weight is not None:
        problem = f"weight {bad_weight!r} is not finite"
    if distributed and dist.is_available() and dist.is_initialized():
        device = next(iter(model.parameters()), torch.empty(0)).device
        flag = torch.tensor([0.0 if problem is None else 1.0], device=device)
        dist.all_reduce(flag)
        if problem is None and float(flag) > 0:
            problem = "another process's loss or weights became non-finite"
    if problem is not None:
        where = f"iteration {iteration}" + (f" (epoch {epoch})" if epoch is not None else "")
        raise DivergenceError(
            f"training diverged at {where}: {problem}; nothing of this epoch was saved "
            "(the last checkpoint is kept); lower --lr"
        )
