"""The reference model (docs/design.md §1): parameter count, shapes, equality with its plain-torch twin,
and ``convert`` on models that mix the fused layers with others."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import fusedconvlstm
from fusedconvlstm import LSTM, Conv1dStack, convert
from fusedconvlstm.models import ConvLSTMClassifier, ReferenceConvLSTMClassifier, count_parameters
from fusedconvlstm.passmark import rel_err
from tests.helpers import SMALL_MODEL as SMALL
from tests.helpers import within_relative_mark

F64 = torch.float64
# The Triton tests run on CUDA tensors where a GPU is (the compiled kernels), under the interpreter
# on CPU tensors otherwise (tests/conftest.py).
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_TESTS_FOLLOW_THE_GPU = True


def test_default_model_has_the_keras_parameter_count():
    fused = ConvLSTMClassifier(device="meta")
    ref = ConvLSTMClassifier.reference(device="meta")
    assert count_parameters(fused) == 7_193_009
    assert count_parameters(ref) == 7_193_009
    assert count_parameters(fused.lstms[0]) == 2_101_248 == count_parameters(nn.LSTM(512, 512, device="meta"))


def test_default_model_output_shape():
    model = ConvLSTMClassifier(backend="reference").eval()
    tokens = torch.randint(0, 20_000, (2, 100))
    with torch.no_grad():
        p = model(tokens)
    assert p.shape == (2, 1)
    assert torch.all((p > 0) & (p < 1))


@pytest.mark.parametrize("batch", [1, 3])
def test_fused_model_equals_reference_twin_forward_and_backward(batch):
    fused = ConvLSTMClassifier(backend="reference", dtype=F64, **SMALL).eval()
    ref = fused.to_reference()
    assert isinstance(ref, ReferenceConvLSTMClassifier)
    assert all(type(m) is nn.LSTM for m in ref.lstms)
    tokens = torch.randint(0, 50, (batch, 20))
    out_f, out_r = fused.logits(tokens), ref.logits(tokens)
    assert out_f.shape == (batch, 1)
    assert rel_err(out_f, out_r, strict=True) < 1e-10
    out_f.sum().backward()
    out_r.sum().backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in fused.named_parameters():
        key = name.replace("conv.layers.", "conv.")
        assert rel_err(p.grad, ref_grads[key].grad, strict=True) < 1e-10, name


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_training_mode_fused_and_reference_twin_drop_the_same_elements(backend):
    """In training, seeded alike, the fused model (embedding dropout inside the stack op) and its
    plain twin draw the same masks, embedding and head alike: same outputs and gradients."""
    device = torch.device("cpu")
    if backend == "triton":
        pytest.importorskip("triton")
        device = DEVICE  # on a GPU machine, the compiled kernels
        if fusedconvlstm.backends.backend_why_not("triton", device) is not None:
            pytest.skip("Triton does not run on the CPU here (TRITON_INTERPRET=1 is needed)")
    dtype = F64 if backend == "reference" else torch.float32
    fused = ConvLSTMClassifier(backend=backend, dtype=dtype, device=device, **SMALL).train()
    ref = fused.to_reference()
    tokens = torch.randint(0, 50, (3, 20), device=device)
    torch.manual_seed(8)
    out_f = fused.logits(tokens)
    torch.manual_seed(8)
    out_r = ref.logits(tokens)
    tol = 1e-10 if dtype == F64 else 1e-4
    assert rel_err(out_f, out_r, strict=True) < tol
    out_f.sum().backward()
    out_r.sum().backward()
    ref_grads = dict(ref.named_parameters())
    for name, p in fused.named_parameters():
        assert rel_err(p.grad, ref_grads[name.replace("conv.layers.", "conv.")].grad, strict=True) < tol, name
    # The masks are not vacuous: the same model in evaluation mode computes something else.
    assert rel_err(fused.eval().logits(tokens), out_f, strict=True) > 1e-3


def test_reference_twin_can_drop_out_with_torch_masks():
    ref = ReferenceConvLSTMClassifier(dtype=F64, dropout_masks="torch", **SMALL).train()
    tokens = torch.randint(0, 50, (3, 20))
    torch.manual_seed(2)
    a = ref.logits(tokens)
    torch.manual_seed(2)
    fused_masks = ReferenceConvLSTMClassifier(dtype=F64, **SMALL)
    fused_masks.load_state_dict(ref.state_dict())
    torch.manual_seed(2)
    b = fused_masks.train().logits(tokens)
    assert not torch.equal(a, b)  # different generators, different masks
    with pytest.raises(ValueError, match="dropout_masks must be 'fused' or 'torch'"):
        ReferenceConvLSTMClassifier(dropout_masks="numpy", **SMALL)


def test_weights_copy_both_ways():
    ref = ConvLSTMClassifier.reference(dtype=F64, **SMALL)
    fused = ConvLSTMClassifier.from_reference(ref, backend="reference")
    back = fused.to_reference()
    for (n1, p1), (n2, p2) in zip(ref.named_parameters(), back.named_parameters()):
        assert n1 == n2 and torch.equal(p1, p2)
    tokens = torch.randint(0, 50, (2, 20))
    assert rel_err(fused.eval()(tokens), ref.eval()(tokens), strict=True) < 1e-10


def test_training_mode_dropout_is_active():
    model = ConvLSTMClassifier(backend="reference", **SMALL).train()
    tokens = torch.randint(0, 50, (4, 20))
    a, b = model(tokens), model(tokens)
    assert not torch.equal(a, b)
    model.eval()
    assert torch.equal(model(tokens), model(tokens))


def test_model_rejects_bad_tokens():
    model = ConvLSTMClassifier(backend="reference", **SMALL)
    with pytest.raises(ValueError, match="tokens must be a 2-D"):
        model(torch.randint(0, 50, (20,)))
    with pytest.raises(TypeError, match="int32 or int64"):
        model(torch.rand(2, 20))
    with pytest.raises(ValueError, match="one entry per conv layer"):
        ConvLSTMClassifier(conv_channels=(4, 4), kernel_sizes=(3,), conv_strides=(1, 1))


@pytest.mark.parametrize("cls", [ConvLSTMClassifier, ReferenceConvLSTMClassifier])
def test_short_token_sequences_are_told_the_minimum_length(cls):
    """The original sizes (five kernel-3 convs, the last of stride 2) need 11 tokens."""
    model = cls()
    assert model.config.min_tokens == 11
    model(torch.randint(1, 100, (2, 11)))
    with pytest.raises(ValueError, match="too short: 5 tokens, the model needs at least 11"):
        model(torch.randint(1, 100, (2, 5)))


def test_convert_rejects_what_is_not_a_module():
    with pytest.raises(TypeError, match="convert: model must be a torch.nn.Module, got str"):
        convert("model")


class _Mixed(nn.Module):
    """A model mixing convertible layers with others, in and outside nn.Sequential."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(30, 6)
        self.features = nn.Sequential(
            nn.Conv1d(6, 8, 3, padding=1),
            nn.ReLU(),
            nn.Dropout(0.1),
            nn.Conv1d(8, 8, 3, stride=2),
            nn.LayerNorm(5),  # not fusable: ends the chain
            nn.Conv1d(8, 5, 1),
            nn.Tanh(),
        )
        self.side_conv = nn.Conv1d(6, 6, 3, groups=2)  # grouped: left alone
        self.rnn = nn.LSTM(5, 7, num_layers=2, bidirectional=True, batch_first=True)
        self.head = nn.Linear(14, 2)

    def forward(self, tokens):
        x = self.embed(tokens).transpose(1, 2)
        x = self.features(x) + self.side_conv(x).mean()
        out, _ = self.rnn(x.transpose(1, 2))
        return self.head(out[:, -1])


def test_convert_swaps_layers_and_keeps_outputs():
    model = _Mixed().double().eval()
    converted = convert(model, backend="reference")
    assert converted is not model
    feats = list(converted.features)
    assert isinstance(feats[0], Conv1dStack) and len(feats[0].layers) == 2
    assert feats[0].activations == ["relu", "none"] and feats[0].dropouts == [0.1, 0.0]
    assert isinstance(feats[1], nn.LayerNorm)
    assert isinstance(feats[2], Conv1dStack) and feats[2].activations == ["tanh"]
    assert type(converted.side_conv) is nn.Conv1d
    assert isinstance(converted.rnn, LSTM) and converted.rnn.bidirectional
    tokens = torch.randint(0, 30, (3, 11))
    assert rel_err(converted(tokens), model(tokens), strict=True) < 1e-10
    # In place, and converting twice changes nothing more.
    again = convert(converted, backend="reference", inplace=True)
    assert again is converted and isinstance(again.features[0], Conv1dStack)


def test_convert_standalone_modules():
    lstm = nn.LSTM(4, 3)
    assert isinstance(convert(lstm), LSTM)
    conv = nn.Conv1d(4, 3, 3)
    stack = convert(conv)
    assert isinstance(stack, Conv1dStack) and not stack.channels_last
    x = torch.randn(2, 4, 9)
    assert rel_err(stack(x), conv(x), strict=True) < 1e-6


def test_package_exports():
    for name in fusedconvlstm.__all__:
        assert hasattr(fusedconvlstm, name), name


def test_model_compiles_fullgraph_and_matches_eager():
    model = ConvLSTMClassifier(backend="reference", dtype=F64, **SMALL).eval()
    tokens = torch.randint(0, 50, (3, 20))
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(tokens)
    assert rel_err(out, model(tokens), strict=True) < 1e-12
    out.sum().backward()
    assert all(p.grad is not None for p in model.parameters())


@pytest.mark.triton
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_fused_model_on_triton_matches_the_reference_twin(dtype):
    """The whole fused path on the Triton backend (tokens -> gates in one conv op, both LSTMs in
    one recurrence) against the plain-torch twin in float64: logits and every gradient within twice
    the twin's own error in the same dtype (plus 4 ulp)."""
    cfg = dict(SMALL, conv_channels=(12, 12, 16), hidden_size=8, dense_size=6)
    ref64 = ConvLSTMClassifier.reference(dtype=F64, **cfg).eval().to(DEVICE)
    tokens = torch.randint(0, 50, (3, 20), device=DEVICE)

    def run(model):
        model.zero_grad()
        out = model.logits(tokens)
        out.float().sum().backward()
        return [out] + [
            p.grad for _, p in sorted(model.named_parameters(), key=lambda kv: kv[0].replace("conv.layers.", "conv."))
        ]

    want = run(ref64)
    twin = copy.deepcopy(ref64).to(dtype)
    fused = ConvLSTMClassifier.from_reference(copy.deepcopy(ref64), backend="triton").to(dtype).eval()
    for name, got, base, w in zip(
        ["logits"] + [n for n, _ in sorted(ref64.named_parameters())], run(fused), run(twin), want
    ):
        assert within_relative_mark(got, base, w, dtype, slack_eps=4), name
