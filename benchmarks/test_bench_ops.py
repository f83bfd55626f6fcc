"""pytest-benchmark suite of every op's cases (GPU only): ``pytest benchmarks --benchmark-only``.

Each case is built by :func:`fusedconvlstm.benchmarking.build_pair` (the same cases as
``python -m fusedconvlstm bench``) and timed twice, ours and the baseline's side, after its error
check. Filter with ``-k``, e.g. ``-k "lstm_pair and bf16"``.
"""

from __future__ import annotations

import pytest
import torch

from benchmarks.conftest import timed
from fusedconvlstm import passmark
from fusedconvlstm.benchmarking import build_pair, plan

# Batch sizes and sequence lengths per op: the issues' targets.
SIZES = {
    "lstm": ([8, 64, 256, 1024], [45, 100, 1000]),
    "lstm_pair": ([8, 64, 256, 1024], [45, 100]),
    "conv1d_stack": ([64, 256], [100]),
    "model_inference": ([1, 8, 64, 256, 1024], [45]),
    "model_train_step": ([256, 2048], [45]),
}


def _cases() -> list[dict]:
    if not torch.cuda.is_available():
        return []
    out = []
    for op, (batches, seqs) in SIZES.items():
        out += plan([op], ["bf16", "fp16", "fp32"], batches, seqs, ["fwd", "fwd+bwd"], torch.device("cuda"),
                    include_reference=False)  # fmt: skip
    return out


def _id(case: dict) -> str:
    return f"{case['op']}-{case['pass_']}-{case['dtype']}-b{case['batch']}-T{case['seq']}-{case['backend']}-vs-{case['baseline']}"


@pytest.mark.parametrize("side", ["ours", "baseline"])
@pytest.mark.parametrize("case", _cases(), ids=_id)
def test_bench(benchmark, case, side):
    pair = build_pair(case, torch.device("cuda"), hidden=512)
    benchmark.extra_info.update({k: str(v) for k, v in case.items()})
    worst = passmark.worst(pair.errors())
    benchmark.extra_info["max_rel_err"], benchmark.extra_info["baseline_max_rel_err"] = worst.err, worst.base_err
    benchmark(timed(pair.ours if side == "ours" else pair.baseline))
