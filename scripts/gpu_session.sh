#!/usr/bin/env bash
# The one command of a session that is lent a GPU machine, sized for the lease: 15 minutes of
# device time in all (the machine's start included), at most 10 minutes per command. torch,
# Triton, nvcc, ninja and pytest are preinstalled there; there is no network.
#
#   here:   scripts/gpu_prepare.sh        # commits nothing; builds, then prints the device call
#   there:  FUSEDCONVLSTM_COMMIT=<sha> scripts/gpu_session.sh [STAGE...]
#
# Stages (default: "quick" = prep wheel tests bench-core, about 8 minutes):
#   prep        use the carried extension if it was built from these very sources, else build
#   wheel       the carried wheel (built here with another torch) installed outside the tree on
#               this torch: `env` and `check --quick` (the stable-ABI round trip of issue 7)
#   tests       every GPU test, four pytest processes side by side (one GPU, 16 cores), each
#               bounded, so a hung or trapped kernel costs one process, not the lease
#   bench-core  the issues' target cases (bf16, batch 64 and 256) within a time budget
#   bench-more  fp32 and fp16, batch 1 / 8 / 1024, T = 100 / 1000, the conv-stack script
#   bench-flashrnn  the lstm cases against FlashRNN's fused CUDA kernel, from the carried wheels
#               (.whl); its first call compiles FlashRNN for minutes: a lease of its own
#   sanitize    compute-sanitizer over small calls of every kernel (long: a lease of its own)
#
# At most 8 files come back from $OUT: summary.txt (what the reply's tail shows), logs.tar.gz
# (every stage's log), and the results as benchmarks/results/<date>_<gpu>.jsonl wants them.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fusedconvlstm-out}
LOGS=$OUT/logs
mkdir -p "$LOGS"
export PYTHONUNBUFFERED=1
# The device copy of the tree has no git history: results name the commit the caller passed.
export FUSEDCONVLSTM_COMMIT=${FUSEDCONVLSTM_COMMIT:-unknown}
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(quick)
status=0
SUMMARY=$OUT/summary.txt
: >"$SUMMARY"

note() { echo "$*" | tee -a "$SUMMARY"; }

# run NAME SECONDS CMD...: log to $LOGS/NAME.log, keep going on failure.
run() {
  local name=$1 limit=$2
  shift 2
  local t0=$SECONDS
  timeout -k 10 "$limit" "$@" >"$LOGS/$name.log" 2>&1
  local rc=$?
  report "$name" "$rc" $((SECONDS - t0))
}

# report NAME RC SECONDS: one summary line and the log's tail (pytest's outcome line first).
report() {
  local name=$1 rc=$2 secs=$3 verdict=ok
  [ "$rc" -eq 0 ] || verdict="FAILED rc=$rc"
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && verdict="TIMED OUT"
  [ "$rc" -eq 0 ] || status=1
  note "== $name: $verdict (${secs} s)"
  grep -E "^(FAILED|ERROR) |[0-9]+ (passed|failed|skipped|errors?)|STALE|Error|error:" "$LOGS/$name.log" | tail -n 12 |
    sed 's/^/   /' | tee -a "$SUMMARY"
}

# Several commands side by side: par NAME:SECONDS:CMD ... (CMD one shell string each).
par() {
  local pids=() names=() t0=$SECONDS spec name limit cmd
  for spec in "$@"; do
    name=${spec%%:*}
    spec=${spec#*:}
    limit=${spec%%:*}
    cmd=${spec#*:}
    (timeout -k 10 "$limit" bash -c "$cmd" >"$LOGS/$name.log" 2>&1) &
    pids+=($!)
    names+=("$name")
  done
  for i in "${!pids[@]}"; do
    wait "${pids[$i]}"
    report "${names[$i]}" $? $((SECONDS - t0))
  done
}

stage_prep() {
  python - <<'EOF' >"$LOGS/prep_check.log" 2>&1
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
    # An old setuptools there cannot do editable installs: then build in place.
    run build 300 bash -c "MAX_JOBS=16 python setup.py build_ext --inplace"
  fi
  run env 60 python -m fusedconvlstm env
  grep -E "^(gpu|torch|triton|extension|cuda )" "$LOGS/env.log" | sed 's/^/   /' | tee -a "$SUMMARY"
}

stage_wheel() {
  local whl
  whl=$(ls dist/*.whl 2>/dev/null | head -n 1)
  if [ -z "$whl" ]; then
    note "== wheel: no dist/*.whl carried, skipped"
    return
  fi
  rm -rf /tmp/wheel-site
  run wheel 150 bash -c "python -m pip install -q --no-deps --no-index --target /tmp/wheel-site '$whl' &&
    cd / && PYTHONPATH=/tmp/wheel-site python -m fusedconvlstm env &&
    PYTHONPATH=/tmp/wheel-site python -m fusedconvlstm check --quick"
}

stage_tests() {
  local py="OMP_NUM_THREADS=4 python -m pytest -q -m gpu -p no:cacheprovider"
  par \
    "test_cuda_lstm:240:$py tests/test_cuda_lstm.py" \
    "test_triton_lstm:240:$py tests/test_triton_lstm.py" \
    "test_triton_conv1d:240:$py tests/test_triton_conv1d.py" \
    "test_rest:240:$py --ignore=tests/test_cuda_lstm.py --ignore=tests/test_triton_lstm.py --ignore=tests/test_triton_conv1d.py tests && OMP_NUM_THREADS=4 python -m fusedconvlstm check"
}

results_name() {  # benchmarks/results/<date>_<gpu>.jsonl, as fusedconvlstm.benchmarking names it
  python -c "
import os
from fusedconvlstm.benchmarking import default_output_path, environment
print(os.path.basename(default_output_path(environment(), '.')).removesuffix('.jsonl'))"
}

stage_bench_core() {
  local name
  name=$(results_name)
  # The issues' targets first (the budget stops the run, not the case in flight).
  run bench_core 230 python -m fusedconvlstm bench --time-budget 190 \
    --ops lstm lstm_pair model_inference model_train_step conv1d_stack --dtypes bf16 --batches 64 256 \
    --out "$OUT/${name}_core.jsonl"
  sed -n '/^op  /,$p' "$LOGS/bench_core.log" | tee -a "$SUMMARY"
}

stage_bench_flashrnn() {
  local name
  name=$(results_name)
  if ! ls .whl/flashrnn-*.whl >/dev/null 2>&1; then
    note "== bench-flashrnn: no FlashRNN wheels carried (.whl), skipped"
    return
  fi
  python -m pip install -q --no-index --no-deps --target /tmp/flashrnn-site .whl/*.whl
  run bench_flashrnn 560 env PYTHONPATH=/tmp/flashrnn-site python -m fusedconvlstm bench --time-budget 480 \
    --ops lstm --dtypes bf16 --batches 64 256 --passes fwd fwd+bwd --flashrnn cuda_fused \
    --out "$OUT/${name}_flashrnn.jsonl"
  sed -n '/^op  /,$p' "$LOGS/bench_flashrnn.log" | tee -a "$SUMMARY"
}

stage_bench_more() {
  local name
  name=$(results_name)
  run bench_more 330 python -m fusedconvlstm bench --time-budget 240 \
    --ops lstm model_inference lstm_pair --dtypes fp32 fp16 bf16 --batches 1 8 1024 --seqs 45 100 1000 \
    --out "$OUT/${name}_more.jsonl"
  sed -n '/^op  /,$p' "$LOGS/bench_more.log" | tee -a "$SUMMARY"
  run bench_conv 200 python benchmarks/bench_conv1d_stack.py --dtypes bf16 fp32 --out "$OUT/${name}_conv.jsonl"
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
    sanitize) run sanitize 560 scripts/sanitize.sh ;;
    *) note "unknown stage $stage"; status=2 ;;
  esac
done
tar -czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -rf "$LOGS"
note "== done: status $status, commit $FUSEDCONVLSTM_COMMIT"
exit $status
