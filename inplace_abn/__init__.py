"""In-Place Activated BatchNorm for memory-optimized training of DNNs (Rota Bulo et al., CVPR 2018).

A drop-in replacement for inplace-abn 1.1.0: ``ABN``, ``InPlaceABN``, ``InPlaceABNSync``,
``inplace_abn.functions.inplace_abn`` / ``inplace_abn_sync`` and the group helpers, on fused C++ kernels
(``torch.ops.inplace_abn``) with a pure-PyTorch fallback.
"""

from __future__ import annotations

from . import (
    _backend,  # noqa: F401 - first: loads the extension so the ops exist before anything registers on them
    _ops,  # noqa: F401 - registers the fake kernels of the ops
    activations,
    reference,
)
from ._backend import extension_loaded, get_backend, set_backend, use_backend
from ._version import __version__
from .abn import ABN, InPlaceABN, InPlaceABNSync, RecomputeMaxPool2d
from .convert import (
    BatchNormNd,
    ConversionReport,
    convert_local,
    convert_model,
    convert_sync,
    load_inplace_abn_v1_state_dict,
    to_batchnorm,
)
from .functions import inplace_abn, inplace_abn_sync, recover_normalized_input
from .group import active_group, set_active_group
from .memory_report import MemoryReport, memory_report  # the function; the CLI: python -m inplace_abn.memory_report

__all__ = [
    "ABN",
    "InPlaceABN",
    "InPlaceABNSync",
    "RecomputeMaxPool2d",
    "inplace_abn",
    "inplace_abn_sync",
    "recover_normalized_input",
    "active_group",
    "set_active_group",
    "convert_sync",
    "convert_local",
    "convert_model",
    "to_batchnorm",
    "load_inplace_abn_v1_state_dict",
    "BatchNormNd",
    "ConversionReport",
    "memory_report",
    "MemoryReport",
    "get_backend",
    "set_backend",
    "use_backend",
    "extension_loaded",
    "reference",
    "activations",
    "__version__",
]
