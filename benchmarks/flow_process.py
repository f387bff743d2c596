"""Shared by the process-level chaos drills (drill_sigkill.py, drill_pg_restart.py) and their test.

As a script it is the drills' child process: one run of ``support_flow_job`` on the persistent Dagster
instance of ``$DAGSTER_HOME`` (``DagsterInstance.get()``), with the app database of ``ORCH_DATABASE_URL``:

    python benchmarks/flow_process.py run --day 2026-11-20
    python benchmarks/flow_process.py reexecute --run-id RUN_ID      # ReexecutionOptions.from_failure

``run`` is ``dagster.execute_job`` on the reconstructable job with the partition tag (what
``dagster job execute --tags '{"dagster/partition": ...}'`` does). ``reexecute`` first marks a parent
run that is still STARTED/STARTING as failed (what the daemon's run monitoring does for a run whose
worker died: a SIGKILLed process cannot report its own failure), then re-executes it from failure, so
only the steps that did not succeed run again. The last stdout line is ``{"run_id", "status", "success"}``.

As a module it offers the drills' setup: the environment of a fresh work dir, training and promoting
the triage model, submitting generated messages, and the figures (lost, duplicate effects). Both the
model and the generated messages need BANKING77 in the data directory (``$ORCH_DATA_DIR/banking77``,
default ``../shared/data``); without it the benchmarks exit with a message saying where to point it.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
REPO = Path(__file__).resolve().parents[1]
QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}
FLOW_DONE = ("resolved", "awaiting_approval", "approved")
PAST_TRIAGE = ("triaged", "assigned", "grounded", "drafted", "awaiting_approval", "approved", "resolved")


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def require_dataset(name: str = "banking77") -> Path:
    """The public dataset's folder (``orch_project.lib.datasets``); exit with the DatasetMissing message
    (which dataset, where it looked, to set ORCH_DATA_DIR) when it is not there."""
    from orch_project.lib import datasets

    try:
        return datasets.dataset_dir(name)
    except datasets.DatasetMissing as exc:
        raise SystemExit(f"benchmark needs a public dataset: {exc}") from None


def banking77(split: str = "train") -> tuple[list[str], list[str]]:
    """BANKING77 texts and intents, or exit like ``require_dataset``."""
    from orch_project.lib import datasets

    try:
        return datasets.read_banking77(split)
    except datasets.DatasetMissing as exc:
        raise SystemExit(f"benchmark needs a public dataset: {exc}") from None


def generate_messages(n: int, **kwargs) -> list[dict]:
    """The support sample generator's messages (BANKING77 core sentences), or exit like ``require_dataset``."""
    from orch_project.defs.support.sample_data import generate_messages as generate
    from orch_project.lib import datasets

    try:
        return generate(n, **kwargs)
    except datasets.DatasetMissing as exc:
        raise SystemExit(f"benchmark needs a public dataset: {exc}") from None


# --- child process ---------------------------------------------------------------------------------

def support_flow_job():
    """The job, for ``dagster.reconstructable`` (execute_job needs a reconstructable target)."""
    from orch_project.definitions import defs

    return defs.resolve_job_def("support_flow_job")


def orders_ops_job():
    """The order flow's ops job (advance: every waiting order), for the order drills."""
    from orch_project.definitions import defs

    return defs.resolve_job_def("orders_ops_job")


JOBS = {"support_flow_job": support_flow_job, "orders_ops_job": orders_ops_job}


def _child(argv: list[str]) -> int:
    ap = argparse.ArgumentParser()
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    r.add_argument("--day", default=None, help="the partition (a partitioned job)")
    r.add_argument("--job", default="support_flow_job", choices=sorted(JOBS))
    x = sub.add_parser("reexecute")
    x.add_argument("--run-id", required=True)
    x.add_argument("--job", default="support_flow_job", choices=sorted(JOBS))
    args = ap.parse_args(argv)

    import dagster as dg
    from dagster._core.storage.dagster_run import DagsterRunStatus

    recon = dg.reconstructable(JOBS[args.job])
    with dg.DagsterInstance.get() as instance:
        if args.cmd == "run":
            res = dg.execute_job(recon, instance, run_config=QUIET,
                                 tags={"dagster/partition": args.day} if args.day else None)
        else:
            parent = instance.get_run_by_id(args.run_id)
            if parent is None:
                raise SystemExit(f"run {args.run_id} not found in {os.environ.get('DAGSTER_HOME')}")
            if parent.status in (DagsterRunStatus.STARTED, DagsterRunStatus.STARTING, DagsterRunStatus.NOT_STARTED):
                instance.report_run_failed(parent, message="run worker process died (drill); marked failed")
            opts = dg.ReexecutionOptions.from_failure(args.run_id, instance)
            # execute_job does not carry the parent's tags or config over: the partition tag is needed
            tags = {k: v for k, v in parent.tags.items() if not k.startswith("dagster/") or "partition" in k}
            res = dg.execute_job(recon, instance, run_config=parent.run_config, tags=tags,
                                 reexecution_options=opts)
        run = instance.get_run_by_id(res.run_id)
        print(json.dumps({"run_id": res.run_id, "status": run.status.value, "success": res.success}), flush=True)
        return 0 if res.success else 1


# --- drill setup (parent process) ---------------------------------------------------------------------

def work_env(work: Path, **extra: str) -> dict[str, str]:
    """Point the process at a work dir (os.environ): ORCH_HOME, app + connector databases (SQLite in
    ``work``), the inbox folder, plus ``extra``; ORCH_MODELS_DIR / LOGS_DIR / REPORTS_DIR are unset so
    everything stays under ``work``. Returns the variables set."""
    env = {"ORCH_HOME": str(work), "ORCH_DATABASE_URL": f"sqlite:///{work / 'app.sqlite'}",
           "ORCH_CONNECTORS_URL": f"sqlite:///{work / 'connectors.sqlite'}", "ORCH_INBOX_DIR": str(work / "inbox"),
           **extra}
    os.environ.update(env)
    for var in ("ORCH_MODELS_DIR", "ORCH_LOGS_DIR", "ORCH_REPORTS_DIR"):
        os.environ.pop(var, None)
    return env


def drill_env(work: Path, database_url: str | None = None, dagster_yaml: str = "dagster.yaml",
              extra: dict[str, str] | None = None) -> dict[str, str]:
    """Environment of a fresh work dir: ORCH_HOME, app + connector databases, empty inbox, DAGSTER_HOME."""
    dh = work / "dagster_home"
    dh.mkdir(parents=True, exist_ok=True)
    shutil.copyfile(REPO / dagster_yaml, dh / "dagster.yaml")
    env = work_env(work, **({"ORCH_DATABASE_URL": database_url} if database_url else {}),
                   DAGSTER_HOME=str(dh), PYTHONWARNINGS="ignore", **(extra or {}))
    from orch_project.defs.resources import reset_process_caches

    reset_process_caches()
    return env


def train_and_promote(db, models_dir: Path) -> str:
    """Train the triage model on BANKING77 (about 20-25 s) and register + promote it in ``db``."""
    from orch_project.lib.llm import triage_model as tm

    texts, labels = banking77("train")
    model = tm.train(texts, labels)
    register_and_promote(db, model.version, model.save(models_dir), model.metrics)
    return model.version


def register_and_promote(db, version: str, path, metrics: dict) -> None:
    """Register a trained triage model in ``db`` and promote it (the drills' setup)."""
    from orch_project.lib.llm import registry

    registry.register(db, task="triage", version=version, path=path, train_data_hash=metrics["train_data_hash"],
                      code_version=metrics["code_version"], metrics=metrics)
    registry.promote(db, version, actor="drill", reason="drill setup")


def submit(db, n: int, day: str, seed: int) -> int:
    from orch_project.defs.support.logic import FLOW
    from orch_project.lib.intake import submit_to_table

    return submit_to_table(db, FLOW, generate_messages(n, seed=seed, days=[day]), "drill")


def start_child(cmd: list[str], log: Path) -> subprocess.Popen:
    fh = open(log, "ab")
    return subprocess.Popen([sys.executable, str(Path(__file__)), *cmd], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=fh, env=os.environ.copy(), start_new_session=True)


def child_result(proc: subprocess.Popen, timeout: float = 600) -> dict | None:
    out, _ = proc.communicate(timeout=timeout)
    lines = out.decode(errors="replace").strip().splitlines()
    try:
        return json.loads(lines[-1]) if lines else None
    except json.JSONDecodeError:
        return None


def progress(db) -> dict:
    """Item statuses and outbox states of the app database (what the drills poll)."""
    import sqlalchemy as sa

    from orch_project.lib.store import items, outbox

    with db.begin() as conn:
        st = dict(conn.execute(sa.select(items.c.status, sa.func.count()).group_by(items.c.status)).all())
        ob = dict(conn.execute(sa.select(outbox.c.status, sa.func.count()).group_by(outbox.c.status)).all())
    return {"items": {k: int(v) for k, v in st.items()}, "outbox": {k: int(v) for k, v in ob.items()}}


def mid_run(items: dict) -> bool:
    """Item statuses (``progress(db)["items"]``) of a run in the middle: some items past triage, none resolved."""
    past = sum(v for k, v in items.items() if k in PAST_TRIAGE)
    return past > 0 and items.get("resolved", 0) == 0


def latest_run_id(instance) -> str | None:
    runs = instance.get_runs(limit=1)
    return runs[0].run_id if runs else None


def unfinished_steps(instance, run_id: str) -> list[str]:
    """Steps of a run that started but never succeeded (where the run was when it died)."""
    from dagster import DagsterEventType

    started, done = [], set()
    for rec in instance.get_records_for_run(run_id, limit=100_000).records:
        ev = rec.event_log_entry.dagster_event
        if ev is None or ev.step_key is None:
            continue
        if ev.event_type == DagsterEventType.STEP_START:
            started.append(ev.step_key)
        elif ev.event_type in (DagsterEventType.STEP_SUCCESS, DagsterEventType.STEP_FAILURE):
            done.add(ev.step_key)
    return [s for s in started if s not in done]


def figures(db, n_items: int) -> dict:
    from orch_project.defs.resources import Connectors
    from orch_project.defs.support import logic  # noqa: F401  (registers the flow spec status_counts reads)
    from orch_project.lib.pipeline import status_counts

    st = status_counts(db, "support")
    states = st["states"]
    dups = Connectors().client().duplicates()
    resolved = sum(states.get(s, 0) for s in FLOW_DONE)
    return {"items": n_items, "received": st["received"], "resolved": resolved,
            "dead_lettered": states.get("dead_lettered", 0), "lost": st["lost"],
            "duplicate_effects": sum(dups.values()), "resolved_status": states.get("resolved", 0),
            "awaiting_approval": states.get("awaiting_approval", 0), "approved": states.get("approved", 0),
            "in_progress": st["in_progress"], "dlq_open": st["dlq_open"], "states": states}


def wait_until(pred, timeout: float, interval: float = 0.02):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = pred()
        if v:
            return v
        time.sleep(interval)
    return None


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(_child(sys.argv[1:]))
