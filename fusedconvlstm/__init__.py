"""fusedconvlstm: fused Conv1d-stack and LSTM kernels (Triton and CUDA) for PyTorch.

The public surface:

- modules :class:`LSTM` (drop-in for ``torch.nn.LSTM``) and :class:`Conv1dStack` (a chain of
  Conv1d layers on channels-last data), and :func:`convert` to swap them into a model;
- ops :func:`lstm_recurrence` and :func:`conv1d_stack` (``torch.ops.fusedconvlstm.*``), with the
  stack's embedding prologue and projection epilogue as :func:`conv1d_stack_embedding`,
  :func:`conv1d_stack_projection` and :func:`conv1d_stack_embedding_projection`;
- :mod:`fusedconvlstm.models` with the reference model ``ConvLSTMClassifier``;
- :mod:`fusedconvlstm.keras`, imported on its own: Keras checkpoints and layers as these modules;
- :mod:`fusedconvlstm.backends`: which backend serves a call and why another cannot.
"""

import importlib.util  # noqa: I001  (schemas first: the backends register against them)
from fusedconvlstm import ops  # noqa: F401, I001
from fusedconvlstm.reference import conv1d as _reference_conv1d  # noqa: F401
from fusedconvlstm.reference import lstm as _reference_lstm  # noqa: F401
from fusedconvlstm import torch_backend as _torch_backend  # noqa: F401
from fusedconvlstm.cuda import lstm as _cuda_lstm  # noqa: F401
from fusedconvlstm.triton import lstm as _triton_lstm  # noqa: F401  (imports Triton only when a kernel runs)

if importlib.util.find_spec("triton") is not None:  # the conv kernels import Triton: only where it is installed
    from fusedconvlstm.triton import conv1d_stack as _triton_conv1d_stack  # noqa: F401
from fusedconvlstm import _extension
from fusedconvlstm._version import __version__  # noqa: F401
from fusedconvlstm.backends import BACKENDS, BackendUnavailableError
from fusedconvlstm.nn import LSTM, Conv1dStack, ParallelLSTM, convert, parallel_lstm
from fusedconvlstm.ops import (
    conv1d_stack,
    conv1d_stack_embedding,
    conv1d_stack_embedding_projection,
    conv1d_stack_projection,
    lstm_recurrence,
)

# Register the compiled CUDA kernels (if built) now that their op schemas exist; a failure is
# recorded and reported by the cuda backend, never raised at import.
_extension.unavailable_reason()

__all__ = [
    "BACKENDS",
    "BackendUnavailableError",
    "Conv1dStack",
    "LSTM",
    "ParallelLSTM",
    "conv1d_stack",
    "conv1d_stack_embedding",
    "conv1d_stack_embedding_projection",
    "conv1d_stack_projection",
    "convert",
    "lstm_recurrence",
    "parallel_lstm",
]
