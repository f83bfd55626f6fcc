"""Whole models built from the package's layers."""

from fusedconvlstm.models.conv_lstm_classifier import (
    ClassifierConfig,
    ConvLSTMClassifier,
    ReferenceConvLSTMClassifier,
    count_parameters,
)

__all__ = ["ClassifierConfig", "ConvLSTMClassifier", "ReferenceConvLSTMClassifier", "count_parameters"]
