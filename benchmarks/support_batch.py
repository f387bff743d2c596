"""Support-flow throughput benchmark: N generated tickets (default 10,000) for ONE day partition
through ``support_flow_job`` via Dagster, and the same stage functions in a bare Python loop, in
the same process.

    .venv/bin/python benchmarks/support_batch.py [--tickets N] [--day YYYY-MM-DD] [--seed S]
                                                 [--profile] [--keep DIR] [--cold-model]

Progress goes to stderr; the last line on stdout is one JSON object:

    {"benchmark": "support_batch", "tickets", "seconds", "tickets_per_s", "bare_seconds", "ratio",
     "peak_rss_mb", "target_tickets_per_s", "target_ratio", "meets_targets"}

``seconds`` is the Dagster run (execute_in_process on a persistent SQLite instance), ``bare_seconds``
the loop over the same eight stage functions, ``ratio`` = seconds / bare_seconds.

Setup (never timed): the triage model is trained once into <work>/train; every measured path gets
its own fresh ORCH_HOME with an empty app database and connectors database, the promoted model's
registry row copied in (pointing at the same model file), and the N messages submitted to its
inbox table. A 50-message warm-up of both paths (another day, throwaway databases) runs first so
imports, the loaded model and the Dagster instance are warm for both measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import shutil
import sys
import tempfile
import time
import warnings
from pathlib import Path

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flow_process import generate_messages, require_dataset, say, work_env  # noqa: E402

TARGET_TICKETS_PER_S = 1000
TARGET_RATIO = 1.15
WARMUP_TICKETS = 50
WARMUP_DAY = "2026-11-19"
QUIET = {"loggers": {"console": {"config": {"log_level": "WARNING"}}}}


# --- environment per path ------------------------------------------------------------------

def use_home(home: Path) -> dict[str, str]:
    """Point every resource at a fresh home: app DB, connectors DB, empty inbox folder."""
    from orch_project.defs.resources import reset_process_caches

    reset_process_caches(keep_models=True)  # the loaded model stays warm for both paths
    home.mkdir(parents=True, exist_ok=True)
    (home / "inbox").mkdir(exist_ok=True)  # empty: intake reads the inbox table only
    return work_env(home)


def train_model(work: Path, instance) -> list[dict]:
    """Train once; return the promoted registry row(s) to copy into every fresh app database."""
    import sqlalchemy as sa

    from orch_project.definitions import defs
    from orch_project.lib.store import Database, models

    env = use_home(work / "train")
    t0 = time.perf_counter()
    no_stand_in = {"ops": {"triage_model": {"config": {"allow_generated_sample": False}}}}  # BANKING77 only
    res = defs.resolve_job_def("train_triage_model_job").execute_in_process(
        instance=instance, run_config={**QUIET, **no_stand_in}, raise_on_error=False)
    if not res.success:
        raise SystemExit("training the triage model failed")
    with Database(env["ORCH_DATABASE_URL"]).begin() as conn:
        rows = [dict(r) for r in conn.execute(
            sa.select(models).where(models.c.task == "triage", models.c.status == "promoted")).mappings()]
    if not rows:
        raise SystemExit("training finished but no triage model was promoted")
    say(f"    model {rows[0]['version']} trained in {time.perf_counter() - t0:.1f} s -> {rows[0]['path']}")
    return rows


def prepare(home: Path, model_rows: list[dict], messages: list[dict]) -> str:
    """Fresh home with the model registered and the messages in the inbox table (not timed)."""
    from orch_project.lib.intake import submit_to_table
    from orch_project.lib.llm.registry import promoted_model_path
    from orch_project.lib.settings import Settings
    from orch_project.lib.store import Database, models

    if home.exists():
        shutil.rmtree(home)
    env = use_home(home)
    Settings.from_env().ensure_dirs()
    db = Database(env["ORCH_DATABASE_URL"])  # creates and migrates the schema
    with db.begin() as conn:
        conn.execute(models.insert(), model_rows)
    if promoted_model_path(db, "triage")[0] is None:
        raise SystemExit(f"model registration failed in {home}")
    added = submit_to_table(db, "support", messages, "benchmark")
    if added != len(messages):
        raise SystemExit(f"only {added} of {len(messages)} messages reached the inbox table in {home}")
    return env["ORCH_DATABASE_URL"]


# --- the two measured paths ------------------------------------------------------------------

def run_bare(day: str, cold_model: bool) -> tuple[float, dict[str, float]]:
    """The eight stage functions in order, with the objects the assets would build."""
    from orch_project.defs.resources import AppDatabase, Connectors, LLMGateway
    from orch_project.defs.support import logic
    from orch_project.lib.llm import model_cache
    from orch_project.defs.support.flow import CFG, SPEC
    from orch_project.lib.pipeline import StageEnv
    from orch_project.lib.settings import Settings
    from orch_project.lib.telemetry import get_logger

    if cold_model:
        model_cache.clear()
    llm = LLMGateway(provider=os.environ.get("ORCH_LLM_PROVIDER", "local"))
    stages: dict[str, float] = {}
    t_start = time.perf_counter()

    def timed(name, fn, *args):
        t = time.perf_counter()
        rep = fn(*args)
        stages[name] = time.perf_counter() - t
        return rep

    s = Settings.from_env()
    db = AppDatabase().database()
    env = StageEnv(db, logic.FLOW, [day], run_id="bare", attempt=1, logger=get_logger(s.logs_dir))

    timed("intake", logic.intake_stage, env, CFG, s.inbox_dir, s.pii_salt)
    timed("triage", lambda: logic.triage_stage(env, CFG, llm.gateway(env.db, SPEC, run_id=env.run_id)))
    timed("assignment", logic.assign_stage, env, CFG)
    timed("knowledge", logic.knowledge_stage, env, CFG)
    timed("draft", lambda: logic.draft_stage(env, CFG, llm.gateway(env.db, SPEC, run_id=env.run_id)))
    timed("approval_gate", logic.approval_gate_stage, env, CFG)
    timed("actions", lambda: logic.actions_stage(env, CFG, Connectors().client()))
    timed("survey", lambda: logic.survey_stage(env, CFG, Connectors().client()))
    return time.perf_counter() - t_start, stages


def run_dagster(instance, day: str, cold_model: bool, profile: bool) -> tuple[float, dict[str, float]]:
    from orch_project.definitions import defs
    from orch_project.lib.llm import model_cache

    if cold_model:
        model_cache.clear()
    job = defs.resolve_job_def("support_flow_job")
    prof = None
    if profile:
        import cProfile

        prof = cProfile.Profile()
        prof.enable()
    t0 = time.perf_counter()
    result = job.execute_in_process(instance=instance, partition_key=day, run_config=QUIET, raise_on_error=False)
    seconds = time.perf_counter() - t0
    if prof is not None:
        prof.disable()
    if not result.success:
        raise SystemExit(f"support_flow_job run {result.run_id} failed")
    steps = {}
    for st in instance.get_run_step_stats(result.run_id):
        if st.start_time is not None and st.end_time is not None:
            steps[st.step_key] = st.end_time - st.start_time
    if prof is not None:
        import pstats

        say("\n--- cProfile of the Dagster run: top 25 by cumulative time ---")
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(25)
        say("--- the same, orch_project functions only ---")
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats("orch_project", 25)
        say("--- top 25 by own (tottime) time ---")
        pstats.Stats(prof, stream=sys.stderr).sort_stats("tottime").print_stats(25)
        out = Path(os.environ["ORCH_HOME"]) / "dagster_run.prof"
        prof.dump_stats(str(out))
        say(f"--- raw profile: {out} (python -m pstats) ---")
    return seconds, steps


def validate(label: str, url: str, n: int) -> dict:
    from orch_project.lib.pipeline import status_counts
    from orch_project.lib.store import Database

    st = status_counts(Database(url), "support")
    states = st["states"]
    done = states.get("resolved", 0) + states.get("awaiting_approval", 0) + states.get("dead_lettered", 0)
    say(f"    {label:8s} received {st['received']}, resolved {states.get('resolved', 0)}, awaiting_approval "
        f"{states.get('awaiting_approval', 0)}, dead_lettered {states.get('dead_lettered', 0)}, "
        f"duplicate {states.get('duplicate', 0)}, in_progress {st['in_progress']}, lost {st['lost']}")
    problems = []
    if st["received"] != n:
        problems.append(f"received {st['received']} != {n}")
    if st["lost"] != 0:
        problems.append(f"lost {st['lost']}")
    if done != n:
        problems.append(f"resolved + awaiting_approval + dead_lettered = {done} != {n}")
    if problems:
        say(f"FAIL {label}: " + "; ".join(problems))
        sys.exit(1)
    return states


# --- main --------------------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tickets", type=int, default=10_000, help="messages in the partition (default 10000)")
    ap.add_argument("--day", default="2026-11-20", help="the day partition (default 2026-11-20)")
    ap.add_argument("--seed", type=int, default=11, help="sample-data seed (default 11)")
    ap.add_argument("--profile", action="store_true",
                    help="cProfile the Dagster run; top 25 functions by cumulative time to stderr")
    ap.add_argument("--keep", metavar="DIR", help="work in DIR and keep it (default: a temporary directory)")
    ap.add_argument("--cold-model", action="store_true",
                    help="drop the cached triage model before each measured path (both then include the load)")
    args = ap.parse_args(argv)
    if args.tickets <= 0:
        ap.error("--tickets must be positive")
    if args.day == WARMUP_DAY:
        ap.error(f"--day must differ from the warm-up day {WARMUP_DAY}")

    tmp = None
    if args.keep:
        work = Path(args.keep).resolve()
        work.mkdir(parents=True, exist_ok=True)
    else:
        tmp = tempfile.TemporaryDirectory(prefix="support_batch_")
        work = Path(tmp.name)
    try:
        return run(args, work)
    finally:
        from orch_project.lib.store import dispose_engines

        dispose_engines()
        if tmp is not None:
            tmp.cleanup()


def run(args, work: Path) -> int:
    t_all = time.perf_counter()
    say(f"support_batch: {args.tickets} tickets, day {args.day}, seed {args.seed}, work dir {work}")
    require_dataset("banking77")  # the model and the messages: exit with where to point ORCH_DATA_DIR
    say("importing the code location...")
    import dagster as dg

    from orch_project.definitions import defs  # noqa: F401  (import cost outside every measurement)
    from orch_project.lib.settings import REPO_DIR

    # A persistent SQLite instance configured like the project's own (dagster.yaml: telemetry off,
    # the "llm" pool limit, ...), in the work dir.
    dagster_home = work / "dagster_home"
    dagster_home.mkdir(parents=True, exist_ok=True)
    if (REPO_DIR / "dagster.yaml").exists():
        shutil.copyfile(REPO_DIR / "dagster.yaml", dagster_home / "dagster.yaml")
    instance = dg.DagsterInstance.local_temp(tempdir=str(dagster_home))

    say("training the triage model (once)...")
    model_rows = train_model(work, instance)

    say(f"generating {args.tickets} messages for {args.day} (+{WARMUP_TICKETS} warm-up for {WARMUP_DAY})...")
    t0 = time.perf_counter()
    messages = generate_messages(args.tickets, seed=args.seed, days=[args.day])
    warm = generate_messages(WARMUP_TICKETS, seed=args.seed + 1, days=[WARMUP_DAY], id_prefix="warm")
    say(f"    generated in {time.perf_counter() - t0:.1f} s")

    say("warm-up: both paths on the small batch (throwaway databases)...")
    prepare(work / "warmup_bare", model_rows, warm)
    wb, _ = run_bare(WARMUP_DAY, cold_model=False)
    prepare(work / "warmup_dagster", model_rows, warm)
    wd, _ = run_dagster(instance, WARMUP_DAY, cold_model=False, profile=False)
    say(f"    warm-up bare {wb:.2f} s, dagster {wd:.2f} s")

    say("preparing the bare-loop databases...")
    bare_url = prepare(work / "bare", model_rows, messages)
    say("bare loop: running...")
    bare_s, bare_stages = run_bare(args.day, args.cold_model)
    say(f"bare loop: {bare_s:.3f} s ({args.tickets / bare_s:.0f} tickets/s)")

    say("preparing the Dagster databases...")
    dag_url = prepare(work / "dagster", model_rows, messages)
    say("dagster: running support_flow_job" + (" under cProfile..." if args.profile else "..."))
    dag_s, steps = run_dagster(instance, args.day, args.cold_model, args.profile)
    say(f"dagster: {dag_s:.3f} s ({args.tickets / dag_s:.0f} tickets/s)")

    say("per stage (s):        bare   dagster step")
    from orch_project.defs.support.flow import SPEC
    from orch_project.kit import stage_asset_key

    for stage in SPEC.stage_names:
        step = stage_asset_key(SPEC, stage).to_user_string()
        d = steps.get(step)
        say(f"    {stage:14s} {bare_stages.get(stage, float('nan')):8.3f} {d if d is not None else float('nan'):8.3f}")
    say(f"    {'sum':14s} {sum(bare_stages.values()):8.3f} {sum(steps.values()):8.3f}"
        f"   (dagster run overhead outside steps: {dag_s - sum(steps.values()):.3f})")

    say("validating...")
    bare_states = validate("bare", bare_url, args.tickets)
    dag_states = validate("dagster", dag_url, args.tickets)
    if bare_states != dag_states:
        say(f"    note: final states differ between the paths: bare {bare_states} vs dagster {dag_states}")

    peak_rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0
    tps = args.tickets / dag_s
    ratio = dag_s / bare_s
    out = {
        "benchmark": "support_batch",
        "tickets": args.tickets,
        "seconds": round(dag_s, 3),
        "tickets_per_s": round(tps, 1),
        "bare_seconds": round(bare_s, 3),
        "ratio": round(ratio, 3),
        "peak_rss_mb": round(peak_rss_mb, 1),
        "target_tickets_per_s": TARGET_TICKETS_PER_S,
        "target_ratio": TARGET_RATIO,
        "meets_targets": bool(tps >= TARGET_TICKETS_PER_S and ratio <= TARGET_RATIO),
    }
    if args.profile:
        out["profiled"] = True  # cProfile overhead is inside "seconds"
    say(f"done in {time.perf_counter() - t_all:.1f} s total; targets "
        f"{'met' if out['meets_targets'] else 'NOT met'} (>= {TARGET_TICKETS_PER_S} tickets/s, "
        f"ratio <= {TARGET_RATIO})")
    print(json.dumps(out), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
