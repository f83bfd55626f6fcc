#!/usr/bin/env bash
# compute-sanitizer over small calls of every GPU kernel (memcheck, racecheck, synccheck).
# Run on a GPU machine after building: scripts/sanitize.sh; logs go to ${OUT:-/tmp}/sanitize_*.log.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp}
status=0
for tool in memcheck racecheck synccheck; do
  echo "== $tool"
  timeout 900 compute-sanitizer --tool "$tool" --error-exitcode 9 python scripts/sanitize_cases.py \
    >"$OUT/sanitize_$tool.log" 2>&1
  rc=$?
  tail -n 5 "$OUT/sanitize_$tool.log"
  echo "== $tool: rc=$rc"
  [ $rc -eq 0 ] || status=1
done
exit $status
