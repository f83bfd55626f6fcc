"""How many programs of a compiled Triton kernel can be resident on a GPU at once.

A persistent kernel whose programs wait for each other (a grid barrier) deadlocks if one program
cannot start before another finishes, so its grid must not exceed what the device runs at once.
That number follows from the compiled kernel's resources (registers per thread, shared memory,
warps) and the device's per-SM limits, read here from the driver, never assumed. Launches are
also made cooperative, so the driver refuses a grid that would not be co-resident instead of
letting it hang.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

# Hardware constants of the CUDA occupancy calculator for sm_70 and later (not device
# attributes): registers are allocated per warp in units of 256, a CTA reserves 1 KiB of shared
# memory for the system, and an SM holds at most 32 CTAs.
_REG_ALLOC_UNIT = 256
_SMEM_RESERVED_PER_CTA = 1024
_MAX_CTAS_PER_SM = 32


@dataclass(frozen=True)
class DeviceLimits:
    """Per-SM resources of a CUDA device, as the driver reports them."""

    multiprocessor_count: int
    regs_per_multiprocessor: int
    max_threads_per_multiprocessor: int
    shared_memory_per_multiprocessor: int
    shared_memory_per_block_optin: int
    warp_size: int


@functools.cache
def device_limits(index: int) -> DeviceLimits:
    """The limits of CUDA device ``index`` (Triton's driver query plus torch's device properties)."""
    import triton

    tprops = triton.runtime.driver.active.utils.get_device_properties(index)
    props = torch.cuda.get_device_properties(index)
    return DeviceLimits(
        multiprocessor_count=int(tprops["multiprocessor_count"]),
        regs_per_multiprocessor=int(props.regs_per_multiprocessor),
        max_threads_per_multiprocessor=int(props.max_threads_per_multi_processor),
        shared_memory_per_multiprocessor=int(props.shared_memory_per_multiprocessor),
        shared_memory_per_block_optin=int(tprops["max_shared_mem"]),
        warp_size=int(tprops["warpSize"]),
    )


def programs_per_sm(n_regs: int, num_warps: int, shared_bytes: int, limits: DeviceLimits) -> int:
    """CTAs of a kernel with these resources that one SM holds at once (0: none fits)."""
    threads = num_warps * limits.warp_size
    if threads > limits.max_threads_per_multiprocessor:
        return 0
    regs_per_warp = -(-max(n_regs, 1) * limits.warp_size // _REG_ALLOC_UNIT) * _REG_ALLOC_UNIT
    by_regs = limits.regs_per_multiprocessor // (regs_per_warp * num_warps)
    by_threads = limits.max_threads_per_multiprocessor // threads
    by_smem = _MAX_CTAS_PER_SM
    if shared_bytes > 0:
        if shared_bytes > limits.shared_memory_per_block_optin:
            return 0
        by_smem = limits.shared_memory_per_multiprocessor // (shared_bytes + _SMEM_RESERVED_PER_CTA)
    return max(0, min(by_regs, by_threads, by_smem, _MAX_CTAS_PER_SM))


def driver_programs_per_sm(function: int, threads: int, shared_bytes: int) -> int | None:
    """The driver's own occupancy answer for a loaded kernel (``cuOccupancyMaxActiveBlocksPerMultiprocessor``
    on the ``CUfunction`` handle), or ``None`` where the driver library cannot be asked. It knows
    what the calculator above cannot: the shared-memory carveout it will really pick."""
    import ctypes

    try:
        libcuda = ctypes.CDLL("libcuda.so.1")
    except OSError:
        return None
    n = ctypes.c_int()
    rc = libcuda.cuOccupancyMaxActiveBlocksPerMultiprocessor(
        ctypes.byref(n), ctypes.c_void_p(function), ctypes.c_int(threads), ctypes.c_size_t(shared_bytes)
    )
    return int(n.value) if rc == 0 else None


def co_resident_programs(compiled, device: torch.device) -> int:
    """Programs of the compiled Triton kernel ``compiled`` that ``device`` runs at the same time:
    the smaller of the calculator's count and the driver's (an overestimate would make the
    cooperative launch fail, never hang)."""
    compiled._init_handles()  # loads the binary: fills n_regs and the function handle
    index = device.index if device.index is not None else torch.cuda.current_device()
    limits = device_limits(index)
    num_warps, shared = compiled.metadata.num_warps, compiled.metadata.shared
    per_sm = programs_per_sm(compiled.n_regs, num_warps, shared, limits)
    driver = driver_programs_per_sm(compiled.function, num_warps * limits.warp_size, shared)
    if driver is not None:
        per_sm = min(per_sm, driver)
    return per_sm * limits.multiprocessor_count


def compile_ahead(
    fn,
    signature: dict[str, str],
    constexprs: dict[str, object],
    divisible: list[str],
    num_warps: int,
    cc: int = 90,
    num_stages: int = 1,
):
    """Compile the ``@triton.jit`` function ``fn`` for NVIDIA compute capability ``cc`` without a GPU.

    ``signature`` maps every argument to a Triton type (``"*bf16"``, ``"i32"``, ``"constexpr"``);
    ``divisible`` names the arguments that a launch would specialize as multiples of 16. Returns
    Triton's compiled kernel: its ``asm`` holds the TTGIR and PTX a launch on that GPU would build.
    """
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    attrs = {(fn.arg_names.index(name),): [["tt.divisibility", 16]] for name in divisible}
    source = ASTSource(fn, signature, constexprs=constexprs, attrs=attrs)
    options = {"num_warps": num_warps, "num_stages": num_stages}
    return triton.compile(source, target=GPUTarget("cuda", cc, 32), options=options)


def ptxas_resources(compiled) -> dict[str, int]:
    """Registers per thread, ``spill_stores`` / ``spill_loads`` in bytes (from ``ptxas -v``) and
    ``shared`` memory in bytes (Triton's metadata) of a kernel compiled by :func:`compile_ahead`.
    Lets CI check resource use on CPU-only machines; a launch on a GPU reports the same numbers
    (``CompiledKernel.n_regs``).
    """
    import re
    import subprocess
    import tempfile

    import triton

    cc = compiled.metadata.target.arch  # the compute capability it was compiled for
    arch = f"sm_{cc}a" if cc >= 90 else f"sm_{cc}"
    with tempfile.TemporaryDirectory() as tmp:
        ptx = f"{tmp}/kernel.ptx"
        with open(ptx, "w") as f:
            f.write(compiled.asm["ptx"])
        report = subprocess.run(
            [triton.knobs.nvidia.ptxas.path, "-v", f"--gpu-name={arch}", ptx, "-o", f"{tmp}/kernel.cubin"],
            capture_output=True,
            text=True,
            check=True,
        ).stderr
    spills = re.search(r"(\d+) bytes spill stores, (\d+) bytes spill loads", report)
    return {
        "registers": int(re.search(r"Used (\d+) registers", report).group(1)),
        "spill_stores": int(spills.group(1)),
        "spill_loads": int(spills.group(2)),
        "shared": int(compiled.metadata.shared),
    }
