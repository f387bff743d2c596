"""The money-and-stock invariants of the order flow, read from the systems themselves (payments, warehouse,
inventory) and the flow's orders: checked by the blocking asset check on every run (``settle_invariants``) and by
``orch orders audit``.

- no captured payment without a shipment or a refund;
- no shipment without a captured payment (an order the flow saw ship, or a parcel out longer than the brief's
  ``capture_grace_hours``: the flow hears of a shipment from the carrier);
- refunds never above captures; stock never negative;
- no reservation held longer than the capture deadline;
- every cancelled (or expired, declined, out-of-stock) order has its compensations delivered: nothing held on
  the payment method, no stock reserved, no parcel requested.
"""

from __future__ import annotations

from collections import defaultdict
from datetime import datetime, timedelta
from typing import Any

import sqlalchemy as sa

from ...lib.store import as_utc, items, utcnow
from .store import fulfilments, inventory_reservations, inventory_stock, payment_transactions

ENDED_WITHOUT_SHIPPING = ("cancelled", "expired", "payment_declined", "payment_timeout", "out_of_stock", "refused")


def audit(app_db, conn_db, cfg, flow: str = "orders", now: datetime | None = None) -> dict[str, Any]:
    """Every violation as ``{"order", "rule", "detail"}``, with per-order rows for the check's frame."""
    now = now or utcnow()
    with app_db.begin() as conn:
        orders = {iid: (status, data) for iid, status, data in conn.execute(
            sa.select(items.c.item_id, items.c.status, items.c.data).where(
                items.c.flow == flow, items.c.item_id.like("order-%")))}
    with conn_db.begin() as conn:
        from .store import ensure_tables

        ensure_tables(conn)
        tx = [dict(r) for r in conn.execute(sa.select(payment_transactions).where(
            payment_transactions.c.item_id.like("order-%"))).mappings()]
        ful = [dict(r) for r in conn.execute(sa.select(fulfilments).where(
            fulfilments.c.item_id.like("order-%"))).mappings()]
        res = [dict(r) for r in conn.execute(sa.select(inventory_reservations).where(
            inventory_reservations.c.item_id.like("order-%"))).mappings()]
        negative = conn.execute(sa.select(inventory_stock.c.sku, inventory_stock.c.on_hand).where(
            sa.or_(inventory_stock.c.on_hand < 0, inventory_stock.c.reserved < 0,
                   inventory_stock.c.reserved > inventory_stock.c.on_hand))).all()
    by = defaultdict(lambda: {"captured": 0.0, "refunded": 0.0, "held": 0.0, "left": False, "requested": False,
                              "reserved_since": None})
    for t in tx:
        if t["status"] != "approved":
            continue
        o = by[t["item_id"]]
        if t["kind"] == "capture":
            o["captured"] += t["amount"]
        elif t["kind"] == "refund":
            o["refunded"] += t["amount"]
        elif t["kind"] == "authorize":
            o["held"] += t["amount"]
    captured_keys = {t["ref_key"] for t in tx if t["kind"] == "capture" and t["status"] == "approved"}
    for t in tx:  # an authorisation captured is no longer a hold
        if t["kind"] == "authorize" and t["status"] == "approved" and t["idempotency_key"] in captured_keys:
            by[t["item_id"]]["held"] -= t["amount"]
    grace = timedelta(hours=cfg.settings.capture_grace_hours)
    for f in ful:
        by[f["item_id"]]["left"] |= f["status"] in ("shipped", "delivered", "lost")
        # the flow hears of a shipment from the carrier: within the grace a parcel may be out before its capture
        by[f["item_id"]]["left_long_ago"] = by[f["item_id"]].get("left_long_ago", False) or (
            f["status"] in ("shipped", "delivered", "lost") and now - as_utc(f["updated_at"]) > grace)
        by[f["item_id"]]["requested"] |= f["status"] == "requested"
    for r in res:  # the oldest reservation still held
        if r["status"] == "reserved":
            since = by[r["item_id"]]["reserved_since"]
            by[r["item_id"]]["reserved_since"] = min(filter(None, (since, as_utc(r["created_at"]))))
    deadline = timedelta(days=cfg.settings.capture_deadline_days)
    violations, rows = [], []
    for iid in sorted(set(by) | set(orders)):
        o = by[iid]
        status, data = orders.get(iid, (None, {}))
        outcome = data.get("outcome")
        found = []
        if o["captured"] > 0.005 and not o["left"] and o["refunded"] + 0.005 < o["captured"]:
            found.append(("captured_without_shipment", f"{o['captured']:.2f} captured, nothing shipped, "
                                                       f"{o['refunded']:.2f} refunded"))
        if o["captured"] <= 0.005 and (data.get("shipped_at") or o.get("left_long_ago")):
            found.append(("shipped_without_capture", "a parcel left the warehouse with no captured payment"))
        if o["refunded"] > o["captured"] + 0.005:
            found.append(("refund_above_capture", f"{o['refunded']:.2f} refunded of {o['captured']:.2f} captured"))
        if o["reserved_since"] is not None and now - o["reserved_since"] > deadline:
            found.append(("stale_reservation", f"stock reserved since {o['reserved_since']:%Y-%m-%d %H:%M}"))
        if status == "resolved" and outcome in ENDED_WITHOUT_SHIPPING:
            if o["held"] > 0.005:
                found.append(("compensation_missing", f"{outcome}: {o['held']:.2f} still held on the payment method"))
            if o["reserved_since"] is not None:
                found.append(("compensation_missing", f"{outcome}: stock still reserved"))
            if o["requested"]:
                found.append(("compensation_missing", f"{outcome}: a parcel is still requested at the warehouse"))
        violations += [{"order": data.get("order_id", iid), "rule": rule, "detail": det} for rule, det in found]
        rows.append({"item_id": iid, "violations": ";".join(rule for rule, _ in found)})
    violations += [{"order": None, "rule": "stock_negative", "detail": f"{sku}: {n}"} for sku, n in negative]
    return {"orders": len(orders), "captured": round(sum(o["captured"] for o in by.values()), 2),
            "refunded": round(sum(o["refunded"] for o in by.values()), 2), "violations": violations, "rows": rows}
