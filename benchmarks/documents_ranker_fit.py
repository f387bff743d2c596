"""Fit and honestly evaluate the learned TOTAL ranker of the embedded document extractor.

Every positive amount on a receipt is a total candidate with the features of
``orch_project.defs.documents.extract.TOTAL_FEATURES`` (keyword class of its row / the row above,
position, largest amount, cash - change, subtotal + tax, sum of the line items, repeats, rounding,
currency symbol, summary table, the rules' own pick...). A logistic regression (scikit-learn, offline
only) is fitted on the labelled receipts of ``sroie-dev`` (label: the candidate's value equals the
labelled total); at run time extract.py uses only the weights written into ``TOTAL_RANKER``.

Evaluation is grouped 5-fold cross-validation by vendor: the folds are ``sroie_split`` (the first
four letters/digits of the normalised company label, hashed), so one vendor's receipts never sit on
both sides. For each fold the ranker is fitted on the other four and scored end to end (the chosen
total equals the label) on it; the rule-based total on the same folds is printed beside it. Two
ranker variants: the features alone, and the features plus the rules' pick ("rules as a feature").
Caveat: the rules (and the feature definitions) were written looking at all 100 receipts, so the
rules' per-fold figures are in-sample, not an estimate for unseen vendors; the ranker's are
out-of-fold for its weights. The generated invoices (``sample_data.invoices``, rendered txt / csv /
pdf) are checked too: their totals must stay exact.

    .venv/bin/python benchmarks/documents_ranker_fit.py [--write] [--variant rules_feature|features]
        [--C 1.0] [--seeds 3]

``--write`` replaces the ``TOTAL_RANKER`` constant in orch_project/defs/documents/extract.py with
the weights fitted on all receipts (the chosen variant). The last line of the output is one JSON
object with the figures. Exit status 2 when the data folder is missing.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
from decimal import Decimal
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from orch_project.defs.documents import extract as ex  # noqa: E402

DATASET = "sroie-dev"
FOLDS = 5
VARIANTS = {"features": [f for f in ex.TOTAL_FEATURES if not f.startswith("rule_")],
            "rules_feature": list(ex.TOTAL_FEATURES)}


def data_folder() -> Path:
    base = os.environ.get("ORCH_DATA_DIR")
    return (Path(base).expanduser() if base else REPO.parent / "shared" / "data") / DATASET


def load(folder: Path) -> list[dict]:
    """One record per receipt: its fold, labelled total, the rules' total and the candidates."""
    out = []
    for name, lines, labels in ex._load_sroie(folder):
        rule, cands = ex.total_candidates(lines)
        out.append({"name": name, "fold": ex.sroie_split(labels.get("company", "")),
                    "label": ex.normalise("total", labels.get("total")),
                    "rule": ex.normalise("total", rule.value), "rule_conf": rule.confidence, "cands": cands})
    return out


def fit(records: list[dict], features: list[str], C: float) -> dict:
    """Logistic regression over all candidates of ``records``; the weights as extract.py keeps them."""
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    X = np.array([[c.f[k] for k in features] for r in records for c in r["cands"]], dtype=float)
    y = np.array([int(r["label"] is not None and c.value == r["label"]) for r in records for c in r["cands"]])
    model = LogisticRegression(C=C, max_iter=5000)
    model.fit(X, y)
    weights = {k: round(float(w), 4) for k, w in zip(features, model.coef_[0]) if abs(w) >= 1e-4}
    return {"intercept": round(float(model.intercept_[0]), 4), "weights": weights}


def choose(record: dict, model: dict | None) -> tuple[Decimal | None, float]:
    """The chosen total and its confidence: the ranker's (the very code extract.py runs) or the rules'."""
    if model is None:
        return record["rule"], record["rule_conf"]
    fv = ex._ranked_total(record["cands"], model)
    return (ex.normalise("total", fv.value), fv.confidence) if fv is not None else (None, 0.0)


def accuracy(records: list[dict], model: dict | None) -> float:
    if not records:
        return float("nan")
    return sum(1 for r in records if choose(r, model)[0] == r["label"] and r["label"] is not None) / len(records)


def cross_validate(records: list[dict], features: list[str], C: float) -> dict:
    per_fold, rules_fold, sizes, confs, rule_confs = [], [], [], [], []
    for k in range(FOLDS):
        test = [r for r in records if r["fold"] == k]
        train = [r for r in records if r["fold"] != k]
        model = fit(train, features, C)
        per_fold.append(accuracy(test, model))
        rules_fold.append(accuracy(test, None))
        sizes.append(len(test))
        for r in test:
            value, conf = choose(r, model)
            confs.append((conf, value == r["label"]))
            value, conf = choose(r, None)
            rule_confs.append((conf, value == r["label"]))
    n = sum(sizes)
    pooled = sum(a * s for a, s in zip(per_fold, sizes)) / n
    pooled_rules = sum(a * s for a, s in zip(rules_fold, sizes)) / n
    bins, rule_bins = _bins(confs), _bins(rule_confs)
    return {"per_fold": [round(a, 4) for a in per_fold], "rules_per_fold": [round(a, 4) for a in rules_fold],
            "fold_sizes": sizes, "mean": round(sum(per_fold) / FOLDS, 4),
            "rules_mean": round(sum(rules_fold) / FOLDS, 4), "pooled": round(pooled, 4),
            "rules_pooled": round(pooled_rules, 4), "confidence_bins": bins, "rules_confidence_bins": rule_bins,
            "brier": _brier(confs), "rules_brier": _brier(rule_confs)}


def _bins(confs: list[tuple[float, bool]]) -> dict:
    """Accuracy of the chosen totals by confidence band (0.6 is the brief's review threshold)."""
    bins = {}
    for name, lo, hi in ((">=0.9", 0.9, 2), ("0.6-0.9", 0.6, 0.9), ("<0.6", -1, 0.6)):
        got = [ok for c, ok in confs if lo <= c < hi]
        bins[name] = f"{sum(got)}/{len(got)}"
    return bins


def _brier(confs: list[tuple[float, bool]]) -> float:
    """Mean squared gap between the confidence and being right (lower is better calibrated)."""
    return round(sum((c - ok) ** 2 for c, ok in confs) / max(1, len(confs)), 4)


def generated_check(model: dict | None, seeds: int) -> dict:
    """Totals of generated invoices (txt / csv / pdf renderings) read exactly with ``model``."""
    from orch_project.defs.documents import sample_data as sd
    from orch_project.lib.docread import read_document

    ok = total = 0
    wrong = []
    for seed in range(1, seeds + 1):
        base = sd.invoices(seed, 25)
        cases = base + list(sd.special_cases(base).values())
        for inv in cases:
            truth = inv.truth()["total"]
            for fmt in ("txt", "csv", "pdf"):
                rule, cands = ex.total_candidates(read_document(f"doc.{fmt}", sd.render(inv, fmt)).lines)
                if model is None:
                    got = rule.value
                else:
                    fv = ex._ranked_total(cands, model)
                    got = fv.value if fv is not None else None
                total += 1
                if ex.normalise("total", got) == ex.normalise("total", truth):
                    ok += 1
                elif len(wrong) < 10:
                    wrong.append({"seed": seed, "number": inv.number, "fmt": fmt, "expected": truth, "got": got})
    return {"documents": total, "exact": ok, "accuracy": round(ok / max(1, total), 4), "wrong": wrong}


def write_constant(model: dict, variant: str, C: float) -> None:
    path = REPO / "orch_project" / "defs" / "documents" / "extract.py"
    text = path.read_text(encoding="utf-8")
    lines = [f"TOTAL_RANKER: dict = {{  # fitted by `.venv/bin/python benchmarks/documents_ranker_fit.py --write"
             f" --variant {variant} --C {C}`", f"    \"intercept\": {model['intercept']},", "    \"weights\": {"]
    items = list(model["weights"].items())
    for i in range(0, len(items), 4):
        lines.append("        " + " ".join(f"\"{k}\": {v}," for k, v in items[i:i + 4]))
    lines += ["    },", "}"]
    new, count = re.subn(r"^TOTAL_RANKER: dict = \{.*?^\}\n|^TOTAL_RANKER: dict = \{[^\n]*\}\n",
                         "\n".join(lines) + "\n", text, count=1, flags=re.S | re.M)
    if count != 1:
        raise SystemExit("TOTAL_RANKER constant not found in extract.py")
    path.write_text(new, encoding="utf-8")
    print(f"wrote TOTAL_RANKER ({len(model['weights'])} weights) into {path.relative_to(REPO)}")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--write", action="store_true", help="write the weights fitted on all receipts into extract.py")
    ap.add_argument("--variant", choices=sorted(VARIANTS), default="rules_feature")
    ap.add_argument("--C", type=float, default=1.0, help="inverse L2 strength of the logistic regression")
    ap.add_argument("--seeds", type=int, default=3, help="seeds of generated invoices to check (25 + specials each)")
    args = ap.parse_args(argv)
    folder = data_folder()
    if not (folder / "box").is_dir() or not (folder / "key").is_dir():
        print(f"data folder {folder} not found (needs box/ and key/): set ORCH_DATA_DIR", file=sys.stderr)
        return 2
    records = load(folder)
    reachable = sum(1 for r in records if any(c.value == r["label"] for c in r["cands"]))
    print(f"{len(records)} receipts, {sum(len(r['cands']) for r in records)} candidates; the labelled total "
          f"is a candidate on {reachable}; mode in extract.py: TOTAL_CHOICE = {ex.TOTAL_CHOICE!r}")
    print(f"grouped {FOLDS}-fold CV by vendor (sroie_split), end-to-end total accuracy; C = {args.C}")
    cv = {}
    for variant, features in VARIANTS.items():
        cv[variant] = res = cross_validate(records, features, args.C)
        print(f"  ranker [{variant:13s}] per fold {res['per_fold']}  mean {res['mean']:.3f}  pooled {res['pooled']:.3f}"
              f"\n      confidence (right/chosen) {res['confidence_bins']}  brier {res['brier']}")
    res = cv["features"]
    print(f"  rules  [in-sample    ] per fold {res['rules_per_fold']}  mean {res['rules_mean']:.3f}"
          f"  pooled {res['rules_pooled']:.3f}   (fold sizes {res['fold_sizes']})"
          f"\n      confidence (right/chosen) {res['rules_confidence_bins']}  brier {res['rules_brier']}")
    final = fit(records, VARIANTS[args.variant], args.C)
    gen = {"rules": generated_check(None, args.seeds), args.variant: generated_check(final, args.seeds),
           "in_extract_py": generated_check(ex.TOTAL_RANKER, args.seeds) if ex.TOTAL_RANKER["weights"] else None}
    for k, g in gen.items():
        if g:
            print(f"generated invoices [{k}]: {g['exact']}/{g['documents']} totals exact {g['wrong'][:3]}")
    in_sample = {"rules": round(accuracy(records, None), 4), args.variant: round(accuracy(records, final), 4)}
    print(f"in-sample (fitted on all {len(records)}): {in_sample}")
    print(f"weights fitted on all receipts [{args.variant}]: {json.dumps(final)}")
    if args.write:
        write_constant(final, args.variant, args.C)
    print(json.dumps({"cv": cv, "generated": {k: {kk: g[kk] for kk in ("documents", "exact", "accuracy")}
                                              for k, g in gen.items() if g},
                      "in_sample": in_sample, "reachable": reachable, "receipts": len(records),
                      "variant": args.variant, "C": args.C, "total_choice": ex.TOTAL_CHOICE}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
