"""Build of fusedconvlstm and its CUDA extension ``fusedconvlstm._C``.

The extension is built when nvcc and a CUDA build of torch are both present, or when
``FORCE_CUDA=1`` (``FORCE_CUDA=0`` skips it). Whether a GPU is visible does not matter: machines
without one still compile every CUDA source. Architectures default to sm_80 and sm_90a machine code
plus compute_90 PTX, which the driver compiles for GPUs newer than Hopper (sm_90a code runs on
compute capability 9.0 only, and PTX of compute_80 would lack the thread-block-cluster kernel);
``TORCH_CUDA_ARCH_LIST`` replaces all of it.

The kernels use only the LibTorch stable ABI, targeting torch >= 2.11 (``TORCH_TARGET_VERSION``),
so one build loads into every later torch; they include no Python headers, so the library is
tagged ``abi3`` (one wheel for every Python >= 3.10).

Install from source with ``pip install --no-build-isolation -e .``: build isolation would install
a second torch into a temporary environment and compile against it.
"""

from __future__ import annotations

import glob
import json
import os
import re
import shutil
import subprocess
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))
TARGET_TORCH = "2.11"  # oldest torch whose stable ABI the extension uses
DEFAULT_ARCH_LIST = "8.0;9.0a;compute_90 PTX"
# The default as nvcc flags (torch's TORCH_CUDA_ARCH_LIST cannot say "PTX of 9.0 without its
# sm_90 code"; with -gencode in the flags torch adds none of its own).
DEFAULT_GENCODE = [
    "-gencode=arch=compute_80,code=sm_80",
    "-gencode=arch=compute_90a,code=sm_90a",
    "-gencode=arch=compute_90,code=compute_90",
]


def _cuda_home() -> str | None:
    """The CUDA toolkit root: $CUDA_HOME, else where the nvcc on PATH really lives."""
    for var in ("CUDA_HOME", "CUDA_PATH"):
        if os.environ.get(var) and os.path.exists(os.path.join(os.environ[var], "bin", "nvcc")):
            return os.environ[var]
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        return None
    guess = os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
    if os.path.exists(os.path.join(guess, "include", "cuda_runtime.h")):
        return guess
    # nvcc may be a wrapper script; ask it where its toolkit is.
    try:
        out = subprocess.run(
            [nvcc, "-dryrun", "-x", "cu", "-c", os.devnull, "-o", os.devnull],
            capture_output=True,
            text=True,
            timeout=60,
        )
        match = re.search(r"TOP=(\S+)", out.stdout + out.stderr)
    except (OSError, subprocess.SubprocessError):
        match = None
    if match:
        return os.path.normpath(match.group(1).rstrip("/").removesuffix("/bin/.."))
    return None


def _sources_digest() -> str | None:
    """The digest the loader compares in a source checkout (fusedconvlstm/_sources.py, loaded by
    path: the package itself is not importable yet)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("_sources", os.path.join(ROOT, "fusedconvlstm", "_sources.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.sources_digest(ROOT)


def _want_cuda(torch_cuda: str | None, cuda_home: str | None) -> tuple[bool, str]:
    forced = os.environ.get("FORCE_CUDA")
    if forced == "1":
        return True, "FORCE_CUDA=1"
    if forced == "0":
        return False, "FORCE_CUDA=0"
    if torch_cuda is None:
        return False, "torch is a CPU-only build"
    if cuda_home is None:
        return False, "nvcc was not found (set CUDA_HOME or put nvcc on PATH)"
    return True, f"nvcc in {cuda_home} and torch built with CUDA {torch_cuda}"


def _pip_cuda_includes() -> list[str]:
    """Include folders of the pip-installed NVIDIA packages (cublas_v2.h, cusparse.h, ...), which
    torch's CUDA headers may need when the toolkit does not have them."""
    dirs = []
    for site in sys.path:
        dirs += glob.glob(os.path.join(site, "nvidia", "*", "include"))
    return sorted(set(d for d in dirs if os.path.isdir(d)))


def _extensions():
    try:
        import torch
    except ImportError:
        print(
            "fusedconvlstm: torch is not importable; installing without the CUDA extension "
            "(use pip install --no-build-isolation)",
            file=sys.stderr,
        )
        return [], {}
    cuda_home = _cuda_home()
    want, why = _want_cuda(torch.version.cuda, cuda_home)
    if not want:
        print(f"fusedconvlstm: not building the CUDA extension: {why}", file=sys.stderr)
        return [], {}
    print(f"fusedconvlstm: building the CUDA extension ({why})", file=sys.stderr)
    if cuda_home is not None:
        os.environ["CUDA_HOME"] = cuda_home  # read by torch.utils.cpp_extension at import
    arch_list = os.environ.get("TORCH_CUDA_ARCH_LIST") or DEFAULT_ARCH_LIST
    gencode = [] if os.environ.get("TORCH_CUDA_ARCH_LIST") else DEFAULT_GENCODE
    os.environ.setdefault("MAX_JOBS", str(os.cpu_count() or 1))
    # ninja may be installed into this interpreter's environment without being on PATH.
    os.environ["PATH"] = os.path.dirname(sys.executable) + os.pathsep + os.environ.get("PATH", "")
    from torch.utils.cpp_extension import BuildExtension, CUDAExtension

    major, minor = TARGET_TORCH.split(".")
    target = f"-DTORCH_TARGET_VERSION=0x{int(major):02x}{int(minor):02x}000000000000"
    defines = [target, "-DUSE_CUDA"]  # USE_CUDA exposes the CUDA shims (current stream, error text)
    ext = CUDAExtension(
        name="fusedconvlstm._C",
        sources=sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "csrc", "*.cu"))),
        include_dirs=[os.path.join(ROOT, "csrc")] + _pip_cuda_includes(),
        extra_compile_args={
            "cxx": ["-O3", "-std=c++17", *defines],
            "nvcc": ["-O3", "-std=c++17", *defines, "-lineinfo", *gencode],
        },
        py_limited_api=True,
    )

    class BuildWithInfo(BuildExtension):
        """Records what the extension was built with beside it, for the loader's checks."""

        def run(self):
            super().run()
            for e in self.extensions:
                out_dir = os.path.dirname(self.get_ext_fullpath(e.name))
                info = {
                    "torch_version": torch.__version__,
                    "torch_target_version": TARGET_TORCH,
                    "cuda_version": torch.version.cuda,
                    "cuda_home": os.environ.get("CUDA_HOME"),
                    "arch_list": arch_list,
                    "sources_sha256": _sources_digest(),
                }
                with open(os.path.join(out_dir, "_build_info.json"), "w") as f:
                    json.dump(info, f, indent=1)

    return [ext], {"build_ext": BuildWithInfo.with_options(use_ninja=shutil.which("ninja") is not None)}


ext_modules, cmdclass = _extensions()
setup(
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    options={"bdist_wheel": {"py_limited_api": "cp310"}} if ext_modules else {},
)
