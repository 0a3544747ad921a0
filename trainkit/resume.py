"""Exact resume and ``--stop-after``: the training checkpoint both trainers write, read and continue from.

A training checkpoint is one ``torch.save``'d dict (written atomically, loadable with ``weights_only=True``)::

    model, optimizer, scheduler   state dicts
    epoch                         epochs completed
    rng                           trainkit.rng_state() of the (rank 0) process
    args                          vars(args) of the run that wrote it
    elapsed                       seconds of training so far
    iteration, scaler, rng_per_rank, ...   when the trainer has them (segmentation.train)

The walk of a trainer::

    ckpt = load_resume_checkpoint(args.resume, vars(args), MUST_MATCH, kind="x.train") if args.resume else None
    ... build data, model, optimizer, scheduler ...
    start = restore_training_state(ckpt, args.resume, model, optimizer, scheduler) if ckpt else ResumePoint()
    for epoch in range(start.epoch + 1, epochs + 1):
        ... train_one_epoch, evaluate ...
        save_training_checkpoint(path, model=model, optimizer=optimizer, scheduler=scheduler, epoch=epoch, args=args)
        if stop_after_reached(args.stop_after, epoch - start.epoch, epoch, epochs):
            break
"""

from __future__ import annotations

import argparse
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from .checkpoint import ResumeError, atomic_save, check_same_args, load_checkpoint
from .divergence import DivergenceError, first_nonfinite
from .rng import rng_state, set_rng_state

__all__ = [
    "RESUME_KEYS",
    "ResumePoint",
    "load_resume_checkpoint",
    "restore_training_state",
    "save_training_checkpoint",
    "check_stop_after",
    "stop_after_reached",
]

#: Top-level keys every training checkpoint has.
RESUME_KEYS = ("model", "optimizer", "scheduler", "epoch", "rng", "args")

# What load_state_dict / set_rng_state raise for a state that does not fit (size or key mismatch, a
# different optimizer layout, a malformed RNG entry).
_STATE_MISMATCH = (RuntimeError, ValueError, KeyError, TypeError, IndexError)


@dataclass(frozen=True)
class ResumePoint:
    """Where a run continues: counters restored from a checkpoint (all zero for a fresh run).

    Attributes:
        epoch: Epochs completed.
        iteration: Iterations (optimizer steps) completed.
        elapsed: Seconds of training so far.
        rng_exact: True when this process got back its own RNG state (False: a checkpoint written by a
            different number of processes; the data order continues but augmentations differ).
        resumed: True when restored from a checkpoint.
    """

    epoch: int = 0
    iteration: int = 0
    elapsed: float = 0.0
    rng_exact: bool = True
    resumed: bool = False


def load_resume_checkpoint(
    path: str,
    args: Mapping[str, Any],
    must_match: Iterable[str],
    kind: str,
    required: Sequence[str] = RESUME_KEYS,
    checkpoint_name: str = "checkpoint.pt",
    defaults: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """Loads a ``--resume`` checkpoint and refuses one written with different run-shaping options.

    Call it before the (slow) data loading, so a bad path fails at once.

    Args:
        path: The file named by ``--resume``.
        args: This run's options (``vars(args)``).
        must_match: Option names that must equal the checkpoint's.
        kind: What writes such checkpoints, for messages (e.g. ``"densenet.train"``).
        required: Top-level keys the checkpoint must have.
        checkpoint_name: The usual file name, for messages.
        defaults: Values of ``must_match`` options added after older checkpoints were written (what those
            runs used).

    Returns:
        The checkpoint dict (for :func:`restore_training_state`).

    Raises:
        ResumeError: not found, corrupt, not a ``kind`` checkpoint, or different options (each named).
    """
    ckpt = load_checkpoint(path, required=required, kind=kind, error=ResumeError, checkpoint_name=checkpoint_name)
    check_same_args(ckpt["args"], args, must_match, path, error=ResumeError, defaults=defaults)
    return ckpt


def restore_training_state(
    ckpt: Mapping[str, Any],
    path: str,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any | None = None,
    scaler: Any | None = None,
    rank: int = 0,
    world_size: int = 1,
) -> ResumePoint:
    """Puts a checkpoint's weights, optimizer, scheduler, grad scaler and RNG state back; returns its counters.

    The RNG state restored is this rank's own (``rng_per_rank[rank]``) when the checkpoint was written
    by ``world_size`` processes, else the checkpoint's ``rng`` (rank 0's).

    Args:
        ckpt: From :func:`load_resume_checkpoint`.
        path: Its file, for messages.
        model: The (unwrapped) model, built exactly as the run that wrote the checkpoint.
        optimizer: Its optimizer.
        scheduler: Its learning-rate scheduler (None: not restored).
        scaler: A ``torch.amp.GradScaler`` (restored when the checkpoint has a non-empty ``scaler``).
        rank: This process's rank.
        world_size: Number of processes of this run.

    Returns:
        The epoch/iteration/elapsed counters to continue from.

    Raises:
        ResumeError: a state does not fit this model/optimizer/scheduler, or the RNG state is malformed.
    """
    try:
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        if scheduler is not None:
            scheduler.load_state_dict(ckpt["scheduler"])
        if scaler is not None and ckpt.get("scaler"):
            scaler.load_state_dict(ckpt["scaler"])
    except _STATE_MISMATCH as e:
        raise ResumeError(
            f"--resume checkpoint {path!r} does not fit this model/optimizer ({type(e).__name__}: {e})"
        ) from e
    per_rank = ckpt.get("rng_per_rank") or []
    exact = len(per_rank) == world_size or (not per_rank and world_size == 1)
    try:
        set_rng_state(per_rank[rank] if len(per_rank) == world_size else ckpt["rng"])
    except _STATE_MISMATCH as e:
        raise ResumeError(f"--resume checkpoint {path!r} has a malformed RNG state ({type(e).__name__}: {e})") from e
    return ResumePoint(
        epoch=int(ckpt["epoch"]),
        iteration=int(ckpt.get("iteration", 0)),
        elapsed=float(ckpt.get("elapsed", 0.0)),
        rng_exact=exact,
        resumed=True,
    )


def save_training_checkpoint(
    path: str,
    *,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    epoch: int,
    args: argparse.Namespace | Mapping[str, Any],
    elapsed: float = 0.0,
    iteration: int | None = None,
    scaler: Any | None = None,
    rng: dict[str, Any] | None = None,
    rng_per_rank: Sequence[dict[str, Any]] | None = None,
    **extra: Any,
) -> None:
    """Writes a training checkpoint atomically (the previous file survives a crash during the write).

    Args:
        path: Destination (its folder must exist).
        model: The (unwrapped) model.
        optimizer: Its optimizer.
        scheduler: Its learning-rate scheduler.
        epoch: Epochs completed.
        args: The run's options (a Namespace or ``vars(args)``); stored as a plain dict.
        elapsed: Seconds of training so far.
        iteration: Iterations completed (stored when given).
        scaler: A ``torch.amp.GradScaler`` (stored when given).
        rng: The RNG state to store (default: :func:`trainkit.rng_state` of this process; with
            ``rng_per_rank``: its first entry).
        rng_per_rank: Every rank's RNG state, in rank order (stored when given).
        **extra: Further top-level entries (e.g. ``num_classes``).

    Raises:
        DivergenceError: a weight or buffer of ``model`` is not finite (the file on disk is left as it was).
    """
    bad = first_nonfinite(model)
    if bad is not None:
        raise DivergenceError(
            f"refusing to write {path!r}: weight {bad!r} is not finite (training diverged); "
            "the previous checkpoint is kept"
        )
    if rng is None:
        rng = rng_per_rank[0] if rng_per_rank else rng_state()
    obj: dict[str, Any] = {
        "model": model.state_dict(),
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
    }
    if scaler is not None:
        obj["scaler"] = scaler.state_dict()
    obj["epoch"] = int(epoch)
    if iteration is not None:
        obj["iteration"] = int(iteration)
    obj["rng"] = rng
    if rng_per_rank is not None:
        obj["rng_per_rank"] = list(rng_per_rank)
    obj["args"] = dict(vars(args) if isinstance(args, argparse.Namespace) else args)
    obj["elapsed"] = float(elapsed)
    obj.update(extra)
    atomic_save(obj, path)


def check_stop_after(stop_after: int | None) -> None:
    """Validates ``--stop-after``.

    Raises:
        ValueError: ``stop_after`` is not None and below 1.
    """
    if stop_after is not None and stop_after < 1:
        raise ValueError(f"--stop-after must be >= 1, got {stop_after}")


def stop_after_reached(stop_after: int | None, done_here: int, done: int, total: int) -> bool:
    """True when ``--stop-after N`` ends this process now: it has run N epochs and the run is not finished.

    A run that reaches its last epoch finishes normally (writes its final results) whatever N is.

    Args:
        stop_after: N, or None (never stop early).
        done_here: Epochs run by this process (after a resume: since the checkpoint).
        done: Epochs completed in all (the epoch just finished).
        total: Epochs of the whole run.
    """
    return stop_after is not None and done_here >= stop_after and done < total
