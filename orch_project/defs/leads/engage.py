"""The leads flow's acting half, as plain functions: the first touch, the review gate, the CRM upsert and the
first message (through the outbox, exactly once), and the ops stages that follow a lead afterwards
(redelivery, responses, nurture). logic.py holds the deciding half (intake to qualification) and consent.

Consent is absolute: ``may_email`` is asked before any message is planned and again by ``message_effect``,
which refuses to build one for a lead that may not be e-mailed.
"""

from __future__ import annotations

import copy
import re
from collections import Counter
from datetime import datetime, timedelta, timezone
from typing import Any

from pydantic import Field

from ...lib.approvals import yaml_edit
from ...lib.connectors.embedded import Effect
from ...lib.contracts import LLMOutput, LLMStepRequest
from ...lib.guardrails import pii
from ...lib.outbox import dispatch, idempotency_key, settle
from ...lib.pipeline import (ItemUpdate, StageEnv, StageReport, commit_stage, load_items, load_stage_items,
                             model_step_failed, without_deferred)
from ...lib.saga import run_effects_stage, step_key
from ...lib.store import utcnow
from .logic import (CFG, CRM_STAGE, DRAFT_TASK, FLOW, TIERS, ConsentError, LeadsConfig, LeadSettings,
                    may_call, may_email)

# --- first touch: the hot lead's first e-mail ---------------------------------------------------------

class FirstTouchOutput(LLMOutput):
    text: str = Field(min_length=1, max_length=4000)


def _interest(d: dict[str, Any]) -> str:
    a = d.get("attributes") or {}
    for key in ("Specialization", "Interest", "Product", "product_interest", "Course"):
        v = a.get(key)
        if isinstance(v, str) and v.strip() and v.strip().casefold() not in ("select", "unknown", "other"):
            return v.strip()
    return "our programmes"


def _opening(d: dict[str, Any]) -> str:
    e = d.get("enrichment") or {}
    if e.get("company") and e.get("industry"):
        return f"Teams in {e['industry']} like yours often start with a short conversation about goals and timing."
    if e.get("seniority") in ("c_level", "vp", "director"):
        return "Leaders often start with a short conversation about what their team needs."
    return "Many people start with a short conversation about their goals and timing."


def policy_violations(text: str, cfg: LeadsConfig) -> list[str]:
    """The first-touch and nurture policy: length, the opt-out line, no price or amount, none of the
    brief's banned phrases, no raw personal data."""
    from ...lib.guardrails.policy import MONEY

    out = cfg.draft_policy.check(text)
    if MONEY.search(text or "") or re.search(r"\b\d+(?:[.,]\d+)?\s?%", text or ""):
        out.append("quotes a price, amount or percentage (none may be invented)")
    low = (text or "").casefold()
    out += [f"uses the banned phrase {p!r}" for p in cfg.settings.banned_phrases if p.casefold() in low]
    return out


def first_touch_stage(env: StageEnv, cfg: LeadsConfig, gateway) -> StageReport:
    """The first e-mail of each hot lead we may e-mail, through the gateway (task ``leads_first_touch``):
    personalised from enrichment (interest, industry, seniority), the rep's first name and the opt-out line,
    then held to the policy; a draft that breaks it waits for a person with the violations. Other leads pass."""
    started = utcnow()
    s = cfg.settings
    rows = load_stage_items(env, "first_touch")
    names = {p["id"]: p["name"].split()[0] for p in cfg.roster}
    todo = [r for r in rows if r["data"]["tier"] == "hot" and r["data"].get("channel") == "email"]
    reqs = []
    for r in todo:
        d = r["data"]
        e = d.get("enrichment") or {}
        ctx = {"company": s.company, "interest": _interest(d), "opening": _opening(d),
               "lead_company": e.get("company") or "", "seniority": e.get("seniority") or "unknown",
               "rep_first_name": names.get(d.get("owner") or "", "The admissions team"),
               "opt_out_line": s.opt_out_line}
        reqs.append(LLMStepRequest(id=r["item_id"], inputs={"text": d.get("notes") or "", "context": ctx}))
    responses, stats = gateway.run(DRAFT_TASK, reqs, FirstTouchOutput) if reqs else ([], None)
    answered = {r.id: resp for r, resp in zip(reqs, responses)}
    updates = []
    for r in rows:
        d = without_deferred(r["data"])
        resp = answered.get(r["item_id"])
        if resp is None:
            updates.append(ItemUpdate(r["item_id"], "drafted", d))
            continue
        if not resp.ok:
            updates.append(model_step_failed(r, "first_touch", resp, label="first-touch draft"))
            continue
        text = resp.output.text
        violations = policy_violations(text, cfg)
        new = {**d, "draft": text}
        if violations:
            new["draft_violations"] = violations
            new["approval_reasons"] = [*d.get("approval_reasons", []), "draft_policy"]
        updates.append(ItemUpdate(r["item_id"], "drafted", new))
    md = stats.as_metadata("first_touch") if stats else {}
    md["drafts"] = sum(1 for u in updates if u.data.get("draft"))
    md["policy_violations"] = sum(1 for u in updates if u.data.get("draft_violations"))
    return commit_stage(env, "first_touch", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                        metadata=md)


# --- review gate ------------------------------------------------------------------------------------------

def review_gate_stage(env: StageEnv, cfg: LeadsConfig) -> StageReport:
    """A lead with a reason for a person (uncertain match, high value, borderline score, draft policy, no
    rep free) waits in the approvals queue for the sales manager; the rest go on by policy. Audited."""
    started = utcnow()
    rows = load_stage_items(env, "review_gate")
    pol = cfg.brief.approval
    updates, approval_rows, audit_rows = [], [], []
    for r in rows:
        d = r["data"]
        reasons = d.get("approval_reasons") or []
        base = r["received_at"] or r["ingested_at"]
        sla = cfg.brief.sla_hours
        if reasons:
            due = base + timedelta(hours=sla["medium"])
            updates.append(ItemUpdate(r["item_id"], "awaiting_review", d, "routed", columns={"due_at": due}))
            approval_rows.append({"flow": env.flow, "item_id": r["item_id"], "reason": reasons[0],
                                  "required_role": pol.reviewer_role, "status": "pending", "due_at": due,
                                  "created_at": started, "edited": False})
        else:
            due = base + timedelta(hours=sla["high" if d["tier"] == "hot" else "low"])
            updates.append(ItemUpdate(r["item_id"], "approved", d, columns={"due_at": due}))
        audit_rows.append({"actor": "system:review_gate", "action": "approval_requested" if reasons else "auto_approved",
                           "flow": env.flow, "item_id": r["item_id"], "trace_id": r["trace_id"],
                           "reason": ",".join(reasons) or f"{d['tier']} lead, nothing for a person to decide",
                           "inputs": {"tier": d["tier"], "score": d.get("score"), "owner": d.get("owner")}})
    md = {"awaiting_review": len(approval_rows), "straight_through": len(rows) - len(approval_rows),
          "review_reasons": dict(Counter(x for r in rows for x in r["data"].get("approval_reasons") or []))}
    return commit_stage(env, "review_gate", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                        approval_rows=approval_rows, audit_rows=audit_rows, metadata=md)


def _channels(d: dict[str, Any]) -> None:
    """The channel and nurture of a lead after a person changed its tier or its contact (consent may differ)."""
    email_ok, email_why = may_email(d)
    call_ok, call_why = may_call(d)
    d["channel"] = None if d.get("tier") == "cold" else ("email" if email_ok else "call" if call_ok else None)
    d["channel_reason"] = None if d["channel"] else (email_why or call_why)
    if d.get("tier") == "warm" and email_ok:
        d.setdefault("nurture", {"state": "scheduled", "step": 0, "next_at": None, "sent": []})
    else:
        d.pop("nurture", None)


def apply_review(data: dict[str, Any], text: str, reviewer: str, at: str) -> tuple[dict[str, Any], Any]:
    """A sales manager's decision details (``orch approve ID --edit-file F``, YAML): ``match: new | merge``
    (an uncertain match: keep the lead as a new contact, or merge it into the candidate), ``tier: hot |
    warm | cold``, ``owner: REP`` (a rep of the roster) and ``draft: TEXT`` (the first e-mail, masked and
    held to the policy). Unknown keys and values are refused with what is allowed."""
    edit = yaml_edit(text, ("tier: warm", "match: merge", "owner: rep-ana"))
    if unknown := sorted(set(edit) - {"match", "tier", "owner", "draft"}):
        raise ValueError(f"unknown key(s) {unknown}; allowed: match, tier, owner, draft")
    new = {**data}
    replaced: dict[str, Any] = {}
    if "match" in edit:
        m = dict(data.get("match") or {})
        if edit["match"] not in ("new", "merge"):
            raise ValueError("match must be new or merge")
        if edit["match"] == "merge":
            if not m.get("candidate"):
                raise ValueError("there is no candidate contact to merge into (the match was not uncertain)")
            replaced["match"] = m.get("contact_id")
            m.update(decision="merge", contact_id=m["candidate"], crm_stage=m.get("candidate_stage"),
                     owner=m.get("candidate_owner"), reason=f"merged by {reviewer}: {m.get('reason')}")
            # the contact's no holds for the lead too, whatever the reviewer decides about the rest
            theirs = m.get("candidate_consent") or {}
            new["consent"] = {k: bool(v) or bool(theirs.get(k)) for k, v in data["consent"].items()}
            if any(p["id"] == m["owner"] for p in CFG.reps) and data.get("tier") == "hot":
                new["owner"], new["owner_reason"] = m["owner"], "the rep who already owns the contact"
        else:
            replaced["match"] = m.get("decision")
            m.update(decision="new", reason=f"kept as a new contact by {reviewer}")
        new["match"] = m
    if "tier" in edit:
        if edit["tier"] not in TIERS:
            raise ValueError(f"tier must be one of {', '.join(TIERS)}")
        replaced["tier"] = data.get("tier")
        new["tier"] = edit["tier"]
        new["tier_reason"] = f"set by {reviewer}"
        if edit["tier"] != "hot":
            new["owner"] = None
    if "owner" in edit:
        if not any(p["id"] == edit["owner"] for p in CFG.reps):
            raise ValueError(f"owner must be a rep of the roster ({', '.join(p['id'] for p in CFG.reps)})")
        replaced["owner"] = data.get("owner")
        new["owner"] = edit["owner"]
        new["owner_reason"] = f"chosen by {reviewer}"
    if "draft" in edit:
        draft = pii.mask(str(edit["draft"])).text
        if violations := policy_violations(draft, CFG):
            raise ValueError("the draft breaks the policy: " + "; ".join(violations))
        replaced["draft"] = data.get("draft")
        new["draft"] = draft
        new.pop("draft_violations", None)
    _channels(new)
    if new.get("tier") == "hot" and new.get("channel") == "email" and not new.get("draft"):
        raise ValueError("a hot lead we e-mail needs a draft: give `draft: ...` or choose another tier")
    if new.get("tier") == "hot" and not new.get("owner"):
        raise ValueError("a hot lead needs an owner: give `owner: REP`")
    new["reviewed_by"], new["reviewed_at"] = reviewer, at
    return new, replaced


# --- act: CRM upsert, then the first touch -------------------------------------------------------------

EFFECTS = frozenset({("crm_contacts", "upsert_contact"), ("crm_contacts", "set_stage"),
                     ("crm_contacts", "revert_change"), ("crm", "lead_activity"), ("crm", "call_task"),
                     ("messaging", "send_message")})
COMPENSATIONS = {"contact": ("crm_contacts", "revert_change")}


def _crm_effects(row: dict[str, Any]) -> dict[str, Effect]:
    d, iid, tr = row["data"], row["item_id"], row["trace_id"]
    m = d["match"]
    e = d.get("enrichment") or {}
    merged = m["decision"] == "merge"
    contact: dict[str, Any] = {"contact_id": m["contact_id"], "company": e.get("company") or d.get("company"),
                               "title": d.get("title"), "country": e.get("country"), "score": d.get("score"),
                               **d["consent"]}
    t = d.get("tokens") or {}
    # the lead's identity (vault tokens) fills what the contact lacks and never replaces what the CRM has: a
    # new contact gets it all, a merged one only its gaps (a lead merged into another lead's contact before
    # that one reached the CRM creates the contact with it)
    contact["identity"] = {"name": t.get("PERSON"), "email": t.get("EMAIL_ADDRESS"), "phone": t.get("PHONE_NUMBER")}
    if not merged:
        contact["source"] = f"lead:{d['source']}"
    contact["stage"] = CRM_STAGE[d["tier"]]  # the CRM moves a contact forward only (lib.connectors.embedded)
    if d.get("owner"):
        contact["owner"] = d["owner"]
    summary = (f"{d['source'].replace('_', ' ')} lead ({'merged: ' + m['reason'] if merged else 'new contact'}); "
               f"score {d.get('score', 0):.2f} -> {d['tier']}" + (f", owner {d['owner']}" if d.get("owner") else "")
               + (f"; no message: {d['channel_reason']}" if d.get("channel_reason") else ""))
    return {"contact": Effect(step_key(FLOW, row, "contact"), "crm_contacts", "upsert_contact", iid, tr, contact),
            "activity": Effect(step_key(FLOW, row, "activity"), "crm", "lead_activity", iid, tr,
                               {"customer_ref": m["contact_id"], "summary": summary})}


def crm_upsert_stage(env: StageEnv, cfg: LeadsConfig, connectors, *, waiting_only: bool = False) -> StageReport:
    """The CRM contact (created, or updated when merged: consent only ever tightens, a contact never moves
    back a stage) with its deal stage, and the activity log, through the outbox with idempotency keys. A
    step failed for good reverts the contact change and dead-letters the lead (replayable)."""
    rows = load_stage_items(env, "crm_upsert", after="crm_upsert" if waiting_only else None)
    unowned = [r for r in rows if r["data"].get("tier") == "hot" and not r["data"].get("owner") and r["stage"] != "crm_upsert"]
    if unowned:  # approved by a person while every rep of the team was full: a rep with room now, if any
        from .logic import _region, assign_rep, rep_loads

        loads = rep_loads(env, cfg, utcnow())
        for r in unowned:
            d = r["data"]
            owner, why = assign_rep(cfg, (d.get("enrichment") or {}).get("country") or _region(d.get("country_hint")),
                                    loads)
            r["data"] = {**d, "owner": owner, "owner_reason": why if owner else f"no owner yet: {why}"}
    return run_effects_stage(env, "crm_upsert", rows, connectors, plan=_crm_effects, compensations=COMPENSATIONS,
                             policy=cfg.connector_policy, done_status="in_crm", done_reason="CRM contact and activity written",
                             done_columns=lambda now: {})


def contact_key(row: dict[str, Any], step: str) -> str:
    """The idempotency key of a message to the *person*: leads of one contact (a form and an import of the same
    person) share it, so the person gets one first touch and one nurture sequence, not one per lead."""
    return idempotency_key(FLOW, f"contact:{row['data']['match']['contact_id']}", step)


def message_effect(row: dict[str, Any], step: str, kind: str, subject: str, body: str) -> Effect:
    """A message to the lead through the messaging connector, addressed to its vault token, keyed per contact.
    Refuses (raises ``ConsentError``) for a lead that may not be e-mailed: the last guard behind every planner."""
    ok, why = may_email(row["data"])
    if not ok:
        raise ConsentError(f"message {step!r} to lead {row['item_id']} refused: {why}")
    return Effect(contact_key(row, step), "messaging", "send_message", row["item_id"], row["trace_id"], {
        "kind": kind, "recipient": row["data"]["tokens"]["EMAIL_ADDRESS"], "subject": subject, "body": body})


def refresh_consent(connectors, rows: list[dict[str, Any]]) -> None:
    """Each lead's consent as of now: what the CRM contact says (a do-not-email or an unsubscribe set there
    since the match holds for the lead); rows are updated in place."""
    ids = sorted({(r["data"].get("match") or {}).get("contact_id") for r in rows} - {None})
    crm = connectors.read("crm_contacts", "get", ids) if ids else {}
    for r in rows:
        c = crm.get((r["data"].get("match") or {}).get("contact_id")) or {}
        for k in ("do_not_email", "do_not_call", "unsubscribed"):
            if c.get(k) and not r["data"]["consent"].get(k):
                r["data"] = {**r["data"], "consent": {**r["data"]["consent"], k: True}}


def _engage_effects(row: dict[str, Any]) -> dict[str, Effect]:
    d = row["data"]
    if d["tier"] != "hot":
        return {}
    # engage_stage has already moved a lead whose draft breaks the policy to a call (or nothing)
    if d.get("channel") == "email" and may_email(d)[0]:
        return {"first_touch": message_effect(row, "first_touch", "first_touch", f"Your enquiry with {CFG.settings.company}",
                                              d["draft"])}
    if d.get("channel") == "call" and may_call(d)[0]:
        return {"call_task": Effect(contact_key(row, "call_task"), "crm", "call_task", row["item_id"], row["trace_id"],
                                    {"customer_ref": d["match"]["contact_id"],
                                     "summary": f"call the new hot lead today (owner {d.get('owner')})"})}
    return {}


def engage_stage(env: StageEnv, cfg: LeadsConfig, connectors, *, waiting_only: bool = False) -> StageReport:
    """Hot leads get their first touch (the approved e-mail, or a call task for the owner when only a call
    is allowed) exactly once; warm leads are resolved into nurture (the ops job sends the sequence), cold
    ones were archived in the CRM. The lead is resolved once its effects are delivered."""
    rows = load_stage_items(env, "engage", after="engage" if waiting_only else None)
    refresh_consent(connectors, rows)
    for r in rows:  # an approved draft that still breaks the policy is never sent: the owner calls instead
        d = r["data"]
        if d.get("tier") == "hot" and d.get("channel") == "email" and (bad := policy_violations(d.get("draft") or "", cfg)):
            r["data"] = {**d, "channel": "call" if may_call(d)[0] else None,
                         "channel_reason": "draft withheld: " + "; ".join(bad)}
        elif d.get("channel") == "email" and not may_email(d)[0]:
            r["data"] = {**d, "channel": "call" if may_call(d)[0] and d.get("tier") == "hot" else None,
                         "channel_reason": may_email(d)[1]}
            r["data"].pop("nurture", None)
    return run_effects_stage(env, "engage", rows, connectors, plan=_engage_effects, compensations={},
                             policy=cfg.connector_policy, done_status="resolved",
                             done_reason="first touch delivered, nurture scheduled or archived")


def redelivery_stage(env: StageEnv, cfg: LeadsConfig, connectors) -> StageReport:
    """Effects still in the outbox are delivered again behind the breakers; leads waiting for them move on
    (or are compensated and dead-lettered once a step failed for good)."""
    started = utcnow()
    withheld = withhold_revoked(env, connectors)
    sent = dispatch(env.db, connectors, env.flow, policy=cfg.connector_policy)
    crm = crm_upsert_stage(env, cfg, connectors, waiting_only=True)
    engage = engage_stage(env, cfg, connectors)  # leads now in the CRM (new or waiting) are engaged
    md = {"redelivered": sent["delivered"], "still_failing": sent["failed"], "messages_withheld": withheld,
          "waiting_open_circuit": sent.get("skipped", 0), "in_crm": crm.metadata["resolved"],
          "engaged": engage.metadata["resolved"],
          "compensated": crm.metadata["compensated"] + engage.metadata["compensated"]}
    return StageReport("redelivery", crm.n_in + engage.n_in, crm.outcomes + engage.outcomes,
                       (utcnow() - started).total_seconds() * 1000.0, md)


# --- ops: responses and nurture ---------------------------------------------------------------------------

def _resolved_leads(env: StageEnv) -> list[dict[str, Any]]:
    return load_items(env.across_partitions(), "resolved")


def responses_stage(env: StageEnv, cfg: LeadsConfig, connectors, *, now: datetime | None = None) -> StageReport:
    """What came back: replies, bounces and unsubscribes through the messaging connector, and conversions
    (the contact's deal Won) in the CRM. Each stops the lead's nurture with its reason; a reply moves the
    contact to Engaged, an unsubscribe marks it in the CRM (both through the outbox). Each event counts once."""
    started = now or utcnow()
    leads = [r for r in _resolved_leads(env) if r["data"].get("tokens", {}).get("EMAIL_ADDRESS")
             or (r["data"].get("match") or {}).get("contact_id")]
    by_token = {r["data"]["tokens"]["EMAIL_ADDRESS"]: r for r in leads if r["data"]["tokens"].get("EMAIL_ADDRESS")}
    events = connectors.inbound_since(0, list(by_token)) if by_token else []
    open_ids = [r["data"]["match"]["contact_id"] for r in leads if not r["data"].get("outcome")]
    crm = connectors.read("crm_contacts", "get", open_ids) if open_ids else {}
    changed: dict[str, dict[str, Any]] = {}
    effects, audit_rows = [], []

    def data_of(r):
        return changed.setdefault(r["item_id"], copy.deepcopy(r["data"]))

    def stop(d, why):
        n = d.get("nurture")
        if n and n["state"] in ("scheduled", "active"):
            n.update(state="stopped", stopped_reason=why, stopped_at=started.isoformat())

    counts: Counter = Counter()
    by_contact: dict[str, list[dict[str, Any]]] = {}
    for r in leads:
        by_contact.setdefault(r["data"]["match"]["contact_id"], []).append(r)
    for ev in events:
        r = by_token.get(ev["recipient"])
        if r is None:
            continue
        cid = r["data"]["match"]["contact_id"]
        at = ev["received_at"].isoformat() if hasattr(ev["received_at"], "isoformat") else str(ev["received_at"])
        # a reply or an unsubscribe is the person's: it holds for every lead of the contact; a bounce is the
        # address's: it holds for the leads written to that address
        targets = [t for t in by_contact[cid] if ev["kind"] != "bounce"
                   or t["data"]["tokens"].get("EMAIL_ADDRESS") == ev["recipient"]]
        new_event = False
        for t in targets:
            d = data_of(t)
            seen = d.setdefault("responses", [])
            if ev["external_id"] in [x["id"] for x in seen]:
                continue
            new_event = True
            seen.append({"id": ev["external_id"], "kind": ev["kind"], "at": at})
            if ev["kind"] == "reply":
                d.setdefault("replied_at", at)
                stop(d, "replied")
            elif ev["kind"] == "unsubscribe":
                d["consent"]["unsubscribed"] = True
                stop(d, "unsubscribed")
            elif ev["kind"] == "bounce":
                d["bounced"] = True
                stop(d, "bounced")
        if not new_event:
            continue
        counts[ev["kind"]] += 1
        key = idempotency_key(FLOW, r["item_id"], f"event:{ev['external_id']}")
        if ev["kind"] == "reply":
            effects.append(Effect(key, "crm_contacts", "set_stage", r["item_id"], r["trace_id"],
                                  {"contact_id": cid, "stage": "Engaged"}))
        elif ev["kind"] == "unsubscribe":
            effects.append(Effect(key, "crm_contacts", "set_stage", r["item_id"], r["trace_id"],
                                  {"contact_id": cid, "unsubscribed": True}))
        audit_rows.append({"actor": "connector:messaging", "action": f"lead_{ev['kind']}", "flow": env.flow,
                           "item_id": r["item_id"], "trace_id": r["trace_id"], "reason": f"{ev['kind']} received",
                           "inputs": {"event": ev["external_id"]},
                           "outputs": {"leads_of_the_contact": [t["item_id"] for t in targets]}})
    for r in leads:
        c = crm.get((r["data"].get("match") or {}).get("contact_id"))
        if c is None or r["data"].get("outcome"):
            continue
        d = None
        if c.get("stage") in ("Won", "Lost"):
            d = data_of(r)
            d["outcome"] = "converted" if c["stage"] == "Won" else "lost"
            d["outcome_at"] = started.isoformat()
            stop(d, "converted" if c["stage"] == "Won" else "lost")
            counts[d["outcome"]] += 1
            audit_rows.append({"actor": "connector:crm_contacts", "action": f"lead_{d['outcome']}", "flow": env.flow,
                               "item_id": r["item_id"], "trace_id": r["trace_id"],
                               "reason": f"deal {c['stage']} in the CRM"})
        if c.get("unsubscribed") or c.get("do_not_email"):  # consent set in the CRM holds for the lead
            d = d or data_of(r)
            if not d["consent"].get("unsubscribed") and c.get("unsubscribed"):
                d["consent"]["unsubscribed"] = True
                stop(d, "unsubscribed")
            if not d["consent"].get("do_not_email") and c.get("do_not_email"):
                d["consent"]["do_not_email"] = True
                stop(d, "do-not-email")
    by_id = {r["item_id"]: r for r in leads}
    updates = [ItemUpdate(iid, "resolved", d) for iid, d in changed.items() if d != by_id[iid]["data"]]
    report = commit_stage(env, "responses", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in leads},
                          effects=effects, audit_rows=audit_rows, set_stage=False,
                          metadata={"replies": counts.get("reply", 0), "bounces": counts.get("bounce", 0),
                                    "unsubscribes": counts.get("unsubscribe", 0),
                                    "converted": counts.get("converted", 0), "lost": counts.get("lost", 0)})
    if effects:
        dispatch(env.db, connectors, env.flow, keys=[e.idempotency_key for e in effects], policy=cfg.connector_policy)
    report.metadata["messages_withheld"] = withhold_revoked(env, connectors)
    return report


def withhold_revoked(env: StageEnv, connectors) -> int:
    """Messages still waiting in the outbox (a connector was down) for a lead that may no longer be e-mailed
    (an unsubscribe, a bounce, a do-not-email set in the CRM since) are cancelled before any redelivery, and
    audited. Returns how many."""
    import sqlalchemy as sa

    from ...lib.store import items, outbox

    with env.db.begin() as conn:
        waiting = conn.execute(sa.select(outbox.c.idempotency_key, outbox.c.item_id).where(
            outbox.c.flow == env.flow, outbox.c.connector == "messaging", outbox.c.status.in_(("pending", "failed")),
            outbox.c.action == "send_message")).all()
        if not waiting:
            return 0
        rows = [{"item_id": iid, "trace_id": tr, "data": d} for iid, tr, d in conn.execute(
            sa.select(items.c.item_id, items.c.trace_id, items.c.data).where(
                items.c.flow == env.flow, items.c.item_id.in_(sorted({w.item_id for w in waiting}))))]
    refresh_consent(connectors, rows)
    revoked = {r["item_id"]: (r, may_email(r["data"])[1]) for r in rows if not may_email(r["data"])[0]}
    keys = [w.idempotency_key for w in waiting if w.item_id in revoked]
    if keys:
        settle(env.db, keys, "cancelled")
        with env.db.begin() as conn:
            env.db.audit(conn, [{"actor": "system:consent", "action": "message_withheld", "flow": env.flow,
                                 "item_id": w.item_id, "trace_id": revoked[w.item_id][0]["trace_id"],
                                 "reason": f"consent revoked ({revoked[w.item_id][1]}) before delivery",
                                 "inputs": {"idempotency_key": w.idempotency_key}}
                                for w in waiting if w.item_id in revoked])
    return len(keys)


def next_slot(now: datetime, tz_name: str | None, s: LeadSettings) -> datetime:
    """``now`` if it is inside the lead's business hours (their time zone), else the start of the next
    business period, in UTC."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        tz = ZoneInfo(tz_name or s.default_timezone)
    except (ZoneInfoNotFoundError, ValueError):
        tz = ZoneInfo(s.default_timezone)
    local = now.astimezone(tz)
    start, end = s.business_hours
    for day in range(0, 9):
        d = (local + timedelta(days=day)).date()
        if d.weekday() not in s.business_days:
            continue
        opens = datetime(d.year, d.month, d.day, start, tzinfo=tz)
        closes = datetime(d.year, d.month, d.day, end, tzinfo=tz) if end < 24 else opens.replace(hour=23, minute=59)
        if local < closes:
            return max(local, opens).astimezone(timezone.utc)
    return now  # no business day configured in a week: send now


NURTURE_SUBJECTS = ("A few things people ask us first", "How others in your role got started",
                    "Still thinking it over?", "A last note from us", "Questions we hear often",
                    "What to expect in the first weeks")


def nurture_message(d: dict[str, Any], step: int, cfg: LeadsConfig) -> tuple[str, str]:
    s = cfg.settings
    subject = NURTURE_SUBJECTS[(step - 1) % len(NURTURE_SUBJECTS)]
    lines = {1: f"Thank you again for your interest in {_interest(d)}. Here is what people usually ask us first: "
                "how the schedule fits around work, what support there is along the way, and how to start.",
             2: "People in a similar situation often tell us the hardest part is choosing when to start. "
                "If a short call would help you decide, just reply and we will find a time.",
             3: "This is our last note for now. If the timing is not right, that is fine: reply whenever you "
                "want to pick this up again."}
    body = (f"Hello,\n\n{lines.get(step, lines[3])}\n\nKind regards,\nThe admissions team\n{s.company}\n\n{s.opt_out_line}")
    return subject, body


def nurture_stage(env: StageEnv, cfg: LeadsConfig, connectors, *, now: datetime | None = None) -> StageReport:
    """The nurture sequence: each due step is sent in the lead's local business hours (else moved to the
    next opening), one every ``nurture_interval_days``, ``nurture_steps`` in all, through the outbox
    (idempotency key per step). Consent is checked again first, on the lead and on its CRM contact; a
    reply, a conversion, a bounce or an unsubscribe has stopped the sequence already (responses)."""
    now = now or utcnow()
    s = cfg.settings
    leads = [r for r in _resolved_leads(env) if (r["data"].get("nurture") or {}).get("state") in ("scheduled", "active")]
    crm = connectors.read("crm_contacts", "get", [r["data"]["match"]["contact_id"] for r in leads]) if leads else {}
    updates, effects = [], []
    counts: Counter = Counter()
    for r in leads:
        d = copy.deepcopy(r["data"])
        n = d["nurture"]
        c = crm.get(d["match"]["contact_id"]) or {}
        for k in ("do_not_email", "unsubscribed"):
            if c.get(k):
                d["consent"][k] = True
        ok, why = may_email(d)
        if not ok:
            n.update(state="stopped", stopped_reason=why, stopped_at=now.isoformat())
            counts["stopped"] += 1
            updates.append(ItemUpdate(r["item_id"], "resolved", d))
            continue
        due = datetime.fromisoformat(n["next_at"]) if n.get("next_at") else now
        if due > now:
            continue
        slot = next_slot(now, (d.get("enrichment") or {}).get("timezone"), s)
        if slot > now:
            if n.get("next_at") != slot.isoformat():
                n["next_at"] = slot.isoformat()
                updates.append(ItemUpdate(r["item_id"], "resolved", d))
            counts["outside_business_hours"] += 1
            continue
        step = int(n["step"]) + 1
        subject, body = nurture_message(d, step, cfg)
        if violations := policy_violations(body, cfg):  # a template the brief's policy refuses is not sent
            n.update(state="stopped", stopped_reason="policy: " + "; ".join(violations), stopped_at=now.isoformat())
            counts["stopped"] += 1
            updates.append(ItemUpdate(r["item_id"], "resolved", d))
            continue
        effects.append(message_effect({**r, "data": d}, f"nurture_{step}", f"nurture_{step}", subject, body))
        n["step"] = step
        n["sent"] = [*n.get("sent", []), now.isoformat()]
        if step >= s.nurture_steps:
            n.update(state="completed", next_at=None)
            counts["completed"] += 1
        else:
            n.update(state="active", next_at=(now + timedelta(days=s.nurture_interval_days)).isoformat())
        counts["sent"] += 1
        updates.append(ItemUpdate(r["item_id"], "resolved", d))
    report = commit_stage(env, "nurture", now, updates, trace_ids={r["item_id"]: r["trace_id"] for r in leads},
                          effects=effects, set_stage=False, n_in=len(leads),
                          metadata={"nurture_sent": counts.get("sent", 0), "completed": counts.get("completed", 0),
                                    "stopped": counts.get("stopped", 0),
                                    "waiting_for_business_hours": counts.get("outside_business_hours", 0)})
    if effects:
        got = dispatch(env.db, connectors, env.flow, keys=[e.idempotency_key for e in effects], policy=cfg.connector_policy)
        report.metadata["delivered"] = got["delivered"]
    return report


from . import flow as _flow  # noqa: E402,F401  (registers the flow spec for code that imports the stages only)
