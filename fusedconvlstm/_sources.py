"""The digest of the extension's sources, recorded by ``setup.py`` in ``_build_info.json`` and
compared by :mod:`fusedconvlstm._extension` in a source checkout, so that a library built from
other sources than ``csrc/`` now holds (an edit without a rebuild, or a build carried to another
machine) is reported instead of silently run. Standard library only: ``setup.py`` loads this file
by path, before the package is importable."""

from __future__ import annotations

import glob
import hashlib
import os

SOURCE_PATTERNS = ("csrc/*.cu", "csrc/*.cuh", "csrc/*.h", "csrc/*.cpp", "setup.py")


def sources_digest(root: str) -> str | None:
    """sha256 over the relative paths and contents of the extension's sources under ``root``;
    ``None`` where ``root`` holds none (an installed wheel)."""
    files = sorted({os.path.relpath(p, root) for pat in SOURCE_PATTERNS for p in glob.glob(os.path.join(root, pat))})
    if not any(f.startswith("csrc") for f in files):
        return None
    h = hashlib.sha256()
    for rel in files:
        h.update(rel.replace(os.sep, "/").encode() + b"\0")
        with open(os.path.join(root, rel), "rb") as f:
            h.update(f.read())
        h.update(b"\0")
    return h.hexdigest()
