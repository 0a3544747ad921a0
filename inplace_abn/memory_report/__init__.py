"""``inplace_abn.memory_report``: what In-Place ABN would save on any model, before training it.

Python API: ``inplace_abn.memory_report(model, input_shape, ...)`` -> :class:`MemoryReport`.
Command line: ``python -m inplace_abn.memory_report MODEL --input NxCxHxW`` (:mod:`.cli`).

The package attribute ``inplace_abn.memory_report`` is the function; import the CLI with
``from inplace_abn.memory_report.cli import main``.
"""

from .report import (
    DTYPES,
    OPTIMIZERS,
    PEAK_FORMULA,
    MemoryReport,
    ModuleMemory,
    VariantReport,
    memory_report,
)

__all__ = ["DTYPES", "OPTIMIZERS", "PEAK_FORMULA", "MemoryReport", "ModuleMemory", "VariantReport", "memory_report"]
