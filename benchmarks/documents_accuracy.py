"""Accuracy and speed of the embedded document extractor on the labelled receipts (``sroie-dev``).

Runs ``orch_project.defs.documents.extract.extract`` over every ``box/NNN.csv`` of
``$ORCH_DATA_DIR/sroie-dev`` (default ``../shared/data`` beside the checkout) and compares company,
date, address and total with ``key/NNN.json`` after ``normalise``. Prints per-field exact-match
accuracy on all receipts, on the held-out fold (vendors the rules were not tuned on: see
``sroie_split``) and on the rest, then the throughput (documents per second: extraction alone, and
parsing + extraction + validation of the output contract). The total is chosen by a small learned
ranker (logistic regression weights in ``extract.TOTAL_RANKER``, fitted by
``benchmarks/documents_ranker_fit.py``), so the total's figure on all receipts is partly in-sample:
the grouped 5-fold cross-validation by vendor (ranker fitted on four folds, scored on the fifth, the
rules beside it) is printed too (``--no-cv`` skips it).

    .venv/bin/python benchmarks/documents_accuracy.py [--show-misses] [--repeat N] [--no-cv]

The last line of the output is one JSON object with the figures. Exit status 2 when the data folder
is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from orch_project.defs.documents.extract import (EXTRACTOR_VERSION, TOTAL_CHOICE, extract,  # noqa: E402
                                                 sroie_accuracy)
from orch_project.defs.documents.schema import ExtractionOutput  # noqa: E402
from orch_project.lib.docread import parse_ocr_lines  # noqa: E402

DATASET = "sroie-dev"


def data_folder() -> Path:
    base = os.environ.get("ORCH_DATA_DIR")
    return (Path(base).expanduser() if base else REPO.parent / "shared" / "data") / DATASET


def throughput(folder: Path, repeat: int) -> dict:
    """Documents per second on one core: extraction alone, and parse + extract + the output contract check
    (pydantic; the validation rules are timed by benchmarks/documents.py)."""
    texts = [p.read_text(encoding="utf-8", errors="replace") for p in sorted((folder / "box").glob("*.csv"))]
    parsed = [parse_ocr_lines(t) for t in texts]
    for lines in parsed[:10]:  # warm-up (regex caches, imports)
        extract(lines)
    t0 = time.perf_counter()
    for _ in range(repeat):
        for lines in parsed:
            extract(lines)
    t_extract = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(repeat):
        for text in texts:
            out = extract(parse_ocr_lines(text))
            ExtractionOutput.model_validate(out.model_dump())
    t_flow = time.perf_counter() - t0
    n = len(texts) * repeat
    return {"documents": len(texts), "mean_lines": round(sum(map(len, parsed)) / max(1, len(parsed)), 1),
            "extract_docs_per_s": round(n / t_extract, 1), "flow_docs_per_s": round(n / t_flow, 1)}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--show-misses", action="store_true", help="list every miss (file, field, expected, got)")
    ap.add_argument("--repeat", type=int, default=3, help="passes over the receipts for the throughput figure")
    ap.add_argument("--no-cv", action="store_true", help="skip the grouped cross-validation of the total ranker")
    args = ap.parse_args(argv)
    folder = data_folder()
    if not (folder / "box").is_dir() or not (folder / "key").is_dir():
        print(f"data folder {folder} not found (needs box/ and key/): set ORCH_DATA_DIR to the folder "
              f"holding {DATASET}/ (e.g. ORCH_DATA_DIR=../shared/data)", file=sys.stderr)
        return 2
    result = sroie_accuracy(folder, show_misses=args.show_misses)
    misses = result.pop("misses", [])
    counts = result["counts"]
    print(f"extractor {EXTRACTOR_VERSION} on {folder}")
    print(f"{'field':10s} {'all':>8s} {'held-out':>9s} {'dev':>8s}")
    for f in ("total", "date", "company", "address"):
        print(f"{f:10s} {result['all'][f]:8.3f} {result['held_out'][f]:9.3f} {result['dev'][f]:8.3f}")
    print(f"{'receipts':10s} {counts['all']:8d} {counts['held_out']:9d} {counts['dev']:8d}")
    if args.show_misses:
        print(f"\n{len(misses)} misses:")
        for m in misses:
            print(f"  {m['file']} [{m['part']}] {m['field']}: expected {m['expected']!r}, got {m['got']!r}")
    cv = None
    if not args.no_cv:
        from documents_ranker_fit import VARIANTS, cross_validate, load

        cv = cross_validate(load(folder), VARIANTS["rules_feature"], 1.0)
        print(f"\ntotal, grouped 5-fold CV by vendor (ranker refitted on 4 folds; TOTAL_CHOICE = {TOTAL_CHOICE!r}):"
              f"\n  ranker per fold {cv['per_fold']} mean {cv['mean']:.3f} pooled {cv['pooled']:.3f}"
              f"\n  rules  per fold {cv['rules_per_fold']} mean {cv['rules_mean']:.3f} pooled {cv['rules_pooled']:.3f}"
              f" (in-sample: the rules were written on these receipts)"
              f"\n  confidence (right/chosen) ranker {cv['confidence_bins']}, rules {cv['rules_confidence_bins']}")
    speed = throughput(folder, max(1, args.repeat))
    print(f"\nthroughput: {speed['extract_docs_per_s']} docs/s extraction, {speed['flow_docs_per_s']} docs/s "
          f"parse + extract + contract check ({speed['documents']} documents, {speed['mean_lines']} lines on average)")
    print(json.dumps({"extractor": EXTRACTOR_VERSION, "accuracy": {k: result[k] for k in ("all", "held_out", "dev")},
                      "counts": counts, "throughput": speed,
                      "total_cv": None if cv is None else {k: cv[k] for k in ("per_fold", "rules_per_fold", "mean",
                                                                              "rules_mean", "pooled", "rules_pooled")}}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
