"""The speed targets of the issues, checked against benchmark results (``fusedconvlstm report``).

Each target names the records of ``fusedconvlstm bench`` (or ``benchmarks/bench_conv1d_stack.py``)
it is judged on and the bound; :func:`evaluate` reads results files and says, per target and
matching record, what was measured and whether it meets the bound. A target with no matching
record is reported as not measured, never as met. Numbers come only from the files, so a README
table made from this output cites what was measured (docs/design.md §4).

Kinds of bound:

- ``speedup``: the record's ``speedup`` (baseline time / ours) is at least ``bound``;
- ``step_us``: our time per time step, ``median_ms * 1000 / seq``, is at most ``bound`` µs;
- ``ratio``: our time on this record over our time on the matching record of ``versus`` (an
  ``(op, backend)`` pair: same dtype, batch, seq, pass and baseline) is at most ``bound``.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass


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

    def selects(self, r: dict) -> bool:
        return (
            r.get("op") == self.op
            and r.get("pass") == self.pass_
            and r.get("dtype") in self.dtypes
            and r.get("batch") in self.batches
            and r.get("seq") in self.seqs
            and r.get("backend") == self.backend
            and (not self.baselines or r.get("baseline") in self.baselines)
        )


_CUDNN_16 = ("cudnn_bf16", "cudnn_fp16")

TARGETS: tuple[Target, ...] = (
    # Issue 3: the CUDA LSTM, reference shape (input 512, hidden 512, T = 45).
    Target(3, "fwd bf16 >= 1.5x cuDNN fp16 (persistent)", "lstm", "fwd", ("bf16",), (8, 64), "speedup", 1.5,
           baselines=("cudnn_fp16",)),
    Target(3, "fwd bf16 >= 3x cuDNN 16-bit", "lstm", "fwd", ("bf16",), (256, 1024), "speedup", 3.0,
           baselines=_CUDNN_16),
    Target(3, "fwd fp32 >= 3x cuDNN fp32", "lstm", "fwd", ("fp32",), (256, 1024), "speedup", 3.0,
           baselines=("cudnn_fp32_tf32",)),
    Target(3, "fwd per-step latency <= 1.5 us", "lstm", "fwd", ("bf16", "fp16"), (1, 8, 64), "step_us", 1.5,
           seqs=(45, 100, 1000)),
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
    Target(6, "inference >= 2x torch.compile", "model_inference", "fwd", ("bf16",), (256,), "speedup", 2.0,
           backend="auto", baselines=("torch_compile_bf16", "torch_compile_fp16")),
    Target(6, "batch-1 latency >= 3x lower than eager cuDNN", "model_inference", "fwd", ("bf16",), (1,), "speedup",
           3.0, backend="auto", baselines=_CUDNN_16),
    Target(6, "training step >= 2x eager cuDNN", "model_train_step", "fwd+bwd", ("bf16",), (256,), "speedup", 2.0,
           backend="auto", baselines=_CUDNN_16),
)  # fmt: skip


@dataclass(frozen=True)
class Verdict:
    """One target judged on one record (or on none: ``value`` is ``None``)."""

    target: Target
    record: dict | None
    value: float | None
    met: bool | None
    source: str | None

    def case(self) -> str:
        r = self.record
        if r is None:
            return "not measured"
        kernel = f", {r['lstm_forward_kernel']} kernel" if r.get("lstm_forward_kernel") else ""
        return f"{r['dtype']} B={r['batch']} T={r['seq']} vs {r['baseline']}{kernel}"

    def measured(self) -> str:
        if self.value is None:
            return "—"
        unit = {"speedup": "x", "step_us": " us", "ratio": "x the other"}[self.target.kind]
        return f"{self.value:.3g}{unit}"


def _ratio_partner(t: Target, r: dict, rows: list[tuple[dict, str]]) -> dict | None:
    op, backend = t.versus
    keys = ("dtype", "batch", "seq", "pass", "baseline", "commit")
    for other, _ in rows:
        if other.get("op") == op and other.get("backend") == backend and all(other.get(k) == r.get(k) for k in keys):
            return other
    return None


def evaluate(rows: Iterable[tuple[dict, str]], targets: Iterable[Target] = TARGETS) -> list[Verdict]:
    """Every target against every record it selects (``rows``: ``(record, source file)``)."""
    rows = list(rows)
    verdicts = []
    for t in targets:
        found = False
        for r, source in rows:
            if not t.selects(r):
                continue
            if t.kind == "speedup":
                value = float(r["speedup"])
                met = value >= t.bound
            elif t.kind == "step_us":
                value = float(r["median_ms"]) * 1000.0 / int(r["seq"])
                met = value <= t.bound
            elif t.kind == "ratio":
                other = _ratio_partner(t, r, rows)
                if other is None:
                    continue
                value = float(r["median_ms"]) / float(other["median_ms"])
                met = value <= t.bound
            else:
                raise ValueError(f"unknown target kind {t.kind!r}")
            # A fast result with an error past the pass mark does not meet anything.
            if r.get("err_within_2x_baseline") is False:
                met = False
            verdicts.append(Verdict(t, r, value, met, source))
            found = True
        if not found:
            verdicts.append(Verdict(t, None, None, None, None))
    return verdicts


def markdown(verdicts: list[Verdict]) -> str:
    """The verdicts as a Markdown table (issue, target, case, measured, met, file)."""
    lines = ["| issue | target | case | measured | met | file |", "|---|---|---|---|---|---|"]
    for v in verdicts:
        met = {True: "yes", False: "**no**", None: "—"}[v.met]
        if v.record is not None and v.record.get("err_within_2x_baseline") is False:
            met += " (error past 2x the baseline's)"
        lines.append(
            f"| {v.target.issue} | {v.target.what} | {v.case()} | {v.measured()} | {met} | {v.source or '—'} |"
        )
    return "\n".join(lines)
