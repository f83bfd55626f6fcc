"""``fusedconvlstm.convert``: swap a model's ``nn.LSTM`` modules and Conv1d chains for fused ones."""

from __future__ import annotations

import copy

from torch import nn

from fusedconvlstm.nn.conv1d_stack import Conv1dStack, activation_name
from fusedconvlstm.nn.lstm import LSTM


def _fusable_conv(m: nn.Module) -> bool:
    return isinstance(m, nn.Conv1d) and m.groups == 1 and m.padding_mode == "zeros"


def _chain_end(mods: list[nn.Module], start: int) -> int:
    """End (exclusive) of the longest Conv1d chain starting at ``mods[start]``: each Conv1d may be
    followed by one fusable activation and then one Dropout."""
    i = start
    while i < len(mods) and _fusable_conv(mods[i]):
        i += 1
        if i < len(mods) and activation_name(mods[i]) is not None:
            i += 1
        if i < len(mods) and isinstance(mods[i], nn.Dropout):
            i += 1
    return i


def _convert_sequential(seq: nn.Sequential, backend: str) -> nn.Sequential:
    mods = list(seq)
    out: list[nn.Module] = []
    i = 0
    while i < len(mods):
        end = _chain_end(mods, i)
        if end > i:
            out.append(Conv1dStack.from_torch(mods[i:end], channels_last=False, backend=backend))
            i = end
        else:
            out.append(_convert_module(mods[i], backend))
            i += 1
    new = nn.Sequential(*out)
    new.train(seq.training)
    return new


def _convert_module(module: nn.Module, backend: str) -> nn.Module:
    if type(module) is nn.LSTM:
        return LSTM.from_torch(module, backend=backend)
    if _fusable_conv(module):
        return Conv1dStack.from_torch(module, channels_last=False, backend=backend)
    if isinstance(module, (LSTM, Conv1dStack)):
        return module
    if type(module) is nn.Sequential:
        return _convert_sequential(module, backend)
    for name, child in list(module.named_children()):
        new = _convert_module(child, backend)
        if new is not child:
            setattr(module, name, new)
    return module


def convert(model: nn.Module, backend: str = "auto", inplace: bool = False) -> nn.Module:
    """Replace the ``nn.LSTM`` modules and Conv1d chains inside ``model`` by fused modules.

    ``nn.LSTM`` becomes :class:`fusedconvlstm.LSTM`. In an ``nn.Sequential``, each run of
    ``nn.Conv1d`` layers (``groups=1``, zero padding), each optionally followed by one activation
    (ReLU, GELU, SiLU, Tanh, Identity) and one Dropout, becomes one
    :class:`fusedconvlstm.Conv1dStack` taking ``(B, C, T)``; a Conv1d elsewhere becomes a
    one-layer stack. Weights are kept, so the outputs are equal. Chains that are not inside an
    ``nn.Sequential`` are converted layer by layer (the call order in ``forward`` is not
    visible). Returns the converted model, a copy unless ``inplace``.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"convert: model must be a torch.nn.Module, got {type(model).__name__}")
    if not inplace:
        model = copy.deepcopy(model)
    return _convert_module(model, backend)
