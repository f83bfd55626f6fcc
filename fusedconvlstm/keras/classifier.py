"""A :class:`~fusedconvlstm.models.ConvLSTMClassifier` from a Keras checkpoint: read the file,
plan its layers, infer the model's config and convert the weights.

The sizes come from the checkpoint. Weights-only files record no strides (the original's
``(1, 1, 1, 1, 2)`` is assumed for five convolutions; pass ``conv_strides=`` otherwise) and no
dropout rates. The first Dense reads the LSTMs' last h in the Concatenate's order: a config
gives it, a Keras 2 weights-only file lists the layers in model order, and a Keras 3
``.weights.h5`` lists them by name only, so its LSTMs are taken in name order (``lstm`` before
``lstm_1``, Keras's creation order); save a ``.keras`` file to be sure.
"""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from fusedconvlstm.keras.errors import KerasImportError
from fusedconvlstm.keras.layouts import (
    as_tensor,
    conv1d_weight_from_keras,
    dense_weight_from_keras,
    lstm_weights_from_keras,
)
from fusedconvlstm.keras.plan import ClassifierPlan, plan_classifier
from fusedconvlstm.keras.reading import KerasCheckpoint, read_keras_checkpoint
from fusedconvlstm.models import ClassifierConfig, ConvLSTMClassifier


def load_classifier(
    path: str | Path,
    backend: str = "auto",
    device=None,
    dtype=None,
    **overrides,
) -> ConvLSTMClassifier:
    """The model of a Keras checkpoint of the reference architecture, in inference mode.

    ``path``: a Keras 2 ``.h5`` (full model or weights only, ``CuDNNLSTM`` or ``LSTM``
    layers) or a Keras 3 ``.weights.h5`` or ``.keras`` file; read with ``h5py``. The sizes come
    from the checkpoint; ``overrides`` sets what it does not record (``conv_strides`` of a
    weights-only file, the dropout rates) and must agree with what it does. A checkpoint of
    another architecture raises :class:`~fusedconvlstm.keras.KerasImportError` naming the
    first layer that does not fit.
    """
    ckpt = read_keras_checkpoint(path)
    plan = plan_classifier(ckpt)
    cfg = classifier_config(plan, ckpt, overrides)
    model = ConvLSTMClassifier(backend=backend, device=device, dtype=dtype, **cfg)
    model.load_state_dict(classifier_state_dict(plan))
    return model.eval()


def classifier_config(plan: ClassifierPlan, ckpt: KerasCheckpoint, overrides: dict) -> dict:
    """``ConvLSTMClassifier`` arguments: the sizes the checkpoint gives, its dropout rates, then
    ``overrides`` (which may not contradict the sizes)."""
    known = {f.name for f in fields(ClassifierConfig)}
    unknown = set(overrides) - known
    if unknown:
        raise TypeError(f"load_classifier: unknown config arguments {sorted(unknown)}; known: {sorted(known)}")
    inferred = _inferred_config(plan)
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
        if len(default) != len(plan.convs):
            raise KerasImportError(
                f"{ckpt.path}: the file does not record the convolutions' strides; pass conv_strides= "
                f"(one per Conv1D, {len(plan.convs)} of them)"
            )
        # A weights-only file records no strides: take the original model's.
        cfg["conv_strides"] = default
    return cfg


def _inferred_config(plan: ClassifierPlan) -> dict:
    """The config entries the planned layers' shapes (and the file's strides, if all recorded) fix."""
    kernels = [c.weights["kernel"] for c in plan.convs]
    inferred = {
        "vocab_size": plan.embedding.weights["embeddings"].shape[0],
        "embedding_dim": plan.embedding.weights["embeddings"].shape[1],
        "conv_channels": tuple(k.shape[2] for k in kernels),
        "kernel_sizes": tuple(k.shape[0] for k in kernels),
        "hidden_size": plan.units,
        "num_lstms": len(plan.lstms),
        "dense_size": plan.denses[0].weights["kernel"].shape[1],
    }
    if all(plan.strides):
        inferred["conv_strides"] = tuple(plan.strides)
    return inferred


def classifier_state_dict(plan: ClassifierPlan) -> dict[str, Tensor]:
    """The ``ConvLSTMClassifier`` state dict for a planned checkpoint."""
    state = {"embedding.weight": as_tensor(plan.embedding.weights["embeddings"], "embeddings")}
    for i, conv in enumerate(plan.convs):
        state[f"conv.layers.{i}.weight"] = conv1d_weight_from_keras(conv.weights["kernel"])
        state[f"conv.layers.{i}.bias"] = as_tensor(conv.weights["bias"], "Conv1D bias")
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
        state[f"head.{name}.bias"] = as_tensor(dense.weights["bias"], "Dense bias")
    return state
