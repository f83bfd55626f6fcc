"""Launch configurations of the ``cuda`` LSTM kernels and the choice between them, on the CPU:
the layout chosen for a problem and its arithmetic, the configurations refused and why, overrides
from the environment, and which path (persistent, cluster or step-wise kernels) serves a call,
with its reasons."""

from __future__ import annotations

import pytest
import torch

from fusedconvlstm import backends
from fusedconvlstm.cuda import lstm as cuda_lstm
from fusedconvlstm.cuda import persistent as cuda_persistent
from fusedconvlstm.cuda import persistent_config as pc
from fusedconvlstm.cuda import planning as cuda_planning
from fusedconvlstm.cuda.constants import padded_reduction
from fusedconvlstm.numerics.recurrence import fp32_recurrence_allows_tf32
from tests.cuda_lstm_helpers import CAN_BUILD, F64, op_inputs, recurrence_call

# =============================================================================================
# Launch configurations


@pytest.mark.parametrize("kind", pc.KINDS)
@pytest.mark.parametrize(
    "dtype, batch, recurrences, hidden",
    [
        (torch.bfloat16, 1, 1, 512),
        (torch.bfloat16, 64, 2, 512),
        (torch.float16, 256, 1, 512),
        (torch.bfloat16, 4096, 2, 512),
        (torch.float32, 3, 1, 100),
        (torch.float32, 129, 2, 320),
        (torch.float16, 1024, 1, 768),
    ],
)
def test_chosen_configuration_fits_and_covers_the_problem(kind, dtype, batch, recurrences, hidden):
    for limits in (pc.H100_SXM, pc.A100):
        layout = pc.choose_config(kind, batch, recurrences, hidden, dtype, limits)
        assert isinstance(layout, pc.Layout), layout
        assert layout.fits(limits)
        assert layout.hs * layout.nu >= hidden and layout.hs * (layout.nu - 1) < hidden
        assert layout.bt * layout.nbt >= batch and layout.bt * (layout.nbt - 1) < batch
        assert 1 <= layout.nbg <= layout.nbt
        assert layout.grid == recurrences * layout.nbg * layout.nu
        k = hidden if kind == "forward" else 4 * hidden
        assert layout.kp == padded_reduction(k, dtype.itemsize) and (layout.kp * dtype.itemsize) % 32 == 0


def test_layout_matches_the_kernel_arithmetic():
    # Forward, bf16, H = 100: kp = 112; 8 units x 4 gates per warp row; rows padded by 16 bytes.
    lay = pc.make_layout("forward", 4, 2, 2, 2, 3, 300, 2, 100, torch.bfloat16)
    assert (lay.hs, lay.bt, lay.nu, lay.nbt, lay.kp) == (16, 64, 7, 5, 112)
    lda = 112 * 2 + 16
    assert lay.smem == 64 * lda + 64 * lda + 2 * 64 * (64 + 4) * 4
    assert lay.grid == 2 * 3 * 7
    # Backward, fp32, H = 100: the reduction runs over 4H = 400 columns of dG (already 8-aligned).
    lay = pc.make_layout("backward", 1, 4, 1, 2, 1, 5, 1, 100, torch.float32)
    assert (lay.hs, lay.bt, lay.nu, lay.nbt, lay.kp) == (64, 8, 2, 1, 400)
    assert lay.smem == 64 * (1600 + 16) + 8 * (1600 + 16) + 2 * 8 * 68 * 4


def test_configurations_that_do_not_fit_are_refused_with_reasons():
    reason = pc.choose_config("backward", 64, 1, 2048, torch.bfloat16, pc.H100_SXM)
    assert isinstance(reason, str) and "shared memory" in reason and "2048" in reason
    reason = pc.choose_config("forward", 64, 1, 2048, torch.bfloat16, pc.H100_SXM)
    assert isinstance(reason, str) and "resident" in reason
    with pytest.raises(ValueError, match="nt must be 1 or 4"):
        pc.make_layout("forward", 2, 1, 1, 8, 1, 8, 1, 64, torch.float16)
    with pytest.raises(ValueError, match="float16, bfloat16 or float32"):
        pc.make_layout("forward", 1, 1, 1, 8, 1, 8, 1, 64, torch.float64)


def test_configuration_override_from_the_environment(monkeypatch):
    monkeypatch.setenv(pc.ENV_OVERRIDE["forward"], "4,2,1,4,2")
    lay = pc.choose_config("forward", 64, 1, 256, torch.bfloat16, pc.H100_SXM)
    assert lay.args == (4, 2, 1, 4, 2)
    monkeypatch.setenv(pc.ENV_OVERRIDE["forward"], "1,8,1,1,1")
    with pytest.raises(ValueError, match="does not fit"):
        pc.choose_config("forward", 8, 1, 1024, torch.float32, pc.H100_SXM)  # 256 W rows of 4 KiB
    monkeypatch.setenv(pc.ENV_OVERRIDE["forward"], "1,2")
    with pytest.raises(ValueError, match="nt,wm,wn,wk,nbg"):
        pc.choose_config("forward", 8, 1, 64, torch.float32, pc.H100_SXM)


def test_cluster_configuration_at_the_reference_shape():
    # bf16, H = 512: 32 units per block (128 W rows of 1040 bytes) in clusters of 16 blocks.
    lay = pc.choose_config(pc.CLUSTER, 64, 2, 512, torch.bfloat16, pc.H100_SXM)
    assert isinstance(lay, pc.Layout), lay
    assert lay.kind == pc.CLUSTER and lay.fits(pc.H100_SXM)
    assert lay.nu <= pc.MAX_CLUSTER_BLOCKS and lay.hs * lay.nu >= 512 and lay.hs * (lay.nu - 1) < 512
    assert lay.nbg == lay.nbt and lay.bt * lay.nbt >= 64 and lay.grid == 2 * lay.nbt * lay.nu
    assert len(lay.args) == 4 and "clusters of" in lay.describe()
    for batch, hidden, dtype in ((1, 512, torch.float16), (8, 100, torch.float32), (1024, 256, torch.bfloat16)):
        lay = pc.choose_config(pc.CLUSTER, batch, 1, hidden, dtype, pc.H100_SXM)
        assert isinstance(lay, pc.Layout) and lay.fits(pc.H100_SXM), (batch, hidden, dtype, lay)


def test_cluster_layout_matches_the_kernel_arithmetic():
    # Two h tiles (the exchanged state is double-buffered in shared memory); one tile per cluster.
    lay = pc.make_layout(pc.CLUSTER, 1, 4, 2, 1, None, 64, 2, 512, torch.bfloat16)
    lda = 512 * 2 + 16
    assert (lay.hs, lay.bt, lay.nu, lay.nbt, lay.nbg, lay.kp) == (32, 16, 16, 4, 4, 512)
    staging = 32 * 16 * 2 + 5 * 32 * 16 * 4  # the step's y and workspace
    assert lay.smem == 128 * lda + 2 * 16 * lda + 1 * 16 * (128 + 4) * 4 + staging
    assert lay.grid == 2 * 4 * 16
    with pytest.raises(ValueError, match="one batch tile per cluster"):
        pc.make_layout(pc.CLUSTER, 1, 4, 2, 1, 1, 64, 2, 512, torch.bfloat16)


def test_cluster_configurations_that_do_not_fit_are_refused_with_reasons():
    reason = pc.choose_config(pc.CLUSTER, 64, 1, 512, torch.bfloat16, pc.A100)
    assert isinstance(reason, str) and "compute capability 9.0" in reason
    # fp32 at H = 512: the widest slice that fits (16 units) would need clusters of 32 blocks.
    reason = pc.choose_config(pc.CLUSTER, 64, 1, 512, torch.float32, pc.H100_SXM)
    assert isinstance(reason, str) and "clusters of 32 blocks" in reason and "at most 16" in reason
    reason = pc.choose_config(pc.CLUSTER, 64, 1, 4096, torch.bfloat16, pc.H100_SXM)
    assert isinstance(reason, str) and "4096" in reason


def test_cluster_configuration_override_from_the_environment(monkeypatch):
    monkeypatch.setenv(pc.ENV_OVERRIDE[pc.CLUSTER], "1,4,2,1")
    lay = pc.choose_config(pc.CLUSTER, 64, 2, 512, torch.bfloat16, pc.H100_SXM)
    assert lay.args == (1, 4, 2, 1) and lay.nbg == lay.nbt == 4
    monkeypatch.setenv(pc.ENV_OVERRIDE[pc.CLUSTER], "1,1,1,8")  # 8-unit slices: clusters of 64
    with pytest.raises(ValueError, match="clusters of 64 blocks"):
        pc.choose_config(pc.CLUSTER, 64, 2, 512, torch.bfloat16, pc.H100_SXM)
    monkeypatch.setenv(pc.ENV_OVERRIDE[pc.CLUSTER], "1,4,2,1,4")
    with pytest.raises(ValueError, match="'nt,wm,wn,wk'"):
        pc.choose_config(pc.CLUSTER, 64, 2, 512, torch.bfloat16, pc.H100_SXM)


# =============================================================================================
# Which path serves a call


def test_check_names_the_cluster_forward_kernel_where_it_served():
    from fusedconvlstm import validate

    for served, label in (
        ({}, "cuda"),
        ({"cooperative": 2}, "cuda"),
        ({"cluster": 1}, "cuda (cluster forward)"),
        ({"input": 1}, "cuda (in-kernel input projection)"),
    ):
        with pc.counting_forward_kernels() as counter:
            for name, n in served.items():
                for _ in range(n):
                    pc.count_forward_kernel(name)
        assert dict(counter) == served
        assert validate._label("cuda", counter) == label
    pc.count_forward_kernel("cluster")  # outside any block: counted nowhere
    assert not pc._FORWARD_KERNEL_COUNTERS


def test_forward_kernel_preference_from_the_environment(monkeypatch):
    h100 = pc.H100_SXM
    ref_shape = recurrence_call(B=64, D=2, H=512, dtype=torch.bfloat16)
    assert cuda_lstm.preferred_forward_kernel() == "cooperative"
    assert cuda_persistent.forward_kernel_name(ref_shape, h100) == "cooperative"
    monkeypatch.setenv(pc.FORWARD_KERNEL_ENV, "cluster")
    assert cuda_lstm.persistent_plan(ref_shape, "forward", h100).kind == pc.CLUSTER
    assert cuda_lstm.persistent_plan(ref_shape, "backward", h100).kind == "backward"  # no cluster backward
    assert cuda_persistent.forward_kernel_name(ref_shape, h100) == "cluster"
    text = cuda_lstm.describe(ref_shape, h100)
    assert text.startswith("forward: cluster kernel") and "backward: persistent kernel" in text
    # Where the cluster kernel does not fit, the cooperative one serves, and explain says why.
    fp32 = recurrence_call(B=64, H=512, dtype=torch.float32)
    assert cuda_persistent.forward_kernel_name(fp32, h100) == "cooperative"
    assert "the preferred cluster kernel does not take it: hidden size 512" in cuda_lstm.describe(fp32, h100)
    assert cuda_persistent.forward_kernel_name(ref_shape, pc.A100) == "cooperative"
    assert cuda_persistent.forward_kernel_name(recurrence_call(dtype=F64), h100) == "stepwise"
    monkeypatch.setenv(pc.FORWARD_KERNEL_ENV, "fastest")
    with pytest.raises(ValueError, match="FUSEDCONVLSTM_LSTM_FWD_KERNEL must be one of"):
        cuda_lstm.preferred_forward_kernel()


def test_persistent_path_decisions_and_reasons():
    h100 = pc.H100_SXM
    assert (
        cuda_persistent.persistent_why_not(recurrence_call(B=64, D=2, H=512, dtype=torch.bfloat16), "forward", h100)
        is None
    )
    assert (
        cuda_persistent.persistent_why_not(recurrence_call(B=64, D=2, H=512, dtype=torch.bfloat16), "backward", h100)
        is None
    )
    assert "float64" in cuda_persistent.persistent_why_not(recurrence_call(dtype=F64), "forward", h100)
    # A projected call runs the kernels on its unprojected form (numerics.projection): same plan.
    assert cuda_lstm.persistent_plan(recurrence_call(P=4), "forward", h100) == cuda_lstm.persistent_plan(
        recurrence_call(), "forward", h100
    )
    old = pc.DeviceLimits(80, 65536, 65536, (7, 5))
    assert "compute capability 8.0" in cuda_persistent.persistent_why_not(recurrence_call(), "forward", old)
    assert "CUDA devices" in cuda_persistent.persistent_why_not(
        recurrence_call(), "forward"
    )  # a CPU call, no limits given
    assert "shared memory" in cuda_persistent.persistent_why_not(
        recurrence_call(H=2048, dtype=torch.bfloat16), "backward", h100
    )


def test_cuda_backend_serves_projections_and_describes_its_schedule(monkeypatch):
    impl = backends.implementation("lstm_recurrence", "cuda")
    assert impl.why_not(recurrence_call(P=4)) is None
    assert impl.why_not(recurrence_call(dtype=F64)) is None  # float64 runs step-wise
    text = cuda_lstm.describe(recurrence_call(B=64, D=2, H=512, dtype=torch.bfloat16), pc.H100_SXM)
    assert text.startswith("forward: persistent kernel") and "backward: persistent kernel" in text
    text = cuda_lstm.describe(recurrence_call(dtype=F64), pc.H100_SXM)
    assert text.count("step-wise kernels") == 2 and "float64" in text
    text = cuda_lstm.describe(recurrence_call(B=8, H=2048, dtype=torch.bfloat16), pc.H100_SXM)
    assert "forward: step-wise" in text and "backward: step-wise" in text


@pytest.mark.skipif(not CAN_BUILD, reason="the cuda backend needs the extension")
def test_explain_detail_names_the_kernels_for_a_cuda_call(monkeypatch):
    monkeypatch.setattr(pc, "_device_limits", lambda index: pc.H100_SXM)
    call = recurrence_call(T=45, B=64, D=2, H=512, dtype=torch.bfloat16, device="cuda")
    detail = backends.explain("lstm_recurrence", call, call.device, detail=True)
    assert detail["cuda"].startswith("serves: forward: persistent kernel"), detail["cuda"]
    assert detail["reference"] == "serves: this call"
    f64 = recurrence_call(dtype=F64, device="cuda")
    assert "step-wise kernels" in backends.explain("lstm_recurrence", f64, f64.device, detail=True)["cuda"]
    proj = recurrence_call(P=4, device="cuda")
    text = backends.explain("lstm_recurrence", proj, proj.device, detail=True)["cuda"]
    assert text.startswith("serves: forward: persistent kernel") and "proj_size 4" in text
    assert backends.explain("lstm_recurrence", proj, proj.device)["reference"] is None  # the default form is unchanged


def test_fp32_precision_follows_the_cudnn_rnn_flag():
    rnn = torch.backends.cudnn.rnn
    saved = rnn.fp32_precision
    try:
        rnn.fp32_precision = "tf32"
        assert fp32_recurrence_allows_tf32()
        assert "TF32" in cuda_lstm.describe(recurrence_call(B=8, H=64), pc.H100_SXM)
        rnn.fp32_precision = "ieee"
        assert not fp32_recurrence_allows_tf32()
        assert "3xTF32" in cuda_lstm.describe(recurrence_call(B=8, H=64), pc.H100_SXM)
    finally:
        rnn.fp32_precision = saved


def test_registered_forward_and_backward_pick_a_path_per_call(monkeypatch):
    """With a device that fits, float32 goes persistent and float64 step-wise, separately for
    forward and backward (here on CPU tensors, through the ops' CPU implementations)."""
    taken = []
    for name in (
        "lstm_recurrence_persistent_forward",
        "lstm_recurrence_stepwise_forward",
        "lstm_recurrence_persistent_backward",
        "lstm_recurrence_stepwise_backward",
    ):
        original = getattr(cuda_lstm, name)
        monkeypatch.setattr(cuda_lstm, name, lambda *a, _n=name, _f=original, **k: taken.append(_n) or _f(*a, **k))
    monkeypatch.setattr(cuda_planning, "limits_for", lambda call, limits: pc.H100_SXM)
    for dtype, path in ((torch.float32, "persistent"), (F64, "stepwise")):
        taken.clear()
        xg, w, h0, c0, _ = op_inputs(4, 2, 1, 6, dtype)
        y, hn, cn, ws = cuda_lstm.lstm_recurrence_cuda_forward(xg, w, [], h0, c0, None, [False])
        cuda_lstm.lstm_recurrence_cuda_backward(
            torch.ones_like(y), torch.ones_like(hn), torch.ones_like(cn), xg, w, [], h0, c0, None, [False], y, ws
        )
        assert taken == [f"lstm_recurrence_{path}_forward", f"lstm_recurrence_{path}_backward"]


def test_forward_kernel_counting_blocks_nest():
    """Each open block counts the calls made while it is open, nested blocks included, and each
    closes its own counter (two counters with equal counts are still two)."""
    with pc.counting_forward_kernels() as outer:
        with pc.counting_forward_kernels() as inner:
            pc.count_forward_kernel("cooperative")  # both now hold the same counts
        pc.count_forward_kernel("cluster")
        assert dict(inner) == {"cooperative": 1}
    assert dict(outer) == {"cooperative": 1, "cluster": 1}
    assert not pc._FORWARD_KERNEL_COUNTERS
