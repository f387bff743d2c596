"""Dead-letter replay: look at one dead letter, and put dead-lettered items back where the next run
of their partition's flow picks them up again.

A dead letter from a stage that had an item (triage, draft, ...) is replayable: the item goes back to
the status the failed stage loads and to the stage before it (triage -> ``received``/``intake``, draft ->
``grounded``/``knowledge``), keeps its trace id, and the dlq row becomes ``replayed`` - one transaction,
audited. An intake dead letter has no item (the source never validated): it stays open until the
source is fixed and submitted again. Replaying a row that is not open changes nothing.

An item whose outside effects failed for good and were compensated carries ``data["compensation"] =
{"compensated": ["step:action", ...], "compensation_keys": [...], ...}``. It is replayable once every
compensation is delivered (until then a new effect could meet the one still to be undone). Replaying it
gives each undone step a new effect generation (``data["effect_generation"][step]``, which the flow puts
in that step's idempotency key): a voided ticket is replaced by a new one. The failed and cancelled
effects keep their keys; the flow puts them back into delivery when it meets the item again (so a
connector that did receive a late first attempt deduplicates it). Steps delivered and left in place (a
reply cannot be recalled) are not repeated. The compensation record moves to
``data["compensation_history"]``.

Flow-agnostic: a failed stage maps to (status it loads, previous stage) by the flow spec's stage
chain (``FlowSpec.replay_targets``); ``targets`` overrides it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa

from . import flows
from .outbox import undelivered
from .store import Database, dlq, items, utcnow

INTAKE_REASON = ("intake dead letter: the source never became an item, so there is nothing to replay; "
                 "fix the source file and submit it again (`orch submit FILE`)")


class DLQError(LookupError):
    """No such dead letter."""


def _row(conn, dlq_id: int) -> dict[str, Any]:
    row = conn.execute(sa.select(dlq).where(dlq.c.id == int(dlq_id))).mappings().first()
    if row is None:
        raise DLQError(f"no dead letter #{dlq_id}; see `orch dlq list --status all`")
    return dict(row)


def _item(conn, flow: str, item_id: str | None) -> dict[str, Any] | None:
    if not item_id:
        return None
    row = conn.execute(sa.select(items.c.item_id, items.c.status, items.c.stage, items.c.trace_id, items.c.day,
                                 items.c.data).where(items.c.flow == flow, items.c.item_id == item_id)
                       ).mappings().first()
    return dict(row) if row else None


Targets = dict[str, tuple[str, str]]


def _targets(flow: str, targets: Targets | None) -> Targets:
    if targets is not None:
        return targets
    spec = flows.find(flow)
    return spec.replay_targets if spec is not None else {}


def _compensation_pending(conn, item: dict[str, Any] | None) -> list[str]:
    comp = ((item or {}).get("data") or {}).get("compensation") or {}
    return undelivered(conn, comp.get("compensation_keys", [])) if comp else []


def _plan(row: dict[str, Any], item: dict[str, Any] | None, targets: Targets,
          compensation_pending: Sequence[str] = ()) -> tuple[tuple[str, str] | None, str | None]:
    """(status, stage) the item would go back to, or None and why not."""
    if row["status"] != "open":
        return None, f"dead letter #{row['id']} is already {row['status']}; nothing to do"
    if not row["item_id"] or row["stage"] == "intake":
        return None, INTAKE_REASON
    if item is None:
        return None, f"item {row['item_id']!r} no longer exists; nothing to replay"
    if item["status"] != "dead_lettered":
        return None, (f"item {row['item_id']!r} is in status {item['status']!r} (stage {item['stage']!r}), "
                      "not dead_lettered; nothing to replay")
    target = targets.get(row["stage"])
    if target is None:
        return None, f"no replay target for stage {row['stage']!r} in flow {row['flow']!r}'s stage chain"
    if compensation_pending:
        return None, (f"its compensation is not delivered yet ({', '.join(compensation_pending)}); the ops job's "
                      "outbox redelivery sends it once the connector is back - replay after that")
    return target, None


def _fresh_effects(data: dict[str, Any]) -> dict[str, Any]:
    """A new effect generation for the undone steps (see the module docstring)."""
    comp = data.pop("compensation", None)
    if not comp:
        return data
    gen = dict(data.get("effect_generation") or {})
    for step in {c.split(":", 1)[0] for c in comp.get("compensated", [])}:
        gen[step] = int(gen.get(step, 0)) + 1
    return {**data, "effect_generation": gen, "compensation_history": [*data.get("compensation_history", []), comp]}


def show(db: Database, dlq_id: int, *, targets: Targets | None = None) -> dict[str, Any]:
    """The dead letter, the item's current status/stage (if there is an item) and what replay would do."""
    with db.begin() as conn:
        row = _row(conn, dlq_id)
        item = _item(conn, row["flow"], row["item_id"])
        pending = _compensation_pending(conn, item)
    target, why_not = _plan(row, item, _targets(row["flow"], targets), pending)
    out = {**row, "item": None if item is None else {k: item[k] for k in ("status", "stage", "trace_id", "day")},
           "replayable": target is not None}
    if target is not None:
        out["replay_to"] = {"status": target[0], "stage": target[1]}
    else:
        out["not_replayable_reason"] = why_not
    return out


def replay(db: Database, dlq_id: int, *, actor: str = "system:dlq", run_id: str | None = None,
           targets: Targets | None = None, flow: str | None = None) -> dict[str, Any]:
    """Put one dead-lettered item back in the flow and mark the row replayed (one audited transaction).

    Returns {"id", "replayed": bool, "message", ...}; ``noop`` is True when the row was already handled,
    ``replayable`` False when it cannot be replayed (intake dead letters, items that moved on)."""
    with db.write() as conn:
        row = _row(conn, dlq_id)
        if flow is not None and row["flow"] != flow:
            raise DLQError(f"dead letter #{dlq_id} belongs to flow {row['flow']!r}, not {flow!r}")
        item = _item(conn, row["flow"], row["item_id"])
        target, why_not = _plan(row, item, _targets(row["flow"], targets), _compensation_pending(conn, item))
        base = {"id": row["id"], "item_id": row["item_id"], "stage": row["stage"], "trace_id": row["trace_id"]}
        if target is None:
            return {**base, "replayed": False, "noop": row["status"] != "open", "replayable": False,
                    "message": why_not}
        status, stage = target
        now = utcnow()
        data = _fresh_effects({k: v for k, v in (item["data"] or {}).items() if k != "deferred"})
        data["replays"] = int(data.get("replays", 0)) + 1
        moved = conn.execute(items.update().where(items.c.flow == row["flow"], items.c.item_id == row["item_id"],
                                                  items.c.status == "dead_lettered")
                             .values(status=status, stage=stage, data=data, updated_at=now)).rowcount
        marked = conn.execute(dlq.update().where(dlq.c.id == row["id"], dlq.c.status == "open")
                              .values(status="replayed")).rowcount
        if not (moved and marked):  # lost a race with another replay: undo by raising
            raise RuntimeError(f"dead letter #{row['id']} changed while replaying; try again")
        db.audit(conn, [{"actor": actor, "action": "dlq_replayed", "flow": row["flow"], "item_id": row["item_id"],
                         "trace_id": item["trace_id"],
                         "reason": f"replay of dead letter #{row['id']} ({row['stage']}: {row['error_type']})",
                         "inputs": {"dlq_id": row["id"], "stage": row["stage"], "error_type": row["error_type"],
                                    "dlq_trace_id": row["trace_id"], "run_id": run_id},
                         "outputs": {"status": status, "stage": stage}}])
    return {**base, "replayed": True, "noop": False, "replayable": True, "status": status, "to_stage": stage,
            "trace_id": item["trace_id"], "day": item["day"],
            "message": f"item {row['item_id']} back to {status!r} after stage {stage!r}; the next run of partition "
                       f"{item['day']} reprocesses it"}


def replay_all(db: Database, flow: str, *, actor: str = "system:dlq", run_id: str | None = None,
               targets: Targets | None = None) -> dict[str, Any]:
    """Replay every open dead letter of ``flow`` that can be replayed; report the others with their reason."""
    with db.begin() as conn:
        ids = list(conn.execute(sa.select(dlq.c.id).where(dlq.c.flow == flow, dlq.c.status == "open")
                                .order_by(dlq.c.id)).scalars())
    results = [replay(db, i, actor=actor, run_id=run_id, targets=targets) for i in ids]
    done = [r for r in results if r["replayed"]]
    skipped = [r for r in results if not r["replayed"]]
    days = sorted({r["day"] for r in done})
    return {"flow": flow, "open": len(ids), "replayed": len(done), "not_replayable": len(skipped),
            "days": days, "results": results,
            "message": (f"{len(done)} of {len(ids)} open dead letters replayed" +
                        (f" (partitions {', '.join(days)})" if days else "") +
                        (f"; {len(skipped)} not replayable (see results)" if skipped else ""))}


def open_backlog(db: Database, flow: str) -> list[dict[str, Any]]:
    """Open dead letters counted by stage and error type."""
    with db.begin() as conn:
        rows = conn.execute(sa.select(dlq.c.stage, dlq.c.error_type, sa.func.count())
                            .where(dlq.c.flow == flow, dlq.c.status == "open")
                            .group_by(dlq.c.stage, dlq.c.error_type).order_by(dlq.c.stage, dlq.c.error_type)).all()
    return [{"stage": s, "error_type": e, "count": int(n)} for s, e, n in rows]
