"""The CPU contract of the ``cuda`` backend's LSTM ops: the extension registers a CUDA kernel
for every kernel-level op; schemas, fake tensors and opcheck of the ops on their CPU
implementations; the buffers, launch arguments and inputs they refuse as the GPU kernels do."""

from __future__ import annotations

import pytest
import torch

import fusedconvlstm
from fusedconvlstm.cuda import lstm as cuda_lstm
from fusedconvlstm.cuda.persistent_ops import OPS as PERSISTENT_OPS
from tests.cuda_lstm_helpers import (
    CAN_BUILD,
    F64,
    cluster_forward_args,
    op_inputs,
    persistent_backward_args,
    persistent_forward_args,
)

KERNEL_OPS = ("lstm_cell_forward_", "lstm_cell_backward_", *PERSISTENT_OPS)


# =============================================================================================
# The build and the op schemas


@pytest.mark.skipif(not CAN_BUILD, reason="no nvcc or no CUDA build of torch: the extension is not expected")
@pytest.mark.parametrize("op", KERNEL_OPS)
def test_extension_registers_cuda_kernel_for_every_kernel_op(op):
    assert fusedconvlstm._extension.unavailable_reason() is None
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedconvlstm::{op}", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedconvlstm::{op}", "CPU")


@pytest.mark.parametrize("op", PERSISTENT_OPS)
def test_persistent_op_schemas_mutate_their_outputs(op):
    schema = getattr(torch.ops.fusedconvlstm, op).default._schema
    mutated = {a.name for a in schema.arguments if a.alias_info is not None and a.alias_info.is_write}
    expected = {
        "lstm_persistent_forward_": {"h_buf", "c_state", "y", "workspace", "sync"},
        "lstm_cluster_forward_": {"h_buf", "c_state", "y", "workspace"},
        "lstm_persistent_forward_from_input_": {"h_buf", "c_state", "y", "workspace", "sync"},
        "lstm_persistent_backward_": {"dh_carry", "dc", "dgates", "g_buf", "sync"},
    }[op]
    assert mutated == expected
    assert not schema.returns


def test_persistent_ops_run_on_fake_tensors():
    from torch._subclasses.fake_tensor import FakeTensorMode

    fwd = persistent_forward_args(4, 3, 2, 5, dtype=torch.float32)
    bwd = persistent_backward_args(fwd)
    cluster = cluster_forward_args(fwd)
    with FakeTensorMode() as mode:
        for op, args in (
            ("lstm_persistent_forward_", fwd),
            ("lstm_cluster_forward_", cluster),
            ("lstm_persistent_backward_", bwd),
        ):
            fake = [mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args]
            assert getattr(torch.ops.fusedconvlstm, op)(*fake) is None


def test_persistent_ops_opcheck_on_cpu():
    T, B, D, H = 4, 3, 2, 5
    lengths = torch.tensor([4, 2, 0])
    fwd = persistent_forward_args(T, B, D, H, lengths=lengths)
    torch.library.opcheck(torch.ops.fusedconvlstm.lstm_persistent_forward_.default, fwd)
    torch.ops.fusedconvlstm.lstm_persistent_forward_(*fwd)
    bwd = persistent_backward_args(fwd, lengths)
    torch.library.opcheck(torch.ops.fusedconvlstm.lstm_persistent_backward_.default, bwd)
    torch.library.opcheck(torch.ops.fusedconvlstm.lstm_cluster_forward_.default, cluster_forward_args(fwd))


# =============================================================================================
# What the ops and drivers refuse


def test_persistent_ops_cpu_contract_rejects_wrong_buffers():
    args = list(persistent_forward_args(3, 2, 1, 5, reverse=(False,)))
    args[10] = torch.zeros(2, 1, 2, 5, dtype=F64)  # h_buf without the padding to a whole k-step
    with pytest.raises(ValueError, match="h_buf must have shape"):
        torch.ops.fusedconvlstm.lstm_persistent_forward_(*args)
    args = list(persistent_forward_args(3, 2, 1, 5, reverse=(False,)))
    args[6] = 3  # wk: wm * wn * wk != 8
    with pytest.raises(ValueError, match="wm \\* wn \\* wk must be 8"):
        torch.ops.fusedconvlstm.lstm_persistent_forward_(*args)


def test_cluster_op_cpu_contract_refuses_clusters_the_gpu_refuses():
    fwd = persistent_forward_args(2, 3, 1, 512, reverse=(False,))
    with pytest.raises(ValueError, match="at most 16 form a cluster"):
        torch.ops.fusedconvlstm.lstm_cluster_forward_(*cluster_forward_args(fwd, config=(1, 1, 1, 8)))
    torch.ops.fusedconvlstm.lstm_cluster_forward_(*cluster_forward_args(fwd, config=(1, 4, 1, 2)))  # 16 blocks


def test_cell_ops_take_the_gemm_results_in_the_accumulation_dtype():
    T, B, D, H = 2, 3, 1, 4
    xg = torch.randn(T, B, D, 4 * H, dtype=torch.bfloat16)
    h, c = torch.zeros(D, B, H, dtype=torch.bfloat16), torch.zeros(D, B, H)
    y, ws = torch.empty(T, B, D, H, dtype=torch.bfloat16), torch.empty(T, B, D, 5 * H)
    rounded = torch.zeros(D, B, 4 * H, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="hh must be torch.float32"):
        torch.ops.fusedconvlstm.lstm_cell_forward_(rounded, xg, h, c, y, ws, None, 0, 0)
    dgates, dstep = torch.empty_like(xg), torch.empty(D, B, 4 * H, dtype=torch.bfloat16)
    with pytest.raises(TypeError, match="dh_rec must be torch.float32"):
        torch.ops.fusedconvlstm.lstm_cell_backward_(
            h, y, ws, h, torch.zeros(D, B, H), torch.zeros(D, B, H), dgates, dstep, None, 0, 0
        )


@pytest.mark.parametrize("path", ["persistent", "stepwise"])
def test_drivers_refuse_projections_they_would_ignore(path):
    """The drivers run unprojected recurrences; only the registered implementation (which
    reparametrizes first, numerics.projection) takes w_hr."""
    xg, w, h0, c0, _ = op_inputs(3, 2, 1, 4, torch.float32)
    forward = getattr(cuda_lstm, f"lstm_recurrence_{path}_forward")
    with pytest.raises(ValueError, match="w_hr must be empty"):
        forward(xg, w, [torch.randn(2, 4)], h0[..., :2], c0, None, [False])
