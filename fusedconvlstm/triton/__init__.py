"""Triton backend: kernels for the Conv1d stack and the LSTM recurrence.

Nothing here imports Triton at package import time; the kernels load on first use.
"""
