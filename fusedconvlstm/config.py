"""The package's settings from the environment, read once into a typed value.

Every ``FUSEDCONVLSTM_*`` variable the Python side obeys is a field of :class:`Settings`; the values
are read when first needed and kept, so no call on a hot path reads the environment. A program
that changes ``os.environ`` afterwards calls :func:`reload`; tests and benchmarks change settings
for a block with :func:`override`. Values are kept as given (stripped): each is checked where it
is used, so a bad value fails the call that depends on it with the variable's name, never the
import of the package. The compiled CUDA kernels read their barrier settings
(``FUSEDCONVLSTM_BARRIER_TIMEOUT_S``, ``FUSEDCONVLSTM_BARRIER_POLL_NS``) themselves, at each launch.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass


@dataclass(frozen=True)
class Settings:
    backend: str = ""
    """``FUSEDCONVLSTM_BACKEND``: what ``backend="auto"`` means (empty: auto)."""
    lstm_forward_kernel: str = ""
    """``FUSEDCONVLSTM_LSTM_FWD_KERNEL``: the cuda backend's first-choice persistent forward kernel."""
    lstm_forward_config: str = ""
    """``FUSEDCONVLSTM_LSTM_FWD_CONFIG``: a launch configuration for the cooperative forward."""
    lstm_backward_config: str = ""
    """``FUSEDCONVLSTM_LSTM_BWD_CONFIG``: a launch configuration for the persistent backward."""
    lstm_cluster_config: str = ""
    """``FUSEDCONVLSTM_LSTM_CLUSTER_CONFIG``: a launch configuration for the cluster forward."""
    lstm_input_config: str = ""
    """``FUSEDCONVLSTM_LSTM_INPUT_CONFIG``: a launch configuration for the in-kernel projection forward."""
    conv1d_strategy: str = ""
    """``FUSEDCONVLSTM_CONV1D_STRATEGY``: the Triton conv stack's ``fused`` or ``layers`` launch (empty: auto)."""
    conv1d_tap_order: str = ""
    """``FUSEDCONVLSTM_CONV1D_TAP_ORDER``: the Triton conv tiles' loop, taps ``outer`` (empty) or ``inner``."""
    triton_lstm_stages: str = ""
    """``FUSEDCONVLSTM_TRITON_LSTM_STAGES``: Triton's ``num_stages`` for the LSTM kernels (empty: 1)."""
    cache_dir: str = ""
    """``FUSEDCONVLSTM_CACHE_DIR``, else ``$XDG_CACHE_HOME/fusedconvlstm``, else ``~/.cache/fusedconvlstm``."""
    triton_interpret: bool = False
    """``TRITON_INTERPRET=1``: Triton runs kernels on CPU tensors in its interpreter."""


ENV = {
    "backend": "FUSEDCONVLSTM_BACKEND",
    "lstm_forward_kernel": "FUSEDCONVLSTM_LSTM_FWD_KERNEL",
    "lstm_forward_config": "FUSEDCONVLSTM_LSTM_FWD_CONFIG",
    "lstm_backward_config": "FUSEDCONVLSTM_LSTM_BWD_CONFIG",
    "lstm_cluster_config": "FUSEDCONVLSTM_LSTM_CLUSTER_CONFIG",
    "lstm_input_config": "FUSEDCONVLSTM_LSTM_INPUT_CONFIG",
    "conv1d_strategy": "FUSEDCONVLSTM_CONV1D_STRATEGY",
    "conv1d_tap_order": "FUSEDCONVLSTM_CONV1D_TAP_ORDER",
    "triton_lstm_stages": "FUSEDCONVLSTM_TRITON_LSTM_STAGES",
    "cache_dir": "FUSEDCONVLSTM_CACHE_DIR",
    "triton_interpret": "TRITON_INTERPRET",
}
"""The environment variable of each field."""


def from_environment(environ: Mapping[str, str] = os.environ) -> Settings:
    """The settings ``environ`` gives."""
    values = {field: environ.get(var, "").strip() for field, var in ENV.items()}
    if not values["cache_dir"]:
        base = environ.get("XDG_CACHE_HOME", "").strip() or os.path.join(os.path.expanduser("~"), ".cache")
        values["cache_dir"] = os.path.join(base, "fusedconvlstm")
    values["triton_interpret"] = values["triton_interpret"] == "1"
    return Settings(**values)


_current: Settings | None = None


def current() -> Settings:
    """The settings in force: read from the environment the first time, then kept."""
    global _current
    if _current is None:
        _current = from_environment()
    return _current


def reload() -> Settings:
    """Read the environment again (after ``os.environ`` changed) and return the new settings."""
    global _current
    _current = from_environment()
    return _current


def choice(field: str, choices: tuple[str, ...], default: str) -> str:
    """Setting ``field``, or ``default`` where unset, checked against ``choices``: a value outside
    them fails the call that reads it, with the variable's name."""
    value = getattr(current(), field) or default
    if value not in choices:
        raise ValueError(f"{ENV[field]} must be one of {choices}, got {value!r}")
    return value


@contextlib.contextmanager
def override(**changes) -> Iterator[Settings]:
    """The current settings with ``changes`` (field names) inside the block, restored after."""
    global _current
    saved = current()
    _current = dataclasses.replace(saved, **changes)
    try:
        yield _current
    finally:
        _current = saved
