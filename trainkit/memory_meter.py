"""The saved-memory meter: bytes autograd keeps for backward in one training step, counted exactly on ``meta``.

What the trainers' ``activation memory saved vs BatchNorm`` lines report. The model is built and run on
``device="meta"`` (nothing is allocated or computed, so any size is cheap) and every tensor saved for
backward is counted once per storage by :func:`inplace_abn.memory.saved_tensor_bytes`, parameters and
buffers excluded. The global RNG is forked around the count, so a training run's random stream (and hence
exact resume) is untouched.

    meter = compare_saved_memory(lambda norm: count(norm), norm="iabn")
    print(meter.line("float32 training step, batch 8 x 3 x 128 x 128"))
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

__all__ = ["MIB", "saved_bytes_on_meta", "SavedMemory", "compare_saved_memory"]

MIB = 2**20


def saved_bytes_on_meta(build_model: Callable[[], nn.Module], step: Callable[[nn.Module], Any]) -> int:
    """Bytes saved for backward by ``step(model)`` on a model built by ``build_model``, both on ``meta``.

    Args:
        build_model: Returns a fresh model; it is called under ``torch.device("meta")`` (so parameters and
            every tensor created without an explicit device live on ``meta``) and put in training mode.
        step: Runs one training forward on that model and returns what keeps the graph alive (the loss).
            It makes its own inputs, e.g. ``torch.empty(batch, 3, h, w)`` (created on ``meta`` too).

    Returns:
        The exact count: every saved storage once, the model's parameters and buffers excluded.
    """
    from inplace_abn.memory import parameters_of, saved_tensor_bytes  # trainkit itself does not need the package

    with torch.random.fork_rng(devices=[]), torch.device("meta"):
        model = build_model().train()
        total, _result, _storages = saved_tensor_bytes(lambda: step(model), exclude=parameters_of(model))
    return int(total)


@dataclass(frozen=True)
class SavedMemory:
    """Saved-for-backward bytes of a training step with BatchNorm (the baseline) and with the run's norm.

    Attributes:
        bn_bytes: With the baseline (``norm=bn``).
        norm_bytes: With the run's normalisation.
        norm: Name of the run's normalisation, for :meth:`line`.
        baseline: Description of the baseline, for :meth:`line` (``"norm=bn"`` unless told otherwise).
        current: Description of the run's setting, for :meth:`line` (default ``"norm=<norm>"``).
    """

    bn_bytes: int
    norm_bytes: int
    norm: str
    baseline: str = "norm=bn"
    current: str = ""

    @property
    def bn_mib(self) -> float:
        """The baseline in MiB."""
        return self.bn_bytes / MIB

    @property
    def norm_mib(self) -> float:
        """The run's figure in MiB."""
        return self.norm_bytes / MIB

    @property
    def ratio(self) -> float:
        """``norm_bytes / bn_bytes`` (NaN for a zero baseline)."""
        return self.norm_bytes / self.bn_bytes if self.bn_bytes > 0 else math.nan

    def as_dict(self) -> dict[str, float]:
        """``{"bn_mib", "norm_mib", "ratio"}``: the ``memory`` entry of the trainers' summaries."""
        return {"bn_mib": self.bn_mib, "norm_mib": self.norm_mib, "ratio": self.ratio}

    def line(self, step: str) -> str:
        """The ``activation memory saved vs BatchNorm: ...`` line.

        Args:
            step: What was counted, e.g. ``"float32 training step, batch 8 x 3 x 128 x 128"``.
        """
        current = self.current or f"norm={self.norm}"
        return (
            f"activation memory saved vs BatchNorm: {self.bn_mib:.1f} MiB -> {self.norm_mib:.1f} MiB "
            f"({self.ratio:.2f}x) [saved for backward by one {step}, "
            f"{self.baseline} -> {current}, parameters excluded]"
        )


def compare_saved_memory(
    count: Callable[[str], int],
    norm: str,
    baseline_norm: str = "bn",
    baseline: str = "",
    current: str = "",
) -> SavedMemory:
    """Counts a step with ``norm`` and with ``baseline_norm`` (counted once when they are the same).

    Args:
        count: ``count(norm)`` -> saved bytes of one step with that normalisation (typically a closure
            over :func:`saved_bytes_on_meta`).
        norm: The run's normalisation.
        baseline_norm: The BatchNorm setting it is compared with.
        baseline: Description of the baseline for the line (default ``"norm=<baseline_norm>"``).
        current: Description of the run's setting for the line (default ``"norm=<norm>"``).

    Returns:
        Both counts.
    """
    ours = count(norm)
    bn = ours if norm == baseline_norm else count(baseline_norm)
    return SavedMemory(
        bn_bytes=bn, norm_bytes=ours, norm=norm, baseline=baseline or f"norm={baseline_norm}", current=current
    )
