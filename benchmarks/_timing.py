"""What the pytest-benchmark suite (``benchmarks/test_bench_ops.py``) times, and how.

The cases are ``python -m fusedconvlstm bench``'s (:func:`fusedconvlstm.benchmarking.plan` and
:func:`~fusedconvlstm.benchmarking.build_pair`): our LSTM, conv stack and reference model
(inference; on a GPU also its training step and the LSTM pair) against what a user would run instead
(``torch.nn``: cuDNN on a GPU, torch's CPU kernels on the CPU; on a GPU the model also against
``torch.compile``). Each case is one pytest-benchmark group of two tests, ``ours`` and
``baseline``.

Sizes: on a GPU the sizes of the project's speed targets (:data:`GPU_SIZES`), in bf16, fp16 and
fp32, on every backend of ours that serves the case; on the CPU small sizes (:data:`CPU_SIZES`) in
fp32 under ``auto`` (torch's kernels there, as ``bench`` on the CPU), so the whole CPU suite takes
seconds.

Correctness before speed: a case's errors against float64 are checked on the package's pass mark
(:mod:`fusedconvlstm.passmark`, every tensor) before either side is timed, and a case past the mark
fails without a timing.

What the numbers are:

- on the CPU, pytest-benchmark's own statistics: its timer (``time.perf_counter``) around single
  calls of the side, :data:`CPU_ROUNDS` rounds after a warm-up call; they are the CPU time of a
  call, which says nothing about GPU speed;
- on a GPU, each pytest-benchmark round is one round of the package's CUDA-event timer
  (:func:`fusedconvlstm.benchmarking.round_timer`, mode ``events``: the median of
  ``triton.testing.do_bench``, L2 flushed before each call), :data:`GPU_ROUNDS` rounds. The GPU
  time is in ``extra_info``: ``cuda_event_ms`` (one value per round), ``median_ms`` and
  ``percentiles_ms``. pytest-benchmark's own statistics (min, mean, median, ...) there are the wall
  clock of whole timing rounds (do_bench's warm-up and its ~100 ms of repeats): they measure the
  timing, not the kernel; read ``extra_info``.

Unlike ``bench``, the two sides are timed in separate tests, not interleaved round by round: for
records that judge a speedup use ``python -m fusedconvlstm bench``.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable

import torch

from fusedconvlstm import passmark
from fusedconvlstm.benchmarking import (
    MIN_ROUNDS,
    build_pair,
    case_fields,
    percentiles,
    plan,
    round_timer,
    timing_settings,
)

# Batch sizes and sequence lengths per op. On a GPU: the sizes of the project's speed targets.
GPU_SIZES = {
    "lstm": ([8, 64, 256, 1024], [45, 100, 1000]),
    "lstm_pair": ([8, 64, 256, 1024], [45, 100]),
    "conv1d_stack": ([64, 256], [100]),
    "model_inference": ([1, 8, 64, 256, 1024], [45]),
    "model_train_step": ([256, 2048], [45]),
}
GPU_DTYPES = ["bf16", "fp16", "fp32"]
# On the CPU: small sizes, fp32, under auto (what a user there gets). The model's training step
# is left to the GPU: its float64 error check alone takes seconds on two busy cores.
CPU_SIZES = {
    "lstm": ([8], [45]),
    "conv1d_stack": ([4], [100]),
    "model_inference": ([4], [45]),
}
CPU_DTYPES = ["fp32"]
PASSES = ["fwd", "fwd+bwd"]  # the model cases take the one their op means
# Hidden (and input) size of the LSTM cases; the conv stack and the model have the reference
# model's sizes.
HIDDEN = {"cuda": 512, "cpu": 128}
# pytest-benchmark rounds on a GPU, each one CUDA-event timing (do_bench); on the CPU, each one
# call (after one warm-up call), fixed so the CPU suite's time is bounded on a busy machine.
GPU_ROUNDS = MIN_ROUNDS
CPU_ROUNDS = 10
SIDES = ("ours", "baseline")


def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def cases(dev: torch.device) -> list[dict]:
    """Every case the suite times on ``dev``."""
    gpu = dev.type == "cuda"
    out = []
    for op, (batches, seqs) in (GPU_SIZES if gpu else CPU_SIZES).items():
        out += plan(
            [op],
            GPU_DTYPES if gpu else CPU_DTYPES,
            batches,
            seqs,
            PASSES,
            dev,
            include_reference=False,
            only_backends=() if gpu else ("auto",),
        )
    return out


def case_id(case: dict) -> str:
    return (
        f"{case['op']}-{case['pass_']}-{case['dtype']}-b{case['batch']}-T{case['seq']}-{case['backend']}"
        f"-vs-{case['baseline']}"
    )


def hidden_of(dev: torch.device) -> int:
    return HIDDEN["cuda" if dev.type == "cuda" else "cpu"]


# The last case built and checked, (key, pair, marks): both sides of a case share one build and
# one error check, and only one case's tensors are held at a time.
_checked: list = []


def checked_pair(case: dict, dev: torch.device):
    """The case's pair (:func:`build_pair`) and its per-tensor pass marks, built and checked once
    for both sides."""
    key = (case_id(case), str(dev))
    if not _checked or _checked[0] != key:
        _checked.clear()
        pair = build_pair(case, dev, hidden_of(dev))
        _checked.extend((key, pair, pair.errors()))
    return _checked[1], _checked[2]


def check_then_time(benchmark, case: dict, side: str, dev: torch.device | None = None) -> None:
    """Check the case on the pass mark, then time one side of it with ``benchmark`` (the
    pytest-benchmark fixture); what the numbers are is in the module's docstring."""
    dev = dev or device()
    pair, marks = checked_pair(case, dev)
    worst = passmark.worst(marks)
    benchmark.group = case_id(case)
    benchmark.extra_info.update(
        {k: v for k, v in case_fields(case, hidden_of(dev)).items() if k != "pass_"},
        side=side,
        device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu",
        max_rel_err=worst.err,
        baseline_max_rel_err=worst.base_err,
        err_within_2x_baseline=passmark.all_pass(marks),
        errors=[m.to_dict() for m in marks],
    )
    benchmark.extra_info["pass"] = case["pass_"]
    failed = [m.describe() for m in marks if not m.passed]
    assert not failed, f"{case_id(case)}: past the pass mark, not timed: " + "; ".join(failed)
    fn = pair.ours if side == "ours" else pair.baseline
    if dev.type == "cuda":
        time_with_cuda_events(benchmark, fn, dev)
    else:
        benchmark.extra_info["timing"] = {"mode": "pytest-benchmark", "timer": "time.perf_counter"}
        benchmark.pedantic(fn, rounds=CPU_ROUNDS, iterations=1, warmup_rounds=1)


def time_with_cuda_events(benchmark, fn: Callable[[], object], dev: torch.device, rounds: int = GPU_ROUNDS) -> None:
    """``rounds`` pytest-benchmark rounds, each one CUDA-event timing of ``fn``
    (:func:`round_timer`, mode ``events``), whose milliseconds go to ``extra_info``."""
    timer = round_timer(dev, "events")
    ms: list[float] = []
    benchmark.pedantic(lambda: ms.append(float(timer(fn))), rounds=rounds, iterations=1)
    benchmark.extra_info.update(
        cuda_event_ms=ms,
        median_ms=statistics.median(ms),
        percentiles_ms=percentiles(ms),
        timing=dict(
            timing_settings(dev, "events", rounds),
            pytest_benchmark_stats="wall clock of whole do_bench rounds, not the kernel: read median_ms",
        ),
    )
