"""Generic training plumbing shared by ``densenet.train`` and ``segmentation.train``.

* :mod:`trainkit.rng`: :func:`seed_everything`, :func:`rng_state` / :func:`set_rng_state` (exact resume),
  :func:`set_epoch_seed` (the seeded shuffling stream of one epoch).
* :mod:`trainkit.checkpoint`: :func:`atomic_save` (with a content SHA-256), :func:`load_checkpoint` (verifies
  it; clear errors),
  :func:`check_same_args`, :class:`CheckpointError`, :class:`ResumeError`.
* :mod:`trainkit.resume`: the training checkpoint and ``--stop-after``: :func:`load_resume_checkpoint`,
  :func:`restore_training_state` (weights, optimizer, scheduler, scaler, RNG, counters),
  :func:`save_training_checkpoint`, :func:`stop_after_reached`.
* :mod:`trainkit.memory_meter`: the saved-for-backward meter (exact bytes on ``meta``):
  :func:`saved_bytes_on_meta`, :func:`compare_saved_memory`, :class:`SavedMemory`.
* :mod:`trainkit.cli`: :func:`run_cli` (user errors -> one line and exit code 2); argparse range types
  :func:`int_range`, :func:`float_range` (finite), :func:`int_list`.
* :mod:`trainkit.progress`: :class:`Progress` / :func:`progress` (tqdm if installed, else built in).
* :mod:`trainkit.csvlog`: :func:`write_csv` / :func:`read_csv` (the per-epoch log).
* :mod:`trainkit.distributed`: :func:`setup_distributed` for torchrun (gloo on CPU, NCCL on GPU),
  :class:`DeviceError`.
* :mod:`trainkit.divergence`: :func:`check_finite_step` (after every optimizer step) and
  :class:`DivergenceError`: a diverged run stops before it saves non-finite weights.
* :mod:`trainkit.outdir`: :func:`prepare_out_dir` (``--out`` usable, an earlier run kept unless
  ``--resume`` / ``--overwrite``, stale ``.tmp-*`` files removed), :class:`OutDirError`.
"""

from __future__ import annotations

from .checkpoint import (
    CHECKSUM_KEY,
    CheckpointError,
    ResumeError,
    atomic_save,
    check_same_args,
    content_sha256,
    load_checkpoint,
)
from .cli import float_range, int_list, int_range, run_cli
from .csvlog import read_csv, write_csv
from .distributed import (
    DeviceError,
    DistInfo,
    all_gather_objects,
    broadcast_object,
    cleanup_distributed,
    launched_by_torchrun,
    setup_distributed,
)
from .divergence import DivergenceError, check_finite_step, first_nonfinite
from .memory_meter import MIB, SavedMemory, compare_saved_memory, saved_bytes_on_meta
from .outdir import OutDirError, next_free_out_dir, prepare_out_dir, remove_stale_temp_files
from .progress import Progress, format_seconds, progress
from .resume import (
    RESUME_KEYS,
    ResumePoint,
    check_stop_after,
    load_resume_checkpoint,
    restore_training_state,
    save_training_checkpoint,
    stop_after_reached,
)
from .rng import rng_state, seed_everything, set_epoch_seed, set_rng_state

__all__ = [
    "CheckpointError",
    "ResumeError",
    "DeviceError",
    "DivergenceError",
    "check_finite_step",
    "first_nonfinite",
    "OutDirError",
    "next_free_out_dir",
    "prepare_out_dir",
    "remove_stale_temp_files",
    "run_cli",
    "int_range",
    "float_range",
    "int_list",
    "CHECKSUM_KEY",
    "content_sha256",
    "atomic_save",
    "check_same_args",
    "load_checkpoint",
    "RESUME_KEYS",
    "ResumePoint",
    "load_resume_checkpoint",
    "restore_training_state",
    "save_training_checkpoint",
    "check_stop_after",
    "stop_after_reached",
    "MIB",
    "SavedMemory",
    "compare_saved_memory",
    "saved_bytes_on_meta",
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
    "set_epoch_seed",
]
