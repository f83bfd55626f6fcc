"""Compile the conv1d Triton kernels for an H100 (sm_90) without a GPU.

The interpreter runs the kernels' math but never the compiler, so a kernel can pass every CPU
test and still fail to compile (or run out of shared memory) on a GPU. This script drives the
``triton`` backend of the conv1d ops at the reference model's size (bf16, batch 256) with the
launches intercepted, then compiles every distinct specialization for sm_90 the way Triton's
launcher would, and prints shared memory, registers and spills (``ptxas -v``) and the
``cp.async`` copies of each (how many, of how many bytes: pipelined, vectorised loads).

Run without ``TRITON_INTERPRET``: ``python -m tests.triton_compile_check`` (``DTYPE=float32``
for fp32: TF32 convs and IEEE projection as PyTorch's defaults give, plus an all-IEEE case).
Exit status 1 when a kernel does not compile, needs more shared memory than an H100 has, or the
per-layer forward of a 100- or 200-channel layer loads without ``cp.async`` (unvectorised). It
uses private Triton launcher APIs (checked against Triton 3.6 and 3.8).
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import tempfile
from types import SimpleNamespace

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from triton.compiler.compiler import make_backend
from triton.runtime.jit import JITFunction, create_function_from_signature

H100_SHARED_BYTES = 227 * 1024
TARGET = GPUTarget("cuda", 90, 32)
# What the tiling heuristics read of an H100 (torch.cuda.get_device_properties).
H100 = SimpleNamespace(multi_processor_count=132, L2_cache_size=50 * 2**20, regs_per_multiprocessor=65536, warp_size=32)


def _compile(fn: JITFunction, args: tuple, kwargs: dict):
    """Compile one launch for ``TARGET`` with the specialization Triton's launcher would use."""
    backend = make_backend(TARGET)
    binder = create_function_from_signature(fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return triton.compile(ASTSource(fn, signature, constexprs, attrs), target=TARGET, options=options.__dict__)


def _ptxas_info(ptx: str) -> str:
    ptxas = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas")
    if not os.path.exists(ptxas):
        return "ptxas not found"
    with tempfile.NamedTemporaryFile("w", suffix=".ptx", delete=False) as f:
        f.write(ptx)
    out = subprocess.run([ptxas, "-arch=sm_90a", "-v", f.name, "-o", os.devnull], capture_output=True, text=True)
    os.unlink(f.name)
    lines = [line.split("info    : ")[-1].strip() for line in out.stderr.splitlines()]
    return "; ".join(line for line in lines if "registers" in line or "spill" in line)


def _cp_async(ptx: str) -> dict[int, int]:
    """``cp.async`` copies in ``ptx`` by width in bytes: the loads Triton's pipeliner made
    asynchronous (none: the loads are synchronous, typically because they are not vectorised)."""
    counts: dict[int, int] = {}
    for width in re.findall(r"cp\.async\.c[ag]\.shared\.global \[[^]]*\], \[[^]]*\], (0x[0-9a-fA-F]+|\d+)", ptx):
        counts[int(width, 0)] = counts.get(int(width, 0), 0) + 1
    return counts


def _launches(dtype: torch.dtype) -> list[tuple[str, JITFunction, tuple, dict]]:
    """Drive the backend at the reference model's size, recording launches instead of running."""
    captured: list[tuple[str, JITFunction, tuple, dict]] = []
    case = ["?"]

    def record(self, *args, grid, warmup, **kwargs):
        captured.append((case[0], self, args, dict(kwargs)))

    JITFunction.run = record

    from fusedconvlstm import config
    from fusedconvlstm.calls.conv1d import check_conv1d_stack_args
    from fusedconvlstm.triton import conv1d as layer_kernels
    from fusedconvlstm.triton import conv1d_fused_stack as fused
    from fusedconvlstm.triton import conv1d_stack as backend

    # Tile, split, grid and slab heuristics as they are on an H100: they see the device only
    # through gpu_properties. fp32 precision as PyTorch's defaults give on a GPU (TF32 convs,
    # IEEE projection) unless a case forces one.
    layer_kernels.gpu_properties = lambda device: H100
    cuda = torch.device("cuda")
    dot_precision, forced = layer_kernels.dot_precision, [None]
    layer_kernels.dot_precision = fused.dot_precision = lambda dt, device, layer: (
        forced[0] or dot_precision(dt, cuda, layer)
    )

    B, T, V = 256, 100, 20_000
    chans = [100, 200, 200, 256, 256, 512]
    w = [torch.randn(c_out, c_in, 3, dtype=dtype) for c_in, c_out in zip(chans, chans[1:])]
    b = [torch.randn(c_out, dtype=dtype) for c_out in chans[1:]]
    x = torch.randn(B, T, 100, dtype=dtype)
    tokens = torch.randint(0, V, (B, T))
    table = torch.randn(V, 100, dtype=dtype)
    hyper = ([1, 1, 1, 1, 2], [0] * 10, [1] * 5, ",".join(["none"] * 5))
    w_packed, biases = backend._prepare(w, b, None, None)
    proj_w, proj_b = torch.randn(4096, 512, dtype=dtype), torch.randn(4096, dtype=dtype)
    pw_packed, p_biases = backend._prepare(w, b, proj_w, proj_b)
    # One launch of each kind of specialization: the fused kernel in inference (slab), training
    # with the embedding gather (saved intermediates), with the projection and with both; every layer.
    os.environ[backend.STRATEGY_ENV_VAR] = "fused"
    config.reload()  # settings are read once
    case[0] = "fused forward"
    call = check_conv1d_stack_args(x, None, w, b, *hyper, None, None, False)
    backend._stack_forward(x, None, w_packed, biases, call, False)
    case[0] = "fused embedding forward (training)"
    e_call = check_conv1d_stack_args(table, tokens, w, b, *hyper, None, None, True)
    backend._stack_forward(table, tokens, w_packed, biases, e_call, True)
    case[0] = "fused projection forward"
    p_call = check_conv1d_stack_args(x, None, w, b, *hyper, proj_w, proj_b, False)
    backend._stack_forward(x, None, pw_packed, p_biases, p_call, False)
    # Token ids to gates (the reference model's fused path), fused and per layer.
    ep_call = check_conv1d_stack_args(table, tokens, w, b, *hyper, proj_w, proj_b, True)
    case[0] = "fused embedding+projection forward (training)"
    backend._stack_forward(table, tokens, pw_packed, p_biases, ep_call, True)
    os.environ[backend.STRATEGY_ENV_VAR] = "layers"
    config.reload()  # settings are read once
    case[0] = "layers embedding+projection forward"
    _, ep_saved = backend._stack_forward(table, tokens, pw_packed, p_biases, ep_call, True)
    saved = [torch.randn(B, t, c, dtype=dtype) for t, c in zip([98, 96, 94, 92], chans[1:5])]
    case[0] = "backward"
    backend._stack_backward(torch.randn(B, 45, 512, dtype=dtype), x, None, w_packed, biases, saved, call)
    case[0] = "embedding backward"
    backend._stack_backward(torch.randn(B, 45, 512, dtype=dtype), table, tokens, w_packed, biases, saved, e_call)
    case[0] = "embedding+projection backward"
    gates_grad = torch.randn(45, B, 4096, dtype=dtype)
    backend._stack_backward(gates_grad, table, tokens, pw_packed, p_biases, ep_saved, ep_call)
    # Training with dropout: on the gathered embedding (the reference model's) and mid-stack.
    seed = torch.tensor(5)
    d_call = check_conv1d_stack_args(table, tokens, w, b, *hyper, proj_w, proj_b, True, [0.25, 0, 0, 0, 0.1], seed)
    case[0] = "dropout masks"
    drops = backend.dropout_masks(seed, d_call)
    for strategy in ("fused", "layers"):
        os.environ[backend.STRATEGY_ENV_VAR] = strategy
        config.reload()  # settings are read once
        case[0] = f"dropout {strategy} embedding+projection forward (training)"
        _, d_saved = backend._stack_forward(table, tokens, pw_packed, p_biases, d_call, True, drops)
    case[0] = "dropout embedding+projection backward"
    backend._stack_backward(gates_grad, table, tokens, pw_packed, p_biases, d_saved, d_call, drops)
    # The tap-loop switch (FUSEDCONVLSTM_CONV1D_TAP_ORDER=inner), timed both ways on a GPU: the
    # reference model's forward with dropout, fused and per layer.
    os.environ[config.ENV["conv1d_tap_order"]] = "inner"
    for strategy in ("fused", "layers"):
        os.environ[backend.STRATEGY_ENV_VAR] = strategy
        config.reload()  # settings are read once
        case[0] = f"taps inside, dropout {strategy} embedding+projection forward (training)"
        backend._stack_forward(table, tokens, pw_packed, p_biases, d_call, True, drops)
    del os.environ[config.ENV["conv1d_tap_order"]]
    # Every activation (forward, prologue and derivative), stride 3, dilation, padding, in fp16.
    h = torch.float16
    mw = [torch.randn(24, 20, 3, dtype=h), torch.randn(16, 24, 5, dtype=h), torch.randn(12, 16, 1, dtype=h)]
    mw.append(torch.randn(8, 12, 3, dtype=h))
    mb = [torch.randn(24, dtype=h), None, torch.randn(12, dtype=h), torch.randn(8, dtype=h)]
    mhyper = ([1, 3, 1, 1], [1, 1, 2, 1, 0, 0, 1, 1], [2, 1, 1, 1], "relu,gelu,silu,tanh")
    mx = torch.randn(16, 64, 20, dtype=h)
    m_packed, m_biases = backend._prepare(mw, mb, None, None)
    m_call = check_conv1d_stack_args(mx, None, mw, mb, *mhyper, None, None, True)
    for strategy in ("fused", "layers"):
        os.environ[backend.STRATEGY_ENV_VAR] = strategy
        config.reload()  # settings are read once
        case[0] = f"activations {strategy} forward (training)"
        _, m_saved = backend._stack_forward(mx, None, m_packed, m_biases, m_call, True)
    case[0] = "activations backward"
    backend._stack_backward(torch.randn(16, 20, 8, dtype=h), mx, None, m_packed, m_biases, m_saved, m_call)
    if dtype == torch.float32:
        # TF32 turned off (torch.backends.cudnn.allow_tf32 = False): every dot in IEEE fp32.
        forced[0] = "ieee"
        for strategy in ("fused", "layers"):
            os.environ[backend.STRATEGY_ENV_VAR] = strategy
            config.reload()  # settings are read once
            case[0] = f"IEEE fp32 {strategy} projection forward"
            backend._stack_forward(x, None, pw_packed, p_biases, p_call, False)
        case[0] = "IEEE fp32 backward"
        backend._stack_backward(torch.randn(B, 45, 512, dtype=dtype), x, None, w_packed, biases, saved, call)
        forced[0] = None
    return captured


def _spec(a) -> object:
    """What of a launch argument selects a compiled specialization (dtype of a tensor, divisibility
    by 16 of an integer)."""
    if isinstance(a, torch.Tensor):
        return a.dtype
    if isinstance(a, (tuple, list)):
        return tuple(_spec(x) for x in a)
    if isinstance(a, int) and not isinstance(a, bool):
        return a % 16 == 0
    return None


def main() -> int:
    if os.environ.get("TRITON_INTERPRET") == "1":
        print("run without TRITON_INTERPRET=1: the interpreter replaces the compiler")
        return 2
    dtype = getattr(torch, os.environ.get("DTYPE", "bfloat16"))
    failures = 0
    seen = set()
    for case, fn, args, kwargs in _launches(dtype):
        key = (fn.fn.__name__, repr(sorted((k, v) for k, v in kwargs.items() if k.isupper() or k.startswith("num"))))
        key += tuple(_spec(a) for a in args)
        if key in seen:
            continue
        seen.add(key)
        try:
            compiled = _compile(fn, args, kwargs)
        except Exception as e:  # report every kernel, then fail
            print(f"FAIL {case}: {fn.fn.__name__}: {type(e).__name__}: {e}")
            failures += 1
            continue
        shared = compiled.metadata.shared
        ptx = compiled.asm["ptx"]
        copies = _cp_async(ptx)
        ok = shared <= H100_SHARED_BYTES
        note = ""
        if fn.fn.__name__ == "_conv1d_forward_kernel" and kwargs.get("C_IN") in (100, 200) and not copies:
            ok, note = False, " (the loads are not pipelined: channel counts not constexpr?)"
        failures += not ok
        status = "ok  " if ok else "FAIL"
        channels = f" {kwargs['C_IN']}->{kwargs['C_OUT']}" if "C_IN" in kwargs else ""
        cp = ", ".join(f"{n}x{w}B" for w, n in sorted(copies.items())) or "none"
        print(f"{status} {case}: {fn.fn.__name__}{channels} shared={shared} B; cp.async {cp}; {_ptxas_info(ptx)}{note}")
        sys.stdout.flush()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
