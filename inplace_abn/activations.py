"""The activations of the ABN layers, in one table: apply, inverse, gradient from the output, module, validation.

Every Python consumer takes its activation math from here: the modules (``ABN``), the functional layer
(validation, the export path), the float64 reference, the pure-PyTorch backend (forward and inversion)
and ``convert_model`` / ``to_batchnorm`` (module types both ways). The compiled kernels have the same
table in C++ (``src/activation.h``); ``docs/math.md`` derives the inverses.

Only invertible activations keep the in-place saving: the backward recovers the pre-activation
``z = act^-1(y)`` from the output. ``relu`` is accepted (leaky_relu with slope 0) but is not invertible.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = [
    "Activation",
    "ACTIVATIONS",
    "NAMES",
    "resolve",
    "get",
    "invertible",
    "is_invertible",
    "warn_non_invertible",
]


def _elu_inverse(y: Tensor, alpha: float) -> Tensor:
    # z = y for y > 0, log1p(y / alpha) otherwise, without torch.where (slow on CPU). The clamp keeps a
    # saturated output (y == -alpha after rounding) finite, as src/activation.h does.
    lowest = -1.0 + torch.finfo(y.dtype).eps / 2
    return torch.log1p((y * (1.0 / alpha)).clamp_(lowest, 0.0)).add_(y.clamp_min(0.0))


@dataclass(frozen=True)
class Activation:
    """One activation of the table. ``param`` is the leaky_relu slope / ELU alpha (ignored by identity).

    Attributes:
        name: Canonical name, as the op schemas take it.
        apply: ``act(z)``, out of place and differentiable (reference, export).
        apply_: ``act(z)`` written over ``z`` (modules, pure backend).
        inverse: ``z`` recovered from ``y = act(z)`` (invertible parameters only).
        grad: ``dz`` from ``(dy, y)``: the derivative written in terms of the output.
        module: An ``nn.Module`` computing it in place (``to_batchnorm``).
        module_type: The ``nn.Module`` class ``convert_model`` recognises as this activation.
        param_attr: That module's attribute holding ``param`` (None: no parameter).
    """

    name: str
    apply: Callable[[Tensor, float], Tensor]
    apply_: Callable[[Tensor, float], Tensor]
    inverse: Callable[[Tensor, float], Tensor]
    grad: Callable[[Tensor, Tensor, float], Tensor]
    module: Callable[[float], nn.Module]
    module_type: type[nn.Module]
    param_attr: str | None


ACTIVATIONS: dict[str, Activation] = {
    "leaky_relu": Activation(
        name="leaky_relu",
        apply=lambda z, slope: F.leaky_relu(z, slope),
        apply_=lambda z, slope: F.leaky_relu_(z, slope),
        # leaky_relu is inverted by leaky_relu with the reciprocal slope.
        inverse=lambda y, slope: F.leaky_relu(y, 1.0 / slope),
        # Positive branch y > 0, as in src/activation.h and PyTorch's own backward.
        grad=lambda dy, y, slope: torch.ops.aten.leaky_relu_backward(dy, y, slope, True),
        module=lambda slope: nn.ReLU(inplace=True) if slope == 0.0 else nn.LeakyReLU(slope, inplace=True),
        module_type=nn.LeakyReLU,
        param_attr="negative_slope",
    ),
    "elu": Activation(
        name="elu",
        apply=lambda z, alpha: F.elu(z, alpha),
        apply_=lambda z, alpha: F.elu_(z, alpha),
        inverse=_elu_inverse,
        grad=lambda dy, y, alpha: torch.ops.aten.elu_backward(dy, alpha, 1.0, 1.0, True, y),
        module=lambda alpha: nn.ELU(alpha, inplace=True),
        module_type=nn.ELU,
        param_attr="alpha",
    ),
    "identity": Activation(
        name="identity",
        apply=lambda z, _: z,
        apply_=lambda z, _: z,
        inverse=lambda y, _: y,
        grad=lambda dy, y, _: dy,
        module=lambda _: nn.Identity(),
        module_type=nn.Identity,
        param_attr=None,
    ),
}

#: Accepted spellings: the table's names, ``relu`` (= leaky_relu, slope 0) and the legacy ``none``.
_ALIASES: dict[str, tuple[str, float]] = {"relu": ("leaky_relu", 0.0), "none": ("identity", 0.0)}
NAMES = tuple(ACTIVATIONS) + tuple(_ALIASES)


def resolve(activation: Any, activation_param: Any) -> tuple[str, float]:
    """Validates an activation and returns its canonical ``(name, param)``.

    ``relu`` becomes ``("leaky_relu", 0.0)`` and ``none`` becomes ``("identity", 0.0)``.

    Raises:
        ValueError: unknown name, non-numeric parameter, negative leaky_relu slope, or ELU alpha <= 0.
    """
    if not isinstance(activation, str) or activation not in NAMES:
        raise ValueError(f"activation must be one of {NAMES}, got {activation!r}")
    if activation in _ALIASES:
        return _ALIASES[activation]
    if activation == "identity":
        return "identity", 0.0
    try:
        param = float(activation_param)
    except (TypeError, ValueError):
        raise ValueError(
            f"activation_param must be a number for activation={activation!r}, got {activation_param!r}"
        ) from None
    if activation == "leaky_relu" and not param >= 0.0:
        raise ValueError(
            f"activation_param (the leaky_relu negative slope) must be >= 0, got {param}; a negative slope "
            "makes the activation non-monotonic and not invertible"
        )
    if activation == "elu" and not param > 0.0:
        raise ValueError(f"activation_param (the ELU alpha) must be > 0, got {param}; alpha <= 0 is not invertible")
    return activation, param


def get(name: str) -> Activation:
    """The table entry of a canonical name (as :func:`resolve` returns)."""
    return ACTIVATIONS[name]


def invertible(name: str, param: float) -> bool:
    """True unless the canonical ``(name, param)`` (as :func:`resolve` returns it) is ReLU: leaky_relu, slope 0."""
    return not (name == "leaky_relu" and param == 0.0)


def is_invertible(activation: str, activation_param: float) -> bool:
    """True when a layer can recover its pre-activation from its output (everything but ReLU / slope 0).

    Validates first (:func:`resolve`); for an already canonical pair use :func:`invertible`.
    """
    return invertible(*resolve(activation, activation_param))


_warned_non_invertible = False


def warn_non_invertible() -> None:
    """Warns once per process that a ReLU (slope-0) in-place layer saves no memory."""
    global _warned_non_invertible
    if not _warned_non_invertible:
        _warned_non_invertible = True
        warnings.warn(
            "inplace_abn: leaky_relu with slope 0 (ReLU) is not invertible, so this layer keeps its "
            "pre-activation for backward and saves no memory over BatchNorm + ReLU(inplace=True). Use "
            "activation='leaky_relu' with activation_param > 0 (e.g. 0.01) to get the in-place saving.",
            RuntimeWarning,
            stacklevel=4,
        )
