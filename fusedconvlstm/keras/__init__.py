"""Keras checkpoints and layers as this package's modules; needs ``h5py`` only to read files
(``pip install h5py``, imported when a file is read), never Keras itself.

- :func:`load_classifier`: a ``ConvLSTMClassifier`` from a Keras 2 ``.h5`` or Keras 3
  ``.weights.h5`` / ``.keras`` checkpoint of the reference model (docs/design.md §1);
- :func:`lstm_from_keras_weights`, :func:`conv1d_stack_from_keras_weights`: single layers from
  their ``get_weights()``;
- :mod:`~fusedconvlstm.keras.layouts`: the weight layout conversions on their own.

A leaf of the package: it builds on :mod:`fusedconvlstm.nn` and :mod:`fusedconvlstm.models`,
which know nothing of Keras; ``import fusedconvlstm`` does not import it.
"""

from fusedconvlstm.keras.classifier import load_classifier
from fusedconvlstm.keras.errors import KerasImportError
from fusedconvlstm.keras.layers import conv1d_stack_from_keras_weights, lstm_from_keras_weights
from fusedconvlstm.keras.layouts import conv1d_weight_from_keras, dense_weight_from_keras, lstm_weights_from_keras
from fusedconvlstm.keras.reading import KerasCheckpoint, KerasLayer, read_keras_checkpoint

__all__ = [
    "KerasCheckpoint",
    "KerasImportError",
    "KerasLayer",
    "conv1d_stack_from_keras_weights",
    "conv1d_weight_from_keras",
    "dense_weight_from_keras",
    "load_classifier",
    "lstm_from_keras_weights",
    "lstm_weights_from_keras",
    "read_keras_checkpoint",
]
