"""Map a checkpoint's layers onto the reference architecture (docs/design.md §1): Embedding →
Conv1D… → LSTMs on the last conv's output → (Concatenate) → Dense(relu) → Dense(1, sigmoid),
with Dropouts allowed after the Embedding, the LSTMs and the first Dense.

The layers are taken in the checkpoint's order, one step function per kind of layer; the first
layer that does not fit raises :class:`KerasImportError` naming it. The plan records which layer
plays which part, and the Concatenate's input order (the order in which the first Dense reads the
LSTMs' last h).
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fusedconvlstm.keras.errors import KerasImportError
from fusedconvlstm.keras.layouts import check_recurrent_activation
from fusedconvlstm.keras.reading import KerasCheckpoint, KerasLayer, layer_kind

ARCHITECTURE = "Embedding, Conv1D..., LSTMs on the last conv's output, Dense(relu), Dense(1, sigmoid)"


@dataclass
class ClassifierPlan:
    """The checkpoint's layers in the parts of the architecture they play."""

    embedding: KerasLayer | None = None
    convs: list[KerasLayer] = field(default_factory=list)
    lstms: list[KerasLayer] = field(default_factory=list)
    denses: list[KerasLayer] = field(default_factory=list)
    dropouts: dict[str, float] = field(default_factory=dict)  # "embedding", "lstm", "dense": rate
    strides: list[int] = field(default_factory=list)  # one per conv, 0 where the file records none
    concatenated: bool = False

    @property
    def channels(self) -> int:
        """The channels the last planned conv (or the embedding, before any) writes."""
        if self.convs:
            return self.convs[-1].weights["kernel"].shape[2]
        return self.embedding.weights["embeddings"].shape[1]

    @property
    def units(self) -> int:
        """The LSTMs' hidden size (that of the first)."""
        return self.lstms[0].weights["kernel"].shape[1] // 4


class _Misfit(Exception):
    """Why a layer does not fit; :func:`plan_classifier` raises it as a KerasImportError naming the layer."""


def plan_classifier(ckpt: KerasCheckpoint) -> ClassifierPlan:
    """Walk the checkpoint's layers in order and give each its part in the architecture."""
    plan = ClassifierPlan()
    for layer in ckpt.layers:
        kind = layer_kind(layer)
        if kind is None or (kind == "input" and plan.embedding is None):
            continue
        step = _add_embedding if plan.embedding is None else _STEPS.get(kind, _refuse)
        try:
            step(plan, layer, ckpt)
        except _Misfit as e:
            raise KerasImportError(
                f"{ckpt.path}: layer {layer.describe()} does not fit the ConvLSTMClassifier architecture "
                f"({ARCHITECTURE}): {e}"
            ) from None
    _check_complete(plan, ckpt)
    return plan


def _first(value: Any) -> Any:
    """A Keras argument that may be a 1-tuple (``strides=[2]``) as its single value."""
    return value[0] if isinstance(value, (list, tuple)) else value


def _add_embedding(plan: ClassifierPlan, layer: KerasLayer, ckpt: KerasCheckpoint) -> None:
    w = layer.weights
    if layer_kind(layer) != "embedding":
        raise _Misfit("the first layer with weights must be an Embedding")
    if set(w) != {"embeddings"} or w["embeddings"].ndim != 2:
        raise _Misfit("an Embedding has one (input_dim, output_dim) matrix")
    if layer.config.get("mask_zero", False):
        raise _Misfit("mask_zero=True is not supported (the model reads padding like any token)")
    plan.embedding = layer


def _add_dropout(plan: ClassifierPlan, layer: KerasLayer, ckpt: KerasCheckpoint) -> None:
    rate = float(layer.config.get("rate", 0.0))
    slot = _dropout_slot(plan)
    if slot is None:
        raise _Misfit("a Dropout is allowed only after the Embedding, after the LSTMs and after the first Dense")
    plan.dropouts[slot] = rate


def _dropout_slot(plan: ClassifierPlan) -> str | None:
    """Which of the model's dropouts a Dropout here would be, ``None`` if none can be."""
    if not plan.convs and "embedding" not in plan.dropouts:
        return "embedding"
    if plan.lstms and not plan.denses and "lstm" not in plan.dropouts:
        return "lstm"
    if len(plan.denses) == 1 and "dense" not in plan.dropouts:
        return "dense"
    return None


_CONV_CONFIG = (("padding", "valid"), ("activation", "linear"), ("data_format", "channels_last"))


def _add_conv(plan: ClassifierPlan, layer: KerasLayer, ckpt: KerasCheckpoint) -> None:
    if plan.lstms or plan.denses:
        raise _Misfit("a Conv1D must come before the LSTMs")
    _check_conv_weights(layer, plan.channels)
    _check_conv_config(layer)
    if layer.inbound and plan.convs and layer.inbound != [plan.convs[-1].name]:
        raise _Misfit(f"it reads {layer.inbound}, not the Conv1D before it ({plan.convs[-1].name!r})")
    plan.convs.append(layer)
    plan.strides.append(int(_first(layer.config.get("strides", 0)) or 0))


def _check_conv_weights(layer: KerasLayer, c_in: int) -> None:
    w = layer.weights
    kernel = w.get("kernel")
    if kernel is None or kernel.ndim != 3 or kernel.shape[1] != c_in:
        raise _Misfit(f"expected a Conv1D kernel (kernel_size, {c_in}, filters)")
    if "bias" not in w or w["bias"].shape != (kernel.shape[2],):
        raise _Misfit(f"expected a Conv1D bias ({kernel.shape[2]},) (use_bias=True)")


def _check_conv_config(layer: KerasLayer) -> None:
    for key, want in _CONV_CONFIG:
        got = layer.config.get(key, want)
        if got != want:
            raise _Misfit(f"{key}={got!r}; the model's convolutions have {key}={want!r}")
    if _first(layer.config.get("dilation_rate", 1)) != 1 or layer.config.get("groups", 1) != 1:
        raise _Misfit("only dilation_rate=1 and groups=1 are supported")


def _add_lstm(plan: ClassifierPlan, layer: KerasLayer, ckpt: KerasCheckpoint) -> None:
    if not plan.convs or plan.denses or plan.concatenated or "lstm" in plan.dropouts:
        raise _Misfit("the LSTMs must follow the Conv1D stack directly")
    _check_lstm_weights(plan, layer)
    _check_lstm_config(layer)
    _check_lstm_gates(layer, ckpt)
    if layer.inbound and layer.inbound != [plan.convs[-1].name]:
        raise _Misfit(f"it reads {layer.inbound}, not the last Conv1D ({plan.convs[-1].name!r})")
    plan.lstms.append(layer)


def _lstm_bias_lengths(class_name: str | None, units: int) -> tuple[int, ...]:
    """The bias lengths an LSTM of this class may have: cuDNN's two biases, Keras's one, or either
    when the file does not name the class."""
    if class_name == "CuDNNLSTM":
        return (8 * units,)
    if class_name == "LSTM":
        return (4 * units,)
    return (4 * units, 8 * units)


def _check_lstm_weights(plan: ClassifierPlan, layer: KerasLayer) -> None:
    w = layer.weights
    if "kernel" not in w or "recurrent_kernel" not in w:
        raise _Misfit("an LSTM has a kernel and a recurrent_kernel")
    d_in = plan.channels
    K, R = w["kernel"], w["recurrent_kernel"]
    if K.ndim != 2 or K.shape[0] != d_in or K.shape[1] % 4:
        raise _Misfit(f"expected an LSTM kernel ({d_in}, 4 * units) reading the last Conv1D's {d_in} channels")
    H = K.shape[1] // 4
    if plan.lstms and H != plan.units:
        raise _Misfit(f"all LSTMs must have the same units ({plan.units})")
    if R.shape != (H, 4 * H):
        raise _Misfit(f"expected a recurrent_kernel ({H}, {4 * H})")
    b = w.get("bias")
    allowed = _lstm_bias_lengths(layer.class_name, H)
    if b is not None and (b.ndim != 1 or b.shape[0] not in allowed):
        raise _Misfit(f"expected a bias of shape {' or '.join(f'({n},)' for n in allowed)}")
    if layer.class_name == "CuDNNLSTM" and b is None:
        raise _Misfit("a CuDNNLSTM has a bias")


def _check_lstm_config(layer: KerasLayer) -> None:
    for key in ("return_sequences", "go_backwards", "stateful", "return_state"):
        if layer.config.get(key, False):
            raise _Misfit(f"{key}=True is not supported (the model reads the last h of a forward LSTM)")
    if layer.config.get("activation", "tanh") != "tanh":
        raise _Misfit(f"activation={layer.config.get('activation')!r}; only 'tanh' is supported")


def _check_lstm_gates(layer: KerasLayer, ckpt: KerasCheckpoint) -> None:
    """Refuse a standard LSTM whose config names a recurrent activation other than the sigmoid;
    warn where a Keras 2 weights-only file cannot say. A CuDNNLSTM's gates are the sigmoid."""
    H = layer.weights["kernel"].shape[1] // 4
    b = layer.weights.get("bias")
    if layer.class_name == "CuDNNLSTM" or (b is not None and b.shape[0] != 4 * H):
        return
    where = f"{ckpt.path}: layer {layer.name!r}"
    if layer.class_name is not None:
        check_recurrent_activation(layer.config.get("recurrent_activation", "sigmoid"), where)
    elif ckpt.format.startswith("keras2"):
        warnings.warn(
            f"{where}: a weights-only Keras 2 file does not record the LSTM's recurrent_activation; "
            "it is taken to be 'sigmoid' (Keras 2's LSTM defaulted to 'hard_sigmoid': if the model was "
            "trained with it, the outputs will differ)",
            # Point at the caller of load_classifier (load_classifier, plan_classifier, _add_lstm, here).
            stacklevel=5,
        )


def _add_concatenate(plan: ClassifierPlan, layer: KerasLayer, ckpt: KerasCheckpoint) -> None:
    names = [m.name for m in plan.lstms]
    if plan.concatenated or plan.denses or not plan.lstms or "lstm" in plan.dropouts:
        raise _Misfit("a Concatenate is allowed only right after the LSTMs")
    if layer.inbound and sorted(layer.inbound) != sorted(names):
        raise _Misfit(f"it joins {layer.inbound}; expected the LSTMs {names}")
    if layer.config.get("axis", -1) not in (-1, 1):
        raise _Misfit("it must concatenate on the feature axis (axis=-1)")
    if layer.inbound:
        # The Dense's rows follow the order of the Concatenate's inputs.
        order = {name: i for i, name in enumerate(layer.inbound)}
        plan.lstms.sort(key=lambda m: order[m.name])
    plan.concatenated = True


def _add_dense(plan: ClassifierPlan, layer: KerasLayer, ckpt: KerasCheckpoint) -> None:
    if not plan.lstms:
        raise _Misfit("a Dense must come after the LSTMs")
    if len(plan.lstms) > 1 and not plan.concatenated and ckpt.has_config:
        raise _Misfit("the LSTMs' outputs must be joined by a Concatenate before the Dense")
    want_in, want_act, want = _dense_expected(plan)
    w = layer.weights
    kernel = w.get("kernel")
    if kernel is None or kernel.ndim != 2 or kernel.shape[0] != want_in or (plan.denses and kernel.shape[1] != 1):
        raise _Misfit(f"expected a Dense kernel {want}")
    if "bias" not in w or w["bias"].shape != (kernel.shape[1],):
        raise _Misfit(f"expected a Dense bias ({kernel.shape[1]},) (use_bias=True)")
    if layer.config.get("activation", want_act) != want_act:
        raise _Misfit(f"activation={layer.config.get('activation')!r}; expected {want_act!r}")
    plan.denses.append(layer)


def _dense_expected(plan: ClassifierPlan) -> tuple[int, str, str]:
    """The next Dense's input features, activation and kernel shape (in words)."""
    if not plan.denses:
        want_in = len(plan.lstms) * plan.units
        return want_in, "relu", f"({want_in}, units) reading the {len(plan.lstms)} LSTMs' last h"
    if len(plan.denses) == 1:
        want_in = plan.denses[0].weights["kernel"].shape[1]
        return want_in, "sigmoid", f"({want_in}, 1)"
    raise _Misfit("the model ends with Dense(1, sigmoid); there is a layer after it")


def _refuse(plan: ClassifierPlan, layer: KerasLayer, ckpt: KerasCheckpoint) -> None:
    raise _Misfit(f"no {layer.class_name or 'such'} layer in this architecture")


_STEPS: dict[str, Callable[[ClassifierPlan, KerasLayer, KerasCheckpoint], None]] = {
    "dropout": _add_dropout,
    "conv": _add_conv,
    "lstm": _add_lstm,
    "concatenate": _add_concatenate,
    "dense": _add_dense,
}


def _check_complete(plan: ClassifierPlan, ckpt: KerasCheckpoint) -> None:
    if plan.embedding is None:
        raise KerasImportError(f"{ckpt.path}: no Embedding layer; the checkpoint holds no layers with weights")
    if len(plan.denses) < 2:
        last = plan.denses or plan.lstms or plan.convs or [plan.embedding]
        raise KerasImportError(
            f"{ckpt.path}: the checkpoint ends after layer {last[-1].describe()}; the ConvLSTMClassifier architecture "
            f"expects a {_next_missing(plan)} next"
        )


def _next_missing(plan: ClassifierPlan) -> str:
    """The first part of the architecture an incomplete plan lacks."""
    if not plan.convs:
        return "Conv1D"
    if not plan.lstms:
        return "LSTM"
    if not plan.denses:
        return "Dense(relu)"
    return "Dense(1, sigmoid)"
