"""The leads flow after the first touch and its model: nurture in business hours and its stop on a reply, re-runs
that send nothing twice, consent revoked while a message waits, the OpenAI path, the governed scorer's gate
and rollback."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import sqlalchemy as sa

from orch_project.defs.leads import engage, logic
from orch_project.lib import approvals as hitl
from orch_project.lib.connectors.embedded import crm_contact_changes, crm_contacts
from orch_project.lib.pipeline import StageEnv
from orch_project.lib.store import audit, items

from .conftest import QUIET, run_flow, run_ops
from .leads_helpers import DAY, FLOW, by_external, conn_db, contacts_table, drop, form, lead_messages, leads


def _warm_lead(orch_home, db, defs, instance) -> tuple[str, dict]:
    warm_attrs = {"Lead Origin": "Landing Page Submission", "Lead Source": "Google", "TotalVisits": "3",
                  "Total Time Spent on Website": "420", "Last Activity": "Email Opened",
                  "Current Occupation": "Unemployed"}
    for n, total in enumerate(("250", "420", "700", "900", "1100")):
        drop(orch_home, f"form-{n}.json", form(n, attrs={**warm_attrs, "Total Time Spent on Website": total}))
    assert run_flow(defs, instance, DAY, FLOW).success
    warm = [(iid, d) for iid, d in leads(db).items() if d.get("tier") == "warm" and d["status"] == "resolved"]
    assert warm, {iid: (d.get("tier"), d.get("score"), d["status"]) for iid, d in leads(db).items()}
    return warm[0]


def test_nurture_runs_in_business_hours_and_stops_on_reply(orch_home, db, defs, instance, with_lead_model):
    iid, d = _warm_lead(orch_home, db, defs, instance)
    assert d["nurture"]["state"] == "scheduled"
    env = StageEnv(db, FLOW, [])
    client = conn_db(orch_home)
    saturday_night = datetime(2026, 12, 5, 23, 0, tzinfo=timezone.utc)
    engage.nurture_stage(env, logic.CFG, client, now=saturday_night)
    assert not [m for m in lead_messages(orch_home) if m["item_id"] == iid]
    n = leads(db)[iid]["nurture"]
    assert n["step"] == 0 and datetime.fromisoformat(n["next_at"]).astimezone(timezone.utc).weekday() == 0
    monday = datetime(2026, 12, 7, 10, 30, tzinfo=timezone.utc)
    engage.nurture_stage(env, logic.CFG, client, now=monday)
    engage.nurture_stage(env, logic.CFG, client, now=monday + timedelta(hours=1))  # not due again yet
    sent = [m for m in lead_messages(orch_home) if m["item_id"] == iid]
    assert [m["kind"] for m in sent] == ["nurture_1"] and logic.CFG.settings.opt_out_line in sent[0]["body"]
    client.record_inbound([{"external_id": "r-1", "kind": "reply", "recipient": d["tokens"]["EMAIL_ADDRESS"],
                            "body": "call me", "received_at": monday + timedelta(hours=2)}])
    engage.responses_stage(env, logic.CFG, client, now=monday + timedelta(hours=3))
    engage.responses_stage(env, logic.CFG, client, now=monday + timedelta(hours=4))  # the same reply counts once
    after = leads(db)[iid]
    assert after["nurture"]["state"] == "stopped" and after["nurture"]["stopped_reason"] == "replied"
    assert len(after["responses"]) == 1 and after["replied_at"]
    for k in range(1, 5):
        engage.nurture_stage(env, logic.CFG, client, now=monday + timedelta(days=2 * k, hours=1))
    assert [m["kind"] for m in lead_messages(orch_home) if m["item_id"] == iid] == ["nurture_1"]
    crm = {c["contact_id"]: c for c in contacts_table(orch_home)}
    assert crm[after["match"]["contact_id"]]["stage"] == "Engaged"


def test_rerunning_a_partition_sends_nothing_twice(orch_home, db, defs, instance, with_lead_model):
    for i in range(4):
        drop(orch_home, f"form-{i}.json", form(i))
    client = conn_db(orch_home)
    client.set_fault("messaging")  # the first touches wait in the outbox: the re-runs below re-drive them
    assert run_flow(defs, instance, DAY, FLOW).success
    assert not lead_messages(orch_home) and {d["status"] for d in leads(db).values()} == {"in_crm"}
    client.clear_fault()
    assert run_flow(defs, instance, DAY, FLOW).success
    assert run_flow(defs, instance, DAY, FLOW).success
    assert run_ops(defs, instance, FLOW).success
    assert len(lead_messages(orch_home)) == 4  # one first touch each, however often the stages ran
    before_msgs, before_changes = len(lead_messages(orch_home)), _changes(orch_home)
    before = leads(db)
    for _ in range(2):
        assert run_flow(defs, instance, DAY, FLOW).success
        assert run_ops(defs, instance, FLOW).success
    assert len(lead_messages(orch_home)) == before_msgs and _changes(orch_home) == before_changes
    assert {k: v["status"] for k, v in leads(db).items()} == {k: v["status"] for k, v in before.items()}
    assert conn_db(orch_home).duplicates(FLOW) == {k: 0 for k in conn_db(orch_home).duplicates(FLOW)}


def _changes(settings) -> int:
    with conn_db(settings).db.begin() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(crm_contact_changes)).scalar_one()


def test_a_message_waiting_in_the_outbox_is_withheld_when_consent_is_revoked(orch_home, db, defs, instance,
                                                                               with_lead_model):
    drop(orch_home, "form-1.json", form(1))
    client = conn_db(orch_home)
    client.set_fault("messaging")
    assert run_flow(defs, instance, DAY, FLOW).success
    iid, d = by_external(db, "wf-1")
    assert d["status"] == "in_crm"  # its first touch waits in the outbox
    with client.db.begin() as conn:  # meanwhile the person unsubscribes in the CRM
        conn.execute(crm_contacts.update().where(crm_contacts.c.contact_id == d["match"]["contact_id"])
                     .values(unsubscribed=True))
    client.clear_fault()
    assert run_ops(defs, instance, FLOW).success
    assert not lead_messages(orch_home)
    after = leads(db)[iid]
    assert after["status"] == "resolved" and after["consent"]["unsubscribed"] is True
    with db.begin() as conn:
        assert conn.execute(sa.select(audit.c.reason).where(audit.c.action == "message_withheld")).scalar_one() \
            .startswith("consent revoked (unsubscribed)")


def test_a_worse_model_is_refused_by_the_gate_and_rollback_restores_the_previous(orch_home, db, defs, instance):
    from orch_project.lib.llm import registry

    job = defs.resolve_job_def("train_lead_score_model_job")
    cfg = {"ops": {"lead_score_model": {"config": {"search_budget_s": 0}}}}
    first = job.execute_in_process(instance=instance, run_config={**cfg, **QUIET})
    assert first.success
    serving = registry.promoted_model_path(db, "lead_score")[1]
    assert serving != "none"
    worse = {"ops": {"lead_score_model": {"config": {"search_budget_s": 0, "train_limit": 200,
                                                      "exclude_columns": ["Lead Origin", "Lead Source",
                                                                          "Last Activity", "Total Time Spent on Website"]}}}}
    res = job.execute_in_process(instance=instance, run_config={**worse, **QUIET}, raise_on_error=False)
    gate = [e for e in res.get_asset_check_evaluations() if e.asset_check_key.name == "lead_score_model_gate"]
    assert gate and gate[0].passed is False and "refused" in gate[0].description
    assert "lead_score_model_promotion" not in {e.asset_key.path[-1] for e in res.get_asset_materialization_events()}
    assert registry.promoted_model_path(db, "lead_score")[1] == serving
    refused = [r for r in registry.list_versions(db, "lead_score") if r["status"] == "refused"]
    assert len(refused) == 1
    # a person promotes the refused candidate by hand (audited), sees it misbehave and rolls back
    from click.testing import CliRunner

    from orch_project.cli import main

    runner = CliRunner()
    out = runner.invoke(main, ["model", "promote", refused[0]["version"], "--as", "hs-hugo", "--reason", "try it"])
    assert out.exit_code == 0, out.output
    assert registry.promoted_model_path(db, "lead_score")[1] == refused[0]["version"]
    out = runner.invoke(main, ["model", "rollback", "--task", "lead_score", "--as", "hs-hugo", "--reason", "worse"])
    assert out.exit_code == 0, out.output
    assert json.loads(out.output.strip().splitlines()[-1])["promoted"] == serving
    assert registry.promoted_model_path(db, "lead_score")[1] == serving
    listed = runner.invoke(main, ["model", "list", "--task", "lead_score"])
    assert serving in listed.output and "rolled_back" in listed.output
    with db.begin() as conn:
        trail = conn.execute(sa.select(audit.c.action).where(audit.c.action.like("model_%"))).scalars().all()
    assert {"model_promoted", "model_refused", "model_rolled_back"} <= set(trail)


def test_openai_path_drafts_the_first_touch_and_the_policy_holds_it(orch_home, openai_env, db, instance, fake_openai,
                                                                      with_lead_model):
    # the notes name a colleague and an address: both masked before the request leaves
    drop(orch_home, "form-1.json", form(1, notes="My manager Bruno Marlowe asked me to write; copy bruno.m@quistlabs.com"))
    assert run_flow(openai_env, instance, DAY, FLOW).success
    reqs = [r["body"] for r in fake_openai.requests()]
    drafts = [b for b in reqs if (b.get("response_format") or {}).get("json_schema", {}).get("name") == "leads_first_touch"]
    assert len(drafts) == 1 and len(reqs) == 1  # the score is the governed model's, never a chat model's
    assert "text" in drafts[0]["response_format"]["json_schema"]["schema"]["properties"]
    sent = json.dumps(drafts[0]["messages"])
    assert "bruno.m@quistlabs.com" not in sent and "<EMAIL_ADDRESS>" in sent
    assert logic.CFG.settings.opt_out_line in sent  # the prompt asks for the line ...
    iid, d = by_external(db, "wf-1")
    # ... the fake model leaves it out: the draft breaks the policy and waits for the sales manager
    assert d["status"] == "awaiting_review" and "draft_policy" in d["approval_reasons"]
    assert any("missing required phrase" in v for v in d["draft_violations"])
    assert not lead_messages(orch_home)
    fixed = d["draft"] + "\n\n" + logic.CFG.settings.opt_out_line
    hitl.decide(db, iid, "approve", "sm-grace", "added the opt-out line", "draft: |\n  " + fixed.replace("\n", "\n  "),
                logic.CFG.roster, flow=FLOW)
    with db.begin() as conn:
        assert conn.execute(sa.select(items.c.data).where(items.c.item_id == iid)).scalar_one()["reviewed_by"] == "sm-grace"


def test_the_crm_moves_a_contact_forward_only():
    from orch_project.lib.connectors.embedded import stage_moves

    assert stage_moves(None, "Archived") and stage_moves("Lead", "Qualified") and stage_moves("Engaged", "Won")
    assert not stage_moves("Won", "Engaged") and not stage_moves("Lead", "Archived") and not stage_moves("Proposal", "Nurture")
    assert stage_moves("Won", "Lost")  # a rep's outcome is theirs to correct
