"""Run from outside the source tree with an installed fusedconvlstm: the package comes from the
installation with its data files (the shipped validation records, the build information), its
compiled extension loads into the torch running here (no GPU is needed to load it) and registers a
CUDA kernel for every kernel op. Exits non-zero with the reason otherwise."""

from __future__ import annotations

import os
import sys

import torch

import fusedconvlstm
from fusedconvlstm import _extension, records


def kernel_ops() -> list[str]:
    """The kernel-level ops (named with a trailing underscore), whose CUDA kernels the extension holds."""
    names = torch._C._dispatch_get_all_op_names()
    return sorted(n for n in names if n.startswith("fusedconvlstm::") and n.endswith("_"))


def main() -> int:
    where = os.path.dirname(os.path.abspath(fusedconvlstm.__file__))
    problems = []
    if os.path.isdir(os.path.join(os.path.dirname(where), "csrc")):
        problems.append(f"fusedconvlstm was imported from a source tree ({where}), not an installation")
    for data in (records.SHIPPED_PATH, os.path.join(where, "_build_info.json")):
        if not os.path.exists(data):
            problems.append(f"the installation lacks {os.path.basename(data)}")
    why = _extension.unavailable_reason()
    if why is not None:
        problems.append(f"the CUDA extension does not load: {why}")
    ops = kernel_ops()
    if why is None:
        missing = [op for op in ops if not torch._C._dispatch_has_kernel_for_dispatch_key(op, "CUDA")]
        if len(ops) < 2 or missing:
            problems.append(f"no CUDA kernel registered for {missing or 'any kernel op'}")
    info = _extension.build_info() or {}
    for p in problems:
        print(f"check_installed: {p}", file=sys.stderr)
    if not problems:
        print(
            f"check_installed: {where} on torch {torch.__version__}: extension built with torch "
            f"{info.get('torch_version')} loads and registers CUDA kernels for {len(ops)} ops"
        )
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
