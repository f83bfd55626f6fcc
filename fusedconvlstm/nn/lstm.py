"""``fusedconvlstm.LSTM``: a drop-in ``torch.nn.LSTM`` running on the package's recurrence op.

Each layer is one input-projection GEMM for all time steps and all directions
(``F.linear`` with the directions' ``W_ih`` stacked) followed by one ``lstm_recurrence`` call that
runs both directions (:func:`fusedconvlstm.ops.lstm.lstm_layer`; where the cuda backend's
in-kernel projection is chosen, ``FUSEDCONVLSTM_LSTM_FWD_KERNEL=input``, one launch does both). Parameters, their names and their initialization are ``nn.LSTM``'s, so
``load_state_dict`` works both ways.

Where the dispatcher answers ``torch`` (:func:`fusedconvlstm.backends.module_backend`: ``auto`` on
the CPU, and on a GPU wherever no validation record enables a kernel) the module calls
``torch.lstm`` with its own weights instead, as ``nn.LSTM`` does: ``nn.LSTM``'s results.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from fusedconvlstm import backends, torch_backend
from fusedconvlstm.calls.lstm import OP as LSTM_OP
from fusedconvlstm.calls.lstm import LSTMRecurrenceCall
from fusedconvlstm.numerics import precision
from fusedconvlstm.ops.lstm import lstm_layer


def lstm_autocast_dtype(x: Tensor) -> torch.dtype | None:
    """The dtype ``nn.LSTM`` runs in under autocast: on CUDA float16 whatever the autocast dtype
    (PyTorch's autocast wrapper of cuDNN's RNN casts to half, aten/src/ATen/cudnn/AutocastRNN.cpp),
    elsewhere the autocast dtype. A drop-in module follows it; to run bfloat16, convert the module
    (``lstm.to(torch.bfloat16)``) instead."""
    cast = precision.autocast_dtype(x)
    if cast is not None and x.device.type == "cuda":
        return torch.float16
    return cast


def torch_lstm_traceable() -> bool:
    """Whether a module answered ``torch`` by the dispatcher may call ``torch.lstm``: not while
    ``torch.compile`` traces a forward that records gradients, where AOT autograd cannot trace
    aten's LSTM backward (it raises, torch 2.11 to 2.14). There the module runs the ``torch``
    backend's gate-level op instead (``F.linear`` and aten ops step by step), which compiles."""
    return not (torch.compiler.is_compiling() and torch.is_grad_enabled())


class LSTM(nn.Module):
    """``torch.nn.LSTM`` with the recurrence computed by a ``fusedconvlstm`` backend.

    Takes every argument of ``torch.nn.LSTM`` plus ``backend`` (``"auto"``, ``"torch"``,
    ``"reference"``, ``"triton"`` or ``"cuda"``; see :mod:`fusedconvlstm.backends`). Parameters have
    ``nn.LSTM``'s names, shapes, registration order and initialization, so state dicts load both
    ways. ``forward`` has the signature and the results of ``nn.LSTM.forward``:
    ``(output, (h_n, c_n))`` for batched, unbatched and packed input.

    It is deliberately not a subclass of ``nn.LSTM``: ``torch.compile`` refuses to trace any
    ``nn.RNNBase`` (a graph break), while this module compiles with ``fullgraph=True``.
    """

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        num_layers: int = 1,
        bias: bool = True,
        batch_first: bool = False,
        dropout: float = 0.0,
        bidirectional: bool = False,
        proj_size: int = 0,
        device=None,
        dtype=None,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        for name, value in (("input_size", input_size), ("hidden_size", hidden_size), ("num_layers", num_layers)):
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ValueError(f"LSTM: {name} must be a positive integer, got {value!r}")
        if not isinstance(dropout, (int, float)) or isinstance(dropout, bool) or not 0 <= dropout <= 1:
            raise ValueError(f"LSTM: dropout must be a number in [0, 1], got {dropout!r}")
        if not isinstance(proj_size, int) or proj_size < 0:
            raise ValueError(
                f"LSTM: proj_size must be a positive integer or zero to disable projections, got {proj_size!r}"
            )
        if proj_size >= hidden_size:
            raise ValueError(f"LSTM: proj_size must be smaller than hidden_size ({hidden_size}), got {proj_size}")
        if dropout > 0 and num_layers == 1:
            warnings.warn(
                "dropout option adds dropout after all but last recurrent layer, so non-zero dropout expects "
                f"num_layers greater than 1, but got dropout={dropout} and num_layers={num_layers}",
                stacklevel=2,
            )
        self.input_size, self.hidden_size, self.num_layers = input_size, hidden_size, num_layers
        self.bias, self.batch_first, self.dropout = bias, batch_first, float(dropout)
        self.bidirectional, self.proj_size = bidirectional, proj_size
        self.backend = backends.check_backend_name(backend)
        factory = {"device": device, "dtype": dtype}
        D = 2 if bidirectional else 1
        real_hidden = proj_size if proj_size > 0 else hidden_size
        # nn.LSTM's registration order (per layer, per direction: w_ih, w_hh, b_ih, b_hh, w_hr), so
        # that parameters() and the initialization draw in the same order.
        for layer in range(num_layers):
            layer_in = input_size if layer == 0 else real_hidden * D
            for suffix in ["", "_reverse"][:D]:
                shapes = {"weight_ih": (4 * hidden_size, layer_in), "weight_hh": (4 * hidden_size, real_hidden)}
                if bias:
                    shapes.update(bias_ih=(4 * hidden_size,), bias_hh=(4 * hidden_size,))
                if proj_size > 0:
                    shapes["weight_hr"] = (proj_size, hidden_size)
                for kind, shape in shapes.items():
                    self.register_parameter(f"{kind}_l{layer}{suffix}", nn.Parameter(torch.empty(shape, **factory)))
        self.reset_parameters()
        self.flatten_parameters()

    def reset_parameters(self) -> None:
        """``nn.LSTM``'s initialization: every parameter uniform in ``±1/sqrt(hidden_size)``."""
        bound = 1.0 / math.sqrt(self.hidden_size) if self.hidden_size > 0 else 0
        for p in self.parameters():
            nn.init.uniform_(p, -bound, bound)

    def flatten_parameters(self) -> None:
        """As ``nn.LSTM.flatten_parameters``: on a CUDA device with cuDNN, make the weights views
        of one buffer in cuDNN's layout, so torch's LSTM kernel (the ``torch`` backend) does not
        repack them on every call. Called after every move (``.to``, ``.cuda``, ``.half``); a
        no-op on the CPU, for weights of mixed dtypes, and for weights that alias each other."""
        weights = self._flat_weights
        first = weights[0]
        if not all(w.is_cuda and w.dtype == first.dtype and torch.backends.cudnn.is_acceptable(w) for w in weights):
            return
        if len({w.data_ptr() for w in weights}) != len(weights) or not torch._use_cudnn_rnn_flatten_weight():
            return
        from torch.backends.cudnn import rnn as cudnn_rnn

        per_layer = (4 if self.bias else 2) + (1 if self.proj_size > 0 else 0)
        with torch.cuda.device_of(first), torch.no_grad():
            torch._cudnn_rnn_flatten_weight(
                weights,
                per_layer,
                self.input_size,
                cudnn_rnn.get_cudnn_mode("LSTM"),
                self.hidden_size,
                self.proj_size,
                self.num_layers,
                self.batch_first,
                self.bidirectional,
            )

    def _apply(self, fn, recurse=True):
        out = super()._apply(fn, recurse)
        self.flatten_parameters()
        return out

    @property
    def all_weights(self) -> list[list[nn.Parameter]]:
        """Parameters grouped per layer and direction, as ``nn.LSTM.all_weights``."""
        groups: dict[str, list[nn.Parameter]] = {}
        for name, p in self.named_parameters():
            groups.setdefault(name.split("_", 2)[2], []).append(p)
        return list(groups.values())

    @classmethod
    def from_torch(cls, module: nn.LSTM, backend: str = "auto") -> LSTM:
        """A fused LSTM with the configuration and a copy of the weights of ``module``."""
        if not isinstance(module, nn.LSTM):
            raise TypeError(f"module must be a torch.nn.LSTM, got {type(module).__name__}")
        ref = next(module.parameters())
        new = cls(
            module.input_size,
            module.hidden_size,
            num_layers=module.num_layers,
            bias=module.bias,
            batch_first=module.batch_first,
            dropout=module.dropout,
            bidirectional=module.bidirectional,
            proj_size=module.proj_size,
            device=ref.device,
            dtype=ref.dtype,
            backend=backend,
        )
        new.load_state_dict(module.state_dict())
        new.train(module.training)
        return new

    def extra_repr(self) -> str:
        s = f"{self.input_size}, {self.hidden_size}"
        defaults = {
            "proj_size": 0,
            "num_layers": 1,
            "bias": True,
            "batch_first": False,
            "dropout": 0.0,
            "bidirectional": False,
        }
        for name, default in defaults.items():
            if getattr(self, name) != default:
                s += f", {name}={getattr(self, name)}"
        return f"{s}, backend={self.backend!r}"

    def _layer_weights(
        self, layer: int, cast: torch.dtype | None = None
    ) -> tuple[Tensor, Tensor | None, list[Tensor], list[Tensor]]:
        suffixes = ["", "_reverse"][: 2 if self.bidirectional else 1]
        names = [f"l{layer}{s}" for s in suffixes]

        def get(kind: str, name: str) -> Tensor:
            p = getattr(self, f"{kind}_{name}")
            return p if cast is None else p.to(cast)

        w_ih = [get("weight_ih", n) for n in names]
        w_hh = [get("weight_hh", n) for n in names]
        w_hr = [get("weight_hr", n) for n in names] if self.proj_size > 0 else []
        w = w_ih[0] if len(w_ih) == 1 else torch.cat(w_ih)
        b = None
        if self.bias:
            b_ih = [get("bias_ih", n) for n in names]
            b_hh = [get("bias_hh", n) for n in names]
            # Sum per direction, then concatenate: the other order hands the bias_ih and bias_hh
            # of one direction views of the same gradient, and autograd's accumulation into .grad
            # then adds every later gradient twice.
            b = torch.cat([bi + bh for bi, bh in zip(b_ih, b_hh)])
        return w, b, w_hh, w_hr

    def forward(self, input: Tensor | PackedSequence, hx: tuple[Tensor, Tensor] | None = None):  # noqa: A002
        """``nn.LSTM.forward``: returns ``(output, (h_n, c_n))``."""
        packed = isinstance(input, PackedSequence)
        lengths = None
        hx_given = hx
        if packed:
            x = input.data.unsqueeze(0)  # checked as the padded input would be; padded where our op runs
            batched = True
        else:
            if not isinstance(input, Tensor):
                raise TypeError(f"LSTM: input must be a Tensor or PackedSequence, got {type(input).__name__}")
            if input.dim() not in (2, 3):
                raise ValueError(f"LSTM: Expected input to be 2D or 3D, got {input.dim()}D instead")
            batched = input.dim() == 3
            x = input if batched else input.unsqueeze(1)
            if batched and self.batch_first:
                x = x.transpose(0, 1)
        w0 = self.weight_ih_l0
        if x.shape[-1] != self.input_size:
            raise ValueError(
                f"LSTM: input.size(-1) must be equal to input_size. Expected {self.input_size}, got {x.shape[-1]}"
            )
        cast = lstm_autocast_dtype(x)
        if cast is not None:  # as nn.LSTM under autocast: input, states and weights in its dtype
            x = x.to(cast)
            hx = None if hx is None else tuple(h.to(cast) if isinstance(h, Tensor) else h for h in hx)
        elif not x.is_floating_point():
            raise TypeError(
                f"LSTM: input must be a floating-point tensor, got {x.dtype}; convert it: input.to({w0.dtype})"
            )
        elif x.dtype != w0.dtype:
            raise ValueError(
                f"LSTM: input dtype ({x.dtype}) does not match weight dtype ({w0.dtype}). Convert input: "
                f"input.to({w0.dtype}), or convert model: model.to({x.dtype})"
            )
        if x.device != w0.device:
            raise ValueError(f"LSTM: input is on {x.device} but the weights are on {w0.device}")
        T, B = (len(input.batch_sizes), int(input.batch_sizes[0])) if packed else (x.shape[0], x.shape[1])
        if T == 0:
            raise ValueError("LSTM: input must hold at least one time step, got sequence length 0")
        D = 2 if self.bidirectional else 1
        P = self.proj_size if self.proj_size > 0 else self.hidden_size
        h0, c0 = self._initial_state(hx, batched, B, D, P, x)
        name = backends.module_backend(
            LSTM_OP,
            self.backend,
            x.device,
            lambda: LSTMRecurrenceCall(
                T, B, D, self.hidden_size, self.proj_size, x.dtype, x.device, packed, (False, True)[:D],
                torch.is_grad_enabled(),
            ),
        )  # fmt: skip
        if name == backends.TORCH and torch_lstm_traceable():
            return self._forward_torch(input, hx_given, batched, B, D, P)
        if packed:
            x, lengths = pad_packed_sequence(input)  # (T, B, I), original batch order
            x = x if cast is None else x.to(cast)

        layer_input = x
        h_n, c_n = [], []
        for layer in range(self.num_layers):
            w, b, w_hh, w_hr = self._layer_weights(layer, cast)
            sl = slice(layer * D, (layer + 1) * D)
            y, hn, cn = lstm_layer(
                layer_input,
                w,
                b,
                w_hh,
                h0[sl],
                c0[sl],
                w_hr=w_hr,
                lengths=lengths,
                reverse=[False, True][:D],
                backend=name,
            )
            layer_input = y.view(T, B, D * P)
            if self.dropout > 0 and self.training and layer < self.num_layers - 1:
                layer_input = F.dropout(layer_input, self.dropout, training=True)
            h_n.append(hn)
            c_n.append(cn)
        output = layer_input
        h_n, c_n = torch.cat(h_n), torch.cat(c_n)

        if packed:
            sorted_idx = input.sorted_indices
            out_sorted = output if sorted_idx is None else output.index_select(1, sorted_idx)
            len_sorted = lengths if sorted_idx is None else lengths[sorted_idx.cpu()]
            data = pack_padded_sequence(out_sorted, len_sorted, enforce_sorted=True).data
            return PackedSequence(data, input.batch_sizes, input.sorted_indices, input.unsorted_indices), (h_n, c_n)
        if not batched:
            return output.squeeze(1), (h_n.squeeze(1), c_n.squeeze(1))
        if self.batch_first:
            output = output.transpose(0, 1)
        return output, (h_n, c_n)

    @property
    def _flat_weights(self) -> list[Tensor]:
        """The parameters in ``nn.LSTM._flat_weights``'s order (their registration order)."""
        return list(self.parameters())

    def _forward_torch(self, input, hx, batched: bool, B: int, D: int, P: int):  # noqa: A002
        """``nn.LSTM.forward`` on torch's kernels with this module's weights (checked input)."""
        batch_dim = 0 if self.batch_first else 1
        like = input.data if isinstance(input, PackedSequence) else input
        if hx is None:
            zeros = dict(dtype=like.dtype, device=like.device)
            L = self.num_layers * D
            hx = (torch.zeros(L, B, P, **zeros), torch.zeros(L, B, self.hidden_size, **zeros))
        elif not batched:
            hx = (hx[0].unsqueeze(1), hx[1].unsqueeze(1))
        if not isinstance(input, PackedSequence) and not batched:
            input = input.unsqueeze(batch_dim)  # noqa: A001
        output, (h_n, c_n) = torch_backend.lstm(
            input,
            hx,
            self._flat_weights,
            bias=self.bias,
            num_layers=self.num_layers,
            dropout=self.dropout,
            training=self.training,
            bidirectional=self.bidirectional,
            batch_first=self.batch_first,
        )
        if not batched:
            return output.squeeze(batch_dim), (h_n.squeeze(1), c_n.squeeze(1))
        return output, (h_n, c_n)

    def _initial_state(self, hx, batched: bool, B: int, D: int, P: int, x: Tensor) -> tuple[Tensor, Tensor]:
        L = self.num_layers
        if hx is None:
            return x.new_zeros(L * D, B, P), x.new_zeros(L * D, B, self.hidden_size)
        if not isinstance(hx, (tuple, list)) or len(hx) != 2:
            raise TypeError("LSTM: hx must be a tuple (h_0, c_0)")
        h0, c0 = hx
        expected = {"hx[0] (h_0)": (h0, P), "hx[1] (c_0)": (c0, self.hidden_size)}
        out = []
        for name, (t, size) in expected.items():
            if not isinstance(t, Tensor):
                raise TypeError(f"LSTM: {name} must be a Tensor, got {type(t).__name__}")
            want_dim = 3 if batched else 2
            if t.dim() != want_dim:
                kind = "batched" if batched else "unbatched"
                raise ValueError(f"LSTM: for {kind} input, {name} must be {want_dim}-D, got {t.dim()}-D")
            if not batched:
                t = t.unsqueeze(1)
            if tuple(t.shape) != (L * D, B, size):
                shown = (L * D, B, size) if batched else (L * D, size)
                got = tuple(t.shape) if batched else tuple(t.squeeze(1).shape)
                raise ValueError(f"LSTM: Expected {name} size {shown}, got {got}")
            if t.dtype != x.dtype:
                raise ValueError(f"LSTM: {name} dtype ({t.dtype}) does not match input dtype ({x.dtype})")
            if t.device != x.device:
                raise ValueError(f"LSTM: {name} is on {t.device} but input is on {x.device}")
            out.append(t)
        return out[0], out[1]


def _check_parallel(lstms: Sequence[LSTM], what: str) -> None:
    first = lstms[0]
    for k, m in enumerate(lstms):
        if m.num_layers != 1 or m.bidirectional or m.proj_size:
            raise ValueError(f"{what}: lstms[{k}] must be single-layer, unidirectional, without projection")
        same = (m.input_size, m.hidden_size, m.batch_first, m.bias)
        if same != (first.input_size, first.hidden_size, first.batch_first, first.bias):
            raise ValueError(
                f"{what}: lstms[{k}] must match lstms[0] in (input_size, hidden_size, batch_first, "
                f"bias) = {(first.input_size, first.hidden_size, first.batch_first, first.bias)}, got {same}"
            )


def parallel_input_projection(lstms: Sequence[LSTM], cast: torch.dtype | None = None) -> tuple[Tensor, Tensor | None]:
    """``(W, b)`` of the input projections of ``lstms`` as one GEMM: ``W_ih`` stacked and
    ``b_ih + b_hh`` concatenated (per LSTM, then concatenated: see ``LSTM._layer_weights``),
    cast to ``cast`` when given."""

    def get(p: Tensor) -> Tensor:
        return p if cast is None else p.to(cast)

    w = torch.cat([get(m.weight_ih_l0) for m in lstms])
    b = torch.cat([get(m.bias_ih_l0) + get(m.bias_hh_l0) for m in lstms]) if lstms[0].bias else None
    return w, b


def parallel_recurrent_weights(lstms: Sequence[LSTM], cast: torch.dtype | None = None) -> list[Tensor]:
    """The ``W_hh`` of ``lstms``, cast to ``cast`` when given."""
    return [m.weight_hh_l0 if cast is None else m.weight_hh_l0.to(cast) for m in lstms]


def parallel_lstm(
    lstms: Sequence[LSTM], input: Tensor, backend: str | None = None
) -> list[tuple[Tensor, tuple[Tensor, Tensor]]]:  # noqa: A002
    """Run several single-layer unidirectional LSTMs that read the same ``input`` in one recurrence.

    Their input projections are one GEMM (``W_ih`` stacked) and their recurrences one
    ``lstm_recurrence`` call, so a fused backend runs them in the same launch. Returns, per
    module, what its own ``forward(input)`` returns. ``backend`` defaults to the first module's.
    """
    _check_parallel(lstms, "parallel_lstm")
    first = lstms[0]
    if not isinstance(input, Tensor) or input.dim() != 3:
        raise ValueError(f"parallel_lstm: input must be a 3-D tensor, got {getattr(input, 'shape', type(input))}")
    cast = lstm_autocast_dtype(input)
    x = input.transpose(0, 1) if first.batch_first else input
    if cast is not None:
        x = x.to(cast)
    T, B = x.shape[0], x.shape[1]
    H, N = first.hidden_size, len(lstms)
    name = backends.module_backend(
        LSTM_OP,
        backend or first.backend,
        x.device,
        lambda: LSTMRecurrenceCall(T, B, N, H, 0, x.dtype, x.device, False, (False,) * N, torch.is_grad_enabled()),
    )
    if name == backends.TORCH and torch_lstm_traceable():
        # torch's kernels take one LSTM at a time: each module as its own forward would run it.
        zeros = input.new_zeros(1, B, H)
        return [m._forward_torch(input, (zeros, zeros), True, B, 1, H) for m in lstms]
    w, b = parallel_input_projection(lstms, cast)
    h0, c0 = x.new_zeros(N, B, H), x.new_zeros(N, B, H)
    y, h_n, c_n = lstm_layer(
        x,
        w,
        b,
        parallel_recurrent_weights(lstms, cast),
        h0,
        c0,
        reverse=[False] * N,
        backend=name,
    )
    results = []
    for k in range(N):
        out = y[:, :, k]
        if first.batch_first:
            out = out.transpose(0, 1)
        results.append((out, (h_n[k : k + 1], c_n[k : k + 1])))
    return results


class ParallelLSTM(nn.ModuleList):
    """A list of single-layer LSTMs that read the same input, run as one recurrence.

    ``forward(input)`` is :func:`parallel_lstm` over the members; being a module (a
    ``ModuleList``, so state-dict keys stay ``<name>.<k>.weight_ih_l0``), it gives FSDP and hooks
    one forward that uses all the members' parameters.
    """

    def forward(self, input: Tensor) -> list[tuple[Tensor, tuple[Tensor, Tensor]]]:
        """Per member, what its own ``forward(input)`` returns."""
        return parallel_lstm(list(self), input)
