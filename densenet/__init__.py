"""Memory-efficient DenseNet built on In-Place ABN (naive and checkpoint modes; shared-storage "efficient" mode (norm="iabn"))."""

from .model import (
    MEMORY_MODES,
    NORMS,
    DenseNet,
    densenet121,
    densenet161,
    densenet169,
    densenet201,
    densenet264,
    densenet_bc,
)

__all__ = [
    "DenseNet",
    "densenet_bc",
    "densenet121",
    "densenet161",
    "densenet169",
    "densenet201",
    "densenet264",
    "NORMS",
    "MEMORY_MODES",
]
