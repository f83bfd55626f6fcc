"""The error every Keras import raises for a file or layer that does not fit (a ``ValueError``),
in a module of its own so that each step of the import can raise it."""

from __future__ import annotations


class KerasImportError(ValueError):
    """A Keras checkpoint or layer that does not fit the module it is loaded into."""
