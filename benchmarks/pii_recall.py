"""Recall and precision of the PII detector on the shipped labelled sample.

    .venv/bin/python benchmarks/pii_recall.py                      # orch_project/data/pii_labelled.jsonl
    .venv/bin/python benchmarks/pii_recall.py --file other.jsonl --misses 20

Runs ``orch_project.lib.guardrails.pii.detect(text, known_names)`` on every line
{"id", "text", "known_names", "spans": [{"entity_type", "start", "end"}]} and scores per entity type:

- recall: share of gold spans overlapped by a detected span of the same type;
- precision: share of detected spans that overlap a gold span of the same type;
- exact: share of gold spans detected with exactly the same start and end.

A detection of the right text under the wrong type counts against both. Per-entity lines and the
first ``--misses`` misses and false positives go to stderr; the last line on stdout is one JSON object:
{"benchmark": "pii_recall", "per_entity": {...}, "overall_recall": ..., "overall_precision": ..., ...}.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orch_project.lib.guardrails import pii  # noqa: E402
from orch_project.lib.guardrails.pii_sample import DEFAULT_PATH, ENTITY_TYPES, read_jsonl  # noqa: E402


def _overlaps(a: dict, b) -> bool:
    return a["start"] < b.end and b.start < a["end"]


def score(records: list[dict]) -> tuple[dict, list[str]]:
    gold_n, hit_n, exact_n, pred_n, correct_n = Counter(), Counter(), Counter(), Counter(), Counter()
    notes: list[str] = []
    started = time.perf_counter()
    for r in records:
        text, gold = r["text"], r["spans"]
        found = pii.detect(text, r.get("known_names") or [])
        for g in gold:
            t = g["entity_type"]
            gold_n[t] += 1
            same = [s for s in found if s.entity_type == t and _overlaps(g, s)]
            if same:
                hit_n[t] += 1
                exact_n[t] += any(s.start == g["start"] and s.end == g["end"] for s in same)
            else:
                other = [s.entity_type for s in found if _overlaps(g, s)]
                found_as = f" (found as {other})" if other else ""
                notes.append(f"miss {r['id']} {t} {text[g['start']:g['end']]!r}{found_as}")
        for s in found:
            pred_n[s.entity_type] += 1
            if any(g["entity_type"] == s.entity_type and _overlaps(g, s) for g in gold):
                correct_n[s.entity_type] += 1
            else:
                notes.append(f"false positive {r['id']} {s.entity_type} {text[s.start:s.end]!r}")
    seconds = time.perf_counter() - started
    per_entity = {}
    for t in sorted(set(ENTITY_TYPES) | set(pred_n)):
        per_entity[t] = {
            "gold": gold_n[t], "detected": pred_n[t],
            "recall": round(hit_n[t] / gold_n[t], 4) if gold_n[t] else None,
            "precision": round(correct_n[t] / pred_n[t], 4) if pred_n[t] else None,
            "exact": round(exact_n[t] / gold_n[t], 4) if gold_n[t] else None,
        }
    result = {
        "benchmark": "pii_recall", "texts": len(records), "gold_spans": sum(gold_n.values()),
        "detected_spans": sum(pred_n.values()), "per_entity": per_entity,
        "overall_recall": round(sum(hit_n.values()) / max(1, sum(gold_n.values())), 4),
        "overall_precision": round(sum(correct_n.values()) / max(1, sum(pred_n.values())), 4),
        "seconds": round(seconds, 3),
    }
    return result, notes


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--file", type=Path, default=DEFAULT_PATH)
    parser.add_argument("--misses", type=int, default=0, help="print this many misses and false positives to stderr")
    args = parser.parse_args(argv)
    pii.engines()  # build (and time) the engine outside the scored loop
    result, notes = score(read_jsonl(args.file))
    print(f"{'entity':<14} {'gold':>5} {'found':>5} {'recall':>7} {'precision':>9} {'exact':>6}", file=sys.stderr)
    for t, m in result["per_entity"].items():
        fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
        print(f"{t:<14} {m['gold']:>5} {m['detected']:>5} {fmt(m['recall']):>7} {fmt(m['precision']):>9} "
              f"{fmt(m['exact']):>6}", file=sys.stderr)
    for line in notes[: args.misses]:
        print(line, file=sys.stderr)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
