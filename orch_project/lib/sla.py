"""SLA escalation for any flow: open items past their first-response due date (``items.due_at``)
are escalated once: the approval (if any) moves to the brief's escalation role with a new due date,
the item records who it went to, and an alert goes out through the messaging outbox. Audited."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import sqlalchemy as sa

from .connectors.embedded import Effect
from .outbox import dispatch, idempotency_key
from .pipeline import ItemUpdate, StageEnv, StageReport, commit_stage, load_items
from .store import approvals, items, utcnow


def escalation_stage(env: StageEnv, cfg: Any, connectors: Any, now: datetime | None = None) -> StageReport:
    """``cfg`` is the flow's FlowConfig (brief: approval.escalation_role and sla_hours; roster)."""
    from .approvals import escalated_due

    started = utcnow()
    now = now or started
    open_statuses = env.spec.open_statuses
    flow = env.flow
    rows = [r for r in load_items(env, open_statuses) if r["due_at"] is not None and r["due_at"] < now]
    with env.db.begin() as conn:
        levels = dict(conn.execute(sa.select(items.c.item_id, items.c.escalation_level).where(
            items.c.flow == flow, items.c.status.in_(open_statuses), items.c.due_at < now)).all())
    rows = [r for r in rows if levels.get(r["item_id"], 0) == 0]
    role = cfg.brief.approval.escalation_role
    people = [p["id"] for p in cfg.roster if p.get("role") == role] or [f"{role}s"]
    updates, effects, audit_rows = [], [], []
    for n, r in enumerate(rows):
        overdue_h = (now - r["due_at"]).total_seconds() / 3600.0
        who = people[n % len(people)]
        updates.append(ItemUpdate(r["item_id"], r["status"], {**r["data"], "escalated_to": who}, "routed",
                                  columns={"escalated_at": now, "escalation_level": 1}))
        effects.append(Effect(idempotency_key(flow, r["item_id"], "escalation_1"), "messaging", "send_alert",
                              r["item_id"], r["trace_id"], {
                                  "kind": "escalation", "recipient": f"role:{role}:{who}",
                                  "subject": f"SLA breached: {r['item_id']} ({r['data'].get('priority')})",
                                  "body": f"Item {r['item_id']} in status {r['status']} is {overdue_h:.1f} h past "
                                          f"its first-response due time. Trace {r['trace_id']}."}))
        audit_rows.append({"actor": "system:sla", "action": "escalated", "flow": flow, "item_id": r["item_id"],
                           "trace_id": r["trace_id"], "reason": f"{overdue_h:.1f} h past due",
                           "outputs": {"to_role": role, "to": who}})
    if rows:
        with env.db.begin() as conn:
            # the approval moves to the escalation role with a new due date (the approval escalation
            # sensor acts on it again only when that one passes too)
            conn.execute(approvals.update().where(approvals.c.flow == flow, approvals.c.item_id == sa.bindparam("k"),
                                                  approvals.c.status == "pending")
                         .values(required_role=role, due_at=sa.bindparam("new_due")),
                         [{"k": r["item_id"], "new_due": escalated_due(now, r["data"].get("priority"),
                                                                       cfg.brief.sla_hours)} for r in rows])
    report = commit_stage(env, "escalation", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                          effects=effects, audit_rows=audit_rows, metadata={"escalated": len(updates)},
                          set_stage=False)
    # the alerts only: an item's other effects waiting in the outbox go out through their own stage's checks
    sent = (dispatch(env.db, connectors, flow, keys=[e.idempotency_key for e in effects], policy=cfg.connector_policy)
            if effects else {"delivered": 0})
    report.metadata["alerts_delivered"] = sent["delivered"]
    return report
