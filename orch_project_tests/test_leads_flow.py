"""The leads flow end to end on instance_for_test(): intake of forms, CSV imports and CRM webhooks, dedup
against the CRM, consent, routing, the review gate, CRM upsert, first touch, nurture and its stop on a reply,
the governed scorer's gate and rollback, and re-runs that send nothing twice."""

from __future__ import annotations

import csv
import io
import json
import os
from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest
import sqlalchemy as sa

from orch_project.defs.leads import engage, logic, model as lm
from orch_project.lib import approvals as hitl
from orch_project.lib.connectors.embedded import crm_contact_changes, crm_contacts, import_contacts, messages
from orch_project.lib.intake import submit_to_table
from orch_project.lib.pipeline import StageEnv, status_counts
from orch_project.lib.store import audit, dlq, items

from .conftest import QUIET, flow_inbox, run_flow, run_ops

FLOW = "leads"
DAY = "2026-11-30"
ARRIVAL = datetime(2026, 11, 30, 10, 0, tzinfo=timezone.utc).timestamp()
HOT = {"Lead Origin": "Lead Add Form", "Lead Source": "Reference", "Total Time Spent on Website": "1500",
       "Last Activity": "SMS Sent", "Current Occupation": "Working Professional", "TotalVisits": "5"}
WARM = {"Lead Origin": "Landing Page Submission", "Lead Source": "Google", "TotalVisits": "3",
        "Total Time Spent on Website": "700", "Last Activity": "Email Opened", "Current Occupation": "Unemployed"}
COLD = {"Lead Origin": "API", "Lead Source": "Olark Chat", "Total Time Spent on Website": "0",
        "Last Activity": "Email Bounced", "Current Occupation": "", "TotalVisits": "0", "Do Not Email": "No",
        "A free copy of the interview guide": "Yes"}


def drop(settings, name: str, data: bytes | str, at: float = ARRIVAL):
    folder = flow_inbox(settings, FLOW)
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    os.utime(p, (at, at))
    return p


FIRST = ["Ada", "Bruno", "Carla", "Dmitri", "Elif", "Farah", "Goran", "Hana", "Ivo", "Juno"]
LAST = ["Quist", "Marlowe", "Okonjo", "Varga", "Tanaka", "Delacroix", "Nyberg", "Castell", "Ruiz", "Abara"]


def form(i: int, *, email: str | None = None, attrs=None, **extra) -> str:
    first, last = FIRST[i % 10], LAST[(3 * i + 1) % 10]
    rec = {"id": f"wf-{i}", "first_name": first, "last_name": last, "email": email or f"{first.lower()}{i}@quistlabs.com",
           "phone": f"+44 7700 900{i:03d}", "company": "Quist Labs", "title": "Head of Learning", "country": "GB",
           "attributes": dict(attrs or HOT), **extra}
    return json.dumps(rec)


def leads(db) -> dict[str, dict]:
    with db.begin() as conn:
        return {iid: {"status": st, **d} for iid, st, d in conn.execute(
            sa.select(items.c.item_id, items.c.status, items.c.data).where(items.c.flow == FLOW))}


def by_external(db, ext: str) -> tuple[str, dict]:
    for iid, d in leads(db).items():
        if d.get("external_id") == ext:
            return iid, d
    raise AssertionError(f"no lead {ext}")


def conn_db(settings):
    from orch_project.defs.resources import _embedded

    return _embedded(settings.connectors_url)


def lead_messages(settings) -> list[dict]:
    with conn_db(settings).db.begin() as conn:
        return [dict(r) for r in conn.execute(sa.select(messages).where(
            messages.c.idempotency_key.like("leads:%"), messages.c.kind != "escalation")).mappings()]


def contacts_table(settings) -> list[dict]:
    with conn_db(settings).db.begin() as conn:
        return [dict(r) for r in conn.execute(sa.select(crm_contacts)).mappings()]


def csv_import(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()


def test_forms_csv_and_webhooks_end_to_end(orch_home, db, defs, instance, with_lead_model):
    drop(orch_home, "form-1.json", form(1))
    drop(orch_home, "form-2.json", form(2, attrs=COLD, email="bo@gmail.com"))
    rows = [{"First Name": "Cy", "Last Name": "Ng", "Email": "cy@quistlabs.com", "Phone": "", "Company": "Quist Labs",
             "Do Not Email": "no", **HOT},
            {"First Name": "Di", "Last Name": "Ro", "Email": "", "Phone": "", "Company": "X", "Do Not Email": "no", **HOT},
            {"First Name": "Ed", "Last Name": "Li", "Email": "ed@@bad", "Phone": "", "Company": "Y",
             "Do Not Email": "no", **HOT},
            {"First Name": "Fa", "Last Name": "Ko", "Email": "fa@quistlabs.com", "Phone": "", "Company": "Z",
             "Do Not Email": "perhaps", **HOT}]
    drop(orch_home, "import.csv", csv_import(rows))
    result = run_flow(defs, instance, DAY, FLOW)
    assert result.success
    checks = {e.asset_check_key.name: e.passed for e in result.get_asset_check_evaluations()}
    assert all(checks.values()) and {"intake_nothing_lost", "intake_pii_masked", "match_decisions_valid",
                                     "routing_respects_consent", "crm_upsert_no_duplicate_effects"} <= set(checks)
    st = status_counts(db, FLOW)
    assert st["lost"] == 0 and st["received"] == 6
    assert st["states"].get("dead_lettered") == 3
    with db.begin() as conn:
        reasons = dict(conn.execute(sa.select(dlq.c.source_key, dlq.c.reason).where(dlq.c.flow == FLOW)).all())
    assert reasons["file:import.csv#row=3"].startswith("row 3: ") and "e-mail address or a phone" in reasons[
        "file:import.csv#row=3"]
    assert "email" in reasons["file:import.csv#row=4"] and "ed@@bad" not in reasons["file:import.csv#row=4"]
    assert "do_not_email" in reasons["file:import.csv#row=5"]
    got = leads(db)
    assert all(d["status"] in ("resolved", "awaiting_review") for d in got.values() if d["status"] != "dead_lettered")
    # nothing personal kept outside the vault: names, e-mails and phones are tokens (a company's domain stays)
    text = json.dumps(list(got.values()))
    assert "bruno1@" not in text and "Bruno" not in text and "+44 7700" not in text and "7700900" not in text
    hot_id, hot = by_external(db, "wf-1")
    assert hot["tier"] == "hot" and hot["owner"].startswith("rep-") and hot["channel"] == "email"
    sent = lead_messages(orch_home)
    assert hot["status"] == "resolved"
    assert [m["recipient"] for m in sent if m["kind"] == "first_touch"].count(hot["tokens"]["EMAIL_ADDRESS"]) == 1
    assert logic.CFG.settings.opt_out_line in hot["draft"]
    cold_id, cold = by_external(db, "wf-2")
    assert cold["tier"] == "cold" and cold["enrichment"]["free_mail"] is True
    assert not [m for m in sent if m["item_id"] == cold_id]
    crm = {c["contact_id"]: c for c in contacts_table(orch_home)}
    assert crm[hot["match"]["contact_id"]]["stage"] == "Qualified"
    assert crm[cold["match"]["contact_id"]]["stage"] == "Archived"
    assert crm[hot["match"]["contact_id"]]["email"] == hot["tokens"]["EMAIL_ADDRESS"]  # a token, not the address


def test_a_lead_typed_twice_is_merged_and_the_crm_keeps_one_contact(orch_home, db, defs, instance, with_lead_model):
    drop(orch_home, "form-1.json", form(1, email="maria.lopez@brightpath.io", first_name="Maria", last_name="Lopez"))
    drop(orch_home, "import.csv", csv_import([{"First Name": "  MARIA ", "Last Name": "lopez",
                                               "Email": " Maria.Lopez@BrightPath.IO  ", "Phone": "07700900001",
                                               "Company": "BrightPath", "Country Code": "GB", **HOT}]),
         at=ARRIVAL + 60)
    assert run_flow(defs, instance, DAY, FLOW).success
    got = leads(db)
    first = next(d for d in got.values() if d["source"] == "web_form")
    second = next(d for d in got.values() if d["source"] == "csv_import")
    assert second["match"]["decision"] == "merge" and second["match"]["reason"] == "same e-mail address"
    assert second["match"]["contact_id"] == first["match"]["contact_id"]
    assert len(contacts_table(orch_home)) == 1
    with db.begin() as conn:
        actions = conn.execute(sa.select(audit.c.action).where(audit.c.flow == FLOW, audit.c.action.like("lead_%"))
                               ).scalars().all()
    assert sorted(actions) == ["lead_merge", "lead_new"]
    # one person, one first touch and one owner, however many times they filled in the form
    assert [first["status"], second["status"]] == ["resolved", "resolved"]
    assert [m["kind"] for m in lead_messages(orch_home)] == ["first_touch"]
    assert second["owner"] == first["owner"] and second["owner_reason"] == "the rep who already owns the contact"


def test_consent_is_never_violated(orch_home, db, defs, instance, with_lead_model):
    # hot leads that say no in every way we know: on the form, in the form's own columns, and in the CRM
    drop(orch_home, "form-1.json", form(1, do_not_email=True))
    drop(orch_home, "form-2.json", form(2, unsubscribed="yes"))
    drop(orch_home, "form-3.json", form(3, attrs={**HOT, "Do Not Email": "Yes"}))
    drop(orch_home, "form-4.json", form(4, email="cleo@quistlabs.com", first_name="Cleo", last_name="Park"))
    drop(orch_home, "form-5.json", form(5, email="dee@mailinator.com"))
    drop(orch_home, "form-6.json", form(6, attrs=WARM, do_not_email="yes"))
    drop(orch_home, "form-7.json", form(7, attrs=WARM, unsubscribed=True))
    drop(orch_home, "form-8.json", form(8, attrs=WARM))  # may be e-mailed: the control
    import_contacts(conn_db(orch_home).db, [{"contact_id": "crm-cleo", "name": "Cleo Park", "email": "cleo@quistlabs.com",
                                             "company": "Quist Labs", "stage": "Lead", "unsubscribed": True}])
    assert run_flow(defs, instance, DAY, FLOW).success
    hitl_pending = hitl.pending(db, FLOW)
    for row in hitl_pending:  # whatever a person decides, consent holds
        hitl.decide(db, row["item_id"], "approve", "sm-grace", "ok", None, logic.CFG.roster, flow=FLOW)
    sensor = defs.get_sensor_def("leads_approval_resume_sensor")
    from orch_project.defs.resources import default_resources

    with dg.build_sensor_context(instance=instance, definitions=defs, resources=default_resources()) as ctx:
        for req in sensor.evaluate_tick(ctx).run_requests or []:
            defs.resolve_job_def("leads_approval_resume_job").execute_in_process(
                instance=instance, partition_key=req.partition_key, run_config=QUIET)
    later = datetime.now(timezone.utc) + timedelta(days=30)
    env = StageEnv(db, FLOW, [])
    for k in range(4):  # nurture over weeks, in business hours or not
        engage.nurture_stage(env, logic.CFG, conn_db(orch_home), now=later + timedelta(days=k * 2, hours=k * 7))
    assert run_ops(defs, instance, FLOW).success
    refused = {by_external(db, f"wf-{i}")[1]["tokens"]["EMAIL_ADDRESS"] for i in (1, 2, 3, 4, 5, 6, 7)}
    assert not [m for m in lead_messages(orch_home) if m["recipient"] in refused]
    _, control = by_external(db, "wf-8")
    assert control["tier"] == "warm" and control["nurture"]["step"] >= 1  # nurture did run meanwhile
    assert [m for m in lead_messages(orch_home) if m["recipient"] == control["tokens"]["EMAIL_ADDRESS"]]
    _, cleo = by_external(db, "wf-4")
    assert cleo["match"]["decision"] == "merge" and cleo["consent"]["unsubscribed"] is True
    assert cleo["match"]["consent_from_crm"] == ["unsubscribed"]
    _, dee = by_external(db, "wf-5")
    assert dee["enrichment"]["disposable"] is True and dee["channel"] != "email"
    # the last guard: no message can be built for such a lead at all
    iid, d = by_external(db, "wf-1")
    with pytest.raises(logic.ConsentError, match="do-not-email"):
        engage.message_effect({"item_id": iid, "trace_id": "t", "data": d}, "x", "x", "s", "b")


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


def test_uncertain_match_waits_and_a_merge_decision_is_applied(orch_home, db, defs, instance, with_lead_model):
    import_contacts(conn_db(orch_home).db, [{"contact_id": "crm-1", "name": "Jonathan Smith",
                                             "email": "jonathan.smith@acme-logistics.com", "company": "Acme Logistics",
                                             "stage": "Won", "do_not_email": True}])
    drop(orch_home, "form-1.json", form(1, first_name="Jonathan", last_name="Smythe", email="jsmyth@acme-group.net",
                                        company="Acme Logistics"))
    assert run_flow(defs, instance, DAY, FLOW).success
    iid, d = by_external(db, "wf-1")
    assert d["status"] == "awaiting_review" and d["match"]["decision"] == "uncertain"
    assert d["match"]["candidate"] == "crm-1" and "uncertain_match" in d["approval_reasons"]
    with pytest.raises(hitl.NotAuthorised):
        hitl.decide(db, iid, "approve", "rep-ana", "", "match: merge", logic.CFG.roster, flow=FLOW)
    with pytest.raises(hitl.ApprovalError, match="tier must be"):
        hitl.decide(db, iid, "approve", "sm-grace", "", "tier: scorching", logic.CFG.roster, flow=FLOW)
    hitl.decide(db, iid, "approve", "sm-grace", "same person", "match: merge", logic.CFG.roster, flow=FLOW)
    from orch_project.defs.resources import default_resources

    sensor = defs.get_sensor_def("leads_approval_resume_sensor")
    with dg.build_sensor_context(instance=instance, definitions=defs, resources=default_resources()) as ctx:
        reqs = sensor.evaluate_tick(ctx).run_requests
    assert len(reqs) == 1
    assert defs.resolve_job_def("leads_approval_resume_job").execute_in_process(
        instance=instance, partition_key=reqs[0].partition_key, run_config=QUIET).success
    after = leads(db)[iid]
    assert after["status"] == "resolved" and after["match"]["contact_id"] == "crm-1"
    crm = {c["contact_id"]: c for c in contacts_table(orch_home)}
    assert set(crm) == {"crm-1"} and crm["crm-1"]["stage"] == "Won"  # merged, never moved back a stage
    assert crm["crm-1"]["email"] == "jonathan.smith@acme-logistics.com"  # the CRM keeps its identity
    # the contact said no to e-mail: merged by a person, the lead is not e-mailed either
    assert after["consent"]["do_not_email"] is True and not lead_messages(orch_home)


def test_directory_down_never_blocks_the_batch(orch_home, db, defs, instance, with_lead_model):
    client = conn_db(orch_home)
    client.set_fault("company_directory")
    drop(orch_home, "form-1.json", form(1))
    result = run_flow(defs, instance, DAY, FLOW)
    client.clear_fault()
    assert result.success
    _, d = by_external(db, "wf-1")
    assert d["status"] in ("resolved", "awaiting_review")
    assert d["enrichment_pending"] == ["company"] and "unavailable" in d["enrichment_reasons"]["company_directory"]
    assert d["enrichment_sources"]["company"] == "form"
    enrich = [e for e in result.get_asset_materialization_events() if e.asset_key.path[-1] == "leads_enrich"]
    assert enrich[0].materialization.metadata["directory_available"].value is False


def test_webhook_rows_and_the_intake_sensor(orch_home, db, defs, instance, with_lead_model):
    from orch_project.defs.resources import default_resources

    submit_to_table(db, FLOW, [{"event": "contact.created", "id": "evt-1", "contact": json.loads(form(1))},
                               {"event": "deal.deleted", "id": "evt-2"}], submitted_by="test")
    drop(orch_home, "import.csv", csv_import([{"Email": "a@b-c.com", "Company": "B C", **HOT}]))
    sensor = defs.get_sensor_def("leads_intake_sensor")
    with dg.build_sensor_context(instance=instance, definitions=defs, resources=default_resources()) as ctx:
        res = sensor.evaluate_tick(ctx)
    today = datetime.now(timezone.utc).date().isoformat()
    assert sorted(r.partition_key for r in res.run_requests) == sorted({DAY, today})
    for r in res.run_requests:
        assert run_flow(defs, instance, r.partition_key, FLOW).success
    st = status_counts(db, FLOW)
    assert st["received"] == 3 and st["lost"] == 0 and st["states"]["dead_lettered"] == 1
    _, d = by_external(db, "evt-1")
    assert d["source"] == "crm_webhook"


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


def test_record_contract_and_business_hours():
    with pytest.raises(Exception, match="e-mail address or a phone"):
        logic.LeadRecord.model_validate(logic.normalise_record({"First Name": "A", "Company": "B"}))
    rec = logic.LeadRecord.model_validate(logic.normalise_record(
        {"E-Mail": "x@y.io", "Job Title": "CTO", "Do not email": "Yes", "Lead Source": "Google", "Last Name": "Z"}))
    assert rec.email == "x@y.io" and rec.title == "CTO" and rec.do_not_email is True
    assert "Lead Source" in rec.attributes and "E-Mail" not in rec.attributes and "Last Name" not in rec.attributes
    s = logic.CFG.settings
    friday_evening = datetime(2026, 12, 4, 19, 0, tzinfo=timezone.utc)
    slot = engage.next_slot(friday_evening, "Europe/Berlin", s)
    assert slot.weekday() == 0 and slot.astimezone(timezone(timedelta(hours=1))).hour == 9
    inside = datetime(2026, 12, 7, 15, 0, tzinfo=timezone.utc)
    assert engage.next_slot(inside, "America/New_York", s) == inside
    assert lm.HISTORY_ENV == "ORCH_LEADS_HISTORY"


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


def test_a_broken_csv_accounts_for_every_row(tmp_path):
    p = tmp_path / "broken.csv"
    p.write_text("Email,Notes\na@b.io,ok\nb@b.io,\"" + "x" * 140_000 + "\"\nc@b.io,fine\n", encoding="utf-8")
    got = logic.parse_file(p)
    assert [r.source_key for r in got] == ["file:broken.csv#row=2", "file:broken.csv#row=3", "file:broken.csv#after=3"]
    assert got[0].error is None and "unreadable CSV" in got[1].error and "not read" in got[2].error
    header_only = tmp_path / "h.csv"
    header_only.write_text("Email\n", encoding="utf-8")
    assert logic.parse_file(header_only).error_type == "empty"


def test_the_crm_moves_a_contact_forward_only():
    from orch_project.lib.connectors.embedded import stage_moves

    assert stage_moves(None, "Archived") and stage_moves("Lead", "Qualified") and stage_moves("Engaged", "Won")
    assert not stage_moves("Won", "Engaged") and not stage_moves("Lead", "Archived") and not stage_moves("Proposal", "Nurture")
    assert stage_moves("Won", "Lost")  # a rep's outcome is theirs to correct
