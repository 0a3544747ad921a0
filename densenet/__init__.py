"""Memory-efficient DenseNet built on In-Place ABN: naive, checkpoint and "efficient" memory modes.

The efficient mode (norm="iabn") keeps only per-channel statistics for each bottleneck and rebuilds the
concatenation and its normalisation in backward.
"""

from . import model
from .model import (  # noqa: F401 - re-exported: __all__ is model.__all__
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

__all__ = list(model.__all__)
