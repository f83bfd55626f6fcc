"""Benchmark the reference model's Conv1d stack on the ``triton`` backend against cuDNN (GPU only).

Cases (DESIGN.md §4 vocabulary), batch 256, 100 steps, 100 -> 200 -> 200 -> 256 -> 256 -> 512:

- ``conv1d_stack`` ``fwd`` and ``fwd+bwd``: the op (fused and per-layer strategies) against the
  ``nn.Conv1d`` chain on cuDNN *including* the two transposes a ``(B, T, C)`` model pays, and
  against ``torch.compile`` of that chain;
- ``conv1d_stack_proj`` ``fwd``: the projection op (stack + 512 -> 4096 input projection of
  both LSTMs, time-major gates) against the fused stack followed by a separate GEMM, and
  against the cuDNN chain followed by the GEMM.

Timing: ``triton.testing.do_bench`` (CUDA events, median after warm-up), inputs rotated over
several buffers so the timed call does not find them in L2, each measurement taken twice (the
spread is recorded). Errors: relative to a float64 run of the same inputs. One JSON object per
line goes to ``benchmarks/results/<date>_<gpu>_conv1d_stack.jsonl``.

Usage: ``python benchmarks/bench_conv1d_stack.py [--dtype bf16 fp16 fp32] [--batch 256]``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import subprocess
from pathlib import Path

import torch
import torch.nn.functional as F
import triton
import triton.testing

import fusedconvlstm
from fusedconvlstm.triton import conv1d_stack as triton_backend

CHANNELS = [100, 200, 200, 256, 256, 512]
STRIDES = [1, 1, 1, 1, 2]
SEQ = 100
PROJ = 4096
ROTATE = 8
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
BASELINE_NAMES = {torch.bfloat16: "cudnn_bf16", torch.float16: "cudnn_fp16", torch.float32: "cudnn_fp32_tf32"}


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    return float((out.double() - ref.double()).norm() / ref.double().norm())


def _time(fn, args_list) -> tuple[float, float]:
    """Median ms of two do_bench runs, cycling through the argument sets."""
    it = [0]

    def call():
        fn(*args_list[it[0] % len(args_list)])
        it[0] += 1

    return tuple(triton.testing.do_bench(call, warmup=50, rep=300, return_mode="median") for _ in range(2))


def _chain(x_btc, weights, biases):
    """The cuDNN model: channels-first Conv1d chain with the transposes a (B, T, C) model pays."""
    h = x_btc.transpose(1, 2)
    for w, b, s in zip(weights, biases, STRIDES):
        h = F.conv1d(h, w, b, stride=s)
    return h.transpose(1, 2).contiguous()


def _ours(x, weights, biases):
    return fusedconvlstm.conv1d_stack(x, weights, biases, stride=STRIDES, backend="triton")


def bench_dtype(name: str, B: int, device: torch.device, meta: dict) -> list[dict]:
    """All cases in one dtype; returns the result rows."""
    rows: list[dict] = []
    dtype = DTYPES[name]
    torch.manual_seed(0)
    w64 = [
        torch.randn(co, ci, 3, dtype=torch.float64, device=device) / (3 * ci) ** 0.5
        for ci, co in zip(CHANNELS, CHANNELS[1:])
    ]
    b64 = [torch.randn(co, dtype=torch.float64, device=device) for co in CHANNELS[1:]]
    pw64 = torch.randn(PROJ, CHANNELS[-1], dtype=torch.float64, device=device) / CHANNELS[-1] ** 0.5
    pb64 = torch.randn(PROJ, dtype=torch.float64, device=device)
    xs64 = [torch.randn(B, SEQ, CHANNELS[0], dtype=torch.float64, device=device) for _ in range(ROTATE)]
    w = [t.to(dtype) for t in w64]
    b = [t.to(dtype) for t in b64]
    pw, pb = pw64.to(dtype), pb64.to(dtype)
    xs = [t.to(dtype) for t in xs64]
    ref = _chain(xs64[0], w64, b64)
    ref_proj = F.linear(ref.transpose(0, 1), pw64, pb64)
    compiled = torch.compile(_chain)

    def record(op, backend, baseline, pass_, ours_ms, base_ms, err, **extra):
        row = dict(meta, op=op, backend=backend, baseline=baseline, dtype=name, **{"pass": pass_})
        row.update(
            median_ms=ours_ms[0],
            median_ms_repeat=ours_ms[1],
            baseline_median_ms=base_ms[0],
            baseline_median_ms_repeat=base_ms[1],
            speedup=base_ms[0] / ours_ms[0],
            max_rel_err=err,
            **extra,
        )
        rows.append(row)
        print(json.dumps(row))

    # forward
    with torch.no_grad():
        cudnn_fwd = _time(lambda x: _chain(x, w, b), [(x,) for x in xs])
        compile_fwd = _time(lambda x: compiled(x, w, b), [(x,) for x in xs])
        for strategy in ("fused", "layers"):
            os.environ[triton_backend.STRATEGY_ENV_VAR] = strategy
            err = _rel_err(_ours(xs[0], w, b), ref)
            ours = _time(lambda x: _ours(x, w, b), [(x,) for x in xs])
            extra = dict(strategy=strategy, baseline_rel_err=_rel_err(_chain(xs[0], w, b), ref))
            record("conv1d_stack", "triton", BASELINE_NAMES[dtype], "fwd", ours, cudnn_fwd, err, **extra)
            record("conv1d_stack", "triton", "torch_compile", "fwd", ours, compile_fwd, err, strategy=strategy)
        # stack + input projection of both LSTMs
        os.environ[triton_backend.STRATEGY_ENV_VAR] = "auto"
        gates = fusedconvlstm.conv1d_stack_projection(xs[0], w, b, pw, pb, stride=STRIDES, backend="triton")
        err = _rel_err(gates, ref_proj)
        ours = _time(
            lambda x: fusedconvlstm.conv1d_stack_projection(x, w, b, pw, pb, stride=STRIDES, backend="triton"),
            [(x,) for x in xs],
        )
        then_gemm = _time(lambda x: F.linear(_ours(x, w, b).transpose(0, 1), pw, pb), [(x,) for x in xs])
        cudnn_gemm = _time(lambda x: F.linear(_chain(x, w, b).transpose(0, 1), pw, pb), [(x,) for x in xs])
        record("conv1d_stack_proj", "triton", "triton_stack_then_gemm", "fwd", ours, then_gemm, err)
        record("conv1d_stack_proj", "triton", BASELINE_NAMES[dtype], "fwd", ours, cudnn_gemm, err)

    # forward + backward
    wg = [t.clone().requires_grad_() for t in w]
    bg = [t.clone().requires_grad_() for t in b]
    xg = [x.clone().requires_grad_() for x in xs]
    gy = torch.randn(B, 45, CHANNELS[-1], dtype=dtype, device=device)

    def train_step(fn, x):
        fn(x, wg, bg).backward(gy)

    def grads(fn, x, ws, bs, dt):
        leaves = [t.detach().to(dt).requires_grad_() for t in (x, *ws, *bs)]
        out = fn(leaves[0], leaves[1:6], leaves[6:])
        return torch.autograd.grad(out, leaves, gy.to(dt))

    ref_grads = grads(_chain, xs64[0], w64, b64, torch.float64)
    cudnn_bwd = _time(lambda x: train_step(_chain, x), [(x,) for x in xg])
    for strategy in ("fused", "layers"):
        os.environ[triton_backend.STRATEGY_ENV_VAR] = strategy
        err = max(_rel_err(g, r) for g, r in zip(grads(_ours, xs[0], w, b, dtype), ref_grads))
        ours = _time(lambda x: train_step(_ours, x), [(x,) for x in xg])
        record("conv1d_stack", "triton", BASELINE_NAMES[dtype], "fwd+bwd", ours, cudnn_bwd, err, strategy=strategy)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtype", nargs="+", default=["bf16", "fp16", "fp32"], choices=list(DTYPES))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results")
    parser.add_argument("--device", default="cuda", help=argparse.SUPPRESS)  # "cpu": smoke test under the interpreter
    args = parser.parse_args()
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_conv1d_stack: needs a CUDA GPU")
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    meta = dict(
        commit=_commit(),
        device=gpu,
        torch=torch.__version__,
        cuda=torch.version.cuda,
        cudnn=torch.backends.cudnn.version() if device.type == "cuda" else None,
        triton=triton.__version__,
        batch=args.batch,
        seq=SEQ,
        hidden=CHANNELS[-1],
    )
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = datetime.date.today().isoformat()
    path = args.out / f"{stamp}_{gpu.replace(' ', '_')}_conv1d_stack.jsonl"
    rows: list[dict] = []
    for name in args.dtype:
        rows += bench_dtype(name, args.batch, device, meta)
    with path.open("a") as f:
        for row in rows:
            f.write(json.dumps(row) + "\n")
    print(f"wrote {len(rows)} rows to {path}")


if __name__ == "__main__":
    main()
