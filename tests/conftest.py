"""Shared fixtures: the backend under test, seeding, and the GPU marker."""

from __future__ import annotations

import pytest
import torch

import inplace_abn

BACKENDS = ["cpp", "python"] if inplace_abn.extension_loaded() else ["python"]
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs the test once per available backend and restores the previous one afterwards."""
    with inplace_abn.use_backend(request.param):
        yield request.param


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA GPU (none visible)")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
