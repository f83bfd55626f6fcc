"""pytest-benchmark suites, one per op (run on a GPU: ``pytest benchmarks --benchmark-only``).

They time the same cases as ``python -m fusedconvlstm bench`` (built by
:func:`fusedconvlstm.benchmarking.build_pair`), ours and the baseline side by side, after the
case's error check. Speed targets live in the issues and the JSON-lines results, never in
assertions here.
"""

from __future__ import annotations

import importlib.util

import pytest
import torch


def pytest_collection_modifyitems(config, items):
    if not torch.cuda.is_available():
        reason = "the benchmark suites time GPU kernels"
    elif importlib.util.find_spec("pytest_benchmark") is None:
        reason = "pytest-benchmark is not installed"
    else:
        return
    for item in items:
        item.add_marker(pytest.mark.skip(reason=reason))


def timed(pair_fn):
    """A callable that runs ``pair_fn`` and waits for the GPU, for pytest-benchmark's wall clock."""

    def fn():
        pair_fn()
        torch.cuda.synchronize()

    return fn
