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

from fusedconvlstm import config

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


@pytest.fixture(autouse=True, scope="session")
def _settings_follow_monkeypatched_environment():
    """Tests set the package's variables with ``monkeypatch.setenv``, as a user sets them before
    starting Python. The package reads its settings once (:mod:`fusedconvlstm.config`), so here
    they are read again after every such change."""
    patch = pytest.MonkeyPatch()
    for name in ("setenv", "delenv"):
        original = getattr(pytest.MonkeyPatch, name)

        def changed_then_reloaded(self, *args, _original=original, **kwargs):
            _original(self, *args, **kwargs)
            config.reload()

        patch.setattr(pytest.MonkeyPatch, name, changed_then_reloaded)
    yield
    patch.undo()


@pytest.fixture(autouse=True)
def _seed_and_clean_env(monkeypatch):
    """Each test gets its own seed, runs without a forced backend, and starts from settings read
    from the environment as it is (a previous test's changes undone)."""
    config.reload()
    monkeypatch.delenv("FUSEDCONVLSTM_BACKEND", raising=False)
    torch.manual_seed(0x5EED)


@pytest.fixture
def cuda_device():
    """The CUDA device for GPU tests."""
    return torch.device("cuda")
