"""The reference model (docs/design.md §1): Embedding, a Conv1d stack, two LSTMs on one input, a head.

``ConvLSTMClassifier`` is the fused model; ``ReferenceConvLSTMClassifier`` (built by
``ConvLSTMClassifier.reference``) is the same network from plain ``nn.Embedding``, ``nn.Conv1d``,
``nn.LSTM`` and ``nn.Linear`` (cuDNN on a GPU), against which the fused one is validated.
Their state dicts map one to one (``to_reference`` / ``from_reference``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusedconvlstm import backends
from fusedconvlstm.nn.conv1d_stack import Conv1dStack, min_input_length
from fusedconvlstm.nn.conv_lstm import conv_lstm_states
from fusedconvlstm.nn.lstm import LSTM, ParallelLSTM
from fusedconvlstm.numerics import dropout as philox_dropout


@dataclass(frozen=True)
class ClassifierConfig:
    """Sizes of the model; the defaults are the Keras original's (7,193,009 parameters)."""

    vocab_size: int = 20_000
    embedding_dim: int = 100
    conv_channels: tuple[int, ...] = (200, 200, 256, 256, 512)
    kernel_sizes: tuple[int, ...] = (3, 3, 3, 3, 3)
    conv_strides: tuple[int, ...] = (1, 1, 1, 1, 2)
    hidden_size: int = 512
    num_lstms: int = 2
    dense_size: int = 64
    embedding_dropout: float = 0.25
    lstm_dropout: float = 0.5
    dense_dropout: float = 0.1

    def __post_init__(self) -> None:
        for name in ("conv_channels", "kernel_sizes", "conv_strides"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        if not (len(self.conv_channels) == len(self.kernel_sizes) == len(self.conv_strides)):
            raise ValueError("conv_channels, kernel_sizes and conv_strides must have one entry per conv layer")
        if self.num_lstms < 1:
            raise ValueError(f"num_lstms must be >= 1, got {self.num_lstms}")

    @property
    def min_tokens(self) -> int:
        """The shortest token sequence the model takes: the unpadded convolutions leave one time
        step for the LSTMs (11 tokens at the original's kernel sizes and strides)."""
        L = len(self.kernel_sizes)
        return min_input_length(self.kernel_sizes, self.conv_strides, [1] * L, [(0, 0)] * L)


def _check_tokens(tokens: Tensor, cfg: ClassifierConfig) -> None:
    if not isinstance(tokens, Tensor) or tokens.dim() != 2:
        raise ValueError(
            f"tokens must be a 2-D (batch, seq_len) tensor of token ids, got {getattr(tokens, 'shape', type(tokens))}"
        )
    if tokens.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"tokens must be int32 or int64 token ids, got {tokens.dtype}")
    if tokens.shape[1] < cfg.min_tokens:
        raise ValueError(
            f"token sequences are too short: {tokens.shape[1]} tokens, the model needs at least {cfg.min_tokens} "
            f"(its convolutions are unpadded); pad them on the left with id 0 (Vocabulary.encode pads to max_len)"
        )


class _Head(nn.Module):
    """Dropout, Dense(relu), Dropout, Dense(1): the classifier after the LSTMs (logits out)."""

    def __init__(self, cfg: ClassifierConfig, device=None, dtype=None) -> None:
        super().__init__()
        self.lstm_dropout, self.dense_dropout = cfg.lstm_dropout, cfg.dense_dropout
        self.dense = nn.Linear(cfg.num_lstms * cfg.hidden_size, cfg.dense_size, device=device, dtype=dtype)
        self.out = nn.Linear(cfg.dense_size, 1, device=device, dtype=dtype)

    def forward(self, h: Tensor) -> Tensor:
        h = F.dropout(h, self.lstm_dropout, self.training)
        h = F.dropout(F.relu(self.dense(h)), self.dense_dropout, self.training)
        return self.out(h)


class ConvLSTMClassifier(nn.Module):
    """Text classifier: token ids ``(B, T)`` to the probability ``(B, 1)`` of the positive class.

    The sizes are those of :class:`ClassifierConfig` (keyword arguments override them). Token ids
    to gate pre-activations is one ``conv1d_stack`` op, both LSTMs one ``lstm_recurrence``
    (see :meth:`logits`); ``backend`` is passed to both. Under FSDP wrap the model as one unit:
    its forward uses the embedding, conv and LSTM parameters together in those ops.
    """

    def __init__(self, backend: str = "auto", device=None, dtype=None, **config) -> None:
        super().__init__()
        cfg = ClassifierConfig(**config)
        self.config = cfg
        self.backend = backends.check_backend_name(backend)
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embedding_dim, device=device, dtype=dtype)
        self.conv = Conv1dStack(
            cfg.embedding_dim,
            cfg.conv_channels,
            kernel_size=list(cfg.kernel_sizes),
            stride=list(cfg.conv_strides),
            activation="none",
            channels_last=True,
            backend=backend,
            device=device,
            dtype=dtype,
        )
        self.lstms = ParallelLSTM(
            LSTM(cfg.conv_channels[-1], cfg.hidden_size, batch_first=True, backend=backend, device=device, dtype=dtype)
            for _ in range(cfg.num_lstms)
        )
        self.head = _Head(cfg, device=device, dtype=dtype)

    def logits(self, tokens: Tensor) -> Tensor:
        """Pre-sigmoid scores ``(B, 1)``; train with ``BCEWithLogitsLoss`` on these.

        Token ids to the LSTMs' last hidden states is one fused path
        (:func:`fusedconvlstm.nn.conv_lstm.conv_lstm_states`: one ``conv1d_stack`` op from the
        tokens to both LSTMs' gate pre-activations, one ``lstm_recurrence`` for both), then the head.
        """
        _check_tokens(tokens, self.config)
        dropout = self.config.embedding_dropout if self.training else 0.0
        states = conv_lstm_states(tokens, self.embedding, self.conv, self.lstms, dropout, self.backend)
        return self.head(states)

    def forward(self, tokens: Tensor) -> Tensor:
        """Probability ``(B, 1)`` of the positive class (Keras's sigmoid output)."""
        return torch.sigmoid(self.logits(tokens))

    @staticmethod
    def reference(device=None, dtype=None, **config) -> ReferenceConvLSTMClassifier:
        """The same network from plain torch modules (cuDNN on a GPU), freshly initialized."""
        return ReferenceConvLSTMClassifier(device=device, dtype=dtype, **config)

    def to_reference(self) -> ReferenceConvLSTMClassifier:
        """A plain-torch twin of this model carrying a copy of its weights."""
        p = next(self.parameters())
        ref = ReferenceConvLSTMClassifier(device=p.device, dtype=p.dtype, **asdict(self.config))
        ref.load_state_dict({_to_reference_key(k): v for k, v in self.state_dict().items()})
        ref.train(self.training)
        return ref

    @classmethod
    def from_reference(cls, ref: ReferenceConvLSTMClassifier, backend: str = "auto") -> ConvLSTMClassifier:
        """A fused model carrying a copy of the weights of the plain-torch ``ref``."""
        p = next(ref.parameters())
        model = cls(backend=backend, device=p.device, dtype=p.dtype, **asdict(ref.config))
        model.load_state_dict({_from_reference_key(k): v for k, v in ref.state_dict().items()})
        model.train(ref.training)
        return model


def _to_reference_key(key: str) -> str:
    return "conv." + key[len("conv.layers.") :] if key.startswith("conv.layers.") else key


def _from_reference_key(key: str) -> str:
    return "conv.layers." + key[len("conv.") :] if key.startswith("conv.") else key


class ReferenceConvLSTMClassifier(nn.Module):
    """The model from plain ``nn.Embedding``, ``nn.Conv1d``, ``nn.LSTM`` and ``nn.Linear``.

    This is the cuDNN model a user would otherwise run: the convolutions take ``(B, C, T)``, so
    it pays a transpose before and after them, and the two LSTMs run one after the other.

    ``dropout_masks`` picks how the embedding dropout draws its mask: ``"fused"`` (default) as
    the fused model does (:func:`fusedconvlstm.numerics.dropout.dropout`: the same rate and
    scaling as ``F.dropout``), so the two models seeded alike drop the same elements and train to
    the same weights; ``"torch"`` with ``F.dropout``, the plain model exactly (its counter-based
    masks cost some 140 element-wise kernels on a GPU: use this one to time a training baseline).
    """

    def __init__(self, device=None, dtype=None, dropout_masks: str = "fused", **config) -> None:
        super().__init__()
        if dropout_masks not in ("fused", "torch"):
            raise ValueError(f"dropout_masks must be 'fused' or 'torch', got {dropout_masks!r}")
        cfg = ClassifierConfig(**config)
        self.config = cfg
        self.dropout_masks = dropout_masks
        self.embedding = nn.Embedding(cfg.vocab_size, cfg.embedding_dim, device=device, dtype=dtype)
        convs: list[nn.Module] = []
        c_in = cfg.embedding_dim
        for c_out, k, s in zip(cfg.conv_channels, cfg.kernel_sizes, cfg.conv_strides):
            convs.append(nn.Conv1d(c_in, c_out, k, stride=s, device=device, dtype=dtype))
            c_in = c_out
        self.conv = nn.Sequential(*convs)
        self.lstms = nn.ModuleList(
            nn.LSTM(c_in, cfg.hidden_size, batch_first=True, device=device, dtype=dtype) for _ in range(cfg.num_lstms)
        )
        self.head = _Head(cfg, device=device, dtype=dtype)

    def logits(self, tokens: Tensor) -> Tensor:
        """Pre-sigmoid scores ``(B, 1)``."""
        _check_tokens(tokens, self.config)
        x = self.embedding(tokens)
        if self.training and self.config.embedding_dropout > 0:
            if self.dropout_masks == "fused":
                x = philox_dropout.dropout(x, self.config.embedding_dropout)
            else:
                x = F.dropout(x, self.config.embedding_dropout, training=True)
        x = self.conv(x.transpose(1, 2)).transpose(1, 2)
        states = [lstm(x)[1][0][0] for lstm in self.lstms]
        return self.head(torch.cat(states, dim=1))

    def forward(self, tokens: Tensor) -> Tensor:
        """Probability ``(B, 1)`` of the positive class."""
        return torch.sigmoid(self.logits(tokens))


def count_parameters(model: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


__all__: Sequence[str] = ["ClassifierConfig", "ConvLSTMClassifier", "ReferenceConvLSTMClassifier", "count_parameters"]
