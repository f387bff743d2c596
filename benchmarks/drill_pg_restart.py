"""Chaos drill (c): PostgreSQL restarts while the support flow runs.

    .venv/bin/python benchmarks/drill_pg_restart.py [--items N] [--seed S] [--restart-at mid|triage|actions]

Production shape: the app database AND the Dagster instance (dagster.postgres.yaml, DAGSTER_PG_*) live in
two temporary databases on the local PostgreSQL server (127.0.0.1:5432, user postgres). N generated
messages (default 2,000) of one day partition go to the inbox table; ``support_flow_job`` runs in a child
process (``benchmarks/flow_process.py run``); when the app database shows the restart point the drill runs
``pg_ctlcluster --skip-systemctl-redirect <version> main restart``. The run then either completes (the
outage fell between database calls and the pools' pre-ping reconnected) or fails; a failed run - or one
whose worker died before it could report (left STARTED) - is re-executed from failure
(``ReexecutionOptions.from_failure``); should that also fail, the partition is run again from scratch
(stages are idempotent by status). PostgreSQL is started again in a ``finally`` if it is not accepting
connections, and the temporary databases are dropped.

THIS RESTARTS THE SHARED SERVER: do not run it while others use PostgreSQL (it is not in the test suite).

Restart points: ``mid`` (default) as soon as items are past triage and the actions stage has not
committed; ``triage`` while intake has committed and triage runs; ``actions`` while the outbox is being
delivered.

The last stdout line is one JSON object:

    {"drill": "pg_restart", "items", "resolved", "dead_lettered", "lost", "duplicate_effects",
     "first_attempt": "completed|failed", "retry": {...}, ...}

Exit 1 unless lost == 0, duplicate effects == 0 and the flow completed (first attempt or retry).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flow_process as fp  # noqa: E402

DAY = "2026-11-20"
PG_HOST, PG_PORT, PG_USER = "127.0.0.1", 5432, "postgres"


def cluster_version() -> str:
    return sorted(os.listdir("/etc/postgresql"))[-1]


def pg_ctl(action: str) -> tuple[int, str]:
    out = subprocess.run(["pg_ctlcluster", "--skip-systemctl-redirect", cluster_version(), "main", action],
                         capture_output=True, text=True, timeout=120)
    return out.returncode, (out.stdout + out.stderr).strip()


def pg_ready() -> bool:
    import psycopg2

    try:
        psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=2).close()
        return True
    except Exception:
        return False


def admin_sql(*statements: str) -> None:
    import psycopg2

    conn = psycopg2.connect(host=PG_HOST, port=PG_PORT, user=PG_USER, dbname="postgres", connect_timeout=5)
    try:
        conn.autocommit = True  # CREATE / DROP DATABASE cannot run in a transaction block
        with conn.cursor() as cur:
            for st in statements:
                cur.execute(st)
    finally:
        conn.close()


def restart_point(kind: str):
    def ready(p: dict) -> bool:
        st, ob = p["items"], p["outbox"]
        if kind == "triage":
            return st.get("received", 0) > 0
        if kind == "actions":
            return ob.get("pending", 0) > 0 and st.get("approved", 0) > 0
        return fp.mid_run(st)
    return ready


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--day", default=DAY)
    ap.add_argument("--restart-at", choices=("mid", "triage", "actions"), default="mid")
    ap.add_argument("--timeout", type=float, default=300)
    args = ap.parse_args(argv)
    if not pg_ready():
        raise SystemExit(f"PostgreSQL on {PG_HOST}:{PG_PORT} is not accepting connections")
    tag = uuid.uuid4().hex[:8]
    app_db, dg_db = f"orch_drill_app_{tag}", f"orch_drill_dg_{tag}"
    admin_sql(f'CREATE DATABASE "{app_db}"', f'CREATE DATABASE "{dg_db}"')
    try:
        with tempfile.TemporaryDirectory(prefix="drill_pg_restart_") as tmp:
            return run(args, Path(tmp), app_db, dg_db)
    finally:
        if not pg_ready():
            fp.say("PostgreSQL is not accepting connections: starting it")
            fp.say(str(pg_ctl("start")))
            fp.wait_until(pg_ready, 60, 0.5)
        from orch_project.lib.store import dispose_engines

        dispose_engines()
        try:
            admin_sql(f'DROP DATABASE IF EXISTS "{app_db}" WITH (FORCE)',
                      f'DROP DATABASE IF EXISTS "{dg_db}" WITH (FORCE)')
        except Exception as exc:
            fp.say(f"could not drop {app_db}/{dg_db}: {exc}")
        fp.say(f"PostgreSQL accepting connections at exit: {pg_ready()}")


def safe_progress(db) -> dict | None:
    try:
        return fp.progress(db)
    except Exception:
        return None  # the server is restarting


def run(args, work: Path, app_db: str, dg_db: str) -> int:
    import dagster as dg

    from orch_project.lib.settings import Settings
    from orch_project.lib.store import Database

    url = f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:{PG_PORT}/{app_db}"
    fp.drill_env(work, url, "dagster.postgres.yaml", extra={
        "DAGSTER_PG_HOST": PG_HOST, "DAGSTER_PG_PORT": str(PG_PORT), "DAGSTER_PG_USER": PG_USER,
        "DAGSTER_PG_PASSWORD": "unused", "DAGSTER_PG_DB": dg_db})
    s = Settings.from_env().ensure_dirs()
    db = Database(s.database_url)
    fp.say("training the triage model...")
    fp.train_and_promote(db, s.models_dir)
    submitted = fp.submit(db, args.items, args.day, args.seed)
    fp.say(f"drill pg_restart: {submitted} items for {args.day}, restart at {args.restart_at}, "
           f"app db {app_db}, dagster db {dg_db}")
    log = work / "child.log"
    t0 = time.perf_counter()
    child = fp.start_child(["run", "--day", args.day], log)
    ready = restart_point(args.restart_at)
    state, restart = None, None
    while child.poll() is None and time.perf_counter() - t0 < args.timeout:
        p = safe_progress(db)
        if p and ready(p):
            state = p
            t1 = time.perf_counter()
            rc, msg = pg_ctl("restart")
            restart = {"at_s": round(t1 - t0, 2), "seconds": round(time.perf_counter() - t1, 2), "rc": rc,
                       "output": msg[-200:]}
            fp.say(f"    restarted PostgreSQL at {t1 - t0:.2f} s in {restart['seconds']} s (rc {rc}); state {p}")
            break
        time.sleep(0.01)
    if not pg_ready():
        fp.wait_until(pg_ready, 60, 0.5)
    first = fp.child_result(child, timeout=args.timeout)
    first_s = time.perf_counter() - t0
    fp.say(f"    first attempt: exit {child.returncode}, {first} after {first_s:.1f} s")

    with dg.DagsterInstance.get() as instance:
        run_id = fp.latest_run_id(instance)
        status_before = instance.get_run_by_id(run_id).status.value
        unfinished = fp.unfinished_steps(instance, run_id)
        failures = []
        from dagster import DagsterEventType

        for rec in instance.get_records_for_run(run_id, limit=100_000).records:
            ev = rec.event_log_entry.dagster_event
            if ev is not None and ev.event_type == DagsterEventType.STEP_FAILURE:
                err = ev.step_failure_data.error
                failures.append({"step": ev.step_key, "error": (err.cls_name if err else None),
                                 "message": (err.message.splitlines()[0][:160] if err and err.message else None)})
    completed = bool(first and first.get("success"))
    after_first = fp.figures(db, submitted)
    retry = None
    if not completed:
        fp.say("re-execution from failure...")
        rex = fp.child_result(fp.start_child(["reexecute", "--run-id", run_id], log), timeout=args.timeout)
        retry = {"method": "ReexecutionOptions.from_failure", "status": rex and rex["status"]}
        if not (rex and rex.get("success")):
            fp.say("re-execution did not succeed: a fresh run of the partition...")
            rr = fp.child_result(fp.start_child(["run", "--day", args.day], log), timeout=args.timeout)
            retry = {**retry, "fallback": "fresh run of the partition", "fallback_status": rr and rr["status"]}
        with dg.DagsterInstance.get() as instance:
            if rex:
                retry["steps"] = sorted({st.step_key for st in instance.get_run_step_stats(rex["run_id"])})
    after = fp.figures(db, submitted)
    done = completed or bool(retry and (retry["status"] == "SUCCESS" or retry.get("fallback_status") == "SUCCESS"))
    result = {"drill": "pg_restart", **{k: after[k] for k in ("items", "resolved", "dead_lettered", "lost",
                                                              "duplicate_effects")},
              "first_attempt": "completed" if completed else "failed",
              "first_attempt_status": status_before, "first_attempt_seconds": round(first_s, 1),
              "restart": restart, "restart_point": args.restart_at, "state_at_restart": state,
              "steps_unfinished_after_first_attempt": unfinished, "step_failures": failures[:5],
              "after_first_attempt": {"lost": after_first["lost"], "states": after_first["states"]},
              "retry": retry, "completed": done, "resolved_status": after["resolved_status"],
              "awaiting_approval": after["awaiting_approval"], "approved": after["approved"],
              "in_progress": after["in_progress"], "app_db": "postgresql", "dagster_instance": "postgresql",
              "postgres_ready_at_end": pg_ready()}
    ok = restart is not None and done and after["lost"] == 0 and after["duplicate_effects"] == 0
    result["meets_target"] = bool(ok)
    if not ok:
        fp.say(f"child log tail:\n{log.read_text(errors='replace')[-4000:]}")
    print(json.dumps(result), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
