"""GPU tests: skipped with a reason where CUDA or CuPy is absent; where both are present, a
kernel compile failure is a test failure (not a skip)."""

from __future__ import annotations

import importlib.util

import pytest
import torch

HAS_CUDA = torch.cuda.is_available()
HAS_CUPY = importlib.util.find_spec("cupy") is not None


def pytest_collection_modifyitems(config, items) -> None:
    reason = None
    if not HAS_CUDA:
        reason = "no CUDA device (torch.cuda.is_available() is False)"
    elif not HAS_CUPY:
        reason = "cupy is not installed"
    if reason is None:
        return
    skip = pytest.mark.skip(reason=reason)
    for item in items:
        if "tests/gpu/" in str(item.fspath).replace("\\", "/"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def kernels():
    from specdec.kernels import cupy as module

    assert module.available(), f"CUDA kernels failed to load: {module.load_error()}"
    return module


def poison_allocator(shape, dtype: torch.dtype, device: str = "cuda") -> None:
    """Fill then free a NaN tensor so the next same-size torch.empty (the kernel's output)
    reuses NaN memory from the caching allocator: an unwritten element then shows as NaN."""
    torch.full(shape, float("nan"), dtype=dtype, device=device)
