"""The outbox: side effects are recorded in the app database in the same transaction as the
item's state change, then delivered to connectors with their idempotency key. A crash between
the two loses nothing (the effect stays pending) and repeats nothing (the connector dedups)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from .connectors.embedded import Delivery, Effect
from .store import Database, chunked, outbox, utcnow


def idempotency_key(flow: str, item_id: str, step: str) -> str:
    return f"{flow}:{item_id}:{step}"


class EffectNotAllowed(ValueError):
    """A side effect outside the allow-list (guardrails.injection.ALLOWED_EFFECTS)."""


def enqueue(db: Database, conn: Connection, flow: str, effects: Sequence[Effect]) -> None:
    from .guardrails.injection import ALLOWED_EFFECTS

    bad = sorted({(e.connector, e.action) for e in effects} - ALLOWED_EFFECTS)
    if bad:
        raise EffectNotAllowed(f"side effects outside the allow-list refused: {bad}")
    now = utcnow()
    rows = [{
        "idempotency_key": e.idempotency_key, "flow": flow, "item_id": e.item_id, "trace_id": e.trace_id,
        "connector": e.connector, "action": e.action, "payload": e.payload, "status": "pending",
        "attempts": 0, "created_at": now,
    } for e in effects]
    db.insert_ignore(conn, outbox, rows, ["idempotency_key"])


def dispatch(db: Database, connectors: Any, flow: str, item_ids: Sequence[str] | None = None) -> dict[str, int]:
    """Deliver pending effects (optionally only those of ``item_ids``); returns counts."""
    with db.begin() as conn:
        q = sa.select(outbox).where(outbox.c.flow == flow, outbox.c.status.in_(("pending", "failed")))
        rows: list[dict] = []
        if item_ids is None:
            rows = [dict(r) for r in conn.execute(q.order_by(outbox.c.id)).mappings()]
        else:
            for chunk in chunked(list(item_ids), 900):
                rows.extend(dict(r) for r in conn.execute(q.where(outbox.c.item_id.in_(chunk))).mappings())
            rows.sort(key=lambda r: r["id"])
    by_connector: dict[str, list[Effect]] = defaultdict(list)
    for r in rows:
        by_connector[r["connector"]].append(
            Effect(r["idempotency_key"], r["connector"], r["action"], r["item_id"], r["trace_id"], r["payload"])
        )
    deliveries: list[Delivery] = []
    for name, effects in by_connector.items():
        try:
            deliveries.extend(connectors.deliver(name, effects))
        except Exception as exc:  # a connector outage leaves its effects pending for the next dispatch
            deliveries.extend(Delivery(e.idempotency_key, False, error=f"{type(exc).__name__}: {exc}") for e in effects)
    now = utcnow()
    ok = [{"k": d.idempotency_key, "ref": d.external_ref, "at": now} for d in deliveries if d.ok]
    bad = [{"k": d.idempotency_key, "err": (d.error or "")[:500]} for d in deliveries if not d.ok]
    with db.begin() as conn:
        if ok:
            conn.execute(
                outbox.update().where(outbox.c.idempotency_key == sa.bindparam("k")).values(
                    status="delivered", external_ref=sa.bindparam("ref"), delivered_at=sa.bindparam("at"),
                    attempts=outbox.c.attempts + 1),
                ok,
            )
        if bad:
            conn.execute(
                outbox.update().where(outbox.c.idempotency_key == sa.bindparam("k")).values(
                    status="failed", last_error=sa.bindparam("err"), attempts=outbox.c.attempts + 1),
                bad,
            )
    return {"delivered": len(ok), "failed": len(bad)}


def delivered_keys(db: Database, keys: Sequence[str]) -> set[str]:
    out: set[str] = set()
    with db.begin() as conn:
        for chunk in chunked(list(keys), 900):
            q = sa.select(outbox.c.idempotency_key).where(
                outbox.c.idempotency_key.in_(chunk), outbox.c.status == "delivered")
            out.update(conn.execute(q).scalars())
    return out
