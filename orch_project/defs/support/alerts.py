"""Alerts from the brief (``alerts:`` in brief.yaml): a metric sensor the daemon evaluates every five
minutes and a run-failure sensor on the support jobs. Both evaluate the brief's rules (error rate,
p95 latency, DLQ backlog; lib/alerts.py) and raise each breach once per window (connectors.yaml
``alerts.window_s``) through the messaging connector, a structured log line and, when configured,
Slack (ORCH_ALERT_SLACK_WEBHOOK) and SMTP (ORCH_ALERT_SMTP_*). A failed run raises its own alert once."""


import dagster as dg

from ...lib import alerts as alerts_lib
from ...lib.telemetry import get_logger
from ..resources import AppDatabase, Connectors, Workspace
from .approvals import approval_decision_job, approval_resume_job
from .assets import CFG
from .dlq import dlq_replay_job
from .jobs import support_flow_job, support_ops_job
from . import logic

SUPPORT_JOBS = [support_flow_job, support_ops_job, approval_resume_job, approval_decision_job, dlq_replay_job]


def _check(app_db: AppDatabase, connectors: Connectors, workspace: Workspace, source: str) -> dict:
    policy = CFG.connector_policy
    return alerts_lib.check_rules(app_db.database(), connectors.client(), logic.FLOW, CFG.brief.alert_rules,
                                  source=source, window_s=policy.alerts.window_s, policy=policy,
                                  logger=get_logger(workspace.settings().logs_dir))


@dg.sensor(minimum_interval_seconds=300, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Every 5 minutes: evaluate the brief's alert rules (error rate, p95 latency, DLQ backlog) "
                       "and raise each breach once per window through messaging / Slack / SMTP.")
def support_alerts_sensor(context: dg.SensorEvaluationContext, app_db: AppDatabase, connectors: Connectors,
                          workspace: Workspace):
    out = _check(app_db, connectors, workspace, "support_alerts_sensor")
    for a in out["raised"]:
        context.log.warning(f"alert raised: {a['rule']} (observed {a['observed']})")
    return dg.SkipReason(f"{len(out['breached'])} rule(s) breached, {len(out['raised'])} alert(s) raised "
                         f"(observed {out['observed']})")


@dg.run_failure_sensor(monitored_jobs=SUPPORT_JOBS, default_status=dg.DefaultSensorStatus.RUNNING,
                       description="A failed support run raises an alert (once per run) and re-evaluates the "
                                   "brief's alert rules.")
def support_run_failure_alerts(context: dg.RunFailureSensorContext, app_db: AppDatabase, connectors: Connectors,
                               workspace: Workspace):
    run = context.dagster_run
    db = app_db.database()
    logger = get_logger(workspace.settings().logs_dir)
    policy = CFG.connector_policy
    error = (context.failure_event.message or "")[:300] if context.failure_event else ""
    partition = run.tags.get("dagster/partition")
    alerts_lib.raise_alert(
        db, connectors.client(), logic.FLOW, rule="run_failure", metric="run_failure", observed=1.0, threshold=None,
        source="support_run_failure_alerts", dedup_key=f"{logic.FLOW}:run_failure:{run.run_id}",
        message=f"Run {run.run_id} of {run.job_name}{f' (partition {partition})' if partition else ''} failed: "
                f"{error}", policy=policy, logger=logger)
    _check(app_db, connectors, workspace, "support_run_failure_alerts")
