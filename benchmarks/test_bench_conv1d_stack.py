"""pytest-benchmark suite of the ``conv1d_stack`` cases (GPU only)."""

from __future__ import annotations

import pytest
import torch

from benchmarks.bench_cases import case_id, cases
from benchmarks.conftest import timed
from fusedconvlstm.benchmarking import build_pair

CASES = cases("conv1d_stack", [64, 256], None) if torch.cuda.is_available() else []


@pytest.mark.parametrize("side", ["ours", "baseline"])
@pytest.mark.parametrize("case", CASES, ids=case_id)
def test_conv1d_stack(benchmark, case, side):
    pair = build_pair(case, torch.device("cuda"), hidden=512)
    benchmark.extra_info.update({k: str(v) for k, v in case.items()})
    benchmark.extra_info["max_rel_err"], benchmark.extra_info["baseline_max_rel_err"] = pair.errors()
    benchmark(timed(pair.ours if side == "ours" else pair.baseline))
