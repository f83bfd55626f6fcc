#!/usr/bin/env bash
# compute-sanitizer over small calls of every GPU kernel (memcheck, racecheck, synccheck).
# Run on a GPU machine after building: scripts/sanitize.sh; logs go to ${OUT:-/tmp}/sanitize_*.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
status=0
# The barrier watchdog stays off (its default): under the sanitizers a correct kernel can wait at
# a barrier for a long time, and the timeout below bounds each tool's run.
for tool in memcheck racecheck synccheck; do
  echo "== $tool"
  timeout "${SANITIZE_SECONDS:-170}" compute-sanitizer --tool "$tool" --error-exitcode 9 "${PY:-python3}" scripts/sanitize_cases.py \
    >"$OUT/sanitize_$tool.log" 2>&1
  rc=$?
  tail -n 5 "$OUT/sanitize_$tool.log"
  echo "== $tool: rc=$rc"
  [ $rc -eq 0 ] || status=1
done
exit $status
