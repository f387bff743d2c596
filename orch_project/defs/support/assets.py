"""The customer support loop as daily-partitioned assets (one partition = one day of inbound
messages, processed in micro-batches). Every asset delegates to a stage in logic.py; per-item
state lives in the app database, so the assets return metadata, not data."""


from collections.abc import Callable

import dagster as dg

from ...lib.pipeline import StageEnv, StageReport
from ...lib.telemetry import get_logger
from ..resources import AppDatabase, Connectors, LLMGateway, Workspace
from . import logic

daily = dg.DailyPartitionsDefinition(start_date=logic.FIRST_DAY.isoformat(), end_offset=1)
CFG = logic.SupportConfig()

# Steps that talk to the outside world retry with exponential backoff and jitter.
EXTERNAL_RETRY = dg.RetryPolicy(max_retries=3, delay=1, backoff=dg.Backoff.EXPONENTIAL, jitter=dg.Jitter.PLUS_MINUS)
COMMON = dict(group_name="support", partitions_def=daily, backfill_policy=dg.BackfillPolicy.single_run(),
              kinds={"python", "sqlite"})


def _env(context: dg.AssetExecutionContext, app_db: AppDatabase, workspace: Workspace) -> StageEnv:
    days = list(context.partition_keys)
    return StageEnv(db=app_db.database(), flow=logic.FLOW, days=days, run_id=context.run_id,
                    attempt=context.retry_number + 1, logger=get_logger(workspace.settings().logs_dir))


def flow_gateway(llm: LLMGateway, env: StageEnv):
    """The gateway the flow's model steps use (benchmarks/support_batch.py builds it the same way)."""
    return llm.gateway(env.db, flow=logic.FLOW, run_id=env.run_id, routing_path=CFG.routing_path,
                       prompts_dir=CFG.prompts_dir, prompt_versions=CFG.prompt_versions, budget=CFG.brief.budget)


def _result(context: dg.AssetExecutionContext, report: StageReport) -> dg.MaterializeResult:
    md = {}
    for k, v in report.as_metadata().items():
        if isinstance(v, (dict, list)):
            md[k] = dg.MetadataValue.json(v)
        else:
            md[k] = v
    context.log.info(f"{report.stage}: {report.n_in} items, outcomes {dict(report.outcomes)}, "
                     f"{report.duration_ms:.0f} ms")
    return dg.MaterializeResult(metadata=md)


def _run(context, stage: Callable[..., StageReport], app_db, workspace, *args) -> dg.MaterializeResult:
    from ...lib.store import utcnow

    env = _env(context, app_db, workspace)
    since = utcnow()
    result = _result(context, stage(env, CFG, *args))
    return dg.MaterializeResult(metadata={**result.metadata, **_audit_summary(env, since)})


def _audit_summary(env: StageEnv, since) -> dict:
    """What this step wrote to the audit log (decisions and side effects), for the UI."""
    import sqlalchemy as sa

    from ...lib.store import audit

    with env.db.begin() as conn:
        rows = conn.execute(sa.select(audit.c.action, audit.c.actor, sa.func.count()).where(
            audit.c.flow == logic.FLOW, audit.c.at >= since).group_by(audit.c.action, audit.c.actor)).all()
    table = "| action | actor | rows |\n|---|---|---|\n" + "\n".join(f"| {a} | {who} | {n} |" for a, who, n in rows)
    return {"audit_rows_written": int(sum(n for *_, n in rows)),
            "audit_trail": dg.MetadataValue.md(table if rows else "nothing audited in this step")}


@dg.asset(**COMMON, description="Inbound messages from the inbox folder (.eml/.json) and the inbox table: "
          "validated against the InboundMessage contract, PII-masked, stored as items. Invalid input goes to "
          "the dead-letter queue with a reason; each source is read exactly once.")
def support_inbound(context: dg.AssetExecutionContext, app_db: AppDatabase, workspace: Workspace):
    env = _env(context, app_db, workspace)
    s = workspace.settings()
    return _result(context, logic.intake_stage(env, CFG, s.inbox_dir, s.pii_salt))


@dg.asset(**COMMON, deps=[support_inbound, "triage_model_promotion"], pool="llm", retry_policy=EXTERNAL_RETRY,
          code_version=logic.step_code_version("triage", CFG),
          description="Intent (model via the LLM gateway), priority and queue (taxonomy + urgency), SLA due date.")
def support_triage(context: dg.AssetExecutionContext, app_db: AppDatabase, workspace: Workspace, llm: LLMGateway):
    env = _env(context, app_db, workspace)
    return _result(context, logic.triage_stage(env, CFG, flow_gateway(llm, env)))


@dg.asset(**COMMON, deps=[support_triage],
          description="Assignee from roster.yaml: least loaded (open items / capacity) person serving the queue.")
def support_assignment(context: dg.AssetExecutionContext, app_db: AppDatabase, workspace: Workspace):
    return _run(context, logic.assign_stage, app_db, workspace)


@dg.asset(**COMMON, deps=[support_assignment],
          description="Knowledge lookup: the best shipped article (TF-IDF similarity, boosted by intent).")
def support_knowledge(context: dg.AssetExecutionContext, app_db: AppDatabase, workspace: Workspace):
    return _run(context, logic.knowledge_stage, app_db, workspace)


@dg.asset(**COMMON, deps=[support_knowledge], pool="llm", retry_policy=EXTERNAL_RETRY,
          code_version=logic.step_code_version("draft_reply", CFG),
          description="Draft reply grounded in the retrieved article (through the LLM gateway), with citation.")
def support_drafts(context: dg.AssetExecutionContext, app_db: AppDatabase, workspace: Workspace, llm: LLMGateway):
    env = _env(context, app_db, workspace)
    return _result(context, logic.draft_stage(env, CFG, flow_gateway(llm, env)))


@dg.asset(**COMMON, deps=[support_drafts],
          description="Approval gate: high priority or low confidence waits for a reviewer (approvals table); "
                      "the rest is approved by policy. Every decision is audited.")
def support_approval_gate(context: dg.AssetExecutionContext, app_db: AppDatabase, workspace: Workspace):
    return _run(context, logic.approval_gate_stage, app_db, workspace)


@dg.asset(**COMMON, deps=[support_approval_gate], retry_policy=EXTERNAL_RETRY,
          description="Ticket, reply and CRM log through the outbox with idempotency keys; items whose effects "
                      "were all delivered are resolved.")
def support_actions(context: dg.AssetExecutionContext, app_db: AppDatabase, workspace: Workspace,
                    connectors: Connectors):
    return _run(context, logic.actions_stage, app_db, workspace, connectors.client())


@dg.asset(**COMMON, deps=[support_actions], retry_policy=EXTERNAL_RETRY,
          description="Satisfaction survey to every resolved item, exactly once.")
def support_surveys(context: dg.AssetExecutionContext, app_db: AppDatabase, workspace: Workspace,
                    connectors: Connectors):
    return _run(context, logic.survey_stage, app_db, workspace, connectors.client())


FLOW_ASSETS = [support_inbound, support_triage, support_assignment, support_knowledge, support_drafts,
               support_approval_gate, support_actions, support_surveys]

# --- across partitions: run after each flow run and on a schedule ---------------------------
OPS = dict(group_name="support_ops", kinds={"python"})


def _ops_env(context, app_db: AppDatabase, workspace: Workspace) -> StageEnv:
    return StageEnv(db=app_db.database(), flow=logic.FLOW, days=[], run_id=context.run_id,
                    attempt=context.retry_number + 1, logger=get_logger(workspace.settings().logs_dir))


@dg.asset(**OPS, deps=[support_surveys], retry_policy=EXTERNAL_RETRY,
          description="CSAT answers folded back into their items (answers arrive days after the survey).")
def support_csat(context: dg.AssetExecutionContext, app_db: AppDatabase, workspace: Workspace,
                 connectors: Connectors):
    report = logic.csat_stage(_ops_env(context, app_db, workspace), CFG, connectors.client())
    return _result(context, report)


@dg.asset(**OPS, deps=[support_approval_gate, support_triage], retry_policy=EXTERNAL_RETRY,
          description="SLA escalation: open items past their first-response due date go to the escalation role "
                      "with an alert through the messaging connector.")
def support_escalations(context: dg.AssetExecutionContext, app_db: AppDatabase, workspace: Workspace,
                        connectors: Connectors):
    report = logic.escalation_stage(_ops_env(context, app_db, workspace), CFG, connectors.client())
    return _result(context, report)


@dg.asset(**OPS, deps=[support_actions, support_surveys], retry_policy=EXTERNAL_RETRY,
          description="Self-healing: effects still in the outbox (a connector was down) are delivered again behind "
                      "the connectors' circuit breakers; items waiting for them are resolved and surveyed, or "
                      "compensated and dead-lettered once an effect has failed for good (connectors.yaml).")
def support_outbox_redelivery(context: dg.AssetExecutionContext, app_db: AppDatabase, workspace: Workspace,
                              connectors: Connectors):
    report = logic.redelivery_stage(_ops_env(context, app_db, workspace), CFG, connectors.client())
    return _result(context, report)


@dg.asset(**OPS, deps=[support_csat],
          description="Insights to the backlog: top intents, rising intents and worst-CSAT intents.")
def support_insights(context: dg.AssetExecutionContext, app_db: AppDatabase):
    from .reporting import insights

    found = insights(app_db.database())["items"]
    rows = "\n".join(f"| {f['kind']} | {f['key']} | {f['score']:g} |" for f in found)
    return dg.MaterializeResult(metadata={
        "backlog_items": len(found),
        "insights": dg.MetadataValue.md("| kind | intent | score |\n|---|---|---|\n" + rows if found else "none yet"),
    })


@dg.asset(**OPS, deps=[support_insights, support_escalations, support_csat, support_outbox_redelivery],
          description="KPI report: success and failure rates, latency by stage, retries, DLQ, overrides, tokens, "
                      "cache hits, CSAT, time to resolution and the brief's alerts. Markdown here, HTML + PNG charts "
                      "on disk.")
def support_kpi_report(context: dg.AssetExecutionContext, app_db: AppDatabase, workspace: Workspace):
    from .reporting import kpi_report

    rep = kpi_report(app_db.database(), CFG, workspace.settings().reports_dir)
    k = rep.kpis
    numeric = {key: float(k[key]) for key in ("received", "resolved", "awaiting_approval", "rejected", "dead_lettered",
                                              "dlq_open", "success_rate", "cache_hit_rate", "exact_cache_hit_rate",
                                              "semantic_cache_hit_rate", "cost_usd_total", "llm_calls", "deferred",
                                              "csat_mean", "tokens_per_run_mean", "processing_latency_p95_s")
               if k.get(key) is not None}
    return dg.MaterializeResult(metadata={
        "report": dg.MetadataValue.md(rep.markdown),
        "html_report": dg.MetadataValue.path(str(rep.html_path)),
        "alerts_breached": sum(1 for a in k["alerts"] if a["breached"]),
        **numeric,
    })


OPS_ASSETS = [support_outbox_redelivery, support_csat, support_escalations, support_insights, support_kpi_report]
