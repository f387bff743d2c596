"""The embedded triage model on BANKING77: train on train.csv (a tenth held out for calibration and
the gate, exactly as the triage_model asset does), evaluate once on test.csv, measure prediction
throughput. BANKING77 is read from the data directory (``$ORCH_DATA_DIR/banking77``, default
``../shared/data``, see ``orch_project.lib.datasets``); without it the benchmark exits with that message.

    .venv/bin/python benchmarks/triage_model.py

Progress goes to stderr; the last line on stdout is one JSON object:

    {"benchmark": "triage_model", "accuracy", "macro_f1", "train_seconds", "predict_per_s", ...}

``accuracy`` / ``macro_f1`` are top-1 on test.csv (every prediction counted, as published results
are); ``served_accuracy`` and ``coverage`` apply the out-of-scope threshold calibrated on validation
(an ``unknown`` answer counts as wrong, because BANKING77 has no out-of-scope examples).
``members`` gives each ensemble member's own test accuracy and ``any_member``, the share of test
texts at least one member gets right (the ceiling for any combination of these members).
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
TARGET_ACCURACY = 0.93
TARGET_TRAIN_SECONDS = 60.0


def members_on(model, texts: list[str], labels: list[str]) -> dict[str, float]:
    """Each ensemble member's test top-1 accuracy, and ``any_member``: the share of texts at least one
    member ranks right, the ceiling any way of combining these members could reach."""
    import numpy as np

    gold = np.searchsorted(model.pipeline.classes_, labels)
    right = {kind: s.argmax(axis=1) == gold for kind, s in model.pipeline.member_scores(texts).items()}
    out = {kind: round(float(r.mean()), 4) for kind, r in right.items()}
    out["any_member"] = round(float(np.logical_or.reduce(list(right.values())).mean()), 4)
    return out


def main() -> int:
    from sklearn.metrics import f1_score

    from orch_project.lib import datasets
    from orch_project.lib.llm import triage_model as tm

    try:
        x_tr, y_tr = datasets.read_banking77("train")
        x_te, y_te = datasets.read_banking77("test")
    except datasets.DatasetMissing as exc:
        print(f"benchmark needs a public dataset: {exc}", file=sys.stderr)
        return 2
    print(f"training {tm.CODE_VERSION} on {len(x_tr)} examples ...", file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    model = tm.train(x_tr, y_tr)
    train_s = time.perf_counter() - t0
    print(f"    {train_s:.1f} s; validation accuracy {model.metrics['validation_accuracy']}", file=sys.stderr)
    t0 = time.perf_counter()
    top, _ = model.predict_top1(x_te)
    predict_s = time.perf_counter() - t0
    served = tm.evaluate(model, x_te, y_te)
    acc = sum(p == y for p, y in zip(top, y_te)) / len(y_te)
    members = members_on(model, x_te, y_te)
    print(f"    member top-1 on test: {members}", file=sys.stderr)
    result = {
        "benchmark": "triage_model", "code_version": tm.CODE_VERSION, "n_test": len(y_te),
        "accuracy": round(acc, 4), "macro_f1": round(float(f1_score(y_te, top, average="macro")), 4),
        "train_seconds": round(train_s, 2), "predict_per_s": round(len(x_te) / predict_s, 1),
        "validation_accuracy": model.metrics["validation_accuracy"], "served_accuracy": served["accuracy"],
        "coverage": served["coverage"], "oos_threshold": model.metrics["oos_threshold"],
        "members": members,
        "target_accuracy": TARGET_ACCURACY, "target_train_seconds": TARGET_TRAIN_SECONDS,
        "meets_targets": acc >= TARGET_ACCURACY and train_s <= TARGET_TRAIN_SECONDS,
    }
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
