"""The customer support loop as plain functions, one per stage. The Dagster assets in assets.py
call these with resources; benchmarks/support_batch.py calls the same functions in a bare loop.

intake (validate + mask) -> triage -> assignment -> knowledge -> draft -> approval gate ->
actions (ticket, reply, CRM log via the outbox) -> survey; then, across partitions:
CSAT fold-back, SLA escalation, insights to the backlog and the KPI report (reporting.py).
"""

from __future__ import annotations

import hashlib
import heapq
import re
from collections import Counter
from dataclasses import dataclass
from datetime import date, datetime, timedelta
from functools import cached_property
from pathlib import Path
from typing import Any

import sqlalchemy as sa
import yaml
from pydantic import Field

from ...lib.connectors.embedded import Effect
from ...lib.contracts import DesignBrief, InboundMessage, LLMOutput, LLMStepRequest, describe_validation_error
from ...lib.guardrails import injection, pii
from ...lib.intake import Parsed, pending_sources
from ...lib.outbox import delivered_keys, dispatch, effect_states, enqueue, idempotency_key, revive, settle
from ...lib.pipeline import TERMINAL_STATUSES, ItemUpdate, StageEnv, StageReport, commit_stage, load_items
from ...lib.retention import tombstone_inbox_rows
from ...lib.store import (Database, approvals, as_utc, audit, chunked, dlq, intake, item_stages, items, utcnow,
                          vault)
from ...lib.telemetry import log_event, new_trace_id

FLOW = "support"
FOLDER = Path(__file__).parent
FIRST_DAY = date(2026, 1, 1)  # first daily partition
OPEN_STATUSES = ("received", "deferred", "triaged", "assigned", "grounded", "drafted", "awaiting_approval",
                 "approved")
# open and not waiting for a person: the flow itself still has work to do on these
IN_PROGRESS_STATUSES = tuple(st for st in OPEN_STATUSES if st != "awaiting_approval")
# The model's answer when a message fits no intent (below the calibrated out-of-scope threshold):
# a human triages it, from the general account queue.
UNKNOWN_INTENT = "unknown"
OUT_OF_SCOPE = {"queue": "account", "priority": "medium"}
# Gateway errors that say "not now" rather than "bad item": the item waits for the next run.
DEFER_ERRORS = {"quota_exceeded", "circuit_open"}
URGENT = re.compile(r"\b(urgent|urgently|asap|immediately|right now|emergency|fraud|stolen)\b", re.I)
PRIORITY_UP = {"low": "medium", "medium": "high", "high": "high"}


class TriageOutput(LLMOutput):
    """The triage step's output contract: an intent label from the taxonomy."""


class DraftOutput(LLMOutput):
    text: str
    citations: list[str] = Field(default_factory=list)


@dataclass
class SupportConfig:
    """Everything the support flow reads from its folder: brief, taxonomy, roster, KB, prompts."""

    folder: Path = FOLDER

    @cached_property
    def brief(self) -> DesignBrief:
        return DesignBrief.load(self.folder / "brief.yaml")

    @cached_property
    def taxonomy(self) -> dict[str, dict[str, str]]:
        return yaml.safe_load((self.folder / "taxonomy.yaml").read_text())["intents"]

    @cached_property
    def intent_labels(self) -> list[str]:
        """Every label triage may give: the taxonomy's intents and ``unknown`` (out of scope)."""
        return [*sorted(self.taxonomy), UNKNOWN_INTENT]

    @cached_property
    def roster(self) -> list[dict[str, Any]]:
        return yaml.safe_load((self.folder / "roster.yaml").read_text())["agents"]

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

    @cached_property
    def connector_policy(self):
        """Circuit breakers, timeout, attempts before compensation and alert windows (connectors.yaml)."""
        from ...lib.connectors.policy import ConnectorPolicy

        return ConnectorPolicy.load(self.folder / "connectors.yaml")

    @property
    def routing_path(self) -> Path:
        return self.folder / "routing.yaml"

    @property
    def prompts_dir(self) -> Path:
        return self.folder / "prompts"

    @cached_property
    def prompt_versions(self) -> dict[str, str]:
        """The prompt registry: prompts are versioned files, one id per prompt (``triage``,
        ``draft_reply``, an A/B variant ``draft_reply.b``), the content hash of its OpenAI and
        embedded (``.local.txt``) files. Part of cache keys, evaluation records and the code versions
        of the assets that use them."""
        out: dict[str, str] = {}
        for p in sorted(self.prompts_dir.glob("*.txt")):
            prompt_id = p.name.removesuffix(".txt").removesuffix(".local")
            out[prompt_id] = hashlib.sha256(out.get(prompt_id, "").encode() + p.read_bytes()).hexdigest()[:12]
        return out


STEP_LOGIC_VERSION = {"triage": "triage-v2", "draft_reply": "draft-v2"}


def step_code_version(task: str, cfg: SupportConfig) -> str:
    """Code version of a model step's asset: its logic version plus the version of every prompt it can
    use (variants included). Editing a prompt file changes it, so Dagster marks the asset stale; the
    served model's id reaches the same asset as the data version of ``triage_model_promotion``."""
    prompts = sorted((pid, v) for pid, v in cfg.prompt_versions.items() if pid.split(".")[0] == task)
    return "-".join([STEP_LOGIC_VERSION[task], *(v for _, v in prompts)])


# --- intake: validation and PII masking ----------------------------------------------

def intake_stage(env: StageEnv, cfg: SupportConfig, inbox_dir: Path | None, salt: str,
                 today: date | None = None) -> StageReport:
    """Read new sources for the partition days, validate them against the InboundMessage
    contract, mask PII, store masked items; anything invalid goes to the DLQ with a reason."""
    started = utcnow()
    today = today or started.date()
    days = set(env.days)
    accepted: list[dict[str, Any]] = []
    intake_rows: list[dict[str, Any]] = []
    dead: list[dict[str, Any]] = []
    vault_rows: list[dict[str, Any]] = []
    pii_total: Counter = Counter()
    seen_ids: set[str] = set()
    parsed_batch: list[tuple[Parsed, str]] = []
    for p in pending_sources(env.db, FLOW, inbox_dir):
        day = p.partition_day(FIRST_DAY, today)
        if day in days:
            parsed_batch.append((p, day))
    candidate_ids = [str(p.raw.get("id")) for p, _ in parsed_batch if p.raw and p.raw.get("id")]
    existing = _existing_item_ids(env.db, candidate_ids)
    now = utcnow()
    for p, day in parsed_batch:
        base = {"source_key": p.source_key, "flow": FLOW, "day": day, "run_id": env.run_id, "ingested_at": now}
        msg = None
        error_type, reason = p.error_type, p.error
        if reason is None:
            try:
                msg = InboundMessage.model_validate(p.raw)
            except Exception as exc:  # pydantic ValidationError or a type error deep in the payload
                error_type, reason = "validation", describe_validation_error(exc)
        if msg is None:
            trace = new_trace_id()
            intake_rows.append({**base, "item_id": None, "outcome": "dead_lettered"})
            dead.append({"flow": FLOW, "item_id": None, "source_key": p.source_key, "stage": "intake",
                         "error_type": error_type or "invalid", "reason": reason, "trace_id": trace,
                         "replay": {"source_key": p.source_key}, "status": "open", "run_id": env.run_id,
                         "created_at": now})
            continue
        if msg.id in existing or msg.id in seen_ids:
            intake_rows.append({**base, "item_id": msg.id, "outcome": "duplicate"})
            continue
        seen_ids.add(msg.id)
        names = [msg.sender.name]
        subject = pii.mask(msg.subject, names)
        body = pii.mask(msg.body, names)
        counts = subject.counts + body.counts
        pii_total += counts
        cust_tok = pii.vault_token(msg.id, "EMAIL_ADDRESS", salt)
        vault_rows.append({"token": cust_tok, "item_id": msg.id, "entity_type": "EMAIL_ADDRESS",
                           "value": msg.sender.email, "created_at": now})
        name_tok = None
        if msg.sender.name:
            name_tok = pii.vault_token(msg.id, "PERSON", salt)
            vault_rows.append({"token": name_tok, "item_id": msg.id, "entity_type": "PERSON",
                               "value": msg.sender.name, "created_at": now})
        findings = injection.scan(f"{subject.text}\n{body.text}")
        trace = new_trace_id()
        accepted.append({
            "item_id": msg.id, "flow": FLOW, "trace_id": trace, "day": day, "channel": msg.channel,
            "status": "received", "stage": "intake", "received_at": msg.received_at, "ingested_at": now,
            "updated_at": now, "escalation_level": 0,
            "data": {
                "source_key": p.source_key, "subject": subject.text, "body": body.text,
                "customer_ref": pii.customer_ref(msg.sender.email, salt), "customer_token": cust_tok,
                "name_token": name_tok, "pii": dict(counts),
                **({"injection": injection.kinds(findings)} if findings else {}),
                "attachments": [{"content_type": a.content_type, "size_bytes": a.size_bytes}
                                for a in msg.attachments],
            },
        })
        intake_rows.append({**base, "item_id": msg.id, "outcome": "accepted"})
    finished = utcnow()
    ms = (finished - started).total_seconds() * 1000.0
    timings = [{"item_id": a["item_id"], "flow": FLOW, "stage": "intake", "run_id": env.run_id,
                "started_at": started, "finished_at": finished, "duration_ms": ms, "attempt": env.attempt,
                "outcome": "ok"} for a in accepted]
    with env.db.begin() as conn:
        # The intake log is the idempotency guard: a source key is ingested exactly once.
        env.db.insert_ignore(conn, intake, intake_rows, ["source_key"])
        if accepted:
            env.db.insert_ignore(conn, items, accepted, ["item_id"])
            conn.execute(item_stages.insert(), timings)
        env.db.insert_ignore(conn, vault, vault_rows, ["token"])
        if dead:
            conn.execute(dlq.insert(), dead)
        # data minimisation: once a table row is in the intake log its raw payload is no longer needed
        # (the masked item, the vault tokens or the dead letter's reason carry what later steps use)
        tombstone_inbox_rows(conn, [r["source_key"] for r in intake_rows], finished, "ingested; raw payload dropped")
    outcomes = Counter({"ok": len(accepted), "dead_lettered": len(dead),
                        "duplicate": sum(1 for r in intake_rows if r["outcome"] == "duplicate")})
    md = {"received": len(intake_rows), "accepted": len(accepted), "dead_lettered": len(dead),
          "duplicates": outcomes["duplicate"], "pii_entities_masked": sum(pii_total.values())}
    md.update({f"pii_{k.lower()}": v for k, v in sorted(pii_total.items())})
    if dead:
        md["dead_letter_reasons"] = Counter(d["error_type"] for d in dead).most_common()
    log_event(env.logger, "stage_done", flow=FLOW, stage="intake", run_id=env.run_id, days=env.days,
              items=len(intake_rows), outcomes=dict(outcomes), ms=round(ms, 1))
    return StageReport("intake", len(intake_rows), outcomes, ms, md)


def _existing_item_ids(db: Database, ids: list[str]) -> set[str]:
    out: set[str] = set()
    with db.begin() as conn:
        for chunk in chunked(ids, 900):
            out.update(conn.execute(sa.select(items.c.item_id).where(items.c.item_id.in_(chunk))).scalars())
    return out


def _text(row: dict[str, Any]) -> str:
    d = row["data"]
    return f"{d.get('subject') or ''}\n{d.get('body') or ''}".strip()


def _dead(row: dict[str, Any], error: str, reason: str) -> ItemUpdate:
    return ItemUpdate(row["item_id"], "dead_lettered", row["data"], "dead_lettered", dead_letter=(error, reason))


def _failed(row: dict[str, Any], stage: str, resp) -> ItemUpdate:
    """A failed model step: deferred to the next run when the provider said "not now" (budget,
    open circuit), dead-lettered with the gateway's reason otherwise."""
    error = resp.error or "provider_error"
    if error in DEFER_ERRORS:
        note = {"stage": stage, "error": error, "reason": resp.reason, "at": utcnow().isoformat()}
        return ItemUpdate(row["item_id"], "deferred", {**row["data"], "deferred": note}, "deferred")
    return _dead(row, error, f"{stage} failed: {resp.reason}")


def _fresh(data: dict[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in data.items() if k != "deferred"}


# --- triage ---------------------------------------------------------------------------

def triage_stage(env: StageEnv, cfg: SupportConfig, gateway) -> StageReport:
    """Intent from the model (through the gateway); priority and queue from the taxonomy,
    raised one level for urgent wording; the first-response due date from the brief's SLA."""
    started = utcnow()
    rows = load_items(env, "received", deferred_after="intake")
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
            updates.append(_failed(row, "triage", resp))
            continue
        intent = resp.output.label
        tax = cfg.taxonomy.get(intent) if intent != UNKNOWN_INTENT else OUT_OF_SCOPE
        if tax is None:
            updates.append(_dead(row, "schema_mismatch", f"triage returned an intent outside the taxonomy: {intent!r}"))
            continue
        priority = tax["priority"]
        if URGENT.search(texts[row["item_id"]]):
            priority = PRIORITY_UP[priority]
        data = {**_fresh(row["data"]), "intent": intent, "confidence": round(resp.output.confidence, 4),
                "priority": priority, "queue": tax["queue"],
                "model_version": (resp.output.model_extra or {}).get("model_version")}
        due = (row["received_at"] or row["ingested_at"]) + timedelta(hours=cfg.brief.sla_hours[priority])
        updates.append(ItemUpdate(row["item_id"], "triaged", data, columns={"due_at": due}))
    md = stats.as_metadata("triage") if stats else {}
    md["priority_counts"] = dict(Counter(u.data.get("priority") for u in updates if u.outcome == "ok"))
    return commit_stage(env, "triage", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                        metadata=md)


# --- assignment -----------------------------------------------------------------------

def current_load(db: Database, flow: str = FLOW) -> Counter:
    """Open items per assignee across all partitions."""
    q = sa.select(items.c.data).where(items.c.flow == flow, items.c.status.in_(OPEN_STATUSES))
    with db.begin() as conn:
        return Counter(d.get("assignee") for (d,) in conn.execute(q) if d.get("assignee"))


def assign_stage(env: StageEnv, cfg: SupportConfig) -> StageReport:
    """Least-loaded person (open items / capacity) among agents and leads serving the queue;
    high priority first so urgent work gets the emptiest desks."""
    started = utcnow()
    rows = load_items(env, "triaged")
    load = current_load(env.db)
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
            updates.append(_dead(row, "configuration", f"no agent serves queue {row['data']['queue']!r}"))
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
    rows = load_items(env, "assigned")
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
    rows = load_items(env, "grounded", deferred_after="knowledge")
    names = {p["id"]: p["name"].split()[0] for p in cfg.roster}
    reqs = []
    for r in rows:
        art = cfg.kb.by_id[r["data"]["article_id"]]
        ctx = {
            "article_id": art.id, "article_title": art.title, "article_summary": art.summary,
            "article_steps": "\n".join(f"{i}. {s}" for i, s in enumerate(art.steps, 1)),
            "agent_first_name": names.get(r["data"]["assignee"], "The support team"),
            "grounding_score": r["data"]["retrieval_score"], "intent": r["data"]["intent"],
        }
        reqs.append(LLMStepRequest(id=r["item_id"], inputs={"text": _text(r), "context": ctx}))
    arms, responses, stats = _run_with_experiment(cfg, gateway, "draft_reply", reqs, DraftOutput)
    updates = []
    for row, resp in zip(rows, responses):
        if not resp.ok:
            updates.append(_failed(row, "draft", resp))
            continue
        out: DraftOutput = resp.output
        data = {**_fresh(row["data"]), "draft": out.text, "citations": out.citations}
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
    rows = load_items(env, "drafted")
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


def _step_name(data: dict[str, Any], step: str) -> str:
    """The step's name in its idempotency key: after a replay of compensated effects
    (lib/dlq.py) the redone steps carry their effect generation, so they are issued afresh."""
    gen = int((data.get("effect_generation") or {}).get(step, 0))
    return step if gen == 0 else f"{step}#{gen}"


def _action_keys(row: dict[str, Any]) -> dict[str, str]:
    return {s: idempotency_key(FLOW, row["item_id"], _step_name(row["data"], s)) for s in ACTION_STEPS}


def _action_effects(row: dict[str, Any]) -> list[Effect]:
    d, iid, tr = row["data"], row["item_id"], row["trace_id"]
    keys = _action_keys(row)
    return [
        Effect(keys["ticket"], "ticketing", "create_ticket", iid, tr, {
            "queue": d["queue"], "priority": d["priority"], "assignee": d["assignee"], "intent": d["intent"],
            "subject": d.get("subject") or d["intent"].replace("_", " "), "status": "solved"}),
        Effect(keys["reply"], "messaging", "send_reply", iid, tr, {
            "kind": "reply", "recipient": d["customer_token"],
            "subject": "Re: " + (d.get("subject") or "your message"), "body": d["draft"]}),
        Effect(keys["crm_log"], "crm", "support_interaction", iid, tr, {
            "customer_ref": d["customer_ref"],
            "summary": f"{d['intent']} ({d['priority']}) handled by {d['assignee']}; article {d.get('article_id')}"}),
    ]


# A delivered step whose multi-step effect failed for good is undone by its compensation (same
# connector, allow-listed action, its own idempotency key). A reply cannot be recalled.
COMPENSATIONS = {"ticket": ("ticketing", "void_ticket")}


def actions_stage(env: StageEnv, cfg: SupportConfig, connectors, *, waiting_only: bool = False) -> StageReport:
    """Record ticket, reply and CRM effects in the outbox (with the state change), deliver them,
    and resolve the items whose effects were all delivered ("completed" in the audit log).
    Undelivered effects stay pending and the item stays approved, so the next run (or the ops job's
    redelivery) delivers them: nothing lost, nothing twice. Each connector sits behind its circuit
    breaker, so an outage neither fails the batch nor keeps hammering a broken system. An effect that
    failed ``max_attempts`` times has failed for good: the steps already delivered are compensated
    (the ticket is voided), the rest cancelled, and the item dead-lettered ("compensated")."""
    started = utcnow()
    policy = cfg.connector_policy
    rows = load_items(env, "approved", stage="actions" if waiting_only else None)
    effects = [e for r in rows for e in _action_effects(r)]
    with env.db.begin() as conn:
        enqueue(env.db, conn, FLOW, effects)
        # every effect of an approved item is meant to go out: one taken out of delivery (dead, cancelled)
        # while the item was dead-lettered goes back in, with fresh attempts, after a replay
        revive(conn, [e.idempotency_key for e in effects])
    sent = (dispatch(env.db, connectors, FLOW, [r["item_id"] for r in rows], policy=policy) if rows
            else {"delivered": 0, "failed": 0, "skipped": 0})
    state = effect_states(env.db, [e.idempotency_key for e in effects])
    now = utcnow()
    updates, audit_rows, compensations, cancel, dead = [], [], [], [], []
    for r in rows:
        iid, tr = r["item_id"], r["trace_id"]
        keys = _action_keys(r)
        comp_keys = {s: idempotency_key(FLOW, iid, f"compensate_{_step_name(r['data'], s)}") for s in COMPENSATIONS}
        st = {s: state.get(k, {}) for s, k in keys.items()}
        if all(x.get("status") == "delivered" for x in st.values()):
            updates.append(ItemUpdate(iid, "resolved", r["data"], columns={"resolved_at": now}))
            audit_rows.append({"actor": "system:actions", "action": "completed", "flow": FLOW, "item_id": iid,
                               "trace_id": tr, "reason": "ticket, reply and CRM log delivered",
                               "outputs": {"steps": list(ACTION_STEPS)}})
            continue
        broken = [s for s, x in st.items() if x.get("status") == "failed" and x.get("attempts", 0) >= policy.max_attempts]
        if not broken:
            updates.append(ItemUpdate(iid, "approved", r["data"], "waiting"))
            continue
        delivered = [s for s, x in st.items() if x.get("status") == "delivered"]
        undone, undo_keys = [], []
        for s in delivered:
            if s in COMPENSATIONS:
                connector, action = COMPENSATIONS[s]
                compensations.append(Effect(comp_keys[s], connector, action, iid, tr,
                                            {"ticket_key": keys[s], "reason": f"{','.join(broken)} failed for good"}))
                undone.append(f"{s}:{action}")
                undo_keys.append(comp_keys[s])
        cancelled = [s for s, x in st.items() if x.get("status") in ("pending", "failed") and s not in broken]
        dead.extend(keys[s] for s in broken)
        cancel.extend(keys[s] for s in cancelled)
        errors = "; ".join(f"{s} ({st[s]['connector']} {st[s]['action']}) failed {st[s]['attempts']} times: "
                           f"{(st[s].get('last_error') or '')[:120]}" for s in broken)
        reason = f"{errors}; compensated: {', '.join(undone) or 'nothing to undo'}"
        kept = [s for s in delivered if s not in COMPENSATIONS]
        updates.append(ItemUpdate(iid, "dead_lettered", {**r["data"], "compensation": {
            "failed": broken, "compensated": undone, "left_in_place": kept, "cancelled": cancelled,
            "compensation_keys": undo_keys}}, "dead_lettered",
            dead_letter=("effect_failed", reason)))
        audit_rows.append({"actor": "system:actions", "action": "compensated", "flow": FLOW, "item_id": iid,
                           "trace_id": tr, "reason": reason,
                           "outputs": {"failed": broken, "compensated": undone, "left_in_place": kept,
                                       "compensation_keys": undo_keys}})
    md = {"effects_delivered": sent["delivered"], "effects_failed": sent["failed"],
          "effects_waiting_open_circuit": sent.get("skipped", 0),
          "resolved": sum(1 for u in updates if u.status == "resolved"),
          "compensated": sum(1 for u in updates if u.status == "dead_lettered")}
    report = commit_stage(env, "actions", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                          effects=compensations, audit_rows=audit_rows, metadata=md)
    if dead or cancel:
        settle(env.db, dead, "dead")
        settle(env.db, cancel, "cancelled")
    if compensations:
        comp = dispatch(env.db, connectors, FLOW, keys=[e.idempotency_key for e in compensations], policy=policy)
        report.metadata["compensations_delivered"] = comp["delivered"]
        log_event(env.logger, "effects_compensated", flow=FLOW, run_id=env.run_id, items=len(compensations),
                  delivered=comp["delivered"])
    return report


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
    rows = load_items(env, "resolved", stage="actions")
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


FLOW_STAGES = ("intake", "triage", "assignment", "knowledge", "draft", "approval_gate", "actions", "survey")


# --- across partitions: CSAT, escalation --------------------------------------------------

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


def escalation_stage(env: StageEnv, cfg: SupportConfig, connectors, now: datetime | None = None
                     ) -> StageReport:
    """Open items past their first-response due date are escalated once per level: the approval
    (if any) moves to the escalation role, a supervisor alert goes out through the outbox."""
    started = utcnow()
    now = now or started
    rows = [r for r in load_items(env, OPEN_STATUSES) if r["due_at"] is not None and r["due_at"] < now]
    with env.db.begin() as conn:
        levels = dict(conn.execute(sa.select(items.c.item_id, items.c.escalation_level).where(
            items.c.flow == FLOW, items.c.status.in_(OPEN_STATUSES), items.c.due_at < now)).all())
    rows = [r for r in rows if levels.get(r["item_id"], 0) == 0]
    role = cfg.brief.approval.escalation_role
    supervisors = [p["id"] for p in cfg.roster if p["role"] == role] or ["supervisors"]
    updates, effects, audit_rows = [], [], []
    for n, r in enumerate(rows):
        overdue_h = (now - r["due_at"]).total_seconds() / 3600.0
        who = supervisors[n % len(supervisors)]
        updates.append(ItemUpdate(r["item_id"], r["status"], {**r["data"], "escalated_to": who}, "routed",
                                  columns={"escalated_at": now, "escalation_level": 1}))
        effects.append(Effect(idempotency_key(FLOW, r["item_id"], "escalation_1"), "messaging", "send_alert",
                              r["item_id"], r["trace_id"], {
                                  "kind": "escalation", "recipient": f"role:{role}:{who}",
                                  "subject": f"SLA breached: {r['item_id']} ({r['data'].get('priority')})",
                                  "body": f"Item {r['item_id']} in status {r['status']} is {overdue_h:.1f} h past "
                                          f"its first-response due time. Trace {r['trace_id']}."}))
        audit_rows.append({"actor": "system:sla", "action": "escalated", "flow": FLOW, "item_id": r["item_id"],
                           "trace_id": r["trace_id"], "reason": f"{overdue_h:.1f} h past due",
                           "outputs": {"to_role": role, "to": who}})
    if rows:
        with env.db.begin() as conn:
            from ...lib.approvals import escalated_due

            # the approval moves to the escalation role with a new due date (approval_escalation_sensor
            # acts on it again only when that one passes too)
            conn.execute(approvals.update().where(approvals.c.item_id == sa.bindparam("k"),
                                                  approvals.c.status == "pending")
                         .values(required_role=role, due_at=sa.bindparam("new_due")),
                         [{"k": r["item_id"], "new_due": escalated_due(now, r["data"].get("priority"),
                                                                       cfg.brief.sla_hours)} for r in rows])
    report = commit_stage(env, "escalation", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                          effects=effects, audit_rows=audit_rows, metadata={"escalated": len(updates)},
                          set_stage=False)
    sent = (dispatch(env.db, connectors, FLOW, [r["item_id"] for r in rows], policy=cfg.connector_policy) if rows
            else {"delivered": 0})
    report.metadata["alerts_delivered"] = sent["delivered"]
    return report


# --- status for people ----------------------------------------------------------------------

def status_counts(db: Database, flow: str = FLOW) -> dict[str, Any]:
    """Every source entry received, and where each one is now. received == sum(states)."""
    with db.begin() as conn:
        received = conn.execute(sa.select(sa.func.count()).select_from(intake).where(intake.c.flow == flow)
                                ).scalar_one()
        by_status = dict(conn.execute(sa.select(items.c.status, sa.func.count()).where(items.c.flow == flow)
                                      .group_by(items.c.status)).all())
        by_outcome = dict(conn.execute(sa.select(intake.c.outcome, sa.func.count()).where(
            intake.c.flow == flow, intake.c.outcome != "accepted").group_by(intake.c.outcome)).all())
        escalated = conn.execute(sa.select(sa.func.count()).select_from(items).where(
            items.c.flow == flow, items.c.escalated_at.is_not(None))).scalar_one()
        dlq_open = conn.execute(sa.select(sa.func.count()).select_from(dlq).where(
            dlq.c.flow == flow, dlq.c.status == "open")).scalar_one()
    states: dict[str, int] = {k: int(v) for k, v in by_status.items()}
    states["dead_lettered"] = states.get("dead_lettered", 0) + int(by_outcome.get("dead_lettered", 0))
    states["duplicate"] = int(by_outcome.get("duplicate", 0))
    total = sum(states.values())
    return {"flow": flow, "received": int(received), "states": dict(sorted(states.items())),
            "accounted": total, "lost": int(received) - total, "escalated": int(escalated), "dlq_open": int(dlq_open),
            "in_progress": sum(states.get(s, 0) for s in IN_PROGRESS_STATUSES),
            "terminal": sum(states.get(s, 0) for s in TERMINAL_STATUSES)}


def audit_for(db: Database, item_id: str) -> list[dict[str, Any]]:
    with db.begin() as conn:
        return [dict(r) for r in conn.execute(sa.select(audit).where(audit.c.item_id == item_id)
                                              .order_by(audit.c.id)).mappings()]
