"""Backend registry: which implementation serves an op call, and why another cannot.

Every op of the package has up to four implementations ("backends"):

- ``"reference"``: pure PyTorch, runs on any device; the float64 ground truth the others are
  tested against (a Python loop over time steps for the LSTM: never picked by ``auto``).
- ``"torch"``: PyTorch's own kernels (cuDNN on NVIDIA GPUs, oneDNN / MKL on the CPU). The modules
  (:class:`fusedconvlstm.LSTM`, :class:`fusedconvlstm.Conv1dStack`, ``ParallelLSTM``,
  ``ConvLSTMClassifier``) serve it at the module level, where they hold the input and every
  weight: ``torch.lstm`` with the module's own weights, as ``nn.LSTM`` does, and an
  ``F.conv1d`` chain; see :mod:`fusedconvlstm.torch_backend`.
- ``"triton"``: Triton kernels (CUDA devices; CPU tensors only under ``TRITON_INTERPRET=1``).
- ``"cuda"``: the compiled extension ``fusedconvlstm._C`` (CUDA devices).

``backend="auto"`` picks by evidence (:func:`auto_choice`): off CUDA devices the ``torch``
backend (measured faster than the package's CPU paths); on a CUDA device a hand-written kernel
(the op's preference order of ``triton`` and ``cuda``) only where it can serve the call *and* a
validation record (:mod:`fusedconvlstm.records`) covers the call's op, GPU architecture, dtype and
shape as correct and faster than torch; every other call, a refusal included, goes to
``torch``. :func:`explain` says why under ``"auto"``. A backend asked for by name that cannot
serve a call raises :class:`BackendUnavailableError` with the reason; nothing falls back
silently. The environment variable ``FUSEDCONVLSTM_BACKEND`` replaces ``"auto"`` wherever a
caller did not name a backend.
"""

from __future__ import annotations

import functools
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass

import torch

from fusedconvlstm import _extension, config, records

BACKENDS = ("reference", "triton", "cuda", "torch")
AUTO = "auto"
TORCH = "torch"
KERNELS = ("triton", "cuda")
"""The backends of hand-written kernels: ``auto`` picks them only where a validation record says so."""
ENV_VAR = config.ENV["backend"]


class BackendUnavailableError(RuntimeError):
    """A backend asked for by name cannot serve this call; the message says why."""


@dataclass(frozen=True)
class Implementation:
    """One backend's implementation of one op.

    ``why_not(call)`` returns ``None`` when the implementation can serve ``call`` (an op-specific
    description of the arguments) and otherwise a sentence saying why not. ``functions`` holds
    the op-specific callables (forward, backward, workspace shapes, ...).
    """

    op: str
    backend: str
    why_not: Callable[[object], str | None]
    functions: dict[str, Callable]

    def __getattr__(self, name: str) -> Callable:
        try:
            return self.functions[name]
        except KeyError:
            raise AttributeError(f"{self.backend} implementation of {self.op} has no {name!r}") from None

    def get(self, name: str) -> Callable | None:
        """An optional function of the op's interface (``describe``, ...), ``None`` if not given."""
        return self.functions.get(name)


def _assume_constant_result(fn: Callable) -> Callable:
    """``torch.compiler.assume_constant_result(fn)`` without importing dynamo when the package is
    imported (about a second, for users who never compile): torch's decorator does nothing but set
    this mark, which dynamo reads when it traces a call (``tests/test_backends.py`` checks that)."""
    fn._dynamo_marked_constant = True
    return fn


_REGISTRY: dict[str, dict[str, Implementation]] = {}
# The kernels ``auto`` considers on CUDA devices, per op, in order; ``torch`` closes the list.
_AUTO_ORDER: dict[str, tuple[str, ...]] = {}
# Per op: the call's features that validation records range over, and the call as a tuple of
# plain values and back (what a decision made while torch.compile traces is keyed on).
_FEATURES: dict[str, Callable[[object], dict[str, int]]] = {}
_THAW: dict[str, Callable[[tuple], object]] = {}
_INTERFACE: dict[str, type] = {}


def register_op(
    op: str,
    auto_order: tuple[str, ...],
    features: Callable[[object], dict[str, int]],
    thaw: Callable[[tuple], object],
    interface: type,
) -> None:
    """Declare an op: the kernels ``auto`` tries on a CUDA device, in order (each only where a
    validation record covers the call), the call's ``features`` records range over, ``thaw``,
    which rebuilds a call from its ``freeze()`` tuple, and the ``interface`` (a runtime-checkable
    Protocol of :mod:`fusedconvlstm.calls`) every implementation must satisfy."""
    for name in auto_order:
        if name not in KERNELS:
            raise ValueError(f"register_op: auto considers only the kernels {KERNELS}, got {name!r}")
    _REGISTRY.setdefault(op, {})
    _AUTO_ORDER[op] = tuple(auto_order)
    _FEATURES[op] = features
    _THAW[op] = thaw
    _INTERFACE[op] = interface
    for impl in _REGISTRY[op].values():
        _check_interface(impl)


def call_features(op: str, call: object) -> dict[str, int]:
    """The features of a call of ``op`` that validation records range over."""
    return _FEATURES[op](call)


def register_implementation(
    op: str, backend: str, why_not: Callable[[object], str | None], **functions: Callable
) -> Implementation:
    """Register ``backend``'s implementation of ``op``."""
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    impl = Implementation(op, backend, why_not, functions)
    _check_interface(impl)
    _REGISTRY.setdefault(op, {})[backend] = impl
    return impl


def _check_interface(impl: Implementation) -> None:
    """Refuse an implementation that lacks a member of its op's interface (once the op is declared)."""
    interface = _INTERFACE.get(impl.op)
    if interface is not None and not isinstance(impl, interface):
        members = [n for n in vars(interface) if not n.startswith("_")] + list(
            getattr(interface, "__annotations__", {})
        )
        missing = sorted(n for n in members if not hasattr(impl, n))
        raise TypeError(f"the {impl.backend} implementation of {impl.op} lacks {missing} of {interface.__name__}")


def implementation(op: str, backend: str) -> Implementation | None:
    """The implementation ``backend`` registered for ``op`` (``None`` where it has none)."""
    return _REGISTRY[op].get(backend)


def _triton_why_not(device: torch.device) -> str | None:
    if importlib.util.find_spec("triton") is None:
        return "Triton is not installed (pip install triton)"
    if device.type == "cuda":
        return None if torch.cuda.is_available() else "no CUDA device is available to run Triton kernels"
    if device.type == "cpu":
        if config.current().triton_interpret:
            return _triton_interpreter_why_not()
        return "Triton runs CPU tensors only under the interpreter (set TRITON_INTERPRET=1)"
    return f"Triton does not run on {device.type} tensors"


def _version(dist: str) -> tuple[int, ...]:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return tuple(int(p) for p in version(dist).split("+")[0].split(".")[:2])
    except (PackageNotFoundError, ValueError):
        return ()


@functools.cache
def _triton_interpreter_why_not() -> str | None:
    """Triton before 3.7 turns one-element arrays into Python ints in its interpreter, which
    numpy 2.4 refuses: every kernel would fail with a numpy TypeError."""
    if (0,) < _version("triton") < (3, 7) and _version("numpy") >= (2, 4):
        return "Triton's interpreter before Triton 3.7 needs numpy < 2.4 (pip install 'numpy<2.4')"
    return None


def _cuda_why_not(device: torch.device) -> str | None:
    reason = _extension.unavailable_reason()
    if reason is not None:
        return reason
    if device.type != "cuda":
        return f"the cuda backend runs CUDA tensors only, got tensors on {device.type}"
    return None


def backend_why_not(backend: str, device: torch.device) -> str | None:
    """Why ``backend`` cannot run on ``device`` at all (``None`` when it can)."""
    if backend in ("reference", TORCH):
        return None
    if backend == "triton":
        return _triton_why_not(device)
    if backend == "cuda":
        return _cuda_why_not(device)
    raise ValueError(f"backend must be one of {BACKENDS + (AUTO,)}, got {backend!r}")


def check_backend_name(backend: str) -> str:
    """Validate a ``backend=`` argument of a module."""
    if backend not in BACKENDS + (AUTO,):
        raise ValueError(f"backend must be one of {BACKENDS + (AUTO,)}, got {backend!r}")
    return backend


def requested_backend(backend: str) -> str:
    """The backend a caller asked for, with ``auto`` replaced by ``$FUSEDCONVLSTM_BACKEND``."""
    if backend == AUTO:
        return config.choice("backend", BACKENDS + (AUTO,), AUTO)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS + (AUTO,)}, got {backend!r}")
    return backend


def _why_not(op: str, name: str, call: object, device: torch.device) -> str | None:
    """Why backend ``name`` cannot serve ``call`` of ``op`` on ``device`` (``None`` when it can)."""
    reason = backend_why_not(name, device)
    impl = _REGISTRY[op].get(name)
    if reason is None and impl is None:
        reason = f"the {name} backend has no implementation of {op} yet"
    if reason is None:
        reason = impl.why_not(call)
    return reason


def auto_choice(op: str, call: object, device: torch.device) -> tuple[str, str]:
    """``(backend, why)``: what ``auto`` runs ``call`` of ``op`` on, and why.

    Off CUDA devices the ``torch`` backend. On a CUDA device the first kernel of the op's order
    that can serve the call and that a validation record enables for it (correct and faster on
    this architecture, dtype and shape); otherwise ``torch``, the reason naming each kernel's
    refusal or missing evidence.
    """
    if device.type != "cuda":
        return TORCH, (
            f"on {device.type} torch's own kernels: measured faster than the package's paths there, "
            "and hand-written kernels are picked on CUDA devices only"
        )
    reasons = []
    for name in _AUTO_ORDER[op]:
        reason = _why_not(op, name, call, device)
        if reason is not None:
            reasons.append(f"{name} refuses: {reason}")
            continue
        enabled, why = records.verdict(op, name, device, call.dtype, call_features(op, call))
        if enabled:
            return name, why
        reasons.append(f"{name}: {why}")
    return TORCH, "; ".join(reasons) if reasons else f"no kernel of {op} on CUDA devices"


def resolve(op: str, backend: str, call: object, device: torch.device) -> Implementation:
    """The implementation of ``op`` that serves ``call`` on ``device`` for a ``backend`` request.

    Raises :class:`BackendUnavailableError` when a backend named explicitly cannot serve.
    """
    impls = _REGISTRY[op]
    backend = requested_backend(backend)
    if backend != AUTO:
        reason = _why_not(op, backend, call, device)
        if reason is not None:
            raise BackendUnavailableError(f"{op}: backend={backend!r} cannot serve this call: {reason}")
        return impls[backend]
    return impls[auto_choice(op, call, device)[0]]


@_assume_constant_result
def _resolved_name(op: str, backend: str, frozen: tuple) -> str:
    """:func:`resolve`'s backend name for a call given as its ``freeze()`` tuple of plain values:
    while ``torch.compile`` traces, this runs once, eagerly, and its answer is a constant of the
    graph (the choice reads files and the device, which dynamo cannot trace)."""
    call = _THAW[op](frozen)
    return resolve(op, backend, call, call.device).backend


def module_backend(op: str, backend: str, device: torch.device, make_call: Callable[[], object]) -> str:
    """The backend that serves a module's call of ``op`` on ``device``: the modules take their
    ``torch`` path when this is ``"torch"`` and call the op with this name otherwise.
    ``make_call()`` builds the op's call, only where the answer depends on it (a CUDA device, or
    a backend named explicitly, which must be able to serve it). Raises
    :class:`BackendUnavailableError` when a backend named explicitly cannot serve; under
    ``torch.compile`` the answer is fixed when the graph is traced."""
    if torch.compiler.is_compiling():
        if device.type != "cuda":  # no shape enters the choice (they may be symbolic here)
            return _requested_off_cuda(backend)
        return _resolved_name(op, backend, make_call().freeze())
    if device.type != "cuda" and requested_backend(backend) == AUTO:
        return auto_choice(op, None, device)[0]
    call = make_call()
    return resolve(op, backend, call, call.device).backend


@_assume_constant_result
def _requested_off_cuda(backend: str) -> str:
    """What ``backend`` runs off CUDA devices while ``torch.compile`` traces: ``torch`` for
    ``auto``, else the backend named (the op checks that it can serve when it runs)."""
    name = requested_backend(backend)
    return TORCH if name == AUTO else name


def backend_for_op(op: str, backend: str, call: object, device: torch.device) -> str:
    """The backend name a public wrapper hands to its custom op.

    Eagerly the request is resolved here, so that a backend named explicitly that cannot serve
    raises before any work. While ``torch.compile`` traces, the request goes to the op as it is:
    resolving reads the device's limits and the extension's state (files, a driver query), which
    dynamo cannot trace, and the op resolves the same request when it runs (and its fake
    implementation when it is traced), with the same answer.
    """
    if torch.compiler.is_compiling():
        return backend
    return resolve(op, backend, call, device).backend


def explain(op: str, call: object, device: torch.device, detail: bool = False) -> dict[str, str | None]:
    """For each backend, ``None`` if it can serve ``call`` of ``op`` on ``device``, else why not;
    and under ``"auto"`` the backend ``auto`` picks and why (``"torch: ..."``, ``"cuda: ..."``).

    With ``detail=True`` a backend that can serve maps to ``"serves: ..."`` with how it would
    (its implementation's ``describe(call)``, e.g. which kernels the cuda backend launches) and
    one that cannot to ``"cannot serve: <reason>"``.
    """
    out: dict[str, str | None] = {}
    for name in BACKENDS:
        reason = _why_not(op, name, call, device)
        if detail:
            if reason is not None:
                reason = f"cannot serve: {reason}"
            else:
                how = _REGISTRY[op][name].get("describe")
                reason = f"serves: {how(call) if how is not None else 'this call'}"
        out[name] = reason
    name, why = auto_choice(op, call, device)
    out[AUTO] = f"{name}: {why}"
    return out


def registered_ops() -> tuple[str, ...]:
    """Names of the ops known to the registry."""
    return tuple(_REGISTRY)
