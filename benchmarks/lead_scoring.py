"""The generic tabular scorer (orch_project.lib.tabular) on the generated lead history, against a tuned
gradient-boosting baseline on the same split.

    .venv/bin/python benchmarks/lead_scoring.py [--n 9000] [--seed 7] [--split-seed 0]

* data: ``generate_history(n, seed)`` (orch_project/defs/leads/history_data.py), split 80/20 stratified;
* ``tabular``: ``lib.tabular.train`` on all columns, and again without ``QUALIFICATION_COLUMNS`` (the
  columns the sales team fills in while qualifying a lead: the honest "new lead" problem);
* ``baseline``: HistGradientBoostingClassifier on the raw columns (ids and the free-text column dropped,
  strings as native categories, numbers stored as text parsed), tuned over learning_rate x max_leaf_nodes
  x l2_regularization (16 configurations) on a stratified 20 % validation split of the training rows, each
  fit with early stopping, the best refitted on all training rows. Same split, same exclusions.

Figures on the test rows: AUC, log loss, Brier, lift of the top decile, accuracy, train seconds; and the
scorer's throughput (probabilities only, and probabilities + reasons) on 10,000 generated rows.
Progress goes to stderr; the last line on stdout is one JSON object:

    {"benchmark": "lead_scoring", "with_qualification": {...}, "without_qualification": {...}, ...}
"""

from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

GRID = {"learning_rate": (0.03, 0.1), "max_leaf_nodes": (7, 15, 31, 63), "l2_regularization": (0.0, 1.0)}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def baseline_frame(df, label, drop):
    """Raw columns for the baseline: ids / free text / excluded dropped, numeric text parsed, strings as
    pandas categories (native categorical splits); more than 255 levels -> ordinal codes as numbers."""
    import pandas as pd

    x = df.drop(columns=[label, *drop])
    for c in x.columns:
        if x[c].dtype == object:
            num = pd.to_numeric(x[c], errors="coerce")
            if num.notna().sum() >= 0.95 * x[c].replace("", None).notna().sum():
                x[c] = num
            elif x[c].nunique() <= 255:
                x[c] = x[c].astype("category")
            else:
                x[c] = x[c].astype("category").cat.codes.astype(float)
    return x


def tuned_baseline(xtr, ytr, seed: int):
    from sklearn.ensemble import HistGradientBoostingClassifier
    from sklearn.metrics import roc_auc_score
    from sklearn.model_selection import train_test_split

    a, b, ya, yb = train_test_split(xtr, ytr, test_size=0.2, stratify=ytr, random_state=seed)
    best = None
    for lr, leaves, l2 in itertools.product(*GRID.values()):
        cfg = {"learning_rate": lr, "max_leaf_nodes": leaves, "l2_regularization": l2}
        m = HistGradientBoostingClassifier(max_iter=1000, early_stopping=True, n_iter_no_change=30,
                                           categorical_features="from_dtype", random_state=seed, **cfg).fit(a, ya)
        auc = roc_auc_score(yb, m.predict_proba(b)[:, 1])
        if best is None or auc > best[0]:
            best = (auc, cfg)
    model = HistGradientBoostingClassifier(max_iter=1000, early_stopping=True, n_iter_no_change=30,
                                           categorical_features="from_dtype", random_state=seed, **best[1])
    return model.fit(xtr, ytr), best[1], round(float(best[0]), 4)


def run(train_df, test_df, label: str, exclude: tuple[str, ...], seed: int) -> dict:
    from orch_project.defs.leads.history_data import ID_COLUMN, TEXT_COLUMN
    from orch_project.lib import tabular

    t0 = time.perf_counter()
    model = tabular.train(train_df, label, id_column=ID_COLUMN, exclude_columns=exclude, seed=seed,
                          name="lead_score", progress=lambda m: say("    " + m))
    train_s = time.perf_counter() - t0
    ours = tabular.evaluate(model, test_df, label) | {"train_seconds": round(train_s, 2),
                                                      "oof_auc": model.metrics["validation"]["auc"],
                                                      "blend_weight": model.metrics["model"]["blend_weight"],
                                                      "config": model.metrics["model"]["config"]}
    say(f"  tabular:  {ours}")
    drop = [ID_COLUMN, "Lead Number", TEXT_COLUMN, *exclude]
    xtr, xte = baseline_frame(train_df, label, drop), baseline_frame(test_df, label, drop)
    xte = xte.astype({c: xtr[c].dtype for c in xtr.columns if str(xtr[c].dtype) == "category"}, errors="ignore")
    ytr, yte = train_df[label].to_numpy(), test_df[label].to_numpy()
    t0 = time.perf_counter()
    with tabular._threads(len(xtr)):  # the same thread setting as the scorer (fair train seconds)
        base, cfg, val_auc = tuned_baseline(xtr, ytr, seed)
    base_s = time.perf_counter() - t0
    theirs = tabular.binary_metrics(yte, base.predict_proba(xte)[:, 1]) | {
        "train_seconds": round(base_s, 2), "config": cfg, "validation_auc": val_auc}
    say(f"  baseline: {theirs}")
    return {"tabular": ours, "baseline": theirs, "auc_gain": round(ours["auc"] - theirs["auc"], 4), "model": model}


def main(argv: list[str] | None = None) -> int:
    from sklearn.model_selection import train_test_split

    from orch_project.defs.leads.history_data import LABEL_COLUMN, QUALIFICATION_COLUMNS, generate_history

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=9000)
    ap.add_argument("--seed", type=int, default=7, help="generator seed")
    ap.add_argument("--split-seed", type=int, default=0, help="train/test split and model seed")
    args = ap.parse_args(argv)

    df = generate_history(args.n, args.seed)
    train_df, test_df = train_test_split(df, test_size=0.2, stratify=df[LABEL_COLUMN], random_state=args.split_seed)
    train_df, test_df = train_df.reset_index(drop=True), test_df.reset_index(drop=True)
    say(f"{len(df)} leads ({df[LABEL_COLUMN].mean():.1%} converted): {len(train_df)} train / {len(test_df)} test")
    out: dict = {"benchmark": "lead_scoring", "n": args.n, "seed": args.seed, "split_seed": args.split_seed}
    model = None
    for key, exclude in (("with_qualification", ()), ("without_qualification", tuple(QUALIFICATION_COLUMNS))):
        say(f"{key.replace('_', ' ')}:")
        r = run(train_df, test_df, LABEL_COLUMN, exclude, args.split_seed)
        model = model or r.pop("model")
        r.pop("model", None)
        out[key] = r

    fresh = generate_history(10000, args.seed + 1000).drop(columns=[LABEL_COLUMN])
    t0 = time.perf_counter()
    model.predict_proba(fresh)
    proba_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    scored = model.score(fresh)
    score_s = time.perf_counter() - t0
    out["throughput"] = {"rows": len(fresh), "predict_rows_per_s": round(len(fresh) / proba_s),
                         "score_with_reasons_rows_per_s": round(len(fresh) / score_s),
                         "score_with_reasons_seconds": round(score_s, 2)}
    out["example"] = scored[0]
    say(f"throughput: {out['throughput']}")
    say(f"example: {scored[0]}")
    for key in ("with_qualification", "without_qualification"):
        r = out[key]
        say(f"{key:<22} AUC tabular {r['tabular']['auc']:.4f} vs baseline {r['baseline']['auc']:.4f} "
            f"({r['auc_gain']:+.4f}); Brier {r['tabular']['brier']:.4f} vs {r['baseline']['brier']:.4f}; "
            f"train {r['tabular']['train_seconds']:.1f} s vs {r['baseline']['train_seconds']:.1f} s")
    print(json.dumps(out, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
