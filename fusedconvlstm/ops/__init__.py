"""Op schemas of the package (namespace ``fusedconvlstm``), their fake implementations and autograd.

Public ops: ``lstm_recurrence`` and ``conv1d_stack`` (and their ``*_backward`` twins, called by
autograd); ``lstm_layer`` is a layer from its input (the input-projection GEMM and
``lstm_recurrence``, or ``lstm_recurrence_from_input`` where the cuda backend computes the
projection inside its kernel); the Python wrappers ``conv1d_stack_embedding``, ``conv1d_stack_projection`` and
``conv1d_stack_embedding_projection`` call ``conv1d_stack`` with its embedding prologue, its
projection epilogue or both. The kernel-level ops of the ``cuda`` backend live with it, in
:mod:`fusedconvlstm.cuda`.
"""

from fusedconvlstm.ops.conv1d import (
    conv1d_stack,
    conv1d_stack_embedding,
    conv1d_stack_embedding_projection,
    conv1d_stack_projection,
)
from fusedconvlstm.ops.lstm import lstm_layer, lstm_recurrence

__all__ = [
    "conv1d_stack",
    "conv1d_stack_embedding",
    "conv1d_stack_embedding_projection",
    "conv1d_stack_projection",
    "lstm_layer",
    "lstm_recurrence",
]
