#!/usr/bin/env bash
# One command for a session that is lent a GPU machine (torch, Triton, nvcc, ninja and pytest are
# preinstalled there, no network): build from source, run the GPU tests stage by stage, check and
# bench, copying logs and results to $OUT. Each stage is bounded by a timeout so one hung kernel
# (a barrier bug) cannot eat the session's device time.
#
#   scripts/gpu_session.sh [build] [test] [check] [sanitize] [bench] [bench-full]
#   (default: build test check bench)
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/fusedconvlstm-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
stages=("$@")
[ ${#stages[@]} -eq 0 ] && stages=(build test check bench)
status=0

run() {  # run NAME SECONDS CMD...: log to $OUT/NAME.log, keep going on failure
  local name=$1 limit=$2
  shift 2
  echo "== $name ($(date +%T))"
  timeout "$limit" "$@" >"$OUT/$name.log" 2>&1
  local rc=$?
  tail -n 25 "$OUT/$name.log"
  echo "== $name: rc=$rc"
  [ $rc -eq 0 ] || status=1
}

for stage in "${stages[@]}"; do
  case $stage in
    build)
      # An old setuptools there cannot do editable installs: then build in place (importable from here).
      run build 420 bash -c "python -m pip install --no-build-isolation --no-deps -e . || python setup.py build_ext --inplace"
      run env 60 python -m fusedconvlstm env ;;
    test)
      # Kernel by kernel first, so a hang or a crash points at one kernel.
      run test_cell 120 python -m pytest -q -x tests/test_cuda_lstm.py -k "stepwise_cell"
      run test_cuda_lstm 300 python -m pytest -q tests/test_cuda_lstm.py -m gpu
      run test_triton_lstm 300 python -m pytest -q tests/test_triton_lstm.py -m gpu
      run test_triton_conv1d 300 python -m pytest -q tests/test_triton_conv1d.py -m gpu
      run test_rest 300 python -m pytest -q -m gpu --ignore=tests/test_cuda_lstm.py \
        --ignore=tests/test_triton_lstm.py --ignore=tests/test_triton_conv1d.py ;;
    check)
      run check 300 python -m fusedconvlstm check ;;
    sanitize)
      run sanitize 900 scripts/sanitize.sh ;;
    bench)
      # The reference model's shapes: the issues' targets.
      run bench 540 python -m fusedconvlstm bench --batches 8 64 256 --out "$OUT/bench.jsonl" ;;
    bench-full)
      run bench_full 590 python -m fusedconvlstm bench --out "$OUT/bench_full.jsonl" ;;
    *) echo "unknown stage $stage"; status=2 ;;
  esac
done
exit $status
