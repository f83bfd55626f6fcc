"""Triton backend: kernels for the Conv1d stack and the LSTM recurrence.

The LSTM module loads Triton on first use. The Conv1d modules (``conv1d``, ``conv1d_fused_stack``,
``conv1d_stack``) import it directly; the package imports them only where Triton is installed.
"""
