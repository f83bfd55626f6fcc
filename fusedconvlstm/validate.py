"""``fusedconvlstm check``: every available backend against the float64 reference.

For each case (an LSTM layer configuration or a Conv1d stack), each dtype and each backend that
can serve it on this machine, the fused module and the plain torch module (cuDNN on a GPU) run on
the same fresh random inputs in that dtype; both are compared with the torch module in float64
on the CPU. Outputs, final states and every gradient count. A backend passes when every tensor
passes :mod:`fusedconvlstm.passmark` (docs/design.md §3): its relative error and its largest
element error each at most ``2 ×`` torch's own in the same dtype plus one ``eps(dtype)``, no NaN
where the reference is finite. The row shows the tensor closest to (or past) its mark.
"""

from __future__ import annotations

import copy
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from fusedconvlstm import backends, passmark, records
from fusedconvlstm.calls.conv1d import Conv1dStackCall, ConvLayer, check_conv1d_stack_args
from fusedconvlstm.calls.lstm import LSTMRecurrenceCall, check_lstm_recurrence_args
from fusedconvlstm.cuda.persistent_config import counting_forward_kernels
from fusedconvlstm.nn.conv1d_stack import Conv1dStack
from fusedconvlstm.nn.lstm import LSTM

# The norm error every caller of this module used; the pass mark's own (NaN gives ``inf``).


@dataclass
class CheckResult:
    """One row of the check table."""

    op: str
    case: str
    backend: str
    dtype: str
    max_rel_err: float
    torch_rel_err: float
    tolerance: float
    worst: str
    # The worst tensor's largest element error, ours and torch's, and its mark.
    max_elem_err: float = 0.0
    torch_max_elem_err: float = 0.0
    max_elem_tolerance: float = float("inf")
    # Every tensor passes the mark (not only the worst one shown).
    all_passed: bool = True
    # The registry's op and backend of the row, and the call's features (what a validation
    # record of the row ranges over, see fusedconvlstm.records).
    call_op: str = ""
    backend_name: str = ""
    features: dict | None = None

    @property
    def passed(self) -> bool:
        return self.all_passed and self.max_rel_err <= self.tolerance and self.max_elem_err <= self.max_elem_tolerance


@dataclass
class _Case:
    op: str
    name: str
    make_torch: Callable[[], nn.Module]  # float64 CPU module
    make_fused: Callable[[nn.Module, str], nn.Module]
    make_input: Callable[[], Tensor]  # float64 CPU input
    backend_call: Callable[[nn.Module, Tensor, torch.device], object]  # for backends.explain


def _lstm_call(module: LSTM, x: Tensor, device: torch.device):
    T, B = (x.shape[1], x.shape[0]) if module.batch_first else (x.shape[0], x.shape[1])
    D = 2 if module.bidirectional else 1
    H, P = module.hidden_size, module.proj_size or module.hidden_size
    meta = dict(device="meta", dtype=x.dtype)
    call = check_lstm_recurrence_args(
        torch.empty(T, B, D, 4 * H, **meta),
        [torch.empty(4 * H, P, **meta)] * D,
        [torch.empty(P, H, **meta)] * D if module.proj_size else [],
        torch.empty(D, B, P, **meta),
        torch.empty(D, B, H, **meta),
        None,
        [False, True][:D],
    )
    return _with_device(call, device, x.dtype)


def _conv_call(module: Conv1dStack, x: Tensor, device: torch.device):
    meta = dict(device="meta", dtype=x.dtype)
    xb = torch.empty(x.shape[0], x.shape[1], x.shape[2], **meta)
    weight = [torch.empty(c.weight.shape, **meta) for c in module.layers]
    bias = [None if c.bias is None else torch.empty(c.bias.shape, **meta) for c in module.layers]
    call = check_conv1d_stack_args(
        xb,
        None,
        weight,
        bias,
        [c.stride[0] for c in module.layers],
        [p for pair in module.paddings for p in pair],
        [c.dilation[0] for c in module.layers],
        ",".join(module.activations),
    )
    return _with_device(call, device, x.dtype)


def _with_device(call, device: torch.device, dtype: torch.dtype):
    return type(call)(**{**call.__dict__, "device": device, "dtype": dtype})


def _reference_conv_stack() -> nn.Sequential:
    """The reference model's five linear convs (docs/design.md §1)."""
    chans, strides = (100, 200, 200, 256, 256, 512), (1, 1, 1, 1, 2)
    return nn.Sequential(*[nn.Conv1d(i, o, 3, stride=s) for i, o, s in zip(chans, chans[1:], strides)])


def default_cases(quick: bool = False) -> list[_Case]:
    """The cases ``check`` runs: LSTM layer options and Conv1d stacks at small sizes."""
    cases = []
    lstm_configs = [
        ("T7 B3 I16 H32", dict(input_size=16, hidden_size=32), (7, 3)),
        (
            "T5 B2 I8 H16 2-layer bidirectional batch_first",
            dict(input_size=8, hidden_size=16, num_layers=2, bidirectional=True, batch_first=True),
            (2, 5),
        ),
        (
            "T6 B4 I12 H40 P16 bidirectional proj_size",
            dict(input_size=12, hidden_size=40, bidirectional=True, proj_size=16),
            (6, 4),
        ),
        # The reference model's shape: on a GPU the multi-program persistent kernels (H > 64).
        ("T45 B64 I512 H512 (reference model)", dict(input_size=512, hidden_size=512), (45, 64)),
    ]
    if quick:
        lstm_configs = lstm_configs[:1]
    for name, cfg, shape in lstm_configs:
        feat = cfg["input_size"]
        cases.append(
            _Case(
                op="lstm",
                name=name,
                make_torch=lambda cfg=cfg: nn.LSTM(**cfg, dtype=torch.float64),
                make_fused=lambda m, b: LSTM.from_torch(m, backend=b),
                make_input=lambda shape=shape, feat=feat: torch.randn(*shape, feat, dtype=torch.float64),
                backend_call=_lstm_call,
            )
        )
    conv_configs = [
        ("B2 T20 16->24->24 k3 relu", lambda: nn.Sequential(nn.Conv1d(16, 24, 3), nn.ReLU(), nn.Conv1d(24, 24, 3))),
        (
            "B3 T31 8->12->8 k5/k3 s2 pad",
            lambda: nn.Sequential(nn.Conv1d(8, 12, 5, stride=2, padding=2), nn.GELU(), nn.Conv1d(12, 8, 3, padding=1)),
        ),
        ("B8 T100 100->200->200->256->256->512 k3 last s2 (reference model)", _reference_conv_stack),
    ]
    if quick:
        conv_configs = conv_configs[:1]
    for name, make in conv_configs:
        c_in = make()[0].in_channels
        T = int(name.split()[1][1:])
        B = int(name.split()[0][1:])
        cases.append(
            _Case(
                op="conv1d_stack",
                name=name,
                make_torch=lambda make=make: make().double(),
                make_fused=lambda m, b: Conv1dStack.from_torch(m, channels_last=True, backend=b),
                make_input=lambda B=B, T=T, c_in=c_in: torch.randn(B, T, c_in, dtype=torch.float64),
                backend_call=_conv_call,
            )
        )
    return cases


def _run(module: nn.Module, x: Tensor, channels_last_torch: bool, cotangent_seed: int) -> list[Tensor]:
    """Outputs and gradients (input, then each parameter) of ``module`` on ``x``."""
    x = x.detach().clone().requires_grad_()
    module.zero_grad(set_to_none=True)
    if channels_last_torch:  # a plain Conv1d chain takes (B, C, T)
        outs = [module(x.transpose(1, 2)).transpose(1, 2)]
    else:
        out = module(x)
        outs = [out[0], *out[1]] if isinstance(out, tuple) else [out]
    gen = torch.Generator().manual_seed(cotangent_seed)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen).to(o.device)).sum() for o in outs)
    loss.backward()
    grads = [x.grad] + [p.grad for p in module.parameters()]
    return [t.detach() for t in outs + grads]


def _names(module: nn.Module, n_outputs: int) -> list[str]:
    outs = ["output", "h_n", "c_n"][:n_outputs] if n_outputs > 1 else ["output"]
    return outs + ["grad input"] + [f"grad {n}" for n, _ in module.named_parameters()]


def check_cases(
    cases: list[_Case], device: torch.device, dtypes: list[torch.dtype], only: list[str] | None = None
) -> Iterator[CheckResult]:
    """Run every case for every dtype and every backend that can serve it; yield a row each."""
    for case in cases:
        for dtype in dtypes:
            ref64 = case.make_torch()
            x64 = case.make_input()
            seed = int(torch.randint(0, 2**31, ()))
            is_conv = case.op == "conv1d_stack"
            expected = _run(ref64, x64, is_conv, seed)
            torch_mod = copy.deepcopy(ref64).to(device=device, dtype=dtype)
            x = x64.to(device=device, dtype=dtype)
            try:
                torch_outs = _run(torch_mod, x, is_conv, seed)
            except RuntimeError as exc:  # e.g. a cuDNN without bf16 LSTM: nothing to compare with
                print(f"skipping {case.op} {case.name} {dtype}: torch itself cannot run it ({exc})")
                continue
            n_out = 3 if case.op == "lstm" else 1
            names = _names(ref64, n_out)
            for name in backends.BACKENDS:
                if only and name not in only:
                    continue
                fused = case.make_fused(copy.deepcopy(ref64), name).to(device=device, dtype=dtype)
                call = case.backend_call(fused, x, device)
                reason = backends.explain(_op_name(case.op), call, device)[name]
                if reason is not None:
                    continue
                with counting_forward_kernels() as served:
                    marks = passmark.mark_all(_run(fused, x, False, seed), torch_outs, expected, dtype, names)
                worst = passmark.worst(marks)
                yield CheckResult(
                    op=case.op,
                    case=case.name,
                    backend=_label(name, served),
                    dtype=str(dtype).removeprefix("torch."),
                    max_rel_err=worst.err,
                    torch_rel_err=worst.base_err,
                    tolerance=worst.tolerance,
                    worst=worst.name,
                    max_elem_err=worst.max_err,
                    torch_max_elem_err=worst.base_max_err,
                    max_elem_tolerance=worst.max_tolerance,
                    all_passed=passmark.all_pass(marks),
                    call_op=_op_name(case.op),
                    backend_name=name,
                    features=backends.call_features(_op_name(case.op), call),
                )


def _label(backend: str, served: Counter[str]) -> str:
    """The backend's name, with the cuda LSTM's cluster forward kernel or in-kernel input
    projection named where it ``served`` the row (``FUSEDCONVLSTM_LSTM_FWD_KERNEL`` prefers them)."""
    if "cluster" in served:
        return f"{backend} (cluster forward)"
    if "input" in served:
        return f"{backend} (in-kernel input projection)"
    return backend


def _op_name(op: str) -> str:
    return {"lstm": "lstm_recurrence", "conv1d_stack": "conv1d_stack"}[op]


def format_table(rows: list[CheckResult]) -> str:
    """A plain-text table of check results."""
    header = (
        "op",
        "case",
        "backend",
        "dtype",
        "rel err",
        "torch err",
        "tolerance",
        "max elem err",
        "torch max",
        "tolerance",
        "worst",
        "result",
    )
    lines = [
        (
            r.op,
            r.case,
            r.backend,
            r.dtype,
            f"{r.max_rel_err:.2e}",
            f"{r.torch_rel_err:.2e}",
            f"{r.tolerance:.2e}",
            f"{r.max_elem_err:.2e}",
            f"{r.torch_max_elem_err:.2e}",
            f"{r.max_elem_tolerance:.2e}",
            r.worst,
            "PASS" if r.passed else "FAIL",
        )
        for r in rows
    ]
    widths = [max(len(str(c)) for c in col) for col in zip(header, *lines)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join(
        [fmt.format(*header), fmt.format(*("-" * w for w in widths))] + [fmt.format(*line) for line in lines]
    )


def records_from_check(rows, device: torch.device, bench_rows: list[dict] | None = None) -> list[records.Record]:
    """The records one ``check`` run on a CUDA device supports: per row of a kernel backend (the
    ``cuda`` and ``triton`` backends; the ``torch`` and ``reference`` rows need none), its op,
    this GPU's architecture, the dtype and exactly the case's shape, ``correct`` as the row
    passed; ``faster`` from ``bench_rows`` (see :func:`speed_verdict`), ``None`` without them.
    Several rows of one shape (e.g. two forward kernels) make one record, correct only if all
    passed."""
    if device.type != "cuda":
        return []
    arch, name = records.arch_of(device), torch.cuda.get_device_name(device)
    grouped: dict[tuple, list] = {}
    for row in rows:
        if row.backend_name not in backends.KERNELS or row.features is None:
            continue
        key = (row.call_op, row.backend_name, row.dtype, tuple(sorted(row.features.items())))
        grouped.setdefault(key, []).append(row)
    out = []
    stamp = f"check --record, package {records.package_version()}, torch {torch.__version__}, {name}"
    for (op, backend, dtype, feats), group in grouped.items():
        features = dict(feats)
        correct = all(r.passed for r in group)
        faster, why = records.speed_verdict(op, backend, dtype, features, bench_rows or [], name)
        worst = max(group, key=lambda r: r.max_rel_err / r.tolerance if r.tolerance else float("inf"))
        source = f"{stamp}: {group[0].case}, rel err {worst.max_rel_err:.2e} (mark {worst.tolerance:.2e}); {why}"
        bounds = tuple((k, int(v), int(v)) for k, v in sorted(features.items()))
        out.append(records.Record(op, backend, arch, dtype, bounds, correct, faster if correct else None, source))
    return out


def reference_calls(device: torch.device) -> list[tuple[str, str, object]]:
    """``(op, label, call)`` of the reference model's shapes on ``device``: the LSTM 512 -> 512
    at T = 45 (batch 8 and 64), the model's two LSTMs as one recurrence, the five-conv chain and
    the model's token-to-gates stack, in each dtype ``check`` runs there."""
    dtypes = [torch.bfloat16, torch.float16, torch.float32] if device.type == "cuda" else [torch.float32]
    chans, strides = (100, 200, 200, 256, 256, 512), (1, 1, 1, 1, 2)
    layers = tuple(ConvLayer(i, o, 3, s, (0, 0), 1, "none", True) for i, o, s in zip(chans, chans[1:], strides))
    proj = ConvLayer(512, 4096, 1, 1, (0, 0), 1, "none", True, matmul=True)
    out = []
    for dtype in dtypes:
        d = records.dtype_name(dtype)
        for B in (8, 64):
            call = LSTMRecurrenceCall(45, B, 1, 512, 0, dtype, device, False, (False,), True)
            out.append(("lstm_recurrence", f"LSTM 512->512 T=45 B={B} {d}", call))
        pair = LSTMRecurrenceCall(45, 64, 2, 512, 0, dtype, device, False, (False, False), True)
        out.append(("lstm_recurrence", f"model's LSTM pair T=45 B=64 {d}", pair))
        out.append(("conv1d_stack", f"five convs B=64 T=100 {d}", Conv1dStackCall(64, 100, layers, dtype, device)))
        model = Conv1dStackCall(64, 100, layers, dtype, device, vocab_size=20_000, projection=proj)
        out.append(("conv1d_stack", f"model's tokens-to-gates stack B=64 {d}", model))
    return out


def auto_lines(device: torch.device) -> list[str]:
    """What ``auto`` picks for the reference shapes on ``device``, and why: one line each."""
    lines = []
    for op, label, call in reference_calls(device):
        name, why = backends.auto_choice(op, call, device)
        lines.append(f"{op:15s} {label}: {name} ({why})")
    return lines
