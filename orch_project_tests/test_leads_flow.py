"""The leads flow from intake to the first touch on instance_for_test(): forms, CSV imports and CRM webhooks,
dedup against the CRM, consent, routing and the review gate."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import dagster as dg
import pytest
import sqlalchemy as sa

from orch_project.defs.leads import engage, logic, model as lm
from orch_project.lib import approvals as hitl
from orch_project.lib.connectors.embedded import import_contacts
from orch_project.lib.intake import submit_to_table
from orch_project.lib.pipeline import StageEnv, status_counts
from orch_project.lib.store import audit, dlq

from .conftest import QUIET, run_flow, run_ops
from .leads_helpers import (ARRIVAL, COLD, DAY, FLOW, HOT, WARM, by_external, conn_db, contacts_table, csv_import,
                            drop, form, lead_messages, leads)


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
    # nurture over a whole week, every 3 h, in business hours or not: whatever the time of day the test runs at,
    # some passes fall inside the lead's business hours
    for h in range(0, 7 * 24, 3):
        engage.nurture_stage(env, logic.CFG, conn_db(orch_home), now=later + timedelta(hours=h))
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
    import csv as _csv

    client = conn_db(orch_home)
    client.set_fault("company_directory")
    with logic.DIRECTORY_SEED.open(encoding="utf-8") as fh:
        known = next(_csv.DictReader(fh))  # a company the directory knows
    drop(orch_home, "form-1.json", form(1, email=f"ada@{known['domain']}", company="Ada's own spelling"))
    result = run_flow(defs, instance, DAY, FLOW)
    client.clear_fault()
    assert result.success
    _, d = by_external(db, "wf-1")
    assert d["status"] in ("resolved", "awaiting_review")
    assert d["enrichment_pending"] == ["company"] and "unavailable" in d["enrichment_reasons"]["company_directory"]
    assert d["enrichment_sources"]["company"] == "form"
    enrich = [e for e in result.get_asset_materialization_events() if e.asset_key.path[-1] == "leads_enrich"]
    assert enrich[0].materialization.metadata["directory_available"].value is False
    assert run_ops(defs, instance, FLOW).success  # the directory answers again: looked up, the CRM updated
    _, d = by_external(db, "wf-1")
    assert "enrichment_pending" not in d and d["enrichment"]["company"] == known["name"]
    assert d["enrichment_sources"]["company"] == "directory"
    crm = {c["contact_id"]: c for c in contacts_table(orch_home)}
    assert crm[d["match"]["contact_id"]]["company"] == known["name"]


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


def test_a_broken_csv_accounts_for_every_row(tmp_path):
    p = tmp_path / "broken.csv"
    p.write_text("Email,Notes\na@b.io,ok\nb@b.io,\"" + "x" * 140_000 + "\"\nc@b.io,fine\n", encoding="utf-8")
    got = logic.parse_file(p)
    assert [r.source_key for r in got] == ["file:broken.csv#row=2", "file:broken.csv#row=3", "file:broken.csv#after=3"]
    assert got[0].error is None and "unreadable CSV" in got[1].error and "not read" in got[2].error
    header_only = tmp_path / "h.csv"
    header_only.write_text("Email\n", encoding="utf-8")
    assert logic.parse_file(header_only).error_type == "empty"


def test_a_hot_lead_approved_while_every_rep_was_full_gets_a_rep_with_room(orch_home, db, defs, instance,
                                                                           with_lead_model, monkeypatch):
    full = [{**p, "capacity": 0} for p in logic.CFG.reps]
    monkeypatch.setitem(logic.CFG.__dict__, "reps", full)
    drop(orch_home, "form-1.json", form(1))
    assert run_flow(defs, instance, DAY, FLOW).success
    iid, d = by_external(db, "wf-1")
    assert d["status"] == "awaiting_review" and d["approval_reasons"] == ["no_rep_capacity"] and d["owner"] is None
    hitl.decide(db, iid, "approve", "sm-grace", "call them anyway", None, logic.CFG.roster, flow=FLOW)
    monkeypatch.setitem(logic.CFG.__dict__, "reps", [{**p, "capacity": 40} for p in full])  # the week turned
    from orch_project.defs.resources import default_resources

    sensor = defs.get_sensor_def("leads_approval_resume_sensor")
    with dg.build_sensor_context(instance=instance, definitions=defs, resources=default_resources()) as ctx:
        req = sensor.evaluate_tick(ctx).run_requests[0]
    assert defs.resolve_job_def("leads_approval_resume_job").execute_in_process(
        instance=instance, partition_key=req.partition_key, run_config=QUIET).success
    after = by_external(db, "wf-1")[1]
    assert after["status"] == "resolved" and after["owner"] in {p["id"] for p in full if p["team"] == "emea"}
    crm = {c["contact_id"]: c for c in contacts_table(orch_home)}
    assert crm[after["match"]["contact_id"]]["owner"] == after["owner"]
