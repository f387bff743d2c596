"""Model governance: the triage intent model is an asset trained from shipped labelled data
(BANKING77, CC BY 4.0), evaluated on held-out data and promoted only past a threshold."""


import time

import dagster as dg

from ...lib.settings import BANKING77_DIR
from ..resources import AppDatabase, Workspace

PROMOTION_MIN_ACCURACY = 0.85


class TriageTrainingConfig(dg.Config):
    min_validation_accuracy: float = PROMOTION_MIN_ACCURACY


def _read_csv(path):
    import csv

    with open(path, newline="", encoding="utf-8") as fh:
        rows = list(csv.DictReader(fh))
    return [r["text"] for r in rows], [r["category"] for r in rows]


@dg.asset(
    group_name="governance",
    kinds={"scikitlearn"},
    code_version="tfidf-wc-linsvc-v1",
    description="Intent model for support triage: TF-IDF word+char n-grams with a linear SVM, trained on "
                "BANKING77 train.csv; promoted to serving only if validation accuracy passes the gate.",
)
def triage_model(context: dg.AssetExecutionContext, config: TriageTrainingConfig, app_db: AppDatabase,
                 workspace: Workspace) -> dg.MaterializeResult:
    from ...lib.llm import registry, triage_model as tm

    texts, labels = _read_csv(BANKING77_DIR / "train.csv")
    sw = time.perf_counter()
    model = tm.train(texts, labels)
    train_s = time.perf_counter() - sw
    test_texts, test_labels = _read_csv(BANKING77_DIR / "test.csv")
    test = tm.evaluate(model, test_texts, test_labels)  # reported, never used for fitting or tuning
    metrics = {**model.metrics, "test_accuracy": test["accuracy"], "test_macro_f1": test["macro_f1"],
               "train_seconds": round(train_s, 2)}
    model.metrics = metrics
    db = app_db.database()
    path = model.save(workspace.settings().models_dir)
    passed = metrics["validation_accuracy"] >= config.min_validation_accuracy
    status = registry.register(db, task="triage", version=model.version, path=path,
                               train_data_hash=metrics["train_data_hash"], code_version=tm.CODE_VERSION,
                               metrics=metrics, promote=passed)
    context.log.info(f"triage model {model.version}: {status} (validation accuracy {metrics['validation_accuracy']})")
    return dg.MaterializeResult(
        metadata={
            "version": model.version, "status": status,
            "validation_accuracy": dg.FloatMetadataValue(metrics["validation_accuracy"]),
            "test_accuracy": dg.FloatMetadataValue(metrics["test_accuracy"]),
            "test_macro_f1": dg.FloatMetadataValue(metrics["test_macro_f1"]),
            "train_seconds": dg.FloatMetadataValue(metrics["train_seconds"]),
            "n_train": metrics["n_train"], "n_labels": metrics["n_labels"], "path": dg.MetadataValue.path(str(path)),
        },
        data_version=dg.DataVersion(model.version),
    )


@dg.asset_check(asset=triage_model, blocking=True, description="The promoted model must pass the accuracy gate.")
def triage_model_promoted(app_db: AppDatabase) -> dg.AssetCheckResult:
    from ...lib.llm.registry import promoted_model_path

    path, version = promoted_model_path(app_db.database(), "triage")
    return dg.AssetCheckResult(passed=path is not None, metadata={"promoted_version": version},
                               description=None if path else "no promoted triage model: the gate refused training")


train_triage_model_job = dg.define_asset_job(
    "train_triage_model_job", selection=dg.AssetSelection.assets(triage_model),
    executor_def=dg.in_process_executor, description="Train, evaluate and (if it passes the gate) promote the "
    "triage model.")
