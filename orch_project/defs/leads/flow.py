"""Lead handling across CRM and messaging, declared once; the kit builds its Dagster objects:

    leads_intake -> leads_match -> leads_enrich -> leads_score -> leads_qualify -> leads_first_touch
      -> leads_review_gate -> leads_crm_upsert -> leads_engage
    ops (after each run and every 15 minutes): leads_outbox_redelivery, leads_re_enrich, leads_responses, leads_nurture,
      leads_escalations, leads_dlq_backlog, leads_kpi_report; leads_raw_retention nightly.
    governance: lead_score_model -> lead_score_model_evaluation [lead_score_model_gate] -> lead_score_model_promotion
"""

from __future__ import annotations

from typing import Any

from ...kit import GXCheck, build_flow, items_frame
from ...lib.flows import (DemoSpec, FlowSpec, GovernedModel, IntakeSpec, ModelTask, OpsStage, ReviewSpec, Stage,
                          lazy)
from . import engage, logic, model, reporting


def _frame(db, flow: str, days: list[str], keep) -> Any:
    from ...lib.store import items

    return items_frame(db, flow, days, keep, items.c.status != "dead_lettered")


def _matched_frame(db, flow: str, days: list[str], cfg) -> Any:
    return _frame(db, flow, days, lambda r: {
        "item_id": r.item_id, "decision": r.data["match"]["decision"], "contact_id": r.data["match"]["contact_id"],
        "candidate_when_uncertain": bool(r.data["match"].get("candidate")) or r.data["match"]["decision"] != "uncertain",
        **{k: bool(v) for k, v in r.data["consent"].items()}} if r.data.get("match") else None)


def _matched_expectations(cfg) -> list:
    import great_expectations.expectations as gxe

    return [gxe.ExpectColumnValuesToBeUnique(column="item_id"),
            gxe.ExpectColumnValuesToBeInSet(column="decision", value_set=["merge", "new", "uncertain"]),
            gxe.ExpectColumnValuesToNotBeNull(column="contact_id"),
            gxe.ExpectColumnValuesToBeInSet(column="candidate_when_uncertain", value_set=[True]),
            *(gxe.ExpectColumnValuesToBeInSet(column=c, value_set=[True, False])
              for c in ("do_not_email", "do_not_call", "unsubscribed"))]


def _scored_frame(db, flow: str, days: list[str], cfg) -> Any:
    return _frame(db, flow, days, lambda r: {
        "item_id": r.item_id, "score": r.data["score"], "model_version": r.data.get("model_version"),
        "reasons": len(r.data.get("score_reasons") or [])} if "score" in r.data else None)


def _scored_expectations(cfg) -> list:
    import great_expectations.expectations as gxe

    return [gxe.ExpectColumnValuesToBeUnique(column="item_id"),
            gxe.ExpectColumnValuesToBeBetween(column="score", min_value=0.0, max_value=1.0),
            gxe.ExpectColumnValuesToNotBeNull(column="model_version"),
            gxe.ExpectColumnValuesToBeBetween(column="reasons", min_value=0, max_value=6)]


def _qualified_frame(db, flow: str, days: list[str], cfg) -> Any:
    def keep(r):
        d = r.data
        if "tier" not in d:
            return None
        return {"item_id": r.item_id, "tier": d["tier"],
                "consent_respected": (d.get("channel") != "email" or logic.may_email(d)[0])
                and (d.get("channel") != "call" or logic.may_call(d)[0]),
                "hot_has_owner_or_waits": d["tier"] != "hot" or bool(d.get("owner"))
                or "no_rep_capacity" in (d.get("approval_reasons") or []),
                "tier_matches_score": d.get("tier_reason", "").startswith("set by") or d["tier"] == "cold"
                or logic.tier_of(float(d["score"]), cfg.settings) == d["tier"]}
    return _frame(db, flow, days, keep)


def _qualified_expectations(cfg) -> list:
    import great_expectations.expectations as gxe

    return [gxe.ExpectColumnValuesToBeUnique(column="item_id"),
            gxe.ExpectColumnValuesToBeInSet(column="tier", value_set=list(logic.TIERS)),
            *(gxe.ExpectColumnValuesToBeInSet(column=c, value_set=[True])
              for c in ("consent_respected", "hot_has_owner_or_waits", "tier_matches_score"))]


def _drafts_frame(db, flow: str, days: list[str], cfg) -> Any:
    return _frame(db, flow, days, lambda r: {"item_id": r.item_id, "draft": r.data["draft"]}
                  if r.data.get("draft") else None)


def _drafts_expectations(cfg) -> list:
    from ...lib.guardrails import quality

    return quality.outbound_expectations("draft")


def _setup_jobs(db) -> list[str]:
    """Train, gate and promote the lead scorer on first use (a few seconds); later runs reuse it."""
    from ...lib.llm.registry import promoted_model_path

    return [] if promoted_model_path(db, logic.SCORE_TASK)[0] is not None else ["train_lead_score_model_job"]


SPEC = FlowSpec(
    name=logic.FLOW,
    folder=logic.FOLDER,
    title="Lead handling",
    config=logic.CFG,
    first_day=logic.FIRST_DAY,
    intake=IntakeSpec(
        to_item=logic.to_item, suffixes=(".json", ".csv"), parse_file=logic.parse_file, peek=logic.peek_file,
        text_fields=("notes", "attributes"), asset="intake",
        description="Leads from web-form JSON files and CSV imports in the inbox folder and CRM webhook events in the "
                    "inbox table: validated against the LeadRecord contract (a bad CSV row is dead-lettered with its "
                    "row number and reason while the rest of the file goes on), name / e-mail / phone kept only in "
                    "the vault, notes and free-text columns masked."),
    stages=[
        Stage("match", loads="received", sets="matched", fn=logic.match_stage, kind="connector",
              description="Dedup against the CRM (crm_contacts connector) and the flow's earlier leads: normalised "
                          "e-mail, E.164 phone, fuzzy name + company (rapidfuzz) -> merge / new / uncertain, the "
                          "reason audited; a merged lead inherits the contact's consent flags."),
        Stage("enrich", loads="matched", sets="enriched", fn=logic.enrich_stage, kind="connector",
              description="E-mail syntax (no DNS), free-mail and disposable domains, company from the directory "
                          "connector (retried; skipped with the reason when down, never blocking), country and time "
                          "zone from the phone, seniority from the title; each value with its source."),
        Stage("score", loads="enriched", sets="scored", fn=logic.score_stage, kind="model", tasks=(logic.SCORE_TASK,),
              logic_version=logic.STEP_LOGIC_VERSION["score"], deps=("lead_score_model_promotion",),
              description="Calibrated conversion probability and its reasons from the governed lead_score model "
                          "through the LLM gateway (attributes only: no name, e-mail or phone)."),
        Stage("qualify", loads="scored", sets="qualified", fn=logic.qualify_stage,
              description="Hot / warm / cold from the brief; hot -> a rep of the territory (round robin within "
                          "capacity), warm -> nurture, cold -> archived with the reason; channels by consent; what a "
                          "person must decide is named."),
        Stage("first_touch", loads="qualified", sets="drafted", fn=engage.first_touch_stage, kind="model",
              tasks=(logic.DRAFT_TASK,), logic_version=logic.STEP_LOGIC_VERSION["first_touch"],
              description="The first e-mail of each hot lead through the gateway (personalised from enrichment, "
                          "masked), held to the policy: opt-out line, no prices or banned claims, no personal data."),
        Stage("review_gate", loads="drafted", sets="approved", branches=("awaiting_review",),
              fn=engage.review_gate_stage,
              description="Uncertain match, high-value company, borderline score, a draft that breaks the policy or "
                          "no rep free: the sales manager decides (approvals queue, audited); the rest go on."),
        Stage("crm_upsert", loads="approved", sets="in_crm", fn=engage.crm_upsert_stage, kind="connector", waits=True,
              description="CRM contact + deal stage and the activity log through the outbox, exactly once; a step "
                          "failed for good reverts the contact change (compensation) and dead-letters the lead."),
        Stage("engage", loads="in_crm", sets="resolved", fn=engage.engage_stage, kind="connector", waits=True,
              description="Hot leads: the first touch (or a call task when only a call is allowed), exactly once and "
                          "only with consent; warm leads go into nurture, cold ones stay archived."),
    ],
    ops=[
        OpsStage("outbox_redelivery", fn=engage.redelivery_stage, kind="connector", after=("crm_upsert", "engage"),
                 description="Effects still in the outbox are delivered again behind the breakers; waiting leads move "
                             "on, or are compensated and dead-lettered once a step failed for good."),
        OpsStage("re_enrich", fn=logic.re_enrich_stage, kind="connector", after=("enrich",),
                 description="Leads enriched while the company directory was down are looked up again once it "
                             "answers; a lead already in the CRM gets its contact's company updated."),
        OpsStage("responses", fn=engage.responses_stage, kind="connector", after=("engage",),
                 description="Replies, bounces and unsubscribes from messaging and conversions from the CRM: each stops "
                             "nurture with its reason; a reply moves the contact to Engaged."),
        OpsStage("nurture", fn=engage.nurture_stage, kind="connector", after=("responses",),
                 description="The brief's nurture sequence, each step in the lead's local business hours, exactly once, "
                             "consent checked again on the lead and its CRM contact."),
    ],
    model_tasks={logic.SCORE_TASK: ModelTask(output=logic.LeadScoreOutput, local=model.lead_score_local_task),
                 logic.DRAFT_TASK: ModelTask(output=engage.FirstTouchOutput)},
    models=[GovernedModel(
        task=logic.SCORE_TASK, asset="lead_score_model", train=model.train_candidate,
        evaluate=model.evaluate_candidate, config=model.LeadScoreTrainingConfig, metric="auc",
        description="Candidate lead-scoring model trained on the flow's labelled history (ORCH_LEADS_HISTORY or the "
                    "seeded generated one) minus a fixed stratified holdout: column roles from the data, gradient "
                    "boosting, Platt-calibrated probabilities, per-lead reasons. Registered as a candidate.")],
    effects=engage.EFFECTS,
    compensations=engage.COMPENSATIONS,
    systems=[logic.DIRECTORY],
    review=ReviewSpec(fields=("tier", "score", "approval_reasons", "owner", "channel"), apply_edit=engage.apply_review,
                      edit_label="decision", mask_edit=False),
    checks=[
        GXCheck("match", "match_decisions_valid",
                "Great Expectations on matched leads: unique ids, a known decision, a contact for every lead, a "
                "candidate for every uncertain match, consent flags set.", _matched_frame, _matched_expectations),
        GXCheck("score", "scores_in_range",
                "Great Expectations on scored leads: probabilities in [0, 1], the serving model's version recorded, "
                "at most six reasons.", _scored_frame, _scored_expectations),
        GXCheck("qualify", "routing_respects_consent",
                "Great Expectations on qualified leads: a known tier that matches the score (or a person's choice), "
                "an e-mail or call channel only where consent allows it, an owner for every hot lead (or a person "
                "decides).", _qualified_frame, _qualified_expectations),
        GXCheck("first_touch", "first_touch_outbound_clean",
                "Great Expectations on first-touch drafts: no raw e-mail address, card number, SSN or IBAN.",
                _drafts_frame, _drafts_expectations),
    ],
    report=reporting.kpi_report,
    demo=DemoSpec(seed=lazy(f"{__package__}.sample_data:seed_demo"), setup_jobs=_setup_jobs,
                  before_ops=lazy(f"{__package__}.sample_data:demo_world"),
                  summary=lazy(f"{__package__}.sample_data:demo_summary")),
)

defs = build_flow(SPEC)
