"""`orch orders ...`: look at and act on the order flow without the Dagster UI (the flow itself: flow.py).

    orch orders show ORDER_ID [--json]        the order's saga timeline: steps, compensations, events, decisions
    orch orders audit [--json]                 the money-and-stock invariants over every order (exit 1 on a violation)
    orch orders request FILE.jsonl             customer requests into the flow's inbox (the next run applies them)

Requests are ``{"request_id", "order_id", "action", ...fields}`` with action ``cancel`` (``reason``: ``no longer
needed`` or ``ordered by mistake``), ``modify_address`` (``address``), ``modify_payment`` (``payment_method_id``),
``modify_items`` (``item_ids`` and ``new_item_ids``, optionally ``payment_method_id``), ``return`` (``item_ids``,
optionally ``payment_method_id``: the original method or one of the customer's gift cards) or ``exchange``
(``item_ids`` and ``new_item_ids``, optionally ``payment_method_id`` for a higher price).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import click


@click.group(name="orders", help="The e-commerce order flow: an order's saga timeline, the invariants audit, and "
                                  "customer requests (cancel, new address, return).")
def group() -> None:
    pass


def _dbs():
    from ...cli import open_db
    from ...lib.settings import Settings
    from ..resources import _embedded

    return open_db(), _embedded(Settings.from_env().connectors_url).db


@group.command(help="The saga timeline of one order (e.g. '#S1002' or S1002): each step, compensation, event and "
                    "decision with who and when, the effects in the outbox and the audit trail.")
@click.argument("order_id")
@click.option("--json", "as_json", is_flag=True, help="print the timeline as JSON")
def show(order_id: str, as_json: bool) -> None:
    import sqlalchemy as sa

    from ...lib.pipeline import audit_for
    from ...lib.store import items, outbox
    from .logic import FLOW, order_item_id

    db, _ = _dbs()
    oid = order_id if order_id.startswith("#") else f"#{order_id}"
    iid = order_item_id(oid)
    with db.begin() as conn:
        row = conn.execute(sa.select(items.c.status, items.c.data, items.c.received_at).where(
            items.c.flow == FLOW, items.c.item_id == iid)).first()
        effects = [dict(r) for r in conn.execute(sa.select(
            outbox.c.idempotency_key, outbox.c.connector, outbox.c.action, outbox.c.status, outbox.c.attempts,
            outbox.c.external_ref).where(outbox.c.flow == FLOW, outbox.c.item_id == iid).order_by(outbox.c.id)).mappings()]
    if row is None:
        raise click.ClickException(f"no order {oid} in the flow (item {iid}); orders arrive through the inbox "
                                   "(orch submit --flow orders) and the next run takes them")
    status, data, _ = row
    trail = audit_for(db, FLOW, iid)
    out = {"order_id": oid, "status": status, "outcome": data.get("outcome"), "amount": data.get("amount"),
           "timeline": data.get("timeline", []), "events_applied": (data.get("saga") or {}).get("events", []),
           "steps_done": [s for s, _ in (data.get("saga") or {}).get("done", [])],
           "compensations": (data.get("saga") or {}).get("undone", []), "refusals": data.get("refusals", []),
           "effects": [{k: v for k, v in e.items()} for e in effects],
           "audit": [{"at": a["at"].isoformat(timespec="seconds") if hasattr(a.get("at"), "isoformat") else a.get("at"),
                      "actor": a["actor"], "action": a["action"], "reason": a.get("reason")} for a in trail]}
    if as_json:
        click.echo(json.dumps(out, default=str))
        return
    click.echo(f"order {oid}: {status}{' (' + out['outcome'] + ')' if out['outcome'] else ''}, amount "
               f"{out['amount'] if out['amount'] is not None else '?'}")
    for t in out["timeline"]:
        click.echo(f"  {t['at']}  {t['by']:<28} {t['what']}")
    if out["compensations"]:
        click.echo(f"  compensations: {', '.join(out['compensations'])}")
    click.echo("  effects:")
    for e in effects:
        click.echo(f"    {e['idempotency_key'].rsplit(':', 1)[1]:<28} {e['connector']}.{e['action']:<18} {e['status']}"
                   f" ({e['attempts']} attempt(s)) {e['external_ref'] or ''}")
    click.echo("  audit:")
    for a in out["audit"]:
        click.echo(f"    {a['at']}  {a['actor']:<24} {a['action']:<20} {(a['reason'] or '')[:90]}")


@group.command(help="Check the invariants over every order and the payment, warehouse and inventory records: no "
                    "capture without a shipment or a refund, no shipment without a capture, refunds within captures, "
                    "stock never negative, no stale reservation, every cancelled order compensated. Exit 1 on a "
                    "violation.")
@click.option("--json", "as_json", is_flag=True, help="print the report as JSON (last line)")
def audit(as_json: bool) -> None:
    from .invariants import audit as run
    from .logic import CFG

    db, cdb = _dbs()
    rep = run(db, cdb, CFG)
    rep.pop("rows")
    if as_json:
        click.echo(json.dumps(rep))
    else:
        click.echo(f"{rep['orders']} orders, {rep['captured']:,.2f} captured, {rep['refunded']:,.2f} refunded: "
                   f"{len(rep['violations'])} invariant violation(s)")
        for v in rep["violations"]:
            click.echo(f"  {v['order']}: {v['rule']} -- {v['detail']}")
    if rep["violations"]:
        raise SystemExit(1)


ACTIONS = ("cancel", "modify_address", "modify_payment", "modify_items", "return", "exchange")


@group.command(help="Customer requests from FILE (JSON lines: request_id, order_id, action, fields) into the flow's "
                    "inbox table; the next run validates each against the store's policy and applies it once.")
@click.argument("file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
def request(file: Path) -> None:
    from ...lib.intake import submit_to_table
    from .logic import FLOW

    db, _ = _dbs()
    events, bad = [], []
    for n, line in enumerate(file.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            r = json.loads(line)
            if not isinstance(r, dict):
                raise ValueError("a request is a JSON object")
            action = r.get("action")
            if action not in ACTIONS:
                raise ValueError(f"action {str(action)[:30]!r} is not one of {', '.join(ACTIONS)}")
            rid = str(r.get("request_id") or "")
            if not rid:
                raise ValueError("no request_id")
        except (json.JSONDecodeError, ValueError) as exc:
            bad.append(f"line {n}: {exc}")
            continue
        ev = {"kind": "request", "id": f"req-{rid}", "event_id": f"req-{rid}", "order_id": r.get("order_id"),
              "type": action, "occurred_at": r.get("occurred_at") or datetime.now(timezone.utc).isoformat()}
        for k in ("reason", "address", "item_ids", "new_item_ids", "payment_method_id"):
            if r.get(k) is not None:
                ev[k] = r[k]
        events.append(ev)
    added = submit_to_table(db, FLOW, events, submitted_by="cli:orders-request") if events else 0
    click.echo(f"{added} request(s) queued ({len(events) - added} already there); the next orders run applies them"
               + (f"; {len(bad)} refused:" if bad else ""))
    for b in bad:
        click.echo(f"  {b}", err=True)
    if bad and not events:
        raise SystemExit(1)
