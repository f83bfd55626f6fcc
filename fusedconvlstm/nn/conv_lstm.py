"""The fused path from token ids to the last hidden states of LSTMs reading one conv stack.

:func:`conv_lstm_states` runs an ``nn.Embedding``, a :class:`Conv1dStack` and a
:class:`ParallelLSTM` as two ops: one ``conv1d_stack`` from the token ids to all the LSTMs' gate
pre-activations (the embedding gather, its training dropout, the convolutions and the input
projections) and one ``lstm_recurrence`` for all the LSTMs, keeping only the last states. Each
part runs where the dispatcher sends it; where it answers ``torch`` the modules' torch paths serve
(the embedding, ``F.conv1d`` and ``torch.lstm``), as the plain-torch model runs them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusedconvlstm import backends
from fusedconvlstm.calls.conv1d import OP as CONV_OP
from fusedconvlstm.calls.lstm import OP as LSTM_OP
from fusedconvlstm.calls.lstm import LSTMRecurrenceCall
from fusedconvlstm.nn.conv1d_stack import Conv1dStack
from fusedconvlstm.nn.lstm import (
    ParallelLSTM,
    parallel_input_projection,
    parallel_recurrent_weights,
    torch_lstm_traceable,
)
from fusedconvlstm.numerics import dropout as philox_dropout
from fusedconvlstm.numerics.dropout import draw_seed
from fusedconvlstm.numerics.precision import autocast_dtype
from fusedconvlstm.ops.conv1d import conv1d_stack_embedding, conv1d_stack_embedding_projection, stack_call
from fusedconvlstm.ops.lstm import lstm_recurrence


def conv_lstm_states(
    tokens: Tensor,
    embedding: nn.Embedding,
    conv: Conv1dStack,
    lstms: ParallelLSTM,
    embedding_dropout: float = 0.0,
    backend: str = "auto",
) -> Tensor:
    """The last hidden states ``(B, D * H)`` of the ``D`` LSTMs of ``lstms`` (one layer each,
    unidirectional, ``batch_first``, zero initial state) reading ``conv`` applied to
    ``embedding(tokens)``, ``tokens`` ``(B, T)``; ``embedding_dropout`` (training) drops elements
    of the embedding output with the package's counter-based masks."""
    lstms = list(lstms)
    hidden = lstms[0].hidden_size
    table = embedding.weight
    # Under autocast the whole fused path, tokens to gates to states, in the autocast dtype
    # (nn.Conv1d would use it too; the plain twin's cuDNN LSTMs run float16 under any CUDA
    # autocast, see nn.lstm.lstm_autocast_dtype).
    cast = autocast_dtype(table)
    if cast is not None:
        table = table.to(cast)
    weight, bias, options = conv.op_arguments(cast=cast)
    dropout = None
    if embedding_dropout > 0:
        dropout = [embedding_dropout] + [0.0] * (len(weight) - 1)
    seed = draw_seed(table.device) if dropout is not None else None
    # Which backend serves each part (backends.explain says why): where the dispatcher answers
    # "torch", that part runs on torch's kernels as the plain-torch twin runs it.
    device = table.device

    def conv_call():
        return stack_call(table, weight, bias, tokens=tokens, dropout=dropout, seed=seed, **options)

    def lstm_call():
        T = conv_call().out_lens()[-1]
        return LSTMRecurrenceCall(
            T, tokens.shape[0], len(lstms), hidden, 0, table.dtype, device, False, (False,) * len(lstms),
            torch.is_grad_enabled(),
        )  # fmt: skip

    lstm_name = backends.module_backend(LSTM_OP, backend, device, lstm_call)
    if lstm_name == backends.TORCH and torch_lstm_traceable():
        conv_name = backends.module_backend(CONV_OP, backend, device, conv_call)
        if conv_name == backends.TORCH:
            x = conv.torch_chain(
                _torch_embedding(embedding, tokens, embedding_dropout, seed).transpose(1, 2)
            ).transpose(1, 2)
        else:
            options["backend"] = conv_name
            x = conv1d_stack_embedding(tokens, table, weight, bias, dropout=dropout, seed=seed, **options)
        B, H = x.shape[0], hidden
        zeros = x.new_zeros(1, B, H)
        states = [m._forward_torch(x, (zeros, zeros), True, B, 1, H)[1][0][0] for m in lstms]
        return torch.cat(states, dim=1)
    proj_weight, proj_bias = parallel_input_projection(lstms, cast)

    def gates_call():
        return stack_call(
            table, weight, bias, tokens=tokens, proj_weight=proj_weight, proj_bias=proj_bias, dropout=dropout,
            seed=seed, **options,
        )  # fmt: skip

    conv_name = backends.module_backend(CONV_OP, backend, device, gates_call)
    if conv_name == backends.TORCH:
        h = conv.torch_chain(_torch_embedding(embedding, tokens, embedding_dropout, seed).transpose(1, 2))  # (B, C, T)
        gates = F.linear(h.permute(2, 0, 1), proj_weight, proj_bias).contiguous()
    else:
        options["backend"] = conv_name
        gates = conv1d_stack_embedding_projection(
            tokens, table, weight, bias, proj_weight, proj_bias, dropout=dropout, seed=seed, **options
        )
    T, B = gates.shape[0], gates.shape[1]
    xg = gates.view(T, B, len(lstms), 4 * hidden)
    # The head reads only the last h: at inference the kernels store no per-step output.
    w_hh = parallel_recurrent_weights(lstms, cast)
    _, h_n, _ = lstm_recurrence(xg, w_hh, backend=lstm_name, return_sequence=False)
    return torch.cat(h_n.unbind(0), dim=1)


def _torch_embedding(embedding: nn.Embedding, tokens: Tensor, p: float, seed: Tensor | None) -> Tensor:
    """The embedding and its training dropout (the package's masks of ``seed``), as the plain model."""
    x = embedding(tokens)
    if seed is not None:
        x = philox_dropout.dropout(x, p, seed)
    return x
