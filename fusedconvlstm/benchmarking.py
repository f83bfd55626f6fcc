"""``fusedconvlstm bench``: the package's backends timed against what a user would run instead.

Each case times one of our modules and a baseline side by side in one process, on the same
inputs, after checking our result against a float64 reference (correctness before speed):

==================  ==============================================  =============================
op                  ours                                            baseline
==================  ==============================================  =============================
lstm                ``fusedconvlstm.LSTM`` (input projection incl.)  ``nn.LSTM`` (cuDNN)
lstm_pair           ``parallel_lstm`` of two LSTMs on one input      two ``nn.LSTM``, one CUDA stream each
conv1d_stack        ``Conv1dStack`` on ``(B, T, C)``                 ``nn.Conv1d`` chain on ``(B, C, T)``
model_inference     ``ConvLSTMClassifier``                           ``ReferenceConvLSTMClassifier``
model_train_step    forward, backward, Adam step (autocast)          the same
==================  ==============================================  =============================

Baselines run in the dtype cuDNN serves best: our bf16 is compared with cuDNN fp16 (its
persistent kernel) and, where cuDNN has it, bf16; our fp32 with cuDNN's fp32 (TF32 on, the
default). Both sides run in the same mode: a forward case puts ``nn.LSTM`` in eval mode (in
training mode cuDNN writes its reserve space, which ours does not), the conv baselines run with
``cudnn.benchmark`` on. The reference model is also timed under ``torch.compile`` (modes
:data:`COMPILE_MODES`). Each case is timed in at least :data:`MIN_ROUNDS` rounds, ours and the
baseline alternating which goes first, one timing per side and round (on a GPU by default the
median of ``triton.testing.do_bench``, CUDA events after warm-up; ``--timing graph`` times CUDA-graph
replays, ``--timing wallclock`` back-to-back calls as a user waits for them); records keep every
round and its p10 / p50 / p90. Results are JSON lines as docs/design.md §4 describes (the
project's plots and speed-target reports over them are drawn by its tooling in ``benchmarks/``,
outside the package). Each record's ``spread`` is how far its rounds swing
((p90 - p10) / p50, the larger of the two sides); past :data:`SPREAD_WARNING` the run warns that
the machine was busy. Every record carries what it needs to be reproduced (:func:`environment`,
``settings``, ``timing``, ``served``) and its per-tensor errors under :mod:`fusedconvlstm.passmark`;
a case that crashed or was refused is written too, with its ``status``.

Without a GPU the same cases run on the CPU at small sizes (``time.perf_counter``, five repeats),
which says nothing about GPU speed; they are written to ``benchmarks/results/cpu/`` (ignored by
git: ``benchmarks/results/`` holds GPU results only).
"""

from __future__ import annotations

import contextlib
import copy
import datetime as _dt
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusedconvlstm import backends, passmark
from fusedconvlstm.cuda.persistent_config import counting_forward_kernels, preferring_forward_kernel
from fusedconvlstm.models.conv_lstm_classifier import ConvLSTMClassifier, ReferenceConvLSTMClassifier
from fusedconvlstm.nn.conv1d_stack import Conv1dStack
from fusedconvlstm.nn.lstm import LSTM, parallel_lstm
from fusedconvlstm.passmark import TensorMark

OPS = ("lstm", "lstm_pair", "conv1d_stack", "model_inference", "model_train_step")
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
# ``bench``'s defaults, [on the CPU, on a GPU] (False, True): on the CPU every drop-in case under
# auto (torch's kernels there) against torch.nn, at small sizes. The CPU's passes are those of a
# run that names no --ops (one that names ops times the forward only).
DEFAULTS = {
    "ops": (("lstm", "conv1d_stack", "model_inference", "model_train_step"), OPS),
    "dtypes": (("fp32",), ("bf16", "fp16", "fp32")),
    "batches": ((8, 64), (1, 8, 64, 256, 1024)),
    "passes": (("fwd",), ("fwd", "fwd+bwd")),
}


def default_help(name: str, cpu_note: str = "") -> str:
    """``bench``'s help text of the default of ``--<name>``, from :data:`DEFAULTS`."""
    cpu, gpu = (" ".join(map(str, v)) for v in DEFAULTS[name])
    return f"default: {gpu} on a GPU, {cpu} on the CPU{cpu_note}"


# Tokens per review the model cases feed (the reference model's max_len); its LSTMs see 45 steps.
MODEL_TOKENS = 100
# Rounds whose (p90 - p10) / p50 passes this make the run warn: the machine was busy.
SPREAD_WARNING = 0.25
# Rounds per case (one timing per side each, the sides alternating; their spread is the noise). A
# GPU run never times fewer than MIN_ROUNDS.
REPEATS = {"cuda": 5, "cpu": 5}
MIN_ROUNDS = 5
# How a GPU case is timed: CUDA events around do_bench's calls (L2 flushed before each),
# CUDA-graph replays of both sides (GPU time without launch overhead), or back-to-back calls by the
# wall clock (what a user waits for, launch overhead included).
TIMING_MODES = ("events", "graph", "wallclock")
# do_bench's settings, recorded with each result.
DO_BENCH = dict(warmup=25, rep=100)
# Back-to-back and graph timings: calls per round.
CALLS_PER_ROUND = 50


@dataclass
class BenchRecord:
    """One JSON line of results (docs/design.md §4 vocabulary)."""

    commit: str
    device: str
    torch: str
    cuda: str | None
    cudnn: int | None
    triton: str | None
    op: str
    backend: str
    baseline: str
    dtype: str
    batch: int
    seq: int
    hidden: int
    pass_: str
    median_ms: float | None = None
    baseline_median_ms: float | None = None
    speedup: float | None = None
    # The worst tensor's errors (see ``errors``), ours and the baseline's.
    max_rel_err: float | None = None
    repeats_ms: list[float] = field(default_factory=list)
    baseline_repeats_ms: list[float] = field(default_factory=list)
    baseline_max_rel_err: float | None = None
    # docs/design.md §3's pass mark (fusedconvlstm.passmark), every tensor: norm and largest element
    # at most 2x the baseline's plus the slack of our dtype.
    err_within_2x_baseline: bool | None = None
    # The cuda backend's forward kernel(s) that served the case ("cluster", "cooperative",
    # "stepwise", joined by "+"), None where it did not run.
    lstm_forward_kernel: str | None = None
    # How far the rounds swing: (p90 - p10) / p50, the larger of ours and the baseline's.
    spread: float | None = None
    # "ok"; "crashed" (ours or the baseline raised), "refused" (a backend cannot serve the case),
    # "baseline_unavailable" (the baseline cannot run here): then ``error`` says why, no timings.
    status: str = "ok"
    error: str | None = None
    # Per tensor: passmark.TensorMark.to_dict() (name, err, base_err, max_err, base_max_err, eps, passed).
    errors: list[dict] = field(default_factory=list)
    # p10 / p50 / p90 of the rounds, ours and the baseline's.
    percentiles_ms: dict | None = None
    baseline_percentiles_ms: dict | None = None
    # The dtype the baseline ran in, its mode (train / eval) and what was preferred of ours.
    baseline_dtype: str | None = None
    baseline_mode: dict | None = None
    forward_kernel_preferred: str | None = None
    # (op, backend) pairs that served our side (what auto resolved to), "op:backend", and how
    # each served where its backend says (the launch configuration chosen, e.g. the cuda LSTM's).
    served: list[str] = field(default_factory=list)
    launch: dict = field(default_factory=dict)
    # The cuDNN / CUDA kernels the baseline ran (profiler, once per case; GPU only).
    baseline_kernels: list[str] | None = None
    # How it was timed (mode, rounds, do_bench settings, interleaving).
    timing: dict | None = None
    # The machine and library settings (see environment_settings).
    settings: dict | None = None
    timestamp: str | None = None

    @classmethod
    def measured(
        cls,
        env: dict,
        times_ms: tuple[list[float], list[float]],
        errors: list[TensorMark] | tuple[float, float],
        **case,
    ) -> BenchRecord:
        """A record from the timings per round and the per-tensor pass marks of (ours, baseline):
        medians, percentiles, speedup and the pass mark derived here, once. ``errors`` as
        ``(ours, baseline)`` floats stands for one tensor whose largest element was not measured
        (judged on the norm alone)."""
        (ours_ms, base_ms) = times_ms
        if isinstance(errors, tuple):
            err, base_err = errors
            eps = passmark.eps_of(case["dtype"])
            errors = [TensorMark("worst tensor", err, base_err, 0.0, 0.0, eps)]
        worst = passmark.worst(errors)
        median, base_median = statistics.median(ours_ms), statistics.median(base_ms)
        case.setdefault("timestamp", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        return cls(
            **env,
            **case,
            median_ms=median,
            baseline_median_ms=base_median,
            speedup=base_median / median,
            max_rel_err=worst.err,
            repeats_ms=ours_ms,
            baseline_repeats_ms=base_ms,
            baseline_max_rel_err=worst.base_err,
            err_within_2x_baseline=passmark.all_pass(errors),
            errors=[m.to_dict() for m in errors],
            percentiles_ms=percentiles(ours_ms),
            baseline_percentiles_ms=percentiles(base_ms),
            spread=max(spread_of(ours_ms), spread_of(base_ms)),
        )

    @classmethod
    def failed(cls, env: dict, status: str, error: str, **case) -> BenchRecord:
        """A record of a case that did not run to the end: no timings, no pass mark."""
        case.setdefault("timestamp", _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
        return cls(**env, **case, status=status, error=error, err_within_2x_baseline=False)

    def to_json(self) -> str:
        d = asdict(self)
        d["pass"] = d.pop("pass_")
        if self.status != "ok":  # no timings or errors: absent, not null (a reader's default is no number)
            for k in ("median_ms", "baseline_median_ms", "speedup", "max_rel_err", "baseline_max_rel_err"):
                if d.get(k) is None:
                    d.pop(k, None)
        return json.dumps(d)


def percentile(values: list[float], q: float) -> float:
    """The ``q``-th percentile (0-100) of ``values``, linear between ranks (numpy's default)."""
    xs = sorted(values)
    if not xs:
        raise ValueError("percentile of no values")
    pos = (len(xs) - 1) * q / 100.0
    lo = int(pos)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (pos - lo)


def percentiles(values: list[float]) -> dict:
    """p10 / p50 / p90 of timings."""
    return {f"p{q}": percentile(values, q) for q in (10, 50, 90)}


def spread_of(times_ms: list[float]) -> float:
    """``(p90 - p10) / p50`` of timings per round: 0 when they agree."""
    median = statistics.median(times_ms)
    return (percentile(times_ms, 90) - percentile(times_ms, 10)) / median if median > 0 else 0.0


COMMIT_ENV = "FUSEDCONVLSTM_COMMIT"


def source_commit() -> str:
    """The commit the running sources are: ``git rev-parse HEAD`` (``-dirty`` when tracked files
    differ from it); where there is no git checkout (a copy of the working tree on another
    machine), ``$FUSEDCONVLSTM_COMMIT`` as the copier recorded it; else ``"unknown"``."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True, cwd=os.path.dirname(__file__)
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            cwd=os.path.dirname(__file__),
        ).stdout.strip()
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return os.environ.get(COMMIT_ENV, "").strip() or "unknown"


def environment() -> dict:
    """What the results were measured with."""
    commit = source_commit()
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    gpu = torch.cuda.is_available()
    return {
        "commit": commit,
        "device": torch.cuda.get_device_name()
        if gpu
        else f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)",
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None,
        "triton": triton_version,
    }


def environment_settings(device: torch.device | None = None) -> dict:
    """What else a timing depends on: the GPU driver, SM clock and power limit (through pynvml or
    ``nvidia-smi`` where either is there; ``None`` otherwise, as on the CPU), PyTorch's TF32 and
    cuDNN flags, and the ``FUSEDCONVLSTM_*`` environment overrides of our kernels."""
    gpu = device is not None and device.type == "cuda"
    out = {
        "driver": None,
        "sm_clock_mhz": None,
        "max_sm_clock_mhz": None,
        "power_limit_w": None,
        "temperature_c": None,
        "tf32_matmul": bool(torch.backends.cuda.matmul.allow_tf32),
        "tf32_cudnn": bool(torch.backends.cudnn.allow_tf32),
        "float32_matmul_precision": torch.get_float32_matmul_precision(),
        "cudnn_enabled": bool(torch.backends.cudnn.enabled),
        "cudnn_benchmark": bool(torch.backends.cudnn.benchmark),
        "cudnn_deterministic": bool(torch.backends.cudnn.deterministic),
        "env": {k: v for k, v in sorted(os.environ.items()) if k.startswith("FUSEDCONVLSTM_") and k != COMMIT_ENV},
    }
    if gpu:
        out.update(_gpu_state(device))
    return out


def _gpu_state(device: torch.device) -> dict:
    """Driver, clocks, power limit and temperature of ``device``: pynvml if importable, else
    ``nvidia-smi``; an empty dict when neither answers."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    try:
        import pynvml

        pynvml.nvmlInit()
        try:
            h = pynvml.nvmlDeviceGetHandleByIndex(index)
            driver = pynvml.nvmlSystemGetDriverVersion()
            return {
                "driver": driver.decode() if isinstance(driver, bytes) else driver,
                "sm_clock_mhz": pynvml.nvmlDeviceGetClockInfo(h, pynvml.NVML_CLOCK_SM),
                "max_sm_clock_mhz": pynvml.nvmlDeviceGetMaxClockInfo(h, pynvml.NVML_CLOCK_SM),
                "power_limit_w": pynvml.nvmlDeviceGetEnforcedPowerLimit(h) / 1000.0,
                "temperature_c": pynvml.nvmlDeviceGetTemperature(h, pynvml.NVML_TEMPERATURE_GPU),
            }
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # pynvml missing or refusing: try nvidia-smi
        pass
    query = "driver_version,clocks.sm,clocks.max.sm,power.limit,temperature.gpu"
    try:
        line = subprocess.run(
            ["nvidia-smi", f"--id={index}", f"--query-gpu={query}", "--format=csv,noheader,nounits"],
            capture_output=True,
            text=True,
            check=True,
            timeout=10,
        ).stdout.strip()
        driver, sm, max_sm, power, temp = [v.strip() for v in line.split(",")]
    except (OSError, subprocess.SubprocessError, ValueError):
        return {}

    def num(v):
        try:
            return float(v)
        except ValueError:
            return None

    return {"driver": driver, "sm_clock_mhz": num(sm), "max_sm_clock_mhz": num(max_sm), "power_limit_w": num(power),
            "temperature_c": num(temp)}  # fmt: skip


def time_pair_ms(
    ours: Callable[[], object],
    baseline: Callable[[], object],
    device: torch.device,
    repeats: int,
    timer: Callable[[Callable[[], object]], float] | None = None,
    mode: str = "events",
) -> tuple[list[float], list[float]]:
    """One timing per side in each of ``repeats`` rounds, interleaved: ours first in even rounds,
    the baseline first in odd ones, so a machine that slows down or speeds up during the run
    weighs on both sides alike. ``timer(fn)`` gives one round's milliseconds (default
    :func:`round_timer` for the device and ``mode``)."""
    timer = timer or round_timer(device, mode)
    ours_ms, base_ms = [], []
    for k in range(repeats):
        sides = ((ours, ours_ms), (baseline, base_ms)) if k % 2 == 0 else ((baseline, base_ms), (ours, ours_ms))
        for fn, samples in sides:
            samples.append(float(timer(fn)))
    return ours_ms, base_ms


def round_timer(device: torch.device, mode: str = "events") -> Callable[[Callable[[], object]], float]:
    """One round's timing of ``fn`` in milliseconds. On the CPU the median of calls timed by
    ``time.perf_counter`` for about 0.25 s. On a GPU, by ``mode`` (:data:`TIMING_MODES`):
    ``events``: the median of ``triton.testing.do_bench``; ``graph``: ``fn`` captured once in a
    CUDA graph, replays timed by CUDA events; ``wallclock``: back-to-back calls, synchronized at
    the end only, by the wall clock."""
    if mode not in TIMING_MODES:
        raise ValueError(f"timing mode must be one of {TIMING_MODES}, got {mode!r}")
    if device.type != "cuda":
        return _cpu_round
    if mode == "events":
        from triton.testing import do_bench

        return lambda fn: float(do_bench(fn, return_mode="median", **DO_BENCH))
    if mode == "wallclock":
        return _wallclock_round
    return _GraphTimer()


def _cpu_round(fn: Callable[[], object]) -> float:
    fn()  # warm-up
    samples = []
    budget = time.perf_counter() + 0.25
    while len(samples) < 3 or (time.perf_counter() < budget and len(samples) < 50):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


def _wallclock_round(fn: Callable[[], object]) -> float:
    """Back-to-back calls as a user's loop makes them: host work and launches included."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(CALLS_PER_ROUND):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) * 1e3 / CALLS_PER_ROUND


def capture_graph(step: Callable[[], object]) -> tuple[torch.cuda.CUDAGraph, object]:
    """Warm ``step`` up on a side stream, then capture it in a CUDA graph: ``(graph, its static
    outputs)``. Replaying the graph reruns ``step`` on whatever its input buffers hold then."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            step()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = step()
    return graph, static_out


class _GraphTimer:
    """CUDA-graph replay: each callable captured once (on first use), its replays timed back to
    back by CUDA events: the GPU's time, without host work or launch gaps."""

    def __init__(self):
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}

    def __call__(self, fn: Callable[[], object]) -> float:
        graph = self.graphs.get(id(fn))
        if graph is None:
            graph, _ = capture_graph(fn)
            self.graphs[id(fn)] = graph
        graph.replay()
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(CALLS_PER_ROUND):
            graph.replay()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / CALLS_PER_ROUND


def timing_settings(device: torch.device, mode: str, rounds: int) -> dict:
    """What a record's timings mean."""
    out = {"mode": mode if device.type == "cuda" else "cpu_perf_counter", "rounds": rounds, "interleaved": True}
    if device.type == "cuda" and mode == "events":
        out.update(DO_BENCH, stat="median of do_bench per round", l2_flush=True)
    elif device.type == "cuda":
        out.update(calls_per_round=CALLS_PER_ROUND, stat="mean per call per round", l2_flush=False)
    else:
        out.update(stat="median of calls per round (about 0.25 s)", l2_flush=False)
    return out


def time_ms(fn: Callable[[], object], device: torch.device, repeats: int = 3) -> list[float]:
    """``repeats`` round timings of ``fn`` alone (:func:`round_timer`, CUDA events on a GPU)."""
    timer = round_timer(device)
    return [float(timer(fn)) for _ in range(repeats)]


class _Rotating:
    """Cycles through copies of the inputs so a timed loop does not just re-read L2-resident data."""

    def __init__(self, make: Callable[[], tuple], l2_bytes: int):
        first = make()
        size = sum(t.numel() * t.element_size() for t in first if isinstance(t, Tensor))
        n = 1 if size == 0 else max(1, min(8, (2 * l2_bytes) // max(size, 1) + 1))
        self.items = [first] + [make() for _ in range(n - 1)]
        self.i = 0

    def next(self) -> tuple:
        self.i = (self.i + 1) % len(self.items)
        return self.items[self.i]


def _l2_bytes(device: torch.device) -> int:
    if device.type != "cuda":
        return 0
    return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 50 * 2**20))


@dataclass
class _Pair:
    """A benchmark case: our callable and the baseline's, each over rotated inputs, and how to
    compute the error of each against float64."""

    ours: Callable[[], object]
    baseline: Callable[[], object]
    errors: Callable[[], list[TensorMark]]
    # The baseline's mode, as a record states it (training flag, cudnn.benchmark, streams).
    baseline_mode: dict = field(default_factory=dict)
    # The modules each side runs (ours, the baseline's).
    modules: tuple = ()


def _inputs(shape, dtype, base_dtype, device, train):
    """One draw of an input in each side's dtype (ours, the baseline's) and the float32 draw the
    float64 reference reads: the same values, each rounded once, and no cast inside a timed call."""
    x = torch.randn(*shape, device=device)
    # Copies (also where a dtype matches x's), so each side's input is a leaf of its own.
    return (
        x.to(dtype, copy=True).requires_grad_(train),
        x.to(base_dtype, copy=True).requires_grad_(train),
        x,
    )


FLASHRNN_BACKENDS = ("cuda_fused", "cuda", "triton_fused")


class BaselineUnavailable(RuntimeError):
    """A baseline that cannot run here (a package missing, or it refused the shape)."""


class FlashRNNLSTM(nn.Module):
    """``nn.LSTM(batch_first=True)`` (one layer) on the FlashRNN package's kernels, as a baseline.

    FlashRNN takes the input projection precomputed (``Wx``), so it is one GEMM here, as in our
    LSTM: both sides time the same work. Weights map from ``nn.LSTM`` in its "GHDP" layout with one
    head: ``R[g, 0, d, p] = W_hh[g H + d, p]`` (gate order i, f, z, o is torch's i, f, g, o), the two
    biases summed."""

    def __init__(self, lstm: nn.LSTM, backend: str, dtype: torch.dtype):
        super().__init__()
        try:
            from flashrnn import flashrnn
        except ImportError as exc:
            raise BaselineUnavailable(f"flashrnn is not installed ({exc})") from exc
        if lstm.num_layers != 1 or lstm.bidirectional or lstm.proj_size or not lstm.batch_first:
            raise BaselineUnavailable("the FlashRNN baseline maps one batch_first unidirectional layer")
        self._flashrnn, self.backend, self.hidden = flashrnn, backend, lstm.hidden_size
        H = lstm.hidden_size
        with torch.no_grad():
            self.w_ih = nn.Parameter(lstm.weight_ih_l0.detach().to(dtype).clone())
            self.r = nn.Parameter(lstm.weight_hh_l0.detach().to(dtype).reshape(4, 1, H, H).clone())
            self.b = nn.Parameter((lstm.bias_ih_l0 + lstm.bias_hh_l0).detach().to(dtype).reshape(4, 1, H).clone())
        self.kernel_dtype = str(dtype).removeprefix("torch.")

    def grads_like_nn_lstm(self) -> list[Tensor | None]:
        """Gradients in ``nn.LSTM``'s parameter order (weight_ih, weight_hh, bias_ih, bias_hh; the
        summed bias's gradient is both biases')."""
        G = 4 * self.hidden
        r, b = self.r.grad, self.b.grad
        return [
            self.w_ih.grad,
            None if r is None else r.reshape(G, self.hidden),
            None if b is None else b.reshape(G),
            None if b is None else b.reshape(G),
        ]

    def forward(self, x: Tensor):
        B, T, _ = x.shape
        wx = (x @ self.w_ih.t()).view(B, T, 4, 1, self.hidden)
        try:
            states, last = self._flashrnn(
                wx, self.r, self.b, function="lstm", backend=self.backend, dtype=self.kernel_dtype
            )
        except Exception as exc:  # its JIT build or kernel refused: report, do not time
            raise BaselineUnavailable(f"flashrnn {self.backend}: {type(exc).__name__}: {exc}") from exc
        y = states[0, :, :, 0, :]  # (S, B, T, heads, H): state 0 is h
        return y, (last[0, :, -1, 0, :].unsqueeze(0), last[1, :, -1, 0, :].unsqueeze(0))


def _lstm_pair_case(op, dtype, base_dtype, batch, seq, hidden, backend, train, device, l2, baseline="cudnn"):
    n = 2 if op == "lstm_pair" else 1
    torch_lstms = [nn.LSTM(hidden, hidden, batch_first=True, device=device) for _ in range(n)]
    ours = [LSTM.from_torch(m, backend=backend).to(dtype) for m in torch_lstms]
    if baseline.startswith("flashrnn_"):
        flash_backend = baseline.removeprefix("flashrnn_")
        base = [FlashRNNLSTM(m, flash_backend, base_dtype) for m in torch_lstms]
    else:
        # A forward case runs nn.LSTM in eval mode: in training mode cuDNN writes its reserve
        # space for a backward (inference_mode does not change what nn.LSTM asks of cuDNN).
        base = [copy.deepcopy(m).to(base_dtype).train(train) for m in torch_lstms]
    ref64 = [copy.deepcopy(m).double().train(train) for m in torch_lstms]
    ours = [m.train(train) for m in ours]
    # The pair's baseline runs its two LSTMs on two CUDA streams, as a user overlapping them would.
    streams = [torch.cuda.Stream(device) for _ in base] if n > 1 and device.type == "cuda" else None
    rot = _Rotating(lambda: _inputs((batch, seq, hidden), dtype, base_dtype, device, train), l2)

    def result(out):  # inference keeps the last h, training the whole output
        return out[0] if train else out[1][0]

    def run_ours(x, xb, x32):
        if n == 1:
            return [result(ours[0](x))]
        return [result(o) for o in parallel_lstm(ours, x)]

    def run_base(x, xb, x32):
        if streams is None:
            return [result(m(xb)) for m in base]
        main = torch.cuda.current_stream(device)
        outs = []
        for m, stream in zip(base, streams):
            stream.wait_stream(main)
            with torch.cuda.stream(stream):
                outs.append(result(m(xb)))
        for stream in streams:
            main.wait_stream(stream)
        return outs

    def run_ref(x, xb, x32):
        return [result(m(x32.double())) for m in ref64]

    pair = _finish(run_ours, run_base, run_ref, rot, train, (ours, base, ref64), grad_input=True, dtype=dtype)
    pair.baseline_mode = {"training": any(getattr(m, "training", False) for m in base), "streams": len(streams or [1])}
    return pair


def _conv_case(dtype, base_dtype, batch, backend, train, device, l2):
    chain = nn.Sequential(
        *[
            nn.Conv1d(i, o, 3, stride=s, device=device)
            for i, o, s in zip((100, 200, 200, 256, 256), (200, 200, 256, 256, 512), (1, 1, 1, 1, 2))
        ]
    )
    ours = Conv1dStack.from_torch(chain, channels_last=True, backend=backend).to(dtype)
    base = copy.deepcopy(chain).to(base_dtype)
    ref64 = copy.deepcopy(chain).double()
    # cuDNN at its best: its algorithm chosen by timing (cudnn.benchmark, set for the case by
    # build_pair), and its input in nn.Conv1d's own (B, C, T) layout, contiguous, so no copy is
    # timed; only the error check transposes (views) to compare.
    rot = _Rotating(lambda: _conv_inputs((batch, 100, 100), dtype, base_dtype, device, train), l2)
    pair = _finish(
        lambda x, xb, x32: [ours(x).transpose(1, 2)],
        lambda x, xb, x32: [base(xb)],
        lambda x, xb, x32: [ref64(x32.double().transpose(1, 2))],
        rot,
        train,
        ([ours], [base], [ref64]),
        grad_input=True,
        dtype=dtype,
        base_input_grad=lambda g: g.transpose(1, 2),
    )
    pair.baseline_mode = {"training": train, "cudnn_benchmark": True, "layout": "(B, C, T) contiguous"}
    return pair


def _conv_inputs(shape, dtype, base_dtype, device, train):
    """As :func:`_inputs`, the baseline's draw in ``(B, C, T)``, contiguous."""
    x = torch.randn(*shape, device=device)
    return (
        x.to(dtype, copy=True).requires_grad_(train),
        x.to(base_dtype).transpose(1, 2).contiguous().requires_grad_(train),  # x needs no grad: a leaf
        x,
    )


NO_DROPOUT = dict(embedding_dropout=0.0, lstm_dropout=0.0, dense_dropout=0.0)


def _model_case(dtype, base_dtype, batch, backend, train, device, l2, compile_mode):
    # Dropout off on both sides (it would draw different masks and make the error check
    # meaningless), but a training step runs in training mode: cuDNN's LSTM has a backward only
    # there (with its reserve space), which is what a user's training step times.
    # A training step is what a user's is: float32 parameters under autocast to the 16-bit dtype
    # (plain float32 for fp32), forward, backward and an Adam step, on both sides.
    ref = ReferenceConvLSTMClassifier(device=device, dropout_masks="torch", **NO_DROPOUT)
    ours = ConvLSTMClassifier.from_reference(ref, backend=backend)
    base = copy.deepcopy(ref)
    mixed = train and dtype != torch.float32
    if not mixed:
        ours, base = ours.to(dtype), base.to(base_dtype)
    ours, base = ours.train(train), base.train(train)
    ref64 = copy.deepcopy(ref).double().train(train)
    optimizers = None
    if train:
        optimizers = tuple(torch.optim.Adam(m.parameters(), lr=1e-4) for m in (ours, base))

    def cast(side_dtype):
        if not mixed:
            return contextlib.nullcontext()
        return torch.autocast(device.type, dtype=side_dtype)

    if compile_mode is None:
        base_fn = base.logits
    else:
        # A fresh compile per case, static shapes: one cache shared by every case's dtype, batch
        # and grad mode would recompile past dynamo's limit and then silently run eager.
        torch._dynamo.reset()
        base_fn = torch.compile(base.logits, mode=compile_mode, dynamic=False)

    def make():
        tokens = torch.randint(1, 20_000, (batch, MODEL_TOKENS), device=device)
        return tokens, torch.randint(0, 2, (batch, 1), device=device)

    rot = _Rotating(make, l2)

    def loss_of(logits, y):
        return F.binary_cross_entropy_with_logits(logits.float(), y.float())

    if train:

        def run_ours(tok, y):
            with cast(dtype):
                return [loss_of(ours.logits(tok), y)]

        def run_base(tok, y):
            with cast(base_dtype):
                return [loss_of(base_fn(tok), y)]

        def run_ref(tok, y):
            return [loss_of(ref64.logits(tok), y)]
    else:

        def run_ours(tok, y):
            return [ours.logits(tok)]

        def run_base(tok, y):
            return [base_fn(tok)]

        def run_ref(tok, y):
            return [ref64.logits(tok)]

    pair = _finish(
        run_ours, run_base, run_ref, rot, train, ([ours], [base], [ref64]), grad_input=False, dtype=dtype,
        optimizers=optimizers,
    )  # fmt: skip
    pair.baseline_mode = {
        "training": base.training,
        "compile_mode": compile_mode,
        "autocast": str(base_dtype).removeprefix("torch.") if mixed else None,
        "optimizer": "Adam" if train else None,
    }
    return pair


def _param_grads(mods) -> list[Tensor | None]:
    """The parameter gradients of ``mods`` in ``nn.LSTM`` / ``nn.Conv1d`` order (a baseline in
    another layout maps its own: ``grads_like_nn_lstm``)."""
    out = []
    for m in mods:
        like = getattr(m, "grads_like_nn_lstm", None)
        out += like() if like is not None else [p.grad for p in m.parameters()]
    return out


def _finish(
    run_ours,
    run_base,
    run_ref,
    rot,
    train,
    mods,
    grad_input,
    dtype=torch.float32,
    base_input_grad=None,
    optimizers=None,
) -> _Pair:
    """Wrap the runners into timed closures (with backward when training) and an error check:
    per tensor, ours against float64 beside the baseline (:func:`fusedconvlstm.passmark.mark`,
    the slack of our ``dtype``).

    ``mods``: the (ours, baseline, float64 reference) modules, parameters in the same order.
    ``grad_input``: whether the first, second and third inputs (ours, the baseline's, the
    reference's) are differentiable, so a training check also compares the input gradient;
    ``base_input_grad`` maps the baseline's input gradient to the layout of ours (a view);
    ``optimizers``: (ours, the baseline's), stepped after each timed backward (the error check
    compares the gradients before any step).
    """
    ours_mods, base_mods, ref_mods = mods

    def step(run, mods, optimizer):
        def fn():
            args = rot.next()
            if not train:
                with torch.inference_mode():
                    return run(*args)
            for m in mods:
                m.zero_grad(set_to_none=True)
            outs = run(*args)
            sum(o.float().sum() for o in outs).backward()
            if optimizer is not None:
                optimizer.step()
            return outs

        return fn

    def forward_errors() -> list[TensorMark]:
        args = rot.items[0]
        with torch.no_grad():
            want = run_ref(*args)
            got, base = run_ours(*args), run_base(*args)
        names = ["output"] if len(want) == 1 else [f"output {k}" for k in range(len(want))]
        return passmark.mark_all(got, base, want, dtype, names)

    def training_errors() -> list[TensorMark]:
        # Outputs, the input gradient and every parameter gradient against float64, for one
        # cotangent drawn once (docs/design.md §3: every gradient is checked, not only the output).
        args = list(rot.items[0])
        ref_args = list(args)
        if grad_input:
            ref_args[2] = args[2].detach().double().requires_grad_()  # run_ref's .double() keeps this leaf
        sides = []
        cotangents = None
        for run, side_mods, side_args, which in (
            (run_ref, ref_mods, ref_args, 2),
            (run_ours, ours_mods, args, 0),
            (run_base, base_mods, args, 1),
        ):
            for m in side_mods:
                m.zero_grad(set_to_none=True)
            leaf = side_args[which] if grad_input else None
            if leaf is not None:
                leaf.grad = None
            outs = run(*side_args)
            if cotangents is None:
                gen = torch.Generator(device=outs[0].device).manual_seed(0xC07)
                cotangents = [torch.randn(o.shape, generator=gen, device=o.device, dtype=torch.float64) for o in outs]
            sum((o.double() * c).sum() for o, c in zip(outs, cotangents)).backward()
            grads = [leaf.grad] if leaf is not None else []
            if grads and which == 1 and base_input_grad is not None and grads[0] is not None:
                grads = [base_input_grad(grads[0])]
            sides.append([o.detach() for o in outs] + grads + _param_grads(side_mods))
        want, got, base = sides
        if not len(got) == len(base) == len(want):
            raise RuntimeError(
                f"bench: {len(got)} and {len(base)} results to compare with {len(want)} of the reference"
            )
        n_out = len(outs)
        names = ["output"] if n_out == 1 else [f"output {k}" for k in range(n_out)]
        names += ["grad input"] * (1 if grad_input else 0)
        names += [f"grad param {k}" for k in range(len(want) - len(names))]
        return passmark.mark_all(got, base, want, dtype, names)

    opt_ours, opt_base = optimizers or (None, None)
    return _Pair(
        step(run_ours, ours_mods, opt_ours),
        step(run_base, base_mods, opt_base),
        training_errors if train else forward_errors,
        modules=(ours_mods, base_mods),
    )


def _baselines(dtype_name: str, device: torch.device) -> list[tuple[str, torch.dtype]]:
    """Which baseline dtypes stand beside ours: cuDNN's best in that precision."""
    if device.type != "cuda":
        return [(f"torch_cpu_{dtype_name}", DTYPES[dtype_name])]
    if dtype_name == "fp32":
        return [("cudnn_fp32_tf32", torch.float32)]
    if dtype_name == "fp16":
        return [("cudnn_fp16", torch.float16)]
    return [("cudnn_fp16", torch.float16), ("cudnn_bf16", torch.bfloat16)]


def plan(
    ops: Iterable[str],
    dtypes: Iterable[str],
    batches: Iterable[int],
    seqs: Iterable[int],
    passes: Iterable[str],
    device: torch.device,
    include_reference: bool,
    compile_modes: Iterable[str] = ("default",),
    flashrnn_backends: Iterable[str] = (),
    lstm_forward_kernels: Iterable[str] = (),
    only_backends: Iterable[str] = (),
) -> list[dict]:
    """The list of cases to run (each a dict of parameters). ``compile_modes``: the
    ``torch.compile`` modes the reference model is also timed under; ``flashrnn_backends``: the
    FlashRNN kernels the LSTM cases are also timed against, in our dtype (both GPU only);
    ``lstm_forward_kernels``: the cuda backend's persistent forward kernels the lstm cases are
    timed with, each preferred in turn (``FUSEDCONVLSTM_LSTM_FWD_KERNEL``), against the dtype's
    first baseline only; empty: the default preference against every baseline. ``only_backends``: time only these of
    ours (empty: every one that serves the case)."""
    compile_modes, flashrnn_backends = tuple(compile_modes), tuple(flashrnn_backends)
    lstm_forward_kernels, only_backends = tuple(lstm_forward_kernels), tuple(only_backends)
    cases = []
    for op in ops:
        for dtype_name in dtypes:
            for batch in batches:
                for seq in seqs if op in ("lstm", "lstm_pair") else [45 if op != "conv1d_stack" else 100]:
                    for pass_ in _passes_of(op, passes):
                        for k, (baseline, base_dtype) in enumerate(_baselines(dtype_name, device)):
                            names = [baseline]
                            if op.startswith("model") and device.type == "cuda":
                                names += [compiled_baseline_name(baseline, mode) for mode in compile_modes]
                            if (
                                op in ("lstm", "lstm_pair")
                                and device.type == "cuda"
                                and base_dtype == DTYPES[dtype_name]
                            ):
                                names += [f"flashrnn_{b}" for b in flashrnn_backends]
                            for bname in names:
                                for backend in _serving_backends(op, device, DTYPES[dtype_name], include_reference):
                                    if only_backends and backend not in only_backends:
                                        continue
                                    kernels = [None]
                                    if op in ("lstm", "lstm_pair") and backend == "cuda" and lstm_forward_kernels:
                                        # Each named kernel against the first baseline only.
                                        kernels = list(lstm_forward_kernels) if k == 0 else []
                                    for kernel in kernels:
                                        cases.append(
                                            dict(
                                                op=op,
                                                dtype=dtype_name,
                                                base_dtype=base_dtype,
                                                batch=batch,
                                                seq=seq,
                                                pass_=pass_,
                                                baseline=bname,
                                                backend=backend,
                                                forward_kernel=kernel,
                                            )
                                        )
    return cases


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune")
# The modes bench times on a GPU unless told (max-autotune compiles for minutes: asked for).
DEFAULT_COMPILE_MODES = ("default", "reduce-overhead")


def compiled_baseline_name(baseline: str, mode: str) -> str:
    """``cudnn_fp16`` under ``torch.compile(mode=...)``: ``torch_compile_fp16`` (default mode),
    ``torch_compile_reduce_overhead_fp16`` or ``torch_compile_max_autotune_fp16``."""
    if mode not in COMPILE_MODES:
        raise ValueError(f"compile mode must be one of {COMPILE_MODES}, got {mode!r}")
    infix = "" if mode == "default" else "_" + mode.replace("-", "_")
    return baseline.replace("cudnn", "torch_compile" + infix, 1)


def compile_mode_of(baseline: str) -> str | None:
    """The ``torch.compile`` mode a baseline name stands for, ``None`` for eager."""
    if not baseline.startswith("torch_compile"):
        return None
    for mode in COMPILE_MODES[1:]:
        if baseline.startswith("torch_compile_" + mode.replace("-", "_")):
            return mode
    return "default"


def _passes_of(op: str, passes: Iterable[str]) -> list[str]:
    """An inference case is forward only and a training step forward + backward by definition."""
    if op == "model_inference":
        return ["fwd"]
    if op == "model_train_step":
        return ["fwd+bwd"]
    return list(passes)


# The custom ops a bench case runs: a backend is timed on a case only if it implements them all.
_CASE_OPS = {
    "lstm": ("lstm_recurrence",),
    "lstm_pair": ("lstm_recurrence",),
    "conv1d_stack": ("conv1d_stack",),
    "model_inference": ("conv1d_stack", "lstm_recurrence"),
    "model_train_step": ("conv1d_stack", "lstm_recurrence"),
}


def _serving_backends(op: str, device: torch.device, dtype: torch.dtype, include_reference: bool) -> list[str]:
    """The backends a case is timed on: each that runs here and implements every op of the case
    (on a GPU the reference and the ``torch`` backend, the baseline's own cuDNN path, only with
    ``--include-reference``); also ``auto``, what a user gets, for the whole model on a GPU (each op
    on a kernel where a validation record enables it, else torch's) and for every case on the
    CPU (torch's kernels there)."""
    names = []
    for name in backends.BACKENDS:
        if name in ("reference", backends.TORCH) and not include_reference and device.type == "cuda":
            continue
        if backends.backend_why_not(name, device) is not None or (name == "triton" and device.type != "cuda"):
            continue
        if all(backends.implementation(case_op, name) is not None for case_op in _CASE_OPS[op]):
            names.append(name)
    if op.startswith("model") or device.type == "cpu":
        names.insert(0, backends.AUTO)
    return names


def build_pair(case: dict, device: torch.device, hidden: int) -> _Pair:
    """Our callable, the baseline's and the error check of one planned case (see :func:`plan`)."""
    dtype, base_dtype = DTYPES[case["dtype"]], case["base_dtype"]
    train = case["pass_"] == "fwd+bwd"
    l2 = _l2_bytes(device)
    op, batch, backend = case["op"], case["batch"], case["backend"]
    if op in ("lstm", "lstm_pair"):
        seq = case["seq"]
        return _lstm_pair_case(op, dtype, base_dtype, batch, seq, hidden, backend, train, device, l2, case["baseline"])
    if op == "conv1d_stack":
        return _conv_case(dtype, base_dtype, batch, backend, train, device, l2)
    return _model_case(dtype, base_dtype, batch, backend, train, device, l2, compile_mode_of(case["baseline"]))


class _ServedSpy:
    """Records the (op, backend) pairs that serve our side while active: the backend the modules
    choose (:func:`backends.module_backend`) and the one the ops resolve (:func:`backends.resolve`),
    i.e. what ``auto`` (or a named backend) resolved to."""

    def __init__(self):
        self.seen: set[tuple[str, str]] = set()
        # "op:backend" -> how it served (its describe(call): the launch configuration chosen).
        self.launch: dict[str, str] = {}

    def __enter__(self):
        self._resolve, self._module_backend = backends.resolve, backends.module_backend

        def resolve(op, backend, call, device):
            impl = self._resolve(op, backend, call, device)
            self.seen.add((op, impl.backend))
            how = impl.get("describe") if isinstance(impl, backends.Implementation) else None
            if how is not None:
                try:
                    self.launch.setdefault(f"{op}:{impl.backend}", str(how(call)))
                except Exception as exc:  # evidence only: say why it is missing
                    self.launch.setdefault(f"{op}:{impl.backend}", f"(describe failed: {type(exc).__name__})")
            return impl

        def module_backend(op, backend, device, make_call):
            name = self._module_backend(op, backend, device, make_call)
            self.seen.add((op, name))
            return name

        backends.resolve, backends.module_backend = resolve, module_backend
        return self

    def __exit__(self, *exc):
        backends.resolve, backends.module_backend = self._resolve, self._module_backend
        return False

    def names(self) -> list[str]:
        return sorted(f"{op}:{backend}" for op, backend in self.seen)


def cuda_kernels_of(fn: Callable[[], object], device: torch.device) -> list[str] | None:
    """The GPU kernels one call of ``fn`` launches, by the profiler (``None`` off a GPU or where
    the profiler refuses): what ran as the baseline, so a label such as "persistent" is verified."""
    if device.type != "cuda":
        return None
    try:
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CUDA]) as prof:
            fn()
            torch.cuda.synchronize(device)
        names = {
            e.key for e in prof.key_averages() if getattr(e, "device_type", None) == torch.autograd.DeviceType.CUDA
        }
        return sorted(names)
    except Exception as exc:  # the profiler is optional evidence: say why it is missing
        return [f"(profiler failed: {type(exc).__name__}: {exc})"]


class _CudnnBenchmark:
    """``torch.backends.cudnn.benchmark`` set for a case (cuDNN's conv algorithms chosen by timing,
    the baseline at its best) and restored after."""

    def __init__(self, on: bool):
        self.on = on

    def __enter__(self):
        self.saved = torch.backends.cudnn.benchmark
        torch.backends.cudnn.benchmark = self.on or self.saved

    def __exit__(self, *exc):
        torch.backends.cudnn.benchmark = self.saved
        return False


def run_case(
    case: dict,
    device: torch.device,
    env: dict,
    hidden: int,
    repeats: int | None = None,
    timing: str = "events",
    timer: Callable[[Callable[[], object]], float] | None = None,
) -> BenchRecord:
    """Build, check and time one case (``repeats`` rounds, default :data:`REPEATS`; at least
    :data:`MIN_ROUNDS` on a GPU) with the ``timing`` mode (:data:`TIMING_MODES`)."""
    repeats = repeats or REPEATS.get(device.type, REPEATS["cpu"])
    if device.type == "cuda":
        repeats = max(repeats, MIN_ROUNDS)
    if timing == "graph" and (case["pass_"] != "fwd" or compile_mode_of(case["baseline"]) == "reduce-overhead"):
        raise ValueError("graph timing captures forward cases without their own CUDA graphs only")
    with preferring_forward_kernel(case.get("forward_kernel")), _CudnnBenchmark(device.type == "cuda"):
        pair = build_pair(case, device, hidden)
        with _ServedSpy() as served, counting_forward_kernels() as forward_kernels:
            marks = pair.errors()
        kernels = "+".join(sorted(forward_kernels)) or None
        baseline_kernels = cuda_kernels_of(pair.baseline, device)
        settings = environment_settings(device)
        ours_ms, base_ms = time_pair_ms(pair.ours, pair.baseline, device, repeats, timer, timing)
    return BenchRecord.measured(
        env,
        (ours_ms, base_ms),
        marks,
        **case_fields(case, hidden),
        lstm_forward_kernel=kernels,
        baseline_mode=pair.baseline_mode,
        served=served.names(),
        launch=served.launch,
        baseline_kernels=baseline_kernels,
        timing=timing_settings(device, timing, repeats),
        settings=settings,
    )


def case_fields(case: dict, hidden: int) -> dict:
    """The fields of a record that name its case."""
    return dict(
        op=case["op"],
        backend=case["backend"],
        baseline=case["baseline"],
        dtype=case["dtype"],
        batch=case["batch"],
        seq=case["seq"],
        hidden=hidden,
        pass_=case["pass_"],
        baseline_dtype=str(case["base_dtype"]).removeprefix("torch."),
        forward_kernel_preferred=case.get("forward_kernel"),
    )


def default_output_path(env: dict, root: str, gpu: bool = True) -> str:
    """``benchmarks/results/<date>_<device>.jsonl`` (a new file per run); CPU timings go to
    ``benchmarks/results/cpu/`` instead, which git ignores: the results folder is for GPU
    results, each citing its commit."""
    slug = "".join(c if c.isalnum() else "-" for c in env["device"].lower()).strip("-")
    while "--" in slug:
        slug = slug.replace("--", "-")
    stamp = _dt.datetime.now().strftime("%Y-%m-%d_%H%M%S")
    folder = os.path.join(root, "benchmarks", "results", *(() if gpu else ("cpu",)))
    return os.path.join(folder, f"{stamp}_{slug}.jsonl")


def case_label(case: dict) -> str:
    """What a case times, in words: the model cases are fed MODEL_TOKENS tokens (their LSTMs
    then see ``seq`` steps), the conv stack 100 steps, the LSTM cases ``seq``."""
    kernel = f" ({case['forward_kernel']} preferred)" if case.get("forward_kernel") else ""
    if case["op"].startswith("model"):
        length = f"tokens={MODEL_TOKENS} (LSTM T={case['seq']})"
    else:
        length = f"T={case['seq']}"
    return (
        f"{case['op']} {case['pass_']} {case['dtype']} b={case['batch']} {length} {case['backend']}{kernel} "
        f"vs {case['baseline']}"
    )


def _num(v: float | None, fmt: str, unit: str = "") -> str:
    return "—" if v is None else f"{v:{fmt}}{unit}"


def format_records(records: list[BenchRecord]) -> str:
    """A plain-text table of results."""
    header = (
        "op",
        "pass",
        "dtype",
        "batch",
        "seq",
        "backend",
        "ms",
        "baseline",
        "baseline ms",
        "speedup",
        "rel err",
        "spread",
    )
    rows = [
        (
            r.op,
            r.pass_,
            r.dtype,
            r.batch,
            r.seq,
            r.backend if r.lstm_forward_kernel is None else f"{r.backend} ({r.lstm_forward_kernel})",
            _num(r.median_ms, ".3f"),
            r.baseline,
            _num(r.baseline_median_ms, ".3f"),
            _num(r.speedup, ".2f", "x"),
            _num(r.max_rel_err, ".1e") + ("" if r.err_within_2x_baseline else " FAIL"),
            "" if r.spread is None else f"{100 * r.spread:.0f}%" + (" !" if r.spread > SPREAD_WARNING else ""),
        )
        for r in records
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *rows)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*r) for r in rows])


def main_bench(args) -> int:
    """Entry of the ``bench`` command (argparse namespace from :mod:`fusedconvlstm.cli`)."""
    gpu = torch.cuda.is_available()
    device = torch.device("cuda" if gpu else "cpu")
    env = environment()
    if not gpu:
        print(
            f"No CUDA GPU on this machine: timing on the CPU at small sizes. {CPU_CAVEAT}",
            flush=True,
        )
    ops = args.ops or list(DEFAULTS["ops"][gpu])
    dtypes = args.dtypes or list(DEFAULTS["dtypes"][gpu])
    batches = args.batches or list(DEFAULTS["batches"][gpu])
    seqs = args.seqs or [45]
    # The CPU's default run (no --ops) is the drop-in suite, forward and forward + backward.
    passes = args.passes or list(DEFAULTS["passes"][gpu or not args.ops])
    hidden = args.hidden or 512
    compile_modes = () if args.no_compile else tuple(args.compile_modes or DEFAULT_COMPILE_MODES)
    timing = getattr(args, "timing", None) or "events"
    flashrnn = tuple(getattr(args, "flashrnn", None) or ())
    kernels = tuple(getattr(args, "lstm_forward_kernels", None) or ())
    only = tuple(getattr(args, "backends", None) or (() if gpu else (backends.AUTO,)))
    cases = plan(
        ops, dtypes, batches, seqs, passes, device, args.include_reference, compile_modes, flashrnn, kernels, only
    )
    if not cases:
        print("nothing to run: no backend can serve these cases on this machine", flush=True)
        return 1
    out_path = args.out or default_output_path(env, os.getcwd(), gpu)
    repeats = getattr(args, "repeats", None) or REPEATS[device.type]
    if gpu:
        repeats = max(repeats, MIN_ROUNDS)
    records, failures = [], []
    t_start = time.perf_counter()
    budget = getattr(args, "time_budget", None)
    for k, case in enumerate(cases, 1):
        label = case_label(case)
        if budget is not None and time.perf_counter() - t_start > budget:
            print(
                f"time budget of {budget:.0f} s spent: {len(cases) - k + 1} case(s) not run, from [{k}/{len(cases)}] {label}"
            )
            break
        print(f"[{k}/{len(cases)}] {label} ... ", end="", flush=True)
        size = hidden if case["op"] in ("lstm", "lstm_pair") else 512
        try:
            rec = run_case(case, device, env, size, repeats, timing)
        except (RuntimeError, ValueError, backends.BackendUnavailableError, torch.OutOfMemoryError) as exc:
            # Written as a record too: report counts a crash or a refusal of ours as a failure.
            if isinstance(exc, BaselineUnavailable):
                status = "baseline_unavailable"
            elif isinstance(exc, (backends.BackendUnavailableError, ValueError)):
                status = "refused"
            else:
                status = "crashed"
            first = (str(exc).splitlines() or [type(exc).__name__])[0]
            print(f"{status}: {first}", flush=True)
            rec = BenchRecord.failed(env, status, f"{type(exc).__name__}: {first}", **case_fields(case, size))
            rec.settings = environment_settings(device)
            rec.timing = timing_settings(device, timing, repeats)
            failures.append(rec)
        else:
            records.append(rec)
            print(
                f"{rec.median_ms:.3f} ms vs {rec.baseline_median_ms:.3f} ms ({rec.speedup:.2f}x), "
                f"rel err {rec.max_rel_err:.1e}{'' if rec.err_within_2x_baseline else ' PAST THE PASS MARK'} "
                f"[{time.perf_counter() - t_start:.0f} s]",
                flush=True,
            )
            if rec.spread > SPREAD_WARNING:
                print(
                    f"  WARNING: the {repeats} rounds of this case swing by {100 * rec.spread:.0f}% (more than "
                    f"{100 * SPREAD_WARNING:.0f}%): the machine is busy or clocks vary; do not trust this speedup",
                    flush=True,
                )
        if out_path:
            os.makedirs(os.path.dirname(os.path.abspath(out_path)), exist_ok=True)
            with open(out_path, "a") as f:
                f.write(rec.to_json() + "\n")
    print()
    print(format_records(records))
    if failures:
        print(f"\n{len(failures)} case(s) did not run to the end (written with their status):")
        for r in failures:
            print(f"  {r.status}: {r.op} {r.pass_} {r.dtype} b={r.batch} {r.backend} vs {r.baseline}: {r.error}")
    noisy = [r for r in records if r.spread > SPREAD_WARNING]
    if noisy:
        print(
            f"\nWARNING: {len(noisy)} of {len(records)} cases swung by more than {100 * SPREAD_WARNING:.0f}% "
            "between rounds (marked !): rerun on a quiet machine before reading anything into them."
        )
    if records:
        print(f"\nresults: {out_path}")
    if not gpu:
        print(f"\n{CPU_CAVEAT}")
    return 0 if records else 1


CPU_CAVEAT = (
    "CPU timings say nothing about GPU speed: the kernels this package is about run on a GPU; on the CPU "
    "the drop-in modules under auto (torch's own kernels there) are timed against torch.nn, interleaved."
)


def load_records(paths: Iterable[str], required: Iterable[str] = ()) -> list[dict]:
    """The JSON lines of one or more results files. A file that is empty, a line that is not a
    JSON object or a record without a ``required`` key raises ``ValueError`` naming the file and
    line."""
    required = tuple(required)
    rows = []
    for path in paths:
        found = 0
        with open(path) as f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise ValueError(f"{path}:{lineno}: not a JSON line ({exc.msg})") from None
                if not isinstance(row, dict):
                    raise ValueError(f"{path}:{lineno}: not a results record (a JSON object)")
                # A case that crashed or was refused is a record without timings (see its status).
                missing = [k for k in required if k not in row] if row.get("status", "ok") == "ok" else []
                if missing:
                    raise ValueError(f"{path}:{lineno}: not a bench record (no {', '.join(missing)})")
                rows.append(row)
                found += 1
        if not found:
            raise ValueError(f"{path}: no records (the file is empty)")
    return rows


if __name__ == "__main__":  # pragma: no cover
    sys.exit("use: python -m fusedconvlstm bench")
