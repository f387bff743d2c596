"""`orch demo`: every flow end to end through Dagster on the embedded default, one summary per flow."""

from __future__ import annotations

import time

import click

from .lib.settings import Settings

# The run's event log is in the Dagster UI; the terminal only shows warnings and errors.
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


def _step(msg: str) -> None:
    click.echo(click.style("==> ", fg="cyan") + msg)


def run_demo(s: Settings, dagster_home, specs, submit_paths) -> int:
    import dagster as dg

    from .definitions import defs
    from .lib.store import Database

    t0 = time.perf_counter()
    home = dagster_home(s)
    db = Database(s.database_url)
    instance = dg.DagsterInstance.get()
    _step(f"Dagster instance at {home}")
    failed = 0
    lost = 0
    summaries = []
    for spec in demo_order(specs):
        ok, summary = _run_flow(s, db, defs, instance, spec, submit_paths)
        failed += 0 if ok else 1
        lost += summary["lost"]
        summaries.append(summary)
    for summary in summaries:
        click.echo("")
        click.echo(click.style(summary["title"], bold=True))
        for label, value in summary["lines"]:
            click.echo(f"  {label:<21} {value}")
    click.echo(f"\n  took {time.perf_counter() - t0:.1f} s; browse the runs with `make dev` (http://127.0.0.1:3000)")
    return 1 if failed or lost else 0


def demo_order(specs) -> list:
    """The flows in their folder order, except that a flow runs before the flows it hands records to
    (``DemoSpec.feeds``), so they pick the records up in the same demo."""
    pending, out = list(specs), []
    while pending:
        fed = {f for s in pending if s.demo is not None for f in s.demo.feeds if f != s.name}
        nxt = next((s for s in pending if s.name not in fed), pending[0])  # a cycle: folder order
        out.append(nxt)
        pending.remove(nxt)
    return out


def _resume_approvals(defs, instance, spec) -> int:
    """Decisions people took (the demo's reviewers) move their items on: one tick of the flow's approval
    resume sensor and the runs it asks for. Returns the number of failed runs."""
    import dagster as dg

    from .defs.resources import default_resources

    if spec.gate is None:
        return 0
    sensor = defs.get_sensor_def(f"{spec.name}_approval_resume_sensor")
    with dg.build_sensor_context(instance=instance, definitions=defs, resources=default_resources()) as ctx:
        result = sensor.evaluate_tick(ctx)
    failed = 0
    job = defs.resolve_job_def(f"{spec.name}_approval_resume_job")
    for req in result.run_requests or []:
        _step(f"[{spec.name}] {job.name} partition {req.partition_key} ({req.tags.get('orch/approved_items')} "
              "approved items)")
        r = job.execute_in_process(instance=instance, partition_key=req.partition_key, run_config=QUIET,
                                   tags=req.tags, raise_on_error=False)
        failed += 0 if r.success else 1
    return failed


def _run_flow(s: Settings, db, defs, instance, spec, submit_paths) -> tuple[bool, dict]:
    from .lib.pipeline import status_counts

    name = spec.name
    demo = spec.demo
    ok = True
    if demo is not None:
        _step(f"[{name}] seeding the inbox from the flow's shipped samples")
        click.echo(f"    {demo.seed(lambda paths: submit_paths(s, list(paths), spec))}")
        for job_name in demo.setup_jobs(db):
            _step(f"[{name}] {job_name} (first run only)")
            res = defs.resolve_job_def(job_name).execute_in_process(instance=instance, run_config=QUIET,
                                                                    raise_on_error=False)
            if not res.success:
                click.echo(f"    {job_name} failed; see the run in the Dagster UI (make dev)", err=True)
                return False, {"title": f"{spec.title} summary", "lines": [("setup failed", job_name)], "lost": 0}

    rounds = demo.rounds if demo is not None else 1
    for n_round in range(1, rounds + 1):
        if rounds > 1:
            _step(f"[{name}] round {n_round}/{rounds}: the records the last ops job wrote come back through intake"
                  if n_round > 1 else f"[{name}] round 1/{rounds}")
        ok = _round(s, db, defs, instance, spec) and ok
    st = status_counts(db, name)
    lines = [("items received", st["received"]), ("resolved", st["states"].get("resolved", 0)),
             ("awaiting approval", sum(st["states"].get(x, 0) for x in spec.waiting_statuses)),
             ("rejected by a person", st["states"].get("rejected", 0)),
             ("dead-lettered", st["states"].get("dead_lettered", 0)),
             ("duplicates ignored", st["states"].get("duplicate", 0)), ("still in progress", st["in_progress"]),
             ("escalated (SLA)", st["escalated"]), ("unaccounted", st["lost"])]
    if demo is not None and demo.summary is not None:
        lines += demo.summary(s)
    lines.append(("KPI report", str(s.reports_dir / name / "kpi_report.html")))
    return ok, {"title": f"{spec.title} summary", "lines": lines, "lost": st["lost"]}


def _round(s: Settings, db, defs, instance, spec) -> bool:
    """One pass: the intake sensor's tick and the runs it asks for, the world between (``before_ops``), the
    decisions people took, then the ops job. False when a run failed."""
    import dagster as dg

    from .defs.resources import default_resources

    name = spec.name
    demo = spec.demo
    _step(f"[{name}] evaluating {name}_intake_sensor")
    sensor = defs.get_sensor_def(f"{name}_intake_sensor")
    cursor_key = f"orch_demo/{name}_intake_sensor"
    stored = instance.run_storage.get_cursor_values({cursor_key}).get(cursor_key)
    with dg.build_sensor_context(instance=instance, cursor=stored, definitions=defs,
                                 resources=default_resources()) as ctx:
        result = sensor.evaluate_tick(ctx)
    requests = result.run_requests or []
    if not requests:
        click.echo(f"    nothing new ({result.skip_message or 'nothing to do'})")
    job = defs.resolve_job_def(f"{name}_flow_job")
    failed = 0
    for n, req in enumerate(requests, 1):
        _step(f"[{name}] [{n}/{len(requests)}] {name}_flow_job partition {req.partition_key} "
              f"({req.tags.get('orch/new_sources')} new sources)")
        r = job.execute_in_process(instance=instance, partition_key=req.partition_key, run_config=QUIET,
                                   tags={**req.tags, "dagster/run_key": req.run_key}, raise_on_error=False)
        if not r.success:
            failed += 1
            click.echo(f"    run {r.run_id} failed; open it in the Dagster UI (make dev) to see which step and why",
                       err=True)
    if result.cursor and not failed:
        instance.run_storage.set_cursor_values({cursor_key: result.cursor})
    if demo is not None and demo.before_ops is not None:
        line = demo.before_ops(s, db)
        if line:
            _step(f"[{name}] {line}")
    failed += _resume_approvals(defs, instance, spec)  # decisions people took move their items on

    _step(f"[{name}] {name}_ops_job: fold-backs, escalation, redelivery, DLQ backlog, KPI report")
    ops = defs.resolve_job_def(f"{name}_ops_job").execute_in_process(instance=instance, run_config=QUIET,
                                                                    raise_on_error=False)
    ok = ops.success
    if demo is not None and demo.weeks is not None and any(o.partitions == "weekly" for o in spec.ops):
        weekly = defs.resolve_job_def(f"{name}_weekly_job")
        for week in demo.weeks(s, db):
            _step(f"[{name}] {name}_weekly_job partition {week} (the week starting that Monday)")
            ok = weekly.execute_in_process(instance=instance, partition_key=week, run_config=QUIET,
                                           raise_on_error=False).success and ok
    return not failed and ok
