#!/usr/bin/env bash
# The one command of a session that is lent a GPU machine, sized for the lease: 15 minutes of
# device time in all (the machine's start included), at most 10 minutes per command. torch,
# Triton, nvcc, ninja and pytest are preinstalled there (python3); there is no network.
#
#   here:   scripts/gpu_prepare.sh        # builds, then prints the device call
#   there:  FUSEDCONVLSTM_COMMIT=<sha> scripts/gpu_session.sh [STAGE...]
#
# Stages (default: "quick" = prep wheel tests bench-core, about 8 minutes):
#   prep        use the carried extension if it loads and was built from these very sources,
#               else build it there
#   wheel       the carried wheel (built here with another torch) installed outside the tree on
#               this torch: `env` and `check --quick` (the stable-ABI round trip of issue 7)
#   tests       every GPU test, in pytest processes side by side (one GPU, 16 cores), each
#               bounded, so a hung or trapped kernel costs one process, not the lease
#   bench-core  the issues' target cases (bf16, batch 64 and 256) within a time budget, then
#               the LSTM pair on the cluster forward kernel and on the in-kernel input
#               projection (a process of its own)
#   bench-more  fp32 and fp16, batch 1 / 8 / 1024, T = 100 / 1000, the conv-stack script
#   records     check --record (with the core results where present): the validation records
#               that let auto run a kernel on this GPU, returned in $OUT/records
#   bench-latency  per-step GPU time (CUDA-graph replay), batch-1 wall clock, and the model
#               against every torch.compile mode, max-autotune included (a lease of its own)
#   bench-flashrnn  the lstm cases against FlashRNN's fused CUDA kernel, from the carried wheels
#               (.whl); its first call compiles FlashRNN for minutes: a lease of its own
#   switches    the performance switches, each off until timed both ways here: the persistent
#               kernels' barrier poll (FUSEDCONVLSTM_BARRIER_POLL_NS) on the LSTM and the pair,
#               the Triton conv tiles' tap loop (FUSEDCONVLSTM_CONV1D_TAP_ORDER) on the conv stack,
#               the Triton LSTM's software pipelining (FUSEDCONVLSTM_TRITON_LSTM_STAGES)
#   sanitize    compute-sanitizer over small calls of every kernel (long: a lease of its own)
#
# Everything ends by GPU_SESSION_SECONDS (default 540 s, inside the run tool's 570 s): a stage
# gets what is left. At most 8 files come back from $OUT, also from a run that is killed:
# summary.txt (what the reply's tail shows), logs.tar.gz (every stage's log, refreshed after each
# stage) and the results, named as benchmarks/results/<date>_<gpu>.jsonl wants them. No plot is
# drawn there (bench writes none): the project's report and plot (python -m benchmarks.report,
# python -m benchmarks.plot) run wherever the results are brought back to.
set -uo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
OUT=${OUT:-/tmp/fusedconvlstm-out}
LOGS=$(mktemp -d /tmp/fusedconvlstm-logs.XXXX)/logs
mkdir -p "$OUT" "$LOGS"
export PYTHONUNBUFFERED=1
# The device copy of the tree has no git history: results name the commit the caller passed.
export FUSEDCONVLSTM_COMMIT=${FUSEDCONVLSTM_COMMIT:-unknown}
# The persistent kernels' barrier watchdog is off by default (a correct run may wait at a barrier
# for any time); a session must end, so a barrier that hangs traps after 60 s and costs one
# pytest process, not the lease.
export FUSEDCONVLSTM_BARRIER_TIMEOUT_S=${FUSEDCONVLSTM_BARRIER_TIMEOUT_S:-60}
DEADLINE=${GPU_SESSION_SECONDS:-540}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(quick)
status=0
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }
archive() { tar -czf "$OUT/logs.tar.gz" -C "$(dirname "$LOGS")" logs 2>/dev/null; }

# within SECONDS: SECONDS, or what is left before the deadline (at least 5).
within() {
  local left=$((DEADLINE - SECONDS - 10))
  [ "$left" -lt "$1" ] && echo $((left > 5 ? left : 5)) || echo "$1"
}

# run NAME SECONDS CMD...: log to $LOGS/NAME.log, keep going on failure.
run() {
  local name=$1 limit
  limit=$(within "$2")
  shift 2
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  report "$name" $? $((SECONDS - t0))
}

# report NAME RC SECONDS: one summary line and the log's gist (pytest's outcome line, failures).
report() {
  local name=$1 rc=$2 secs=$3 verdict=ok
  [ "$rc" -eq 0 ] || verdict="FAILED rc=$rc"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && verdict="TIMED OUT"
  [ "$rc" -eq 0 ] || status=1
  note "== $name: $verdict (${secs} s)"
  grep -E "(^|\] | )(FAILED|ERROR)( |$)|[0-9]+ (passed|failed|skipped|errors?)|STALE|Error|error:" "$LOGS/$name.log" |
    sort -u | tail -n 14 |
    sed 's/^/   /' | tee -a "$SUMMARY"
  archive
}

# Several commands side by side: par SECONDS NAME=CMD ... (CMD one shell string each).
par() {
  local limit pids=() names=() t0=$SECONDS spec
  limit=$(within "$1")
  shift
  for spec in "$@"; do
    (timeout -k 10 "$limit" bash -c "${spec#*=}" >"$LOGS/${spec%%=*}.log" 2>&1) &
    pids+=($!)
    names+=("${spec%%=*}")
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    report "${names[$i]}" $? $((SECONDS - t0))
  done
}

stage_prep() {
  $PY - <<'EOF' >"$LOGS/prep_check.log" 2>&1
import sys
from fusedconvlstm import _extension
why = _extension.unavailable_reason() or _extension.stale_reason()
print(why or "carried extension loads and matches the sources")
sys.exit(1 if why else 0)
EOF
  if [ $? -eq 0 ]; then
    note "== prep: $(cat "$LOGS/prep_check.log")"
  else
    note "== prep: building ($(tail -n 1 "$LOGS/prep_check.log"))"
    rm -f fusedconvlstm/_C*.so fusedconvlstm/_build_info.json
    run build 300 bash -c "MAX_JOBS=16 $PY setup.py build_ext --inplace"
  fi
  run env 60 $PY -m fusedconvlstm env
  grep -E "^(gpu|torch|triton|extension|lstm forward|cuda )" "$LOGS/env.log" | sed 's/^/   /' | tee -a "$SUMMARY"
}

stage_wheel() {
  local whl
  whl=$(ls dist/*.whl 2>/dev/null | head -n 1)
  if [ -z "$whl" ]; then
    note "== wheel: no dist/*.whl carried, skipped"
    return
  fi
  rm -rf /tmp/wheel-site
  run wheel 150 bash -c "$PY -m pip install -q --no-deps --no-index --target /tmp/wheel-site '$whl' &&
    cd / && PYTHONPATH=/tmp/wheel-site $PY -m fusedconvlstm env &&
    PYTHONPATH=/tmp/wheel-site $PY -m fusedconvlstm check --quick"
}

stage_tests() {
  # -v: every outcome is in the log as it happens, also from a process the deadline kills.
  local py="OMP_NUM_THREADS=3 $PY -m pytest -v -p no:cacheprovider"
  # A hung test fails alone where pytest-timeout is installed (it is on the GPU machine).
  $PY -c "import pytest_timeout" 2>/dev/null && py="$py --timeout=150"
  # The conv tests all follow the GPU (not only the gpu-marked ones): every layer option on the
  # real kernels, spread over processes where pytest-xdist is there (Triton compiles per process).
  local conv="$py tests/test_triton_conv1d.py"
  $PY -c "import xdist" 2>/dev/null && conv="$conv -n 4"
  # The Triton LSTM tests written for CPU tensors follow the GPU too (CUDA tensors there); the
  # spill checks run in test_triton_first.
  local lstm="$py -k 'not compile_for_hopper' tests/test_triton_lstm.py tests/test_triton_lstm_precision.py"
  $PY -c "import xdist" 2>/dev/null && lstm="$lstm -n 3"
  # Listed first, so their lines head the summary: what a first GPU run trips over before any
  # numbers (the launch arithmetic and the cluster placement query, the Triton kernels' spill
  # checks and fp32 precision), in processes of their own beside the rest. The cluster forward
  # kernel and the in-kernel input projection (never run before their first lease) also run in
  # processes of their own: a kernel that traps kills its process's CUDA context, not the
  # cooperative kernels' tests.
  local first="spill or exact_fp32 or tf32 or precision"
  par 240 \
    "test_launch_safety=$py tests/test_launch_safety.py" \
    "test_triton_first=$py -k '$first' tests/test_triton_lstm.py tests/test_triton_conv1d.py" \
    "test_cuda_lstm=$py -m gpu -k 'not cluster and not input_projection' tests/test_cuda_lstm_gpu.py" \
    "test_cuda_cluster=$py -m gpu -k cluster tests/test_cuda_lstm_gpu.py" \
    "test_cuda_input=$py -m gpu -k input_projection tests/test_cuda_lstm_gpu.py" \
    "check_cluster=FUSEDCONVLSTM_LSTM_FWD_KERNEL=cluster OMP_NUM_THREADS=3 $PY -m fusedconvlstm check --backends cuda" \
    "check_input=FUSEDCONVLSTM_LSTM_FWD_KERNEL=input OMP_NUM_THREADS=3 $PY -m fusedconvlstm check --backends cuda" \
    "test_triton_lstm=$lstm" \
    "test_models_triton=$py -k triton tests/test_models.py" \
    "test_triton_conv1d=$conv" \
    "test_production=$py -m gpu tests/test_production_gpu.py" \
    "check=OMP_NUM_THREADS=3 $PY -m fusedconvlstm check"
}

results_name() {  # benchmarks/results/<date>_<gpu>.jsonl, as fusedconvlstm.benchmarking names it
  $PY -c "
import os
from fusedconvlstm.benchmarking import default_output_path, environment
print(os.path.basename(default_output_path(environment(), '.')).removesuffix('.jsonl'))"
}

# bench NAME SECONDS ARGS...: `fusedconvlstm bench` that starts no case in its last 30 s.
bench() {
  local name=$1 limit
  limit=$(within "$2")
  shift 2
  run "$name" "$limit" $PY -m fusedconvlstm bench --time-budget $((limit > 60 ? limit - 30 : limit / 2)) "$@"
  sed -n '/^op  /,$p' "$LOGS/$name.log" | tee -a "$SUMMARY"
}

stage_bench_core() {
  # The issues' targets, the LSTMs and the conv stack before the whole model (its torch.compile
  # baselines compile for tens of seconds each). Then the cluster forward kernel and the
  # in-kernel input projection on the LSTM pair, in a process of its own: a kernel that traps
  # there loses no other result. bench_core leaves bench_cluster its 70 s (two cases of the
  # reference model's LSTM pair per kernel).
  local name core
  name=$(results_name)
  core=$((DEADLINE - SECONDS - 10 - 70))
  core=$((core < 5 ? 5 : core < 240 ? core : 240))
  bench bench_core "$core" --ops lstm lstm_pair conv1d_stack model_inference \
    model_train_step --dtypes bf16 --batches 64 256 --out "$OUT/${name}_core.jsonl"
  bench bench_cluster 70 --ops lstm_pair --dtypes bf16 --batches 64 256 --passes fwd --backends cuda \
    --lstm-forward-kernels cluster input --out "$OUT/${name}_cluster.jsonl"
}

stage_bench_more() {
  local name
  name=$(results_name)  # one name for both files (each call starts Python and CUDA)
  bench bench_more 330 --ops lstm model_inference lstm_pair --dtypes fp32 fp16 bf16 --batches 1 8 1024 \
    --seqs 45 100 1000 --out "$OUT/${name}_more.jsonl"
  run bench_conv 200 $PY benchmarks/bench_conv1d_stack.py --dtypes bf16 fp32 --out "$OUT/${name}_conv.jsonl"
}

stage_records() {
  # Validation records: what auto may run on this GPU. check verifies each kernel at its cases
  # (the reference model's LSTM and conv stack among them) and, with the core results of this or
  # an earlier stage in $OUT, records where it was also faster than cuDNN. The records come back
  # in $OUT/records, to be committed as fusedconvlstm/validation_records.json.
  local core
  core=$(ls "$OUT"/*_core.jsonl 2>/dev/null | head -n 1)
  run records 150 env FUSEDCONVLSTM_CACHE_DIR="$OUT/records" $PY -m fusedconvlstm check --record \
    --backends cuda triton --dtypes bfloat16 float16 ${core:+--bench "$core"}
}

stage_bench_latency() {
  # The targets judged on other timings than CUDA events: per-step GPU time by CUDA-graph replay,
  # batch-1 latency by back-to-back wall clock, and the model against every torch.compile mode
  # (max-autotune compiles for minutes: a lease of its own).
  local name
  name=$(results_name)
  bench bench_graph 180 --ops lstm --passes fwd --dtypes bf16 fp16 --batches 1 8 64 --seqs 45 100 1000 \
    --timing graph --out "$OUT/${name}_graph.jsonl"
  bench bench_wallclock 90 --ops model_inference --dtypes bf16 --batches 1 --timing wallclock \
    --no-compile --out "$OUT/${name}_wallclock.jsonl"
  bench bench_compile 240 --ops model_inference --dtypes bf16 --batches 256 \
    --compile-modes default reduce-overhead max-autotune --out "$OUT/${name}_compile.jsonl"
}

stage_switches() {
  # Each switch both ways on the same cases, in processes of their own (the records carry the
  # FUSEDCONVLSTM_* settings they ran with). The barrier poll: an acquire load per poll (the
  # default) against relaxed polls with a 64 ns __nanosleep back-off and one fence.
  local name
  name=$(results_name)
  FUSEDCONVLSTM_BARRIER_POLL_NS=0 bench bench_poll_off 90 --ops lstm lstm_pair --dtypes bf16 --batches 64 256 \
    --backends cuda --out "$OUT/${name}_poll_off.jsonl"
  FUSEDCONVLSTM_BARRIER_POLL_NS=64 bench bench_poll_64 90 --ops lstm lstm_pair --dtypes bf16 --batches 64 256 \
    --backends cuda --out "$OUT/${name}_poll_64.jsonl"
  # The conv tiles' loops: taps outside the channel chunks (the default) or inside them.
  FUSEDCONVLSTM_CONV1D_TAP_ORDER=outer bench bench_taps_outer 60 --ops conv1d_stack model_inference --dtypes bf16 \
    --batches 64 256 --backends triton --no-compile --out "$OUT/${name}_taps_outer.jsonl"
  FUSEDCONVLSTM_CONV1D_TAP_ORDER=inner bench bench_taps_inner 60 --ops conv1d_stack model_inference --dtypes bf16 \
    --batches 64 256 --backends triton --no-compile --out "$OUT/${name}_taps_inner.jsonl"
  # The Triton LSTM kernels' software pipelining: plain loads (the default) against asynchronous
  # copies that prefetch the next batch tile (several tiles per group at the larger batches).
  FUSEDCONVLSTM_TRITON_LSTM_STAGES=1 bench bench_stages_1 75 --ops lstm lstm_pair --dtypes bf16 \
    --batches 64 256 1024 --backends triton --out "$OUT/${name}_stages_1.jsonl"
  FUSEDCONVLSTM_TRITON_LSTM_STAGES=2 bench bench_stages_2 75 --ops lstm lstm_pair --dtypes bf16 \
    --batches 64 256 1024 --backends triton --out "$OUT/${name}_stages_2.jsonl"
}

stage_bench_flashrnn() {
  if ! ls .whl/flashrnn-*.whl >/dev/null 2>&1; then
    note "== bench-flashrnn: no FlashRNN wheels carried (.whl), skipped"
    return
  fi
  $PY -m pip install -q --no-index --no-deps --target /tmp/flashrnn-site .whl/*.whl
  local saved=${PYTHONPATH:-}
  export PYTHONPATH=/tmp/flashrnn-site${saved:+:$saved}
  bench bench_flashrnn 520 --ops lstm --dtypes bf16 --batches 64 256 --passes fwd fwd+bwd --flashrnn cuda_fused \
    --out "$OUT/$(results_name)_flashrnn.jsonl"
  export PYTHONPATH=$saved
}

for stage in "${stages[@]}"; do
  case $stage in
    quick) stage_prep; stage_wheel; stage_tests; stage_bench_core ;;
    prep) stage_prep ;;
    wheel) stage_wheel ;;
    tests) stage_tests ;;
    bench-core) stage_bench_core ;;
    bench-more) stage_bench_more ;;
    bench-flashrnn) stage_bench_flashrnn ;;
    bench-latency) stage_bench_latency ;;
    records) stage_records ;;
    switches) stage_switches ;;
    sanitize) run sanitize 530 scripts/sanitize.sh ;;
    *) note "unknown stage $stage"; status=2 ;;
  esac
done
archive
note "== done: status $status, commit $FUSEDCONVLSTM_COMMIT, ${SECONDS} s"
exit $status
