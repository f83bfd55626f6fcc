"""Small forward + backward calls of every GPU kernel, for ``compute-sanitizer`` (scripts/sanitize.sh).

Sizes are odd on purpose (tile edges, masked rows): T=7, B=5, H=40, two recurrences with lengths,
on the cuda backend's cooperative and cluster forward kernels and on Triton (also the final
state only, and with proj_size);
a three-layer conv stack with a strided last layer, tokens and projection.
"""

from __future__ import annotations

import os

import torch

import fusedconvlstm
from fusedconvlstm import backends, config
from fusedconvlstm.cuda.persistent_config import FORWARD_KERNEL_ENV


def lstm_cases() -> None:
    # The cooperative kernels once more with the barrier's relaxed polls and back-off (read by the
    # kernels at each launch).
    runs = (
        ("cuda", "cooperative", "0"),
        ("cuda", "cooperative", "64"),
        ("cuda", "cluster", "0"),
        ("triton", None, "0"),
    )
    for backend, kernel, poll_ns in runs:
        os.environ["FUSEDCONVLSTM_BARRIER_POLL_NS"] = poll_ns
        if kernel is not None:
            os.environ[FORWARD_KERNEL_ENV] = kernel
            config.reload()  # the package reads its settings once
        for dtype in (torch.float32, torch.float16, torch.bfloat16):
            xg = torch.randn(7, 5, 2, 160, device="cuda", dtype=dtype, requires_grad=True)
            w = [torch.randn(160, 40, device="cuda", dtype=dtype, requires_grad=True) * 0.1 for _ in range(2)]
            lengths = torch.tensor([7, 3, 1, 6, 7], device="cuda")
            try:
                y, h, c = fusedconvlstm.lstm_recurrence(xg, w, lengths=lengths, reverse=[False, True], backend=backend)
            except backends.BackendUnavailableError as exc:
                print(f"skip lstm {backend} {dtype}: {exc}")
                continue
            (y.float().sum() + h.float().sum() + c.float().sum()).backward()
            with torch.no_grad():  # the final state only: no y, no workspace stored
                fusedconvlstm.lstm_recurrence(
                    xg, w, lengths=lengths, reverse=[False, True], backend=backend, return_sequence=False
                )
            # proj_size: the recurrence on W_hh W_hr (160 x 40) with the projection after it.
            w_p = [torch.randn(160, 24, device="cuda", dtype=dtype, requires_grad=True) * 0.1 for _ in range(2)]
            w_hr = [torch.randn(24, 40, device="cuda", dtype=dtype, requires_grad=True) * 0.1 for _ in range(2)]
            y, h, c = fusedconvlstm.lstm_recurrence(
                xg, w_p, w_hr=w_hr, lengths=lengths, reverse=[False, True], backend=backend
            )
            (y.float().sum() + h.float().sum() + c.float().sum()).backward()
            print(f"lstm {backend}{'' if kernel is None else ' ' + kernel} {dtype}: ok")


def conv_cases() -> None:
    for dtype in (torch.float32, torch.float16, torch.bfloat16):
        table = torch.randn(50, 24, device="cuda", dtype=dtype, requires_grad=True)
        weight = [
            torch.randn(o, i, 3, device="cuda", dtype=dtype, requires_grad=True)
            for i, o in ((24, 33), (33, 33), (33, 40))
        ]
        bias = [torch.randn(w.shape[0], device="cuda", dtype=dtype, requires_grad=True) for w in weight]
        proj_w = torch.randn(96, 40, device="cuda", dtype=dtype, requires_grad=True)
        tokens = torch.randint(0, 50, (5, 37), device="cuda")
        gates = fusedconvlstm.ops.conv1d.conv1d_stack_embedding_projection(
            tokens, table, weight, bias, proj_w, None, stride=[1, 1, 2], backend="triton"
        )
        gates.float().sum().backward()
        print(f"conv1d_stack triton {dtype}: ok")


if __name__ == "__main__":
    lstm_cases()
    conv_cases()
    torch.cuda.synchronize()
