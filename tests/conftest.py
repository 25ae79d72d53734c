"""Shared fixtures. GPU tests are skipped (with a reason) on machines without CUDA."""

from __future__ import annotations

import pytest


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except ImportError:  # pragma: no cover
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU; run the same tests on a GPU machine")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
