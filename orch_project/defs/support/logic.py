"""The customer support loop as plain functions, one per stage. The flow spec (flow.py) orders them
and the kit builds their Dagster assets; benchmarks/support_batch.py calls the same functions in a
bare loop.

intake (validate + mask) -> triage -> assignment -> knowledge -> draft -> approval gate ->
actions (ticket, reply, CRM log via the outbox) -> survey; then, across partitions:
CSAT fold-back, SLA escalation, insights to the backlog and the KPI report (reporting.py).
"""

from __future__ import annotations

import heapq
import re
from collections import Counter
from datetime import date, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml
from pydantic import Field

from ...lib.connectors.embedded import Effect
from ...lib.contracts import InboundMessage, LabelledOutput, LLMOutput, LLMStepRequest
from ...lib.flows import FlowConfig
from ...lib.guardrails import injection, pii
from ...lib.intake import Accepted, IntakeContext, run_intake
from ...lib.outbox import delivered_keys, dispatch, enqueue, idempotency_key
from ...lib.pipeline import (ItemUpdate, StageEnv, StageReport, commit_stage, dead_letter, load_items,
                             load_stage_items, model_step_failed, without_deferred)
from ...lib.saga import run_effects_stage, step_key
from ...lib.store import Database, as_utc, items, utcnow

FLOW = "support"
FOLDER = Path(__file__).parent
FIRST_DAY = date(2026, 1, 1)  # first daily partition
# The model's answer when a message fits no intent (below the calibrated out-of-scope threshold):
# a human triages it, from the general account queue.
UNKNOWN_INTENT = "unknown"
OUT_OF_SCOPE = {"queue": "account", "priority": "medium"}
URGENT = re.compile(r"\b(urgent|urgently|asap|immediately|right now|emergency|fraud|stolen)\b", re.I)
PRIORITY_UP = {"low": "medium", "medium": "high", "high": "high"}


class TriageOutput(LabelledOutput):
    """The triage step's output contract: an intent label from the taxonomy."""


class DraftOutput(LLMOutput):
    """The draft step's output contract: the reply text and the articles it cites."""

    text: str
    citations: list[str] = Field(default_factory=list)


class SupportConfig(FlowConfig):
    """Everything the support flow reads from its folder: brief, taxonomy, roster, KB, prompts."""

    def __init__(self, folder: Path = FOLDER):
        super().__init__(folder)

    @cached_property
    def taxonomy(self) -> dict[str, dict[str, str]]:
        return yaml.safe_load((self.folder / "taxonomy.yaml").read_text())["intents"]

    @cached_property
    def intent_labels(self) -> list[str]:
        """Every label triage may give: the taxonomy's intents and ``unknown`` (out of scope)."""
        return [*sorted(self.taxonomy), UNKNOWN_INTENT]

    @cached_property
    def kb(self):
        from ...lib.connectors.knowledge import KnowledgeBase

        return KnowledgeBase.load(self.folder / "knowledge")

    @cached_property
    def experiments(self):
        from ...lib.experiments import load_experiments

        return load_experiments(self.folder / "experiments.yaml")

    @cached_property
    def draft_policy(self):
        from ...lib.guardrails.policy import DraftPolicy

        return DraftPolicy.load(self.folder / "policy.yaml")


STEP_LOGIC_VERSION = {"triage": "triage-v2", "draft_reply": "draft-v2"}


def step_code_version(task: str, cfg: SupportConfig) -> str:
    """Code version of a model step's asset: its logic version plus the version of every prompt it can
    use (variants included). Editing a prompt file changes it, so Dagster marks the asset stale; the
    served model's id reaches the same asset as the data version of ``triage_model_promotion``."""
    return cfg.code_version([task], STEP_LOGIC_VERSION[task])


# --- intake: validation and PII masking ----------------------------------------------

def to_item(raw: dict[str, Any], ctx: IntakeContext) -> Accepted:
    """One inbound message as an item: validated against the InboundMessage contract, subject and body
    PII-masked (the sender's name is a known name), the sender's address and name kept only in the
    vault behind tokens, injection attempts flagged."""
    msg = InboundMessage.model_validate(raw)
    names = [msg.sender.name]
    subject = pii.mask(msg.subject, names)
    body = pii.mask(msg.body, names)
    cust_tok = ctx.vault(msg.id, "EMAIL_ADDRESS" if msg.sender.email else "HANDLE", msg.sender.address)
    name_tok = ctx.vault(msg.id, "PERSON", msg.sender.name) if msg.sender.name else None
    findings = injection.scan(f"{subject.text}\n{body.text}")
    return Accepted(
        item_id=msg.id, received_at=msg.received_at, channel=msg.channel, pii=subject.counts + body.counts,
        injection=injection.kinds(findings) if findings else [],
        data={"subject": subject.text, "body": body.text, "customer_ref": pii.customer_ref(msg.sender.address, ctx.salt),
              "customer_token": cust_tok, "name_token": name_tok,
              "attachments": [{"content_type": a.content_type, "size_bytes": a.size_bytes} for a in msg.attachments]})


def intake_stage(env: StageEnv, cfg: SupportConfig, inbox_dir: Path | None, salt: str,
                 today: date | None = None) -> StageReport:
    """The kit's intake for the support flow over ``inbox_dir`` (the Dagster asset passes the flow's own
    folder, ``SPEC.inbox_dir(ORCH_INBOX_DIR)``; tests and benchmarks may pass any folder)."""
    return run_intake(env, env.spec, inbox_dir, salt, today)


def _text(row: dict[str, Any]) -> str:
    d = row["data"]
    return f"{d.get('subject') or ''}\n{d.get('body') or ''}".strip()



# --- triage ---------------------------------------------------------------------------

def triage_stage(env: StageEnv, cfg: SupportConfig, gateway) -> StageReport:
    """Intent from the model (through the gateway); priority and queue from the taxonomy,
    raised one level for urgent wording; the first-response due date from the brief's SLA."""
    started = utcnow()
    rows = load_stage_items(env, "triage")
    # a message flagged for injection is classified (intent and urgency) without the sentences
    # carrying the attempt, so the attempt cannot steer routing
    texts = {r["item_id"]: injection.neutralise(_text(r)) if r["data"].get("injection") else _text(r) for r in rows}
    reqs = [LLMStepRequest(id=r["item_id"], inputs={"text": texts[r["item_id"]], "context": {"channel": r["channel"]}})
            for r in rows]
    intents = cfg.intent_labels
    responses, stats = gateway.run("triage", reqs, TriageOutput, label_choices=intents,
                                   prompt_vars={"allowed_intents": ", ".join(intents)}) if reqs else ([], None)
    updates = []
    for row, resp in zip(rows, responses):
        if not resp.ok:
            updates.append(model_step_failed(row, "triage", resp))
            continue
        intent = resp.output.label
        tax = cfg.taxonomy.get(intent) if intent != UNKNOWN_INTENT else OUT_OF_SCOPE
        if tax is None:
            updates.append(dead_letter(row, "schema_mismatch", f"triage returned an intent outside the taxonomy: {intent!r}"))
            continue
        priority = tax["priority"]
        if URGENT.search(texts[row["item_id"]]):
            priority = PRIORITY_UP[priority]
        data = {**without_deferred(row["data"]), "intent": intent, "confidence": round(resp.output.confidence, 4),
                "priority": priority, "queue": tax["queue"],
                "model_version": (resp.output.model_extra or {}).get("model_version")}
        due = (row["received_at"] or row["ingested_at"]) + timedelta(hours=cfg.brief.sla_hours[priority])
        updates.append(ItemUpdate(row["item_id"], "triaged", data, columns={"due_at": due}))
    md = stats.as_metadata("triage") if stats else {}
    md["priority_counts"] = dict(Counter(u.data.get("priority") for u in updates if u.outcome == "ok"))
    return commit_stage(env, "triage", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                        metadata=md)


# --- assignment -----------------------------------------------------------------------

def current_load(db: Database, open_statuses: tuple[str, ...], flow: str = FLOW) -> Counter:
    """Open items per assignee across all partitions."""
    q = sa.select(items.c.data).where(items.c.flow == flow, items.c.status.in_(open_statuses))
    with db.begin() as conn:
        return Counter(d.get("assignee") for (d,) in conn.execute(q) if d.get("assignee"))


def assign_stage(env: StageEnv, cfg: SupportConfig) -> StageReport:
    """Least-loaded person (open items / capacity) among agents and leads serving the queue;
    high priority first so urgent work gets the emptiest desks."""
    started = utcnow()
    rows = load_stage_items(env, "assignment")
    load = current_load(env.db, env.spec.open_statuses)
    people = {p["id"]: p for p in cfg.roster if p["role"] in ("agent", "lead")}
    heaps: dict[str, list[tuple[float, str]]] = {}
    for pid, p in people.items():
        for q in p["queues"]:
            heaps.setdefault(q, []).append((load.get(pid, 0) / p["capacity"], pid))
    for h in heaps.values():
        heapq.heapify(h)
    order = sorted(rows, key=lambda r: ({"high": 0, "medium": 1, "low": 2}[r["data"]["priority"]],
                                        r["received_at"] or r["ingested_at"]))
    updates = []
    for row in order:
        heap = heaps.get(row["data"]["queue"])
        if not heap:
            updates.append(dead_letter(row, "configuration", f"no agent serves queue {row['data']['queue']!r}"))
            continue
        # the heap entry may be stale if the person also took work from another queue
        while True:
            ratio, pid = heapq.heappop(heap)
            actual = load.get(pid, 0) / people[pid]["capacity"]
            if abs(actual - ratio) < 1e-12:
                break
            heapq.heappush(heap, (actual, pid))
        load[pid] += 1
        heapq.heappush(heap, (load[pid] / people[pid]["capacity"], pid))
        over = load[pid] > people[pid]["capacity"]
        updates.append(ItemUpdate(row["item_id"], "assigned",
                                  {**row["data"], "assignee": pid, "over_capacity": over}))
    md = {"assignees": len({u.data.get("assignee") for u in updates if u.outcome == "ok"}),
          "over_capacity": sum(1 for u in updates if u.data.get("over_capacity"))}
    return commit_stage(env, "assignment", started, updates,
                        trace_ids={r["item_id"]: r["trace_id"] for r in rows}, metadata=md)


# --- knowledge lookup -----------------------------------------------------------------

def knowledge_stage(env: StageEnv, cfg: SupportConfig) -> StageReport:
    started = utcnow()
    rows = load_stage_items(env, "knowledge")
    hits = cfg.kb.lookup([_text(r) for r in rows], [r["data"].get("intent") for r in rows]) if rows else []
    updates = [ItemUpdate(r["item_id"], "grounded", {**r["data"], "article_id": aid, "retrieval_score": round(s, 4)})
               for r, (aid, s) in zip(rows, hits)]
    md = {"articles_used": len({u.data["article_id"] for u in updates}),
          "mean_retrieval_score": round(sum(u.data["retrieval_score"] for u in updates) / len(updates), 4)
          if updates else 0.0}
    return commit_stage(env, "knowledge", started, updates,
                        trace_ids={r["item_id"]: r["trace_id"] for r in rows}, metadata=md)


# --- draft reply ----------------------------------------------------------------------

def draft_stage(env: StageEnv, cfg: SupportConfig, gateway) -> StageReport:
    """A reply grounded in the retrieved article; the article id is kept as its citation."""
    started = utcnow()
    rows = load_stage_items(env, "draft")
    names = {p["id"]: p["name"].split()[0] for p in cfg.roster}
    reqs = []
    for r in rows:
        art = cfg.kb.by_id[r["data"]["article_id"]]
        ctx = {
            "article_id": art.id, "article_title": art.title, "article_summary": art.summary,
            "article_steps": "\n".join(f"{i}. {s}" for i, s in enumerate(art.steps, 1)),
            "agent_first_name": names.get(r["data"]["assignee"], "The support team"),
            "grounding_score": r["data"]["retrieval_score"], "intent": r["data"]["intent"],
            "citations": [art.id],
        }
        reqs.append(LLMStepRequest(id=r["item_id"], inputs={"text": _text(r), "context": ctx}))
    arms, responses, stats = _run_with_experiment(cfg, gateway, "draft_reply", reqs, DraftOutput)
    updates = []
    for row, resp in zip(rows, responses):
        if not resp.ok:
            updates.append(model_step_failed(row, "draft", resp))
            continue
        out: DraftOutput = resp.output
        data = {**without_deferred(row["data"]), "draft": out.text, "citations": out.citations}
        if row["item_id"] in arms:
            data["experiment"] = arms[row["item_id"]]
        updates.append(ItemUpdate(row["item_id"], "drafted", data))
    md = stats.as_metadata("draft") if stats else {}
    md["experiment_arms"] = dict(Counter(a["arm"] for a in arms.values()))
    return commit_stage(env, "draft", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                        metadata=md)


def _run_with_experiment(cfg: SupportConfig, gateway, task: str, reqs: list[LLMStepRequest], output_model):
    """Run a model step, sending the items of an enabled experiment's variant arm through its prompt
    variant. Returns ({item_id: {"name", "arm"}}, responses in request order, merged stats)."""
    from ...lib.experiments import CONTROL, active_for

    if not reqs:
        return {}, [], None
    active = active_for(cfg.experiments, task)
    if active is None:
        responses, stats = gateway.run(task, reqs, output_model)
        return {}, responses, stats
    name, exp = active
    arms = {r.id: {"name": name, "arm": exp.arm(name, r.id)} for r in reqs}
    by_arm: dict[str, list[int]] = {}
    for i, r in enumerate(reqs):
        by_arm.setdefault(arms[r.id]["arm"], []).append(i)
    responses: list = [None] * len(reqs)
    merged = None
    for arm, idx in sorted(by_arm.items()):
        out, stats = gateway.run(task, [reqs[i] for i in idx], output_model,
                                 variant=None if arm == CONTROL else exp.variant)
        for i, resp in zip(idx, out):
            responses[i] = resp
        merged = stats if merged is None else merged.merge(stats)
    return arms, responses, merged


# --- approval gate --------------------------------------------------------------------

def approval_reasons(cfg: SupportConfig, data: dict[str, Any]) -> list[str]:
    pol = cfg.brief.approval
    reasons = []
    if data.get("priority") in pol.priorities:
        reasons.append("high_priority")
    if data.get("injection"):
        reasons.append("injection_suspected")
    if data.get("intent") == UNKNOWN_INTENT:
        reasons.append("out_of_scope")
    elif float(data.get("confidence", 0.0)) < pol.min_confidence:
        reasons.append("low_confidence")
    if data.get("policy_violations"):
        reasons.append("policy_hit")
    return reasons


def draft_violations(cfg: SupportConfig, data: dict[str, Any]) -> list[str]:
    own = {data.get("customer_ref"), data.get("customer_token"), data.get("name_token")} - {None}
    return cfg.draft_policy.check(data.get("draft", ""), own_refs=own)


def approval_gate_stage(env: StageEnv, cfg: SupportConfig) -> StageReport:
    """High priority, low confidence, out of scope, a suspected injection or a draft that breaks the
    flow's draft policy waits in the approvals queue for a reviewer; the rest is approved by policy.
    Either way the decision is audited."""
    started = utcnow()
    rows = load_stage_items(env, "approval_gate")
    now = utcnow()
    updates, approval_rows, audit_rows = [], [], []
    for r in rows:
        violations = draft_violations(cfg, r["data"])
        data = {**r["data"], "policy_violations": violations} if violations else r["data"]
        reasons = approval_reasons(cfg, data)
        if reasons:
            updates.append(ItemUpdate(r["item_id"], "awaiting_approval", {**data, "approval_reasons": reasons},
                                      "routed"))
            approval_rows.append({"flow": FLOW, "item_id": r["item_id"], "reason": reasons[0],
                                  "required_role": cfg.brief.approval.reviewer_role, "status": "pending",
                                  "due_at": r["due_at"], "created_at": now, "edited": False})
            action = "approval_requested"
        else:
            updates.append(ItemUpdate(r["item_id"], "approved", r["data"]))
            action = "auto_approved"
        audit_rows.append({"actor": "system:approval_gate", "action": action, "flow": FLOW, "item_id": r["item_id"],
                           "trace_id": r["trace_id"], "reason": ",".join(reasons) or "policy: below thresholds",
                           "inputs": {"priority": r["data"].get("priority"),
                                      "confidence": r["data"].get("confidence"),
                                      "injection": r["data"].get("injection"), "policy_violations": violations}})
    md = {"awaiting_approval": len(approval_rows), "auto_approved": len(rows) - len(approval_rows),
          "approval_reasons": dict(Counter(x for u in updates for x in u.data.get("approval_reasons", [])))}
    return commit_stage(env, "approval_gate", started, updates,
                        trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                        approval_rows=approval_rows, audit_rows=audit_rows, metadata=md)


# --- actions: ticket, reply, CRM log ----------------------------------------------------

ACTION_STEPS = ("ticket", "reply", "crm_log")
# A delivered step whose multi-step effect failed for good is undone by its compensation (same
# connector, allow-listed action, its own idempotency key). A reply cannot be recalled.
COMPENSATIONS = {"ticket": ("ticketing", "void_ticket")}
EFFECTS = frozenset({("ticketing", "create_ticket"), ("messaging", "send_reply"), ("crm", "support_interaction"),
                     ("messaging", "send_survey"), ("ticketing", "void_ticket")})


def _action_effects(row: dict[str, Any]) -> dict[str, Effect]:
    d, iid, tr = row["data"], row["item_id"], row["trace_id"]
    keys = {s: step_key(FLOW, row, s) for s in ACTION_STEPS}
    return {
        "ticket": Effect(keys["ticket"], "ticketing", "create_ticket", iid, tr, {
            "queue": d["queue"], "priority": d["priority"], "assignee": d["assignee"], "intent": d["intent"],
            "subject": d.get("subject") or d["intent"].replace("_", " "), "status": "solved"}),
        "reply": Effect(keys["reply"], "messaging", "send_reply", iid, tr, {
            "kind": "reply", "recipient": d["customer_token"],
            "subject": "Re: " + (d.get("subject") or "your message"), "body": d["draft"]}),
        "crm_log": Effect(keys["crm_log"], "crm", "support_interaction", iid, tr, {
            "customer_ref": d["customer_ref"],
            "summary": f"{d['intent']} ({d['priority']}) handled by {d['assignee']}; article {d.get('article_id')}"}),
    }


def actions_stage(env: StageEnv, cfg: SupportConfig, connectors, *, waiting_only: bool = False) -> StageReport:
    """Ticket, reply and CRM log through the outbox (the kit's saga, lib/saga.py): items whose effects
    were all delivered are resolved ("completed" in the audit log); undelivered effects stay pending and
    the item stays approved, so the next run (or the ops job's redelivery) delivers them: nothing lost,
    nothing twice. An effect that failed ``max_attempts`` times has failed for good: the ticket is
    voided, the rest cancelled, and the item dead-lettered ("compensated")."""
    rows = load_stage_items(env, "actions", after="actions" if waiting_only else None)
    return run_effects_stage(env, "actions", rows, connectors, plan=_action_effects, compensations=COMPENSATIONS,
                             policy=cfg.connector_policy, done_status="resolved",
                             done_reason="ticket, reply and CRM log delivered")


def redelivery_stage(env: StageEnv, cfg: SupportConfig, connectors) -> StageReport:
    """The ops job's self-healing step (all partitions): deliver every effect still in the outbox
    (behind the connectors' circuit breakers), then resolve -- or compensate -- the items that were
    waiting for them and send their surveys."""
    started = utcnow()
    sent = dispatch(env.db, connectors, FLOW, policy=cfg.connector_policy)
    actions = actions_stage(env, cfg, connectors, waiting_only=True)
    surveys = survey_stage(env, cfg, connectors)
    md = {"redelivered": sent["delivered"], "still_failing": sent["failed"],
          "waiting_open_circuit": sent.get("skipped", 0), "resolved": actions.metadata["resolved"],
          "compensated": actions.metadata["compensated"], "surveys_sent": surveys.metadata["surveys_sent"]}
    return StageReport("redelivery", actions.n_in, actions.outcomes, (utcnow() - started).total_seconds() * 1000.0,
                       md)


def survey_stage(env: StageEnv, cfg: SupportConfig, connectors) -> StageReport:
    """A satisfaction survey to every resolved item, once."""
    started = utcnow()
    rows = load_stage_items(env, "survey")
    effects = [Effect(idempotency_key(FLOW, r["item_id"], "survey"), "messaging", "send_survey", r["item_id"],
                      r["trace_id"], {"kind": "survey", "recipient": r["data"]["customer_token"],
                                      "subject": "How did we do?",
                                      "body": "Please rate your support experience from 1 (poor) to 5 (great)."})
               for r in rows]
    with env.db.begin() as conn:
        enqueue(env.db, conn, FLOW, effects)
    sent = (dispatch(env.db, connectors, FLOW, [r["item_id"] for r in rows], policy=cfg.connector_policy) if rows
            else {"delivered": 0, "failed": 0})
    done = delivered_keys(env.db, [e.idempotency_key for e in effects])
    now = utcnow().isoformat()
    updates = []
    for r in rows:
        if idempotency_key(FLOW, r["item_id"], "survey") in done:
            updates.append(ItemUpdate(r["item_id"], "resolved", {**r["data"], "survey_sent_at": now}))
    md = {"surveys_sent": len(updates), "surveys_pending": len(rows) - len(updates),
          "effects_failed": sent["failed"]}
    return commit_stage(env, "survey", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                        metadata=md, n_in=len(rows))


# --- across partitions: CSAT fold-back -------------------------------------------------

def csat_stage(env: StageEnv, cfg: SupportConfig, connectors) -> StageReport:
    """Fold survey answers back into their items (all partitions: answers arrive days later)."""
    started = utcnow()
    rows = load_items(env, "resolved", stage="survey")
    answers = connectors.survey_responses_for([r["item_id"] for r in rows]) if rows else {}
    updates = []
    for r in rows:
        a = answers.get(r["item_id"])
        if a:
            updates.append(ItemUpdate(r["item_id"], "resolved", {
                **r["data"], "csat": int(a["score"]), "csat_at": as_utc(a["responded_at"]).isoformat()}))
    scores = [u.data["csat"] for u in updates]
    md = {"responses_folded": len(updates), "awaiting_response": len(rows) - len(updates),
          "mean_csat_new": round(sum(scores) / len(scores), 3) if scores else 0.0}
    return commit_stage(env, "csat", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                        metadata=md, n_in=len(rows))


def insights_stage(env: StageEnv, cfg: SupportConfig) -> StageReport:
    """Top, rising and worst-CSAT intents upserted into the backlog (reporting.insights)."""
    from .reporting import insights

    started = utcnow()
    found = insights(env.db)["items"]
    rows = "\n".join(f"| {f['kind']} | {f['key']} | {f['score']:g} |" for f in found)
    md = {"backlog_items": len(found),
          "insights_md": "| kind | intent | score |\n|---|---|---|\n" + rows if found else "none yet"}
    return StageReport("insights", len(found), Counter(ok=len(found)), (utcnow() - started).total_seconds() * 1000.0,
                       md)


from . import flow as _flow  # noqa: E402,F401  (registers the flow spec for code that imports only this module)
