"""Validation records: the evidence on which ``backend="auto"`` picks a hand-written kernel.

A record says that one backend's kernel of one op, on one GPU architecture (compute capability)
and dtype, was checked over a range of call shapes: correct against the float64 reference within
the pass mark of ``check`` (``correct``), and faster than torch's own kernels (cuDNN) by ``bench``
(``faster``: ``true``, ``false``, or ``null`` when no timing was brought). ``auto`` runs a kernel
only for a call that a record with ``correct`` and ``faster`` both true covers; every other call
goes to the ``torch`` backend. A record is a JSON object::

    {"op": "lstm_recurrence", "backend": "cuda", "arch": "sm_90", "dtype": "bfloat16",
     "range": {"seq_len": [1, 1000], "batch": [1, 1024], "hidden_size": [512, 512], ...},
     "correct": true, "faster": true, "source": "..."}

``range`` maps each of the op's features (:func:`fusedconvlstm.backends.call_features`) to an
inclusive ``[lo, hi]``; a call is covered when every one of its features lies in the record's
range (a feature the record does not name is not covered).

Two places hold records:

- ``validation_records.json`` in the package: what the project's own GPU runs recorded;
- the user's records, written by ``python -m fusedconvlstm check --record`` into the cache
  directory (``$FUSEDCONVLSTM_CACHE_DIR``, else ``$XDG_CACHE_HOME/fusedconvlstm``, else
  ``~/.cache/fusedconvlstm``), one file per package version and extension build, so a rebuild or
  an upgrade starts without records.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from collections.abc import Iterable
from dataclasses import dataclass

import torch

from fusedconvlstm import _extension, config
from fusedconvlstm._version import __version__

_HERE = os.path.dirname(os.path.abspath(__file__))
SHIPPED_PATH = os.path.join(_HERE, "validation_records.json")
CACHE_ENV = config.ENV["cache_dir"]
FIELDS = ("op", "backend", "arch", "dtype", "range", "correct", "faster")


class RecordError(ValueError):
    """A records file that cannot be read as records; the message names the file and the entry."""


@dataclass(frozen=True)
class Record:
    """One validation record (see the module docstring)."""

    op: str
    backend: str
    arch: str
    dtype: str
    range: tuple[tuple[str, int, int], ...]
    correct: bool
    faster: bool | None
    source: str = ""

    @classmethod
    def from_json(cls, d: dict, where: str) -> Record:
        if not isinstance(d, dict):
            raise RecordError(f"{where}: a record must be a JSON object, got {type(d).__name__}")
        missing = [k for k in FIELDS if k not in d]
        if missing:
            raise RecordError(f"{where}: a record needs {', '.join(missing)}")
        rng = d["range"]
        if not isinstance(rng, dict):
            raise RecordError(f"{where}: range must map feature names to [lo, hi]")
        bounds = []
        for name, pair in sorted(rng.items()):
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(v, int) for v in pair)):
                raise RecordError(f"{where}: range[{name!r}] must be [lo, hi] integers, got {pair!r}")
            bounds.append((name, pair[0], pair[1]))
        if d["faster"] not in (True, False, None) or d["correct"] not in (True, False):
            raise RecordError(f"{where}: correct must be true or false, faster true, false or null")
        return cls(
            op=str(d["op"]),
            backend=str(d["backend"]),
            arch=str(d["arch"]),
            dtype=str(d["dtype"]),
            range=tuple(bounds),
            correct=bool(d["correct"]),
            faster=d["faster"],
            source=str(d.get("source", "")),
        )

    def to_json(self) -> dict:
        return {
            "op": self.op,
            "backend": self.backend,
            "arch": self.arch,
            "dtype": self.dtype,
            "range": {name: [lo, hi] for name, lo, hi in self.range},
            "correct": self.correct,
            "faster": self.faster,
            "source": self.source,
        }

    def covers(self, op: str, backend: str, arch: str, dtype: str, features: dict[str, int]) -> bool:
        """Whether this record speaks for a call with these features (whatever its verdict)."""
        if (self.op, self.backend, self.arch, self.dtype) != (op, backend, arch, dtype):
            return False
        bounds = {name: (lo, hi) for name, lo, hi in self.range}
        return all(name in bounds and bounds[name][0] <= int(v) <= bounds[name][1] for name, v in features.items())

    @property
    def enables(self) -> bool:
        """Whether ``auto`` may pick the kernel for the calls this record covers."""
        return self.correct and self.faster is True


def arch_of(device: torch.device) -> str:
    """``sm_<major><minor>`` of a CUDA device."""
    major, minor = torch.cuda.get_device_capability(device)
    return f"sm_{major}{minor}"


def dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def package_version() -> str:
    return __version__


@functools.cache
def build_key() -> str:
    """Which build of the extension is installed: a digest of its build record (``nobuild`` when
    there is none), so records of one build never speak for another. Read once per process (the
    extension a process loads does not change), not on every ``auto`` decision."""
    info = _extension.build_info()
    if info is None:
        return "nobuild"
    return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()[:16]


def cache_dir() -> str:
    """The directory of the user's records."""
    return config.current().cache_dir


def user_records_path() -> str:
    """The user's records file for this package version and extension build."""
    version = "".join(c if c.isalnum() or c in ".+-" else "_" for c in package_version())
    return os.path.join(cache_dir(), f"validation-records-{version}-{build_key()}.json")


def read_file(path: str) -> list[Record]:
    """The records of one file (a JSON list); a missing file holds none."""
    if not os.path.exists(path):
        return []
    try:
        with open(path) as f:
            data = json.load(f)
    except (OSError, json.JSONDecodeError) as exc:
        raise RecordError(f"{path}: not a readable JSON list of records ({exc})") from exc
    if not isinstance(data, list):
        raise RecordError(f"{path}: must hold a JSON list of records, got {type(data).__name__}")
    return [Record.from_json(d, f"{path}[{k}]") for k, d in enumerate(data)]


_CACHE: dict[tuple[str, float], list[Record]] = {}


def _read_cached(path: str) -> list[Record]:
    """:func:`read_file`, re-read only when the file's modification time changes."""
    try:
        stamp = os.path.getmtime(path)
    except OSError:
        return []
    key = (path, stamp)
    if key not in _CACHE:
        if len(_CACHE) > 8:
            _CACHE.clear()
        _CACHE[key] = read_file(path)
    return _CACHE[key]


def all_records() -> list[Record]:
    """The shipped records, then the user's."""
    return _read_cached(SHIPPED_PATH) + _read_cached(user_records_path())


def covering(op: str, backend: str, arch: str, dtype: torch.dtype, features: dict[str, int]) -> list[Record]:
    """The records that speak for this call of ``backend``'s ``op`` on a GPU of ``arch``."""
    name = dtype_name(dtype)
    return [r for r in all_records() if r.covers(op, backend, arch, name, features)]


def verdict(
    op: str, backend: str, device: torch.device, dtype: torch.dtype, features: dict[str, int]
) -> tuple[bool, str]:
    """``(enabled, why)``: whether a record lets ``auto`` pick the kernel for this call, and why
    (or why not). A covering record that says wrong or slower wins over one that enables."""
    try:
        arch = arch_of(device)
    except (RuntimeError, AssertionError) as exc:  # no driver to say which GPU this is
        return False, f"the architecture of {device} cannot be read, so no record can cover it ({exc})"
    found = covering(op, backend, arch, dtype, features)
    where = f"{arch} {dtype_name(dtype)} {_shape(features)}"
    if not found:
        return False, f"no validation record covers {backend}'s {op} on {where} (`check --record` on this GPU adds one)"
    wrong = [r for r in found if not r.correct]
    if wrong:
        return False, f"a validation record found {backend}'s {op} wrong on {where} ({wrong[0].source or 'no source'})"
    slower = [r for r in found if r.faster is False]
    if slower:
        return False, f"a validation record found {backend}'s {op} slower than torch on {where}"
    good = [r for r in found if r.enables]
    if not good:
        return False, (
            f"{backend}'s {op} on {where} is recorded correct but its speed is unknown "
            "(`bench` on this GPU, then `check --record --bench RESULTS`)"
        )
    return True, f"validated on {where} ({good[0].source or 'record'})"


def _shape(features: dict[str, int]) -> str:
    return " ".join(f"{k}={v}" for k, v in features.items())


def append_user_records(new: Iterable[Record]) -> str:
    """Add records to the user's file (one entry per op, backend, arch, dtype and range: a new
    verdict replaces the old); returns the path."""
    path = user_records_path()
    old = read_file(path)
    by_key = {(r.op, r.backend, r.arch, r.dtype, r.range): r for r in old}
    for r in new:
        by_key[(r.op, r.backend, r.arch, r.dtype, r.range)] = r
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump([r.to_json() for r in by_key.values()], f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
    _CACHE.clear()
    return path


# --- records from ``check`` (and ``bench``) ------------------------------------------------------

BENCH_OPS = {"lstm_recurrence": "lstm", "conv1d_stack": "conv1d_stack"}
"""The ``bench`` op that times a module serving each recorded op against torch.nn."""
_BENCH_DTYPES = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}


def _bench_shape_matches(op: str, features: dict[str, int], row: dict) -> bool:
    """Whether a ``bench`` row timed the call shape of a ``check`` case: the LSTM cases are one
    unidirectional layer (``seq`` steps, ``batch``, ``hidden``), the conv case the reference
    model's five convs on ``(batch, seq, 100)``."""
    if row.get("batch") != features["batch"] or row.get("seq") != features["seq_len"]:
        return False
    if op == "lstm_recurrence":
        return (
            row.get("hidden") == features["hidden_size"]
            and features["num_recurrences"] == 1
            and features["proj_size"] == 0
            and features["has_lengths"] == 0
        )
    return features["num_layers"] == 5 and features["max_channels"] == 512 and features["embedding"] == 0


def speed_verdict(
    op: str, backend: str, dtype: str, features: dict[str, int], bench_rows: list[dict], device_name: str
):
    """``(faster, why)`` from ``bench`` results of this GPU: ``True`` when every eager cuDNN
    baseline timed at this shape (both passes where both ran) was slower than ours and our error
    was within the pass mark, ``False`` when one was not, ``None`` when nothing was timed here."""
    rows = [
        r
        for r in bench_rows
        if r.get("op") == BENCH_OPS.get(op)
        and r.get("backend") == backend
        and _BENCH_DTYPES.get(r.get("dtype")) == dtype
        and r.get("device") == device_name
        and str(r.get("baseline", "")).startswith("cudnn")
        and _bench_shape_matches(op, features, r)
    ]
    if not rows:
        return None, "speed unknown: no bench row of this GPU times this shape"
    slow = [r for r in rows if not (r.get("speedup", 0) > 1.0 and r.get("err_within_2x_baseline"))]
    if slow:
        r = slow[0]
        return False, f"not faster: {r.get('pass')} {r.get('speedup', 0):.2f}x vs {r.get('baseline')}"
    return True, "faster: " + ", ".join(f"{r.get('pass')} {r['speedup']:.2f}x vs {r.get('baseline')}" for r in rows)
