"""What ``fusedconvlstm bench`` does not time for the Triton Conv1d stack (GPU; JSON lines).

``fusedconvlstm bench`` already times ``conv1d_stack`` on every serving backend against the
cuDNN chain. This script adds, at the reference model's size (100 steps, 100 -> 200 -> 200 ->
256 -> 256 -> 512, kernel 3, last stride 2):

- ``conv1d_stack``, ``fwd`` and ``fwd+bwd``: the fused-stack launch against the per-layer
  launches of the same backend (baseline ``triton_layers``);
- ``conv1d_stack_proj``, ``fwd`` and ``fwd+bwd``: the projection op (stack + the 512 -> 4096
  input projection of both LSTMs, time-major gates) against the Triton stack followed by a
  separate GEMM (``triton_stack_then_gemm``, the issue's 1.3x target) and against the cuDNN
  chain with its two transposes followed by the GEMM (``cudnn_<dtype>``).

Timing, environment and record format are :mod:`fusedconvlstm.benchmarking`'s (do_bench medians,
twice; inputs rotated; docs/design.md §4 fields). Errors are against float64 on the same inputs.

Usage: ``python benchmarks/bench_conv1d_stack.py [--dtypes bf16 fp16 fp32] [--batches 256] [--out F]``.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Callable

import torch
import torch.nn.functional as F

import fusedconvlstm
from fusedconvlstm import config, passmark
from fusedconvlstm.benchmarking import (
    MIN_ROUNDS,
    REPEATS,
    BenchRecord,
    default_output_path,
    environment,
    environment_settings,
    format_records,
    time_pair_ms,
    timing_settings,
)

CHANNELS = [100, 200, 200, 256, 256, 512]
STRIDES = [1, 1, 1, 1, 2]
SEQ = 100
PROJ = 2 * 4 * 512  # both LSTMs' gates
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
CUDNN = {"bf16": "cudnn_bf16", "fp16": "cudnn_fp16", "fp32": "cudnn_fp32_tf32"}


def _stack_triton(x, w, b, strategy):
    with config.override(conv1d_strategy=strategy):
        return fusedconvlstm.conv1d_stack(x, w, b, stride=STRIDES, backend="triton")


def _stack_cudnn(x, w, b):
    """The cuDNN model: the channels-first chain and the two transposes a (B, T, C) model pays."""
    h = x.transpose(1, 2)
    for wi, bi, s in zip(w, b, STRIDES):
        h = F.conv1d(h, wi, bi, stride=s)
    return h.transpose(1, 2).contiguous()


def _proj_op(x, w, b, pw, pb):
    with config.override(conv1d_strategy="auto"):
        return fusedconvlstm.conv1d_stack_projection(x, w, b, pw, pb, stride=STRIDES, backend="triton")


def _then_gemm(stack):
    return lambda x, w, b, pw, pb: F.linear(stack(x, w, b).transpose(0, 1), pw, pb)


class _Case:
    """Parameters in one dtype and float64, rotated inputs, and a timed step for a function."""

    def __init__(self, dtype, batch, device, proj):
        self.dtype, self.train = dtype, False
        shapes = [(co, ci, 3) for ci, co in zip(CHANNELS, CHANNELS[1:])]
        self.p64 = [torch.randn(s, dtype=torch.float64, device=device) / (s[1] * 3) ** 0.5 for s in shapes]
        self.p64 += [torch.randn(s[0], dtype=torch.float64, device=device) for s in shapes]
        if proj:
            self.p64 += [torch.randn(PROJ, CHANNELS[-1], dtype=torch.float64, device=device) / CHANNELS[-1] ** 0.5]
            self.p64 += [torch.randn(PROJ, dtype=torch.float64, device=device)]
        self.params = [p.to(dtype).requires_grad_() for p in self.p64]
        l2 = torch.cuda.get_device_properties(device).L2_cache_size if device.type == "cuda" else 0
        size = batch * SEQ * CHANNELS[0] * torch.finfo(dtype).bits // 8
        self.xs = [
            torch.randn(batch, SEQ, CHANNELS[0], dtype=dtype, device=device).requires_grad_()
            for _ in range(max(1, min(8, 2 * l2 // size + 1)))
        ]
        self.i = 0

    def args(self, params):
        w, b = params[:5], params[5:10]
        return (w, b, *params[10:])

    def step(self, fn: Callable, train: bool) -> Callable[[], object]:
        def run():
            self.i = (self.i + 1) % len(self.xs)
            with torch.set_grad_enabled(train):
                out = fn(self.xs[self.i], *self.args(self.params))
                if train:
                    out.backward(torch.ones_like(out))

        return run

    def results(self, fn: Callable, ref_fn: Callable, train: bool) -> tuple[list, list]:
        """The output (and, when training, every gradient) of ``fn`` and of the float64 ``ref_fn``."""
        x = self.xs[0].detach()
        leaves = [t.detach().requires_grad_(train) for t in (x, *self.params)]
        leaves64 = [t.detach().double().requires_grad_(train) for t in (x, *self.p64)]
        with torch.set_grad_enabled(train):
            out, ref = fn(leaves[0], *self.args(leaves[1:])), ref_fn(leaves64[0], *self.args(leaves64[1:]))
        got, want = [out.detach()], [ref.detach()]
        if train:
            gen = torch.Generator(ref.device).manual_seed(0xC07)  # one cotangent for every side
            g = torch.randn(ref.shape, generator=gen, device=ref.device, dtype=ref.dtype)
            got += list(torch.autograd.grad(out, leaves, g.to(out.dtype)))
            want += list(torch.autograd.grad(ref, leaves64, g))
        return got, want

    def marks(self, fn: Callable, base: Callable, ref_fn: Callable, train: bool) -> list:
        """Per tensor, ``fn`` against float64 beside ``base`` (:mod:`fusedconvlstm.passmark`)."""
        got, want = self.results(fn, ref_fn, train)
        base_got, _ = self.results(base, ref_fn, train)
        names = ["output"] + [f"grad {k}" for k in range(len(want) - 1)]
        return passmark.mark_all(got, base_got, want, self.xs[0].dtype, names)


def run(dtypes, batches, device, env) -> list[BenchRecord]:
    records = []
    for name in dtypes:
        for batch in batches:
            for pass_ in ("fwd", "fwd+bwd"):
                train = pass_ == "fwd+bwd"
                stack = _Case(DTYPES[name], batch, device, proj=False)
                proj = _Case(DTYPES[name], batch, device, proj=True)
                fused = lambda x, w, b: _stack_triton(x, w, b, "fused")
                layers = lambda x, w, b: _stack_triton(x, w, b, "layers")
                ref_proj = _then_gemm(_stack_cudnn)
                comparisons = [
                    ("conv1d_stack", stack, fused, "triton_layers", layers, _stack_cudnn),
                    ("conv1d_stack_proj", proj, _proj_op, "triton_stack_then_gemm", _then_gemm(fused), ref_proj),
                    ("conv1d_stack_proj", proj, _proj_op, CUDNN[name], ref_proj, ref_proj),
                ]
                for op, case, ours, baseline, base, ref in comparisons:
                    marks = case.marks(ours, base, ref, train)
                    ours_ms, base_ms = time_pair_ms(case.step(ours, train), case.step(base, train), device,
                                                    max(REPEATS["cuda"], MIN_ROUNDS))  # fmt: skip
                    rec = BenchRecord.measured(
                        env, (ours_ms, base_ms), marks, op=op, backend="triton", baseline=baseline,
                        dtype=name, batch=batch, seq=SEQ, hidden=CHANNELS[-1], pass_=pass_,
                        timing=timing_settings(device, "events", max(REPEATS["cuda"], MIN_ROUNDS)),
                        settings=environment_settings(device),
                    )  # fmt: skip
                    print(rec.to_json(), flush=True)
                    records.append(rec)
    return records


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", nargs="+", default=["bf16", "fp16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--batches", nargs="+", type=int, default=[256])
    parser.add_argument("--out", help="JSON lines file (default benchmarks/results/<date>_<device>.jsonl)")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # "cpu": a smoke run (interpreter)
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_conv1d_stack: needs a CUDA GPU")
    env = environment()
    records = run(args.dtypes, args.batches, device, env)
    print(format_records(records))
    out = args.out or default_output_path(env, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(out, "a") as f:
        f.writelines(rec.to_json() + "\n" for rec in records)
    print(f"results: {out}")


if __name__ == "__main__":
    main()
