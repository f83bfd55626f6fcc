"""Drop-in modules: ``LSTM`` (for ``torch.nn.LSTM``), ``Conv1dStack`` (for a chain of ``nn.Conv1d``)."""

from fusedconvlstm.nn.conv1d_stack import Conv1dStack
from fusedconvlstm.nn.convert import convert
from fusedconvlstm.nn.lstm import LSTM, ParallelLSTM, parallel_lstm

__all__ = ["LSTM", "Conv1dStack", "ParallelLSTM", "convert", "parallel_lstm"]
