"""Governed models as assets, for any flow (``FlowSpec.models``, ``lib.flows.GovernedModel``):

    <asset>               train a candidate (the flow's ``train``), register it in the model registry
      -> <asset>_evaluation   held-out figures of the candidate beside the serving version (the flow's
                              ``evaluate``), recorded per version; a refused candidate is marked so
         [blocking check <asset>_gate: the evaluation's verdict]
      -> <asset>_promotion    the served version; its data version is the model id, so a promotion or a
                              rollback marks the stages that use the model stale in the UI

``train_<asset>_job`` runs the three. The registry, `orch model list|promote|rollback --task T` and the
audit trail are the same for every task.
"""

from typing import Any

import dagster as dg

from ..defs.resources import AppDatabase, Workspace
from ..lib.flows import FlowSpec, GovernedModel

GROUP = "governance"


def _numbers(metrics: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Numeric metrics (nested dicts flattened) as float metadata, which the UI charts over time."""
    out: dict[str, Any] = {}
    for k, v in metrics.items():
        if isinstance(v, bool):
            continue
        if isinstance(v, (int, float)):
            out[f"{prefix}{k}"] = dg.FloatMetadataValue(round(float(v), 6))
        elif isinstance(v, dict) and not prefix:
            out.update(_numbers(v, f"{k}_"))
    return out


def materialised_version(context, db, key: dg.AssetKey, what: str, job: str) -> tuple[dict, Any]:
    """The registry row of the model version the latest materialisation of ``key`` was about, and that
    materialisation's metadata (the version is a hash of code and data, so retraining on the same data names
    the same version). ``what`` and ``job`` say what is missing and which job makes it."""
    from ..lib.llm import registry

    event = context.instance.get_latest_materialization_event(key)
    md = event.asset_materialization.metadata if event else {}
    row = registry.get(db, md["version"].value) if "version" in md else None
    if row is None:
        raise dg.Failure(f"no {what} recorded by {key.to_user_string()}: run {job}")
    return row, md


def served_event(model: GovernedModel, out: dict, metrics: dict, changed_by: str) -> dg.AssetMaterialization:
    """A materialisation of ``<asset>_promotion`` recorded outside its step (the CLI): the model id as
    data version, so the UI marks the stages that use the model stale."""
    value = metrics.get(model.metric)
    md: dict[str, Any] = {"serving_version": out["promoted"], "previous_version": out["previous"] or "none",
                          "changed_by": changed_by}
    if isinstance(value, (int, float)):
        md[model.metric] = dg.FloatMetadataValue(float(value))
    return dg.AssetMaterialization(asset_key=f"{model.asset}_promotion", description=f"served model changed by "
                                   f"{changed_by}", metadata=md, tags={"dagster/data_version": out["promoted"]})


def governed_model_defs(spec: FlowSpec, model: GovernedModel) -> tuple[list, list, list]:
    """(assets, checks, jobs) of one governed model."""
    cfg = spec.config
    name = model.asset
    job_name = f"train_{name}_job"
    config_cls = model.config

    def train_body(context: dg.AssetExecutionContext, app_db: AppDatabase, workspace: Workspace, config=None):
        from ..lib.llm import registry

        cand = model.train(cfg, config, context.log)
        registry.register(app_db.database(), task=model.task, version=cand.version, path=cand.path,
                          train_data_hash=cand.train_data_hash, code_version=cand.code_version, metrics=cand.metrics)
        context.log.info(f"{model.task} candidate {cand.version}: {model.metric} "
                         f"{cand.metrics.get(model.metric, '?')}")
        return dg.MaterializeResult(
            metadata={"version": cand.version, "task": model.task, "path": dg.MetadataValue.path(str(cand.path)),
                      "train_data_hash": cand.train_data_hash, "code_version": cand.code_version,
                      **_numbers(cand.metrics)},
            data_version=dg.DataVersion(cand.version))

    if config_cls is not None:
        def train_asset(context: dg.AssetExecutionContext, config: config_cls, app_db: AppDatabase,  # type: ignore[valid-type]
                        workspace: Workspace) -> dg.MaterializeResult:
            return train_body(context, app_db, workspace, config)
    else:
        def train_asset(context: dg.AssetExecutionContext, app_db: AppDatabase,
                        workspace: Workspace) -> dg.MaterializeResult:
            return train_body(context, app_db, workspace)

    trained = dg.asset(name=name, group_name=GROUP, kinds=set(model.kinds),
                       description=model.description or f"Candidate model for the {model.task} task of {spec.title}: "
                                                         "trained and registered as a candidate.")(train_asset)

    @dg.asset(name=f"{name}_evaluation", group_name=GROUP, kinds=set(model.kinds), deps=[trained],
              description=f"The newest {model.task} candidate on held-out data beside the version that serves now "
                          "(the same rows); the verdict the gate reads. A refused candidate is marked so in the "
                          "registry and never unseats the serving one.")
    def evaluation(context: dg.AssetExecutionContext, app_db: AppDatabase) -> dg.MaterializeResult:
        from ..lib.llm import registry

        db = app_db.database()
        cand, _ = materialised_version(context, db, trained.key, f"trained {model.task} model", job_name)
        serving_path, serving_version = registry.promoted_model_path(db, model.task)
        serving = registry.get(db, serving_version) if serving_path is not None else None
        verdict = model.evaluate(cfg, cand, serving)
        prompt = cfg.prompt_versions.get(model.task, "none")
        registry.record_evaluation(db, task=model.task, model_version=cand["version"], prompt_version=prompt,
                                   dataset=verdict.get("dataset", "holdout"), metrics=verdict["metrics"])
        if serving is not None and verdict.get("serving_metrics"):
            registry.record_evaluation(db, task=model.task, model_version=serving["version"], prompt_version=prompt,
                                       dataset=verdict.get("dataset", "holdout"), metrics=verdict["serving_metrics"])
        passed = bool(verdict["passed"])
        if not passed and cand["status"] != "promoted":
            registry.set_status(db, cand["version"], "refused", actor="system:gate", reason=verdict["reason"])
        context.log.info(f"{model.task} candidate {cand['version']}: {'passed' if passed else 'refused'}: "
                         f"{verdict['reason']}")
        md = {"version": cand["version"], "gate_passed": passed, "gate_reason": verdict["reason"],
              "serving_version": serving["version"] if serving else "none",
              "dataset": verdict.get("dataset", "holdout"), **_numbers(verdict["metrics"])}
        md.update(_numbers(verdict.get("serving_metrics") or {}, "serving_"))
        return dg.MaterializeResult(metadata=md)

    @dg.asset_check(asset=evaluation, name=f"{name}_gate", blocking=True,
                    description=f"Promotion gate for {model.task}: the candidate must pass the flow's rules on "
                                "held-out data (its own floor and no worse than the serving version); otherwise "
                                "promotion does not run and the serving version stays.")
    def gate(context: dg.AssetCheckExecutionContext) -> dg.AssetCheckResult:
        event = context.instance.get_latest_materialization_event(evaluation.key)
        if event is None:
            return dg.AssetCheckResult(passed=False, description="no model has been evaluated")
        md = event.asset_materialization.metadata
        ok = bool(md["gate_passed"].value)
        return dg.AssetCheckResult(passed=ok, severity=dg.AssetCheckSeverity.ERROR,
                                   metadata={"version": md["version"].value, "serving_version": md["serving_version"].value},
                                   description=md["gate_reason"].value)

    @dg.asset(name=f"{name}_promotion", group_name=GROUP, kinds={"python"}, deps=[evaluation],
              description=f"The {model.task} model version that serves (registry status promoted). Runs only after "
                          "the gate passed; its data version is the model id, so a change marks the stages that "
                          "use it stale.")
    def promotion(context: dg.AssetExecutionContext, app_db: AppDatabase) -> dg.MaterializeResult:
        from ..lib.llm import registry

        db = app_db.database()
        cand, verdict = materialised_version(context, db, evaluation.key, f"evaluated {model.task} model", job_name)
        # materialised on its own (outside the job), the promotion still needs the gate's yes for this version
        if cand["status"] == "refused" or not verdict["gate_passed"].value:
            raise dg.Failure(f"{cand['version']} did not pass the gate ({verdict['gate_reason'].value}); the serving "
                             f"version stays. Promote it by hand with `orch model promote {cand['version']}` if you must.")
        out = registry.promote(db, cand["version"], actor=f"dagster:run:{context.run_id}",
                               reason=f"passed the gate ({model.metric} {cand['metrics'].get(model.metric)})")
        return dg.MaterializeResult(metadata={"serving_version": out["promoted"],
                                              "previous_version": out["previous"] or "none"},
                                    data_version=dg.DataVersion(out["promoted"]))

    job = dg.define_asset_job(job_name, selection=dg.AssetSelection.assets(trained, evaluation, promotion),
                              executor_def=dg.in_process_executor, tags={"orch/flow": spec.name},
                              description=f"Train a {model.task} candidate, evaluate it beside the serving version, "
                                          "and promote it only if the gate passes.")
    return [trained, evaluation, promotion], [gate], [job]
