"""Joining the process group that ``torchrun`` describes in the environment (or running alone)."""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DeviceError",
    "DistInfo",
    "launched_by_torchrun",
    "setup_distributed",
    "cleanup_distributed",
    "all_gather_objects",
    "broadcast_object",
]


class DeviceError(RuntimeError):
    """The requested device cannot be used (``--device cuda`` without a usable GPU, or too few GPUs)."""


@dataclass(frozen=True)
class DistInfo:
    """Where this process stands: ``rank`` of ``world_size`` processes, its ``device`` and the ``backend``
    (None when running alone without a process group)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None

    @property
    def distributed(self) -> bool:
        """True when a process group was initialised (even with one process)."""
        return self.backend is not None

    @property
    def is_main(self) -> bool:
        """True on rank 0: the one process that prints, logs and writes files."""
        return self.rank == 0


def launched_by_torchrun() -> bool:
    """True when ``RANK`` and ``WORLD_SIZE`` are in the environment (torchrun, or a manual env:// launch)."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def setup_distributed(device: str = "cpu", timeout_s: float = 600.0) -> DistInfo:
    """Initialises ``torch.distributed`` when launched by torchrun; otherwise returns a single-process DistInfo.

    The backend is NCCL for ``device="cuda"`` and gloo for ``device="cpu"``; with CUDA each process uses
    ``cuda:LOCAL_RANK``.

    Args:
        device: ``"cpu"`` or ``"cuda"``.
        timeout_s: Process-group timeout.

    Raises:
        ValueError: unknown ``device``.
        DeviceError: ``device="cuda"`` without a usable GPU (or fewer GPUs than LOCAL_RANK needs).
    """
    if device not in ("cpu", "cuda"):
        raise ValueError(f"device must be 'cpu' or 'cuda', got {device!r}")
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if device == "cuda":
        if not torch.cuda.is_available():
            raise DeviceError("--device cuda: no CUDA GPU is available to this PyTorch build; use --device cpu")
        if local_rank >= torch.cuda.device_count():
            raise DeviceError(
                f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) are visible"
            )
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not launched_by_torchrun():
        return DistInfo(device=dev)
    backend = "nccl" if device == "cuda" else "gloo"
    if not dist.is_initialized():
        kwargs: dict = {"timeout": datetime.timedelta(seconds=timeout_s)}
        if device == "cuda":
            kwargs["device_id"] = dev
        try:
            dist.init_process_group(backend, **kwargs)
        except TypeError:  # older torch without device_id
            kwargs.pop("device_id", None)
            dist.init_process_group(backend, **kwargs)
    return DistInfo(
        rank=dist.get_rank(), world_size=dist.get_world_size(), local_rank=local_rank, device=dev, backend=backend
    )


def cleanup_distributed() -> None:
    """Destroys the default process group if one exists (safe to call always)."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_gather_objects(obj: Any) -> list[Any]:
    """Every rank's ``obj`` (picklable), in rank order; ``[obj]`` without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return [obj]
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank; ``obj`` itself without a process group."""
    if not (dist.is_available() and dist.is_initialized()):
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]
