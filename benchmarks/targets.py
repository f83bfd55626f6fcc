"""The project's speed targets (from its issues), checked against benchmark results
(``python -m benchmarks.report``, :mod:`benchmarks.report`).

Project tooling, not part of the package: the package ships the timing (``fusedconvlstm bench``)
and the records; what the project holds itself to lives here. Each target names the records of
``fusedconvlstm bench`` (or ``benchmarks/bench_conv1d_stack.py``) it is judged on and the bound;
:func:`evaluate` reads results files and says, per target and shape, what was measured and
whether it meets the bound. Numbers come only from the files, so a README table made from this
output cites what was measured (docs/design.md §4). The judgement is the skeptical one:

- only records of a clean commit count (not ``unknown``, not ``-dirty``), and per device only the
  latest such commit (by the records' ``timestamp``, else their order in the files);
- a target names its GPU (``device``: a word of the record's device name, so an H200 record never
  counts for an H100 target) and its timing mode (``events``, ``graph`` or ``wallclock``: both
  sides of a record were timed the same way); records that preferred a kernel
  (``forward_kernel_preferred``) are experiments, not what a user gets, and are left out;
- per shape (dtype, batch, seq) the speedup is judged against the fastest baseline the target
  lists that was measured there; where the target needs several (the torch.compile modes), a
  shape missing one is incomplete, not met;
- a record without its error field, or past the pass mark (:mod:`fusedconvlstm.passmark`), fails;
  so does a case that crashed or was refused (``status``);
- a bound is met only beyond the noise: the speedup from the baseline's p10 over our p90 (or the
  median speedup over ``1 + spread`` where a record has no percentiles), times from p90.

A target with no matching record is reported as not measured, never as met.

Kinds of bound:

- ``speedup``: baseline time / ours is at least ``bound``;
- ``step_us``: our time per time step, ``ms * 1000 / seq``, is at most ``bound`` µs;
- ``ratio``: our time on this record over our time on the matching record of ``versus`` (an
  ``(op, backend)`` pair: same device, commit, timing, dtype, batch, seq, pass and baseline) is
  at most ``bound``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

# Statuses of a record that count against ours; "baseline_unavailable" is not ours to fail.
FAILED_STATUSES = ("crashed", "refused")


@dataclass(frozen=True)
class Target:
    """One bound of an issue, on the records it selects."""

    issue: int
    what: str
    op: str
    pass_: str
    dtypes: tuple[str, ...]
    batches: tuple[int, ...]
    kind: str  # "speedup", "step_us" or "ratio"
    bound: float
    backend: str = "cuda"
    baselines: tuple[str, ...] = ()  # empty: any baseline
    seqs: tuple[int, ...] = (45,)
    versus: tuple[str, str] | None = None  # (op, backend) of the ratio's denominator
    device: str = "H100"  # a word of the record's device name
    timing: str = "events"  # how both sides were timed (bench --timing)
    # Groups of baselines each of which must be measured at a shape (one name of each group).
    required: tuple[tuple[str, ...], ...] = ()
    # A word one of the baseline's recorded kernels must contain (``baseline_kernels``, by the
    # profiler): the algorithm the target names is verified, not assumed.
    baseline_kernel: str | None = None

    def selects(self, r: dict) -> bool:
        return (
            r.get("op") == self.op
            and r.get("pass") == self.pass_
            and r.get("dtype") in self.dtypes
            and r.get("batch") in self.batches
            and r.get("seq") in self.seqs
            and r.get("backend") == self.backend
            and (not self.baselines or r.get("baseline") in self.baselines)
            and on_device(r, self.device)
            and timing_of(r) == self.timing
            and r.get("forward_kernel_preferred") is None
        )


def on_device(r: dict, device: str) -> bool:
    """Whether ``device`` is a word of the record's device name (``H100`` in ``NVIDIA H100 80GB
    HBM3``, not in ``NVIDIA H200``)."""
    words = str(r.get("device", "")).replace("-", " ").upper().split()
    return device.upper() in words


def timing_of(r: dict) -> str:
    """The timing mode of a record (records before modes existed were CUDA events)."""
    timing = r.get("timing") or {}
    return timing.get("mode", "events") if isinstance(timing, dict) else "events"


def clean_commit(commit) -> bool:
    return isinstance(commit, str) and commit.strip() not in ("", "unknown") and not commit.endswith("-dirty")


_CUDNN_16 = ("cudnn_bf16", "cudnn_fp16")
# torch.compile of the reference model in each mode users run, 16-bit.
_COMPILE_MODES_16 = (
    ("torch_compile_bf16", "torch_compile_fp16"),
    ("torch_compile_reduce_overhead_bf16", "torch_compile_reduce_overhead_fp16"),
    ("torch_compile_max_autotune_bf16", "torch_compile_max_autotune_fp16"),
)

TARGETS: tuple[Target, ...] = (
    # Issue 3: the CUDA LSTM, reference shape (input 512, hidden 512, T = 45).
    Target(3, "fwd bf16 >= 1.5x cuDNN fp16 (persistent)", "lstm", "fwd", ("bf16",), (8, 64), "speedup", 1.5,
           baselines=("cudnn_fp16",), baseline_kernel="persist"),
    Target(3, "fwd bf16 >= 3x cuDNN 16-bit", "lstm", "fwd", ("bf16",), (256, 1024), "speedup", 3.0,
           baselines=_CUDNN_16),
    Target(3, "fwd fp32 >= 3x cuDNN fp32", "lstm", "fwd", ("fp32",), (256, 1024), "speedup", 3.0,
           baselines=("cudnn_fp32_tf32",)),
    Target(3, "fwd per-step latency <= 1.5 us (GPU time, CUDA-graph replay)", "lstm", "fwd", ("bf16", "fp16"),
           (1, 8, 64), "step_us", 1.5, seqs=(45, 100, 1000), timing="graph"),
    Target(3, "fwd+bwd >= 2x cuDNN", "lstm", "fwd+bwd", ("bf16",), (64, 256), "speedup", 2.0, baselines=_CUDNN_16),
    Target(3, "the pair <= 1.2x the time of one LSTM", "lstm_pair", "fwd", ("bf16", "fp16", "fp32"), (8, 64, 256),
           "ratio", 1.2, versus=("lstm", "cuda")),
    # Issue 4: the Triton conv stack, batch 256, bf16.
    Target(4, "conv stack fwd >= 2x the nn.Conv1d chain", "conv1d_stack", "fwd", ("bf16",), (256,), "speedup", 2.0,
           backend="triton", baselines=("cudnn_bf16",), seqs=(100,)),
    Target(4, "conv stack fwd+bwd >= 1.5x the nn.Conv1d chain", "conv1d_stack", "fwd+bwd", ("bf16",), (256,),
           "speedup", 1.5, backend="triton", baselines=("cudnn_bf16",), seqs=(100,)),
    Target(4, "stack + projection >= 1.3x the fused stack then a GEMM", "conv1d_stack_proj", "fwd", ("bf16",), (256,),
           "speedup", 1.3, backend="triton", baselines=("triton_stack_then_gemm",), seqs=(100,)),
    # Issue 5: the Triton LSTM.
    Target(5, "Triton LSTM >= 1.5x cuDNN bf16", "lstm", "fwd", ("bf16",), (64, 256), "speedup", 1.5,
           backend="triton", baselines=_CUDNN_16, seqs=(45, 100)),
    Target(5, "Triton LSTM fwd+bwd >= 1.5x cuDNN bf16", "lstm", "fwd+bwd", ("bf16",), (64, 256), "speedup", 1.5,
           backend="triton", baselines=_CUDNN_16, seqs=(45, 100)),
    Target(5, "Triton LSTM within 1.5x of the CUDA backend", "lstm", "fwd", ("bf16",), (64, 256), "ratio", 1.5,
           backend="triton", seqs=(45, 100), versus=("lstm", "cuda")),
    Target(5, "Triton LSTM fwd+bwd within 1.5x of the CUDA backend", "lstm", "fwd+bwd", ("bf16",), (64, 256),
           "ratio", 1.5, backend="triton", seqs=(45, 100), versus=("lstm", "cuda")),
    # Issue 6: the reference model (ours under auto: Triton conv + CUDA LSTM).
    Target(6, "inference >= 3x eager cuDNN", "model_inference", "fwd", ("bf16",), (256,), "speedup", 3.0,
           backend="auto", baselines=_CUDNN_16),
    Target(6, "inference >= 2x the fastest torch.compile mode", "model_inference", "fwd", ("bf16",), (256,),
           "speedup", 2.0, backend="auto", baselines=sum(_COMPILE_MODES_16, ()), required=_COMPILE_MODES_16),
    Target(6, "batch-1 latency >= 3x lower than eager cuDNN (back-to-back wall clock)", "model_inference", "fwd",
           ("bf16",), (1,), "speedup", 3.0, backend="auto", baselines=_CUDNN_16, timing="wallclock"),
    Target(6, "training step >= 2x eager cuDNN", "model_train_step", "fwd+bwd", ("bf16",), (256,), "speedup", 2.0,
           backend="auto", baselines=_CUDNN_16),
)  # fmt: skip


@dataclass(frozen=True)
class Verdict:
    """One target judged at one shape (or at none: ``record`` and ``value`` are ``None``).
    ``value`` is from the medians, ``margin`` the value beyond the noise the verdict used;
    ``note`` says why a verdict is not simply the comparison of the two."""

    target: Target
    record: dict | None
    value: float | None
    met: bool | None
    source: str | None
    margin: float | None = None
    note: str = ""

    def case(self) -> str:
        r = self.record
        if r is None:
            return "not measured"
        kernel = f", {r['lstm_forward_kernel']} kernel" if r.get("lstm_forward_kernel") else ""
        return (
            f"{r.get('dtype')} B={r.get('batch')} T={r.get('seq')} vs {r.get('baseline')}{kernel} "
            f"({r.get('device')}, {str(r.get('commit'))[:10]})"
        )

    def measured(self) -> str:
        if self.value is None:
            return "—"
        unit = {"speedup": "x", "step_us": " us", "ratio": "x the other"}[self.target.kind]
        text = f"{self.value:.3g}{unit}"
        if self.margin is not None:
            text += f" (beyond noise {self.margin:.3g}{unit})"
        return text


def judged_rows(rows: Iterable[tuple[dict, str]]) -> tuple[list[tuple[dict, str]], list[str]]:
    """The records a report judges: of clean commits only, and per device only the latest commit
    (latest by ``timestamp``, else by order in the files); with a line per kind left out."""
    rows = list(rows)
    notes = []
    clean = [(i, r, src) for i, (r, src) in enumerate(rows) if clean_commit(r.get("commit"))]
    if len(clean) < len(rows):
        notes.append(f"left out {len(rows) - len(clean)} record(s) of an unknown or dirty commit")
    latest: dict[str, tuple] = {}
    for i, r, _ in clean:
        key = (str(r.get("timestamp") or ""), i)
        dev = str(r.get("device"))
        if dev not in latest or key > latest[dev][0]:
            latest[dev] = (key, r.get("commit"))
    kept = [(r, src) for _, r, src in clean if r.get("commit") == latest[str(r.get("device"))][1]]
    if len(kept) < len(clean):
        notes.append(f"left out {len(clean) - len(kept)} record(s) of older commits")
    for dev, (_, commit) in sorted(latest.items()):
        notes.append(f"judged: {dev} at commit {str(commit)[:12]}")
    return kept, notes


def _failed(r: dict) -> str | None:
    """Why a record fails whatever its speed: crashed or refused, no error field, past the mark."""
    status = r.get("status", "ok")
    if status in FAILED_STATUSES:
        return f"{status}: {r.get('error') or 'no reason recorded'}"
    if "err_within_2x_baseline" not in r or r.get("err_within_2x_baseline") is None:
        return "no error field: correctness not shown"
    if r.get("err_within_2x_baseline") is not True:
        return "error past the pass mark"
    return None


def _pct(r: dict, which: str, q: str) -> float | None:
    p = r.get(which)
    if isinstance(p, dict) and p.get(q) is not None:
        return float(p[q])
    return None


def _speedup_beyond_noise(r: dict) -> float | None:
    """The baseline's p10 over our p90; without percentiles the median speedup over ``1 +
    spread``; ``None`` where the record carries no spread."""
    base_p10, ours_p90 = _pct(r, "baseline_percentiles_ms", "p10"), _pct(r, "percentiles_ms", "p90")
    if base_p10 is not None and ours_p90:
        return base_p10 / ours_p90
    if r.get("spread") is not None and r.get("speedup") is not None:
        return float(r["speedup"]) / (1.0 + float(r["spread"]))
    return None


def _ours_ms_beyond_noise(r: dict) -> float | None:
    p90 = _pct(r, "percentiles_ms", "p90")
    if p90 is not None:
        return p90
    if r.get("spread") is not None and r.get("median_ms") is not None:
        return float(r["median_ms"]) * (1.0 + float(r["spread"]))
    return None


def _ratio_partner(t: Target, r: dict, rows: list[tuple[dict, str]]) -> dict | None:
    op, backend = t.versus
    keys = ("device", "commit", "dtype", "batch", "seq", "pass", "baseline", "forward_kernel_preferred")
    for other, _ in rows:
        if (
            other.get("op") == op
            and other.get("backend") == backend
            and timing_of(other) == timing_of(r)
            and all(other.get(k) == r.get(k) for k in keys)
        ):
            return other
    return None


def _judge_shape(t: Target, group: list[tuple[dict, str]], rows: list[tuple[dict, str]]) -> Verdict:
    """One target at one shape (its records: one per baseline, or crashed ones)."""
    for r, src in group:
        why = _failed(r)
        if why is not None:
            return Verdict(t, r, None if r.get("status", "ok") != "ok" else _value(t, r, rows), False, src, note=why)
    if t.kind == "speedup":
        missing = [grp[0] for grp in t.required if not any(r.get("baseline") in grp for r, _ in group)]
        # The fastest baseline measured at this shape (its median).
        r, src = min(group, key=lambda rs: float(rs[0]["baseline_median_ms"]))
        value, margin = float(r["speedup"]), _speedup_beyond_noise(r)
        if missing:
            return Verdict(t, r, value, None, src, margin, f"incomplete: no {', '.join(missing)} at this shape")
        if t.baseline_kernel is not None:
            kernels = r.get("baseline_kernels") or []
            if not any(t.baseline_kernel in str(k).lower() for k in kernels):
                why = "no kernels recorded" if not kernels else f"none of its {len(kernels)} kernels is one"
                return Verdict(t, r, value, None, src, margin, f"baseline not verified {t.baseline_kernel}: {why}")
        if margin is None:
            return Verdict(t, r, value, False, src, note="no spread recorded: noise unknown")
        met = margin >= t.bound
        note = "" if met or value < t.bound else "within noise of the bound"
        return Verdict(t, r, value, met, src, margin, note)
    r, src = group[0]
    if t.kind == "step_us":
        value = float(r["median_ms"]) * 1000.0 / int(r["seq"])
        hi = _ours_ms_beyond_noise(r)
        if hi is None:
            return Verdict(t, r, value, False, src, note="no spread recorded: noise unknown")
        margin = hi * 1000.0 / int(r["seq"])
        met = margin <= t.bound
        return Verdict(t, r, value, met, src, margin, "" if met or value > t.bound else "within noise of the bound")
    if t.kind == "ratio":
        other = _ratio_partner(t, r, rows)
        if other is None:
            return Verdict(t, r, None, None, src, note=f"no matching {t.versus[0]} {t.versus[1]} record")
        why = _failed(other)
        if why is not None:
            return Verdict(t, r, None, False, src, note=f"the other record: {why}")
        value = float(r["median_ms"]) / float(other["median_ms"])
        hi, lo = _ours_ms_beyond_noise(r), _pct(other, "percentiles_ms", "p10")
        if lo is None and other.get("spread") is not None:
            lo = float(other["median_ms"]) / (1.0 + float(other["spread"]))
        if hi is None or lo is None:
            return Verdict(t, r, value, False, src, note="no spread recorded: noise unknown")
        margin = hi / lo
        met = margin <= t.bound
        return Verdict(t, r, value, met, src, margin, "" if met or value > t.bound else "within noise of the bound")
    raise ValueError(f"unknown target kind {t.kind!r}")


def _value(t: Target, r: dict, rows) -> float | None:
    """The median-based value of a record that ran (shown beside a failure)."""
    if t.kind == "speedup" and r.get("speedup") is not None:
        return float(r["speedup"])
    if t.kind == "step_us" and r.get("median_ms") is not None:
        return float(r["median_ms"]) * 1000.0 / int(r["seq"])
    return None


def evaluate(rows: Iterable[tuple[dict, str]], targets: Iterable[Target] = TARGETS) -> list[Verdict]:
    """Every target at every shape it selects among the judged records (:func:`judged_rows`;
    ``rows``: ``(record, source file)``): one verdict per (device, dtype, batch, seq)."""
    rows, _ = judged_rows(rows)
    verdicts = []
    for t in targets:
        groups: dict[tuple, list[tuple[dict, str]]] = {}
        for r, source in rows:
            if t.selects(r) and r.get("status", "ok") != "baseline_unavailable":
                key = (str(r.get("device")), r.get("dtype"), r.get("batch"), r.get("seq"))
                groups.setdefault(key, []).append((r, source))
        if not groups:
            verdicts.append(Verdict(t, None, None, None, None))
        for key in sorted(groups, key=str):
            verdicts.append(_judge_shape(t, groups[key], rows))
    return verdicts


def markdown(verdicts: list[Verdict]) -> str:
    """The verdicts as a Markdown table (issue, target, case, measured, met, file)."""
    lines = ["| issue | target | case | measured | met | file |", "|---|---|---|---|---|---|"]
    for v in verdicts:
        met = {True: "yes", False: "**no**", None: "—"}[v.met]
        if v.note:
            met += f" ({v.note})"
        lines.append(
            f"| {v.target.issue} | {v.target.what} | {v.case()} | {v.measured()} | {met} | {v.source or '—'} |"
        )
    return "\n".join(lines)
