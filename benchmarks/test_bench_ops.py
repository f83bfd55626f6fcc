"""pytest-benchmark suite: our LSTM, conv stack and reference model timed against torch.nn.

``pytest benchmarks`` from the repository root (``make bench-suite`` writes its JSON). On a GPU the
real sizes, each round timed by CUDA events; on the CPU small sizes that finish in seconds. Each
case is checked on the pass mark before it is timed; what pytest-benchmark's statistics measure on
each device is in :mod:`benchmarks._timing`. Filter with ``-k``, e.g. ``-k "lstm and fwd+bwd"``.
"""

from __future__ import annotations

import pytest

from benchmarks import _timing

DEVICE = _timing.device()
CASES = _timing.cases(DEVICE)


@pytest.mark.parametrize(
    "case,side",
    [(case, side) for case in CASES for side in _timing.SIDES],  # both sides of a case in a row
    ids=[f"{_timing.case_id(case)}-{side}" for case in CASES for side in _timing.SIDES],
)
def test_bench(benchmark, case, side):
    _timing.check_then_time(benchmark, case, side, DEVICE)
