"""Model governance for support triage, as assets with lineage:

    triage_model (train a candidate on BANKING77 train.csv, CC BY 4.0)
      -> triage_model_evaluation (held-out validation split + test.csv report, per model and prompt version)
         [blocking check triage_model_gate: the candidate must reach the configured accuracy]
      -> triage_model_promotion (the served version; its data version is the model id, so a promotion or
         rollback marks the support flow's triage partitions stale and a backfill re-scores them)

A candidate below the gate is refused and the promotion step does not run: the promoted version keeps
serving. `orch model promote/rollback` and `model_admin_job` change the served version by hand.
"""

import time

import dagster as dg
from pydantic import Field

from ...lib.llm.triage_model import CODE_VERSION as TRIAGE_CODE_VERSION
from ...lib.settings import BANKING77_DIR
from ..resources import AppDatabase, Workspace

TASK = "triage"
DEFAULT_MIN_ACCURACY = 0.90


class TriageTrainingConfig(dg.Config):
    min_validation_accuracy: float = Field(DEFAULT_MIN_ACCURACY, description="promotion gate on held-out accuracy")
    train_limit: int | None = Field(None, description="train on a seeded random sample of N examples only "
                                                      "(experiments, tests)")


def read_labelled(path):
    """BANKING77's CSV: texts and intents."""
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return [r["text"] for r in rows], [r["category"] for r in rows]


def _triage_prompt_version() -> str:
    from ..support.assets import CFG

    return CFG.prompt_versions.get("triage", "none")


@dg.asset(
    group_name="governance", kinds={"scikitlearn"},
    code_version=TRIAGE_CODE_VERSION,
    description="Candidate intent model for support triage, trained on CPU from BANKING77 train.csv minus a "
                "held-out validation split; the out-of-scope threshold is calibrated on that split, then the "
                "served classifier is refitted on all examples (n_served_fit). Registered as a candidate in "
                "the model registry.",
)
def triage_model(context: dg.AssetExecutionContext, config: TriageTrainingConfig, app_db: AppDatabase,
                 workspace: Workspace) -> dg.MaterializeResult:
    from ...lib.llm import registry, triage_model as tm

    texts, labels = read_labelled(BANKING77_DIR / "train.csv")
    if config.train_limit and config.train_limit < len(texts):
        import random

        keep = sorted(random.Random(0).sample(range(len(texts)), config.train_limit))
        texts, labels = [texts[i] for i in keep], [labels[i] for i in keep]
    sw = time.perf_counter()
    model = tm.train(texts, labels)
    train_s = time.perf_counter() - sw
    model.metrics.update(train_seconds=round(train_s, 2), gate_min_accuracy=config.min_validation_accuracy)
    path = model.save(workspace.settings().models_dir)
    registry.register(app_db.database(), task=TASK, version=model.version, path=path,
                      train_data_hash=model.metrics["train_data_hash"], code_version=tm.CODE_VERSION,
                      metrics=model.metrics)
    m = model.metrics
    context.log.info(f"triage candidate {model.version}: validation accuracy {m['validation_accuracy']}, "
                     f"{train_s:.1f} s")
    return dg.MaterializeResult(
        metadata={"version": model.version, "validation_accuracy": dg.FloatMetadataValue(m["validation_accuracy"]),
                  "oos_threshold": dg.FloatMetadataValue(m["oos_threshold"]),
                  "train_seconds": dg.FloatMetadataValue(m["train_seconds"]), "n_train": m["n_train"],
                  "n_validation": m["n_validation"], "n_served_fit": m["n_served_fit"],
                  "n_labels": m["n_labels"], "train_data_hash": m["train_data_hash"],
                  "path": dg.MetadataValue.path(str(path))},
        data_version=dg.DataVersion(model.version),
    )


@dg.asset(
    group_name="governance", kinds={"scikitlearn"}, deps=[triage_model],
    description="Evaluation of the newest candidate: accuracy and macro-F1 on the held-out validation split "
                "(the gate) and on BANKING77 test.csv (reported only, never used for fitting or tuning); "
                "recorded per model and prompt version. A candidate below its gate is marked refused.",
)
def triage_model_evaluation(context: dg.AssetExecutionContext, app_db: AppDatabase) -> dg.MaterializeResult:
    from ...lib.llm import registry, triage_model as tm

    db = app_db.database()
    cand = _materialised_version(context, db, triage_model.key)
    model = tm.TriageModel.load(cand["path"])
    prompt_version = _triage_prompt_version()
    test_texts, test_labels = read_labelled(BANKING77_DIR / "test.csv")
    test = tm.evaluate(model, test_texts, test_labels)
    val = {k: cand["metrics"][k] for k in ("validation_accuracy", "validation_macro_f1", "validation_coverage")
           if k in cand["metrics"]}
    registry.record_evaluation(db, task=TASK, model_version=cand["version"], prompt_version=prompt_version,
                               dataset="validation", metrics=val)
    registry.record_evaluation(db, task=TASK, model_version=cand["version"], prompt_version=prompt_version,
                               dataset="banking77-test", metrics=test)
    gate = float(cand["metrics"].get("gate_min_accuracy", DEFAULT_MIN_ACCURACY))
    passed = val["validation_accuracy"] >= gate
    if not passed and cand["status"] != "promoted":  # never unseat the serving model from here
        registry.set_status(db, cand["version"], "refused", actor="system:gate",
                            reason=f"validation accuracy {val['validation_accuracy']:.4f} < gate {gate:.4f}")
    context.log.info(f"candidate {cand['version']}: validation {val['validation_accuracy']:.4f} "
                     f"(gate {gate}), test top-1 {test['top1_accuracy']:.4f}")
    return dg.MaterializeResult(metadata={
        "version": cand["version"], "prompt_version": prompt_version, "gate_min_accuracy": dg.FloatMetadataValue(gate),
        "gate_passed": passed, "validation_accuracy": dg.FloatMetadataValue(val["validation_accuracy"]),
        "test_accuracy": dg.FloatMetadataValue(test["accuracy"]),
        "test_top1_accuracy": dg.FloatMetadataValue(test["top1_accuracy"]),
        "test_macro_f1": dg.FloatMetadataValue(test["macro_f1"]), "test_coverage": dg.FloatMetadataValue(test["coverage"]),
    })


@dg.asset_check(asset=triage_model_evaluation, blocking=True,
                description="Promotion gate: the evaluated model's held-out accuracy must reach the configured "
                            "threshold; otherwise promotion does not run and the promoted version keeps serving.")
def triage_model_gate(context: dg.AssetCheckExecutionContext, app_db: AppDatabase) -> dg.AssetCheckResult:
    from ...lib.llm import registry

    event = context.instance.get_latest_materialization_event(triage_model_evaluation.key)
    if event is None:
        return dg.AssetCheckResult(passed=False, description="no model has been evaluated")
    md = event.asset_materialization.metadata  # the evaluation's own verdict: one place decides
    ok = bool(md["gate_passed"].value)
    accuracy, gate = md["validation_accuracy"].value, md["gate_min_accuracy"].value
    return dg.AssetCheckResult(
        passed=ok, severity=dg.AssetCheckSeverity.ERROR,
        metadata={"version": md["version"].value, "validation_accuracy": float(accuracy),
                  "gate_min_accuracy": float(gate), "serving": registry.promoted_model_path(app_db.database(), TASK)[1]},
        description=None if ok else f"model {md['version'].value} refused: validation accuracy {accuracy:.4f} "
                                    f"below the gate {gate:.4f}")


@dg.asset(
    group_name="governance", kinds={"python"}, deps=[triage_model_evaluation],
    description="The triage model version that serves (registry status promoted). Runs only after the gate "
                "passed; its data version is the model id, so a change marks the support flow's triage stale.",
)
def triage_model_promotion(context: dg.AssetExecutionContext, app_db: AppDatabase) -> dg.MaterializeResult:
    from ...lib.llm import registry

    db = app_db.database()
    cand = _materialised_version(context, db, triage_model_evaluation.key)
    out = registry.promote(db, cand["version"], actor=f"dagster:run:{context.run_id}",
                           reason=f"passed the gate: validation accuracy {cand['metrics']['validation_accuracy']}")
    return promotion_result(out, cand["metrics"])


def _materialised_version(context, db, key: dg.AssetKey) -> dict:
    """The registry row of the model version the latest materialisation of ``key`` was about (the
    version is a hash of code and data, so retraining on the same data names the same version)."""
    from ...lib.llm import registry

    event = context.instance.get_latest_materialization_event(key)
    version = event.asset_materialization.metadata["version"].value if event else None
    row = registry.get(db, version) if version else None
    if row is None:
        raise dg.Failure(f"no trained triage model recorded by {key.to_user_string()}: run train_triage_model_job")
    return row


def served_metadata(out: dict, metrics: dict, changed_by: str | None = None) -> dict:
    """What triage_model_promotion shows for a change of the served model (by the gate, a job or the CLI)."""
    md = {"serving_version": out["promoted"], "previous_version": out["previous"] or "none",
          "validation_accuracy": dg.FloatMetadataValue(float(metrics.get("validation_accuracy", 0.0)))}
    return {**md, "changed_by": changed_by} if changed_by else md


def promotion_result(out: dict, metrics: dict) -> dg.MaterializeResult:
    return dg.MaterializeResult(metadata=served_metadata(out, metrics), data_version=dg.DataVersion(out["promoted"]))


def served_model_event(out: dict, metrics: dict, changed_by: str) -> dg.AssetMaterialization:
    """A materialisation of triage_model_promotion recorded outside its own step (model_admin_job, the
    CLI): the model id as data version, so the UI marks the triage assets stale."""
    return dg.AssetMaterialization(asset_key="triage_model_promotion", description=f"served model changed by "
                                   f"{changed_by}", metadata=served_metadata(out, metrics, changed_by),
                                   tags={"dagster/data_version": out["promoted"]})


train_triage_model_job = dg.define_asset_job(
    "train_triage_model_job",
    selection=dg.AssetSelection.assets(triage_model, triage_model_evaluation, triage_model_promotion),
    executor_def=dg.in_process_executor,
    description="Train a candidate, evaluate it, and promote it only if the gate passes.")


class ModelAdminConfig(dg.Config):
    action: str = Field(description="promote | rollback")
    version: str | None = Field(None, description="the version to promote (promote only)")
    actor: str = Field(description="who asks for it (recorded in the audit log)")
    reason: str = Field("", description="why")


@dg.op(description="Promote a registered triage model version, or roll back to the previous one (audited).")
def change_served_triage_model(context: dg.OpExecutionContext, config: ModelAdminConfig, app_db: AppDatabase):
    from ...lib.llm import registry

    db = app_db.database()
    try:
        if config.action == "promote":
            if not config.version:
                raise registry.RegistryError("promote needs a version; see `orch model list`")
            out = registry.promote(db, config.version, actor=config.actor, reason=config.reason)
        elif config.action == "rollback":
            out = registry.rollback(db, TASK, actor=config.actor, reason=config.reason)
        else:
            raise registry.RegistryError(f"action {config.action!r} is not promote or rollback")
    except registry.RegistryError as exc:
        raise dg.Failure(str(exc)) from exc
    metrics = (registry.get(db, out["promoted"]) or {}).get("metrics", {})
    context.log_event(served_model_event(out, metrics, config.actor))
    context.log.info(f"triage model serving {out['promoted']} (was {out['previous']})")
    return out


@dg.job(description="Change the served triage model by hand: config {action: promote|rollback, version, actor, "
                    "reason}. Records a materialisation of triage_model_promotion so downstream staleness shows.")
def model_admin_job():
    change_served_triage_model()
