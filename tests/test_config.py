"""The package's settings: read from the environment once, typed, overridable for a block."""

from __future__ import annotations

import dataclasses
import os

import pytest

from fusedconvlstm import backends, config
from fusedconvlstm.cuda import persistent_config as pc


def test_every_setting_has_its_variable():
    fields = {f.name for f in dataclasses.fields(config.Settings)}
    assert fields == set(config.ENV)
    assert all(v.startswith("FUSEDCONVLSTM_") for k, v in config.ENV.items() if k != "triton_interpret")


def test_from_environment_types_and_defaults():
    s = config.from_environment(
        {
            "FUSEDCONVLSTM_BACKEND": " cuda ",
            "TRITON_INTERPRET": "1",
            "XDG_CACHE_HOME": "/x",
            "FUSEDCONVLSTM_LSTM_FWD_CONFIG": "4,2,4,1,1",
        }
    )
    assert s.backend == "cuda" and s.triton_interpret is True and s.cache_dir == os.path.join("/x", "fusedconvlstm")
    assert s.lstm_forward_config == "4,2,4,1,1" and s.lstm_forward_kernel == "" and s.conv1d_strategy == ""
    empty = config.from_environment({"HOME": "/h"})
    assert (
        empty.backend == ""
        and empty.triton_interpret is False
        and empty.cache_dir.endswith(os.path.join(".cache", "fusedconvlstm"))
    )
    assert config.from_environment({"FUSEDCONVLSTM_CACHE_DIR": "/c", "XDG_CACHE_HOME": "/x"}).cache_dir == "/c"


def test_read_once_until_reload():
    """A change of os.environ is seen after reload() only: calls never read the environment."""
    saved = os.environ.get(config.ENV["backend"])
    try:
        os.environ[config.ENV["backend"]] = "reference"
        assert config.current().backend == ""  # the conftest read it before
        assert backends.requested_backend("auto") == "auto"
        assert config.reload().backend == "reference"
        assert backends.requested_backend("auto") == "reference"
    finally:
        if saved is None:
            os.environ.pop(config.ENV["backend"], None)
        else:
            os.environ[config.ENV["backend"]] = saved
        config.reload()


def test_override_is_a_block_and_restores():
    before = config.current()
    with config.override(lstm_forward_kernel="cluster", conv1d_strategy="layers") as s:
        assert s is config.current() and s.lstm_forward_kernel == "cluster"
        assert pc.preferred_forward_kernel() == "cluster"
    assert config.current() is before and pc.preferred_forward_kernel() == "cooperative"
    with pytest.raises(TypeError):
        with config.override(no_such_setting=1):
            pass


def test_a_bad_value_fails_the_call_that_uses_it_not_the_import(monkeypatch):
    monkeypatch.setenv(config.ENV["lstm_forward_kernel"], "warp-speed")
    with pytest.raises(ValueError, match="FUSEDCONVLSTM_LSTM_FWD_KERNEL must be one of"):
        pc.preferred_forward_kernel()
    monkeypatch.setenv(config.ENV["backend"], "gpu")
    with pytest.raises(ValueError, match="FUSEDCONVLSTM_BACKEND must be one of"):
        backends.requested_backend("auto")


def test_choice_gives_the_default_where_unset_and_names_the_variable_of_a_bad_value():
    choices = ("outer", "inner")
    with config.override(conv1d_tap_order=""):
        assert config.choice("conv1d_tap_order", choices, "outer") == "outer"
    with config.override(conv1d_tap_order="inner"):
        assert config.choice("conv1d_tap_order", choices, "outer") == "inner"
    with config.override(conv1d_tap_order="sideways"):
        with pytest.raises(
            ValueError, match=r"FUSEDCONVLSTM_CONV1D_TAP_ORDER must be one of \('outer', 'inner'\), got 'sideways'"
        ):
            config.choice("conv1d_tap_order", choices, "outer")
