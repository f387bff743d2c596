"""LLM-bound throughput: the support flow's two model steps (triage, draft) for N items through the
LLM gateway and the real openai SDK against the fake OpenAI server (a separate process) answering
every call after a fixed latency. With latency L and the gateway's concurrency limit C the
provider-side ceiling is C / L calls per second; the benchmark reports the fraction reached.

    .venv/bin/python benchmarks/llm_concurrency.py [--items N] [--latency-ms 200] [--concurrency 16]

Caches are switched off for the measurement (every item makes one HTTP call per step). Progress
goes to stderr; the last line on stdout is one JSON object:

    {"benchmark": "llm_concurrency", "calls", "latency_ms", "concurrency", "calls_per_s",
     "limit_calls_per_s", "fraction_of_limit", "peak_in_flight", "triage_s", "draft_s"}

Only the two model steps are timed; intake, assignment and knowledge lookup run untimed between them.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
import warnings
from pathlib import Path

import yaml

warnings.filterwarnings("ignore")
sys.path.insert(0, str(Path(__file__).resolve().parent))

from flow_process import generate_messages, say, work_env  # noqa: E402
from orch_project_tests import fake_openai  # noqa: E402

DAY = "2026-11-20"
TARGET_FRACTION = 0.90


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--items", type=int, default=600, help="items (default 600 -> 1,200 calls)")
    ap.add_argument("--latency-ms", type=float, default=200.0)
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args(argv)
    if args.items <= 0 or args.concurrency <= 0 or args.latency_ms <= 0:
        ap.error("--items, --concurrency and --latency-ms must be positive")

    with tempfile.TemporaryDirectory(prefix="llm_concurrency_") as tmp:
        work = Path(tmp)
        work_env(work)
        with fake_openai.spawn(latency_ms=args.latency_ms) as base_url:
            return run(args, work, base_url)


def run(args, work: Path, base_url: str) -> int:
    from orch_project.defs.resources import LLMGateway
    from orch_project.defs.support import logic
    from orch_project.defs.support.flow import CFG, SPEC
    from orch_project.lib.intake import submit_to_table
    from orch_project.lib.llm.gateway import Budget
    from orch_project.lib.pipeline import StageEnv
    from orch_project.lib.settings import Settings
    from orch_project.lib.store import Database, llm_calls

    import sqlalchemy as sa

    say(f"llm_concurrency: {args.items} items, latency {args.latency_ms:g} ms, concurrency {args.concurrency}, "
        f"server {base_url}")
    s = Settings.from_env().ensure_dirs()
    db = Database(s.database_url)
    msgs = generate_messages(args.items, seed=args.seed, days=[DAY])
    submit_to_table(db, "support", msgs, "benchmark")

    routing = yaml.safe_load(CFG.routing_path.read_text())
    routing["concurrency"] = args.concurrency
    for task in routing["tasks"].values():
        task["cache"] = {"exact": False, "semantic": False}
    routing_path = work / "routing.yaml"
    routing_path.write_text(yaml.safe_dump(routing))

    llm = LLMGateway(provider="openai", openai_base_url=base_url, openai_api_key="sk-benchmark")
    env = StageEnv(db, logic.FLOW, [DAY], run_id="llm-concurrency")

    def gateway():
        return llm.gateway(db, SPEC, run_id=env.run_id, routing_path=routing_path, budget=Budget(max_tokens_per_run=10**9, daily_token_cap=10**9))

    logic.intake_stage(env, CFG, s.inbox_dir, s.pii_salt)
    say("triage ...")
    t0 = time.perf_counter()
    tri = logic.triage_stage(env, CFG, gateway())
    triage_s = time.perf_counter() - t0
    say(f"    {tri.n_in} items in {triage_s:.2f} s, outcomes {dict(tri.outcomes)}")
    logic.assign_stage(env, CFG)
    logic.knowledge_stage(env, CFG)
    say("draft ...")
    t0 = time.perf_counter()
    dra = logic.draft_stage(env, CFG, gateway())
    draft_s = time.perf_counter() - t0
    say(f"    {dra.n_in} items in {draft_s:.2f} s, outcomes {dict(dra.outcomes)}")

    with db.begin() as conn:
        calls = conn.execute(sa.select(sa.func.count()).select_from(llm_calls).where(
            llm_calls.c.run_id == env.run_id, llm_calls.c.provider == "openai")).scalar_one()
    stats = fake_openai.requests_log(base_url)
    if len(stats["requests"]) != calls:
        raise SystemExit(f"ledger has {calls} calls but the server saw {len(stats['requests'])}")
    limit = args.concurrency / (args.latency_ms / 1000.0)
    rate = calls / (triage_s + draft_s)
    result = {"benchmark": "llm_concurrency", "calls": calls, "latency_ms": args.latency_ms,
              "concurrency": args.concurrency, "calls_per_s": round(rate, 1), "limit_calls_per_s": round(limit, 1),
              "fraction_of_limit": round(rate / limit, 3), "peak_in_flight": stats["peak_in_flight"],
              "triage_s": round(triage_s, 2), "draft_s": round(draft_s, 2),
              "target_fraction": TARGET_FRACTION, "meets_target": rate / limit >= TARGET_FRACTION}
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
