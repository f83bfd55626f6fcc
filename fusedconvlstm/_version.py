"""The installed package's version (``0+unknown`` in a source tree built in place)."""

import importlib.metadata

try:
    __version__ = importlib.metadata.version("fusedconvlstm")
except importlib.metadata.PackageNotFoundError:
    __version__ = "0+unknown"
