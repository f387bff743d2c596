"""Branch coverage per package from coverage.py's JSON report (``make test`` writes var/coverage.json).

    python benchmarks/coverage_by_package.py var/coverage.json

Prints one line per package (lines and branches covered, the combined percentage coverage.py reports),
then each flow's stage functions (the modules its spec's stages and ops stages live in) and, last, a
JSON line with the same figures. Packages: the kit, each flow folder under defs/, and the shared lib
(and its sub-packages)."""

from __future__ import annotations

import json
import sys
from collections import defaultdict
from pathlib import Path


def package_of(path: str) -> str:
    parts = Path(path).parts
    i = parts.index("orch_project") if "orch_project" in parts else 0
    rest = parts[i + 1:]
    if len(rest) >= 2 and rest[0] in ("defs", "lib") and len(rest) > 2:
        return "/".join(rest[:2])
    if len(rest) >= 2 and rest[0] in ("kit", "defs", "lib"):
        return rest[0]
    return "orch_project (top level)"


def stage_modules() -> dict[str, set[str]]:
    """Flow -> the source files of its stage functions (from the specs themselves)."""
    import inspect
    import warnings

    warnings.filterwarnings("ignore")
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from orch_project.kit.registry import discover

    return {name: {str(Path(inspect.getsourcefile(s.fn)).resolve()) for s in [*spec.stages, *spec.ops]}
            for name, spec in discover().items()}


def main(path: str) -> int:
    data = json.loads(Path(path).read_text())
    acc: dict[str, list[int]] = defaultdict(lambda: [0, 0, 0, 0])
    stages = {f: flow for flow, files in stage_modules().items() for f in files}
    for fname, f in data["files"].items():
        s = f["summary"]
        keys = [package_of(fname)]
        if str(Path(fname).resolve()) in stages:
            keys.append(f"stage functions: {stages[str(Path(fname).resolve())]}")
        for key in keys:
            a = acc[key]
            a[0] += s["covered_lines"]
            a[1] += s["num_statements"]
            a[2] += s.get("covered_branches", 0)
            a[3] += s.get("num_branches", 0)
    out = {}
    for pkg in sorted(acc, key=lambda k: (k.startswith("stage functions"), k)):
        cl, nl, cb, nb = acc[pkg]
        total = (cl + cb) / (nl + nb) * 100 if nl + nb else 100.0
        out[pkg] = {"lines": f"{cl}/{nl}", "branches": f"{cb}/{nb}", "coverage_pct": round(total, 1),
                    "branch_pct": round(cb / nb * 100, 1) if nb else 100.0}
        print(f"{pkg:<32} lines {cl:>5}/{nl:<5} branches {cb:>4}/{nb:<4} "
              f"branch {out[pkg]['branch_pct']:5.1f}%  combined {total:5.1f}%")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "var/coverage.json"))
