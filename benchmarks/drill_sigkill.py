"""Chaos drill (b): SIGKILL of the run worker mid-batch, then re-execution from failure.

    .venv/bin/python benchmarks/drill_sigkill.py [--items N] [--seed S] [--kill-at actions|mid|draft]
                                                 [--model-json FILE] [--no-rerun]

N generated messages (default 2,000, ``defs.support.sample_data.generate_messages``) of one day partition are
submitted to the inbox table of a fresh app database (SQLite, or ``--database-url``); ``support_flow_job``
runs for that partition in a child process (``benchmarks/flow_process.py run``: ``dagster.execute_job``
on a persistent SQLite Dagster instance in ``<work>/dagster_home`` configured with the project's
dagster.yaml). The drill polls the app database and SIGKILLs the child's process group at the kill point:

- ``actions`` (default): the actions stage has enqueued its outbox effects and is delivering them
  (outbox rows pending, items still ``approved``) - the point where a careless design sends twice;
- ``mid``: as soon as any item is past triage while the actions stage has not committed;
- ``draft``: knowledge committed (items ``grounded``), the draft step running.

The killed run stays STARTED in the instance (a SIGKILLed process cannot report anything);
``flow_process.py reexecute`` marks it failed - what the daemon's run monitoring does for a dead run
worker - and re-executes it with ``ReexecutionOptions.from_failure``: the steps that had succeeded are
skipped, the killed step and its downstream steps run again. Unless ``--no-rerun``, the same partition is
then run once more from scratch (a new run, like a sensor tick or a backfill) to show it adds nothing.

Progress goes to stderr; the last line on stdout is one JSON object:

    {"drill": "sigkill", "items", "resolved", "dead_lettered", "lost", "duplicate_effects",
     "killed_at_stage", "state_at_kill", "reexecution": {...}, ...}

"resolved" counts items that completed the flow (status resolved, or awaiting_approval / approved: the
approval gate's outcomes). Exit 1 unless lost == 0, duplicate effects == 0, the kill happened mid-run
and the re-execution succeeded.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import flow_process as fp  # noqa: E402

DAY = "2026-11-20"


def kill_point(kind: str):
    def ready(p: dict) -> bool:
        st, ob = p["items"], p["outbox"]
        if kind == "actions":
            return ob.get("pending", 0) > 0 and ob.get("delivered", 0) == 0 and st.get("approved", 0) > 0
        if kind == "draft":
            return st.get("grounded", 0) > 0
        return fp.mid_run(st)
    return ready


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=11)
    ap.add_argument("--day", default=DAY)
    ap.add_argument("--kill-at", choices=("actions", "mid", "draft"), default="actions")
    ap.add_argument("--database-url", help="app database (default: SQLite in the work dir)")
    ap.add_argument("--model-json", help="an already trained model {path, version, metrics} instead of training")
    ap.add_argument("--no-rerun", action="store_true", help="skip the final fresh run of the partition")
    ap.add_argument("--timeout", type=float, default=300, help="seconds to wait for the kill point")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="drill_sigkill_") as tmp:
        try:
            return run(args, Path(tmp))
        finally:
            from orch_project.lib.store import dispose_engines

            dispose_engines()


def setup(args, work: Path):
    from orch_project.lib.settings import Settings
    from orch_project.lib.store import Database

    fp.drill_env(work, args.database_url)
    s = Settings.from_env().ensure_dirs()
    db = Database(s.database_url)
    if args.model_json:
        m = json.loads(Path(args.model_json).read_text())
        fp.register_and_promote(db, m["version"], m["path"], m["metrics"])
    else:
        fp.say("training the triage model...")
        fp.train_and_promote(db, s.models_dir)
    return db


def run(args, work: Path) -> int:
    import dagster as dg

    db = setup(args, work)
    submitted = fp.submit(db, args.items, args.day, args.seed)
    fp.say(f"drill sigkill: {submitted} items for {args.day}, kill at {args.kill_at}, work {work}")
    log = work / "child.log"
    t0 = time.perf_counter()
    child = fp.start_child(["run", "--day", args.day], log)
    ready = kill_point(args.kill_at)
    state = None
    while child.poll() is None and time.perf_counter() - t0 < args.timeout:
        p = fp.progress(db)
        if ready(p):
            os.killpg(child.pid, signal.SIGKILL)
            state = p
            break
        time.sleep(0.005)
    kill_s = time.perf_counter() - t0
    child.wait(timeout=60)
    killed = state is not None and child.returncode == -signal.SIGKILL
    fp.say(f"    child exit {child.returncode} after {kill_s:.2f} s; state at kill {state}")

    with dg.DagsterInstance.get() as instance:
        run_id = fp.latest_run_id(instance)
        parent = instance.get_run_by_id(run_id)
        parent_status = parent.status.value
        unfinished = fp.unfinished_steps(instance, run_id)
    after_kill = fp.figures(db, submitted)
    after_kill_progress = fp.progress(db)
    fp.say(f"    run {run_id} {parent_status}, unfinished steps {unfinished}; app db {after_kill_progress}")

    fp.say("re-execution from failure...")
    t1 = time.perf_counter()
    rex = fp.child_result(fp.start_child(["reexecute", "--run-id", run_id], log))
    reexec_s = time.perf_counter() - t1
    with dg.DagsterInstance.get() as instance:
        reexec_steps = []
        if rex:
            reexec_steps = sorted({s.step_key for s in instance.get_run_step_stats(rex["run_id"])})
        parent_after = instance.get_run_by_id(run_id).status.value
    after = fp.figures(db, submitted)
    fp.say(f"    {rex} in {reexec_s:.1f} s, steps {reexec_steps}; {json.dumps(after)}")

    rerun = None
    if not args.no_rerun:
        fp.say("a fresh run of the same partition (must add nothing)...")
        rr = fp.child_result(fp.start_child(["run", "--day", args.day], log))
        again = fp.figures(db, submitted)
        rerun = {"status": rr and rr["status"], "duplicate_effects": again["duplicate_effects"],
                 "lost": again["lost"], "unchanged": again["states"] == after["states"]}
        after = again

    from orch_project.defs.resources import Connectors

    conn_counts = Connectors().client().duplicates()
    result = {"drill": "sigkill", **{k: after[k] for k in ("items", "resolved", "dead_lettered", "lost",
                                                           "duplicate_effects")},
              "killed_at_stage": unfinished[0] if (killed and unfinished) else None,
              "kill_point": args.kill_at, "killed_after_s": round(kill_s, 2),
              "state_at_kill": state, "killed_run": {"run_id": run_id, "status_after_kill": parent_status,
                                                     "status_after_reexecution": parent_after},
              "after_kill": {"lost": after_kill["lost"], "states": after_kill["states"],
                             "outbox": after_kill_progress["outbox"]},
              "reexecution": {"method": "ReexecutionOptions.from_failure", "status": rex and rex["status"],
                              "steps": reexec_steps, "seconds": round(reexec_s, 1)},
              "rerun": rerun, "resolved_status": after["resolved_status"],
              "awaiting_approval": after["awaiting_approval"], "approved": after["approved"],
              "duplicates_by_connector": conn_counts, "app_db": "postgresql" if db.dialect == "postgresql" else "sqlite",
              "dagster_instance": "sqlite (persistent DAGSTER_HOME)"}
    ok = (killed and result["lost"] == 0 and result["duplicate_effects"] == 0 and rex and rex["success"]
          and after["in_progress"] == 0)
    result["meets_target"] = bool(ok)
    if not ok:
        fp.say(f"child log tail:\n{log.read_text(errors='replace')[-3000:]}")
    print(json.dumps(result), flush=True)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
