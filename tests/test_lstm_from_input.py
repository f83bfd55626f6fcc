"""The forward that computes the input projection inside the persistent kernel, on the CPU.

``lstm_persistent_forward_from_input_`` (csrc/lstm_persistent_forward.cu), its driver
(:func:`fusedconvlstm.cuda.from_input.lstm_recurrence_from_input_forward`), the autograd op and
:func:`fusedconvlstm.ops.lstm.lstm_layer`, which the modules call. The kernel's index arithmetic
is checked by its model (tests/test_persistent_kernel_model.py); here the ops' CPU
implementations stand in for the kernels, and the cuda backend is made to serve CPU tensors
(``cuda_on_cpu``) so that the module path runs end to end. The GPU tests are in test_cuda_lstm_gpu.py.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

import fusedconvlstm
from fusedconvlstm import backends
from fusedconvlstm.calls.lstm import LSTMRecurrenceCall
from fusedconvlstm.cuda import from_input as cuda_from_input
from fusedconvlstm.cuda import lstm as cuda_lstm
from fusedconvlstm.cuda import persistent as cuda_persistent
from fusedconvlstm.cuda import persistent_config as pc
from fusedconvlstm.cuda import planning as cuda_planning
from fusedconvlstm.cuda.constants import SYNC_STRIDE, padded_reduction
from fusedconvlstm.numerics.recurrence import reverse_mask
from fusedconvlstm.ops.lstm import _lstm_from_input_op, lstm_layer, lstm_recurrence
from fusedconvlstm.passmark import rel_err

F64 = torch.float64
_from_input_op = torch.ops.fusedconvlstm.lstm_persistent_forward_from_input_


def _layer_inputs(T, B, D, n_in, H, dtype=F64, bias=True, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(T, B, n_in, dtype=F64, generator=g).to(dtype)
    w_ih = (0.3 * torch.randn(D * 4 * H, n_in, dtype=F64, generator=g)).to(dtype)
    b = (0.2 * torch.randn(D * 4 * H, dtype=F64, generator=g)).to(dtype) if bias else None
    w_hh = [(0.3 * torch.randn(4 * H, H, dtype=F64, generator=g)).to(dtype) for _ in range(D)]
    h0 = (0.5 * torch.randn(D, B, H, dtype=F64, generator=g)).to(dtype)
    c0 = (0.5 * torch.randn(D, B, H, dtype=F64, generator=g)).to(dtype)
    return x, w_ih, b, w_hh, h0, c0


def _gemm_then_reference(x, w_ih, b, w_hh, h0, c0, lengths, reverse):
    T, B = x.shape[:2]
    xg = F.linear(x, w_ih, b).view(T, B, len(w_hh), w_hh[0].shape[0])
    return lstm_recurrence(xg, w_hh, h0, c0, lengths=lengths, reverse=reverse, backend="reference")


@pytest.mark.parametrize(
    "T, B, D, n_in, H, lengths, reverse, bias",
    [
        (5, 3, 1, 7, 6, None, [False], True),
        (4, 9, 2, 37, 20, [4, 0, 2, 4, 1, 3, 4, 4, 2], [False, True], True),
        (3, 2, 3, 16, 5, [3, 1], [False, True, False], False),
        (1, 1, 1, 1, 1, None, [True], True),
    ],
)
def test_driver_matches_the_gemm_and_the_reference_recurrence(T, B, D, n_in, H, lengths, reverse, bias):
    x, w_ih, b, w_hh, h0, c0 = _layer_inputs(T, B, D, n_in, H, bias=bias)
    lengths = None if lengths is None else torch.tensor(lengths)
    y, h_n, c_n, ws = cuda_from_input.lstm_recurrence_from_input_forward(x, w_ih, b, w_hh, h0, c0, lengths, reverse)
    y_r, h_r, c_r = _gemm_then_reference(x, w_ih, b, w_hh, h0, c0, lengths, reverse)
    for name, got, want in (("y", y, y_r), ("h_n", h_n, h_r), ("c_n", c_n, c_r)):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=name)
    assert ws.shape == (T, B, D, 5 * H)
    # The workspace is the forward on precomputed gates': the persistent backward takes it.
    xg = F.linear(x, w_ih, b).view(T, B, D, 4 * H)
    *_, ws_gates = cuda_lstm.lstm_recurrence_persistent_forward(xg, w_hh, [], h0, c0, lengths, reverse)
    torch.testing.assert_close(ws, ws_gates, rtol=1e-12, atol=1e-12)


def test_driver_without_outputs_keeps_the_final_state():
    x, w_ih, b, w_hh, h0, c0 = _layer_inputs(4, 3, 2, 9, 8)
    full = cuda_from_input.lstm_recurrence_from_input_forward(x, w_ih, b, w_hh, h0, c0, None, [False, True])
    bare = cuda_from_input.lstm_recurrence_from_input_forward(
        x, w_ih, b, w_hh, h0, c0, None, [False, True], save_for_backward=False, write_y=False
    )
    assert bare[0].numel() == 0 and bare[3].numel() == 0
    assert torch.equal(bare[1], full[1]) and torch.equal(bare[2], full[2])


def _kernel_op_args(T=4, B=3, D=2, n_in=9, H=5, dtype=torch.float32):
    x, w_ih, b, w_hh, h0, c0 = _layer_inputs(T, B, D, n_in, H, dtype)
    layout = pc.make_layout(pc.FROM_INPUT, 1, 1, 1, 8, 1, B, D, H, dtype, input_size=n_in)
    x_pad = torch.zeros(T, B, layout.kpx, dtype=dtype)
    x_pad[..., :n_in] = x
    h_buf = torch.zeros(2, D, B, padded_reduction(H, dtype.itemsize), dtype=dtype)
    h_buf[0, :, :, :H] = h0
    return [
        x_pad,
        w_ih.view(D, 4 * H, n_in),
        b.float().view(D, 4 * H),
        torch.stack(w_hh),
        torch.tensor([4, 1, 0]),
        reverse_mask([False, True]),
        *layout.args,
        False,
        h_buf,
        c0.float().clone(),
        torch.empty(T, B, D, H, dtype=dtype),
        torch.empty(T, B, D, 5 * H),
        torch.empty(D * layout.nbg * SYNC_STRIDE, dtype=torch.int32),
    ]


def test_kernel_op_opcheck_and_fake_tensors_on_cpu():
    from torch._subclasses.fake_tensor import FakeTensorMode

    torch.library.opcheck(_from_input_op.default, _kernel_op_args())
    with FakeTensorMode() as mode:
        fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in _kernel_op_args()]
        assert _from_input_op(*fake) is None


def test_kernel_op_cpu_contract_rejects_wrong_buffers():
    args = _kernel_op_args()
    args[0] = args[0][..., :9].contiguous()  # x without the padding to a whole k-step
    with pytest.raises(ValueError, match="x must have shape"):
        _from_input_op(*args)
    args = _kernel_op_args()
    args[2] = args[2].double()  # the bias must be in the accumulation dtype
    with pytest.raises(TypeError, match="bias must be"):
        _from_input_op(*args)


def _call(T=45, B=64, D=1, H=512, P=0, dtype=torch.bfloat16):
    return LSTMRecurrenceCall(T, B, D, H, P, dtype, torch.device("cuda"), False, (False,) * D)


def test_in_kernel_projection_is_chosen_only_where_preferred(monkeypatch):
    monkeypatch.delenv(pc.FORWARD_KERNEL_ENV, raising=False)
    reason = cuda_from_input.from_input_why_not(_call(), 512)
    assert "'cooperative', not 'input'" in reason
    plan = cuda_from_input.from_input_plan(_call(D=2), 512, pc.H100_SXM)
    assert isinstance(plan, pc.Layout) and plan.kind == pc.FROM_INPUT and plan.kpx == 512
    assert plan.fits(pc.H100_SXM) and "W_ih and W_hh slices resident" in plan.describe()
    assert "proj_size" in cuda_from_input.from_input_plan(_call(P=128), 512, pc.H100_SXM)
    assert "float16, bfloat16 or float32" in cuda_from_input.from_input_plan(_call(dtype=F64), 512, pc.H100_SXM)
    too_wide = cuda_from_input.from_input_plan(_call(H=2048), 8192, pc.H100_SXM)
    assert isinstance(too_wide, str) and "shared memory" in too_wide
    monkeypatch.setenv(pc.FORWARD_KERNEL_ENV, "input")
    monkeypatch.setattr(cuda_planning, "limits_for", lambda call, limits: limits or pc.H100_SXM)
    assert cuda_from_input.from_input_why_not(_call(), 512) is None
    # Calls on precomputed gates keep the cooperative kernel under this preference.
    assert cuda_persistent.forward_kernel_name(_call(), pc.H100_SXM) == "cooperative"


def test_configuration_override_of_the_in_kernel_projection(monkeypatch):
    monkeypatch.setenv(pc.ENV_OVERRIDE[pc.FROM_INPUT], "1,1,1,8,2")
    lay = pc.choose_config(pc.FROM_INPUT, 64, 1, 256, torch.bfloat16, pc.H100_SXM, input_size=100)
    assert lay.args == (1, 1, 1, 8, 2) and lay.kpx == 112
    monkeypatch.setenv(pc.ENV_OVERRIDE[pc.FROM_INPUT], "1,8,1,1,1")
    with pytest.raises(ValueError, match="does not fit"):
        pc.choose_config(pc.FROM_INPUT, 64, 1, 4096, torch.bfloat16, pc.H100_SXM, input_size=4096)


@pytest.fixture
def cuda_on_cpu(monkeypatch):
    """The cuda backend serving CPU tensors with an H100's launch configurations: its drivers
    then run the persistent ops' CPU implementations, so the module path runs end to end. Yields
    how many forward calls each kernel served in the test."""
    monkeypatch.setattr(backends, "_cuda_why_not", lambda device: None)
    monkeypatch.setattr(cuda_planning, "limits_for", lambda call, limits: limits or pc.H100_SXM)
    monkeypatch.setenv(pc.FORWARD_KERNEL_ENV, "input")
    with pc.counting_forward_kernels() as served:
        yield served


def _module_pair(seed, n_in, H, **opts):
    torch.manual_seed(seed)
    base = nn.LSTM(n_in, H, **opts).double()
    ours = fusedconvlstm.LSTM.from_torch(nn.LSTM(n_in, H, **opts), backend="cuda")
    ours.load_state_dict(base.state_dict())
    return base, ours.float()


def _grads(module):
    return {n: p.grad for n, p in module.named_parameters()}


@pytest.mark.parametrize("packed", [False, True], ids=["padded", "packed"])
def test_module_runs_the_in_kernel_projection_with_all_gradients(cuda_on_cpu, packed):
    T, B, n_in, H = 6, 4, 10, 12
    base, ours = _module_pair(0, n_in, H, num_layers=2, bidirectional=True)
    x = torch.randn(T, B, n_in, dtype=F64)
    hx = (torch.randn(4, B, H, dtype=F64), torch.randn(4, B, H, dtype=F64))
    lengths = torch.tensor([6, 2, 5, 1])
    results = []
    for module, dtype in ((base, F64), (ours, torch.float32)):
        xin = x.to(dtype).detach().requires_grad_()
        h = tuple(t.to(dtype).detach().requires_grad_() for t in hx)
        inp = pack_padded_sequence(xin, lengths, enforce_sorted=False) if packed else xin
        out, (h_n, c_n) = module(inp, h)
        if packed:
            out = pad_packed_sequence(out)[0]
        (out.sum() + (h_n * 2).sum() + (c_n * 3).sum()).backward()
        results.append({"y": out, "h_n": h_n, "c_n": c_n, "dx": xin.grad, "dh0": h[0].grad, "dc0": h[1].grad})
        results[-1].update(_grads(module))
    assert cuda_on_cpu["input"] == 2  # one launch per layer
    want, got = results
    for name in want:
        assert rel_err(got[name], want[name], strict=True) < 1e-5, (
            f"{name}: {rel_err(got[name], want[name], strict=True):.2e}"
        )


def test_parallel_lstms_share_one_in_kernel_launch(cuda_on_cpu):
    torch.manual_seed(1)
    mods = [fusedconvlstm.LSTM(8, 6, backend="cuda") for _ in range(2)]
    x = torch.randn(5, 3, 8, requires_grad=True)
    outs = fusedconvlstm.parallel_lstm(mods, x)
    assert cuda_on_cpu["input"] == 1
    for m, (out, (h_n, _)) in zip(mods, outs):
        torch_lstm = nn.LSTM(8, 6)
        torch_lstm.load_state_dict(m.state_dict())
        with torch.no_grad():
            ref_out, (ref_h, _) = torch_lstm(x)
        torch.testing.assert_close(out, ref_out, rtol=1e-5, atol=1e-6)
        torch.testing.assert_close(h_n, ref_h, rtol=1e-5, atol=1e-6)
    sum(out.sum() for out, _ in outs).backward()
    assert x.grad is not None and all(m.weight_ih_l0.grad is not None for m in mods)


def test_from_input_op_opcheck_with_autograd(cuda_on_cpu):
    x, w_ih, b, w_hh, h0, c0 = _layer_inputs(4, 3, 2, 9, 5, torch.float32)
    args = (x, w_ih, b, w_hh, h0, c0, torch.tensor([4, 2, 0]), [False, True], "cuda")
    for t in (x, w_ih, b, *w_hh, h0, c0):
        t.requires_grad_()
    torch.library.opcheck(_lstm_from_input_op, args, {"save_for_backward": True, "write_y": True})


def test_layer_uses_the_gemm_unless_the_projection_is_preferred(cuda_on_cpu, monkeypatch):
    x, w_ih, b, w_hh, h0, c0 = _layer_inputs(4, 3, 2, 9, 5, torch.float32)
    monkeypatch.setenv(pc.FORWARD_KERNEL_ENV, "cooperative")
    y, h_n, c_n = lstm_layer(x, w_ih, b, w_hh, h0, c0, reverse=[False, True], backend="cuda")
    assert cuda_on_cpu["input"] == 0 and cuda_on_cpu["cooperative"] == 1
    monkeypatch.setenv(pc.FORWARD_KERNEL_ENV, "input")
    y2, h2, c2 = lstm_layer(x, w_ih, b, w_hh, h0, c0, reverse=[False, True], backend="cuda")
    assert cuda_on_cpu["input"] == 1
    # The projection is the same math, in fp32 inside the kernel (the GEMM's fp32 here too).
    for a, b_ in ((y, y2), (h_n, h2), (c_n, c2)):
        torch.testing.assert_close(a, b_, rtol=1e-5, atol=1e-6)
    # Other backends never take the layer from its input.
    lstm_layer(x, w_ih, b, w_hh, h0, c0, reverse=[False, True], backend="reference")
    assert cuda_on_cpu["input"] == 1
    _, _, _ = lstm_layer(x, w_ih, b, w_hh, h0, c0, reverse=[False, True], backend="cuda", return_sequence=False)
    assert cuda_on_cpu["input"] == 2
