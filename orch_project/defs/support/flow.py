"""The customer support loop, declared once: its stages in order, the status each loads and sets, its
model tasks, allowed side effects and their compensations, checks, reviewer view and ops steps. The
kit (orch_project/kit) builds every Dagster object from this spec:

    support_inbound -> support_triage -> support_assignment -> support_knowledge -> support_drafts
      -> support_approval_gate -> support_actions -> support_surveys
    ops (after each run and every 15 minutes): support_outbox_redelivery, support_csat, support_insights,
      support_escalations, support_dlq_backlog, support_kpi_report; support_raw_retention nightly.
"""

from __future__ import annotations

from typing import Any

from ...kit import GXCheck, build_flow, items_frame
from ...lib.flows import DemoSpec, FlowSpec, IntakeSpec, ModelTask, OpsStage, ReviewSpec, Stage
from . import logic, reporting
from .triage_model import triage_local_task

CFG = logic.SupportConfig()


def _triage_frame(db, flow: str, days: list[str], cfg) -> Any:
    """The triaged batch: items past intake and still in the flow."""
    from ...lib.store import items

    return items_frame(db, flow, days, lambda r: {
        "item_id": r.item_id, "intent": r.data.get("intent"), "confidence": r.data.get("confidence"),
        "priority": r.data.get("priority"), "queue": r.data.get("queue"), "due_at": r.due_at},
        items.c.stage != "intake", items.c.status != "dead_lettered")


def _triage_expectations(cfg) -> list:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToBeUnique(column="item_id"),
        gxe.ExpectColumnValuesToBeInSet(column="intent", value_set=cfg.intent_labels),
        gxe.ExpectColumnValuesToNotBeNull(column="confidence"),
        gxe.ExpectColumnValuesToBeBetween(column="confidence", min_value=0.0, max_value=1.0),
        gxe.ExpectColumnValuesToBeInSet(column="priority", value_set=["low", "medium", "high"]),
        gxe.ExpectColumnValuesToNotBeNull(column="queue"),
        gxe.ExpectColumnValuesToNotBeNull(column="due_at"),  # SLA field
    ]


def _drafts_frame(db, flow: str, days: list[str], cfg) -> Any:
    return items_frame(db, flow, days, lambda r: {"item_id": r.item_id, "draft": r.data["draft"]}
                       if r.data.get("draft") else None)


def _outbound_expectations(cfg) -> list:
    from ...lib.guardrails import quality

    return quality.outbound_expectations("draft")


def apply_draft_edit(data: dict[str, Any], text: str, reviewer: str, at: str) -> tuple[dict[str, Any], Any]:
    """A reviewer's corrected reply (already PII-masked) replaces the draft; returns the old one."""
    return {**data, "draft": text, "draft_edited_by": reviewer, "draft_edited_at": at}, data.get("draft")


def _seed(submit) -> dict:
    from .sample_data import SAMPLES_DIR

    return submit([SAMPLES_DIR / "inbox", SAMPLES_DIR / "malformed", SAMPLES_DIR / "inbox_table.jsonl"])


def _setup_jobs(db) -> list[str]:
    """Train and promote the triage model on first use (about 40 s); later runs reuse it."""
    from ...lib.llm.registry import promoted_model_path

    return [] if promoted_model_path(db, "triage")[0] is not None else ["train_triage_model_job"]


def _customers_answer(settings, db) -> str:
    """The shipped survey answers of surveyed items arrive through the messaging connector."""
    import json
    from datetime import datetime

    import sqlalchemy as sa

    from ...lib.store import items
    from ..resources import _embedded
    from .sample_data import SAMPLES_DIR

    with db.begin() as conn:
        surveyed = {iid for iid, d in conn.execute(sa.select(items.c.item_id, items.c.data).where(
            items.c.flow == logic.FLOW, items.c.status == "resolved")) if d.get("survey_sent_at")}
    answers = []
    for line in (SAMPLES_DIR / "csat_responses.jsonl").read_text(encoding="utf-8").splitlines():
        a = json.loads(line)
        if a["message_id"] in surveyed:
            answers.append({"item_id": a["message_id"], "score": int(a["score"]), "comment": a.get("comment"),
                            "responded_at": datetime.fromisoformat(a["responded_at"].replace("Z", "+00:00"))})
    n = _embedded(settings.connectors_url).record_survey_responses(answers)
    return f"customers answer their surveys: {n} new answers recorded by the messaging connector"


def _summary(settings) -> list[tuple[str, str]]:
    from ..resources import _embedded

    c = _embedded(settings.connectors_url).counts(logic.FLOW)
    return [("connectors", f"tickets {c['tickets']}, CRM entries {c['crm_activities']}, messages {c['messages']}, "
                           f"survey answers {c['survey_responses']}")]


SPEC = FlowSpec(
    name=logic.FLOW,
    folder=logic.FOLDER,
    title="Support loop",
    config=CFG,
    first_day=logic.FIRST_DAY,
    intake=IntakeSpec(
        to_item=logic.to_item, suffixes=(".eml", ".json"), text_fields=("subject", "body"), asset="inbound",
        description="Inbound messages from the inbox folder (.eml/.json) and the inbox table: validated against "
                    "the InboundMessage contract, PII-masked, stored as items. Invalid input goes to the "
                    "dead-letter queue with a reason; each source is read exactly once."),
    stages=[
        Stage("triage", loads="received", sets="triaged", fn=logic.triage_stage, kind="model", tasks=("triage",),
              logic_version=logic.STEP_LOGIC_VERSION["triage"], deps=("triage_model_promotion",),
              description="Intent (model via the LLM gateway), priority and queue (taxonomy + urgency), SLA due "
                          "date."),
        Stage("assignment", loads="triaged", sets="assigned", fn=logic.assign_stage,
              description="Assignee from roster.yaml: least loaded (open items / capacity) person serving the "
                          "queue."),
        Stage("knowledge", loads="assigned", sets="grounded", fn=logic.knowledge_stage,
              description="Knowledge lookup: the best shipped article (TF-IDF similarity, boosted by intent)."),
        Stage("draft", loads="grounded", sets="drafted", fn=logic.draft_stage, kind="model", tasks=("draft_reply",),
              logic_version=logic.STEP_LOGIC_VERSION["draft_reply"], asset="drafts",
              description="Draft reply grounded in the retrieved article (through the LLM gateway), with "
                          "citation."),
        Stage("approval_gate", loads="drafted", sets="approved", branches=("awaiting_approval",),
              fn=logic.approval_gate_stage,
              description="Approval gate: high priority, low confidence, out of scope, a suspected injection or a "
                          "draft that breaks the policy waits for a reviewer (approvals table); the rest is "
                          "approved by policy. Every decision is audited."),
        Stage("actions", loads="approved", sets="resolved", fn=logic.actions_stage, kind="connector", waits=True,
              description="Ticket, reply and CRM log through the outbox with idempotency keys; items whose "
                          "effects were all delivered are resolved, a step failed for good is compensated."),
        Stage("survey", loads="resolved", after="actions", sets="resolved", fn=logic.survey_stage,
              kind="connector", asset="surveys", description="Satisfaction survey to every resolved item, "
                                                             "exactly once."),
    ],
    ops=[
        OpsStage("outbox_redelivery", fn=logic.redelivery_stage, kind="connector", after=("actions", "survey"),
                 description="Self-healing: effects still in the outbox (a connector was down) are delivered again "
                             "behind the connectors' circuit breakers; items waiting for them are resolved and "
                             "surveyed, or compensated and dead-lettered once an effect has failed for good "
                             "(connectors.yaml)."),
        OpsStage("csat", fn=logic.csat_stage, kind="connector", after=("survey",),
                 description="CSAT answers folded back into their items (answers arrive days after the survey)."),
        OpsStage("insights", fn=logic.insights_stage, after=("csat",),
                 description="Insights to the backlog: top intents, rising intents and worst-CSAT intents."),
    ],
    model_tasks={
        "triage": ModelTask(output=logic.TriageOutput, local=triage_local_task),
        "draft_reply": ModelTask(output=logic.DraftOutput),
    },
    effects=logic.EFFECTS,
    compensations=logic.COMPENSATIONS,
    review=ReviewSpec(fields=("priority", "intent", "queue", "confidence"), apply_edit=apply_draft_edit,
                      edit_label="draft"),
    checks=[
        GXCheck("triage", "triage_labels_valid",
                "Great Expectations on the triaged batch: unique ids, labels in the taxonomy (or unknown), confidence "
                "in [0, 1], priority and queue set, SLA due date present.", _triage_frame, _triage_expectations),
        GXCheck("draft", "drafts_outbound_clean",
                "Great Expectations on outbound drafts: no raw e-mail address, card number, SSN or IBAN in any draft "
                "about to be sent.", _drafts_frame, _outbound_expectations),
    ],
    report=reporting.kpi_report,
    demo=DemoSpec(seed=_seed, setup_jobs=_setup_jobs, before_ops=_customers_answer, summary=_summary),
)

defs = build_flow(SPEC)
