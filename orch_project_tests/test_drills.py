"""Failure design: small chaos drills (LLM faults, malformed inputs) and dead-letter replay through the
CLI and the Dagster job - a replayed item is reprocessed by the next flow run and keeps its trace id."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import sqlalchemy as sa

from orch_project.lib.intake import submit_to_table
from orch_project.lib.store import audit, dlq, items

from .conftest import QUIET, run_flow, run_ops, sample_messages

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DAY = "2026-11-20"
BAD_ROW = {"id": "bad-no-body", "channel": "email", "received_at": f"{DAY}T09:00:00Z",
           "sender": {"email": "someone@example.com"}}


def _drill(script: str, *args: str) -> tuple[dict, str]:
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], cwd=REPO, capture_output=True,
                         text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = out.stdout.strip().splitlines()
    assert lines, f"{script} printed nothing (exit {out.returncode})\n{out.stderr[-3000:]}"
    return json.loads(lines[-1]), out.stderr


def test_llm_fault_drill_small():
    """120 items, 20% 500 / 10% 429 / 5% timeouts / 5% malformed, OpenAI candidates only."""
    res, err = _drill("drill_llm_faults.py", "--items", "120")
    assert res["drill"] == "llm_faults" and res["items"] == 120
    assert set(res["ledgered_calls_by_provider"]) == {"openai"}, res["ledgered_calls_by_provider"]
    assert res["lost"] == 0 and res["duplicate_effects"] == 0, err[-3000:]
    assert res["before_replay"]["lost"] == 0 and res["before_replay"]["duplicate_effects"] == 0
    assert res["reexecution"]["duplicate_effects"] == 0
    assert res["resolved_rate"] >= 0.99, res
    assert res["resolved"] + res["dead_lettered"] + sum(res["intermediate"].values()) == res["items"]
    # the faults really happened
    outcomes = res["server_outcomes"]
    assert outcomes.get("500", 0) and outcomes.get("429", 0) and outcomes.get("hang", 0) and outcomes.get("malformed", 0)


def test_malformed_inputs_drill_small():
    """500 hypothesis-generated malformed inputs through intake: no crash, every rejection in the DLQ."""
    res, err = _drill("drill_malformed_inputs.py", "--inputs", "500")
    assert res["ok"], (res["failures"], err[-3000:])
    assert res["drill"] == "malformed_inputs" and res["items"] == 500 and res["crash"] is None
    assert res["lost"] == 0 and res["rejected_without_dlq"] == 0
    assert res["dead_lettered"] > 400 and res["resolved"] + res["dead_lettered"] + res["duplicates"] == 500
    assert res["reexecution_sources_read"] == 0


# --- dead-letter replay ------------------------------------------------------------------------------

@pytest.fixture
def dead_letters(orch_home, db, openai_env, fake_openai, instance):
    """Three items dead-lettered at triage (malformed model answers) and one intake dead letter."""
    submit_to_table(db, "support", sample_messages(DAY)[:3] + [BAD_ROW], "test")
    fake_openai.configure(rate_malformed=1.0)
    assert run_flow(openai_env, instance, DAY).success
    fake_openai.reset()  # the provider recovers
    with db.begin() as conn:
        rows = [dict(r) for r in conn.execute(sa.select(dlq).order_by(dlq.c.id)).mappings()]
    assert [(r["stage"], r["status"]) for r in rows] == [("intake", "open")] + [("triage", "open")] * 3
    return rows


def _items(db) -> dict[str, dict]:
    with db.begin() as conn:
        return {r["item_id"]: dict(r) for r in conn.execute(sa.select(items.c.item_id, items.c.status, items.c.stage,
                                                                      items.c.trace_id)).mappings()}


def _orch(*args: str, check: bool = True):
    out = subprocess.run([str(BIN / "orch"), *args], capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if check and out.returncode != 0:
        raise AssertionError(f"orch {args} exited {out.returncode}\n{out.stdout}\n{out.stderr[-3000:]}")
    return out


def test_cli_dlq_show_and_replay(orch_home, db, openai_env, dead_letters, instance):
    intake_dl, tri = dead_letters[0], dead_letters[1]
    before = _items(db)[tri["item_id"]]
    assert before["status"] == "dead_lettered" and before["trace_id"] == tri["trace_id"]

    shown = json.loads(_orch("dlq", "show", str(tri["id"]), "--json").stdout)
    assert shown["item"]["status"] == "dead_lettered" and shown["replayable"]
    assert shown["replay_to"] == {"status": "received", "stage": "intake"}
    assert "malformed JSON response body" in shown["reason"]
    text = _orch("dlq", "show", str(intake_dl["id"])).stdout
    assert "not replayable" in text and "fix the source file and submit it again" in text

    out = json.loads(_orch("dlq", "replay", str(tri["id"]), "--json").stdout)
    assert out["replayed"] and out["status"] == "received" and out["trace_id"] == before["trace_id"]
    assert _items(db)[tri["item_id"]]["status"] == "received"
    again = _orch("dlq", "replay", str(tri["id"]))
    assert again.returncode == 0 and "already replayed; nothing to do" in again.stdout
    refused = _orch("dlq", "replay", str(intake_dl["id"]), check=False)
    assert refused.returncode == 1 and "fix the source file and submit it again" in refused.stdout

    everything = json.loads(_orch("dlq", "replay", "--all", "--json", "--flow", "support").stdout)
    assert everything["replayed"] == 2 and everything["not_replayable"] == 1

    # the next run of the partition reprocesses the replayed items; trace ids are kept
    assert run_flow(openai_env, instance, DAY).success
    after = _items(db)
    for r in dead_letters[1:]:
        assert after[r["item_id"]]["status"] in ("resolved", "awaiting_approval")
        assert after[r["item_id"]]["trace_id"] == r["trace_id"]
    with db.begin() as conn:
        statuses = dict(conn.execute(sa.select(dlq.c.id, dlq.c.status)).all())
        trail = conn.execute(sa.select(audit.c.trace_id, audit.c.actor).where(
            audit.c.item_id == tri["item_id"], audit.c.action == "dlq_replayed")).all()
    assert statuses == {intake_dl["id"]: "open", **{r["id"]: "replayed" for r in dead_letters[1:]}}
    assert len(trail) == 1 and trail[0].trace_id == tri["trace_id"] and trail[0].actor.startswith("cli:")
    from orch_project.lib.pipeline import status_counts

    st = status_counts(db, "support")
    assert st["lost"] == 0 and st["dlq_open"] == 1


def test_replay_job_then_next_run_reprocesses(orch_home, db, openai_env, dead_letters, instance):
    import dagster as dg

    ops = run_ops(openai_env, instance)  # the ops job after each flow run shows the backlog in the UI
    assert ops.success
    md = ops.asset_materializations_for_node("support_dlq_backlog")[0].metadata
    assert (md["dlq_open"].value, md["dlq_open_stage_triage"].value, md["dlq_open_stage_intake"].value) == (4, 3, 1)

    job = openai_env.resolve_job_def("support_dlq_replay_job")
    bad = job.execute_in_process(instance=instance, raise_on_error=False, run_config={
        **QUIET, "ops": {"support_replay_dead_letters": {"config": {"dlq_id": dead_letters[0]["id"], "all": False}}}})
    assert not bad.success  # an intake dead letter cannot be replayed: the job says so
    res = job.execute_in_process(instance=instance, run_config={
        **QUIET, "ops": {"support_replay_dead_letters": {"config": {"all": True}}}})
    assert res.success and res.output_for_node("support_replay_dead_letters")["replayed"] == 3
    mats = [e.event_specific_data.materialization for e in res.get_asset_materialization_events()]
    assert mats and mats[-1].asset_key == dg.AssetKey("support_dlq_backlog")
    assert mats[-1].metadata["dlq_open"].value == 1 and mats[-1].metadata["dlq_open_stage_intake"].value == 1
    assert {i["status"] for k, i in _items(db).items()} == {"received"}

    assert run_flow(openai_env, instance, DAY).success
    after = _items(db)
    for r in dead_letters[1:]:
        assert after[r["item_id"]]["status"] in ("resolved", "awaiting_approval")
        assert after[r["item_id"]]["trace_id"] == r["trace_id"]
    again = job.execute_in_process(instance=instance, run_config={
        **QUIET, "ops": {"support_replay_dead_letters": {"config": {"all": True}}}})
    assert again.output_for_node("support_replay_dead_letters")["replayed"] == 0  # replaying twice is a no-op

    from orch_project.defs.resources import AppDatabase
    support_dlq_backlog = openai_env.get_assets_def("support_dlq_backlog")

    backlog = dg.materialize([support_dlq_backlog], resources={"app_db": AppDatabase()}, instance=instance)
    md = backlog.asset_materializations_for_node("support_dlq_backlog")[0].metadata
    assert md["dlq_open"].value == 1 and "| intake | validation | 1 |" in md["backlog"].value
