"""Normalisation + activation layers of the segmentation models: one switch for the whole network.

``norm_act(norm, C)`` returns the layer used for every BatchNorm -> activation pair:

* ``"bn"``: ``nn.Sequential(nn.BatchNorm2d(C), nn.LeakyReLU(slope, inplace=True))``, the standard layers.
  BatchNorm keeps its input and the activation keeps its output for backward: two tensors.
* ``"iabn"``: :class:`inplace_abn.InPlaceABN`, which overwrites its input with its output and keeps only
  that output: one tensor.
* ``"iabn_sync"``: :class:`inplace_abn.InPlaceABNSync` (statistics synchronised across DDP ranks).

With ``activation="identity"`` the ``"bn"`` layer is a plain ``nn.BatchNorm2d`` and the in-place layers
use ``activation="identity"`` (a BatchNorm whose output is followed by a residual addition).

Note the scale: the in-place layers multiply by ``|weight| + eps`` (to stay invertible), BatchNorm by
``weight``. A BatchNorm network with ``weight = |w| + eps`` computes what an In-Place ABN network with
``weight = w`` computes (see :func:`bn_weight_from_iabn`).
"""

from __future__ import annotations

import torch
from torch import nn

from inplace_abn import InPlaceABN, InPlaceABNSync

__all__ = ["NORMS", "ACTIVATIONS", "check_norm", "norm_act", "overwrites_input", "bn_weight_from_iabn"]

#: Values of the ``norm`` argument.
NORMS: tuple[str, ...] = ("bn", "iabn", "iabn_sync")
#: Activations ``norm_act`` accepts.
ACTIVATIONS: tuple[str, ...] = ("leaky_relu", "identity")


def check_norm(norm: object) -> str:
    """Returns ``norm`` if it is one of :data:`NORMS`.

    Raises:
        ValueError: naming the value and the allowed values.
    """
    if not isinstance(norm, str) or norm not in NORMS:
        raise ValueError(f"norm must be one of {NORMS}, got {norm!r}")
    return norm


def norm_act(norm: str, channels: int, activation: str = "leaky_relu", activation_param: float = 0.01) -> nn.Module:
    """BatchNorm + activation layer for ``norm``.

    Args:
        norm: ``"bn"``, ``"iabn"`` or ``"iabn_sync"``.
        channels: C, the number of channels.
        activation: ``"leaky_relu"`` or ``"identity"`` (BatchNorm only).
        activation_param: Negative slope of the leaky ReLU (must be > 0 for the in-place layers to save
            memory; 0.01 as in the paper).

    Returns:
        A module mapping (N, C, H, W) -> (N, C, H, W). The ``"iabn"``/``"iabn_sync"`` modules overwrite
        their input: give them a tensor nothing else needs (a conv output, a fresh copy).

    Raises:
        ValueError: unknown ``norm`` or ``activation``, or ``channels`` not a positive int.
    """
    check_norm(norm)
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {ACTIVATIONS}, got {activation!r}")
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be a positive int, got {channels!r}")
    if norm == "bn":
        if activation == "identity":
            return nn.BatchNorm2d(channels)
        return nn.Sequential(nn.BatchNorm2d(channels), nn.LeakyReLU(activation_param, inplace=True))
    layer = InPlaceABN if norm == "iabn" else InPlaceABNSync
    return layer(channels, activation=activation, activation_param=activation_param)


def overwrites_input(module: nn.Module) -> bool:
    """True if ``module`` (a :func:`norm_act` layer) writes its output over its input."""
    return isinstance(module, (InPlaceABN, InPlaceABNSync))


def bn_weight_from_iabn(weight: torch.Tensor, eps: float = 1e-5) -> torch.Tensor:
    """The ``nn.BatchNorm2d`` weight equivalent to an In-Place ABN ``weight``: ``|weight| + eps``."""
    return weight.abs() + eps
