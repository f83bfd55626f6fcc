"""Loading of the compiled extension ``fusedconvlstm._C`` with a readable reason when it fails.

The extension is built against the LibTorch stable ABI (``TORCH_TARGET_VERSION``), so one build
serves every torch at or above its target version. It is a plain shared library that registers
CUDA kernels for op schemas defined in :mod:`fusedconvlstm.ops`; it is loaded with
``torch.ops.load_library`` after those schemas exist. The build writes ``_build_info.json``
beside it (torch, CUDA and target versions, architectures), which is checked before loading so a
mismatch reads as a sentence instead of an undefined symbol.
"""

from __future__ import annotations

import functools
import glob
import json
import os

import torch

from fusedconvlstm._sources import sources_digest

_HERE = os.path.dirname(os.path.abspath(__file__))
_REBUILD = "rebuild it with `pip install --no-build-isolation -e .` (or `make build`)"


def _library_path() -> str | None:
    candidates = sorted(glob.glob(os.path.join(_HERE, "_C*.so")) + glob.glob(os.path.join(_HERE, "_C*.pyd")))
    return candidates[0] if candidates else None


def build_info() -> dict | None:
    """What the extension was built with, as recorded by ``setup.py``; ``None`` if not built."""
    path = os.path.join(_HERE, "_build_info.json")
    if not os.path.exists(path):
        return None
    with open(path) as f:
        return json.load(f)


def _version_tuple(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


@functools.cache
def unavailable_reason() -> str | None:
    """Load the extension once; ``None`` on success, else why the cuda backend is unavailable."""
    path = _library_path()
    if path is None:
        return (
            "fusedconvlstm was installed without its CUDA extension (no nvcc or no CUDA build of "
            f"torch when it was built, and FORCE_CUDA was not set); {_REBUILD}"
        )
    info = build_info() or {}
    target = info.get("torch_target_version")
    if target is not None and _version_tuple(torch.__version__) < _version_tuple(target):
        return (
            f"fusedconvlstm._C targets the stable ABI of torch >= {target} (built with torch "
            f"{info.get('torch_version')}), but torch {torch.__version__} is running; upgrade torch "
            f"or {_REBUILD}"
        )
    if torch.version.cuda is None:
        return f"torch {torch.__version__} is a CPU-only build; the cuda backend needs a CUDA build of torch"
    try:
        torch.ops.load_library(path)
    except OSError as exc:
        return (
            f"fusedconvlstm._C (built with torch {info.get('torch_version', '?')}, CUDA "
            f"{info.get('cuda_version', '?')}) cannot be loaded into torch {torch.__version__} "
            f"(CUDA {torch.version.cuda}): {exc}; {_REBUILD}"
        )
    return None


def stale_reason() -> str | None:
    """In a source checkout: why the built extension may not match ``csrc/`` (it was built from
    other sources, or its build recorded none), else ``None``. Installed wheels carry no sources
    and are never stale."""
    current = sources_digest(os.path.dirname(_HERE))
    info = build_info()
    if current is None or info is None or _library_path() is None:
        return None
    built = info.get("sources_sha256")
    if built is None:
        return "the extension's build recorded no digest of its sources; rebuild to be sure it matches csrc/"
    if built != current:
        return f"fusedconvlstm._C was built from other sources than csrc/ holds now; {_REBUILD}"
    return None


def is_available() -> bool:
    """Whether the compiled extension is loaded."""
    return unavailable_reason() is None
