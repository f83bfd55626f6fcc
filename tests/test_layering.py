"""The package's dependencies flow one way.

``models`` -> ``nn`` -> ``ops`` -> the backends (``reference``, ``torch_backend``, ``triton``,
``cuda``) -> the registry (``backends``, ``records``) -> the call contracts (``calls``) ->
``numerics``. Front ends (the CLI, ``check``, ``bench``, training, Keras import) sit on top. A
module imports only its own layer's or lower layers' modules, at the top of the file: an import
inside a function is allowed only where it is no cycle either (the same rule).
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

PACKAGE = Path(__file__).resolve().parent.parent / "fusedconvlstm"

# Lower numbers are lower layers. A module's layer is the first prefix that matches.
LAYERS = [
    (0, ("_sources", "_version", "_extension", "config", "numerics", "passmark")),
    (1, ("calls",)),
    (2, ("records",)),
    (3, ("backends",)),
    (4, ("reference", "torch_backend", "triton", "cuda")),
    (5, ("ops",)),
    (6, ("nn",)),
    (7, ("models",)),
    (8, ("keras", "validate", "benchmarking", "data", "train")),
    (9, ("cli", "__main__", "")),
]


def _module_name(path: Path) -> str:
    rel = path.relative_to(PACKAGE).with_suffix("")
    parts = list(rel.parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _layer(name: str) -> int:
    for layer, prefixes in LAYERS:
        for prefix in prefixes:
            if name == prefix or name.startswith(prefix + ".") or prefix == "":
                return layer
    raise AssertionError(f"no layer for {name}")


def _imports(path: Path, name: str):
    """(imported package-relative module, line) for every import of the package in ``path``."""
    tree = ast.parse(path.read_text())
    is_pkg = path.name == "__init__.py"
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = name.split(".") if is_pkg else name.split(".")[:-1]
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            elif node.module and (node.module == "fusedconvlstm" or node.module.startswith("fusedconvlstm.")):
                module = node.module.removeprefix("fusedconvlstm").lstrip(".")
            else:
                continue
            for alias in node.names:
                sub = f"{module}.{alias.name}" if module else alias.name
                target = (
                    sub
                    if (PACKAGE / sub.replace(".", "/")).with_suffix(".py").exists()
                    or (PACKAGE / sub.replace(".", "/")).is_dir()
                    else module
                )
                yield target, node.lineno
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("fusedconvlstm."):
                    yield alias.name.removeprefix("fusedconvlstm."), node.lineno


MODULES = sorted(PACKAGE.rglob("*.py"))


@pytest.mark.parametrize("path", MODULES, ids=lambda p: _module_name(p) or "fusedconvlstm")
def test_imports_point_down(path):
    name = _module_name(path)
    if name in ("", "__main__"):
        return  # the package root and its entry point gather everything
    mine = _layer(name)
    upward = [
        f"line {line}: {name} (layer {mine}) imports {target or 'fusedconvlstm'} (layer {_layer(target)})"
        for target, line in _imports(path, name)
        if target != name and _layer(target) > mine
    ]
    assert not upward, "\n".join(upward)


def test_every_module_has_a_layer():
    for path in MODULES:
        _layer(_module_name(path))
