"""The support flow with ORCH_LLM_PROVIDER=openai: every model call goes through the real openai SDK
to the fake server; no personal data and no API key leave in requests, logs or metadata."""

from __future__ import annotations

import json

import pytest
import sqlalchemy as sa

from orch_project.lib.intake import submit_to_table
from orch_project.lib.store import dlq, items, llm_calls, token_budgets, vault

from .conftest import OPENAI_TEST_KEY as SECRET
from .conftest import run_flow, sample_messages

DAY = "2026-11-20"


def test_flow_runs_through_the_sdk_without_leaking_pii_or_the_key(orch_home, db, with_model, openai_env, fake_openai,
                                                                 instance):
    msgs = sample_messages(DAY)
    submit_to_table(db, "support", msgs, "test")
    result = run_flow(openai_env, instance, DAY)
    assert result.success

    reqs = fake_openai.requests()
    models = {r["model"] for r in reqs}
    assert models == {"gpt-4o-mini", "gpt-4.1-mini"}  # triage (cheapest) and drafts (ordered) candidates
    assert all(r["authorization"] == f"Bearer {SECRET}" for r in reqs)
    with db.begin() as conn:
        calls = [dict(r) for r in conn.execute(sa.select(llm_calls).where(llm_calls.c.run_id == result.run_id))
                 .mappings()]
        routed = dict(conn.execute(sa.select(items.c.status, sa.func.count()).group_by(items.c.status)).all())
        secrets = {v for (v,) in conn.execute(sa.select(vault.c.value)) if len(v) >= 4}
        budget = conn.execute(sa.select(token_budgets).where(token_budgets.c.scope == f"run:{result.run_id}")).first()
    assert {c["provider"] for c in calls if not c["cached"]} == {"openai"}
    assert sum(1 for c in calls if c["task"] == "triage" and c["ok"]) == len(msgs)
    assert routed.get("dead_lettered", 0) == 0 and sum(routed.values()) == len(msgs)

    # no raw personal value reached the provider: every vaulted value and every sender detail
    bodies = json.dumps([r["body"] for r in reqs])
    seeded = secrets | {m["sender"]["email"] for m in msgs} | {m["sender"].get("name") for m in msgs
                                                               if m["sender"].get("name")}
    assert seeded and not [v for v in seeded if v in bodies]

    # the key is never in the event log (resources show the variable's name, not its value)
    logs = json.dumps([str(e) for e in instance.all_logs(result.run_id)])
    assert "support_triage" in logs and SECRET not in logs
    assert SECRET not in (orch_home.logs_dir / "orch.jsonl").read_text()

    # token and cost figures per run are numeric metadata the UI can chart
    mats = {e.event_specific_data.materialization.asset_key.to_user_string(): e.event_specific_data.materialization
            for e in result.get_asset_materialization_events()}
    md = mats["support_triage"].metadata
    assert md["triage_input_tokens"].value > 0 and md["triage_cost_usd"].value > 0
    ledger_tokens = sum(c["input_tokens"] + c["output_tokens"] for c in calls)
    assert budget.used == ledger_tokens and budget.reserved == 0

    # the KPI report shows the router's record: first choices, wins, cost, cache hit rates
    from orch_project.defs.support.flow import CFG
    from orch_project.defs.support.reporting import compute_kpis

    k, _ = compute_kpis(db, CFG)
    sel = {(m["task"], m["model"]): m for m in k["model_selection"]}
    assert sel[("triage", "openai:gpt-4o-mini")]["first_choice"] == len(msgs)
    assert sel[("triage", "openai:gpt-4o-mini")]["win_rate"] == 1.0
    # every item is drafted before the gate, in the A/B test's control arm or its prompt variant "b"
    assert sel[("draft_reply", "openai:gpt-4.1-mini")]["wins"] + sel[("draft_reply.b", "openai:gpt-4.1-mini")]["wins"] \
        == len(msgs)
    assert k["cost_usd_total"] == pytest.approx(sum(c["cost_usd"] for c in calls)) and k["cost_usd_total"] > 0
    assert k["llm_calls"] == len(reqs) and k["exact_cache_hit_rate"] == 0.0


def test_malformed_answers_dead_letter_with_the_raw_reason(orch_home, db, with_model, openai_env, fake_openai,
                                                           instance):
    msgs = sample_messages(DAY)[:5]
    submit_to_table(db, "support", msgs, "test")
    fake_openai.configure(model="gpt-4o-mini", rate_malformed=1.0)
    result = run_flow(openai_env, instance, DAY)
    assert result.success  # per-item failures never fail the batch
    with db.begin() as conn:
        dead = [dict(r) for r in conn.execute(sa.select(dlq.c.stage, dlq.c.error_type, dlq.c.reason)).mappings()]
    assert len(dead) == 5
    assert all(d["stage"] == "triage" and d["error_type"] == "schema_mismatch" for d in dead)
    assert all(d["reason"].startswith("triage failed: malformed JSON response body") and
               "after one repair attempt" in d["reason"] for d in dead)
    # per item: call + body retry, repair + body retry; no silent retry loop, no fallback on bad content
    assert len(fake_openai.requests("gpt-4o-mini")) == 20 and fake_openai.requests("gpt-4.1-mini") == []


def test_open_circuits_defer_items_then_the_next_run_resumes_them(orch_home, db, with_model, openai_env, fake_openai,
                                                                  instance):
    """Every candidate's circuit open (seen from the shared database): items are deferred with a
    clear state instead of failing; the next run after recovery completes them."""
    defs = openai_env
    msgs = sample_messages(DAY)[:8]
    submit_to_table(db, "support", msgs, "test")
    from orch_project.lib.llm.controls import CircuitBreaker
    from orch_project.lib.llm.routing import BreakerPolicy

    breaker = CircuitBreaker(db, BreakerPolicy(failure_threshold=1, cooldown_s=3600))
    for key in ("openai:gpt-4o-mini", "openai:gpt-4.1-mini", f"local:triage-{with_model['version']}"):
        breaker.record(key, "provider_error", "down for the test")
    result = run_flow(defs, instance, DAY)
    assert result.success and fake_openai.requests() == []
    with db.begin() as conn:
        rows = [dict(r) for r in conn.execute(sa.select(items.c.status, items.c.stage, items.c.data)).mappings()]
    assert {(r["status"], r["stage"]) for r in rows} == {("deferred", "intake")}
    assert all(r["data"]["deferred"]["error"] == "circuit_open" for r in rows)

    with db.begin() as conn:  # the provider recovers (an operator could also wait for the cool-down)
        conn.execute(sa.text("DELETE FROM circuit_breakers"))
    result = run_flow(defs, instance, DAY)
    assert result.success
    with db.begin() as conn:
        statuses = {s for (s,) in conn.execute(sa.select(items.c.status))}
        leftover = conn.execute(sa.select(items.c.data)).scalars().all()
    assert "deferred" not in statuses and not any("deferred" in d for d in leftover)
