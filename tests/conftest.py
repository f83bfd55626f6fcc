"""Shared fixtures and markers.

- ``@pytest.mark.gpu``: needs a CUDA GPU; skipped cleanly without one.
- ``@pytest.mark.triton``: runs Triton kernels; on the CPU only under ``TRITON_INTERPRET=1``
  (``make test`` sets it), otherwise skipped. Such a test that is not also marked ``gpu`` runs
  CPU tensors, so on a GPU machine without the interpreter it is skipped too, unless its module
  sets ``TRITON_TESTS_FOLLOW_THE_GPU = True`` (its tensors go to the GPU there).
"""

from __future__ import annotations

import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
TRITON_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


def pytest_collection_modifyitems(config, items):
    skip_gpu = pytest.mark.skip(reason="needs a CUDA GPU")
    skip_triton = pytest.mark.skip(reason="Triton needs a GPU or TRITON_INTERPRET=1")
    skip_cpu_triton = pytest.mark.skip(reason="Triton on CPU tensors needs TRITON_INTERPRET=1")
    for item in items:
        if "gpu" in item.keywords and not HAS_GPU:
            item.add_marker(skip_gpu)
        if "triton" in item.keywords and not (HAS_GPU or TRITON_INTERPRET):
            item.add_marker(skip_triton)
        elif (
            "triton" in item.keywords
            and "gpu" not in item.keywords
            and HAS_GPU
            and not TRITON_INTERPRET
            and not getattr(item.module, "TRITON_TESTS_FOLLOW_THE_GPU", False)
        ):
            item.add_marker(skip_cpu_triton)


@pytest.fixture(autouse=True)
def _seed_and_clean_env(monkeypatch):
    """Each test gets its own seed and runs without a forced backend."""
    monkeypatch.delenv("FUSEDCONVLSTM_BACKEND", raising=False)
    torch.manual_seed(0x5EED)


@pytest.fixture
def cuda_device():
    """The CUDA device for GPU tests."""
    return torch.device("cuda")
