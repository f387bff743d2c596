"""``build_flow``: a FlowSpec in, the flow's Dagster definitions out (see the package docstring)."""


import hashlib
import json
import warnings
from collections.abc import Callable
from typing import Any

import dagster as dg

from ..defs.resources import AppDatabase, Connectors, LLMGateway, Workspace
from ..lib.flows import FlowSpec, OpsStage, Stage
from ..lib.pipeline import StageEnv, StageReport
from ..lib.telemetry import get_logger

# Steps that talk to the outside world retry with exponential backoff and jitter.
EXTERNAL_RETRY = dg.RetryPolicy(max_retries=3, delay=1, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)
MAX_SOURCES_PER_TICK = 20_000


def stage_asset_key(spec: FlowSpec, name: str) -> dg.AssetKey:
    """The asset of stage (or ops stage) ``name``: ``<flow>_<asset name>``."""
    if name == "intake":
        return dg.AssetKey(f"{spec.name}_{spec.intake.asset}")
    for s in spec.stages:
        if s.name == name:
            return dg.AssetKey(f"{spec.name}_{s.asset or s.name}")
    return dg.AssetKey(f"{spec.name}_{name}")


def partitions(spec: FlowSpec) -> dg.DailyPartitionsDefinition:
    return dg.DailyPartitionsDefinition(start_date=spec.first_day.isoformat(), end_offset=1)


def weekly_partitions(spec: FlowSpec) -> dg.WeeklyPartitionsDefinition:
    """ISO weeks (Monday to Sunday, UTC) from the week of the flow's first day; a week is a partition once over."""
    from datetime import timedelta

    monday = spec.first_day - timedelta(days=spec.first_day.weekday())
    return dg.WeeklyPartitionsDefinition(start_date=monday.isoformat(), day_offset=1)


def stage_env(context, spec: FlowSpec, app_db: AppDatabase, workspace: Workspace, *, partitioned: bool = True
              ) -> StageEnv:
    if partitioned == "weekly":  # the seven days of each week partition
        from datetime import date, timedelta

        days = [(date.fromisoformat(k) + timedelta(days=i)).isoformat() for k in context.partition_keys
                for i in range(7)]
    else:
        days = list(context.partition_keys) if partitioned else []
    return StageEnv(db=app_db.database(), flow=spec.name, days=days, run_id=context.run_id,
                    attempt=context.retry_number + 1, logger=get_logger(workspace.settings().logs_dir), spec=spec)


def report_metadata(report: StageReport) -> dict[str, Any]:
    """A stage report as asset metadata: dicts and lists as JSON, ``<name>_md`` strings as markdown
    under ``<name>``, numbers as numbers (the UI charts them over time)."""
    out: dict[str, Any] = {}
    for k, v in report.as_metadata().items():
        if isinstance(v, (dict, list)):
            out[k] = dg.MetadataValue.json(v)
        elif isinstance(v, str) and k.endswith("_md"):
            out[k.removesuffix("_md")] = dg.MetadataValue.md(v)
        else:
            out[k] = v
    return out


def audit_summary(env: StageEnv, since) -> dict[str, Any]:
    """What this step wrote to the audit log (decisions and side effects), for the UI."""
    import sqlalchemy as sa

    from ..lib.store import audit

    with env.db.begin() as conn:
        rows = conn.execute(sa.select(audit.c.action, audit.c.actor, sa.func.count()).where(
            audit.c.flow == env.flow, audit.c.at >= since).group_by(audit.c.action, audit.c.actor)).all()
    table = "| action | actor | rows |\n|---|---|---|\n" + "\n".join(f"| {a} | {who} | {n} |" for a, who, n in rows)
    return {"audit_rows_written": int(sum(n for *_, n in rows)),
            "audit_trail": dg.MetadataValue.md(table if rows else "nothing audited in this step")}


def run_stage(context, env: StageEnv, fn: Callable[..., StageReport], *args) -> dg.MaterializeResult:
    """Call a stage function and turn its report into the materialisation's metadata."""
    from ..lib.store import utcnow

    since = utcnow()
    report = fn(env, *args)
    context.log.info(f"{report.stage}: {report.n_in} items, outcomes {dict(report.outcomes)}, "
                     f"{report.duration_ms:.0f} ms")
    return dg.MaterializeResult(metadata={**report_metadata(report), **audit_summary(env, since)})


def _resources(kind: str, llm: LLMGateway | None, connectors: Connectors | None, env: StageEnv, spec: FlowSpec):
    if kind == "model":
        return (llm.gateway(env.db, spec, run_id=env.run_id),)
    if kind == "connector":
        return (connectors.client(),)
    return ()


def _stage_callable(spec: FlowSpec, stage: Stage | OpsStage, partitioned: bool | str) -> Callable:
    """The asset body of a stage; its signature names exactly the resources the stage kind needs."""
    cfg = spec.config

    def call(context, app_db, workspace, llm=None, connectors=None):
        env = stage_env(context, spec, app_db, workspace, partitioned=partitioned)
        return run_stage(context, env, stage.fn, cfg, *_resources(stage.kind, llm, connectors, env, spec))

    if stage.kind == "model":
        def model_asset(context: dg.AssetExecutionContext, app_db: AppDatabase, workspace: Workspace,
                        llm: LLMGateway):
            return call(context, app_db, workspace, llm=llm)
        return model_asset
    if stage.kind == "connector":
        def connector_asset(context: dg.AssetExecutionContext, app_db: AppDatabase, workspace: Workspace,
                            connectors: Connectors):
            return call(context, app_db, workspace, connectors=connectors)
        return connector_asset

    def plain_asset(context: dg.AssetExecutionContext, app_db: AppDatabase, workspace: Workspace):
        return call(context, app_db, workspace)
    return plain_asset


def _code_version(spec: FlowSpec, stage: Stage) -> str | None:
    return spec.config.code_version(stage.tasks, stage.logic_version) if stage.tasks else None


def flow_assets(spec: FlowSpec, daily) -> list[dg.AssetsDefinition]:
    """The intake asset and one asset per stage, each depending on the one before it."""
    common = dict(group_name=spec.name, partitions_def=daily, backfill_policy=dg.BackfillPolicy.single_run(),
                  kinds=set(spec.kinds))

    def intake_asset(context: dg.AssetExecutionContext, app_db: AppDatabase, workspace: Workspace):
        from ..lib.intake import run_intake

        env = stage_env(context, spec, app_db, workspace)
        s = workspace.settings()
        report = run_intake(env, spec, spec.inbox_dir(s.inbox_dir), s.pii_salt)
        context.log.info(f"intake: {report.n_in} sources, outcomes {dict(report.outcomes)}")
        return dg.MaterializeResult(metadata=report_metadata(report))

    out = [dg.asset(name=stage_asset_key(spec, "intake").path[-1], **common,
                    description=spec.intake.description or f"{spec.title}: new sources validated, PII-masked, "
                                                            "stored as items; invalid input to the DLQ.")(intake_asset)]
    previous = stage_asset_key(spec, "intake")
    for st in spec.stages:
        key = stage_asset_key(spec, st.name)
        kw: dict[str, Any] = dict(common)
        if st.kind == "model":
            kw["pool"] = "llm"
        if st.kind in ("model", "connector"):
            kw["retry_policy"] = EXTERNAL_RETRY
        out.append(dg.asset(name=key.path[-1], deps=[previous, *st.deps], code_version=_code_version(spec, st),
                            description=st.description or st.name, **kw)(_stage_callable(spec, st, True)))
        previous = key
    return out


def ops_assets(spec: FlowSpec) -> tuple[list[dg.AssetsDefinition], list[dg.AssetsDefinition]]:
    """Across partitions: the flow's ops stages, SLA escalation, DLQ backlog and the KPI report; and, apart,
    the weekly-partitioned ops stages (``OpsStage(partitions="weekly")``)."""
    from . import operations

    group = f"{spec.name}_ops"
    out: list[dg.AssetsDefinition] = []
    weekly: list[dg.AssetsDefinition] = []
    names: list[dg.AssetKey] = []
    for op in spec.ops:
        kw: dict[str, Any] = {"retry_policy": EXTERNAL_RETRY} if op.kind in ("model", "connector") else {}
        if op.kind == "model":
            kw["pool"] = "llm"
        key = stage_asset_key(spec, op.name)
        if op.partitions == "weekly":
            weekly.append(dg.asset(name=key.path[-1], group_name=group, kinds={"python"},
                                   partitions_def=weekly_partitions(spec),
                                   backfill_policy=dg.BackfillPolicy.single_run(),
                                   deps=[stage_asset_key(spec, a) for a in op.after],
                                   description=op.description or op.name, **kw)(_stage_callable(spec, op, "weekly")))
            continue
        out.append(dg.asset(name=key.path[-1], group_name=group, kinds={"python"},
                            deps=[stage_asset_key(spec, a) for a in op.after], description=op.description or op.name,
                            **kw)(_stage_callable(spec, op, False)))
        names.append(key)
    if spec.sla_escalation:
        out.append(operations.escalation_asset(spec, group))
        names.append(out[-1].key)
    out.append(operations.dlq_backlog_asset(spec, group, deps=[k for k in names]))
    out.append(operations.kpi_report_asset(spec, group, deps=names))
    return out, weekly


def scan_new_sources(spec: FlowSpec, db, inbox_dir, cursor: dict) -> tuple[dict[str, list[str]], dict]:
    """New sources of the flow since ``cursor``, grouped by partition day, and the advanced cursor.
    Files are ordered by (change time, name); table rows by id. Nothing before the cursor is read
    again, and the run itself dedups by source key, so a replayed tick is harmless."""
    import sqlalchemy as sa

    from ..lib.intake import as_records, list_inbox_files, parse_file, parse_inbox_row
    from ..lib.store import inbox, utcnow

    parse = spec.intake.peek or spec.intake.parse_file or parse_file
    by_day: dict[str, list[str]] = {}
    today = utcnow().date()
    file_mark = tuple(cursor.get("file") or (0, ""))
    budget = MAX_SOURCES_PER_TICK
    new_file_mark = file_mark
    for ctime_ns, name, path in list_inbox_files(inbox_dir, spec.intake.suffixes):
        if (ctime_ns, name) <= file_mark:
            continue
        if budget == 0:
            break
        got = parse(path)
        for p in as_records(got):
            by_day.setdefault(p.partition_day(spec.first_day, today), []).append(p.source_key)
        new_file_mark = (ctime_ns, name)
        budget -= 1
    table_mark = int(cursor.get("table") or 0)
    with db.begin() as conn:
        rows = conn.execute(sa.select(inbox.c.id, inbox.c.payload, inbox.c.submitted_at).where(
            inbox.c.flow == spec.name, inbox.c.id > table_mark).order_by(inbox.c.id).limit(budget)).all()
    for row_id, payload, submitted_at in rows:
        p = parse_inbox_row(row_id, payload, submitted_at)
        by_day.setdefault(p.partition_day(spec.first_day, today), []).append(p.source_key)
        table_mark = row_id
    return by_day, {"file": list(new_file_mark), "table": table_mark}


def day_run_requests(by_day: dict[str, list[str]], *, key_prefix: str, trigger: str,
                     count_tag: str) -> list[dg.RunRequest]:
    """One run request per day partition; the run key hashes the day's ids, so a repeated sensor
    tick with the same work starts nothing new."""
    reqs = []
    for day, ids in sorted(by_day.items()):
        digest = hashlib.sha256("\n".join(sorted(ids)).encode()).hexdigest()[:16]
        reqs.append(dg.RunRequest(partition_key=day, run_key=f"{key_prefix}:{day}:{digest}",
                                  tags={"orch/trigger": trigger, count_tag: str(len(ids))}))
    return reqs


def build_flow(spec: FlowSpec) -> dg.Definitions:
    """Every Dagster object of ``spec``'s flow (see the package docstring). The kit uses single-run
    backfill policies and partitioned checks on purpose; Dagster's beta/preview notes about them are
    silenced here, once, instead of on every object."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", category=dg.BetaWarning)
        warnings.simplefilter("ignore", category=dg.PreviewWarning)
        return _build(spec)


def _build(spec: FlowSpec) -> dg.Definitions:
    from . import checks, governance, operations

    daily = partitions(spec)
    stages = flow_assets(spec, daily)
    ops, weekly = ops_assets(spec)
    retention = operations.retention_asset(spec)
    tags = {"orch/flow": spec.name}
    flow_job = dg.define_asset_job(
        f"{spec.name}_flow_job", selection=dg.AssetSelection.assets(*stages), partitions_def=daily,
        executor_def=dg.in_process_executor,  # stages are sequential micro-batches; one process is fastest
        description=f"{spec.title} for one day partition (or a range, as a single-run backfill).", tags=tags)
    ops_job = dg.define_asset_job(
        f"{spec.name}_ops_job", selection=dg.AssetSelection.assets(*ops), executor_def=dg.in_process_executor,
        description=f"{spec.title} across partitions: " + ", ".join(a.key.path[-1] for a in ops) + ".",
        # one ops run per flow at a time (dagster.yaml): its stages rewrite items across partitions
        tags={**tags, "orch/ops": spec.name})
    ops_schedule = dg.ScheduleDefinition(
        name=f"{spec.name}_ops_job_schedule", job=ops_job, cron_schedule=spec.ops_schedule,
        default_status=dg.DefaultScheduleStatus.RUNNING,
        description="The ops job on a schedule (SLA escalation, fold-backs), even when nothing new arrives.")

    @dg.sensor(name=f"{spec.name}_intake_sensor", job=flow_job, minimum_interval_seconds=30,
               default_status=dg.DefaultSensorStatus.RUNNING,
               description=f"Micro-batches new {spec.name} sources (inbox folder {spec.name}/ and the flow's "
                           "inbox-table rows) into one run per day.")
    def intake_sensor(context: dg.SensorEvaluationContext, app_db: AppDatabase, workspace: Workspace):
        cursor = json.loads(context.cursor) if context.cursor else {}
        by_day, new_cursor = scan_new_sources(spec, app_db.database(), spec.inbox_dir(workspace.settings().inbox_dir),
                                              cursor)
        if not by_day:
            return dg.SkipReason(f"no new messages in the {spec.name} inbox folder or its inbox-table rows")
        return dg.SensorResult(run_requests=day_run_requests(by_day, key_prefix=f"{spec.name}-intake",
                                                             trigger=f"{spec.name}_intake_sensor",
                                                             count_tag="orch/new_sources"),
                               cursor=json.dumps(new_cursor))

    @dg.run_status_sensor(name=f"{spec.name}_ops_after_flow", run_status=dg.DagsterRunStatus.SUCCESS,
                          monitored_jobs=[flow_job], request_job=ops_job,
                          default_status=dg.DefaultSensorStatus.RUNNING,
                          description="After each successful flow run: the ops job (fold-backs, escalation, "
                                      "redelivery, KPIs).")
    def ops_after_flow(context: dg.RunStatusSensorContext):
        return dg.RunRequest(run_key=f"ops-after:{context.dagster_run.run_id}",
                             tags={"orch/trigger": f"{spec.name}_ops_after_flow"})

    hitl = operations.approval_objects(spec, daily, stages)
    dlq_job = operations.dlq_replay_job(spec, ops)
    retention_job = dg.define_asset_job(
        f"{spec.name}_retention_purge_job", selection=dg.AssetSelection.assets(retention),
        executor_def=dg.in_process_executor, description="Purge raw personal data past the retention limit.",
        tags=tags)
    retention_schedule = dg.ScheduleDefinition(name=f"{spec.name}_retention_purge_job_schedule", job=retention_job,
                                               cron_schedule="30 2 * * *", execution_timezone="UTC",
                                               default_status=dg.DefaultScheduleStatus.RUNNING)
    jobs = [flow_job, ops_job, dlq_job, retention_job, *hitl.jobs]
    schedules = [ops_schedule, retention_schedule]
    if weekly:
        weekly_job = dg.define_asset_job(
            f"{spec.name}_weekly_job", selection=dg.AssetSelection.assets(*weekly), partitions_def=weekly_partitions(spec),
            executor_def=dg.in_process_executor, tags=tags,
            description=f"{spec.title}, once per ISO week (Monday to Sunday): "
                        + ", ".join(a.key.path[-1] for a in weekly) + "; backfillable by week.")
        jobs.append(weekly_job)
        schedules.append(dg.build_schedule_from_partitioned_job(
            weekly_job, name=f"{spec.name}_weekly_job_schedule", hour_of_day=5,
            default_status=dg.DefaultScheduleStatus.RUNNING,
            description="When a week is over (Monday 05:00 UTC), the weekly stages for the week just ended."))
    alert_sensors = operations.alert_sensors(spec, jobs)
    model_assets, model_checks, model_jobs = [], [], []
    for model in spec.models:
        a, c, j = governance.governed_model_defs(spec, model)
        model_assets += a
        model_checks += c
        model_jobs += j
    return dg.Definitions(
        assets=[*stages, *ops, *weekly, retention, *model_assets],
        asset_checks=[*checks.flow_checks(spec, daily, stages), *model_checks],
        jobs=[*jobs, *model_jobs],
        schedules=schedules,
        sensors=[intake_sensor, ops_after_flow, *hitl.sensors, *alert_sensors],
    )
