"""Checks a repaired wheel as a package index and its users would: ``auditwheel show`` agrees with
its platform tag, allowing only the libraries left out on purpose (torch's own, which every torch
wheel provides) as the external libraries that keep it from a manylinux tag.

    python scripts/audit_wheel.py dist/fusedconvlstm-*.whl LIB [LIB ...]
"""

from __future__ import annotations

import json
import re
import subprocess
import sys


def audit(wheel: str, excluded: set[str]) -> list[str]:
    """Why ``wheel`` does not carry the tag ``auditwheel show`` gives it (empty when it does)."""
    match = re.search(r"-(manylinux_\d+_\d+_x86_64|manylinux_\d+_\d+_aarch64)\.whl$", wheel)
    if match is None:
        return [f"{wheel}: not a manylinux wheel (repair it with auditwheel)"]
    tag = match.group(1)
    show = subprocess.run(
        [sys.executable, "-m", "auditwheel", "show", "--json", wheel], capture_output=True, text=True, check=True
    )
    report = json.loads(show.stdout)
    problems = []
    if report["sym_tag"] != tag:
        problems.append(f"{wheel}: its symbols allow {report['sym_tag']}, the file says {tag}")
    blocking = set(report["policy_upgrades"].get(tag, {}).get("libs_to_eliminate", []))
    if report["overall_tag"] != tag and not blocking:
        problems.append(f"{wheel}: auditwheel gives {report['overall_tag']}, the file says {tag}")
    if blocking - excluded:
        problems.append(f"{wheel}: external libraries {sorted(blocking - excluded)} neither bundled nor torch's")
    return problems


def main(argv: list[str]) -> int:
    wheels = [a for a in argv if a.endswith(".whl")]
    excluded = {a for a in argv if not a.endswith(".whl")}
    if not wheels:
        print("audit_wheel: no wheel given", file=sys.stderr)
        return 2
    problems = [p for w in wheels for p in audit(w, excluded)]
    for p in problems:
        print(f"audit_wheel: {p}", file=sys.stderr)
    if not problems:
        print(f"audit_wheel: {', '.join(wheels)}: tag agrees with auditwheel show (torch's libraries excluded)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
