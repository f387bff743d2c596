"""The code location loads, shows the flow's lineage, and stays fast to import."""

from __future__ import annotations

import json
import subprocess
import sys

import dagster as dg


def test_definitions_load_with_expected_objects(defs):
    keys = {a.key.to_user_string() for a in defs.resolve_all_asset_specs()}
    assert {"support_inbound", "support_triage", "support_assignment", "support_knowledge", "support_drafts",
            "support_approval_gate", "support_actions", "support_surveys", "support_csat", "support_escalations",
            "support_insights", "support_kpi_report", "support_outbox_redelivery", "triage_model", "triage_model_evaluation",
            "triage_model_promotion"} <= keys
    jobs = {j.name for j in defs.resolve_all_job_defs()}
    assert {"support_flow_job", "support_ops_job", "train_triage_model_job", "model_admin_job"} <= jobs
    flows = ("support", "documents", "leads", "marketing", "orders")
    assert {s.name for s in defs.sensors} == {f"{f}_{s}" for f in flows for s in (
        "intake_sensor", "ops_after_flow", "approval_resume_sensor", "approval_escalation_sensor", "alerts_sensor",
        "run_failure_alerts")}
    assert {s.name for s in defs.schedules} == {f"{f}_{s}" for f in flows for s in (
        "ops_job_schedule", "retention_purge_job_schedule")} | {"marketing_weekly_job_schedule"}
    assert isinstance(defs.resolve_job_def("marketing_weekly_job").partitions_def, dg.WeeklyPartitionsDefinition)
    assert {"documents_intake_documents", "documents_extract", "documents_validate", "documents_review_gate",
            "documents_post", "documents_outbox_redelivery", "documents_labelled_examples",
            "documents_kpi_report"} <= keys
    assert {"leads_intake", "leads_match", "leads_enrich", "leads_score", "leads_qualify", "leads_first_touch",
            "leads_review_gate", "leads_crm_upsert", "leads_engage", "leads_responses", "leads_nurture",
            "lead_score_model", "lead_score_model_evaluation", "lead_score_model_promotion"} <= keys
    assert {"leads_flow_job", "train_lead_score_model_job", "orders_flow_job", "orders_ops_job"} <= jobs
    assert {"orders_intake", "orders_validate", "orders_fraud", "orders_reserve", "orders_authorize", "orders_fulfil",
            "orders_settle", "orders_advance", "orders_kpi_report"} <= keys
    checks = {k.name for k in defs.resolve_asset_graph().asset_check_keys}
    assert {"lead_score_model_gate", "routing_respects_consent", "match_decisions_valid", "settle_invariants",
            "reserve_no_duplicate_effects"} <= checks
    dg.Definitions.validate_loadable(defs)


def test_lineage_runs_intake_to_report(defs):
    graph = defs.resolve_asset_graph()
    parents = {k.to_user_string(): {p.to_user_string() for p in graph.get(k).parent_keys}
               for k in graph.get_all_asset_keys()}
    assert parents["support_triage"] == {"support_inbound", "triage_model_promotion"}
    assert parents["triage_model_promotion"] == {"triage_model_evaluation"}
    assert parents["triage_model_evaluation"] == {"triage_model"}
    assert parents["support_drafts"] == {"support_knowledge"}
    assert parents["support_actions"] == {"support_approval_gate"}
    assert parents["support_csat"] == {"support_surveys"}
    assert "support_insights" in parents["support_kpi_report"]
    assert parents["documents_extract"] == {"documents_intake_documents"}
    assert parents["documents_post"] == {"documents_review_gate"}
    assert parents["leads_score"] == {"leads_enrich", "lead_score_model_promotion"}
    assert parents["lead_score_model_promotion"] == {"lead_score_model_evaluation"}
    assert parents["orders_authorize"] == {"orders_reserve"} and parents["orders_settle"] == {"orders_fulfil"}
    spec = graph.get(dg.AssetKey("support_inbound"))
    assert isinstance(spec.partitions_def, dg.DailyPartitionsDefinition)


def test_code_location_import_skips_heavy_libraries():
    code = ("import sys, json; import orch_project.definitions; "
            "print(json.dumps([m for m in ('pandas','sklearn','matplotlib','great_expectations','presidio_analyzer',"
            "'openai','rapidocr_onnxruntime','pdfplumber','PIL','stdnum','rapidfuzz','phonenumbers','tenacity') if m in sys.modules]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == []
