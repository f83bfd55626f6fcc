"""The compiled extension: built wherever nvcc and a CUDA build of torch exist (as in CI), loaded
with a readable reason otherwise, and registering the CUDA kernels of its ops."""

from __future__ import annotations

import shutil

import pytest
import torch

import fusedconvlstm
from fusedconvlstm import _extension
from fusedconvlstm._sources import sources_digest
from fusedconvlstm.numerics.recurrence import reverse_mask

CAN_BUILD = shutil.which("nvcc") is not None and torch.version.cuda is not None
KERNEL_OPS = ("lstm_cell_forward_", "lstm_cell_backward_")


@pytest.mark.skipif(not CAN_BUILD, reason="no nvcc or no CUDA build of torch: the extension is not expected")
def test_extension_was_built_and_loads():
    assert _extension.unavailable_reason() is None
    info = _extension.build_info()
    assert info["torch_target_version"] == "2.11"
    assert "8.0" in info["arch_list"] and "9.0a" in info["arch_list"]
    assert _extension.stale_reason() is None  # built from the sources csrc/ holds


def test_a_build_from_other_sources_is_reported(monkeypatch):
    monkeypatch.setattr(_extension, "_library_path", lambda: "/somewhere/_C.abi3.so")
    monkeypatch.setattr(_extension, "build_info", lambda: {"sources_sha256": "0" * 64})
    assert "built from other sources than csrc/ holds now" in _extension.stale_reason()
    monkeypatch.setattr(_extension, "build_info", lambda: {"torch_version": "2.11.0"})
    assert "recorded no digest" in _extension.stale_reason()


def test_sources_digest_follows_every_source_and_needs_csrc(tmp_path):
    assert sources_digest(str(tmp_path)) is None  # an installed wheel: no sources beside it
    (tmp_path / "csrc").mkdir()
    (tmp_path / "csrc" / "a.cu").write_text("kernel")
    (tmp_path / "setup.py").write_text("setup()")
    first = sources_digest(str(tmp_path))
    (tmp_path / "setup.py").write_text("setup(ext_modules=[])")
    second = sources_digest(str(tmp_path))
    (tmp_path / "csrc" / "b.cuh").write_text("")
    assert len({first, second, sources_digest(str(tmp_path))}) == 3


@pytest.mark.skipif(not CAN_BUILD, reason="no nvcc or no CUDA build of torch: the extension is not expected")
@pytest.mark.parametrize("op", KERNEL_OPS)
def test_extension_registers_cuda_kernels(op):
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedconvlstm::{op}", "CUDA")
    assert torch._C._dispatch_has_kernel_for_dispatch_key(f"fusedconvlstm::{op}", "CPU")


def test_missing_extension_reason(monkeypatch):
    monkeypatch.setattr(_extension, "_library_path", lambda: None)
    reason = _extension.unavailable_reason.__wrapped__()
    assert "without its CUDA extension" in reason and "--no-build-isolation" in reason


def test_extension_for_a_newer_torch_is_refused_with_a_sentence(monkeypatch):
    monkeypatch.setattr(_extension, "_library_path", lambda: "/nonexistent/_C.abi3.so")
    monkeypatch.setattr(_extension, "build_info", lambda: {"torch_target_version": "99.0", "torch_version": "99.0.0"})
    reason = _extension.unavailable_reason.__wrapped__()
    assert "targets the stable ABI of torch >= 99.0" in reason and torch.__version__ in reason


def test_unloadable_library_is_reported(monkeypatch, tmp_path):
    bogus = tmp_path / "_C.abi3.so"
    bogus.write_bytes(b"not a shared library")
    monkeypatch.setattr(_extension, "_library_path", lambda: str(bogus))
    monkeypatch.setattr(_extension, "build_info", lambda: {"torch_target_version": "2.11", "torch_version": "2.11.0"})
    if torch.version.cuda is None:
        pytest.skip("CPU-only torch: refused before loading")
    reason = _extension.unavailable_reason.__wrapped__()
    assert "cannot be loaded into torch" in reason


def test_cell_ops_opcheck_on_cpu():
    T, B, D, H = 4, 3, 2, 5
    lengths = torch.tensor([4, 2, 0])
    xg = torch.randn(T, B, D, 4 * H, dtype=torch.float64)
    hh = torch.randn(D, B, 4 * H, dtype=torch.float64)
    h, c = torch.randn(D, B, H, dtype=torch.float64), torch.randn(D, B, H, dtype=torch.float64)
    y, ws = torch.empty(T, B, D, H, dtype=torch.float64), torch.empty(T, B, D, 5 * H, dtype=torch.float64)
    mask = reverse_mask([False, True])
    torch.library.opcheck(torch.ops.fusedconvlstm.lstm_cell_forward_.default, (hh, xg, h, c, y, ws, lengths, 1, mask))
    dgates, dstep = torch.empty(T, B, D, 4 * H, dtype=torch.float64), torch.empty(D, B, 4 * H, dtype=torch.float64)
    args = (
        torch.randn(D, B, H, dtype=torch.float64),
        torch.randn(T, B, D, H, dtype=torch.float64),
        ws,
        c.clone(),
        torch.randn(D, B, H, dtype=torch.float64),
        torch.randn(D, B, H, dtype=torch.float64),
        dgates,
        dstep,
        lengths,
        1,
        mask,
    )
    torch.library.opcheck(torch.ops.fusedconvlstm.lstm_cell_backward_.default, args)


def test_cuda_backend_refuses_cpu_tensors_with_reason():
    xg = torch.randn(3, 2, 1, 8)
    w = [torch.randn(8, 2)]
    with pytest.raises(fusedconvlstm.BackendUnavailableError, match="cuda"):
        fusedconvlstm.lstm_recurrence(xg, w, backend="cuda")
