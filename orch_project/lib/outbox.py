"""The outbox: side effects are recorded in the app database in the same transaction as the
item's state change, then delivered to connectors with their idempotency key. A crash between
the two loses nothing (the effect stays pending) and repeats nothing (the connector dedups)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection

from . import flows
from .connectors.embedded import Delivery, Effect
from .store import Database, chunked, outbox, utcnow


def idempotency_key(flow: str, item_id: str, step: str) -> str:
    return f"{flow}:{item_id}:{step}"


class EffectNotAllowed(ValueError):
    """A side effect outside the flow's allow-list (its spec's ``effects``, plus the platform's alerts)."""


def allowed_effects(flow: str) -> frozenset[tuple[str, str]]:
    """The (connector, action) pairs ``flow`` may cause: declared in its spec; a flow that is not
    registered may cause only the platform's own effects (alerts)."""
    spec = flows.find(flow)
    return spec.allowed_effects if spec is not None else flows.PLATFORM_EFFECTS


def enqueue(db: Database, conn: Connection, flow: str, effects: Sequence[Effect]) -> None:
    """Record effects in the outbox (same transaction as the caller's state change). Effects outside
    the flow's allow-list are refused, whatever a model answered: code builds effects, never a model."""
    bad = sorted({(e.connector, e.action) for e in effects} - allowed_effects(flow))
    if bad:
        raise EffectNotAllowed(f"side effects outside flow {flow!r}'s allow-list refused: {bad}")
    now = utcnow()
    rows = [{
        "idempotency_key": e.idempotency_key, "flow": flow, "item_id": e.item_id, "trace_id": e.trace_id,
        "connector": e.connector, "action": e.action, "payload": e.payload, "status": "pending",
        "attempts": 0, "created_at": now,
    } for e in effects]
    db.insert_ignore(conn, outbox, rows, ["idempotency_key"])


def _call(connectors: Any, name: str, effects: list[Effect], timeout_s: float | None) -> list[Delivery]:
    """One connector call, bounded by ``timeout_s`` (the worker thread is abandoned on timeout; a late
    write is harmless because the next delivery carries the same idempotency keys)."""
    if timeout_s is None:
        return connectors.deliver(name, effects)
    import concurrent.futures as cf

    pool = cf.ThreadPoolExecutor(max_workers=1, thread_name_prefix=f"connector-{name}")
    try:
        return pool.submit(connectors.deliver, name, effects).result(timeout=timeout_s)
    except cf.TimeoutError:
        raise TimeoutError(f"{name} did not answer within {timeout_s:g} s") from None
    finally:
        pool.shutdown(wait=False)


def dispatch(db: Database, connectors: Any, flow: str, item_ids: Sequence[str] | None = None, *,
             policy: Any = None, keys: Sequence[str] | None = None) -> dict[str, int]:
    """Deliver pending effects (optionally only those of ``item_ids`` / with ``keys``); returns counts.

    With a ``policy`` (lib.connectors.policy.ConnectorPolicy) each connector call passes that
    connector's circuit breaker (``connector:<name>`` in ``circuit_breakers``) and is bounded by its
    timeout: an open circuit leaves the connector's effects untouched (``skipped``), an outage or a
    timeout marks them failed (attempts + 1, last error) and counts against the breaker. Nothing
    raises: undelivered effects stay in the outbox for the next dispatch."""
    with db.begin() as conn:
        q = sa.select(outbox).where(outbox.c.flow == flow, outbox.c.status.in_(("pending", "failed")))
        rows: list[dict] = []
        if item_ids is None and keys is None:
            rows = [dict(r) for r in conn.execute(q.order_by(outbox.c.id)).mappings()]
        else:
            col, values = (outbox.c.item_id, item_ids) if keys is None else (outbox.c.idempotency_key, keys)
            for chunk in chunked(list(values), 900):
                rows.extend(dict(r) for r in conn.execute(q.where(col.in_(chunk))).mappings())
            rows.sort(key=lambda r: r["id"])
    by_connector: dict[str, list[Effect]] = defaultdict(list)
    for r in rows:
        by_connector[r["connector"]].append(
            Effect(r["idempotency_key"], r["connector"], r["action"], r["item_id"], r["trace_id"], r["payload"])
        )
    breaker = None
    if policy is not None and by_connector:
        from .connectors.policy import breaker_key
        from .llm.controls import CircuitBreaker

        breaker = CircuitBreaker(db, policy.circuit_breaker, refresh_s=0.0)
    deliveries: list[Delivery] = []
    skipped = 0
    for name, effects in by_connector.items():
        key = breaker_key(name) if breaker is not None else None
        if breaker is not None and not breaker.allow(key):
            skipped += len(effects)  # circuit open: do not call a broken connector; effects wait
            continue
        try:
            got = _call(connectors, name, effects, policy.timeout_s if policy is not None else None)
        except Exception as exc:  # a connector outage leaves its effects pending for the next dispatch
            kind = "timeout" if isinstance(exc, TimeoutError) else "provider_error"
            if breaker is not None:
                breaker.record(key, kind, f"{type(exc).__name__}: {exc}")
            deliveries.extend(Delivery(e.idempotency_key, False, error=f"{type(exc).__name__}: {exc}") for e in effects)
            continue
        if breaker is not None:
            breaker.record(key, None)
        deliveries.extend(got)
    now = utcnow()
    ok = [{"k": d.idempotency_key, "ref": d.external_ref, "at": now} for d in deliveries if d.ok]
    bad = [{"k": d.idempotency_key, "err": (d.error or "")[:500]} for d in deliveries if not d.ok]
    effect_of = {e.idempotency_key: e for effects in by_connector.values() for e in effects}
    trail = [{"actor": f"connector:{effect_of[d.idempotency_key].connector}",
              "action": f"effect_{effect_of[d.idempotency_key].action}", "flow": flow,
              "item_id": effect_of[d.idempotency_key].item_id, "trace_id": effect_of[d.idempotency_key].trace_id,
              "reason": "delivered", "inputs": {"idempotency_key": d.idempotency_key},
              "outputs": {"external_ref": d.external_ref}} for d in deliveries if d.ok]
    with db.begin() as conn:
        if trail:  # every side effect is in the audit log, committed with its delivered state
            db.audit(conn, trail)
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
    return {"delivered": len(ok), "failed": len(bad), "skipped": skipped}


def _delivered(conn: Connection, keys: Sequence[str]) -> set[str]:
    out: set[str] = set()
    for chunk in chunked(list(keys), 900):
        out.update(conn.execute(sa.select(outbox.c.idempotency_key).where(
            outbox.c.idempotency_key.in_(chunk), outbox.c.status == "delivered")).scalars())
    return out


def delivered_keys(db: Database, keys: Sequence[str]) -> set[str]:
    with db.begin() as conn:
        return _delivered(conn, keys)


def effect_states(db: Database, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Status, attempts and last error of the effects with ``keys``."""
    out: dict[str, dict[str, Any]] = {}
    cols = (outbox.c.idempotency_key, outbox.c.connector, outbox.c.action, outbox.c.status, outbox.c.attempts,
            outbox.c.last_error)
    with db.begin() as conn:
        for chunk in chunked(list(keys), 900):
            for r in conn.execute(sa.select(*cols).where(outbox.c.idempotency_key.in_(chunk))).mappings():
                out[r["idempotency_key"]] = dict(r)
    return out


def undelivered(conn: Connection, keys: Sequence[str]) -> list[str]:
    """Those of ``keys`` whose effect is not delivered (or not in the outbox at all)."""
    done = _delivered(conn, keys)
    return [k for k in keys if k not in done]


def revive(conn: Connection, keys: Sequence[str]) -> int:
    """Put effects taken out of delivery (dead, cancelled) back to ``pending`` with fresh attempts,
    under the same idempotency keys (so a late first delivery is still deduplicated)."""
    n = 0
    for chunk in chunked(list(keys), 900):
        n += conn.execute(outbox.update().where(outbox.c.idempotency_key.in_(chunk),
                                                outbox.c.status.in_(("dead", "cancelled")))
                          .values(status="pending", attempts=0, last_error=None)).rowcount
    return n


def settle(db: Database, keys: Sequence[str], status: str) -> None:
    """Take undelivered effects out of delivery: ``dead`` (failed for good) or ``cancelled`` (the
    multi-step effect they belong to was compensated)."""
    assert status in ("dead", "cancelled")
    with db.begin() as conn:
        for chunk in chunked(list(keys), 900):
            conn.execute(outbox.update().where(outbox.c.idempotency_key.in_(chunk),
                                               outbox.c.status.in_(("pending", "failed"))).values(status=status))
