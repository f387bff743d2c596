"""Multi-step side effects of a flow stage, with compensation: the saga every flow's "act" stage uses.

A stage plans, per item, the steps it must cause outside (``{step: Effect}``: a ticket, a reply, a CRM
record, a charge ...). ``run_effects_stage`` records them in the outbox with the state change, delivers
them behind the connectors' circuit breakers and then, per item:

- every step delivered: the item moves on (``done_status``, audited ``completed``);
- a step failed ``max_attempts`` times (failed for good): the steps already delivered are undone by
  their declared compensation (the flow spec's ``compensations``: same connector, allow-listed action,
  its own idempotency key), the steps still pending are cancelled, and the item is dead-lettered
  (``effect_failed``, audited ``compensated``) with a record a DLQ replay can act on;
- otherwise the item waits where it is (its effects stay in the outbox for the next delivery).

Nothing is lost (undelivered effects stay pending) and nothing happens twice (connectors honour the
idempotency key). Steps that cannot be undone (a sent message) are left in place and named.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

from .connectors.embedded import Effect
from .outbox import dispatch, effect_states, enqueue, idempotency_key, revive, settle
from .pipeline import ItemUpdate, StageEnv, StageReport, commit_stage
from .store import utcnow
from .telemetry import log_event


def step_name(data: Mapping[str, Any], step: str) -> str:
    """The step's name in its idempotency key: after a replay of compensated effects (lib/dlq.py)
    the redone steps carry their effect generation, so they are issued afresh."""
    gen = int((data.get("effect_generation") or {}).get(step, 0))
    return step if gen == 0 else f"{step}#{gen}"


def step_key(flow: str, row: Mapping[str, Any], step: str) -> str:
    return idempotency_key(flow, row["item_id"], step_name(row["data"], step))


def run_effects_stage(env: StageEnv, stage: str, rows: Sequence[dict[str, Any]], connectors: Any, *,
                      plan: Callable[[dict[str, Any]], dict[str, Effect]], compensations: Mapping[str, tuple[str, str]],
                      policy: Any, done_status: str, done_reason: str,
                      done_columns: Callable[[Any], dict[str, Any]] = lambda now: {"resolved_at": now},
                      waiting_status: str | None = None) -> StageReport:
    """See the module docstring. ``plan(row)`` gives the item's steps as ``{step: Effect}`` with keys
    from ``step_key``; ``waiting_status`` is the status a waiting item keeps (default: its own)."""
    started = utcnow()
    flow = env.flow
    planned = {r["item_id"]: plan(r) for r in rows}
    effects = [e for steps in planned.values() for e in steps.values()]
    with env.db.begin() as conn:
        enqueue(env.db, conn, flow, effects)
        # every effect of an item at this stage is meant to go out: one taken out of delivery (dead,
        # cancelled) while the item was dead-lettered goes back in, with fresh attempts, after a replay
        revive(conn, [e.idempotency_key for e in effects])
    sent = (dispatch(env.db, connectors, flow, [r["item_id"] for r in rows], policy=policy) if rows
            else {"delivered": 0, "failed": 0, "skipped": 0})
    state = effect_states(env.db, [e.idempotency_key for e in effects])
    now = utcnow()
    updates, audit_rows, undo, cancel, dead = [], [], [], [], []
    actor = f"system:{stage}"
    for r in rows:
        iid, tr = r["item_id"], r["trace_id"]
        keys = {s: e.idempotency_key for s, e in planned[iid].items()}
        st = {s: state.get(k, {}) for s, k in keys.items()}
        if all(x.get("status") == "delivered" for x in st.values()):
            updates.append(ItemUpdate(iid, done_status, r["data"], columns=done_columns(now)))
            audit_rows.append({"actor": actor, "action": "completed", "flow": flow, "item_id": iid,
                               "trace_id": tr, "reason": done_reason, "outputs": {"steps": list(keys)}})
            continue
        broken = [s for s, x in st.items() if failed_for_good(x, policy)]
        if not broken:
            updates.append(ItemUpdate(iid, waiting_status or r["status"], r["data"], "waiting"))
            continue
        delivered = [s for s, x in st.items() if x.get("status") == "delivered"]
        undone, undo_keys = [], []
        for s in delivered:
            if s in compensations:
                connector, action = compensations[s]
                key = idempotency_key(flow, iid, f"compensate_{step_name(r['data'], s)}")
                undo.append(Effect(key, connector, action, iid, tr,
                                   {"effect_key": keys[s], "reason": f"{','.join(broken)} failed for good"}))
                undone.append(f"{s}:{action}")
                undo_keys.append(key)
        cancelled = [s for s, x in st.items() if x.get("status") in ("pending", "failed") and s not in broken]
        dead.extend(keys[s] for s in broken)
        cancel.extend(keys[s] for s in cancelled)
        errors = "; ".join(f"{s} ({st[s]['connector']} {st[s]['action']}) failed {st[s]['attempts']} times: "
                           f"{(st[s].get('last_error') or '')[:120]}" for s in broken)
        reason = f"{errors}; compensated: {', '.join(undone) or 'nothing to undo'}"
        kept = [s for s in delivered if s not in compensations]
        record = {"failed": broken, "compensated": undone, "left_in_place": kept, "cancelled": cancelled,
                  "compensation_keys": undo_keys}
        updates.append(ItemUpdate(iid, "dead_lettered", {**r["data"], "compensation": record}, "dead_lettered",
                                  dead_letter=("effect_failed", reason)))
        audit_rows.append({"actor": actor, "action": "compensated", "flow": flow, "item_id": iid, "trace_id": tr,
                           "reason": reason, "outputs": {k: v for k, v in record.items() if k != "cancelled"}})
    md = {"effects_delivered": sent["delivered"], "effects_failed": sent["failed"],
          "effects_waiting_open_circuit": sent.get("skipped", 0),
          "resolved": sum(1 for u in updates if u.status == done_status),
          "compensated": sum(1 for u in updates if u.status == "dead_lettered")}
    report = commit_stage(env, stage, started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                          effects=undo, audit_rows=audit_rows, metadata=md)
    if dead or cancel:
        settle(env.db, dead, "dead")
        settle(env.db, cancel, "cancelled")
    if undo:
        comp = dispatch(env.db, connectors, flow, keys=[e.idempotency_key for e in undo], policy=policy)
        report.metadata["compensations_delivered"] = comp["delivered"]
        log_event(env.logger, "effects_compensated", flow=flow, run_id=env.run_id, items=len(undo),
                  delivered=comp["delivered"])
    return report


# --- a saga across stages: each stage does its step, a later failure undoes the earlier ones -------------------

def deliver_effects(env: StageEnv, connectors: Any, effects: Sequence[Effect], policy: Any) -> dict[str, dict[str, Any]]:
    """Record ``effects`` in the outbox (a key already there is the same effect: nothing new) and deliver them
    now behind the connectors' breakers; returns each key's state (``status`` delivered / pending / failed,
    ``attempts``, ``last_error``). A stage then decides from the states and from what the systems recorded."""
    if not effects:
        return {}
    keys = [e.idempotency_key for e in effects]
    with env.db.begin() as conn:
        enqueue(env.db, conn, env.flow, effects)
        revive(conn, keys)
    dispatch(env.db, connectors, env.flow, keys=keys, policy=policy)
    return effect_states(env.db, keys)


def failed_for_good(state: Mapping[str, Any], policy: Any) -> bool:
    return state.get("status") == "failed" and state.get("attempts", 0) >= policy.max_attempts


def undo_effects(flow: str, row: Mapping[str, Any], done: Sequence[tuple[str, str]],
                 compensations: Mapping[str, tuple[str, str]], reason: str) -> tuple[list[Effect], list[str]]:
    """The compensations of steps already done (``done``: (step, idempotency key) in the order they were done),
    last step first, each under its own key (``compensate_<step>``) so undoing twice is undoing once. Returns
    the effects and the names of steps that have no compensation (left in place, e.g. a message sent)."""
    out, kept = [], []
    for step, key in reversed(list(done)):
        base = step.split("#")[0]
        if base not in compensations:
            kept.append(step)
            continue
        connector, action = compensations[base]
        out.append(Effect(idempotency_key(flow, row["item_id"], f"compensate_{step}"), connector, action,
                          row["item_id"], row["trace_id"], {"effect_key": key, "reason": reason}))
    return out, kept
