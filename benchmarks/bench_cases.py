"""Case lists shared by the pytest-benchmark suites."""

from __future__ import annotations

import torch

from fusedconvlstm.benchmarking import plan


def cases(op: str, batches: list[int], seqs: list[int] | None = None) -> list[dict]:
    """Planned cases of ``op`` on this GPU in bf16/fp16/fp32, forward and forward + backward."""
    return plan(
        [op],
        ["bf16", "fp16", "fp32"],
        batches,
        seqs or [45],
        ["fwd", "fwd+bwd"],
        torch.device("cuda"),
        include_reference=False,
        compile_baseline=True,
    )


def case_id(case: dict) -> str:
    """A readable test id."""
    return f"{case['op']}-{case['pass_']}-{case['dtype']}-b{case['batch']}-T{case['seq']}-{case['backend']}-vs-{case['baseline']}"
