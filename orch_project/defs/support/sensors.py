"""Triggers: new inbound messages (inbox folder + inbox table) and successful flow runs."""


import hashlib
import json

import dagster as dg
import sqlalchemy as sa

from ...lib.intake import list_inbox_files, parse_file, parse_inbox_row
from ...lib.store import inbox, utcnow
from ..resources import AppDatabase, Workspace
from . import logic
from .jobs import support_flow_job, support_ops_job

MAX_SOURCES_PER_TICK = 20_000


def scan_new_sources(db, inbox_dir, cursor: dict) -> tuple[dict[str, list[str]], dict]:
    """New sources since ``cursor``, grouped by partition day, and the advanced cursor.
    Files are ordered by (change time, name); table rows by id. Nothing before the cursor is
    read again, and the run itself dedups by source key, so a replayed tick is harmless."""
    by_day: dict[str, list[str]] = {}
    today = utcnow().date()
    file_mark = tuple(cursor.get("file") or (0, ""))
    budget = MAX_SOURCES_PER_TICK
    new_file_mark = file_mark
    for ctime_ns, name, path in list_inbox_files(inbox_dir):
        if (ctime_ns, name) <= file_mark:
            continue
        if budget == 0:
            break
        p = parse_file(path)
        by_day.setdefault(p.partition_day(logic.FIRST_DAY, today), []).append(p.source_key)
        new_file_mark = (ctime_ns, name)
        budget -= 1
    table_mark = int(cursor.get("table") or 0)
    with db.begin() as conn:
        rows = conn.execute(sa.select(inbox.c.id, inbox.c.payload, inbox.c.submitted_at).where(
            inbox.c.flow == logic.FLOW, inbox.c.id > table_mark).order_by(inbox.c.id).limit(budget)).all()
    for row_id, payload, submitted_at in rows:
        p = parse_inbox_row(row_id, payload, submitted_at)
        by_day.setdefault(p.partition_day(logic.FIRST_DAY, today), []).append(p.source_key)
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


def intake_run_requests(by_day: dict[str, list[str]]) -> list[dg.RunRequest]:
    return day_run_requests(by_day, key_prefix="support-intake", trigger="support_intake_sensor",
                            count_tag="orch/new_sources")


@dg.sensor(job=support_flow_job, minimum_interval_seconds=30, default_status=dg.DefaultSensorStatus.RUNNING,
           description="Micro-batches new inbound messages (inbox folder and inbox table) into one run per day.")
def support_intake_sensor(context: dg.SensorEvaluationContext, app_db: AppDatabase, workspace: Workspace):
    cursor = json.loads(context.cursor) if context.cursor else {}
    by_day, new_cursor = scan_new_sources(app_db.database(), workspace.settings().inbox_dir, cursor)
    if not by_day:
        return dg.SkipReason("no new messages in the inbox folder or the inbox table")
    return dg.SensorResult(run_requests=intake_run_requests(by_day), cursor=json.dumps(new_cursor))


@dg.run_status_sensor(run_status=dg.DagsterRunStatus.SUCCESS, monitored_jobs=[support_flow_job],
                      request_job=support_ops_job, default_status=dg.DefaultSensorStatus.RUNNING,
                      description="After each successful flow run: fold CSAT, escalate, refresh insights and KPIs.")
def support_ops_after_flow(context: dg.RunStatusSensorContext):
    return dg.RunRequest(run_key=f"ops-after:{context.dagster_run.run_id}",
                         tags={"orch/trigger": "support_ops_after_flow"})
