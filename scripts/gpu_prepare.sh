#!/usr/bin/env bash
# Before a GPU lease, on the CPU machine: build what the device would otherwise spend minutes of
# the lease on (the extension in place and the abi3 wheel), check the tree is committed (results
# name the commit they measured), and print the device call for scripts/gpu_session.sh.
#
#   scripts/gpu_prepare.sh [STAGE...]     # the stages are passed on to gpu_session.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
if [ -n "$(git status --porcelain --untracked-files=no)" ]; then
  echo "gpu_prepare: the tree has uncommitted changes; commit first, so results name what they measured" >&2
  exit 1
fi
make -s setup
$PY setup.py -q build_ext --inplace
rm -rf dist
$PY -m pip wheel -q --no-build-isolation --no-deps . -w dist
# The FlashRNN baseline (bench-flashrnn) as wheels: the GPU machine has no network.
rm -rf .whl
$PY -m pip download -q --no-deps --only-binary=:all: -d .whl flashrnn einops || echo "gpu_prepare: no FlashRNN wheels (bench-flashrnn will skip)" >&2
$PY - <<'EOF'
from fusedconvlstm import _extension
why = _extension.stale_reason()
assert why is None, why
EOF
commit=$(git rev-parse HEAD)
cat <<EOF
device call (the run tool):
  carry:     ["fusedconvlstm/_C.abi3.so", "fusedconvlstm/_build_info.json", "dist", ".whl"]
  command:   FUSEDCONVLSTM_COMMIT=$commit scripts/gpu_session.sh ${*:-quick}
  timeout_s: 570
then: copy the results (*.jsonl) from the reply's files into benchmarks/results/ and commit them;
      python -m benchmarks.report benchmarks/results/*.jsonl judges the speed targets on them,
      python -m benchmarks.plot RESULTS.jsonl draws each file's speedups (a PNG beside it).
EOF
