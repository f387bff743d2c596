"""Human in the loop, in Dagster: a decision job for the Launchpad, a sensor that resumes decided
items (no run waits for a human), and a sensor that escalates or auto-rejects overdue approvals.
The logic lives in orch_project/lib/approvals.py; the `orch approve|reject|review` CLI calls the same."""

import dagster as dg
from pydantic import Field

from ...lib import approvals as hitl
from ..resources import AppDatabase, Connectors
from . import logic
from .assets import CFG, daily, support_actions, support_surveys
from .sensors import day_run_requests


class ApprovalDecisionConfig(dg.Config):
    """A reviewer's decision on one pending approval (the Launchpad's op config)."""

    item_id: str = Field(description="the item waiting for approval (see `orch review list`)")
    decision: str = Field(description="approve | reject")
    reviewer: str = Field(description="the deciding person's roster id (e.g. a-ravi) or name")
    reason: str = Field(default="", description="why; required for a rejection")
    edited_draft: str | None = Field(default=None, description="replacement reply text (approve only); "
                                                               "PII is masked before it is stored")


@dg.op(description="Apply a reviewer's decision: role-checked against the roster, audited. Refusals fail the run.")
def apply_approval_decision(context: dg.OpExecutionContext, config: ApprovalDecisionConfig,
                            app_db: AppDatabase) -> dict:
    try:
        out = hitl.decide(app_db.database(), config.item_id, config.decision, config.reviewer, config.reason,
                          config.edited_draft, CFG.roster, flow=logic.FLOW)
    except hitl.ApprovalError as exc:
        raise dg.Failure(description=str(exc), allow_retries=False,
                         metadata={"item_id": config.item_id, "reviewer": config.reviewer,
                                   "decision": config.decision, "refusal": type(exc).__name__})
    context.log.info(f"{out['item_id']}: {out['status']} by {out['decided_by']}"
                     + (" (edited draft)" if out["edited"] else ""))
    context.add_output_metadata({"item_id": out["item_id"], "status": out["status"],
                                 "decided_by": out["decided_by"], "edited": out["edited"]})
    return {k: (v.isoformat() if hasattr(v, "isoformat") else v) for k, v in out.items()}


@dg.job(description="Approve or reject one item waiting for a human (op config: item_id, decision, reviewer, "
                    "reason). approval_resume_sensor then delivers or closes the item.",
        tags={"orch/flow": "support"})
def approval_decision_job():
    apply_approval_decision()


approval_resume_job = dg.define_asset_job(
    "approval_resume_job",
    selection=dg.AssetSelection.assets(support_actions, support_surveys),
    partitions_def=daily,
    executor_def=dg.in_process_executor,
    description="Deliver approved items of one day partition: ticket, reply, CRM log, then the survey.",
    tags={"orch/flow": "support"},
)


def resume_run_requests(by_day: dict[str, list[str]]) -> list[dg.RunRequest]:
    return day_run_requests(by_day, key_prefix="approval-resume", trigger="approval_resume_sensor",
                            count_tag="orch/approved_items")


@dg.sensor(job=approval_resume_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Resumes decided approvals: approved items go on to delivery (one run per day partition), "
                       "rejected items are closed (terminal). Items waiting for a human hold no run.")
def approval_resume_sensor(context: dg.SensorEvaluationContext, app_db: AppDatabase):
    db = app_db.database()
    resumed = hitl.resume_decided(db, logic.FLOW)
    # everything approved but not yet through the actions stage, including items resumed by an earlier
    # tick whose run was not launched (the run key dedups the ones that were)
    waiting = hitl.approved_waiting_delivery(db, logic.FLOW)
    if resumed.rejected:
        context.log.info(f"rejected (terminal): {len(resumed.rejected)} item(s)")
    if not waiting:
        return dg.SkipReason(f"no approved items to deliver; {len(resumed.rejected)} rejected item(s) closed"
                             if resumed.rejected else "no decided approvals to resume")
    return dg.SensorResult(run_requests=resume_run_requests(waiting))


@dg.sensor(minimum_interval_seconds=300, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Approvals past their due date move one level up (the brief's escalation role, new due "
                       "date, alert through messaging, audited); past the top role's due date the brief's "
                       "on_timeout decides: wait (escalate) or auto-reject.")
def approval_escalation_sensor(context: dg.SensorEvaluationContext, app_db: AppDatabase, connectors: Connectors):
    rep = hitl.escalate_overdue(app_db.database(), logic.FLOW, CFG.brief.approval, CFG.roster, CFG.brief.sla_hours,
                                connectors.client())
    return dg.SkipReason(f"escalated {len(rep.escalated)}, auto-rejected {len(rep.auto_rejected)}, "
                         f"alerts delivered {rep.alerts_delivered}" if rep else "no overdue approvals")
