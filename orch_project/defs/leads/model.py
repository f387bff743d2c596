"""The governed lead-scoring model (``lead_score``): trained as an asset on the flow's labelled history,
evaluated on held-out leads beside the serving version, gated, promoted and rolled back through the model
registry (the kit's governance assets, kit/governance.py):

    lead_score_model -> lead_score_model_evaluation [gate] -> lead_score_model_promotion

The history is a CSV of handled leads with their outcome: the brief's ``history_path`` or ORCH_LEADS_HISTORY,
else a seeded generated history (history_data.py) written once under $ORCH_HOME/datasets. A fixed,
stratified part (``holdout_fraction``) is never trained on: the candidate and the serving model are both
scored on it, so "worse than the serving model" compares like with like. The model is the generic tabular
scorer (lib/tabular.py: column roles from the data, gradient boosting, calibrated probabilities, per-lead
reasons); columns the sales team fills in after contact are excluded (a new lead has none of them).
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field

HISTORY_ENV = "ORCH_LEADS_HISTORY"


class LeadScoreTrainingConfig(dg.Config):
    seed: int = Field(0, description="random seed of the model search (training is deterministic for a seed)")
    train_limit: int | None = Field(None, description="train on a seeded sample of N training rows only "
                                                      "(experiments, tests); the held-out leads stay the same")
    exclude_columns: list[str] = Field(default_factory=list, description="columns to leave out besides the "
                                                                         "brief's exclude_columns")
    search_budget_s: float = Field(10.0, ge=0, description="seconds the model search may spend on more "
                                                           "configurations than the first")


def history_path(cfg) -> Path:
    """The labelled history: ORCH_LEADS_HISTORY, the brief's history_path, or the seeded generated one
    (written on first use)."""
    from ...lib.settings import Settings

    s = cfg.settings
    given = os.environ.get(HISTORY_ENV) or s.history_path
    if given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"the lead history {path} does not exist; set {HISTORY_ENV} (or the brief's "
                                    "settings.history_path) to a CSV of handled leads with their outcome")
        return path
    path = Settings.from_env().home / "datasets" / f"leads_history_{s.history_rows}_{s.history_seed}.csv"
    if not path.exists():
        from .history_data import generate_history

        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        generate_history(s.history_rows, s.history_seed).to_csv(tmp, index=False)
        tmp.replace(path)
    return path


def split(cfg):
    """(train, holdout) frames of the history: a stratified holdout fixed by the brief's seed."""
    from sklearn.model_selection import train_test_split

    from ...lib import tabular

    s = cfg.settings
    df = tabular.read_table(history_path(cfg))
    if s.label_column not in df.columns:
        raise tabular.TabularError(f"the lead history has no label column {s.label_column!r} (brief settings."
                                   f"label_column); its columns: {', '.join(map(str, df.columns[:30]))}")
    y = tabular.parse_labels(df[s.label_column])
    df = df.loc[~(y != y)].reset_index(drop=True)  # unlabelled rows are neither trained on nor scored
    train, holdout = train_test_split(df, test_size=s.holdout_fraction, random_state=s.history_seed,
                                      stratify=tabular.parse_labels(df[s.label_column]))
    return train.reset_index(drop=True), holdout.reset_index(drop=True)


def train_candidate(cfg, options: LeadScoreTrainingConfig | None, log=None):
    """A candidate trained on the history minus the holdout; its holdout figures go in its metrics."""
    from ...lib import tabular
    from ...lib.llm.registry import Candidate
    from ...lib.settings import Settings

    options = options or LeadScoreTrainingConfig()
    s = cfg.settings
    train, holdout = split(cfg)
    if options.train_limit and options.train_limit < len(train):
        train = train.sample(n=options.train_limit, random_state=options.seed).reset_index(drop=True)
    excluded = [c for c in dict.fromkeys([*s.exclude_columns, *options.exclude_columns]) if c in train.columns]
    t0 = time.perf_counter()
    model = tabular.train(train, s.label_column, id_column=s.id_column if s.id_column in train.columns else None,
                          exclude_columns=excluded, seed=options.seed, name="lead_score",
                          progress=(log.info if log is not None else None), search_budget_s=options.search_budget_s)
    seconds = time.perf_counter() - t0
    held = tabular.evaluate(model, holdout, s.label_column)
    path = model.save(Settings.from_env().models_dir / "lead_score")
    metrics = {**held, "train_seconds": round(seconds, 2), "n_train": len(train), "n_holdout": len(holdout),
               "holdout_hash": tabular.data_hash(holdout),
               "oof": model.metrics.get("validation"), "excluded_columns": excluded,
               "history": str(history_path(cfg))}
    return Candidate(version=model.version, path=path, metrics=metrics, train_data_hash=tabular.data_hash(train),
                     code_version=tabular.CODE_VERSION)


def evaluate_candidate(cfg, candidate: dict[str, Any], serving: dict[str, Any] | None) -> dict[str, Any]:
    """The gate: the candidate's AUC on the held-out leads must reach ``min_auc`` and must not fall below
    the serving model's AUC on the same leads by more than ``max_auc_drop``."""
    from ...lib import tabular

    s = cfg.settings
    _, holdout = split(cfg)
    cand = tabular.evaluate(tabular.TabularModel.load(candidate["path"]), holdout, s.label_column)
    out: dict[str, Any] = {"metrics": cand, "dataset": f"holdout-{s.holdout_fraction:g}-seed{s.history_seed}"}
    reasons = []
    passed = cand["auc"] >= s.min_auc
    reasons.append(f"holdout AUC {cand['auc']:.4f} {'>=' if passed else '<'} min_auc {s.min_auc}")
    if serving is not None and serving["version"] != candidate["version"] and \
            (serving.get("metrics") or {}).get("holdout_hash") not in (None, tabular.data_hash(holdout)):
        # the serving model was held out on other rows (the history or the split changed): it may have trained
        # on some of these, so its figure here is not comparable; the candidate is held to the floor only
        reasons.append(f"the serving {serving['version']} was evaluated on another holdout (history or split "
                       "changed): compared with the floor only")
    elif serving is not None and serving["version"] != candidate["version"]:
        try:
            served = tabular.evaluate(tabular.TabularModel.load(serving["path"]), holdout, s.label_column)
        except (tabular.ModelVersionError, FileNotFoundError) as exc:
            reasons.append(f"the serving model {serving['version']} cannot be loaded ({exc}); compared with nothing")
        else:
            out["serving_metrics"] = served
            floor = served["auc"] - s.max_auc_drop
            better = cand["auc"] >= floor
            reasons.append(f"{'not worse than' if better else 'worse than'} the serving {serving['version']} "
                           f"(AUC {served['auc']:.4f}, allowed drop {s.max_auc_drop})")
            passed = passed and better
    out["passed"] = passed
    out["reason"] = ("passed: " if passed else "refused: ") + "; ".join(reasons)
    return out


class LeadScoreTask:
    """The promoted model as the embedded provider's handler of ``lead_score``."""

    def __init__(self, model, version: str):
        self.tabular = model
        self.model = f"lead-score-{version}"

    def run(self, requests, prompt_vars) -> list:
        import pandas as pd

        from ...lib.llm.gateway import ProviderResult, estimate_tokens

        if not requests:
            return []
        t0 = time.perf_counter()
        frame = pd.DataFrame([dict(r.inputs.context.get("attributes") or {}) for r in requests])
        try:
            scored = self.tabular.score(frame, id_column="__none__", n_reasons=3)
        except Exception as exc:  # one malformed batch must not stop the flow: each lead gets the reason
            return [ProviderResult(None, error="provider_error", reason=f"the lead scorer failed ({type(exc).__name__})")
                    for _ in requests]
        per_item = (time.perf_counter() - t0) * 1000.0 / len(requests)
        return [ProviderResult({"score": rec["score"], "reasons": rec["reasons"], "model_version": self.tabular.version},
                               estimate_tokens(r.inputs.text), 16, per_item) for r, rec in zip(requests, scored)]


def lead_score_local_task(db):
    """The registry's promoted lead-scoring model, loaded once per process."""
    from ...lib import tabular
    from ...lib.llm import model_cache, registry
    from ...lib.llm.local import UnavailableTask

    path, version = registry.promoted_model_path(db, "lead_score")
    if path is None:
        return UnavailableTask("lead-score-none", "no lead-scoring model serves: run train_lead_score_model_job "
                                                  "(or `orch demo`), then promote one")
    try:
        return LeadScoreTask(model_cache.load("lead_score", str(path), tabular.TabularModel.load), version)
    except tabular.ModelVersionError as exc:
        return UnavailableTask(f"lead-score-{version}", f"{exc}")
