"""The document workflow (accounts payable), declared once; the kit builds its Dagster objects:

    documents_intake -> documents_extract -> documents_validate -> documents_review_gate -> documents_post
    ops (after each run and every 15 minutes): documents_outbox_redelivery, documents_labelled_examples,
      documents_escalations, documents_dlq_backlog, documents_kpi_report; documents_raw_retention nightly.
"""

from __future__ import annotations

from typing import Any

from ...kit import GXCheck, build_flow, items_frame
from ...lib.flows import DemoSpec, FlowSpec, IntakeSpec, ModelTask, OpsStage, ReviewSpec, Stage, lazy
from . import logic, reporting
from .schema import ExtractionOutput
from .validation import ISO_4217, RULES, amount


def _frame(db, flow: str, days: list[str], keep) -> Any:
    """Extracted documents of the partition still in the flow, through ``keep(item_id, status, data)``."""
    from ...lib.store import items

    return items_frame(db, flow, days, lambda r: keep(r.item_id, r.status, r.data) if r.data.get("fields") else None,
                       items.c.status != "dead_lettered")


def _extracted_frame(db, flow: str, days: list[str], cfg) -> Any:
    def keep(item_id, status, d):
        f = d["fields"]
        return {"item_id": item_id, "total_confidence": f["total"]["confidence"],
                "date_confidence": f["date"]["confidence"], "vendor_confidence": f["vendor"]["confidence"],
                "currency": f["currency"]["value"], "date": f["date"]["value"],
                # fields read off the page carry where (a currency may be inferred from the country)
                "has_provenance": all(bool(f[k]["provenance"]) for k in ("vendor", "number", "date", "total")
                                      if f[k]["value"] and f[k].get("source") != "reviewer")}
    return _frame(db, flow, days, keep)


def _extracted_expectations(cfg) -> list:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToBeUnique(column="item_id"),
        *(gxe.ExpectColumnValuesToBeBetween(column=c, min_value=0.0, max_value=1.0)
          for c in ("total_confidence", "date_confidence", "vendor_confidence")),
        gxe.ExpectColumnValuesToBeInSet(column="currency", value_set=sorted(ISO_4217)),  # nulls are not checked
        gxe.ExpectColumnValuesToMatchRegex(column="date", regex=r"^\d{4}-\d{2}-\d{2}$"),
        gxe.ExpectColumnValuesToBeInSet(column="has_provenance", value_set=[True]),
    ]


def _validated_frame(db, flow: str, days: list[str], cfg) -> Any:
    def keep(item_id, status, d):
        return {"item_id": item_id, "rules_run": len(d.get("validation") or []),
                "needs_review": d.get("needs_review"),
                "consistent": bool(d.get("needs_review")) == any(not c["ok"] for c in d.get("validation") or [])}
    return _frame(db, flow, days, lambda i, s, d: keep(i, s, d) if "validation" in d else None)


def _validated_expectations(cfg) -> list:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToBeUnique(column="item_id"),
        gxe.ExpectColumnValuesToBeBetween(column="rules_run", min_value=len(RULES), max_value=len(RULES)),
        gxe.ExpectColumnValuesToBeInSet(column="needs_review", value_set=[True, False]),
        gxe.ExpectColumnValuesToBeInSet(column="consistent", value_set=[True]),
    ]


def _posted_frame(db, flow: str, days: list[str], cfg) -> Any:
    def keep(item_id, status, d):
        if status not in ("posted", "resolved"):
            return None
        f = {k: fv["value"] for k, fv in d["fields"].items()}
        total = amount(f["total"])
        return {"item_id": item_id, "vendor": f["vendor"], "date": f["date"], "currency": f["currency"],
                "total": float(total) if total is not None else None}
    return _frame(db, flow, days, keep)


def _posted_expectations(cfg) -> list:
    import great_expectations.expectations as gxe

    return [
        gxe.ExpectColumnValuesToBeUnique(column="item_id"),
        *(gxe.ExpectColumnValuesToNotBeNull(column=c) for c in ("vendor", "date", "currency", "total")),
        gxe.ExpectColumnValuesToBeBetween(column="total", min_value=0.0),
        gxe.ExpectColumnValuesToBeInSet(column="currency", value_set=sorted(ISO_4217)),
    ]


def _reviewers_decide(settings, db) -> str:
    from .sample_data import demo_reviews

    return demo_reviews(db)


def _summary(settings) -> list[tuple[str, str]]:
    import sqlalchemy as sa

    from ..resources import _embedded

    conn_db = _embedded(settings.connectors_url).db
    with conn_db.begin() as conn:
        if not sa.inspect(conn).has_table(logic.ap_bills.name):
            return [("connectors", "no bills yet")]
        counts = dict(conn.execute(sa.select(logic.ap_bills.c.status, sa.func.count()).group_by(
            logic.ap_bills.c.status)).all())
        runs = conn.execute(sa.select(sa.func.count()).select_from(logic.payment_runs)).scalar_one() if sa.inspect(
            conn).has_table(logic.payment_runs.name) else 0
    return [("connectors", f"AP bills posted {counts.get('posted', 0)}, voided {counts.get('void', 0)}, "
                           f"payment runs {runs}")]


SPEC = FlowSpec(
    name=logic.FLOW,
    folder=logic.FOLDER,
    title="Document workflow",
    config=logic.CFG,
    first_day=logic.FIRST_DAY,
    intake=IntakeSpec(
        to_item=logic.to_item, suffixes=("",), parse_file=logic.parse_file, peek=logic.peek_file,
        text_fields=("lines",), asset="intake_documents",
        description="Documents from the inbox folder (PDF with a text layer, PNG/JPEG/TIFF through offline OCR, OCR "
                    "line files, text) and the inbox table (registered paths): read into lines with boxes, personal "
                    "data masked, the file hash as the item id (a re-submitted file is a duplicate). Unreadable, "
                    "encrypted, empty, oversized or unsupported files go to the dead-letter queue with a reason."),
    stages=[
        Stage("extract", loads="received", sets="extracted", fn=logic.extract_stage, kind="model",
              tasks=(logic.TASK,), logic_version=logic.STEP_LOGIC_VERSION["extract"],
              description="Fields to the ExtractionOutput contract through the LLM gateway (embedded layout "
                          "extractor, or an OpenAI-compatible model with structured output), each with a "
                          "confidence and its provenance (page, line, box)."),
        Stage("validate", loads="extracted", sets="validated", fn=logic.validate_stage,
              logic_version=logic.STEP_LOGIC_VERSION["validate"],
              description="Named rules: schema, line arithmetic, subtotal, total, plausible date, currency, tax-id "
                          "checksum, duplicates, per-field confidence (thresholds from brief.yaml)."),
        Stage("review_gate", loads="validated", sets="approved", branches=("awaiting_review",),
              fn=logic.review_gate_stage,
              description="A failed rule, a low confidence or a total above the brief's amount waits for a person "
                          "(approvals queue, with the failing fields); above the amount a second person signs off. "
                          "The rest is approved by policy; every decision is audited."),
        Stage("post", loads="approved", sets="posted", fn=logic.post_stage, kind="connector", waits=True,
              description="AP bill to the accounting connector and its payment run to the payments connector "
                          "through the outbox, exactly once; a bill whose payment cannot be scheduled is voided "
                          "and the document dead-lettered; a bill already posted by another document is refused."),
        Stage("notify", loads="posted", sets="resolved", fn=logic.notify_stage, kind="connector", waits=True,
              description="The submitter (or the AP inbox channel) is told the bill is posted, exactly once, and "
                          "only after it is."),
    ],
    ops=[
        OpsStage("outbox_redelivery", fn=logic.redelivery_stage, kind="connector", after=("post", "notify"),
                 description="Effects still in the outbox are delivered again behind the circuit breakers; waiting "
                             "documents are posted, or compensated and dead-lettered once a step failed for good."),
        OpsStage("labelled_examples", fn=logic.labelled_examples_stage, after=("notify",),
                 description="Reviewers' corrections kept as labelled examples (masked lines + final fields) for the "
                             "next extractor version: $ORCH_HOME/datasets/documents_labelled.jsonl."),
    ],
    model_tasks={logic.TASK: ModelTask(output=ExtractionOutput, local=logic.extract_local_task)},
    effects=logic.EFFECTS,
    compensations=logic.COMPENSATIONS,
    systems=[logic.ACCOUNTING, logic.PAYMENTS],
    review=ReviewSpec(fields=("name", "approval_reasons", "failed_rules"), apply_edit=logic.apply_corrections,
                      edit_label="fields", mask_edit=False, second_role=logic.second_role),
    checks=[
        GXCheck("extract", "extraction_contract_holds",
                "Great Expectations on the extracted batch: unique ids, confidences in [0, 1], ISO 4217 currencies, "
                "ISO dates, provenance (page, line, box) on every vendor, number, date and total read.", _extracted_frame, _extracted_expectations),
        GXCheck("validate", "every_rule_ran",
                "Great Expectations on the validated batch: every rule ran on every document and needs_review agrees "
                "with the failed rules.", _validated_frame, _validated_expectations),
        GXCheck("post", "posted_bills_complete",
                "Great Expectations on posted documents: vendor, date, currency and total present, totals not "
                "negative, currencies ISO 4217.", _posted_frame, _posted_expectations),
    ],
    report=reporting.kpi_report,
    demo=DemoSpec(seed=lazy(f"{__package__}.sample_data:seed_demo"), before_ops=_reviewers_decide, summary=_summary),
)

defs = build_flow(SPEC)
