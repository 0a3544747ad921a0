"""Generic training plumbing shared by ``densenet.train`` and ``segmentation.train``.

* :mod:`trainkit.rng`: :func:`seed_everything`, :func:`rng_state` / :func:`set_rng_state` (exact resume).
* :mod:`trainkit.checkpoint`: :func:`atomic_save`, :func:`load_checkpoint` (clear errors),
  :func:`check_same_args`, :class:`CheckpointError`, :class:`ResumeError`.
* :mod:`trainkit.cli`: :func:`run_cli` (user errors -> one line and exit code 2).
* :mod:`trainkit.progress`: :class:`Progress` / :func:`progress` (tqdm if installed, else built in).
* :mod:`trainkit.csvlog`: :func:`write_csv` / :func:`read_csv` (the per-epoch log).
* :mod:`trainkit.distributed`: :func:`setup_distributed` for torchrun (gloo on CPU, NCCL on GPU).
"""

from __future__ import annotations

from .checkpoint import CheckpointError, ResumeError, atomic_save, check_same_args, load_checkpoint
from .cli import run_cli
from .csvlog import read_csv, write_csv
from .distributed import (
    DistInfo,
    all_gather_objects,
    broadcast_object,
    cleanup_distributed,
    launched_by_torchrun,
    setup_distributed,
)
from .progress import Progress, format_seconds, progress
from .rng import rng_state, seed_everything, set_rng_state

__all__ = [
    "CheckpointError",
    "ResumeError",
    "run_cli",
    "atomic_save",
    "check_same_args",
    "load_checkpoint",
    "read_csv",
    "write_csv",
    "DistInfo",
    "all_gather_objects",
    "broadcast_object",
    "cleanup_distributed",
    "launched_by_torchrun",
    "setup_distributed",
    "Progress",
    "format_seconds",
    "progress",
    "rng_state",
    "seed_everything",
    "set_rng_state",
]
