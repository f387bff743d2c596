"""Blocking guardrail checks every flow gets, plus the flow's own Great Expectations suites.

An ERROR failure stops downstream assets of the same run; results show on each asset's Checks tab.
- ``<intake>_nothing_lost``: every source read is an item, a duplicate, or a dead letter with a reason;
- ``<intake>_pii_masked``: no unmasked e-mail, SSN, card number or IBAN in the stored item text;
- one check per ``GXCheck`` of the spec (a frame of the stage's batch against an expectation suite);
- ``<stage>_no_duplicate_effects`` on every connector stage that waits on its effects (the act stages):
  no item of the flow has the same record twice in any system.
"""


from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import dagster as dg
import sqlalchemy as sa

from ..defs.resources import AppDatabase, Connectors
from ..lib.flows import FlowSpec
from ..lib.store import dlq, intake, items


@dataclass(frozen=True)
class GXCheck:
    """A Great Expectations suite on a stage's batch: ``frame(db, flow, days, cfg)`` builds the pandas
    frame, ``expectations(cfg)`` the ``gx.expectations`` list. The suite must evaluate at least one
    expectation on a non-empty batch (an empty batch passes with nothing to validate, reported so)."""

    stage: str
    name: str
    description: str
    frame: Callable[..., Any]
    expectations: Callable[[Any], list]

    def __post_init__(self) -> None:
        if not callable(self.frame) or not callable(self.expectations):
            raise TypeError(f"GX check {self.name!r}: frame and expectations must be callables")


def gx_result(result, **extra) -> dg.AssetCheckResult:
    """A Great Expectations validation as a blocking ERROR check, each expectation in the metadata."""
    failed = [f"{e['expectation']}({e['column']}): {e['unexpected']} unexpected" for e in result.failed]
    return dg.AssetCheckResult(
        passed=result.success, severity=dg.AssetCheckSeverity.ERROR,
        description="; ".join(failed) if failed else None,
        metadata={"rows_validated": result.rows, "expectations": len(result.expectations),
                  "expectations_failed": len(failed), "great_expectations": dg.MetadataValue.md(result.markdown()),
                  "failed_examples": dg.MetadataValue.json({f: e["examples"] for f, e in zip(failed, result.failed)}),
                  **extra})


def items_frame(db, flow: str, days: Sequence[str], keep: Callable[[Any], dict[str, Any] | None], *where) -> Any:
    """A check's frame: one row per item of ``flow`` in the partition ``days`` (and ``where`` clauses on the
    items table) for which ``keep(row)`` returns a dict (``row``: item_id, status, stage, due_at, data)."""
    import pandas as pd

    q = sa.select(items.c.item_id, items.c.status, items.c.stage, items.c.due_at, items.c.data).where(
        items.c.flow == flow, items.c.day.in_(list(days)), *where)
    with db.begin() as conn:
        rows = conn.execute(q).all()
    return pd.DataFrame([r for row in rows if (r := keep(row)) is not None])


def flow_checks(spec: FlowSpec, daily, stage_assets: Sequence[dg.AssetsDefinition]) -> list:
    from .build import stage_asset_key

    flow = spec.name
    inbound = stage_asset_key(spec, "intake")
    out = []

    @dg.asset_check(asset=inbound, name=f"{spec.intake.asset}_nothing_lost", blocking=True, partitions_def=daily,
                    description="Nothing lost at intake: every source read is an item, a duplicate, or a dead "
                                "letter with a reason.")
    def nothing_lost(context: dg.AssetCheckExecutionContext, app_db: AppDatabase) -> dg.AssetCheckResult:
        days = list(context.partition_keys)
        with app_db.database().begin() as conn:
            accepted = conn.execute(sa.select(intake.c.item_id).where(
                intake.c.flow == flow, intake.c.day.in_(days), intake.c.outcome == "accepted")).scalars().all()
            stored = set(conn.execute(sa.select(items.c.item_id).where(
                items.c.flow == flow, items.c.day.in_(days))).scalars())
            dead_sources = set(conn.execute(sa.select(intake.c.source_key).where(
                intake.c.flow == flow, intake.c.day.in_(days), intake.c.outcome == "dead_lettered")).scalars())
            in_dlq = set(conn.execute(sa.select(dlq.c.source_key).where(
                dlq.c.flow == flow, dlq.c.stage == "intake")).scalars())
        missing_items = [i for i in accepted if i not in stored]
        missing_dlq = sorted(dead_sources - in_dlq)
        return dg.AssetCheckResult(
            passed=not missing_items and not missing_dlq,
            metadata={"accepted": len(accepted), "missing_items": len(missing_items),
                      "dead_letters": len(dead_sources), "dead_letters_without_dlq_entry": len(missing_dlq)})

    fields = spec.intake.text_fields

    @dg.asset_check(asset=inbound, name=f"{spec.intake.asset}_pii_masked", blocking=True, partitions_def=daily,
                    description=f"No unmasked e-mail, SSN, card number or IBAN in stored item text "
                                f"({', '.join(fields)}).")
    def pii_masked(context: dg.AssetCheckExecutionContext, app_db: AppDatabase) -> dg.AssetCheckResult:
        from ..lib.guardrails.pii import find_unmasked

        with app_db.database().begin() as conn:
            rows = conn.execute(sa.select(items.c.item_id, items.c.data).where(
                items.c.flow == flow, items.c.day.in_(list(context.partition_keys)))).all()
        leaks = {}
        for item_id, data in rows:
            hit = find_unmasked("\n".join(_text_of(data.get(f)) for f in fields))
            if hit:
                leaks[item_id] = hit
        return dg.AssetCheckResult(passed=not leaks, metadata={
            "items_scanned": len(rows), "items_with_pii": len(leaks),
            "examples": dg.MetadataValue.json(dict(list(leaks.items())[:5]))})

    out += [nothing_lost, pii_masked]
    for gx in spec.checks:
        out.append(_gx_check(spec, daily, gx))
    for st in spec.stages:
        if st.kind == "connector" and st.waits:
            out.append(_duplicates_check(spec, st.name))
    return out


def _text_of(value) -> str:
    """A text field as the PII check scans it: a string, a list of lines ({"text": ...} or strings), or a
    mapping of named values (e.g. a form's other columns)."""
    if isinstance(value, dict):
        return "\n".join(str(v) for v in value.values() if isinstance(v, str))
    if isinstance(value, list):
        return "\n".join(str(v.get("text") or "") if isinstance(v, dict) else str(v) for v in value)
    return str(value or "")


def _gx_check(spec: FlowSpec, daily, gx: GXCheck):
    from .build import stage_asset_key

    @dg.asset_check(asset=stage_asset_key(spec, gx.stage), name=gx.name, blocking=True, partitions_def=daily,
                    description=gx.description)
    def check(context: dg.AssetCheckExecutionContext, app_db: AppDatabase) -> dg.AssetCheckResult:
        from ..lib.guardrails import quality

        frame = gx.frame(app_db.database(), spec.name, list(context.partition_keys), spec.config)
        expectations = gx.expectations(spec.config)
        if not expectations:  # a suite that checks nothing must not pass as a guardrail
            return dg.AssetCheckResult(passed=False, severity=dg.AssetCheckSeverity.ERROR,
                                       description=f"suite {gx.name} has no expectations")
        return gx_result(quality.validate(f"{spec.name}_{gx.stage}", frame, expectations))

    return check


def _duplicates_check(spec: FlowSpec, stage: str):
    from .build import stage_asset_key

    @dg.asset_check(asset=stage_asset_key(spec, stage), name=f"{stage}_no_duplicate_effects", blocking=True,
                    description="Exactly-once side effects: no item has the same effect twice in any connector "
                                "(an effect undone by its compensation does not count).")
    def check(connectors: Connectors) -> dg.AssetCheckResult:
        dups = connectors.client().duplicates(spec.name)
        return dg.AssetCheckResult(passed=not any(dups.values()), metadata={k: int(v) for k, v in dups.items()})

    return check
