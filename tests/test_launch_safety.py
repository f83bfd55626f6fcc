"""What a first GPU run must not trip over in the persistent kernels' launches, checked without one.

- The launch arithmetic of ``csrc/lstm_persistent.cuh`` (compiled here for the host with nvcc,
  ``tests/layout_probe.cu``) agrees with :mod:`fusedconvlstm.cuda.persistent_config` at every
  size, including hidden sizes whose shared memory exceeds 2^31 bytes (it must then fail the
  device's limit check, never wrap around to a size that passes it).
- The barrier watchdog is off unless ``FUSEDCONVLSTM_BARRIER_TIMEOUT_S`` asks for it: a correct run
  under compute-sanitizer, a debugger or a time-shared GPU can wait at a barrier for any time, and
  a trap poisons the whole process's CUDA context.
- A cluster the device cannot place (``cudaOccupancyMaxActiveClusters`` 0) makes the launch plan
  take the cooperative kernel, with the reason in ``backends.explain(..., detail=True)``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from fusedconvlstm import backends
from fusedconvlstm.calls.lstm import LSTMRecurrenceCall
from fusedconvlstm.cuda import cluster as cuda_cluster
from fusedconvlstm.cuda import lstm as cuda_lstm
from fusedconvlstm.cuda import persistent as cuda_persistent
from fusedconvlstm.cuda import persistent_config as pc

ROOT = Path(__file__).resolve().parent.parent
CAN_BUILD = shutil.which("nvcc") is not None and torch.version.cuda is not None
WATCHDOG_ENV = "FUSEDCONVLSTM_BARRIER_TIMEOUT_S"
KIND_ARGS = {
    "forward": "forward",
    "backward": "backward",
    pc.CLUSTER: "forward_cluster",
    pc.FROM_INPUT: "forward_from_input",
}


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """Runs queries (lines of tests/layout_probe.cu's protocol) through the host-compiled probe."""
    if shutil.which("nvcc") is None:
        pytest.skip("no nvcc: the header's host code cannot be compiled here")
    torch_dir = Path(torch.__file__).parent
    exe = tmp_path_factory.mktemp("probe") / "layout_probe"
    build = subprocess.run(
        [
            "nvcc",
            "-std=c++17",
            "-O1",
            f"-I{ROOT / 'csrc'}",
            f"-I{torch_dir / 'include'}",
            "-DTORCH_TARGET_VERSION=0x020b000000000000",
            "-DUSE_CUDA",
            str(ROOT / "tests" / "layout_probe.cu"),
            "-o",
            str(exe),
            f"-L{torch_dir / 'lib'}",
            "-ltorch_cpu",
            "-lc10",
            f"-Xlinker=-rpath={torch_dir / 'lib'}",
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-3000:]

    def run(lines: list[str], env: dict[str, str] | None = None) -> list[str]:
        full = {k: v for k, v in os.environ.items() if k != WATCHDOG_ENV} | (env or {})
        out = subprocess.run([str(exe)], input="\n".join(lines) + "\n", capture_output=True, text=True, env=full)
        assert out.returncode == 0, out.stderr
        return out.stdout.splitlines()

    return run


def _query(kind, nt, wm, wn, wk, nbg, batch, recurrences, hidden, dtype, input_size=0):
    return (
        f"layout {KIND_ARGS[kind]} {nt} {wm} {wn} {wk} {nbg} {batch} {recurrences} {hidden} "
        f"{pc.element_bytes(dtype)} {input_size}"
    )


def test_header_layouts_agree_with_the_launch_plan_at_every_size(probe):
    cases = []
    for kind in KIND_ARGS:
        for nt, wm, wn, wk in pc.warp_splits():
            for hidden, dtype in ((100, torch.bfloat16), (512, torch.float32), (70_000, torch.float32)):
                batch = 8 * nt * wn * 3
                nbg = None if kind == pc.CLUSTER else 2
                try:
                    lay = pc.make_layout(kind, nt, wm, wn, wk, nbg, batch, 2, hidden, dtype, input_size=37)
                except ValueError:
                    continue
                if kind == pc.CLUSTER and lay.nu > pc.MAX_CLUSTER_BLOCKS:
                    continue  # the header refuses those clusters (another test)
                cases.append((lay, _query(kind, nt, wm, wn, wk, lay.nbg, batch, 2, hidden, dtype, 37)))
    # Shared memory of 4 GiB + 2816 bytes: 2816 in 32-bit arithmetic, which would pass the check.
    big = pc.make_layout("backward", 4, 1, 8, 1, 1, 256, 1, 986_890, torch.float32)
    assert big.smem == 2**32 + 2816
    cases.append((big, _query("backward", 4, 1, 8, 1, 1, 256, 1, 986_890, torch.float32)))
    answers = probe([q for _, q in cases])
    for (lay, query), answer in zip(cases, answers, strict=True):
        assert answer == f"smem {lay.smem} grid {lay.grid} nu {lay.nu}", (query, lay)


def test_header_refuses_what_the_launch_plan_refuses(probe):
    # H below 2^20 in both; a cluster of more than 16 blocks in both.
    refused = probe([_query("forward", 1, 1, 1, 8, 1, 8, 1, 2**20, torch.float32)])[0]
    assert refused.startswith("refused") and "H below 2^20" in refused
    lay = pc.make_layout(pc.CLUSTER, 1, 1, 1, 8, None, 8, 1, 512, torch.float32)
    assert lay.nu > pc.MAX_CLUSTER_BLOCKS and not lay.fits(pc.H100_SXM)
    refused = probe([_query(pc.CLUSTER, 1, 1, 1, 8, 1, 8, 1, 512, torch.float32)])[0]
    assert refused.startswith("refused") and "at most 16" in refused


def test_barrier_watchdog_is_off_unless_asked_for(probe):
    assert probe(["watchdog"]) == ["watchdog 0"]
    assert probe(["watchdog"], {WATCHDOG_ENV: ""}) == ["watchdog 0"]
    assert probe(["watchdog"], {WATCHDOG_ENV: "120"}) == ["watchdog 120000000000"]
    assert probe(["watchdog"], {WATCHDOG_ENV: "0.5"}) == ["watchdog 500000000"]
    assert probe(["watchdog"], {WATCHDOG_ENV: "0"}) == ["watchdog 0"]
    refused = probe(["watchdog"], {WATCHDOG_ENV: "ten"})[0]
    assert refused.startswith("refused") and WATCHDOG_ENV in refused


POLL_ENV = "FUSEDCONVLSTM_BARRIER_POLL_NS"


def test_barrier_poll_back_off_is_off_unless_asked_for(probe):
    """The barrier's poll switch (relaxed polls with a __nanosleep back-off), timed both ways by
    the GPU session: off (acquire-load polls) by default, a whole number of ns up to 1 ms."""
    assert probe(["poll"]) == ["poll 0"]
    assert probe(["poll"], {POLL_ENV: ""}) == ["poll 0"]
    assert probe(["poll"], {POLL_ENV: "64"}) == ["poll 64"]
    assert probe(["poll"], {POLL_ENV: "1000000"}) == ["poll 1000000"]
    for bad in ("-1", "1000001", "64ns", "0.5"):
        refused = probe(["poll"], {POLL_ENV: bad})[0]
        assert refused.startswith("refused") and POLL_ENV in refused, bad


def test_readme_documents_the_watchdog_where_users_look():
    readme = (ROOT / "README.md").read_text()
    before_development = readme.split("## Development")[0]
    assert WATCHDOG_ENV in before_development, "the watchdog is documented only in the Development section"
    assert "longer than 10 s" not in readme


# ---------------------------------------------------------------------------------------------
# The cluster kernel where the device cannot place its cluster


def _call(B=64, D=2, H=512, dtype=torch.bfloat16, device="cuda"):
    return LSTMRecurrenceCall(5, B, D, H, 0, dtype, torch.device(device), False, (False,) * D)


@pytest.fixture
def prefer_clusters(monkeypatch):
    monkeypatch.setenv(pc.FORWARD_KERNEL_ENV, "cluster")
    asked = []

    def fake(places):
        def query(device, dtype, hidden_size, layout):
            asked.append((device.type, dtype, hidden_size, layout.nu))
            return places

        monkeypatch.setattr(cuda_cluster, "max_active_clusters", query)

    return fake, asked


def test_plan_falls_back_to_the_cooperative_kernel_where_no_cluster_fits(prefer_clusters):
    fake, asked = prefer_clusters
    call = _call()
    fake(0)
    plan = cuda_lstm.persistent_plan(call, "forward", pc.H100_SXM)
    assert isinstance(plan, pc.Layout) and plan.kind == "forward", plan
    assert asked == [("cuda", torch.bfloat16, 512, 16)]
    assert cuda_persistent.forward_kernel_name(call, pc.H100_SXM) == "cooperative"
    text = cuda_lstm.describe(call, pc.H100_SXM)
    assert text.startswith("forward: persistent kernel")
    assert "the preferred cluster kernel does not take it: the device cannot place a cluster of 16 blocks" in text
    assert "cudaOccupancyMaxActiveClusters is 0" in text
    fake("the device's cluster occupancy query refused: no sm_90 code")
    assert cuda_persistent.forward_kernel_name(call, pc.H100_SXM) == "cooperative"
    assert "no sm_90 code" in cuda_lstm.describe(call, pc.H100_SXM)


def test_plan_keeps_the_cluster_kernel_where_the_device_places_it(prefer_clusters):
    fake, asked = prefer_clusters
    for places in (1, None):  # None: no device to ask (published limits only)
        fake(places)
        assert cuda_persistent.forward_kernel_name(_call(), pc.H100_SXM) == "cluster"
    assert len(asked) == 2


def test_no_device_to_ask_about_clusters_on_a_cpu_call():
    lay = pc.make_layout(pc.CLUSTER, 1, 4, 2, 1, None, 64, 2, 512, torch.bfloat16)
    assert cuda_cluster.max_active_clusters(torch.device("cpu"), torch.bfloat16, 512, lay) is None
    if not torch.cuda.is_available():
        assert cuda_cluster.max_active_clusters(torch.device("cuda"), torch.bfloat16, 512, lay) is None


@pytest.mark.skipif(not CAN_BUILD, reason="the cuda backend needs the extension")
def test_explain_detail_gives_the_cluster_fallback_reason(prefer_clusters, monkeypatch):
    fake, _ = prefer_clusters
    fake(0)
    monkeypatch.setattr(pc, "_device_limits", lambda index: pc.H100_SXM)
    if not torch.cuda.is_available():  # explain's choice for auto asks the device's architecture
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    assert torch._C._dispatch_has_kernel_for_dispatch_key("fusedconvlstm::lstm_cluster_max_active_clusters", "CUDA")
    call = _call()
    detail = backends.explain("lstm_recurrence", call, call.device, detail=True)["cuda"]
    assert detail.startswith("serves: forward: persistent kernel"), detail
    assert "cannot place a cluster of 16 blocks" in detail


@pytest.mark.gpu
def test_gpu_cluster_query_answers_for_the_planned_configuration(cuda_device):
    lay = pc.make_layout(pc.CLUSTER, 1, 4, 2, 1, None, 64, 2, 512, torch.bfloat16)
    placed = cuda_cluster.max_active_clusters(torch.device("cuda"), torch.bfloat16, 512, lay)
    if torch.cuda.get_device_capability() < (9, 0):
        assert isinstance(placed, str) and "compute capability 9.0" in placed
    else:
        assert isinstance(placed, int) and placed >= 0, placed


def test_gpu_session_sets_a_watchdog_and_runs_these_checks_first():
    text = (ROOT / "scripts" / "gpu_session.sh").read_text()
    assert f"export {WATCHDOG_ENV}=" in text  # a session must end: a hung barrier traps there
    tests_stage = text.split("stage_tests() {")[1].split("\n}\n")[0]
    first_par = tests_stage.split("par 240")[1]
    assert first_par.index("tests/test_launch_safety.py") < first_par.index("tests/test_cuda_lstm_gpu.py")
    assert "test_triton_first" in first_par and "spill" in tests_stage


def test_readme_does_not_claim_wheel_check_runs_the_kernels():
    """``make wheel-check`` runs ``check --quick`` on CI, which has no GPU: no kernel of the wheel runs."""
    readme = (ROOT / "README.md").read_text()
    row = next(line for line in readme.splitlines() if line.startswith("|") and "`make wheel-check`" in line)
    assert "none of the wheel's kernels" in row, row
    block = next(line for line in readme.splitlines() if line.startswith("make wheel-check"))
    following = readme.split(block, 1)[1].splitlines()[1]
    assert "none of the wheel's CUDA or Triton kernels" in following
