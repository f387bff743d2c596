"""`orch demo`: the support loop end to end through Dagster on the embedded default."""

from __future__ import annotations

import json
import time
from pathlib import Path

import click

from .lib.settings import Settings

SENSOR_CURSOR_KEY = "orch_demo/support_intake_sensor"
# The run's event log is in the Dagster UI; the terminal only shows warnings and errors.
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def _step(msg: str) -> None:
    click.echo(click.style("==> ", fg="cyan") + msg)


def run_demo(s: Settings, dagster_home, samples: Path, submit_paths) -> int:
    import dagster as dg

    from .defs.resources import _embedded, default_resources
    from .defs.support.logic import status_counts
    from .definitions import defs
    from .lib.llm.registry import promoted_model_path
    from .lib.store import Database

    t0 = time.perf_counter()
    home = dagster_home(s)
    db = Database(s.database_url)
    _step(f"seeding the inbox from {samples}")
    counts = submit_paths(s, [samples / "inbox", samples / "malformed", samples / "inbox_table.jsonl"])
    click.echo(f"    {counts}")
    instance = dg.DagsterInstance.get()
    _step(f"Dagster instance at {home}")

    if promoted_model_path(db, "triage")[0] is None:
        _step("training the triage model (first run only, ~40 s)")
        res = defs.resolve_job_def("train_triage_model_job").execute_in_process(instance=instance, run_config=QUIET, raise_on_error=False)
        if not res.success:
            click.echo("training failed; see the run in the Dagster UI (make dev)", err=True)
            return 2

    _step("evaluating support_intake_sensor")
    sensor = defs.get_sensor_def("support_intake_sensor")
    stored = instance.run_storage.get_cursor_values({SENSOR_CURSOR_KEY}).get(SENSOR_CURSOR_KEY)
    with dg.build_sensor_context(instance=instance, cursor=stored, definitions=defs,
                                 resources=default_resources()) as ctx:
        result = sensor.evaluate_tick(ctx)
    requests = result.run_requests or []
    if not requests:
        click.echo(f"    no new messages ({result.skip_message or 'nothing to do'})")
    job = defs.resolve_job_def("support_flow_job")
    failed = 0
    for n, req in enumerate(requests, 1):
        _step(f"[{n}/{len(requests)}] support_flow_job partition {req.partition_key} "
              f"({req.tags.get('orch/new_sources')} new sources)")
        r = job.execute_in_process(instance=instance, partition_key=req.partition_key, run_config=QUIET,
                                   tags={**req.tags, "dagster/run_key": req.run_key}, raise_on_error=False)
        if not r.success:
            failed += 1
            click.echo(f"    run {r.run_id} failed; open it in the Dagster UI (make dev) to see which step and why",
                       err=True)
    if result.cursor and not failed:
        instance.run_storage.set_cursor_values({SENSOR_CURSOR_KEY: result.cursor})

    answers_file = samples / "csat_responses.jsonl"
    if answers_file.exists():
        _step("customers answer their surveys (shipped answers for surveyed items)")
        recorded = _simulate_survey_answers(db, _embedded(s.connectors_url), answers_file)
        click.echo(f"    {recorded} new answers recorded by the messaging connector")

    _step("support_ops_job: CSAT fold-back, SLA escalation, insights, KPI report")
    ops = defs.resolve_job_def("support_ops_job").execute_in_process(instance=instance, run_config=QUIET, raise_on_error=False)
    if not ops.success:
        failed += 1

    st = status_counts(db)
    conn_counts = _embedded(s.connectors_url).counts()
    report = s.reports_dir / "support" / "kpi_report.html"
    click.echo("")
    click.echo(click.style("Support loop summary", bold=True))
    click.echo(f"  items received        {st['received']}")
    click.echo(f"  resolved              {st['states'].get('resolved', 0)}")
    click.echo(f"  awaiting approval     {st['states'].get('awaiting_approval', 0)}")
    click.echo(f"  dead-lettered         {st['states'].get('dead_lettered', 0)}")
    click.echo(f"  duplicates ignored    {st['states'].get('duplicate', 0)}")
    click.echo(f"  still in progress     {st['in_progress']}")
    click.echo(f"  escalated (SLA)       {st['escalated']}")
    click.echo(f"  unaccounted           {st['lost']}")
    click.echo(f"  connectors            tickets {conn_counts['tickets']}, CRM entries {conn_counts['crm_activities']}, "
               f"messages {conn_counts['messages']}, survey answers {conn_counts['survey_responses']}")
    click.echo(f"  KPI report            {report}")
    click.echo(f"  took {time.perf_counter() - t0:.1f} s; browse the runs with `make dev` (http://127.0.0.1:3000)")
    return 1 if failed or st["lost"] else 0


def _simulate_survey_answers(db, connectors, path: Path) -> int:
    import sqlalchemy as sa

    from .lib.store import items

    with db.begin() as conn:
        surveyed = {iid for iid, d in conn.execute(sa.select(items.c.item_id, items.c.data).where(
            items.c.flow == "support", items.c.status == "resolved")) if d.get("survey_sent_at")}
    answers = []
    for line in path.read_text(encoding="utf-8").splitlines():
        a = json.loads(line)
        if a["message_id"] in surveyed:
            from datetime import datetime

            answers.append({"item_id": a["message_id"], "score": int(a["score"]), "comment": a.get("comment"),
                            "responded_at": datetime.fromisoformat(a["responded_at"].replace("Z", "+00:00"))})
    return connectors.record_survey_responses(answers)
