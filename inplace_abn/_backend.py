"""Which implementation of the custom ops runs: the compiled extension ("cpp") or pure PyTorch ("python").

The extension is loaded once, at import. ``INPLACE_ABN_BACKEND=python`` forces the pure-PyTorch path,
``INPLACE_ABN_BACKEND=cpp`` makes a missing extension an ImportError instead of a warning.
"""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path

import torch

__all__ = ["get_backend", "set_backend", "extension_loaded", "extension_error", "has_kernel", "shadowed_build"]

_BACKENDS = ("cpp", "python")
_extension_error: BaseException | None = None

try:
    # Loading the shared object runs its TORCH_LIBRARY registrations; nothing else is used from it.
    importlib.import_module(f"{__package__}._C")
except ImportError as exc:  # not built, or built against another torch
    _extension_error = exc


def extension_loaded() -> bool:
    """True when the compiled ``inplace_abn._C`` extension was imported."""
    return _extension_error is None


def extension_error() -> BaseException | None:
    """The exception raised while importing the extension, or None if it loaded."""
    return _extension_error


def shadowed_build() -> str | None:
    """The folder of another copy of this package, with a compiled ``_C``, that this import shadows.

    The usual case: ``pip install --no-build-isolation .`` put a built copy into site-packages, and Python
    run from the repository root imports the source tree (first on ``sys.path``), which has no ``_C``.
    None when the extension loaded or no such copy exists on ``sys.path``.
    """
    if extension_loaded():
        return None
    here = Path(__file__).resolve().parent
    for entry in sys.path:
        candidate = Path(entry or os.getcwd()) / __package__
        try:
            built = any(candidate.glob("_C*.so")) or any(candidate.glob("_C*.pyd"))
            if built and candidate.resolve() != here:
                return str(candidate)
        except OSError:  # an unreadable or vanished sys.path entry
            continue
    return None


def _missing_extension_advice() -> str:
    """Why the extension is missing and what fixes it, for the warning and the ImportError."""
    shadowed = shadowed_build()
    if shadowed is not None:
        return (
            f"This import is the source tree {Path(__file__).resolve().parent}, which has no compiled _C, and it "
            f"shadows the built copy in {shadowed} (Python puts the current directory first on sys.path). Run "
            "from another directory, or install the source tree in development mode so that _C is built into "
            "it: `pip install --no-build-isolation -e .`"
        )
    return "Rebuild with `pip install --no-build-isolation .`"


def _initial_backend() -> str:
    requested = os.environ.get("INPLACE_ABN_BACKEND", "").strip().lower()
    if requested and requested not in _BACKENDS:
        raise ValueError(f"INPLACE_ABN_BACKEND must be one of {_BACKENDS}, got {requested!r}")
    if requested == "python":
        return "python"
    if extension_loaded():
        return "cpp"
    if requested == "cpp":
        raise ImportError(
            "INPLACE_ABN_BACKEND=cpp but the compiled extension inplace_abn._C could not be imported: "
            f"{_extension_error}. {_missing_extension_advice()}"
        ) from _extension_error
    warnings.warn(
        f"inplace_abn: the compiled extension is not available ({_extension_error}); running on the "
        f"pure-PyTorch path (same results, slower). {_missing_extension_advice()}; "
        "or set INPLACE_ABN_BACKEND=python to silence this warning.",
        RuntimeWarning,
        stacklevel=3,
    )
    return "python"


_backend = _initial_backend()


def get_backend() -> str:
    """Returns the active backend: ``"cpp"`` (compiled kernels) or ``"python"`` (pure PyTorch)."""
    return _backend


def set_backend(name: str) -> None:
    """Selects the backend for subsequent calls (tests and benchmarks compare both).

    Args:
        name: ``"cpp"`` or ``"python"``.

    Raises:
        ValueError: ``name`` is not a known backend.
        RuntimeError: ``"cpp"`` was requested but the extension is not loaded.
    """
    global _backend
    if name not in _BACKENDS:
        raise ValueError(f"backend must be one of {_BACKENDS}, got {name!r}")
    if name == "cpp" and not extension_loaded():
        raise RuntimeError(f"backend 'cpp' needs the compiled extension, which failed to load: {_extension_error}")
    _backend = name


@contextlib.contextmanager
def use_backend(name: str) -> Iterator[str]:
    """Context manager: ``set_backend(name)`` for the ``with`` block, then the previous backend again.

    Args:
        name: ``"cpp"`` or ``"python"`` (errors as :func:`set_backend`).
    """
    previous = _backend
    set_backend(name)
    try:
        yield name
    finally:
        set_backend(previous)


def has_kernel(device_type: str) -> bool:
    """True when the extension registered kernels for ``device_type`` ("cpu", "cuda")."""
    if not extension_loaded():
        return False
    key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    return key is not None and torch.ops.inplace_abn.statistics.default.has_kernel_for_dispatch_key(key)
