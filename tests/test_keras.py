"""Keras checkpoint import (``fusedconvlstm.keras``: ``load_classifier`` and the single-layer
``lstm_from_keras_weights`` / ``conv1d_stack_from_keras_weights``).

- Keras 3 (torch backend) builds small models of the architecture; the imported model must
  match Keras's own ``predict``. Keras is a test-only dependency: those tests skip without it.
- Keras 2 files (``CuDNNLSTM`` and ``LSTM``, full model and weights only) are written here with
  h5py exactly as Keras 2 lays them out, and the imported model is checked against a float64
  NumPy forward pass of Keras's standard-LSTM math on weights converted by an independent copy
  of Keras's ``_convert_rnn_weights`` (``keras/engine/saving.py``).
- Checkpoints of another architecture must raise an error naming the first layer that does not fit.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
import zipfile
from dataclasses import asdict
from pathlib import Path

import pytest

np = pytest.importorskip("numpy")
import torch

from fusedconvlstm.keras import (
    KerasImportError,
    conv1d_stack_from_keras_weights,
    load_classifier,
    lstm_from_keras_weights,
    lstm_weights_from_keras,
)
from fusedconvlstm.models import ClassifierConfig, count_parameters
from fusedconvlstm.passmark import rel_err
from tests.helpers import assert_close_rel

# Keras 3 on NumPy 2 warns about its own array conversions.
pytestmark = pytest.mark.filterwarnings("ignore::DeprecationWarning:keras.*")

h5py = pytest.importorskip(
    "h5py", exc_type=ImportError, reason="h5py is needed to read Keras checkpoints (pip install h5py)"
)

# Small sizes of the architecture; D (last conv) != H so a transposed gate slice cannot pass for
# a reshaped one.
V, E, T, B = 31, 6, 13, 3
CHANNELS, STRIDES = (5, 5, 6, 6, 7), (1, 1, 1, 1, 2)
H, DENSE = 4, 3
# fp32 Keras vs fp32 torch on the same inputs: the same operations in a different order.
FP32_TOL = 1e-5
# float64 import vs float64 NumPy.
FP64_TOL = 1e-10


# --------------------------------------------------------------------------------------------
# An independent NumPy model: Keras's standard layers and Keras's CuDNN -> LSTM conversion.
# --------------------------------------------------------------------------------------------


def keras_convert_cudnn_lstm(kernel, recurrent_kernel, bias):
    """Keras 2's ``_convert_rnn_weights`` for CuDNNLSTM -> LSTM (gates i, f, c, o): each gate's
    input kernel ``k.T.reshape(k.shape, order='F')``, each recurrent kernel ``k.T``, and the
    input and recurrent biases summed."""

    def transform_kernels(kernels, func):
        return np.hstack([func(k) for k in np.hsplit(kernels, 4)])

    k = transform_kernels(kernel, lambda k: k.T.reshape(k.shape, order="F"))
    r = transform_kernels(recurrent_kernel, lambda k: k.T)
    b = np.sum(np.split(bias, 2, axis=0), axis=0)
    return k, r, b


def np_sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def np_lstm_last_h(x, kernel, recurrent_kernel, bias):
    """Keras's standard LSTM (sigmoid gates, tanh), the last h: ``x (B, T, D)``."""
    units = recurrent_kernel.shape[0]
    h = np.zeros((x.shape[0], units))
    c = np.zeros_like(h)
    for t in range(x.shape[1]):
        z = x[:, t] @ kernel + h @ recurrent_kernel + bias
        i, f, g, o = (z[:, n * units : (n + 1) * units] for n in range(4))
        c = np_sigmoid(f) * c + np_sigmoid(i) * np.tanh(g)
        h = np_sigmoid(o) * np.tanh(c)
    return h


def np_conv1d_valid(x, kernel, bias, stride):
    """Keras Conv1D, padding 'valid': ``x (B, T, C_in)``, ``kernel (k, C_in, C_out)``."""
    k = kernel.shape[0]
    t_out = (x.shape[1] - k) // stride + 1
    out = np.stack([sum(x[:, t * stride + j] @ kernel[j] for j in range(k)) for t in range(t_out)], axis=1)
    return out + bias


def np_classifier(tokens, emb, convs, lstms, dense, out):
    """Keras inference of the architecture; ``lstms`` hold standard-layout (kernel, rec, bias)."""
    x = emb[tokens]
    for (kernel, bias), stride in zip(convs, STRIDES):
        x = np_conv1d_valid(x, kernel, bias, stride)
    h = np.concatenate([np_lstm_last_h(x, *w) for w in lstms], axis=1)
    h = np.maximum(h @ dense[0] + dense[1], 0)
    return np_sigmoid(h @ out[0] + out[1])


# --------------------------------------------------------------------------------------------
# Keras 2 files, written as Keras 2.x's saving code lays them out.
# --------------------------------------------------------------------------------------------


def keras2_layers(rng, lstm_class="CuDNNLSTM", recurrent_activation="sigmoid", extra=None):
    """The layers of a Keras 2 model of the architecture, in ``model.layers`` order: dicts with
    name, class_name, config, inbound (Keras 2 inbound_nodes) and weights [(weight name, array)].
    ``extra=(index, layer)`` inserts a layer."""

    def w(*shape):
        return rng.uniform(-0.5, 0.5, shape)

    layers = [
        {"name": "input_1", "class_name": "InputLayer", "config": {"batch_input_shape": [None, T]}, "weights": []},
        {
            "name": "embedding_1",
            "class_name": "Embedding",
            "config": {"input_dim": V, "output_dim": E, "mask_zero": False},
            "weights": [("embedding_1/embeddings:0", w(V, E))],
        },
        {"name": "dropout_1", "class_name": "Dropout", "config": {"rate": 0.25}, "weights": []},
    ]
    c_in = E
    for n, (c, s) in enumerate(zip(CHANNELS, STRIDES), 1):
        layers.append(
            {
                "name": f"conv1d_{n}",
                "class_name": "Conv1D",
                "config": {
                    "filters": c,
                    "kernel_size": [3],
                    "strides": [s],
                    "padding": "valid",
                    "data_format": "channels_last",
                    "dilation_rate": [1],
                    "activation": "linear",
                    "use_bias": True,
                },
                "weights": [(f"conv1d_{n}/kernel:0", w(3, c_in, c)), (f"conv1d_{n}/bias:0", w(c))],
            }
        )
        c_in = c
    prefix = "cu_dnnlstm" if lstm_class == "CuDNNLSTM" else "lstm"
    for n in (1, 2):
        name = f"{prefix}_{n}"
        config = {"units": H, "return_sequences": False, "go_backwards": False, "stateful": False}
        if lstm_class == "LSTM":
            config.update(activation="tanh", recurrent_activation=recurrent_activation, use_bias=True)
        bias = w(8 * H) if lstm_class == "CuDNNLSTM" else w(4 * H)
        layers.append(
            {
                "name": name,
                "class_name": lstm_class,
                "config": config,
                "weights": [
                    (f"{name}/kernel:0", w(c_in, 4 * H)),
                    (f"{name}/recurrent_kernel:0", w(H, 4 * H)),
                    (f"{name}/bias:0", bias),
                ],
            }
        )
    layers += [
        {"name": "concatenate_1", "class_name": "Concatenate", "config": {"axis": -1}, "weights": []},
        {"name": "dropout_2", "class_name": "Dropout", "config": {"rate": 0.5}, "weights": []},
        {
            "name": "dense_1",
            "class_name": "Dense",
            "config": {"units": DENSE, "activation": "relu"},
            "weights": [("dense_1/kernel:0", w(2 * H, DENSE)), ("dense_1/bias:0", w(DENSE))],
        },
        {"name": "dropout_3", "class_name": "Dropout", "config": {"rate": 0.1}, "weights": []},
        {
            "name": "dense_2",
            "class_name": "Dense",
            "config": {"units": 1, "activation": "sigmoid"},
            "weights": [("dense_2/kernel:0", w(DENSE, 1)), ("dense_2/bias:0", w(1))],
        },
    ]
    if extra is not None:
        layers.insert(*extra)
    # Each layer reads the one before, except: the LSTMs read the last conv; the Concatenate
    # joins the LSTMs.
    for i, layer in enumerate(layers[1:], 1):
        layer["config"]["name"] = layer["name"]
        prev = layers[i - 1]["name"]
        if layer["class_name"] in ("LSTM", "CuDNNLSTM"):
            prev = [m["name"] for m in layers if m["class_name"] == "Conv1D"][-1]
        inputs = [prev]
        if layer["class_name"] == "Concatenate":
            inputs = [m["name"] for m in layers if m["class_name"] in ("LSTM", "CuDNNLSTM")]
        layer["inbound"] = [[[name, 0, 0, {}] for name in inputs]]
    layers[0]["inbound"] = []
    return layers


def _write_weights(group, layers, split_layer_names=False):
    # keras/engine/saving.py save_weights_to_hdf5_group: names as utf8 bytes.
    names = [m["name"].encode("utf8") for m in layers]
    if split_layer_names:  # what Keras does when the list outgrows an HDF5 object header
        group.attrs["layer_names0"] = names[: len(names) // 2]
        group.attrs["layer_names1"] = names[len(names) // 2 :]
    else:
        group.attrs["layer_names"] = names
    group.attrs["backend"] = b"tensorflow"
    group.attrs["keras_version"] = b"2.2.4"
    for m in layers:
        g = group.create_group(m["name"])
        g.attrs["weight_names"] = [n.encode("utf8") for n, _ in m["weights"]]
        for n, a in m["weights"]:
            g.create_dataset(n, data=a.astype(np.float32))


def write_keras2_h5(path, layers, full_model: bool, split_layer_names=False):
    """A Keras 2 ``model.save`` (full) or ``model.save_weights`` file of ``layers``."""
    with h5py.File(path, "w") as f:
        if full_model:
            f.attrs["keras_version"] = b"2.2.4"
            f.attrs["backend"] = b"tensorflow"
            config = {
                "class_name": "Model",
                "config": {
                    "name": "model_1",
                    "layers": [
                        {
                            "name": m["name"],
                            "class_name": m["class_name"],
                            "config": m["config"],
                            "inbound_nodes": m["inbound"],
                        }
                        for m in layers
                    ],
                    "input_layers": [["input_1", 0, 0]],
                    "output_layers": [[layers[-1]["name"], 0, 0]],
                },
            }
            f.attrs["model_config"] = json.dumps(config).encode("utf8")
            f.attrs["training_config"] = json.dumps({"loss": "binary_crossentropy"}).encode("utf8")
            _write_weights(f.create_group("model_weights"), layers, split_layer_names)
        else:
            _write_weights(f, layers, split_layer_names)


def np_reference(layers, tokens):
    """float64 NumPy output for Keras 2 ``layers`` (CuDNNLSTMs converted as Keras converts them)."""
    weights = {m["name"]: [a for _, a in m["weights"]] for m in layers}
    kinds = {m["name"]: m["class_name"] for m in layers}
    convs = [weights[n] for n, k in kinds.items() if k == "Conv1D"]
    lstms = []
    for n, k in kinds.items():
        if k == "CuDNNLSTM":
            lstms.append(keras_convert_cudnn_lstm(*weights[n]))
        elif k == "LSTM":
            lstms.append(weights[n])
    dense, out = (weights[n] for n, k in kinds.items() if k == "Dense")
    emb = weights["embedding_1"][0]
    return np_classifier(tokens, emb, convs, lstms, dense, out)


def _f32(layers):
    # The file stores float32; the NumPy reference starts from the same rounded values.
    for m in layers:
        m["weights"] = [(n, a.astype(np.float32).astype(np.float64)) for n, a in m["weights"]]
    return layers


@pytest.fixture
def rng():
    return np.random.default_rng(1234)


@pytest.fixture
def tokens(rng):
    return rng.integers(0, V, (B, T))


# --------------------------------------------------------------------------------------------
# Keras 2 layouts
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("full_model", [True, False], ids=["full-model", "weights-only"])
def test_keras2_cudnnlstm_h5_matches_keras_conversion(tmp_path, rng, tokens, full_model):
    layers = _f32(keras2_layers(rng, "CuDNNLSTM"))
    path = tmp_path / "model.h5"
    write_keras2_h5(path, layers, full_model=full_model, split_layer_names=not full_model)
    model = load_classifier(path, backend="reference", dtype=torch.float64)
    assert not model.training
    cfg = model.config
    assert (cfg.vocab_size, cfg.embedding_dim, cfg.conv_channels, cfg.conv_strides) == (V, E, CHANNELS, STRIDES)
    assert (cfg.hidden_size, cfg.num_lstms, cfg.dense_size) == (H, 2, DENSE)
    out = model(torch.from_numpy(tokens))
    ref = torch.from_numpy(np_reference(layers, tokens))
    assert_close_rel(out, ref, FP64_TOL, "CuDNNLSTM h5 vs Keras conversion")
    # The reference (nn.LSTM) twin carries the same weights.
    assert_close_rel(model.to_reference()(torch.from_numpy(tokens)), ref, FP64_TOL, "reference twin")


def test_keras2_cudnnlstm_naive_transpose_would_be_caught(rng, tokens):
    """The test above can fail: the naive ``K.T`` mapping of a CuDNNLSTM kernel gives other outputs."""
    layers = _f32(keras2_layers(rng, "CuDNNLSTM"))
    lstm = next(m for m in layers if m["class_name"] == "CuDNNLSTM")
    k, r, b = (a for _, a in lstm["weights"])
    right = keras_convert_cudnn_lstm(k, r, b)
    x = rng.standard_normal((B, 5, k.shape[0]))
    # Naive: W_ih = K.T, W_hh = R.T, i.e. Keras's standard math on K and R as stored.
    naive = np_lstm_last_h(x, k, r, b[: 4 * H] + b[4 * H :])
    assert np.abs(naive - np_lstm_last_h(x, *right)).max() > 1e-3


def test_lstm_from_keras_weights_cudnn_and_standard(rng):
    D = 7
    k, r, b8 = rng.uniform(-0.5, 0.5, (D, 4 * H)), rng.uniform(-0.5, 0.5, (H, 4 * H)), rng.uniform(-0.5, 0.5, 8 * H)
    x = rng.standard_normal((B, 9, D))
    cudnn = lstm_from_keras_weights([k, r, b8], backend="reference", dtype=torch.float64)
    assert cudnn.batch_first and (cudnn.input_size, cudnn.hidden_size) == (D, H)
    _, (h_n, _) = cudnn(torch.from_numpy(x))
    k32, r32, b32 = (a.astype(np.float32).astype(np.float64) for a in (k, r, b8))
    ref = np_lstm_last_h(x, *keras_convert_cudnn_lstm(k32, r32, b32))
    assert_close_rel(h_n[0], torch.from_numpy(ref), FP64_TOL, "CuDNNLSTM layer")

    b4 = b8[: 4 * H]
    standard = lstm_from_keras_weights([k, r, b4], backend="reference", dtype=torch.float64)
    assert torch.count_nonzero(standard.bias_hh_l0) == 0
    _, (h_n, _) = standard(torch.from_numpy(x))
    ref = np_lstm_last_h(x, k32, r32, b4.astype(np.float32).astype(np.float64))
    assert_close_rel(h_n[0], torch.from_numpy(ref), FP64_TOL, "standard LSTM layer")

    no_bias = lstm_from_keras_weights([k, r], backend="reference")
    assert not no_bias.bias
    # The bias length must say which layout it is; forcing the other one is an error.
    with pytest.raises(KerasImportError, match="CuDNNLSTM bias"):
        lstm_weights_from_keras(k, r, b4, layout="cudnn")
    with pytest.raises(KerasImportError, match="standard LSTM bias"):
        lstm_weights_from_keras(k, r, b8, layout="standard")
    with pytest.raises(KerasImportError, match="recurrent_activation='hard_sigmoid'"):
        lstm_from_keras_weights([k, r, b4], recurrent_activation="hard_sigmoid")
    with pytest.raises(KerasImportError, match=r"recurrent_kernel must be \(units, 4 \* units\)"):
        lstm_from_keras_weights([k, r[:, :-1], b4])


@pytest.mark.parametrize("full_model", [True, False], ids=["full-model", "weights-only"])
def test_keras2_standard_lstm_h5(tmp_path, rng, tokens, full_model):
    layers = _f32(keras2_layers(rng, "LSTM"))
    path = tmp_path / "model.h5"
    write_keras2_h5(path, layers, full_model=full_model)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model = load_classifier(path, backend="reference", dtype=torch.float64)
    # A weights-only Keras 2 file cannot say whether the LSTM used hard_sigmoid: say so.
    assert any("recurrent_activation" in str(w.message) for w in caught) == (not full_model)
    for j in range(2):
        assert torch.count_nonzero(model.lstms[j].bias_hh_l0) == 0
    out = model(torch.from_numpy(tokens))
    assert_close_rel(out, torch.from_numpy(np_reference(layers, tokens)), FP64_TOL, "LSTM h5")


def test_keras2_hard_sigmoid_lstm_is_refused(tmp_path, rng):
    path = tmp_path / "model.h5"
    write_keras2_h5(path, keras2_layers(rng, "LSTM", recurrent_activation="hard_sigmoid"), full_model=True)
    with pytest.raises(KerasImportError, match=r"'lstm_1'.*recurrent_activation='hard_sigmoid'"):
        load_classifier(path)


def test_dense_rows_follow_the_first_lstm(tmp_path, rng, tokens):
    """Rows 0..H-1 of Dense(64) belong to the first LSTM: swapping the two LSTMs' weights in
    the file (and not the Dense) must change the output."""
    layers = _f32(keras2_layers(rng, "CuDNNLSTM"))
    path = tmp_path / "a.h5"
    write_keras2_h5(path, layers, full_model=False)
    first = load_classifier(path, backend="reference", dtype=torch.float64)
    a, b = (m for m in layers if m["class_name"] == "CuDNNLSTM")
    a["weights"], b["weights"] = (
        [(n.replace("_2/", "_1/"), w) for n, w in b["weights"]],
        [(n.replace("_1/", "_2/"), w) for n, w in a["weights"]],
    )
    path2 = tmp_path / "b.h5"
    write_keras2_h5(path2, layers, full_model=False)
    swapped = load_classifier(path2, backend="reference", dtype=torch.float64)
    x = torch.from_numpy(tokens)
    assert torch.equal(first.lstms[0].weight_ih_l0, swapped.lstms[1].weight_ih_l0)
    assert rel_err(first(x), swapped(x), strict=True) > 1e-6
    assert_close_rel(swapped(x), torch.from_numpy(np_reference(layers, tokens)), FP64_TOL, "swapped")


def test_keras2_concatenate_order_sets_dense_rows(tmp_path, rng, tokens):
    """A full model whose Concatenate joins [lstm 2, lstm 1]: Dense rows 0..H-1 read LSTM 2."""
    layers = _f32(keras2_layers(rng, "CuDNNLSTM"))
    concat = next(m for m in layers if m["class_name"] == "Concatenate")
    concat["inbound"] = [list(reversed(concat["inbound"][0]))]
    path = tmp_path / "swapped.h5"
    write_keras2_h5(path, layers, full_model=True)
    model = load_classifier(path, backend="reference", dtype=torch.float64)
    i, j = (k for k, m in enumerate(layers) if m["class_name"] == "CuDNNLSTM")
    layers[i], layers[j] = layers[j], layers[i]  # the NumPy model concatenates in list order
    assert_close_rel(model(torch.from_numpy(tokens)), torch.from_numpy(np_reference(layers, tokens)), FP64_TOL, "swap")


def test_overrides_and_conflicts(tmp_path, rng):
    path = tmp_path / "w.h5"
    write_keras2_h5(path, keras2_layers(rng), full_model=False)
    model = load_classifier(path, lstm_dropout=0.3, conv_strides=(1, 1, 1, 1, 2))
    assert model.config.lstm_dropout == 0.3
    with pytest.raises(KerasImportError, match="hidden_size=8 was given but the checkpoint has 4"):
        load_classifier(path, hidden_size=8)
    with pytest.raises(TypeError, match="unknown config arguments"):
        load_classifier(path, hiden_size=4)
    # The full model's config records the dropout rates.
    full = tmp_path / "full.h5"
    write_keras2_h5(full, keras2_layers(rng), full_model=True)
    cfg = load_classifier(full).config
    assert (cfg.embedding_dropout, cfg.lstm_dropout, cfg.dense_dropout) == (0.25, 0.5, 0.1)


# --------------------------------------------------------------------------------------------
# Wrong architectures: the error names the first layer that does not fit.
# --------------------------------------------------------------------------------------------


def _bad(rng, case):
    layers = keras2_layers(rng)
    if case == "extra-layer":
        norm = {"name": "batch_normalization_1", "class_name": "BatchNormalization", "config": {}}
        norm["inbound"] = [[["conv1d_2", 0, 0, {}]]]
        norm["weights"] = [(f"batch_normalization_1/{n}:0", rng.standard_normal(5)) for n in ("gamma", "beta")]
        layers.insert(5, norm)
        return layers, "batch_normalization_1"
    if case == "relu-conv":
        layers[5]["config"]["activation"] = "relu"
        return layers, "conv1d_3"
    if case == "conv-channels":
        name, k = layers[6]["weights"][0]
        layers[6]["weights"][0] = (name, rng.standard_normal((3, k.shape[1] + 1, k.shape[2])))
        return layers, "conv1d_4"
    if case == "lstm-units":
        lstm = layers[9]
        lstm["weights"] = [
            (n, rng.standard_normal((a.shape[0], 4 * (H + 1)) if a.ndim == 2 else 8 * (H + 1)))
            for n, a in lstm["weights"]
        ]
        return layers, "cu_dnnlstm_2"
    if case == "return-sequences":
        layers[8]["config"]["return_sequences"] = True
        return layers, "cu_dnnlstm_1"
    if case == "missing-head":
        return layers[:-2], "dense_1"
    raise AssertionError(case)


BAD_CASES = ["extra-layer", "relu-conv", "conv-channels", "lstm-units", "return-sequences", "missing-head"]


@pytest.mark.parametrize("case", BAD_CASES)
def test_wrong_architecture_names_the_layer(tmp_path, rng, case):
    layers, culprit = _bad(rng, case)
    full_model = case in ("extra-layer", "relu-conv", "return-sequences")  # these need the config
    path = tmp_path / "bad.h5"
    write_keras2_h5(path, layers, full_model=full_model)
    with pytest.raises(KerasImportError, match=f"'{culprit}'"):
        load_classifier(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "x.h5"
    path.write_bytes(b"not hdf5")
    with pytest.raises(KerasImportError, match="not an HDF5 file"):
        load_classifier(path)


def test_missing_h5py_is_explained(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "h5py", None)
    with pytest.raises(ImportError, match="pip install h5py"):
        load_classifier(tmp_path / "x.h5")


def test_importing_the_package_imports_neither_h5py_nor_keras():
    """``fusedconvlstm.keras`` is a leaf: ``import fusedconvlstm`` loads none of it, and it loads
    h5py only to read a file."""
    code = (
        "import sys, fusedconvlstm; "
        "assert not {'h5py', 'keras', 'fusedconvlstm.keras'} & set(sys.modules), sorted(sys.modules); "
        "import fusedconvlstm.keras; "
        "assert not {'h5py', 'keras'} & set(sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=Path(__file__).resolve().parents[1])


def test_conv1d_stack_from_keras_weights_matches_numpy(rng):
    kernels = [rng.standard_normal((3, 4, 5)), rng.standard_normal((2, 5, 6))]
    biases = [rng.standard_normal(5), rng.standard_normal(6)]
    stack = conv1d_stack_from_keras_weights(
        [[kernels[0], biases[0]], [kernels[1], biases[1]]], strides=[1, 2], backend="reference", dtype=torch.float64
    )
    assert stack.channels_last
    x = rng.standard_normal((B, 11, 4))
    k32 = [k.astype(np.float32).astype(np.float64) for k in kernels]
    b32 = [b.astype(np.float32).astype(np.float64) for b in biases]
    ref = np_conv1d_valid(np_conv1d_valid(x, k32[0], b32[0], 1), k32[1], b32[1], 2)
    assert_close_rel(stack(torch.from_numpy(x)), torch.from_numpy(ref), FP64_TOL, "Conv1dStack")
    with pytest.raises(KerasImportError, match=r"weights\[1\] kernel reads 5 channels but the layer before gives 4"):
        conv1d_stack_from_keras_weights([[kernels[0][:, :, :4]], [kernels[1]]])


# --------------------------------------------------------------------------------------------
# Keras 3 (torch backend): outputs of Keras's own predict.
# --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keras():
    os.environ["KERAS_BACKEND"] = "torch"
    try:
        import keras
    except ImportError:
        pytest.skip("keras is not installed (test-only dependency: pip install keras)")
    if keras.backend.backend() != "torch":
        pytest.skip(f"keras was imported with the {keras.backend.backend()} backend; these tests need torch")
    return keras


def build_keras3(keras, seed=0, swap_concat=False, recurrent_activation="sigmoid", conv_activation="linear"):
    """A Keras 3 model of the architecture with random weights (biases included)."""
    L = keras.layers
    inp = keras.Input((T,), dtype="int32")
    x = L.Dropout(0.25)(L.Embedding(V, E)(inp))
    for c, s in zip(CHANNELS, STRIDES):
        x = L.Conv1D(c, 3, strides=s, activation=conv_activation)(x)
    a = L.LSTM(H, recurrent_activation=recurrent_activation)(x)
    b = L.LSTM(H)(x)
    h = L.Dropout(0.5)(L.Concatenate()([b, a] if swap_concat else [a, b]))
    h = L.Dropout(0.1)(L.Dense(DENSE, activation="relu")(h))
    model = keras.Model(inp, L.Dense(1, activation="sigmoid")(h))
    rng = np.random.default_rng(seed)
    model.set_weights([rng.uniform(-0.5, 0.5, w.shape).astype(np.float32) for w in model.get_weights()])
    return model


@pytest.fixture(scope="module")
def keras3_files(keras, tmp_path_factory):
    d = tmp_path_factory.mktemp("keras3")
    model = build_keras3(keras)
    files = {"weights": d / "m.weights.h5", "archive": d / "m.keras", "legacy-h5": d / "m.h5"}
    model.save_weights(files["weights"])
    model.save(files["archive"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model.save(files["legacy-h5"])
    x = np.random.default_rng(7).integers(0, V, (5, T)).astype(np.int32)
    return files, x, model.predict(x, verbose=0)


@pytest.mark.parametrize("kind", ["weights", "archive", "legacy-h5"])
def test_keras3_matches_keras_predict(keras3_files, kind):
    files, x, expected = keras3_files
    model = load_classifier(files[kind], backend="reference")
    assert model.config.conv_strides == STRIDES and model.config.hidden_size == H
    out = model(torch.from_numpy(x).long())
    assert_close_rel(out, torch.from_numpy(expected), FP32_TOL, f"Keras 3 {kind}")
    assert_close_rel(model.to_reference()(torch.from_numpy(x).long()), torch.from_numpy(expected), FP32_TOL, "twin")


def test_keras3_archive_follows_the_concatenate_order(keras, tmp_path):
    """With a config, the Dense rows follow the Concatenate's inputs, not the creation order."""
    model = build_keras3(keras, seed=3, swap_concat=True)
    path = tmp_path / "swapped.keras"
    model.save(path)
    x = np.random.default_rng(8).integers(0, V, (4, T)).astype(np.int32)
    out = load_classifier(path, backend="reference")(torch.from_numpy(x).long())
    assert_close_rel(out, torch.from_numpy(model.predict(x, verbose=0)), FP32_TOL, "swapped concatenate")


def test_keras3_single_layers(keras, rng):
    x = rng.standard_normal((B, 9, 5)).astype(np.float32)
    lstm = keras.layers.LSTM(H, return_sequences=True)
    lstm.build(x.shape)
    lstm.set_weights([w + rng.uniform(-0.3, 0.3, w.shape).astype(np.float32) for w in lstm.get_weights()])
    expected = keras.ops.convert_to_numpy(lstm(x))
    ours = lstm_from_keras_weights(lstm.get_weights(), backend="reference")
    assert_close_rel(ours(torch.from_numpy(x))[0], torch.from_numpy(expected), FP32_TOL, "Keras 3 LSTM")

    convs = [
        keras.layers.Conv1D(6, 3, padding="causal", dilation_rate=2),
        keras.layers.Conv1D(4, 3, padding="same", activation="relu"),
        keras.layers.Conv1D(3, 2, strides=2),
    ]
    y = x
    for conv in convs:  # build, then give the biases nonzero values
        y = conv(y)
        conv.set_weights([w + rng.uniform(-0.3, 0.3, w.shape).astype(np.float32) for w in conv.get_weights()])
    y = x
    for conv in convs:
        y = conv(y)
    stack = conv1d_stack_from_keras_weights(
        [c.get_weights() for c in convs],
        strides=[1, 1, 2],
        padding=["causal", "same", "valid"],
        dilation=[2, 1, 1],
        activation=["linear", "relu", "linear"],
        backend="reference",
    )
    out = stack(torch.from_numpy(x))
    assert_close_rel(out, torch.from_numpy(keras.ops.convert_to_numpy(y)), FP32_TOL, "Keras 3 Conv1D stack")


def test_keras3_hard_sigmoid_and_relu_conv_are_refused(keras, tmp_path):
    path = tmp_path / "hard.keras"
    build_keras3(keras, recurrent_activation="hard_sigmoid").save(path)
    with pytest.raises(KerasImportError, match="recurrent_activation='hard_sigmoid'"):
        load_classifier(path)
    path = tmp_path / "relu.keras"
    build_keras3(keras, conv_activation="relu").save(path)
    config = json.loads(zipfile.ZipFile(path).read("config.json"))
    first_conv = next(m["name"] for m in config["config"]["layers"] if m["class_name"] == "Conv1D")
    with pytest.raises(KerasImportError, match=f"'{first_conv}'.*activation='relu'"):
        load_classifier(path)


def test_keras3_full_size_reference_model(keras, tmp_path):
    """The original's sizes (docs/design.md §1): 7,193,009 parameters in torch, equal outputs."""
    L = keras.layers
    inp = keras.Input((100,), dtype="int32")
    x = L.Dropout(0.25)(L.Embedding(20_000, 100)(inp))
    for c, s in zip((200, 200, 256, 256, 512), (1, 1, 1, 1, 2)):
        x = L.Conv1D(c, 3, strides=s)(x)
    h = L.Dropout(0.5)(L.Concatenate()([L.LSTM(512)(x), L.LSTM(512)(x)]))
    h = L.Dropout(0.1)(L.Dense(64, activation="relu")(h))
    model = keras.Model(inp, L.Dense(1, activation="sigmoid")(h))
    # Keras's LSTM has one bias (4H) where CuDNNLSTM and torch have two: 2 * 2048 fewer.
    assert model.count_params() == 7_193_009 - 2 * 2048
    path = tmp_path / "full.keras"
    model.save(path)
    ours = load_classifier(path, backend="reference")
    assert count_parameters(ours) == 7_193_009 and asdict(ours.config) == asdict(ClassifierConfig())
    x = np.random.default_rng(9).integers(0, 20_000, (2, 100)).astype(np.int32)
    expected = model.predict(x, verbose=0)
    assert_close_rel(ours(torch.from_numpy(x).long()), torch.from_numpy(expected), FP32_TOL, "full-size model")


def test_a_missing_checkpoint_is_named_as_missing(tmp_path):
    with pytest.raises(FileNotFoundError, match="no Keras checkpoint at .*missing.h5 \\(no such file\\)"):
        load_classifier(tmp_path / "missing.h5")
