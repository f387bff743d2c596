"""The leads flow's figures: leads/s through the flow from one CSV import, and the governed scorer's train
time and held-out figures on the generated history.

    .venv/bin/python benchmarks/leads.py [--rows 10000] [--history 9000]

1. scorer: ``lead_score_model``'s own training function (orch_project/defs/leads/model.py) on a generated
   history of ``--history`` leads (defs/leads/history_data.py), the brief's exclusions (the sales team's
   qualification columns) and its fixed stratified holdout: train seconds, AUC, log loss, Brier, lift.
2. flow: a generated import of ``--rows`` leads (people, consent flags and the scorer's columns) dropped in the
   leads inbox of a fresh ORCH_HOME, then one ``leads_flow_job`` run of its partition in process on a
   Dagster test instance (intake, match, enrich, score, qualify, first touch, review gate, CRM upsert,
   engage) with the model from part 1 promoted. Leads/s over the whole run, milliseconds per stage, and the
   invariants: nothing lost (received == accounted), no duplicate effect, no message to a lead that may
   not be e-mailed.

Progress goes to stderr; the last line on stdout is one JSON object. Compare figures within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--rows", type=int, default=10_000, help="leads in the CSV import")
    ap.add_argument("--history", type=int, default=9000, help="leads in the generated training history")
    args = ap.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        home = Path(tmp) / "orch"
        os.environ.update(ORCH_HOME=str(home), ORCH_DATABASE_URL=f"sqlite:///{home / 'app.sqlite'}",
                          ORCH_CONNECTORS_URL=f"sqlite:///{home / 'connectors.sqlite'}",
                          ORCH_INBOX_DIR=str(home / "inbox"), DAGSTER_HOME=str(Path(tmp) / "dagster"))
        (Path(tmp) / "dagster").mkdir()
        return run(args, home)


def run(args, home: Path) -> int:
    import dagster as dg
    import sqlalchemy as sa

    from orch_project.defs.leads import logic, model as lm, sample_data as sd
    from orch_project.defs.resources import _embedded, reset_process_caches
    from orch_project.definitions import defs
    from orch_project.lib.connectors.embedded import messages
    from orch_project.lib.llm import registry
    from orch_project.lib.pipeline import status_counts
    from orch_project.lib.settings import Settings
    from orch_project.lib.store import Database, items

    reset_process_caches()
    s = Settings.from_env().ensure_dirs()
    db = Database(s.database_url)
    cfg = logic.CFG
    cfg.settings.history_rows = args.history  # the brief's 4000 is for the demo; the figures use a larger history
    say(f"training the scorer on a generated history of {args.history} leads ...")
    cand = lm.train_candidate(cfg, lm.LeadScoreTrainingConfig())
    registry.register(db, task="lead_score", version=cand.version, path=cand.path, train_data_hash=cand.train_data_hash,
                      code_version=cand.code_version, metrics=cand.metrics)
    registry.promote(db, cand.version, actor="benchmark", reason="benchmark")
    m = cand.metrics
    say(f"  {cand.version}: holdout AUC {m['auc']}, {m['train_seconds']} s")

    from orch_project.defs.leads.flow import SPEC

    folder = SPEC.inbox_dir(s.inbox_dir)
    folder.mkdir(parents=True, exist_ok=True)
    say(f"generating an import of {args.rows} leads ...")
    path = sd.generate_import(folder / f"bench-import-{args.rows}.csv", args.rows)
    day = datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc).date().isoformat()
    job = defs.resolve_job_def("leads_flow_job")
    say(f"running leads_flow_job for {day} ...")
    with dg.instance_for_test() as instance:
        t0 = time.perf_counter()
        result = job.execute_in_process(instance=instance, partition_key=day, raise_on_error=False,
                                        run_config={"loggers": {"console": {"config": {"log_level": "ERROR"}}}})
        seconds = time.perf_counter() - t0
        stage_ms = {e.asset_key.path[-1].removeprefix("leads_"): round(float(e.materialization.metadata["stage_ms"].value), 1)
                    for e in result.get_asset_materialization_events() if "stage_ms" in e.materialization.metadata}
        checks = {e.asset_check_key.name: e.passed for e in result.get_asset_check_evaluations()}
    st = status_counts(db, "leads")
    client = _embedded(s.connectors_url)
    duplicates = sum(client.duplicates("leads").values())
    with db.begin() as conn:
        data = {iid: d for iid, d in conn.execute(sa.select(items.c.item_id, items.c.data).where(items.c.flow == "leads"))}
    token_of = {d["tokens"].get("EMAIL_ADDRESS"): d for d in data.values() if d.get("tokens")}
    with client.db.begin() as conn:
        recipients = conn.execute(sa.select(messages.c.recipient).where(messages.c.idempotency_key.like("leads:%"),
                                                                        messages.c.kind != "escalation")).scalars().all()
    consent_violations = sum(1 for r in recipients if r in token_of and not logic.may_email(token_of[r])[0])
    from collections import Counter

    tiers = Counter(d.get("tier") for d in data.values() if d.get("tier"))
    waiting_for = Counter(r for d in data.values() for r in d.get("approval_reasons") or [])
    out = {"benchmark": "leads", "rows": args.rows, "run_success": result.success, "seconds": round(seconds, 2),
           "leads_per_s": round(args.rows / seconds, 1), "stage_ms": stage_ms, "states": st["states"],
           "tiers": dict(tiers), "review_reasons": dict(waiting_for), "lost": st["lost"], "duplicate_effects": duplicates, "consent_violations": consent_violations,
           "messages": len(recipients), "checks_passed": all(checks.values()) if checks else None,
           "scorer": {"version": cand.version, "history": args.history, "train_seconds": m["train_seconds"],
                      "auc": m["auc"], "log_loss": m["log_loss"], "brier": m["brier"],
                      "lift_top_decile": m["lift_top_decile"], "n_holdout": m["n_holdout"]}}
    say(f"{args.rows} leads in {seconds:.1f} s ({out['leads_per_s']}/s); lost {st['lost']}, duplicate effects "
        f"{duplicates}, consent violations {consent_violations}")
    print(json.dumps(out))
    return 0 if result.success and st["lost"] == 0 and duplicates == 0 and consent_violations == 0 else 1


if __name__ == "__main__":
    raise SystemExit(main())
