"""Backend selection: auto, the environment override, named backends that cannot serve."""

from __future__ import annotations

import pytest
import torch

from fusedconvlstm import BackendUnavailableError, backends, lstm_recurrence
from fusedconvlstm.calls.lstm import check_lstm_recurrence_args
from fusedconvlstm.numerics.precision import fp32_allows_tf32
from fusedconvlstm.ops.lstm import resolve_lstm_backend
from tests.helpers import lstm_weights


def _call(device="cpu"):
    xg = torch.randn(3, 2, 1, 8)
    w = lstm_weights(1, 2, dtype=torch.float32)
    return check_lstm_recurrence_args(xg, w, [], torch.zeros(1, 2, 2), torch.zeros(1, 2, 2), None, [False]), xg, w


def test_both_ops_are_registered_with_a_reference():
    assert set(backends.registered_ops()) >= {"lstm_recurrence", "conv1d_stack"}
    for op in ("lstm_recurrence", "conv1d_stack"):
        assert backends.implementation(op, "reference").backend == "reference"


def test_auto_on_cpu_is_torch():
    call, _, _ = _call()
    assert resolve_lstm_backend("auto", call) == "torch"


def test_environment_variable_replaces_auto(monkeypatch):
    call, xg, w = _call()
    monkeypatch.setenv(backends.ENV_VAR, "reference")
    assert resolve_lstm_backend("auto", call) == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "cuda")
    with pytest.raises(BackendUnavailableError, match="backend='cuda' cannot serve"):
        lstm_recurrence(xg, w)
    # An explicit backend argument is not overridden.
    assert resolve_lstm_backend("reference", call) == "reference"
    monkeypatch.setenv(backends.ENV_VAR, "fastest")
    with pytest.raises(ValueError, match="FUSEDCONVLSTM_BACKEND must be one of"):
        lstm_recurrence(xg, w)


def test_named_backend_errors_say_why(monkeypatch):
    call, xg, w = _call()
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(BackendUnavailableError, match="interpreter"):
        lstm_recurrence(xg, w, backend="triton")
    with pytest.raises(BackendUnavailableError, match="CUDA tensors only|CUDA extension"):
        lstm_recurrence(xg, w, backend="cuda")
    with pytest.raises(ValueError, match="backend must be one of"):
        lstm_recurrence(xg, w, backend="cudnn")


def test_explain_lists_every_backend():
    call, _, _ = _call()
    reasons = backends.explain("lstm_recurrence", call, torch.device("cpu"))
    assert set(reasons) == set(backends.BACKENDS) | {backends.AUTO}
    assert reasons["reference"] is None and reasons["torch"] is None
    assert reasons["auto"].startswith("torch: ")
    assert isinstance(reasons["cuda"], str) and reasons["cuda"]


def test_tf32_rule_rejects_an_unknown_op():
    with pytest.raises(ValueError, match="unknown op 'gemm'"):
        fp32_allows_tf32("gemm")


def test_wrappers_leave_resolution_to_the_op_while_compiling():
    """Resolving a CUDA call reads the device and the extension's state, which dynamo cannot trace:
    under torch.compile the wrappers hand the request to the op unresolved (the op resolves it
    when it runs); eagerly they resolve it, so a named backend that cannot serve raises at once."""
    call, _, _ = _call()
    cuda_call = type(call)(**{**call.__dict__, "device": torch.device("cuda")})
    cuda = torch.device("cuda")

    def f(x):
        return x + len(backends.backend_for_op("lstm_recurrence", "auto", cuda_call, cuda))

    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="eager")(torch.zeros(2))
    assert torch.equal(out, torch.full((2,), float(len("auto"))))
    assert backends.backend_for_op("lstm_recurrence", "auto", call, torch.device("cpu")) == "torch"
    with pytest.raises(BackendUnavailableError):
        backends.backend_for_op("lstm_recurrence", "cuda", call, torch.device("cpu"))


def test_constant_mark_is_torch_compiles_own():
    """The package marks its traced-as-constant functions as ``torch.compiler.assume_constant_result``
    does (without importing dynamo at package import): the same attributes, the same function."""

    def probe():
        return 1

    def ours():
        return 1

    marked = torch.compiler.assume_constant_result(probe)
    assert marked is probe
    assert backends._assume_constant_result(ours) is ours
    added = set(vars(probe)) - set(vars(lambda: None))
    assert added and added == set(vars(ours)) and all(vars(ours)[k] == vars(probe)[k] for k in added)
    assert all(getattr(backends._resolved_name, k) == vars(probe)[k] for k in added)
    assert all(getattr(backends._requested_off_cuda, k) == vars(probe)[k] for k in added)


def test_importing_the_package_does_not_import_dynamo():
    """``import fusedconvlstm`` stays light: torch.compile's frontend (about a second to import) is
    loaded only by those who compile, and optional packages only when used."""
    import subprocess
    import sys

    code = "import sys, fusedconvlstm; print(' '.join(m for m in ('torch._dynamo', 'h5py', 'matplotlib') if m in sys.modules))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip()
    assert out == ""


def test_an_implementation_must_satisfy_its_ops_interface():
    """Each op declares a Protocol (``calls``); an implementation lacking one of its members is
    refused when it registers, naming what is missing, and none is registered."""
    with pytest.raises(TypeError, match=r"lacks \['workspace_shape'\] of LSTMRecurrenceBackend"):
        backends.register_implementation(
            "lstm_recurrence", "reference", why_not=lambda call: None, forward=print, backward=print
        )
    with pytest.raises(TypeError, match=r"lacks \['saved_shapes'\] of Conv1dStackBackend"):
        backends.register_implementation(
            "conv1d_stack", "reference", why_not=lambda c: None, forward=print, backward=print
        )
    assert backends.implementation("lstm_recurrence", "reference").workspace_shape is not None
    for op in backends.registered_ops():
        for name in backends.BACKENDS:
            impl = backends.implementation(op, name)
            assert impl is None or isinstance(impl, backends._INTERFACE[op])
