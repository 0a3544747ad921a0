"""Shared fixtures: the backend under test, seeding, the device fixtures and the GPU marker.

tests/ is put on sys.path here (pytest's default "prepend" import mode does it too, but not
``--import-mode=importlib``), so test modules can ``from helpers import ...``.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import inplace_abn

_TESTS = str(Path(__file__).resolve().parent)
if _TESTS not in sys.path:
    sys.path.insert(0, _TESTS)

BACKENDS = ["cpp", "python"] if inplace_abn.extension_loaded() else ["python"]
NO_CUDA = "needs a CUDA GPU (torch.cuda.is_available() is False)"


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs the test once per available backend and restores the previous one afterwards."""
    with inplace_abn.use_backend(request.param):
        yield request.param


@pytest.fixture(params=["cpu", pytest.param("cuda", marks=pytest.mark.cuda)])
def device(request):
    """Runs the test on "cpu", and on "cuda" (``cuda``-marked: skipped without a GPU)."""
    return request.param


@pytest.fixture
def cuda_device():
    """ "cuda" for a test that needs a GPU; skips it without one (such tests are also ``cuda``-marked)."""
    if not torch.cuda.is_available():
        pytest.skip(NO_CUDA)
    return "cuda"


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason=NO_CUDA)
    for item in items:
        if "cuda_device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.cuda)  # `-m cuda` / `-m "not cuda"` select them
        if item.get_closest_marker("cuda") is not None and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
