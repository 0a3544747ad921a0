"""Seeding and saving/restoring every random number generator a training loop touches."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch

__all__ = ["seed_everything", "rng_state", "set_rng_state", "set_epoch_seed"]


def seed_everything(seed: int) -> None:
    """Seeds torch (CPU and every CUDA device), NumPy's legacy global RNG and Python's ``random``.

    Args:
        seed: Any integer; NumPy gets ``seed % 2**32``.
    """
    torch.manual_seed(seed)  # also seeds every CUDA device
    np.random.seed(seed % 2**32)
    random.seed(seed)


def rng_state() -> dict[str, Any]:
    """The state of torch's CPU RNG (and CUDA RNGs, when CUDA is initialised), NumPy's global RNG and ``random``.

    Only tensors and plain Python containers, so the result survives ``torch.load(..., weights_only=True)``.

    Returns:
        A dict for :func:`set_rng_state`: keys ``torch``, ``numpy``, ``python`` and, with CUDA, ``cuda``.
    """
    np_state = np.random.get_state()
    state: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": (np_state[0], np_state[1].tolist(), int(np_state[2]), int(np_state[3]), float(np_state[4])),
        "python": random.getstate(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restores a state returned by :func:`rng_state` (CUDA states are restored when present and CUDA is available).

    Raises:
        KeyError: ``state`` lacks one of ``torch``, ``numpy``, ``python``.
    """
    torch.set_rng_state(state["torch"])
    name, keys, pos, has_gauss, cached = state["numpy"]
    np.random.set_state((name, np.asarray(keys, dtype=np.uint32), pos, has_gauss, cached))
    py = state["python"]
    random.setstate((py[0], tuple(py[1]), py[2]))
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available():
        n = min(len(cuda), torch.cuda.device_count())
        for i in range(n):
            torch.cuda.set_rng_state(cuda[i], i)


def set_epoch_seed(generator: torch.Generator, seed: int, epoch: int, rank: int = 0) -> torch.Generator:
    """Reseeds ``generator`` with (``seed``, ``epoch``, ``rank``): the shuffling / worker-seed stream of one epoch.

    A DataLoader given this generator draws its permutation (and its workers' base seed) from it, never
    from the global RNG, so epoch ``e``'s data order is a function of (seed, e, rank) only: the same in a
    straight run and in one resumed before ``e``. Call it at the start of every epoch, as
    ``DistributedSampler.set_epoch``.

    Args:
        generator: The DataLoader's (CPU) generator.
        seed: The run's ``--seed``.
        epoch: The epoch (1-based in the trainers).
        rank: The process's rank (0 without DDP).

    Returns:
        ``generator``.
    """
    generator.manual_seed((seed * 1_000_003 + epoch * 1_009 + rank) % 2**63)
    return generator
