"""The cluster forward kernel's plan (sm_90): the blocks of one recurrence and batch tile form a
thread-block cluster and exchange ``h`` in distributed shared memory. Opt-in
(``FUSEDCONVLSTM_LSTM_FWD_KERNEL=cluster``) until GPU measurements decide; keeping or deleting
it is this file, its kernel in ``csrc/`` and the branches that name it."""

from __future__ import annotations

import functools

import torch

from fusedconvlstm.calls.lstm import LSTMRecurrenceCall
from fusedconvlstm.cuda import persistent_config, persistent_ops, planning  # noqa: F401  (persistent_ops: the schemas)
from fusedconvlstm.cuda.persistent_config import DeviceLimits, Layout

cluster_forward_op = torch.ops.fusedconvlstm.lstm_cluster_forward_

_cluster_max_active = torch.ops.fusedconvlstm.lstm_cluster_max_active_clusters


def cluster_plan(call: LSTMRecurrenceCall, limits: DeviceLimits | None = None) -> Layout | str:
    """The cluster forward kernel's configuration for ``call``, or why it does not take it: besides
    the published limits, the device itself must place a cluster of that many blocks
    (:func:`max_active_clusters`), which a part with fewer SMs per GPC may not."""
    lim = planning.limits_for(call, limits)
    reason = planning.refusal(call) or (lim if isinstance(lim, str) else None)
    if reason is not None:
        return reason
    plan = planning.choose(call, persistent_config.CLUSTER, lim)
    if isinstance(plan, Layout):
        placed = max_active_clusters(call.device, call.dtype, call.hidden_size, plan)
        if isinstance(placed, str):
            return placed
        if placed == 0:
            return (
                f"the device cannot place a cluster of {plan.nu} blocks with {plan.smem} bytes of shared memory "
                f"each (cudaOccupancyMaxActiveClusters is 0 for config nt={plan.nt} wm={plan.wm} wn={plan.wn} "
                f"wk={plan.wk})"
            )
    return plan


def max_active_clusters(device: torch.device, dtype: torch.dtype, hidden_size: int, layout: Layout) -> int | str | None:
    """How many clusters of the cluster forward kernel in ``layout``'s configuration ``device``
    holds at once (``cudaOccupancyMaxActiveClusters``; 0: it cannot place one), a sentence where
    the query itself refuses, or ``None`` where no device can be asked (a CPU call, no CUDA here)."""
    if device.type != "cuda" or not torch.cuda.is_available():
        return None
    index = device.index if device.index is not None else torch.cuda.current_device()
    return _max_active_clusters(index, dtype, hidden_size, layout.args)


@functools.lru_cache(maxsize=256)
def _max_active_clusters(index: int, dtype: torch.dtype, hidden_size: int, args: tuple[int, ...]) -> int | str:
    like = torch.empty(0, dtype=dtype, device=torch.device("cuda", index))
    try:
        return int(_cluster_max_active(like, hidden_size, *args))
    except (RuntimeError, NotImplementedError) as e:
        return f"the device's cluster occupancy query refused: {e}"
