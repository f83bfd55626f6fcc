"""``fusedconvlstm.Conv1dStack``: a chain of Conv1d layers computed by one ``conv1d_stack`` op.

Channels-last ``(B, T, C)`` input by default (what an embedding gives, with no transposes),
``(B, C, T)`` with ``channels_last=False``. The layers are held as ``nn.Conv1d`` modules in
``self.layers``, so parameters are shaped and initialized like ``nn.Conv1d``'s.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusedconvlstm import backends, torch_backend
from fusedconvlstm.calls.conv1d import ACTIVATIONS
from fusedconvlstm.calls.conv1d import OP as CONV_OP
from fusedconvlstm.numerics.dropout import draw_seed
from fusedconvlstm.numerics.precision import autocast_dtype
from fusedconvlstm.ops.conv1d import conv1d_stack, stack_call

ACTIVATION_MODULES: dict[type, str] = {nn.Identity: "none", nn.ReLU: "relu", nn.SiLU: "silu", nn.Tanh: "tanh"}


def _per_layer(value, n: int, name: str) -> list:
    if isinstance(value, (list, tuple)):
        if len(value) != n:
            raise ValueError(
                f"Conv1dStack: {name} must be a single value or have one entry per layer ({n}), got {len(value)}"
            )
        return list(value)
    return [value] * n


def _between_layers(value, n: int, name: str, off) -> list:
    """A single value applies between layers (after all but the last); a sequence is per layer."""
    if isinstance(value, (list, tuple)):
        return _per_layer(value, n, name)
    return [value] * (n - 1) + [off]


def padding_pair(padding: int | str | tuple, kernel_size: int, stride: int, dilation: int) -> tuple[int, int]:
    """``(left, right)`` zero padding of an ``nn.Conv1d`` padding argument."""
    if isinstance(padding, (tuple, list)):
        if len(padding) == 1:
            padding = padding[0]
        elif len(padding) == 2:
            return int(padding[0]), int(padding[1])
        else:
            raise ValueError(f"Conv1dStack: padding must be an int, 'valid', 'same' or (left, right), got {padding}")
    if padding == "valid":
        return 0, 0
    if padding == "same":
        if stride != 1:
            raise ValueError("Conv1dStack: padding='same' is not supported for strided convolutions")
        total = dilation * (kernel_size - 1)
        return total // 2, total - total // 2
    if isinstance(padding, int) and padding >= 0:
        return padding, padding
    raise ValueError(f"Conv1dStack: padding must be an int >= 0, 'valid', 'same' or (left, right), got {padding!r}")


def fold_conv1d_pair(
    first: tuple[Tensor, Tensor | None, int, tuple[int, int], int],
    second: tuple[Tensor, Tensor | None, int, int],
) -> tuple[Tensor, Tensor | None, int, tuple[int, int], int]:
    """One conv equal to ``first`` followed by ``second`` (no activation between, and ``second``
    without padding), computed in float64.

    ``first`` is ``(weight, bias, stride, (left, right) padding, dilation)``, ``second`` is
    ``(weight, bias, stride, dilation)``. The result ``(weight, bias, stride, padding, dilation)``
    has stride ``s1·s2``, the padding of ``first``, and taps at ``j2·d2·s1 + j1·d1``: for two
    kernel-3 layers, kernel 5. Its output length equals the pair's for every input length.
    The folded weight's ``[n, c, τ]`` sums ``W2[n, :, j2] @ W1[:, c, j1]`` over the tap pairs that
    land on ``τ``; the folded bias is ``b2 + Σ_j2 W2[:, :, j2] @ b1``.
    """
    w1, b1, s1, pad, d1 = first
    w2, b2, s2, d2 = second
    k1, k2 = w1.shape[2], w2.shape[2]
    # The folded taps sit on multiples of gcd(d1, d2·s1): use that as the dilation, not 1.
    g = math.gcd(d1, d2 * s1)
    k = ((k2 - 1) * d2 * s1 + (k1 - 1) * d1) // g + 1
    w1d, w2d = w1.double(), w2.double()
    w = torch.zeros(w2.shape[0], w1.shape[1], k, dtype=torch.float64, device=w1.device)
    for j2 in range(k2):
        for j1 in range(k1):
            w[:, :, (j2 * d2 * s1 + j1 * d1) // g] += w2d[:, :, j2] @ w1d[:, :, j1]
    bias = None
    if b1 is not None or b2 is not None:
        bias = torch.zeros(w2.shape[0], dtype=torch.float64, device=w1.device)
        if b2 is not None:
            bias += b2.double()
        if b1 is not None:
            bias += w2d.sum(dim=2) @ b1.double()
    return w, bias, s1 * s2, pad, g


def activation_name(module: nn.Module) -> str | None:
    """The stack's name for an activation module, or ``None`` if it is not one the stack fuses."""
    if isinstance(module, nn.GELU):
        return "gelu" if module.approximate == "none" else None
    return ACTIVATION_MODULES.get(type(module))


def min_input_length(
    kernel_sizes: Sequence[int], strides: Sequence[int], dilations: Sequence[int], paddings: Sequence[tuple[int, int]]
) -> int:
    """The fewest time steps a chain of convolutions takes: one output step after every layer."""
    n = 1
    for k, s, d, (left, right) in reversed(list(zip(kernel_sizes, strides, dilations, paddings))):
        n = max(1, (n - 1) * s + d * (k - 1) + 1 - left - right)
    return n


class Conv1dStack(nn.Module):
    """A chain of dense Conv1d layers, with an activation and dropout between layers.

    Args:
        in_channels: channels of the input.
        out_channels: output channels of each layer; its length is the number of layers.
        kernel_size, stride, dilation, bias: one value for all layers or one per layer.
        padding: an int, ``"valid"``, ``"same"`` or a ``(left, right)`` tuple for all layers, or a
            list with one of those per layer.
        activation: ``"none"``, ``"relu"``, ``"gelu"``, ``"silu"`` or ``"tanh"``. A single name is
            applied between layers (after every layer but the last); a sequence gives the
            activation after each layer.
        dropout: probability, applied (in training) after each activation between layers, or a
            sequence with one probability per layer. Dropout between layers runs inside the
            stack op (masks from a counter-based generator seeded by PyTorch's, see
            :func:`fusedconvlstm.conv1d_stack`); one after the last layer is ``F.dropout``.
        channels_last: input and output are ``(B, T, C)`` when true, else ``(B, C, T)`` like
            ``nn.Conv1d``. Unbatched 2-D input is accepted in the same layout.
        backend: ``"auto"``, ``"torch"``, ``"reference"``, ``"triton"`` or ``"cuda"``. Where the
            dispatcher answers ``torch`` (``auto`` on the CPU, and on a GPU wherever no validation
            record enables a kernel) the stack runs as an ``F.conv1d`` chain, ``nn.Conv1d``'s
            results (with ``channels_last`` a channels-last view of them).
    """

    def __init__(
        self,
        in_channels: int,
        out_channels: Sequence[int],
        kernel_size: int | Sequence[int] = 3,
        stride: int | Sequence[int] = 1,
        padding: int | str | Sequence = 0,
        dilation: int | Sequence[int] = 1,
        bias: bool | Sequence[bool] = True,
        activation: str | Sequence[str] = "none",
        dropout: float | Sequence[float] = 0.0,
        channels_last: bool = True,
        backend: str = "auto",
        device=None,
        dtype=None,
    ) -> None:
        super().__init__()
        out_channels = list(out_channels)
        n = len(out_channels)
        if n == 0:
            raise ValueError("Conv1dStack: out_channels must name at least one layer")
        kernel_size = _per_layer(kernel_size, n, "kernel_size")
        stride = _per_layer(stride, n, "stride")
        dilation = _per_layer(dilation, n, "dilation")
        bias = _per_layer(bias, n, "bias")
        # A list gives one padding per layer; anything else (an int, a string, a (left, right)
        # tuple) applies to every layer.
        padding = _per_layer(padding, n, "padding") if isinstance(padding, list) else [padding] * n
        self.activations = _between_layers(activation, n, "activation", "none")
        for a in self.activations:
            if a not in ACTIVATIONS:
                raise ValueError(f"Conv1dStack: activation must be one of {ACTIVATIONS}, got {a!r}")
        self.dropouts = [float(p) for p in _between_layers(dropout, n, "dropout", 0.0)]
        for p in self.dropouts:
            if not 0.0 <= p <= 1.0:
                raise ValueError(f"Conv1dStack: dropout must lie in [0, 1], got {p}")
        self.paddings = [padding_pair(p, k, s, d) for p, k, s, d in zip(padding, kernel_size, stride, dilation)]
        self.layers = nn.ModuleList()
        c_in = in_channels
        for c_out, k, s, d, b in zip(out_channels, kernel_size, stride, dilation, bias):
            self.layers.append(nn.Conv1d(c_in, c_out, k, stride=s, dilation=d, bias=b, device=device, dtype=dtype))
            c_in = c_out
        self.channels_last = channels_last
        self.backend = backends.check_backend_name(backend)

    @property
    def in_channels(self) -> int:
        """Channels of the input."""
        return self.layers[0].in_channels

    @property
    def out_channels(self) -> int:
        """Channels of the output."""
        return self.layers[-1].out_channels

    def extra_repr(self) -> str:
        return (
            f"activations={self.activations}, dropouts={self.dropouts}, paddings={self.paddings}, "
            f"channels_last={self.channels_last}, backend={self.backend!r}"
        )

    @classmethod
    def from_torch(
        cls, modules: nn.Module | Sequence[nn.Module], channels_last: bool = False, backend: str = "auto"
    ) -> Conv1dStack:
        """A stack equal to ``modules``: Conv1d layers, each optionally followed by an activation
        (ReLU, GELU, SiLU, Tanh, Identity) and a Dropout, as in an ``nn.Sequential``.

        ``channels_last`` defaults to ``False`` so the result takes ``(B, C, T)`` like the modules
        it replaces. Weights are copied.
        """
        mods = [modules] if isinstance(modules, nn.Conv1d) else list(modules)
        convs: list[nn.Conv1d] = []
        acts: list[str] = []
        drops: list[float] = []
        for idx, m in enumerate(mods):
            if isinstance(m, nn.Conv1d):
                if m.groups != 1:
                    raise ValueError(
                        f"Conv1dStack.from_torch: modules[{idx}] has groups={m.groups}; only dense convolutions (groups=1) fuse"
                    )
                if m.padding_mode != "zeros":
                    raise ValueError(
                        f"Conv1dStack.from_torch: modules[{idx}] has padding_mode={m.padding_mode!r}; only 'zeros' fuses"
                    )
                convs.append(m)
                acts.append("none")
                drops.append(0.0)
                continue
            if not convs:
                raise ValueError(f"Conv1dStack.from_torch: modules[{idx}] ({type(m).__name__}) comes before any Conv1d")
            name = activation_name(m)
            if name is not None and acts[-1] == "none" and drops[-1] == 0.0:
                acts[-1] = name
            elif isinstance(m, nn.Dropout) and drops[-1] == 0.0:
                drops[-1] = float(m.p)
            else:
                raise ValueError(
                    f"Conv1dStack.from_torch: modules[{idx}] ({type(m).__name__}) is not a Conv1d, one activation "
                    "(ReLU, GELU(approximate='none'), SiLU, Tanh, Identity) and one Dropout per layer, in that order"
                )
        if not convs:
            raise ValueError("Conv1dStack.from_torch: no Conv1d among the modules")
        ref = convs[0].weight
        stack = cls(
            convs[0].in_channels,
            [c.out_channels for c in convs],
            kernel_size=[c.kernel_size[0] for c in convs],
            stride=[c.stride[0] for c in convs],
            padding=[padding_pair(c.padding, c.kernel_size[0], c.stride[0], c.dilation[0]) for c in convs],
            dilation=[c.dilation[0] for c in convs],
            bias=[c.bias is not None for c in convs],
            activation=acts,
            dropout=drops,
            channels_last=channels_last,
            backend=backend,
            device=ref.device,
            dtype=ref.dtype,
        )
        for mine, theirs in zip(stack.layers, convs):
            mine.load_state_dict(theirs.state_dict())
        stack.train(convs[0].training)
        return stack

    def fold(self) -> Conv1dStack:
        """A new stack computing the same function with each run of purely linear layers folded
        into one conv (for inference; this stack is left as it is; off unless called).

        Layer ``i + 1`` folds into layer ``i`` when nothing sits between them: no activation and
        no dropout after layer ``i``, and no padding on layer ``i + 1`` (its zero padding would
        pad the intermediate, which a single conv over the input cannot express). The reference
        model's five convs (kernel 3, last stride 2, no activations) become one conv with kernel
        11 and stride 2, doing 2.7x fewer multiply-adds.

        The folded weights are computed in float64 and rounded once to the parameter dtype, so
        the result equals this stack up to rounding: the order of the sums differs, not the
        math. Folded layers are fresh parameters: gradients do not flow back to this stack.
        """
        runs: list[list[int]] = [[0]]
        for i in range(1, len(self.layers)):
            prev = runs[-1][-1]
            joined = self.activations[prev] == "none" and self.dropouts[prev] == 0.0 and self.paddings[i] == (0, 0)
            if joined:
                runs[-1].append(i)
            else:
                runs.append([i])
        folded = []
        for run in runs:
            c = self.layers[run[0]]
            acc = (c.weight, c.bias, c.stride[0], self.paddings[run[0]], c.dilation[0])
            for i in run[1:]:
                c = self.layers[i]
                acc = fold_conv1d_pair(acc, (c.weight, c.bias, c.stride[0], c.dilation[0]))
            folded.append((acc, self.activations[run[-1]], self.dropouts[run[-1]]))
        ref = self.layers[0].weight
        stack = Conv1dStack(
            self.in_channels,
            [w.shape[0] for (w, *_), _, _ in folded],
            kernel_size=[w.shape[2] for (w, *_), _, _ in folded],
            stride=[s for (_, _, s, _, _), _, _ in folded],
            padding=[p for (_, _, _, p, _), _, _ in folded],
            dilation=[d for (*_, d), _, _ in folded],
            bias=[b is not None for (_, b, *_), _, _ in folded],
            activation=[a for _, a, _ in folded],
            dropout=[p for _, _, p in folded],
            channels_last=self.channels_last,
            backend=self.backend,
            device=ref.device,
            dtype=ref.dtype,
        )
        with torch.no_grad():
            for conv, ((w, b, *_), _, _) in zip(stack.layers, folded):
                conv.weight.copy_(w)
                if b is not None:
                    conv.bias.copy_(b)
        stack.train(self.training)
        return stack

    def op_arguments(
        self, layers: range | None = None, cast: torch.dtype | None = None
    ) -> tuple[list[Tensor], list[Tensor | None], dict]:
        """``(weight, bias, options)`` of the ``conv1d_stack`` ops for ``layers`` (default all),
        parameters cast to ``cast`` when given (autocast)."""
        layers = range(len(self.layers)) if layers is None else layers
        convs = [self.layers[i] for i in layers]

        def get(t: Tensor | None) -> Tensor | None:
            return t if t is None or cast is None else t.to(cast)

        options = dict(
            stride=[c.stride[0] for c in convs],
            padding=[self.paddings[i] for i in layers],
            dilation=[c.dilation[0] for c in convs],
            activation=[self.activations[i] for i in layers],
            backend=self.backend,
        )
        return [get(c.weight) for c in convs], [get(c.bias) for c in convs], options

    def _run(self, x: Tensor) -> Tensor:
        """The layers on channels-last ``x``: the ``conv1d_stack`` op, or where the dispatcher
        answers ``torch`` an ``F.conv1d`` chain (a channels-last view of its output)."""
        cast = autocast_dtype(x)  # as nn.Conv1d under autocast: everything in the autocast dtype
        # Layer i's input dropout is the dropout after layer i - 1.
        dropout = [0.0] + self.dropouts[:-1] if self.training and any(self.dropouts[:-1]) else None
        seed = draw_seed(x.device) if dropout is not None else None
        xc = x if cast is None else x.to(cast)

        def call():
            weight, bias, options = self.op_arguments(cast=cast)
            return stack_call(xc, weight, bias, dropout=dropout, seed=seed, **options)

        if backends.module_backend(CONV_OP, self.backend, x.device, call) == backends.TORCH:
            return self.torch_chain(x.transpose(1, 2), dropout, seed).transpose(1, 2)
        weight, bias, options = self.op_arguments(cast=cast)
        return conv1d_stack(xc, weight, bias, dropout=dropout, seed=seed, **options)

    def torch_chain(self, x: Tensor, dropout: list[float] | None = None, seed: Tensor | None = None) -> Tensor:
        """The layers on channels-first ``x`` ``(B, C, T)`` on torch's kernels, as the
        ``nn.Conv1d`` modules compute them (autocast included); ``dropout[i]`` on layer ``i``'s
        input with the masks of ``seed`` (see :func:`fusedconvlstm.torch_backend.conv_chain`)."""
        return torch_backend.conv_chain(
            x,
            [c.weight for c in self.layers],
            [c.bias for c in self.layers],
            [c.stride[0] for c in self.layers],
            self.paddings,
            [c.dilation[0] for c in self.layers],
            self.activations,
            dropout,
            seed,
        )

    def min_length(self) -> int:
        """The fewest time steps an input may have: one output step after every layer."""
        return min_input_length(
            [c.kernel_size[0] for c in self.layers],
            [c.stride[0] for c in self.layers],
            [c.dilation[0] for c in self.layers],
            self.paddings,
        )

    def forward(self, x: Tensor) -> Tensor:
        """Apply the stack; layout as given by ``channels_last``."""
        if not isinstance(x, Tensor) or x.dim() not in (2, 3):
            raise ValueError(f"Conv1dStack: input must be 2-D (unbatched) or 3-D, got {getattr(x, 'shape', type(x))}")
        given = tuple(x.shape)
        unbatched = x.dim() == 2
        if unbatched:
            x = x.unsqueeze(0)
        if not self.channels_last:
            x = x.transpose(1, 2)
        if x.shape[2] != self.in_channels:
            layout = "(T, C) or (B, T, C)" if self.channels_last else "(C, T) or (B, C, T)"
            hint = ""
            if x.shape[1] == self.in_channels:
                other = "(B, C, T)" if self.channels_last else "(B, T, C)"
                hint = (
                    f"; it looks like {other}: transpose it, or build the stack with "
                    f"channels_last={not self.channels_last}"
                )
            raise ValueError(
                f"Conv1dStack: input must have {self.in_channels} channels in layout {layout}, got shape {given}{hint}"
            )
        weight_dtype = self.layers[0].weight.dtype
        if not x.is_floating_point():
            raise TypeError(
                f"Conv1dStack: input must be a floating-point tensor, got {x.dtype}; convert it: input.to({weight_dtype})"
            )
        if autocast_dtype(x) is None and x.dtype != weight_dtype:
            raise ValueError(
                f"Conv1dStack: input dtype ({x.dtype}) does not match weight dtype ({weight_dtype}). Convert input: "
                f"input.to({weight_dtype}), or convert the module: stack.to({x.dtype})"
            )
        if x.shape[1] < self.min_length():
            raise ValueError(
                f"Conv1dStack: input is too short: {x.shape[1]} time steps (shape {given}), fewer than the "
                f"{self.min_length()} this stack needs for one output step"
            )
        x = self._run(x)
        if self.training and self.dropouts[-1] > 0:
            x = F.dropout(x, self.dropouts[-1], training=True)
        if not self.channels_last:
            x = x.transpose(1, 2)
        return x.squeeze(0) if unbatched else x
