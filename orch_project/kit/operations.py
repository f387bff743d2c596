"""The operations every flow gets: SLA escalation, the DLQ backlog and replay job, human-in-the-loop
jobs and sensors, the KPI report, raw-data retention and the alert sensors. Plain logic lives in
``lib/`` (sla, dlq, approvals, alerts, retention, kpis); these builders wire it into Dagster with
the flow's name on every object."""


from collections.abc import Sequence
from dataclasses import dataclass, field

import dagster as dg
from pydantic import Field

from ..defs.resources import AppDatabase, Connectors, Workspace
from ..lib import alerts as alerts_lib
from ..lib import approvals as hitl
from ..lib import dlq as dlq_lib
from ..lib.flows import FlowSpec
from ..lib.telemetry import get_logger
from .build import EXTERNAL_RETRY, day_run_requests, run_stage, stage_asset_key, stage_env


def escalation_asset(spec: FlowSpec, group: str) -> dg.AssetsDefinition:
    from ..lib.sla import escalation_stage

    deps = [stage_asset_key(spec, spec.stages[0].name)] + [stage_asset_key(spec, s.name) for s in spec.stages
                                                           if s.branches]

    @dg.asset(name=f"{spec.name}_escalations", group_name=group, kinds={"python"}, deps=list(dict.fromkeys(deps)),
              retry_policy=EXTERNAL_RETRY,
              description="SLA escalation: open items past their first-response due date go to the brief's "
                          "escalation role with an alert through the messaging connector.")
    def escalations(context: dg.AssetExecutionContext, app_db: AppDatabase, workspace: Workspace,
                    connectors: Connectors):
        env = stage_env(context, spec, app_db, workspace, partitioned=False)
        return run_stage(context, env, escalation_stage, spec.config, connectors.client())

    return escalations


def backlog_metadata(db, flow: str) -> dict:
    rows = dlq_lib.open_backlog(db, flow)
    md: dict = {"dlq_open": sum(r["count"] for r in rows)}
    by_stage: dict[str, int] = {}
    by_error: dict[str, int] = {}
    for r in rows:
        by_stage[r["stage"]] = by_stage.get(r["stage"], 0) + r["count"]
        by_error[r["error_type"]] = by_error.get(r["error_type"], 0) + r["count"]
    md.update({f"dlq_open_stage_{k}": v for k, v in sorted(by_stage.items())})
    md.update({f"dlq_open_error_{k}": v for k, v in sorted(by_error.items())})
    table = "| stage | error type | open |\n|---|---|---|\n" + "\n".join(
        f"| {r['stage']} | {r['error_type']} | {r['count']} |" for r in rows)
    md["backlog"] = dg.MetadataValue.md(table if rows else "no open dead letters")
    return md


def dlq_backlog_asset(spec: FlowSpec, group: str, deps: Sequence[dg.AssetKey]) -> dg.AssetsDefinition:
    @dg.asset(name=f"{spec.name}_dlq_backlog", group_name=group, kinds={"python"}, deps=list(deps),
              description="Open dead letters by stage and error type (numeric metadata + a table), counted after "
                          "the ops steps (redelivery may dead-letter effects failed for good). Replay with "
                          f"`orch dlq replay ID|--all --flow {spec.name}` or {spec.name}_dlq_replay_job; intake "
                          "dead letters need the source fixed.")
    def backlog(app_db: AppDatabase) -> dg.MaterializeResult:
        return dg.MaterializeResult(metadata=backlog_metadata(app_db.database(), spec.name))

    return backlog


class DLQReplayConfig(dg.Config):
    dlq_id: int | None = Field(None, description="the dead letter to replay (see `orch dlq list`)")
    all: bool = Field(False, description="replay every open, replayable dead letter of the flow")


def dlq_replay_job(spec: FlowSpec, ops_assets: Sequence[dg.AssetsDefinition]) -> dg.JobDefinition:
    backlog_key = dg.AssetKey(f"{spec.name}_dlq_backlog")

    @dg.op(name=f"{spec.name}_replay_dead_letters",
           description="Replay dead letters: items go back to the status their failed stage loads (trace id kept, "
                       "dlq row marked replayed, audited); then records the DLQ backlog.")
    def replay_dead_letters(context: dg.OpExecutionContext, config: DLQReplayConfig, app_db: AppDatabase) -> dict:
        db = app_db.database()
        if (config.dlq_id is None) == (not config.all):
            raise dg.Failure("set exactly one of dlq_id or all: true")
        actor = f"dagster:{context.run_id}"
        if config.all:
            out = dlq_lib.replay_all(db, spec.name, actor=actor, run_id=context.run_id)
            replayed = out["replayed"]
        else:
            try:
                out = dlq_lib.replay(db, config.dlq_id, actor=actor, run_id=context.run_id, flow=spec.name)
            except dlq_lib.DLQError as exc:
                raise dg.Failure(str(exc)) from exc
            if not out["replayed"] and not out["noop"]:
                raise dg.Failure(out["message"])
            replayed = int(out["replayed"])
        context.log.info(out["message"])
        context.log_event(dg.AssetMaterialization(asset_key=backlog_key, metadata=backlog_metadata(db, spec.name)))
        context.add_output_metadata({"replayed": replayed, "message": out["message"]})
        return out

    @dg.job(name=f"{spec.name}_dlq_replay_job", tags={"orch/flow": spec.name},
            description=f"Replay dead letters (config {{dlq_id: int | null, all: bool}}); the next {spec.name}_flow_job "
                        "run of each item's partition reprocesses it.")
    def job():
        replay_dead_letters()

    return job


@dataclass
class Approvals:
    jobs: list = field(default_factory=list)
    sensors: list = field(default_factory=list)


class ApprovalDecisionConfig(dg.Config):
    """A reviewer's decision on one pending approval (the Launchpad's op config)."""

    item_id: str = Field(description="the item waiting for approval (see `orch review list`)")
    decision: str = Field(description="approve | reject")
    reviewer: str = Field(description="the deciding person's roster id (e.g. a-ravi) or name")
    reason: str = Field(default="", description="why; required for a rejection")
    edited_draft: str | None = Field(default=None, description="replacement text for the flow's editable field "
                                                               "(approve only); PII is masked before it is stored")


def approval_objects(spec: FlowSpec, daily, stage_assets: Sequence[dg.AssetsDefinition]) -> Approvals:
    """The decision job (Launchpad), the resume job + sensor (decided items move on; no run waits for
    a person) and the escalation sensor (overdue approvals move up or are auto-rejected)."""
    out = Approvals()
    gate = next((i for i, s in enumerate(spec.stages) if s.branches), None)
    if gate is None:
        return out
    flow, cfg = spec.name, spec.config

    @dg.op(name=f"{flow}_apply_approval_decision",
           description="Apply a reviewer's decision: role-checked against the roster, audited. Refusals fail the run.")
    def apply_decision(context: dg.OpExecutionContext, config: ApprovalDecisionConfig, app_db: AppDatabase) -> dict:
        try:
            res = hitl.decide(app_db.database(), config.item_id, config.decision, config.reviewer, config.reason,
                              config.edited_draft, cfg.roster, flow=flow)
        except hitl.ApprovalError as exc:
            raise dg.Failure(description=str(exc), allow_retries=False,
                             metadata={"item_id": config.item_id, "reviewer": config.reviewer,
                                       "decision": config.decision, "refusal": type(exc).__name__})
        context.log.info(f"{res['item_id']}: {res['status']} by {res['decided_by']}"
                         + (" (edited)" if res["edited"] else ""))
        context.add_output_metadata({"item_id": res["item_id"], "status": res["status"],
                                     "decided_by": res["decided_by"], "edited": res["edited"]})
        return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in res.items()}

    @dg.job(name=f"{flow}_approval_decision_job", tags={"orch/flow": flow},
            description="Approve or reject one item waiting for a human (op config: item_id, decision, reviewer, "
                        f"reason). {flow}_approval_resume_sensor then delivers or closes the item.")
    def decision_job():
        apply_decision()

    after = stage_assets[gate + 2:]  # the intake asset is first, then the stages: the ones after the gate
    resume_job = dg.define_asset_job(
        f"{flow}_approval_resume_job", selection=dg.AssetSelection.assets(*after), partitions_def=daily,
        executor_def=dg.in_process_executor, tags={"orch/flow": flow},
        description="Deliver approved items of one day partition: " + ", ".join(a.key.path[-1] for a in after) + ".")

    @dg.sensor(name=f"{flow}_approval_resume_sensor", job=resume_job, minimum_interval_seconds=30,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Resumes decided approvals: approved items go on (one run per day partition), rejected "
                           "items are closed (terminal). Items waiting for a human hold no run.")
    def resume_sensor(context: dg.SensorEvaluationContext, app_db: AppDatabase):
        db = app_db.database()
        resumed = hitl.resume_decided(db, flow)
        # everything approved but not yet through the next stage, including items resumed by an earlier
        # tick whose run was not launched (the run key dedups the ones that were)
        waiting = hitl.approved_waiting_delivery(db, flow)
        if resumed.rejected:
            context.log.info(f"rejected (terminal): {len(resumed.rejected)} item(s)")
        if not waiting:
            return dg.SkipReason(f"no approved items to deliver; {len(resumed.rejected)} rejected item(s) closed"
                                 if resumed.rejected else "no decided approvals to resume")
        return dg.SensorResult(run_requests=day_run_requests(waiting, key_prefix=f"{flow}-approval-resume",
                                                             trigger=f"{flow}_approval_resume_sensor",
                                                             count_tag="orch/approved_items"))

    @dg.sensor(name=f"{flow}_approval_escalation_sensor", minimum_interval_seconds=300,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description="Approvals past their due date move one level up (the brief's escalation role, new due "
                           "date, alert through messaging, audited); past the top role's due date the brief's "
                           "on_timeout decides: wait (escalate) or auto-reject.")
    def escalation_sensor(context: dg.SensorEvaluationContext, app_db: AppDatabase, connectors: Connectors):
        rep = hitl.escalate_overdue(app_db.database(), flow, cfg.brief.approval, cfg.roster, cfg.brief.sla_hours,
                                    connectors.client())
        return dg.SkipReason(f"escalated {len(rep.escalated)}, auto-rejected {len(rep.auto_rejected)}, "
                             f"alerts delivered {rep.alerts_delivered}" if rep else "no overdue approvals")

    out.jobs += [resume_job, decision_job]
    out.sensors += [resume_sensor, escalation_sensor]
    return out


def kpi_report_asset(spec: FlowSpec, group: str, deps: Sequence[dg.AssetKey]) -> dg.AssetsDefinition:
    @dg.asset(name=f"{spec.name}_kpi_report", group_name=group, kinds={"python"}, deps=list(deps),
              description="KPI report: success and failure rates, latency by stage, retries, DLQ, overrides, tokens, "
                          "cache hits and the brief's alerts (plus the flow's own KPIs). Markdown here, HTML + PNG "
                          "charts on disk.")
    def kpi_report(context: dg.AssetExecutionContext, app_db: AppDatabase, workspace: Workspace):
        from ..lib import kpis

        make = spec.report or kpis.kpi_report
        rep = make(app_db.database(), spec, workspace.settings().reports_dir)
        k = rep.kpis
        numeric = {key: float(v) for key, v in k.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}
        return dg.MaterializeResult(metadata={
            "report": dg.MetadataValue.md(rep.markdown),
            "html_report": dg.MetadataValue.path(str(rep.html_path)),
            "alerts_breached": sum(1 for a in k["alerts"] if a["breached"]),
            **numeric,
        })

    return kpi_report


class RetentionConfig(dg.Config):
    retention_days: int | None = Field(None, ge=0, description="default: ORCH_RAW_RETENTION_DAYS or 30")


def retention_asset(spec: FlowSpec) -> dg.AssetsDefinition:
    @dg.asset(name=f"{spec.name}_raw_retention", group_name=f"{spec.name}_ops", kinds={"python"},
              description="Raw-data retention: processed inbox files and inbox-table payloads, and vault tokens of "
                          "finished items, are purged past the retention limit (audited). Unprocessed input and "
                          "tokens of items still waiting are kept.")
    def raw_retention(context: dg.AssetExecutionContext, config: RetentionConfig, app_db: AppDatabase,
                      workspace: Workspace) -> dg.MaterializeResult:
        from ..lib.retention import purge, retention_days_from_env

        days = config.retention_days if config.retention_days is not None else retention_days_from_env()
        counts = purge(app_db.database(), spec.name, spec.inbox_dir(workspace.settings().inbox_dir),
                       retention_days=days, actor=f"dagster:run:{context.run_id}")
        context.log.info(f"raw retention ({days} days): {counts}")
        return dg.MaterializeResult(metadata=counts)

    return raw_retention


def alert_sensors(spec: FlowSpec, jobs: Sequence) -> list:
    """Alerts from the brief (``alerts:`` in brief.yaml): a metric sensor every five minutes and a
    run-failure sensor on the flow's jobs; each breach is raised once per window (connectors.yaml
    ``alerts.window_s``) through messaging, a structured log line and, when configured, Slack / SMTP."""
    flow, cfg = spec.name, spec.config

    def check(app_db: AppDatabase, connectors: Connectors, workspace: Workspace, source: str) -> dict:
        policy = cfg.connector_policy
        return alerts_lib.check_rules(app_db.database(), connectors.client(), flow, cfg.brief.alert_rules,
                                      source=source, window_s=policy.alerts.window_s, policy=policy,
                                      logger=get_logger(workspace.settings().logs_dir))

    @dg.sensor(name=f"{flow}_alerts_sensor", minimum_interval_seconds=300, default_status=dg.DefaultSensorStatus.RUNNING,
               description="Every 5 minutes: evaluate the brief's alert rules (error rate, p95 latency, DLQ backlog) "
                           "and raise each breach once per window through messaging / Slack / SMTP.")
    def alerts_sensor(context: dg.SensorEvaluationContext, app_db: AppDatabase, connectors: Connectors,
                      workspace: Workspace):
        out = check(app_db, connectors, workspace, f"{flow}_alerts_sensor")
        for a in out["raised"]:
            context.log.warning(f"alert raised: {a['rule']} (observed {a['observed']})")
        return dg.SkipReason(f"{len(out['breached'])} rule(s) breached, {len(out['raised'])} alert(s) raised "
                             f"(observed {out['observed']})")

    @dg.run_failure_sensor(name=f"{flow}_run_failure_alerts", monitored_jobs=list(jobs),
                           default_status=dg.DefaultSensorStatus.RUNNING,
                           description=f"A failed {flow} run raises an alert (once per run) and re-evaluates the "
                                       "brief's alert rules.")
    def run_failure_alerts(context: dg.RunFailureSensorContext, app_db: AppDatabase, connectors: Connectors,
                           workspace: Workspace):
        run = context.dagster_run
        error = (context.failure_event.message or "")[:300] if context.failure_event else ""
        partition = run.tags.get("dagster/partition")
        alerts_lib.raise_alert(
            app_db.database(), connectors.client(), flow, rule="run_failure", metric="run_failure", observed=1.0,
            threshold=None, source=f"{flow}_run_failure_alerts", dedup_key=f"{flow}:run_failure:{run.run_id}",
            message=f"Run {run.run_id} of {run.job_name}{f' (partition {partition})' if partition else ''} failed: "
                    f"{error}", policy=cfg.connector_policy, logger=get_logger(workspace.settings().logs_dir))
        check(app_db, connectors, workspace, f"{flow}_run_failure_alerts")

    return [alerts_sensor, run_failure_alerts]
