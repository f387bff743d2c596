"""Blocking guardrail checks on each batch (partition) of the support loop. An ERROR failure
stops downstream assets of the same run; results show on each asset's Checks tab."""


import dagster as dg
import sqlalchemy as sa

from ...lib.guardrails.pii import find_unmasked
from ...lib.store import dlq, intake, items
from ..resources import AppDatabase, Connectors
from . import logic
from .assets import CFG, daily, support_actions, support_drafts, support_inbound, support_triage


def _days(context) -> list[str]:
    return list(context.partition_keys)


@dg.asset_check(asset=support_inbound, blocking=True, partitions_def=daily,
                description="Nothing lost at intake: every source read is an item, a duplicate, or a dead letter "
                            "with a reason.")
def inbound_nothing_lost(context: dg.AssetCheckExecutionContext, app_db: AppDatabase) -> dg.AssetCheckResult:
    days = _days(context)
    db = app_db.database()
    with db.begin() as conn:
        accepted = conn.execute(sa.select(intake.c.item_id).where(
            intake.c.flow == logic.FLOW, intake.c.day.in_(days), intake.c.outcome == "accepted")).scalars().all()
        stored = set(conn.execute(sa.select(items.c.item_id).where(
            items.c.flow == logic.FLOW, items.c.day.in_(days))).scalars())
        dead_sources = set(conn.execute(sa.select(intake.c.source_key).where(
            intake.c.flow == logic.FLOW, intake.c.day.in_(days), intake.c.outcome == "dead_lettered")).scalars())
        in_dlq = set(conn.execute(sa.select(dlq.c.source_key).where(
            dlq.c.flow == logic.FLOW, dlq.c.stage == "intake")).scalars())
    missing_items = [i for i in accepted if i not in stored]
    missing_dlq = sorted(dead_sources - in_dlq)
    return dg.AssetCheckResult(
        passed=not missing_items and not missing_dlq,
        metadata={"accepted": len(accepted), "missing_items": len(missing_items), "dead_letters": len(dead_sources),
                  "dead_letters_without_dlq_entry": len(missing_dlq)},
    )


@dg.asset_check(asset=support_inbound, blocking=True, partitions_def=daily,
                description="No unmasked e-mail, SSN, card number or IBAN in stored item text.")
def inbound_pii_masked(context: dg.AssetCheckExecutionContext, app_db: AppDatabase) -> dg.AssetCheckResult:
    db = app_db.database()
    with db.begin() as conn:
        rows = conn.execute(sa.select(items.c.item_id, items.c.data).where(
            items.c.flow == logic.FLOW, items.c.day.in_(_days(context)))).all()
    leaks = {}
    for item_id, data in rows:
        hit = find_unmasked(f"{data.get('subject') or ''}\n{data.get('body') or ''}")
        if hit:
            leaks[item_id] = hit
    return dg.AssetCheckResult(passed=not leaks, metadata={"items_scanned": len(rows), "items_with_pii": len(leaks),
                                                           "examples": dg.MetadataValue.json(dict(list(leaks.items())[:5]))})


def _gx_result(result, **extra) -> dg.AssetCheckResult:
    """A Great Expectations validation as a blocking ERROR check, each expectation in the metadata."""
    failed = [f"{e['expectation']}({e['column']}): {e['unexpected']} unexpected" for e in result.failed]
    return dg.AssetCheckResult(
        passed=result.success, severity=dg.AssetCheckSeverity.ERROR,
        description="; ".join(failed) if failed else None,
        metadata={"rows_validated": result.rows, "expectations": len(result.expectations),
                  "expectations_failed": len(failed), "great_expectations": dg.MetadataValue.md(result.markdown()),
                  "failed_examples": dg.MetadataValue.json({f: e["examples"] for f, e in zip(failed, result.failed)}),
                  **extra})


@dg.asset_check(asset=support_triage, blocking=True, partitions_def=daily,
                description="Great Expectations on the triaged batch: unique ids, labels in the taxonomy (or "
                            "unknown), confidence in [0, 1], priority and queue set, SLA due date present.")
def triage_labels_valid(context: dg.AssetCheckExecutionContext, app_db: AppDatabase) -> dg.AssetCheckResult:
    import pandas as pd

    from ...lib.guardrails import quality

    db = app_db.database()
    with db.begin() as conn:
        rows = conn.execute(sa.select(items.c.item_id, items.c.data, items.c.due_at).where(
            items.c.flow == logic.FLOW, items.c.day.in_(_days(context)),
            items.c.stage != "intake", items.c.status != "dead_lettered")).all()  # triaged and still in the flow
    frame = pd.DataFrame([{"item_id": i, "intent": d.get("intent"), "confidence": d.get("confidence"),
                           "priority": d.get("priority"), "queue": d.get("queue"), "due_at": due}
                          for i, d, due in rows])
    result = quality.validate("support_triage", frame,
                              quality.triage_expectations(CFG.intent_labels))
    return _gx_result(result)


@dg.asset_check(asset=support_drafts, blocking=True, partitions_def=daily,
                description="Great Expectations on outbound drafts: no raw e-mail address, card number, SSN or "
                            "IBAN in any draft about to be sent.")
def drafts_outbound_clean(context: dg.AssetCheckExecutionContext, app_db: AppDatabase) -> dg.AssetCheckResult:
    import pandas as pd

    from ...lib.guardrails import quality

    db = app_db.database()
    with db.begin() as conn:
        rows = conn.execute(sa.select(items.c.item_id, items.c.data).where(
            items.c.flow == logic.FLOW, items.c.day.in_(_days(context)))).all()
    frame = pd.DataFrame([{"item_id": i, "draft": d["draft"]} for i, d in rows if d.get("draft")])
    return _gx_result(quality.validate("support_drafts", frame, quality.outbound_expectations("draft")))


@dg.asset_check(asset=support_actions, blocking=True,
                description="Exactly-once side effects: no item has two tickets, two replies or two CRM logs.")
def actions_no_duplicate_effects(connectors: Connectors) -> dg.AssetCheckResult:
    dups = connectors.client().duplicates()
    return dg.AssetCheckResult(passed=not any(dups.values()), metadata={k: int(v) for k, v in dups.items()})
