"""Raw-data retention for the support flow: a daily purge of processed inbox input and of vault
tokens of finished items past the retention limit (ORCH_RAW_RETENTION_DAYS, default 30)."""

import dagster as dg
from pydantic import Field

from ..resources import AppDatabase, Workspace
from . import logic


class RetentionConfig(dg.Config):
    retention_days: int | None = Field(None, ge=0, description="default: ORCH_RAW_RETENTION_DAYS or 30")


@dg.asset(group_name="support_ops", kinds={"python"},
          description="Raw-data retention: processed inbox files and inbox-table payloads, and vault tokens of "
                      "finished items, are purged past the retention limit (audited). Unprocessed input and "
                      "tokens of items still waiting are kept.")
def support_raw_retention(context: dg.AssetExecutionContext, config: RetentionConfig, app_db: AppDatabase,
                          workspace: Workspace) -> dg.MaterializeResult:
    from ...lib.retention import purge, retention_days_from_env

    days = config.retention_days if config.retention_days is not None else retention_days_from_env()
    counts = purge(app_db.database(), logic.FLOW, workspace.settings().inbox_dir, retention_days=days,
                   actor=f"dagster:run:{context.run_id}")
    context.log.info(f"raw retention ({days} days): {counts}")
    return dg.MaterializeResult(metadata=counts)


retention_purge_job = dg.define_asset_job(
    "retention_purge_job", selection=dg.AssetSelection.assets(support_raw_retention),
    executor_def=dg.in_process_executor, description="Purge raw personal data past the retention limit.")

retention_purge_schedule = dg.ScheduleDefinition(job=retention_purge_job, cron_schedule="30 2 * * *",
                                                 execution_timezone="UTC",
                                                 default_status=dg.DefaultScheduleStatus.RUNNING)
