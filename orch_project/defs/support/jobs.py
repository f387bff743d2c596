"""Jobs, schedules and the hand-off between them."""


import dagster as dg

from .assets import FLOW_ASSETS, OPS_ASSETS, daily
from .dlq import support_dlq_backlog

support_flow_job = dg.define_asset_job(
    "support_flow_job",
    selection=dg.AssetSelection.assets(*FLOW_ASSETS),
    partitions_def=daily,
    executor_def=dg.in_process_executor,  # stages are sequential micro-batches; one process is fastest
    description="The support loop for one day partition (or a range, as a single-run backfill).",
    tags={"orch/flow": "support"},
)

support_ops_job = dg.define_asset_job(
    "support_ops_job",
    selection=dg.AssetSelection.assets(*OPS_ASSETS, support_dlq_backlog),
    executor_def=dg.in_process_executor,
    description="Across partitions: outbox redelivery, CSAT fold-back, SLA escalation, insights to the backlog, "
                "KPI report, DLQ backlog.",
    tags={"orch/flow": "support"},
)

support_ops_schedule = dg.ScheduleDefinition(
    job=support_ops_job, cron_schedule="*/15 * * * *", default_status=dg.DefaultScheduleStatus.RUNNING,
    description="SLA escalation and CSAT fold-back every 15 minutes, even when no new mail arrives.",
)
