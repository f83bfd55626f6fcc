"""Precision of the Triton LSTM's data path that no accuracy bound on random data notices.

``h·W_hhᵀ`` reaches the gates in float32 (the dot's accumulator), never rounded to the input's
16-bit dtype before ``xg`` is added: a case where the product and ``xg`` nearly cancel shows the
difference (the product 1000.3 rounds to 1000.5 in float16, which moves the first gate from
sigmoid(0.3) to sigmoid(0.5)); random inputs within twice the reference's error do not.
"""

from __future__ import annotations

import pytest
import torch

from fusedconvlstm.reference.lstm import lstm_recurrence_reference
from fusedconvlstm.triton import lstm as triton_lstm

pytestmark = pytest.mark.triton
DEVICE = torch.device("cuda" if torch.cuda.is_available() else "cpu")
TRITON_TESTS_FOLLOW_THE_GPU = True  # its tensors go to the GPU there (tests/conftest.py)


def test_recurrent_product_reaches_the_gates_unrounded():
    H, B = 16, 3
    w = torch.zeros(4 * H, H, dtype=torch.float16)
    w[:, 0], w[:, 1], w[:, 2] = 512.0, 488.0, 0.3  # each exact in float16 (0.3 as its nearest)
    h0 = torch.zeros(1, B, H, dtype=torch.float16)
    h0[..., :3] = 1.0
    c0 = torch.zeros(1, B, H, dtype=torch.float16)
    xg = torch.full((1, B, 1, 4 * H), -1000.0, dtype=torch.float16)
    args = [t.to(DEVICE) for t in (xg, w, h0, c0)]
    y, _, c_n, _ = triton_lstm.lstm_forward(args[0], [args[1]], args[2], args[3], None, [False])
    ref = lstm_recurrence_reference(xg.double(), [w.double()], [], h0.double(), c0.double(), None, [False])
    product = 512.0 + 488.0 + float(torch.tensor(0.3, dtype=torch.float16))
    rounded = float(torch.tensor(product, dtype=torch.float16))
    assert rounded - product > 0.15  # the case discriminates
    err = (c_n.double().cpu() - ref[2]).abs().max().item()
    # c_1 = sigmoid(pre) * tanh(pre) with pre = 0.3: 0.0766; with pre = 0.5: 0.2864.
    assert err < 2e-3, f"c_n off by {err}: h W_hh was rounded to float16 before the gates"
    assert (y.double().cpu() - ref[0]).abs().max().item() < 2e-3
