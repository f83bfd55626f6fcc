"""The pytest-benchmark suite (``pytest benchmarks``, ``make bench-suite``): runs on a GPU at the
real sizes and on the CPU at small ones (see :mod:`benchmarks._timing`). Speed targets live in
``benchmarks/targets.py`` and are judged on ``fusedconvlstm bench`` records, never in assertions
here; the only assertion is the pass mark, before timing."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


def pytest_report_header(config):
    from benchmarks import _timing

    dev = _timing.device()
    how = (
        "real sizes, each round a CUDA-event timing (GPU time in extra_info)"
        if dev.type == "cuda"
        else "CPU, small sizes, pytest-benchmark's timer (says nothing about GPU speed)"
    )
    return f"fusedconvlstm benchmarks: {how}"


def pytest_collection_modifyitems(config, items):
    if importlib.util.find_spec("pytest_benchmark") is not None:
        return
    skip = pytest.mark.skip(reason="pytest-benchmark is not installed (pip install pytest-benchmark)")
    for item in items:
        if HERE in Path(item.path).resolve().parents:  # this suite's items only
            item.add_marker(skip)
