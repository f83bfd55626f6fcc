"""Load Keras checkpoints of the reference model (docs/design.md §1) and single Keras layers.

Supported files, read with ``h5py`` (an optional dependency: ``pip install h5py``); Keras
itself is not needed:

- Keras 2 ``.h5``: a full model (``model.save``: ``model_config`` and a ``model_weights`` group)
  or weights only (``model.save_weights``), with ``CuDNNLSTM`` or ``LSTM`` layers. Keras 3's
  legacy ``.h5`` has the same layout.
- Keras 3 ``.weights.h5`` (``model.save_weights``) and ``.keras`` (a zip holding
  ``config.json`` and ``model.weights.h5``).

Weight layouts (docs/design.md §1): a Conv1D kernel ``(k, in, out)`` becomes ``permute(2, 1, 0)``; a
Dense kernel ``(in, out)`` becomes ``.T``; a standard LSTM computes ``x @ K + h @ R + b`` with
gates i, f, c, o, so ``W_ih = K.T``, ``W_hh = R.T``, ``b_ih = b``, ``b_hh = 0``; a ``CuDNNLSTM``
handed cuDNN each gate's slice of its kernels flattened as stored, so per gate
``W_ih = K[:, gH:(g+1)H].reshape(H, D)`` (a reshape, not a transpose), ``W_hh = R[:, gH:(g+1)H]``
as is, and its ``(8H,)`` bias is ``b_ih`` then ``b_hh``.

Layers are mapped in the order the file gives them, using the model config (class names, the
inputs of each layer) where the file has one and the weight names and shapes otherwise. Layers
that do not fit the architecture raise :class:`KerasImportError` naming the first such layer.
The Dense after the LSTMs reads their last h in the Concatenate's order (rows ``0..H-1`` the
first LSTM): a config gives that order; a Keras 2 weights-only file lists the layers in model
order; a Keras 3 ``.weights.h5`` lists them by name only, so its LSTMs are taken in name order
(``lstm`` before ``lstm_1``, Keras's creation order) — save a ``.keras`` file to be sure.
Weights-only files record no strides: the original's ``(1, 1, 1, 1, 2)`` is assumed for five
convolutions (pass ``conv_strides=`` otherwise), and no LSTM ``recurrent_activation``: a Keras 2
weights-only file with standard LSTMs gets a warning (Keras 2 defaulted to ``hard_sigmoid``).
"""

from __future__ import annotations

import io
import json
import re
import warnings
import zipfile
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

if TYPE_CHECKING:
    from fusedconvlstm.models.conv_lstm_classifier import ConvLSTMClassifier
    from fusedconvlstm.nn.conv1d_stack import Conv1dStack
    from fusedconvlstm.nn.lstm import LSTM

LSTM_LAYOUTS = ("auto", "cudnn", "standard")


class KerasImportError(ValueError):
    """A Keras checkpoint or layer that does not fit the module it is loaded into."""


def _require_h5py():
    try:
        import h5py
    except ImportError as e:
        raise ImportError("Reading Keras checkpoints needs h5py, which is not installed: pip install h5py") from e
    return h5py


# --------------------------------------------------------------------------------------------
# Single-layer conversions
# --------------------------------------------------------------------------------------------


def _as_tensor(a: Any, what: str) -> Tensor:
    if isinstance(a, Tensor):
        return a.detach().to("cpu", torch.float32)
    try:
        return torch.from_numpy(np.array(a, dtype=np.float32))
    except (TypeError, ValueError) as e:
        raise TypeError(f"{what} must be an array or a tensor, got {type(a).__name__}") from e


def conv1d_weight_from_keras(kernel: Any) -> Tensor:
    """Torch ``nn.Conv1d`` weight ``(out, in, k)`` from a Keras Conv1D kernel ``(k, in, out)``.

    Keras computes a cross-correlation like torch, so there is no flip.
    """
    k = _as_tensor(kernel, "Conv1D kernel")
    if k.dim() != 3:
        raise KerasImportError(f"a Conv1D kernel must be 3-D (kernel_size, in, out), got shape {tuple(k.shape)}")
    return k.permute(2, 1, 0).contiguous()


def dense_weight_from_keras(kernel: Any) -> Tensor:
    """Torch ``nn.Linear`` weight ``(out, in)`` from a Keras Dense kernel ``(in, out)``."""
    k = _as_tensor(kernel, "Dense kernel")
    if k.dim() != 2:
        raise KerasImportError(f"a Dense kernel must be 2-D (in, out), got shape {tuple(k.shape)}")
    return k.t().contiguous()


def lstm_weights_from_keras(
    kernel: Any, recurrent_kernel: Any, bias: Any | None = None, layout: str = "auto"
) -> dict[str, Tensor]:
    """``nn.LSTM`` parameters (``weight_ih_l0``, ``weight_hh_l0`` and, with a bias,
    ``bias_ih_l0``, ``bias_hh_l0``) from a Keras LSTM's ``kernel (D, 4H)``,
    ``recurrent_kernel (H, 4H)`` and ``bias``.

    ``layout`` is ``"cudnn"`` (Keras 2 ``CuDNNLSTM``, bias ``(8H,)``), ``"standard"`` (Keras
    ``LSTM``, bias ``(4H,)`` or none) or ``"auto"`` (decided by the bias: ``8H`` is cuDNN's).
    Both use the gate order i, f, c, o, which is torch's i, f, g, o.
    """
    if layout not in LSTM_LAYOUTS:
        raise ValueError(f"layout must be one of {LSTM_LAYOUTS}, got {layout!r}")
    K = _as_tensor(kernel, "LSTM kernel")
    R = _as_tensor(recurrent_kernel, "LSTM recurrent_kernel")
    if K.dim() != 2 or K.shape[1] % 4 != 0:
        raise KerasImportError(f"an LSTM kernel must be (input_size, 4 * units), got shape {tuple(K.shape)}")
    D, H = K.shape[0], K.shape[1] // 4
    if tuple(R.shape) != (H, 4 * H):
        raise KerasImportError(
            f"an LSTM recurrent_kernel must be (units, 4 * units) = {(H, 4 * H)} for a kernel of shape "
            f"{tuple(K.shape)}, got {tuple(R.shape)}"
        )
    b = None if bias is None else _as_tensor(bias, "LSTM bias")
    if b is not None and (b.dim() != 1 or b.shape[0] not in (4 * H, 8 * H)):
        raise KerasImportError(
            f"an LSTM bias must be (4 * units,) = ({4 * H},) or, for CuDNNLSTM, (8 * units,) = ({8 * H},); "
            f"got {tuple(b.shape)}"
        )
    if layout == "auto":
        layout = "cudnn" if b is not None and b.shape[0] == 8 * H else "standard"
    if layout == "cudnn":
        if b is None or b.shape[0] != 8 * H:
            got = "none" if b is None else tuple(b.shape)
            raise KerasImportError(f"a CuDNNLSTM bias must be (8 * units,) = ({8 * H},), got {got}")
        # cuDNN received each gate's (D, H) slice flattened in storage order and read it as its
        # own row-major (H, D) matrix: a reshape of the slice, not its transpose.
        w_ih = torch.cat([K[:, g * H : (g + 1) * H].reshape(H, D) for g in range(4)])
        # The recurrent slices (H, H) were handed over the same way, which for a square slice
        # read as (H_out, H_in) is the slice itself.
        w_hh = torch.cat([R[:, g * H : (g + 1) * H] for g in range(4)])
        return {
            "weight_ih_l0": w_ih.contiguous(),
            "weight_hh_l0": w_hh.contiguous(),
            "bias_ih_l0": b[: 4 * H].clone(),
            "bias_hh_l0": b[4 * H :].clone(),
        }
    if b is not None and b.shape[0] != 4 * H:
        raise KerasImportError(f"a standard LSTM bias must be (4 * units,) = ({4 * H},), got {tuple(b.shape)}")
    out = {"weight_ih_l0": K.t().contiguous(), "weight_hh_l0": R.t().contiguous()}
    if b is not None:
        out["bias_ih_l0"] = b.clone()
        out["bias_hh_l0"] = torch.zeros_like(b)
    return out


def _check_recurrent_activation(activation: str | None, where: str) -> None:
    if activation is not None and activation != "sigmoid":
        raise KerasImportError(
            f"{where} has recurrent_activation={activation!r}; torch's LSTM (and this package's) computes the "
            "gates with the exact sigmoid, so its outputs would differ. Only recurrent_activation='sigmoid' "
            "can be imported (Keras 2 defaulted to 'hard_sigmoid': retrain or fine-tune with 'sigmoid')."
        )


def lstm_from_keras_weights(
    cls: type[LSTM],
    weights: Sequence[Any],
    layout: str = "auto",
    recurrent_activation: str = "sigmoid",
    batch_first: bool = True,
    backend: str = "auto",
    device=None,
    dtype=None,
) -> LSTM:
    """Implementation of :meth:`fusedconvlstm.LSTM.from_keras_weights`."""
    weights = list(weights)
    if len(weights) not in (2, 3):
        raise KerasImportError(
            f"LSTM.from_keras_weights: weights must be [kernel, recurrent_kernel] or [kernel, recurrent_kernel, "
            f"bias] (a Keras layer's get_weights()), got {len(weights)} arrays"
        )
    _check_recurrent_activation(recurrent_activation, "LSTM.from_keras_weights")
    params = lstm_weights_from_keras(*weights, layout=layout)
    D, H = params["weight_ih_l0"].shape[1], params["weight_hh_l0"].shape[1]
    module = cls(
        D, H, bias="bias_ih_l0" in params, batch_first=batch_first, backend=backend, device=device, dtype=dtype
    )
    module.load_state_dict(params)
    return module


_KERAS_PADDING = ("valid", "same", "causal")
_KERAS_ACTIVATIONS = {"linear": "none", None: "none", "relu": "relu", "tanh": "tanh", "swish": "silu", "silu": "silu"}


def conv1d_stack_from_keras_weights(
    cls: type[Conv1dStack],
    weights: Sequence[Sequence[Any]],
    strides: int | Sequence[int] = 1,
    padding: str | Sequence[str] = "valid",
    dilation: int | Sequence[int] = 1,
    activation: str | Sequence[str] = "linear",
    channels_last: bool = True,
    backend: str = "auto",
    device=None,
    dtype=None,
) -> Conv1dStack:
    """Implementation of :meth:`fusedconvlstm.Conv1dStack.from_keras_weights`."""
    layers = [list(w) for w in weights]
    n = len(layers)
    if n == 0:
        raise KerasImportError("Conv1dStack.from_keras_weights: weights must hold at least one layer")

    def per_layer(value, name):
        if isinstance(value, (list, tuple)):
            if len(value) != n:
                raise ValueError(f"Conv1dStack.from_keras_weights: {name} must have one entry per layer ({n})")
            return list(value)
        return [value] * n

    strides, padding = per_layer(strides, "strides"), per_layer(padding, "padding")
    dilation, activation = per_layer(dilation, "dilation"), per_layer(activation, "activation")
    ws, bs, pads, acts = [], [], [], []
    c_in = None
    for i, layer in enumerate(layers):
        if len(layer) not in (1, 2):
            raise KerasImportError(
                f"Conv1dStack.from_keras_weights: weights[{i}] must be [kernel] or [kernel, bias], got {len(layer)} arrays"
            )
        w = conv1d_weight_from_keras(layer[0])
        if c_in is not None and w.shape[1] != c_in:
            raise KerasImportError(
                f"Conv1dStack.from_keras_weights: weights[{i}] kernel reads {w.shape[1]} channels but the layer "
                f"before gives {c_in}"
            )
        b = _as_tensor(layer[1], f"weights[{i}] bias") if len(layer) == 2 else None
        if b is not None and tuple(b.shape) != (w.shape[0],):
            raise KerasImportError(
                f"Conv1dStack.from_keras_weights: weights[{i}] bias must be ({w.shape[0]},), got {tuple(b.shape)}"
            )
        p, k, d = padding[i], w.shape[2], int(dilation[i])
        if p not in _KERAS_PADDING:
            raise ValueError(f"Conv1dStack.from_keras_weights: padding must be one of {_KERAS_PADDING}, got {p!r}")
        pads.append({"valid": (0, 0), "causal": (d * (k - 1), 0)}.get(p, "same"))
        if activation[i] not in _KERAS_ACTIVATIONS:
            raise ValueError(
                f"Conv1dStack.from_keras_weights: activation must be one of {sorted(a for a in _KERAS_ACTIVATIONS if a)}, "
                f"got {activation[i]!r}"
            )
        acts.append(_KERAS_ACTIVATIONS[activation[i]])
        ws.append(w)
        bs.append(b)
        c_in = w.shape[0]
    stack = cls(
        ws[0].shape[1],
        [w.shape[0] for w in ws],
        kernel_size=[w.shape[2] for w in ws],
        stride=[int(s) for s in strides],
        padding=pads,
        dilation=[int(d) for d in dilation],
        bias=[b is not None for b in bs],
        activation=acts,
        channels_last=channels_last,
        backend=backend,
        device=device,
        dtype=dtype,
    )
    with torch.no_grad():
        for conv, w, b in zip(stack.layers, ws, bs):
            conv.weight.copy_(w)
            if b is not None:
                conv.bias.copy_(b)
    return stack


# --------------------------------------------------------------------------------------------
# Reading checkpoint files
# --------------------------------------------------------------------------------------------


@dataclass
class KerasLayer:
    """One layer as a checkpoint records it.

    ``weights`` maps a role (``embeddings``, ``kernel``, ``recurrent_kernel``, ``bias``) to its
    array, in the file's order; ``class_name``, ``config`` and ``inbound`` (names of the layers
    it reads) come from the model config and are ``None`` / empty without one.
    """

    name: str
    weights: dict[str, np.ndarray] = field(default_factory=dict)
    class_name: str | None = None
    config: dict = field(default_factory=dict)
    inbound: list[str] = field(default_factory=list)

    def describe(self) -> str:
        """``'name' (Class, role shape, ...)``, for error messages."""
        parts = [self.class_name or "class unknown"]
        parts += [f"{role} {tuple(a.shape)}" for role, a in self.weights.items()]
        return f"{self.name!r} ({', '.join(parts)})"


@dataclass
class KerasCheckpoint:
    """The layers of a Keras checkpoint, in the file's order, and what kind of file it was."""

    path: str
    format: str
    keras_version: str | None
    has_config: bool
    layers: list[KerasLayer]


def _text(value: Any) -> str:
    if isinstance(value, bytes):
        return value.decode("utf8")
    if isinstance(value, np.bytes_):
        return bytes(value).decode("utf8")
    return str(value)


def _attr_list(group, name: str) -> list[str]:
    """A list-valued attribute as Keras 2 writes it, including its split into ``name0``,
    ``name1``, ... when the list is larger than an HDF5 object header holds."""
    if name in group.attrs:
        values = group.attrs[name]
    else:
        values, chunk = [], 0
        while f"{name}{chunk}" in group.attrs:
            values.extend(group.attrs[f"{name}{chunk}"])
            chunk += 1
    return [_text(v) for v in np.atleast_1d(values) if not isinstance(v, float)] if len(values) else []


_ROLE_NAMES = {"embeddings": "embeddings", "kernel": "kernel", "recurrent_kernel": "recurrent_kernel", "bias": "bias"}


def _roles_by_position(class_name: str | None, arrays: list[np.ndarray]) -> list[str]:
    """Roles of weights stored without names (Keras 3 ``vars/0, 1, ...``), by class or shape."""
    n = len(arrays)
    if class_name == "Embedding" or (class_name is None and n == 1 and arrays[0].ndim == 2):
        names = ["embeddings"]
    elif class_name in ("LSTM", "CuDNNLSTM") or (class_name is None and n >= 2 and arrays[1].ndim == 2):
        names = ["kernel", "recurrent_kernel", "bias"]
    else:
        names = ["kernel", "bias"]
    return [names[i] if i < len(names) else f"weight{i}" for i in range(n)]


def _role_from_name(weight_name: str) -> str | None:
    # Keras 2: "conv1d_1/kernel:0"; tf.keras: "lstm/lstm_cell/kernel:0"; Keras 3 legacy h5:
    # "lstm/lstm_cell/kernel".
    last = weight_name.rsplit("/", 1)[-1].split(":", 1)[0]
    return _ROLE_NAMES.get(last)


def _inbound_names(inbound_nodes: Any) -> list[str]:
    """Names of the layers a layer reads, from a Keras 2 or Keras 3 ``inbound_nodes`` entry."""
    names: list[str] = []

    def walk(node):
        if isinstance(node, dict):
            history = node.get("config", {}).get("keras_history") if isinstance(node.get("config"), dict) else None
            if history:  # Keras 3: {"class_name": "__keras_tensor__", "config": {"keras_history": [name, i, j]}}
                names.append(history[0])
                return
            for v in node.values():
                walk(v)
        elif isinstance(node, (list, tuple)):
            # Keras 2: [layer_name, node_index, tensor_index, kwargs]
            if len(node) >= 3 and isinstance(node[0], str) and isinstance(node[1], int):
                names.append(node[0])
                return
            for v in node:
                walk(v)

    walk(inbound_nodes)
    return names


def _config_layers(model_config: dict) -> list[dict]:
    """The per-layer entries of a Keras 2 or 3 model config (Functional, Model or Sequential)."""
    cfg = model_config.get("config", model_config)
    layers = cfg.get("layers", cfg) if isinstance(cfg, dict) else cfg
    if not isinstance(layers, list):
        raise KerasImportError("the checkpoint's model config has no list of layers")
    out = []
    for entry in layers:
        name = entry.get("name") or entry.get("config", {}).get("name")
        out.append(
            {
                "name": name,
                "class_name": entry.get("class_name"),
                "config": entry.get("config", {}),
                "inbound": _inbound_names(entry.get("inbound_nodes", [])),
            }
        )
    return out


def _read_keras2(path: str, f) -> KerasCheckpoint:
    model_config = None
    if "model_config" in f.attrs:
        model_config = json.loads(_text(f.attrs["model_config"]))
    group = f["model_weights"] if "model_weights" in f else f
    layer_names = _attr_list(group, "layer_names")
    version = group.attrs.get("keras_version", f.attrs.get("keras_version"))
    layers = []
    for name in layer_names:
        g = group[name]
        weight_names = _attr_list(g, "weight_names")
        arrays = [np.asarray(g[w]) for w in weight_names]
        roles = [_role_from_name(w) for w in weight_names]
        if None in roles or len(set(roles)) != len(roles):
            roles = _roles_by_position(None, arrays)
        layers.append(KerasLayer(name, dict(zip(roles, arrays))))
    fmt = "keras2-h5-model" if "model_weights" in f else "keras2-h5-weights"
    ckpt = KerasCheckpoint(path, fmt, None if version is None else _text(version), model_config is not None, layers)
    if model_config is not None:
        _attach_config(ckpt, _config_layers(model_config))
    return ckpt


def _natural_key(name: str) -> tuple:
    # Keras names repeated layers "conv1d", "conv1d_1", ..., "conv1d_10": order by the number.
    m = re.fullmatch(r"(.*?)(?:_(\d+))?", name)
    return (m.group(1), int(m.group(2)) if m.group(2) else -1, name)


def _keras3_vars(g) -> list[np.ndarray]:
    if "vars" not in g:
        return []
    v = g["vars"]
    return [np.asarray(v[k]) for k in sorted(v.keys(), key=int)]


def _snake_case(name: str) -> str:
    s = re.sub(r"(.)([A-Z][a-z]+)", r"\1_\2", name)
    return re.sub(r"([a-z])([A-Z])", r"\1_\2", s).lower()


def _read_keras3(path: str, f, config: dict | None, fmt: str) -> KerasCheckpoint:
    if "layers" not in f:
        raise KerasImportError(f"{path}: not a Keras checkpoint (no 'layers' group and no 'layer_names' attribute)")
    root = f["layers"]
    cfg_layers = _config_layers(config) if config is not None else None
    if cfg_layers is not None:
        # Keras 3 names a layer's group after the layer; early 3.x releases named it after the
        # class, numbered in the model's layer order. Accept both.
        seen: dict[str, int] = {}
        groups = []
        for entry in cfg_layers:
            base = _snake_case(entry["class_name"] or "")
            k = seen.get(base, -1) + 1
            seen[base] = k
            by_class = base if k == 0 else f"{base}_{k}"
            name = entry["name"] if entry["name"] in root else by_class
            groups.append((entry["name"], root[name] if name in root else None))
    else:
        groups = [(name, root[name]) for name in sorted(root.keys(), key=_natural_key)]
    layers = []
    for i, (name, g) in enumerate(groups):
        arrays = [] if g is None else _keras3_vars(g)
        class_name = cfg_layers[i]["class_name"] if cfg_layers is not None else None
        if g is not None and "cell" in g:  # recurrent layers keep their weights in the cell
            arrays = _keras3_vars(g["cell"])
            class_name = class_name or "LSTM"
        layers.append(KerasLayer(name, dict(zip(_roles_by_position(class_name, arrays), arrays))))
    ckpt = KerasCheckpoint(path, fmt, None, cfg_layers is not None, layers)
    if cfg_layers is not None:
        _attach_config(ckpt, cfg_layers)
    else:
        ckpt.layers = _order_by_architecture(layers)
    return ckpt


def _order_by_architecture(layers: list[KerasLayer]) -> list[KerasLayer]:
    """Order the layers of a file that records no layer order (Keras 3 ``.weights.h5`` lists
    them by name): by kind in the model's order, the convolutions as the chain their channel
    counts form, ties and the LSTMs by name (Keras numbers layers in creation order)."""
    by_kind: dict[str | None, list[KerasLayer]] = {}
    for layer in layers:
        by_kind.setdefault(_kind(layer), []).append(layer)
    embeddings = by_kind.pop("embedding", [])
    convs = by_kind.pop("conv", [])
    if len(embeddings) == 1 and convs:
        convs = _conv_chain(convs, embeddings[0].weights["embeddings"].shape[1]) or convs
    dense = sorted(by_kind.pop("dense", []), key=lambda m: (m.weights["kernel"].shape[1] == 1, _natural_key(m.name)))
    ordered = embeddings + convs + by_kind.pop("lstm", []) + dense
    # Layers of no known kind go first, so the architecture check names them.
    return [m for kind, group in by_kind.items() if kind is not None for m in group] + ordered


def _conv_chain(convs: list[KerasLayer], c_in: int) -> list[KerasLayer] | None:
    """The order of ``convs`` in which each reads the channels the one before writes, preferring
    name order where shapes allow several; ``None`` if there is none."""
    if not convs:
        return []
    for i, conv in enumerate(convs):
        kernel = conv.weights.get("kernel")
        if kernel is not None and kernel.ndim == 3 and kernel.shape[1] == c_in:
            rest = _conv_chain(convs[:i] + convs[i + 1 :], kernel.shape[2])
            if rest is not None:
                return [conv] + rest
    return None


def _attach_config(ckpt: KerasCheckpoint, cfg_layers: list[dict]) -> None:
    by_name = {layer.name: layer for layer in ckpt.layers}
    ordered = []
    for entry in cfg_layers:
        layer = by_name.pop(entry["name"], None) or KerasLayer(entry["name"])
        layer.class_name, layer.config, layer.inbound = entry["class_name"], entry["config"], entry["inbound"]
        ordered.append(layer)
    # Weighted layers the config does not list are kept so the architecture check names them.
    ckpt.layers = ordered + [layer for layer in by_name.values() if layer.weights]


def read_keras_checkpoint(path: str | Path) -> KerasCheckpoint:
    """Read the layers of a Keras 2 ``.h5`` (full model or weights), Keras 3 ``.weights.h5`` or
    ``.keras`` file."""
    h5py = _require_h5py()
    path = str(path)
    if not Path(path).is_file():
        raise FileNotFoundError(f"no Keras checkpoint at {path} (no such file)")
    if zipfile.is_zipfile(path):
        with zipfile.ZipFile(path) as z:
            names = z.namelist()
            if "model.weights.h5" not in names:
                raise KerasImportError(f"{path}: a .keras archive must hold model.weights.h5, found {names}")
            config = json.loads(z.read("config.json")) if "config.json" in names else None
            data = z.read("model.weights.h5")
        with h5py.File(io.BytesIO(data), "r") as f:
            return _read_keras3(path, f, config, "keras3-archive")
    try:
        f = h5py.File(path, "r")
    except OSError as e:
        raise KerasImportError(f"{path}: not an HDF5 file or a .keras archive ({e})") from e
    with f:
        group = f["model_weights"] if "model_weights" in f else f
        if "layer_names" in group.attrs or "layer_names0" in group.attrs:
            return _read_keras2(path, f)
        return _read_keras3(path, f, None, "keras3-weights")


# --------------------------------------------------------------------------------------------
# The whole model
# --------------------------------------------------------------------------------------------

_KINDS = {
    "InputLayer": "input",
    "Embedding": "embedding",
    "Dropout": "dropout",
    "Conv1D": "conv",
    "Convolution1D": "conv",
    "LSTM": "lstm",
    "CuDNNLSTM": "lstm",
    "Concatenate": "concatenate",
    "Dense": "dense",
}


def _kind(layer: KerasLayer) -> str | None:
    if layer.class_name is not None:
        return _KINDS.get(layer.class_name, "other")
    w = layer.weights
    if not w:
        return None  # a weightless layer of a weights-only file (Dropout, Concatenate, ...)
    if "recurrent_kernel" in w:
        return "lstm"
    if "embeddings" in w:
        return "embedding"
    kernel = w.get("kernel")
    if kernel is not None and kernel.ndim == 3:
        return "conv"
    if kernel is not None and kernel.ndim == 2:
        return "dense"
    return "other"


@dataclass
class _Plan:
    embedding: KerasLayer | None = None
    convs: list[KerasLayer] = field(default_factory=list)
    lstms: list[KerasLayer] = field(default_factory=list)
    denses: list[KerasLayer] = field(default_factory=list)
    dropouts: dict[str, float] = field(default_factory=dict)
    strides: list[int] = field(default_factory=list)
    concatenated: bool = False


def _plan_classifier(ckpt: KerasCheckpoint) -> _Plan:
    """Walk the layers in order and map them onto Embedding → Conv1D… → LSTM… → Dense → Dense."""
    plan = _Plan()

    def fail(layer: KerasLayer, reason: str):
        raise KerasImportError(
            f"{ckpt.path}: layer {layer.describe()} does not fit the ConvLSTMClassifier architecture "
            f"(Embedding, Conv1D..., LSTMs on the last conv's output, Dense(relu), Dense(1, sigmoid)): {reason}"
        )

    def conf(layer: KerasLayer, key: str, default=None):
        return layer.config.get(key, default)

    def one(value):
        return value[0] if isinstance(value, (list, tuple)) else value

    for layer in ckpt.layers:
        kind = _kind(layer)
        if kind is None or (kind == "input" and plan.embedding is None):
            continue
        w = layer.weights
        if plan.embedding is None:
            if kind != "embedding":
                fail(layer, "the first layer with weights must be an Embedding")
            if set(w) != {"embeddings"} or w["embeddings"].ndim != 2:
                fail(layer, "an Embedding has one (input_dim, output_dim) matrix")
            if conf(layer, "mask_zero", False):
                fail(layer, "mask_zero=True is not supported (the model reads padding like any token)")
            plan.embedding = layer
            continue
        if kind == "dropout":
            rate = float(conf(layer, "rate", 0.0))
            if not plan.convs and "embedding" not in plan.dropouts:
                plan.dropouts["embedding"] = rate
            elif plan.lstms and not plan.denses and "lstm" not in plan.dropouts:
                plan.dropouts["lstm"] = rate
            elif len(plan.denses) == 1 and "dense" not in plan.dropouts:
                plan.dropouts["dense"] = rate
            else:
                fail(layer, "a Dropout is allowed only after the Embedding, after the LSTMs and after the first Dense")
            continue
        if kind == "conv":
            if plan.lstms or plan.denses:
                fail(layer, "a Conv1D must come before the LSTMs")
            kernel = w.get("kernel")
            c_in = (
                plan.convs[-1].weights["kernel"].shape[2]
                if plan.convs
                else plan.embedding.weights["embeddings"].shape[1]
            )
            if kernel is None or kernel.ndim != 3 or kernel.shape[1] != c_in:
                fail(layer, f"expected a Conv1D kernel (kernel_size, {c_in}, filters)")
            if "bias" not in w or w["bias"].shape != (kernel.shape[2],):
                fail(layer, f"expected a Conv1D bias ({kernel.shape[2]},) (use_bias=True)")
            for key, want in (("padding", "valid"), ("activation", "linear"), ("data_format", "channels_last")):
                got = conf(layer, key, want)
                if got != want:
                    fail(layer, f"{key}={got!r}; the model's convolutions have {key}={want!r}")
            if one(conf(layer, "dilation_rate", 1)) != 1 or conf(layer, "groups", 1) != 1:
                fail(layer, "only dilation_rate=1 and groups=1 are supported")
            if layer.inbound and plan.convs and layer.inbound != [plan.convs[-1].name]:
                fail(layer, f"it reads {layer.inbound}, not the Conv1D before it ({plan.convs[-1].name!r})")
            plan.convs.append(layer)
            plan.strides.append(int(one(conf(layer, "strides", 0)) or 0))
            continue
        if kind == "lstm":
            if not plan.convs or plan.denses or plan.concatenated or "lstm" in plan.dropouts:
                fail(layer, "the LSTMs must follow the Conv1D stack directly")
            if "kernel" not in w or "recurrent_kernel" not in w:
                fail(layer, "an LSTM has a kernel and a recurrent_kernel")
            d_in = plan.convs[-1].weights["kernel"].shape[2]
            K, R = w["kernel"], w["recurrent_kernel"]
            if K.ndim != 2 or K.shape[0] != d_in or K.shape[1] % 4:
                fail(layer, f"expected an LSTM kernel ({d_in}, 4 * units) reading the last Conv1D's {d_in} channels")
            H = K.shape[1] // 4
            if plan.lstms and H != plan.lstms[0].weights["kernel"].shape[1] // 4:
                fail(layer, f"all LSTMs must have the same units ({plan.lstms[0].weights['kernel'].shape[1] // 4})")
            if R.shape != (H, 4 * H):
                fail(layer, f"expected a recurrent_kernel ({H}, {4 * H})")
            cudnn = layer.class_name == "CuDNNLSTM"
            b = w.get("bias")
            allowed = (8 * H,) if cudnn else (4 * H,) if layer.class_name == "LSTM" else (4 * H, 8 * H)
            if b is not None and (b.ndim != 1 or b.shape[0] not in allowed):
                fail(layer, f"expected a bias of shape {' or '.join(f'({n},)' for n in allowed)}")
            if cudnn and b is None:
                fail(layer, "a CuDNNLSTM has a bias")
            for key in ("return_sequences", "go_backwards", "stateful", "return_state"):
                if conf(layer, key, False):
                    fail(layer, f"{key}=True is not supported (the model reads the last h of a forward LSTM)")
            if conf(layer, "activation", "tanh") != "tanh":
                fail(layer, f"activation={conf(layer, 'activation')!r}; only 'tanh' is supported")
            if not cudnn and (b is None or b.shape[0] == 4 * H):
                where = f"{ckpt.path}: layer {layer.name!r}"
                if layer.class_name is not None:
                    _check_recurrent_activation(conf(layer, "recurrent_activation", "sigmoid"), where)
                elif ckpt.format.startswith("keras2"):
                    warnings.warn(
                        f"{where}: a weights-only Keras 2 file does not record the LSTM's recurrent_activation; "
                        "it is taken to be 'sigmoid' (Keras 2's LSTM defaulted to 'hard_sigmoid': if the model was "
                        "trained with it, the outputs will differ)",
                        stacklevel=4,
                    )
            if layer.inbound and layer.inbound != [plan.convs[-1].name]:
                fail(layer, f"it reads {layer.inbound}, not the last Conv1D ({plan.convs[-1].name!r})")
            plan.lstms.append(layer)
            continue
        if kind == "concatenate":
            names = [m.name for m in plan.lstms]
            if plan.concatenated or plan.denses or not plan.lstms or "lstm" in plan.dropouts:
                fail(layer, "a Concatenate is allowed only right after the LSTMs")
            if layer.inbound and sorted(layer.inbound) != sorted(names):
                fail(layer, f"it joins {layer.inbound}; expected the LSTMs {names}")
            if conf(layer, "axis", -1) not in (-1, 1):
                fail(layer, "it must concatenate on the feature axis (axis=-1)")
            if layer.inbound:
                # The Dense's rows follow the order of the Concatenate's inputs.
                order = {name: i for i, name in enumerate(layer.inbound)}
                plan.lstms.sort(key=lambda m: order[m.name])
            plan.concatenated = True
            continue
        if kind == "dense":
            if not plan.lstms:
                fail(layer, "a Dense must come after the LSTMs")
            if len(plan.lstms) > 1 and not plan.concatenated and ckpt.has_config:
                fail(layer, "the LSTMs' outputs must be joined by a Concatenate before the Dense")
            H = plan.lstms[0].weights["kernel"].shape[1] // 4
            kernel = w.get("kernel")
            if len(plan.denses) == 0:
                want_in, want_act = len(plan.lstms) * H, "relu"
                want = f"({want_in}, units) reading the {len(plan.lstms)} LSTMs' last h"
            elif len(plan.denses) == 1:
                want_in, want_act = plan.denses[0].weights["kernel"].shape[1], "sigmoid"
                want = f"({want_in}, 1)"
            else:
                fail(layer, "the model ends with Dense(1, sigmoid); there is a layer after it")
            if (
                kernel is None
                or kernel.ndim != 2
                or kernel.shape[0] != want_in
                or (plan.denses and kernel.shape[1] != 1)
            ):
                fail(layer, f"expected a Dense kernel {want}")
            if "bias" not in w or w["bias"].shape != (kernel.shape[1],):
                fail(layer, f"expected a Dense bias ({kernel.shape[1]},) (use_bias=True)")
            if conf(layer, "activation", want_act) != want_act:
                fail(layer, f"activation={conf(layer, 'activation')!r}; expected {want_act!r}")
            plan.denses.append(layer)
            continue
        fail(layer, f"no {layer.class_name or 'such'} layer in this architecture")
    if plan.embedding is None:
        raise KerasImportError(f"{ckpt.path}: no Embedding layer; the checkpoint holds no layers with weights")
    if len(plan.denses) < 2:
        last = plan.denses or plan.lstms or plan.convs or [plan.embedding]
        missing = (
            "Conv1D"
            if not plan.convs
            else "LSTM"
            if not plan.lstms
            else "Dense(relu)"
            if not plan.denses
            else "Dense(1, sigmoid)"
        )
        raise KerasImportError(
            f"{ckpt.path}: the checkpoint ends after layer {last[-1].describe()}; the ConvLSTMClassifier architecture "
            f"expects a {missing} next"
        )
    return plan


def _classifier_config(plan: _Plan, ckpt: KerasCheckpoint, overrides: dict) -> dict:
    from fusedconvlstm.models.conv_lstm_classifier import ClassifierConfig

    known = {f.name for f in fields(ClassifierConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"from_keras: unknown config arguments {sorted(unknown)}; known: {sorted(known)}")
    kernels = [c.weights["kernel"] for c in plan.convs]
    inferred = {
        "vocab_size": plan.embedding.weights["embeddings"].shape[0],
        "embedding_dim": plan.embedding.weights["embeddings"].shape[1],
        "conv_channels": tuple(k.shape[2] for k in kernels),
        "kernel_sizes": tuple(k.shape[0] for k in kernels),
        "hidden_size": plan.lstms[0].weights["kernel"].shape[1] // 4,
        "num_lstms": len(plan.lstms),
        "dense_size": plan.denses[0].weights["kernel"].shape[1],
    }
    if all(plan.strides):
        inferred["conv_strides"] = tuple(plan.strides)
    for name, value in inferred.items():
        if name in overrides and tuple(np.atleast_1d(overrides[name])) != tuple(np.atleast_1d(value)):
            raise KerasImportError(
                f"{ckpt.path}: {name}={overrides[name]!r} was given but the checkpoint has {value!r}"
            )
    cfg = dict(inferred)
    for key, name in (("embedding", "embedding_dropout"), ("lstm", "lstm_dropout"), ("dense", "dense_dropout")):
        if key in plan.dropouts:
            cfg[name] = plan.dropouts[key]
    cfg.update(overrides)
    if "conv_strides" not in cfg:
        default = ClassifierConfig().conv_strides
        if len(default) != len(kernels):
            raise KerasImportError(
                f"{ckpt.path}: the file does not record the convolutions' strides; pass conv_strides= "
                f"(one per Conv1D, {len(kernels)} of them)"
            )
        # A weights-only file records no strides: take the original model's.
        cfg["conv_strides"] = default
    return cfg


def classifier_state_dict(plan: _Plan) -> dict[str, Tensor]:
    """The ``ConvLSTMClassifier`` state dict for a planned checkpoint."""
    state = {"embedding.weight": _as_tensor(plan.embedding.weights["embeddings"], "embeddings")}
    for i, conv in enumerate(plan.convs):
        state[f"conv.layers.{i}.weight"] = conv1d_weight_from_keras(conv.weights["kernel"])
        state[f"conv.layers.{i}.bias"] = _as_tensor(conv.weights["bias"], "Conv1D bias")
    for j, lstm in enumerate(plan.lstms):
        w = lstm.weights
        layout = "cudnn" if lstm.class_name == "CuDNNLSTM" else "standard" if lstm.class_name == "LSTM" else "auto"
        params = lstm_weights_from_keras(w["kernel"], w["recurrent_kernel"], w.get("bias"), layout=layout)
        if "bias_ih_l0" not in params:  # use_bias=False: the model's LSTMs have biases, held at zero
            H = params["weight_hh_l0"].shape[1]
            params["bias_ih_l0"] = params["bias_hh_l0"] = torch.zeros(4 * H)
        state.update({f"lstms.{j}.{k}": v for k, v in params.items()})
    # Dense(64)'s rows 0..H-1 read the first LSTM in the Concatenate's order, and so on: the same
    # order as the model's torch.cat of the LSTMs' h.
    for name, dense in zip(("dense", "out"), plan.denses):
        state[f"head.{name}.weight"] = dense_weight_from_keras(dense.weights["kernel"])
        state[f"head.{name}.bias"] = _as_tensor(dense.weights["bias"], "Dense bias")
    return state


def load_classifier(
    cls: type[ConvLSTMClassifier],
    path: str | Path,
    backend: str = "auto",
    device=None,
    dtype=None,
    **overrides,
) -> ConvLSTMClassifier:
    """Implementation of :meth:`ConvLSTMClassifier.from_keras`."""
    ckpt = read_keras_checkpoint(path)
    plan = _plan_classifier(ckpt)
    cfg = _classifier_config(plan, ckpt, overrides)
    model = cls(backend=backend, device=device, dtype=dtype, **cfg)
    model.load_state_dict(classifier_state_dict(plan))
    return model.eval()


__all__ = [
    "KerasCheckpoint",
    "KerasImportError",
    "KerasLayer",
    "conv1d_weight_from_keras",
    "dense_weight_from_keras",
    "lstm_weights_from_keras",
    "read_keras_checkpoint",
]
