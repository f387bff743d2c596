"""Human-in-the-loop approvals: the reviewer queue, role-checked decisions, due-date escalation
and auto-rejection, all audited. Plain Python over the app database (no Dagster): the ``orch``
CLI, the ``approval_decision_job`` and the approval sensors call the same functions.

Life of an approval row (table ``approvals``; the approval gate creates it as ``pending`` with
``required_role`` = the brief's reviewer role and ``due_at`` = the item's SLA due date):

    pending --decide(approve)--> approved  --resume--> item at the gate's ``sets`` status -> the next stage
    pending --decide(reject)---> rejected  --resume--> item "rejected" (terminal)
    pending --past due_at------> pending, required_role = escalation role, new due date, alert
    pending (top role) --past due_at, on_timeout=reject--> rejected (system:approval_timeout)

``decide`` never moves the item: the resume sensor does, so a decision taken while nothing runs
is picked up by the next tick, and waiting items hold no run. An item is "decided but not yet
resumed" while its approval is approved/rejected and the item is still ``awaiting_approval``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from .connectors.embedded import Effect
from . import flows
from .contracts import ApprovalPolicy
from .flows import RESUMED_STAGE
from .outbox import dispatch, enqueue, idempotency_key
from .store import Database, approvals, as_utc, items, utcnow

# Roles in increasing authority: a reviewer may decide when their role is the required one or above.
ROLE_ORDER = ("agent", "lead", "supervisor")
DECISIONS = {"approve": "approved", "reject": "rejected"}
DECIDED = ("approved", "rejected")
TIMEOUT_ACTOR = "system:approval_timeout"
ESCALATION_ACTOR = "system:approval_escalation"


class ApprovalError(Exception):
    """A decision that cannot be applied; the message says why and what to do."""


class UnknownReviewer(ApprovalError):
    pass


class NotAuthorised(ApprovalError):
    pass


class UnknownItem(ApprovalError):
    pass


class AlreadyDecided(ApprovalError):
    pass


def role_rank(role: str | None) -> int:
    """Position of ``role`` in ROLE_ORDER; -1 for a role that is not in it (never authorised)."""
    return ROLE_ORDER.index(role) if role in ROLE_ORDER else -1


def may_decide(reviewer_role: str | None, required_role: str) -> bool:
    r = role_rank(reviewer_role)
    return r >= 0 and r >= role_rank(required_role) >= 0


def find_person(roster: Sequence[Mapping[str, Any]], who: str) -> Mapping[str, Any] | None:
    """A roster entry by id (``a-ravi``) or, case-insensitively, by display name."""
    key = (who or "").strip()
    for p in roster:
        if p.get("id") == key:
            return p
    for p in roster:
        if str(p.get("name", "")).casefold() == key.casefold() and key:
            return p
    return None


def _approval_row(conn, item_id: str, flow: str) -> dict[str, Any] | None:
    q = sa.select(approvals).where(approvals.c.flow == flow, approvals.c.item_id == item_id)
    row = conn.execute(q).mappings().first()
    if row is None:
        return None
    row = dict(row)
    for c in ("due_at", "created_at", "decided_at"):
        row[c] = as_utc(row[c])
    return row


def _joined():
    return approvals.join(items, sa.and_(items.c.flow == approvals.c.flow, items.c.item_id == approvals.c.item_id))


def review_fields(flow: str) -> tuple[str, ...]:
    """The masked item fields a reviewer of ``flow`` sees (its spec's ``review.fields``)."""
    spec = flows.find(flow)
    return tuple(spec.review.fields) if spec is not None else ()


def pending(db: Database, flow: str | None = None, now: datetime | None = None) -> list[dict[str, Any]]:
    """Pending approvals, earliest due first: item id, reason, required role, due date, overdue flag,
    plus the item fields the flow declares for its reviewers (masked), both under ``fields`` and at the
    top level."""
    now = now or utcnow()
    q = (sa.select(approvals.c.id, approvals.c.flow, approvals.c.item_id, approvals.c.reason,
                   approvals.c.required_role, approvals.c.due_at, approvals.c.created_at, items.c.day,
                   items.c.escalation_level, items.c.data)
         .select_from(approvals.outerjoin(items, sa.and_(items.c.flow == approvals.c.flow,
                                                         items.c.item_id == approvals.c.item_id)))
         .where(approvals.c.status == "pending"))
    if flow:
        q = q.where(approvals.c.flow == flow)
    with db.begin() as conn:
        rows = [dict(r) for r in conn.execute(q.order_by(approvals.c.due_at, approvals.c.id)).mappings()]
    out = []
    for r in rows:
        due = as_utc(r["due_at"])
        d = r.pop("data") or {}
        shown = {f: d.get(f) for f in review_fields(r["flow"])}
        out.append({**shown, **r, "due_at": due, "created_at": as_utc(r["created_at"]),
                    "overdue": bool(due is not None and due < now), "fields": shown,
                    "reasons": d.get("approval_reasons") or [r["reason"]]})
    return out


def _refuse(db: Database, reviewer: str, item_id: str, flow: str | None, trace_id: str | None, reason: str,
            inputs: dict[str, Any], now: datetime) -> None:
    with db.begin() as conn:
        db.audit(conn, [{"at": now, "actor": f"user:{reviewer}", "action": "approval_refused", "flow": flow,
                         "item_id": item_id, "trace_id": trace_id, "reason": reason, "inputs": inputs}])


def decide(db: Database, item_id: str, decision: str, reviewer: str, reason: str, edited_draft: str | None,
           roster: Sequence[Mapping[str, Any]], now: datetime | None = None, *, flow: str) -> dict[str, Any]:
    """Apply a reviewer's decision to a pending approval.

    Enforces roles (the reviewer's roster role must equal the row's ``required_role`` or rank above
    it). An unknown or unauthorised reviewer is refused and the refusal audited; an unknown item or
    an approval that is no longer pending raises as well. A valid decision updates the approvals row
    (status, decided_at/by, decision_reason, edited) and writes one audit row; an edited text
    (approve only) is PII-masked and applied through the flow's ``review.apply_edit`` hook, the value
    it replaced goes to the audit inputs. The item itself is not advanced here: the resume sensor does.
    """
    spec = flows.get(flow)
    now = now or utcnow()
    reviewer = (reviewer or "").strip()
    reason = (reason or "").strip()
    if decision not in DECISIONS:
        raise ApprovalError(f"decision must be 'approve' or 'reject', not {decision!r}")
    with db.begin() as conn:
        row = _approval_row(conn, item_id, flow)
        item = conn.execute(sa.select(items.c.trace_id, items.c.status, items.c.data)
                            .where(items.c.flow == flow, items.c.item_id == item_id)).first()
    trace_id = item.trace_id if item is not None else None
    person = find_person(roster, reviewer)
    refusal_inputs = {"decision": decision, "required_role": row["required_role"] if row else None,
                      "reviewer_role": person.get("role") if person else None}
    if person is None:
        msg = (f"refused: {reviewer or '(empty)'!r} is not in the roster; decide as a person listed in "
               f"roster.yaml (by id, e.g. a-ravi, or by name)")
        _refuse(db, reviewer or "(empty)", item_id, flow, trace_id, msg, refusal_inputs, now)
        raise UnknownReviewer(msg)
    if row is None:
        raise UnknownItem(f"no approval for item {item_id!r} in flow {flow!r}; `orch review list --flow {flow}` "
                          "shows the pending ones")
    if row["status"] != "pending":
        raise AlreadyDecided(f"approval for item {item_id!r} was already {row['status']} by {row['decided_by']} "
                             f"at {row['decided_at']}; a decision is final")
    if not may_decide(person.get("role"), row["required_role"]):
        msg = (f"refused: {person['id']} has role {person.get('role')!r}, but item {item_id!r} needs role "
               f"{row['required_role']!r} or above ({' < '.join(ROLE_ORDER)})")
        _refuse(db, person["id"], item_id, row["flow"], trace_id, msg, refusal_inputs, now)
        raise NotAuthorised(msg)
    if decision == "reject" and not reason:
        raise ApprovalError("a rejection needs a reason (--reason)")
    if edited_draft is not None and decision != "approve":
        raise ApprovalError("an edited draft goes with an approval, not a rejection")
    if edited_draft is not None and not edited_draft.strip():
        raise ApprovalError("the edited draft is empty")
    if edited_draft is not None and spec.review.apply_edit is None:
        raise ApprovalError(f"flow {flow!r} has nothing a reviewer can edit; approve or reject as it is")

    signoffs = list(((item.data or {}) if item is not None else {}).get("signoffs") or [])
    if decision == "approve" and any(sg.get("by") == person["id"] for sg in signoffs):
        msg = (f"refused: {person['id']} already signed item {item_id!r} off; the second approval must come "
               f"from another person with role {row['required_role']!r} or above")
        _refuse(db, person["id"], item_id, row["flow"], trace_id, msg, refusal_inputs, now)
        raise NotAuthorised(msg)

    status = DECISIONS[decision]
    if reason:
        from .guardrails import pii

        reason = pii.mask(reason).text  # free text from a person: stored masked like everything else
    data = dict(item.data) if item is not None else None
    inputs: dict[str, Any] = {"decision": decision, "required_role": row["required_role"],
                              "reviewer_role": person.get("role"), "approval_reason": row["reason"],
                              **{f: (data or {}).get(f) for f in spec.review.fields}}
    outputs: dict[str, Any] = {"status": status, "edited": edited_draft is not None}
    if edited_draft is not None and data is not None:
        from .guardrails import pii

        masked = pii.mask(edited_draft) if spec.review.mask_edit else pii.Masked(edited_draft)
        try:
            data, replaced = spec.review.apply_edit(data, masked.text, person["id"], now.isoformat())
        except ValueError as exc:
            raise ApprovalError(f"the edit was not applied: {exc}") from None
        inputs[f"original_{spec.review.edit_label}"] = replaced
        outputs["pii_masked_in_edit"] = dict(masked.counts)
        outputs[f"{spec.review.edit_label}_chars"] = len(masked.text)
    changed = edited_draft is not None and data is not None
    # four eyes: an approval the flow wants a second person for is a sign-off until that person approves.
    # Asked of the item before and after an edit (an edit cannot take it below the threshold), and an edit
    # given with the second approval starts over: the values that go out are seen by two people.
    second = None
    if spec.review.second_role and decision == "approve":
        before = spec.review.second_role(dict(item.data) if item is not None else {})
        second = before or spec.review.second_role(data or {}) or (row["required_role"] if signoffs else None)
    prior = signoffs  # what this decision was taken on (checked again when it is written)
    if second and signoffs and edited_draft is not None:
        signoffs = []
    if data is not None and decision == "approve" and (second or signoffs):
        data = {**data, "signoffs": [*signoffs, {"by": person["id"], "role": person.get("role"), "at": now.isoformat()}]}
        changed = True
    first_signoff = bool(second) and not signoffs
    edited = bool(row.get("edited")) or edited_draft is not None
    # the role the second approval needs: never lower than the row's
    needed = max(second, row["required_role"], key=role_rank) if first_signoff else None
    # while an approval is pending, decided_by names the last person who signed it off
    values = (dict(required_role=needed, edited=edited, decided_by=person["id"]) if first_signoff else
              dict(status=status, decided_at=now, decided_by=person["id"], decision_reason=reason or None,
                   edited=edited))
    action = "approval_signed_off" if first_signoff else f"approval_{status}"
    if first_signoff:
        outputs = {**outputs, "status": "pending", "needs_second_approval_by_role": needed}
    with db.begin() as conn:
        same_signoffs = (approvals.c.decided_by.is_(None) if not prior
                         else approvals.c.decided_by == prior[-1]["by"])  # two sign-offs at once: one wins
        res = conn.execute(approvals.update().where(approvals.c.id == row["id"], approvals.c.status == "pending",
                                                    approvals.c.required_role == row["required_role"], same_signoffs)
                           .values(**values))
        if res.rowcount != 1:  # someone else decided in between
            raise AlreadyDecided(f"approval for item {item_id!r} was decided by someone else just now")
        if changed:
            conn.execute(items.update().where(items.c.flow == flow, items.c.item_id == item_id)
                         .values(data=data, updated_at=now))
        db.audit(conn, [{"at": now, "actor": f"user:{person['id']}", "action": action,
                         "flow": flow, "item_id": item_id, "trace_id": trace_id,
                         "reason": reason or None, "inputs": inputs, "outputs": outputs}])
    return {"item_id": item_id, "status": "pending" if first_signoff else status, "decided_by": person["id"],
            "decided_at": now, "edited": edited_draft is not None, "required_role": row["required_role"],
            "needs_second_approval_by_role": needed}


def yaml_edit(text: str, examples: Sequence[str]) -> dict[str, Any]:
    """A reviewer's structured edit (``orch approve ID --edit-file F``) as a non-empty YAML mapping; a ValueError
    that shows how to write one (``examples``: ``key: value`` lines) otherwise. The flow's ``apply_edit`` checks
    the keys and values."""
    import yaml

    try:
        edit = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"the edit is not YAML ({type(exc).__name__}); write lines like `{examples[0]}`")
    if not isinstance(edit, dict) or not edit:
        raise ValueError("the edit must be a mapping, e.g. " + " or ".join(f"`{e}`" for e in examples))
    return edit


# --- resume: decided approvals move their items on ------------------------------------------------

@dataclass
class Resumed:
    approved: dict[str, list[str]]  # partition day -> item ids now "approved" (to deliver)
    rejected: list[str]

    def __bool__(self) -> bool:
        return bool(self.approved or self.rejected)


def gate_statuses(flow: str) -> tuple[str, str, str]:
    """(status an item waits in, status an approved item goes on at, the stage that takes it next) for
    ``flow``: its spec's first stage with a waiting branch (``awaiting_approval`` / its ``sets``)."""
    spec = flows.get(flow)
    gate = spec.gate
    if gate is None:
        raise KeyError(f"flow {flow!r} has no stage that waits for a person")
    chain = spec.stage_names
    return gate.branches[0], gate.sets, chain[chain.index(gate.name) + 1]


def resume_decided(db: Database, flow: str, now: datetime | None = None, actor: str = "system:approval_resume"
                   ) -> Resumed:
    """Items whose approval was decided but that still wait (status ``awaiting_approval``) move on:
    approved -> item ``approved`` (the actions stage delivers it), rejected -> item ``rejected``
    (terminal). One transaction; each move audited. Idempotent: a resumed item no longer waits."""
    now = now or utcnow()
    waiting, go_on, next_stage = gate_statuses(flow)
    q = (sa.select(items.c.item_id, items.c.day, items.c.trace_id, approvals.c.status, approvals.c.decided_by,
                   approvals.c.decision_reason)
         .select_from(_joined())
         .where(items.c.flow == flow, items.c.status == waiting, approvals.c.status.in_(DECIDED))
         .order_by(approvals.c.decided_at, approvals.c.id))
    approved: dict[str, list[str]] = {}
    rejected: list[str] = []
    with db.begin() as conn:
        rows = conn.execute(q).all()
        audit_rows = []
        for r in rows:
            status = go_on if r.status == "approved" else "rejected"
            res = conn.execute(items.update().where(items.c.flow == flow, items.c.item_id == r.item_id,
                                                    items.c.status == waiting)
                               .values(status=status, stage=RESUMED_STAGE, updated_at=now))
            if res.rowcount != 1:
                continue
            if r.status == "approved":
                approved.setdefault(r.day, []).append(r.item_id)
            else:
                rejected.append(r.item_id)
            audit_rows.append({"at": now, "actor": actor,
                               "action": "approval_resumed" if r.status == "approved" else "item_rejected",
                               "flow": flow, "item_id": r.item_id, "trace_id": r.trace_id,
                               "reason": (f"approved by {r.decided_by}" if r.status == "approved"
                                          else f"rejected by {r.decided_by}: {r.decision_reason or ''}".strip()),
                               "inputs": {"approval_status": r.status, "decided_by": r.decided_by},
                               "outputs": {"item_status": status,
                                           "next": next_stage if r.status == "approved" else "terminal"}})
        if audit_rows:
            db.audit(conn, audit_rows)
    return Resumed(approved, rejected)


def approved_waiting_delivery(db: Database, flow: str) -> dict[str, list[str]]:
    """Items resumed as approved whose next stage has not run yet, by partition day."""
    _, go_on, _ = gate_statuses(flow)
    q = sa.select(items.c.day, items.c.item_id).where(items.c.flow == flow, items.c.status == go_on,
                                                      items.c.stage == RESUMED_STAGE)
    out: dict[str, list[str]] = {}
    with db.begin() as conn:
        for day, item_id in conn.execute(q.order_by(items.c.day, items.c.item_id)):
            out.setdefault(day, []).append(item_id)
    return out


# --- escalation past the due date -------------------------------------------------------------------

@dataclass
class EscalationReport:
    escalated: list[str]
    auto_rejected: list[str]
    alerts_delivered: int = 0

    def __bool__(self) -> bool:
        return bool(self.escalated or self.auto_rejected)


def escalated_due(now: datetime, priority: str | None, sla_hours: Mapping[str, float]) -> datetime:
    """The new due date of an escalated approval: the item priority's SLA again, from now."""
    hours = sla_hours.get(priority or "", None) or min(sla_hours.values(), default=4.0)
    return now + timedelta(hours=float(hours))


def escalate_overdue(db: Database, flow: str, policy: ApprovalPolicy, roster: Sequence[Mapping[str, Any]],
                     sla_hours: Mapping[str, float], connectors: Any = None, now: datetime | None = None
                     ) -> EscalationReport:
    """Pending approvals past their due date: below the escalation role they move one level up
    (required_role -> policy.escalation_role, a new due date, an alert through the messaging
    outbox, audited). At the escalation role already, ``policy.on_timeout == "reject"`` auto-rejects
    them (the resume sensor then makes the item ``rejected``); ``escalate`` leaves them waiting."""
    now = now or utcnow()
    role = policy.escalation_role
    on_timeout = policy.on_timeout
    people = [p["id"] for p in roster if p.get("role") == role] or [f"{role}s"]
    q = (sa.select(approvals.c.id, approvals.c.item_id, approvals.c.required_role, approvals.c.due_at,
                   items.c.trace_id, items.c.status.label("item_status"), items.c.data, items.c.escalation_level)
         .select_from(_joined())
         .where(approvals.c.flow == flow, approvals.c.status == "pending", approvals.c.due_at.is_not(None),
                approvals.c.due_at < now)
         .order_by(approvals.c.due_at, approvals.c.id))
    escalated: list[str] = []
    rejected: list[str] = []
    with db.begin() as conn:
        rows = conn.execute(q).all()
        effects, audit_rows = [], []
        for n, r in enumerate(rows):
            due = as_utc(r.due_at)
            overdue_h = (now - due).total_seconds() / 3600.0
            if role_rank(r.required_role) < role_rank(role):
                who = people[n % len(people)]
                new_due = escalated_due(now, (r.data or {}).get("priority"), sla_hours)
                res = conn.execute(approvals.update().where(approvals.c.id == r.id, approvals.c.status == "pending",
                                                            approvals.c.required_role == r.required_role)
                                   .values(required_role=role, due_at=new_due))
                if res.rowcount != 1:
                    continue
                level = max(int(r.escalation_level or 0), 1)
                conn.execute(items.update().where(items.c.flow == flow, items.c.item_id == r.item_id).values(
                    escalation_level=level, escalated_at=sa.func.coalesce(items.c.escalated_at, now),
                    data={**(r.data or {}), "escalated_to": who}, updated_at=now))
                effects.append(Effect(idempotency_key(flow, r.item_id, "approval_escalation_1"), "messaging",
                                      "send_alert", r.item_id, r.trace_id, {
                                          "kind": "escalation", "recipient": f"role:{role}:{who}",
                                          "subject": f"Approval overdue: {r.item_id} ({(r.data or {}).get('priority')})",
                                          "body": f"The approval of item {r.item_id} is {overdue_h:.1f} h past its due "
                                                  f"time; it now needs role {role} by {new_due.isoformat()}. "
                                                  f"Trace {r.trace_id}."}))
                audit_rows.append({"at": now, "actor": ESCALATION_ACTOR, "action": "approval_escalated",
                                   "flow": flow, "item_id": r.item_id, "trace_id": r.trace_id,
                                   "reason": f"approval {overdue_h:.1f} h past due",
                                   "inputs": {"from_role": r.required_role, "due_at": due.isoformat()},
                                   "outputs": {"to_role": role, "to": who, "due_at": new_due.isoformat()}})
                escalated.append(r.item_id)
            elif on_timeout == "reject":
                reason = f"auto-rejected: no decision by role {r.required_role} {overdue_h:.1f} h past due"
                res = conn.execute(approvals.update().where(approvals.c.id == r.id, approvals.c.status == "pending")
                                   .values(status="rejected", decided_at=now, decided_by=TIMEOUT_ACTOR,
                                           decision_reason=reason, edited=False))
                if res.rowcount != 1:
                    continue
                audit_rows.append({"at": now, "actor": TIMEOUT_ACTOR, "action": "approval_rejected",
                                   "flow": flow, "item_id": r.item_id, "trace_id": r.trace_id, "reason": reason,
                                   "inputs": {"required_role": r.required_role, "due_at": due.isoformat(),
                                              "on_timeout": on_timeout},
                                   "outputs": {"status": "rejected", "edited": False}})
                rejected.append(r.item_id)
        if effects:
            enqueue(db, conn, flow, effects)
        if audit_rows:
            db.audit(conn, audit_rows)
    report = EscalationReport(escalated, rejected)
    if escalated and connectors is not None:
        # the alerts only: an item's other effects waiting in the outbox go out through their own stage's checks
        report.alerts_delivered = dispatch(db, connectors, flow, keys=[e.idempotency_key for e in effects])["delivered"]
    return report
