"""Production guarantees that only a GPU can show (issue 7): CUDA graphs, ``reduce-overhead``
compilation, no memory growth over many calls, and 64-bit offsets past 2³¹ elements.

All tests here are marked ``gpu`` and skip cleanly without one.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from fusedconvlstm import LSTM, Conv1dStack, backends
from fusedconvlstm.models import ConvLSTMClassifier
from fusedconvlstm.passmark import rel_err
from tests.helpers import assert_pass_mark, capture_graph

pytestmark = pytest.mark.gpu
# The package's kernels are what these tests are about: each names the backend it runs and checks
# that it served (``auto`` runs torch's kernels wherever no validation record enables ours, and a
# test of it would pass on cuDNN alone).
MODEL_BACKEND = "triton"  # the one backend with both the LSTM and the conv stack
LSTM_BACKEND = "cuda"
CONV_BACKEND = "triton"


@pytest.fixture
def served(monkeypatch):
    """The (op, backend) pairs that served the calls in the test (:func:`backends.resolve`)."""
    seen = set()
    resolve = backends.resolve

    def spy(op, backend, call, device):
        impl = resolve(op, backend, call, device)
        seen.add((op, impl.backend))
        return impl

    monkeypatch.setattr(backends, "resolve", spy)
    return seen


SMALL = dict(
    vocab_size=1000,
    embedding_dim=32,
    conv_channels=(64, 64, 128),
    kernel_sizes=(3, 3, 3),
    conv_strides=(1, 1, 2),
    hidden_size=128,
    dense_size=32,
)


def _model(dtype=torch.bfloat16):
    return ConvLSTMClassifier(backend=MODEL_BACKEND, device="cuda", dtype=dtype, **SMALL)


def _model_served(served) -> None:
    assert served == {("lstm_recurrence", MODEL_BACKEND), ("conv1d_stack", MODEL_BACKEND)}, served


def test_model_compiles_with_reduce_overhead_and_matches_eager(served):
    model = _model().eval()
    tokens = torch.randint(1, 1000, (16, 100), device="cuda")
    with torch.no_grad():
        eager = model(tokens)
        compiled = torch.compile(model, mode="reduce-overhead", fullgraph=True)
        for _ in range(3):  # warm-up runs, then the CUDA-graph replay
            out = compiled(tokens)
    assert rel_err(out, eager, strict=True) < 1e-2
    _model_served(served)


def test_cuda_graph_capture_and_replay_forward_and_backward(served):
    """The whole model's forward and backward captured once and replayed on new inputs equal an
    eager run on those inputs: every kernel launches on the current stream and allocates nothing
    the graph does not own."""
    model = _model(torch.float32).eval()
    static_tokens = torch.randint(1, 1000, (8, 100), device="cuda")
    static_labels = torch.randint(0, 2, (8, 1), device="cuda").float()
    params = list(model.parameters())

    def step():
        loss = F.binary_cross_entropy_with_logits(model.logits(static_tokens), static_labels)
        return (loss, *torch.autograd.grad(loss, params))

    graph, static_out = capture_graph(step)

    new_tokens = torch.randint(1, 1000, (8, 100), device="cuda")
    static_tokens.copy_(new_tokens)
    graph.replay()
    torch.cuda.synchronize()
    eager = step()
    for got, want in zip(static_out, eager):
        assert rel_err(got, want, strict=True) < 1e-5
    _model_served(served)


def test_cuda_graph_replays_draw_new_dropout_masks(served):
    """A training step with the fused embedding dropout, captured once: each replay draws a new
    seed on the device (new masks), and a replay equals an eager step from the same generator
    state."""
    config = {**SMALL, "lstm_dropout": 0.0, "dense_dropout": 0.0}  # only the fused dropout
    model = ConvLSTMClassifier(backend=MODEL_BACKEND, device="cuda", dtype=torch.float32, **config).train()
    tokens = torch.randint(1, 1000, (8, 100), device="cuda")

    def step():
        return model.logits(tokens)

    graph, static_out = capture_graph(step)
    torch.cuda.manual_seed(21)
    graph.replay()
    first = static_out.clone()
    graph.replay()
    assert not torch.equal(first, static_out)
    torch.cuda.manual_seed(21)
    assert rel_err(first, step(), strict=True) < 1e-5
    _model_served(served)


@pytest.mark.parametrize("module", ["lstm", "conv1d_stack", "model"])
def test_no_memory_growth_over_10000_calls(module, served):
    if module == "lstm":
        m = LSTM(64, 64, batch_first=True, device="cuda", backend=LSTM_BACKEND)
        x = torch.randn(4, 20, 64, device="cuda", requires_grad=True)

        def call():
            m(x)[0].sum().backward()
    elif module == "conv1d_stack":
        m = Conv1dStack(32, [32, 32], kernel_size=3, device="cuda", backend=CONV_BACKEND)
        x = torch.randn(4, 40, 32, device="cuda", requires_grad=True)

        def call():
            m(x).sum().backward()
    else:
        m = _model(torch.float32)
        tokens = torch.randint(1, 1000, (4, 100), device="cuda")

        def call():
            m.logits(tokens).sum().backward()

    for _ in range(50):  # caches, compiled kernels, allocator pools settle
        call()
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    for _ in range(10_000):
        call()
    torch.cuda.synchronize()
    assert torch.cuda.memory_allocated() - before <= 1 << 20  # nothing accumulates per call
    want = {"lstm": {("lstm_recurrence", LSTM_BACKEND)}, "conv1d_stack": {("conv1d_stack", CONV_BACKEND)}}
    assert served == want.get(module, {("lstm_recurrence", MODEL_BACKEND), ("conv1d_stack", MODEL_BACKEND)})


def test_conv_stack_past_2_31_elements(served):
    """An input and output of more than 2³¹ elements: offsets are 64-bit (the last sample, whose
    elements all lie past 2³¹, is checked on that sample alone against float64, within the pass
    mark of cuDNN's error there)."""
    B, T, C = 4100, 1024, 512  # 2.15e9 elements, 4.3 GB in bf16
    stack = Conv1dStack(C, [C], kernel_size=3, padding=1, device="cuda", dtype=torch.bfloat16, backend=CONV_BACKEND)
    x = torch.randn(B, T, C, device="cuda", dtype=torch.bfloat16)
    assert x.numel() > 2**31
    with torch.no_grad():
        y = stack(x)
        c = stack.layers[0]  # the stack keeps its padding itself: give it to the plain conv here
        last = F.conv1d(x[-1:].transpose(1, 2), c.weight, c.bias, padding=1).transpose(1, 2)
        w64, b64 = c.weight.double(), c.bias.double()
        last64 = F.conv1d(x[-1:].double().transpose(1, 2), w64, b64, padding=1).transpose(1, 2)
    # Per element too (the pass mark's largest-element check): a wrong 64-bit offset is local.
    assert_pass_mark(y[-1:], last, last64, torch.bfloat16, "the last sample, past 2^31")
    assert served == {("conv1d_stack", CONV_BACKEND)}


def test_lstm_past_2_31_elements(served):
    """Gate pre-activations of more than 2³¹ elements through the recurrence (inference)."""
    T, B, H = 1000, 1100, 512
    lstm = LSTM(64, H, device="cuda", dtype=torch.bfloat16, backend=LSTM_BACKEND)
    x = torch.randn(T, B, 64, device="cuda", dtype=torch.bfloat16)
    assert T * B * 4 * H > 2**31
    with torch.no_grad():
        _, (h_n, _) = lstm(x)
        _, (h_last, _) = lstm(x[:, -1:])
    assert rel_err(h_n[:, -1:], h_last, strict=True) < 1e-2
    assert served == {("lstm_recurrence", LSTM_BACKEND)}


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_cuda_autocast_behaves_like_nn_modules(dtype, served):
    """Under CUDA autocast the fused modules give the dtypes nn.LSTM / nn.Conv1d give, fp32
    parameter gradients, and errors within twice the plain modules' against float64."""
    ref = torch.nn.LSTM(64, 64, batch_first=True, device="cuda")
    fused = LSTM.from_torch(ref, backend=LSTM_BACKEND)
    chain = torch.nn.Sequential(torch.nn.Conv1d(64, 64, 3), torch.nn.Conv1d(64, 64, 3, stride=2)).cuda()
    stack = Conv1dStack.from_torch(chain, backend=CONV_BACKEND)
    x = torch.randn(8, 40, 64, device="cuda")
    with torch.autocast("cuda", dtype=dtype):
        try:
            o_ref = ref(x)[0]
        except RuntimeError as exc:  # a cuDNN without this dtype's LSTM: nothing to compare with
            pytest.skip(f"nn.LSTM cannot run under {dtype} autocast here: {exc}")
        o_fus = fused(x)[0]
        c_ref, c_fus = chain(x.transpose(1, 2)), stack(x.transpose(1, 2))
    assert {("lstm_recurrence", LSTM_BACKEND), ("conv1d_stack", CONV_BACKEND)} <= served, served
    assert o_fus.dtype == o_ref.dtype and c_fus.dtype == c_ref.dtype
    want = LSTM.from_torch(ref.double(), backend="reference")(x.double())[0]
    assert_pass_mark(o_fus, o_ref, want, dtype, "LSTM output under autocast")
    c_want = chain.double()(x.double().transpose(1, 2))
    assert_pass_mark(c_fus, c_ref, c_want, dtype, "conv stack output under autocast")
    o_fus.float().sum().backward()
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in fused.parameters())
