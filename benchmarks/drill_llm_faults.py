"""Chaos drill (a): LLM faults. N generated items (default 2,000) of one day partition through the
support flow's stages (intake .. survey, the stage functions in a bare loop like
benchmarks/support_batch.py) with ORCH_LLM_PROVIDER=openai against the fake OpenAI server (a separate
process) failing 20% of calls with HTTP 500, 10% with 429 + Retry-After 0.2 s, 5% past the per-call
timeout (1 s; the server hangs 3 s) and 5% with a malformed JSON body.

    .venv/bin/python benchmarks/drill_llm_faults.py [--items N] [--seed S] [--timeout-s 1] [--max-retries R]
                                                    [--no-replay]

The drill's routing override keeps only the OpenAI candidates (the embedded provider is excluded, so
the figures measure the OpenAI path), switches caches off (every item calls the server), sets the
per-call timeout, and uses a large token budget (budgets are not under test). Retries are the SDK's
(routing.yaml ``max_retries``), then the gateway falls back to the other OpenAI model, malformed
bodies get one repair attempt; an item whose calls still fail is dead-lettered with the reason.

Passes: (1) the flow once; (2) the same stages again (a re-execution: nothing new, no duplicate
effect); (3) unless --no-replay, ``orch dlq replay --all`` (lib.dlq.replay_all) and the stages once
more, so replayed items are reprocessed. Figures before and after the replay are reported separately.

"resolved" counts the items that completed the flow without dead-lettering: status resolved, or
awaiting_approval / approved (outcomes of the flow: the approval gate routed them to a person or
approved them by policy); those three are also reported separately. ``lost`` = received - accounted
(lib.pipeline.status_counts), ``duplicate_effects`` = EmbeddedConnectors.duplicates() summed.

Progress goes to stderr; the last line on stdout is one JSON object:

    {"drill": "llm_faults", "items", "resolved", "dead_lettered", "lost", "duplicate_effects",
     "resolved_rate", "seconds", ..., "before_replay": {...}, "reexecution": {...}}

Targets: lost 0, duplicate effects 0, resolved >= 99%.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from collections import Counter
from pathlib import Path

import yaml

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import flow_process as fp  # noqa: E402
from flow_process import say  # noqa: E402
from orch_project_tests import fake_openai  # noqa: E402

DAY = "2026-11-20"
TARGET_RESOLVED = 0.99
FAULTS = {"rate_500": 0.20, "rate_429": 0.10, "retry_after_s": 0.2, "rate_hang": 0.05, "hang_s": 3.0,
          "rate_malformed": 0.05}
INTERMEDIATE = ("received", "deferred", "triaged", "assigned", "grounded", "drafted")


def write_routing(src: Path, dst: Path, *, timeout_s: float, max_retries: int | None,
                  concurrency: int | None = None) -> dict:
    """routing.yaml with only the OpenAI candidates, no caches, a short per-call timeout."""
    routing = yaml.safe_load(src.read_text())
    routing["timeout_s"] = timeout_s
    if max_retries is not None:
        routing["max_retries"] = max_retries
    if concurrency:
        routing["concurrency"] = concurrency
    for task in routing["tasks"].values():
        task["timeout_s"] = timeout_s
        task["cache"] = {"exact": False, "semantic": False}
        task["candidates"] = [c for c in task["candidates"] if c["provider"] == "openai"]
        if not task["candidates"]:
            raise SystemExit("routing.yaml has a task without OpenAI candidates")
    dst.write_text(yaml.safe_dump(routing))
    return routing


def figures(db, n_items: int) -> dict:
    """flow_process.figures plus the resolved rate, the items left mid-flow and why items failed."""
    import sqlalchemy as sa

    from orch_project.lib.store import dlq, items, llm_calls

    fig = fp.figures(db, n_items)
    with db.begin() as conn:
        reasons = Counter()
        for stage, err, reason in conn.execute(sa.select(dlq.c.stage, dlq.c.error_type, dlq.c.reason)
                                               .where(dlq.c.status == "open")):
            # the reason without item-specific detail, to group them
            reasons[f"{stage}/{err}: {reason.split(';')[0][:90]}"] += 1
        deferred = Counter()
        for data, stage in conn.execute(sa.select(items.c.data, items.c.stage).where(items.c.status == "deferred")):
            note = (data or {}).get("deferred") or {}
            deferred[f"after {stage}/{note.get('error')}: {str(note.get('reason'))[:80]}"] += 1
        opened = dict(conn.execute(sa.select(llm_calls.c.model, sa.func.count()).where(
            llm_calls.c.error == "circuit_open").group_by(llm_calls.c.model)).all())
    states = fig.pop("states")
    del fig["in_progress"]
    return {**fig, "resolved_rate": round(fig["resolved"] / n_items, 4) if n_items else 0.0,
            "intermediate": {s: states[s] for s in INTERMEDIATE if states.get(s)},
            "dead_letter_reasons": dict(reasons.most_common(8)),
            "deferred_reasons": dict(deferred.most_common(5)), "calls_refused_circuit_open": opened}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=2000)
    ap.add_argument("--seed", type=int, default=11, help="message generator and fault RNG seed")
    ap.add_argument("--timeout-s", type=float, default=1.0, help="per-call timeout of the OpenAI provider")
    ap.add_argument("--max-retries", type=int, default=None, help="SDK retries (default: routing.yaml's)")
    ap.add_argument("--concurrency", type=int, default=None, help="default: routing.yaml's")
    ap.add_argument("--no-replay", action="store_true", help="skip the DLQ replay pass")
    args = ap.parse_args(argv)
    if args.items <= 0:
        ap.error("--items must be positive")
    with tempfile.TemporaryDirectory(prefix="drill_llm_faults_") as tmp:
        work = Path(tmp)
        fp.work_env(work, ORCH_LLM_PROVIDER="openai")
        with fake_openai.spawn(seed=args.seed, **FAULTS) as base_url:
            return run(args, work, base_url)


def run(args, work: Path, base_url: str) -> int:
    import sqlalchemy as sa

    from orch_project.defs.resources import Connectors, LLMGateway, reset_process_caches
    from orch_project.defs.support import logic
    from orch_project.defs.support.flow import CFG, SPEC
    from orch_project.lib import dlq as dlq_lib
    from orch_project.lib.intake import submit_to_table
    from orch_project.lib.llm.gateway import Budget
    from orch_project.lib.pipeline import StageEnv
    from orch_project.lib.settings import Settings
    from orch_project.lib.store import Database, llm_calls

    reset_process_caches()
    s = Settings.from_env().ensure_dirs()
    db = Database(s.database_url)
    msgs = fp.generate_messages(args.items, seed=args.seed, days=[DAY])  # BANKING77 sentences, or exit
    submitted = submit_to_table(db, logic.FLOW, msgs, "drill")
    routing_path = work / "routing.drill.yaml"
    routing = write_routing(CFG.routing_path, routing_path, timeout_s=args.timeout_s, max_retries=args.max_retries,
                            concurrency=args.concurrency)
    say(f"drill llm_faults: {submitted} items, faults {FAULTS}, timeout {args.timeout_s:g} s, "
        f"max_retries {routing['max_retries']}, candidates "
        f"{ {t: [c['model'] for c in p['candidates']] for t, p in routing['tasks'].items()} }, server {base_url}")
    llm = LLMGateway(provider="openai", openai_base_url=base_url, openai_api_key="sk-drill")
    connectors = Connectors().client()

    def run_stages(run_id: str) -> None:
        env = StageEnv(db, logic.FLOW, [DAY], run_id=run_id)

        def gateway():
            return llm.gateway(db, SPEC, run_id=run_id, routing_path=routing_path, budget=Budget(max_tokens_per_run=10**10, daily_token_cap=10**10))

        for name, fn in (("intake", lambda: logic.intake_stage(env, CFG, s.inbox_dir, s.pii_salt)),
                         ("triage", lambda: logic.triage_stage(env, CFG, gateway())),
                         ("assignment", lambda: logic.assign_stage(env, CFG)),
                         ("knowledge", lambda: logic.knowledge_stage(env, CFG)),
                         ("draft", lambda: logic.draft_stage(env, CFG, gateway())),
                         ("approval_gate", lambda: logic.approval_gate_stage(env, CFG)),
                         ("actions", lambda: logic.actions_stage(env, CFG, connectors)),
                         ("survey", lambda: logic.survey_stage(env, CFG, connectors))):
            t = time.perf_counter()
            rep = fn()
            say(f"    [{run_id}] {name:14s} {rep.n_in:5d} in  {dict(rep.outcomes)}  {time.perf_counter() - t:.2f} s")

    t0 = time.perf_counter()
    say("pass 1: the flow under faults")
    run_stages("drill-1")
    first_s = time.perf_counter() - t0
    before = figures(db, submitted)
    say(f"    -> {json.dumps(before)}")

    say("pass 2: re-execution of the same stages")
    run_stages("drill-2")
    reexec = figures(db, submitted)
    say(f"    -> duplicate effects {reexec['duplicate_effects']}, lost {reexec['lost']}")

    replay_info = None
    after = reexec
    if not args.no_replay and reexec["dlq_open"]:
        say("pass 3: DLQ replay --all, then the stages again")
        out = dlq_lib.replay_all(db, logic.FLOW, actor="drill")
        replay_info = {"replayed": out["replayed"], "not_replayable": out["not_replayable"]}
        say(f"    {out['message']}")
        run_stages("drill-3")
        after = figures(db, submitted)
    seconds = time.perf_counter() - t0

    with db.begin() as conn:  # every model call the gateway ledgered, by provider
        providers = dict(conn.execute(sa.select(llm_calls.c.provider, sa.func.count())
                                      .group_by(llm_calls.c.provider)).all())
    stats = fake_openai.requests_log(base_url)
    outcomes = Counter(r["outcome"] for r in stats["requests"])
    result = {"drill": "llm_faults", **{k: after[k] for k in ("items", "resolved", "dead_lettered", "lost",
                                                               "duplicate_effects", "resolved_rate")},
              "seconds": round(seconds, 1), "first_pass_seconds": round(first_s, 1),
              "resolved_status": after["resolved_status"], "awaiting_approval": after["awaiting_approval"],
              "approved": after["approved"], "intermediate": after["intermediate"],
              "before_replay": {k: before[k] for k in ("resolved", "dead_lettered", "lost", "duplicate_effects",
                                                        "resolved_rate", "intermediate", "dead_letter_reasons",
                                                        "deferred_reasons", "calls_refused_circuit_open")},
              "reexecution": {"duplicate_effects": reexec["duplicate_effects"], "lost": reexec["lost"],
                              "resolved": reexec["resolved"]},
              "replay": replay_info, "dead_letter_reasons_after_replay": after["dead_letter_reasons"],
              "server_requests": len(stats["requests"]), "server_outcomes": dict(sorted(outcomes.items())),
              "faults": FAULTS, "timeout_s": args.timeout_s, "max_retries": routing["max_retries"],
              "ledgered_calls_by_provider": providers, "target_resolved_rate": TARGET_RESOLVED}
    result["meets_target"] = (result["lost"] == 0 and result["duplicate_effects"] == 0
                              and reexec["duplicate_effects"] == 0 and result["resolved_rate"] >= TARGET_RESOLVED)
    result["meets_target_before_replay"] = (before["lost"] == 0 and before["duplicate_effects"] == 0
                                            and before["resolved_rate"] >= TARGET_RESOLVED)
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
