"""Read the layers of a Keras checkpoint file, with ``h5py`` (optional: ``pip install h5py``,
imported only when a file is read); Keras itself is not needed.

- Keras 2 ``.h5``: a full model (``model.save``: ``model_config`` and a ``model_weights`` group)
  or weights only (``model.save_weights``), with ``CuDNNLSTM`` or ``LSTM`` layers. Keras 3's
  legacy ``.h5`` has the same layout.
- Keras 3 ``.weights.h5`` (``model.save_weights``) and ``.keras`` (a zip holding
  ``config.json`` and ``model.weights.h5``).

The result is a :class:`KerasCheckpoint`: the layers in the model's order, with the class names,
configs and inputs a model config records where the file has one. A Keras 3 ``.weights.h5``
lists its layers by name only: they are ordered by kind as the reference architecture has them.
"""

from __future__ import annotations

import io
import json
import re
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from fusedconvlstm.keras.errors import KerasImportError


def require_h5py():
    """The ``h5py`` module, or an ImportError that says how to install it."""
    try:
        import h5py
    except ImportError as e:
        raise ImportError("Reading Keras checkpoints needs h5py, which is not installed: pip install h5py") from e
    return h5py


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


def layer_kind(layer: KerasLayer) -> str | None:
    """What a layer is to the reference architecture (``"conv"``, ``"lstm"``, ...; ``"other"`` for
    a class it does not have), by class name or else by weight shapes; ``None`` for a layer of a
    weights-only file that has no weights."""
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
    _collect_inbound(inbound_nodes, names)
    return names


def _collect_inbound(node: Any, names: list[str]) -> None:
    """Append to ``names`` the layer names an ``inbound_nodes`` entry (or part of one) refers to."""
    if isinstance(node, dict):
        history = node.get("config", {}).get("keras_history") if isinstance(node.get("config"), dict) else None
        if history:  # Keras 3: {"class_name": "__keras_tensor__", "config": {"keras_history": [name, i, j]}}
            names.append(history[0])
            return
        for v in node.values():
            _collect_inbound(v, names)
    elif isinstance(node, (list, tuple)):
        # Keras 2: [layer_name, node_index, tensor_index, kwargs]
        if len(node) >= 3 and isinstance(node[0], str) and isinstance(node[1], int):
            names.append(node[0])
            return
        for v in node:
            _collect_inbound(v, names)


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
        by_kind.setdefault(layer_kind(layer), []).append(layer)
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
    h5py = require_h5py()
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
