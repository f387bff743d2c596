"""The store's systems the order flow works through: the shop's directory (customers, payment methods, catalogue,
order history: `$ORCH_DATA_DIR/retail`, read, never copied), and three embedded systems standing in for the
inventory, the payment provider and the warehouse, as tables in the connectors database that a person can open.

Every write carries the outbox's idempotency key: a repeated key returns the original record, so a redelivery
never reserves, charges, refunds or ships twice. Business answers (out of stock, declined) are records, not
failures: the flow reads them back and decides. Faults (outage, hang) come from the connectors client's
simulated faults like every system.

- inventory: ``inventory_stock`` (on hand and reserved per variant, created from the catalogue on first use: an
  available variant starts with a seeded 2-20 units, an unavailable one with 0; the database refuses a negative
  or over-reserved stock) and ``inventory_reservations`` (one per order: reserved / short / committed / released
  / restocked). Available = on hand - reserved; stock leaves on hand only when the shipment commits it.
- payment provider: ``payment_transactions`` (authorize / capture / void / refund). A gift card is declined when
  its balance (the directory's, less what is held or captured on it, plus refunds) does not cover the amount.
  ``payment_simulation`` makes the provider decline a method, answer it late (the authorisation stays
  ``pending`` until the provider decides: ``provider_answers``) or time out on its next calls (drills, demo).
- warehouse: ``fulfilments`` (requested -> shipped -> delivered | lost; cancelled when the order is cancelled
  before it left). Carriers move fulfilments; the flow hears about it through carrier events.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

import sqlalchemy as sa

from ...lib.connectors.embedded import TS, Delivery, System, base_row, cmeta, system_table
from ...lib.store import chunked, utcnow

# --- the shop's directory ---------------------------------------------------------------------------------------


@dataclass
class Customer:
    ref: str
    methods: dict[str, dict[str, Any]]
    address_refs: set[str]
    order_totals: list[float]
    email: str | None = None


@dataclass
class Directory:
    customers: dict[str, Customer] = field(default_factory=dict)  # by customer reference (salted hash of the id)
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)  # by item id (sku)
    products: dict[str, dict[str, Any]] = field(default_factory=dict)


def address_ref(a: dict[str, Any], salt: str) -> str:
    """A stable, non-reversible reference of a postal address (street, zip, country), for "a new address"."""
    norm = "|".join(str(a.get(k, "")).strip().casefold() for k in ("address1", "address2", "zip", "country"))
    return "addr_" + hashlib.sha256(f"{salt}:{norm}".encode()).hexdigest()[:16]


@lru_cache(maxsize=4)
def _directory(folder: str, salt: str) -> Directory:
    from pathlib import Path

    from ...lib.guardrails.pii import customer_ref

    root = Path(folder)
    users = json.loads((root / "users.json").read_text())
    products = json.loads((root / "products.json").read_text())
    orders = json.loads((root / "orders.json").read_text())
    d = Directory()
    for uid, u in users.items():
        d.customers[customer_ref(uid, salt)] = Customer(
            customer_ref(uid, salt), dict(u.get("payment_methods") or {}),
            {address_ref(u.get("address") or {}, salt)}, [], u.get("email"))
    for o in orders.values():
        c = d.customers.get(customer_ref(o["user_id"], salt))
        if c is None:
            continue
        c.address_refs.add(address_ref(o.get("address") or {}, salt))
        if o.get("status") != "cancelled":
            c.order_totals.append(round(sum(float(i["price"]) for i in o.get("items", [])), 2))
    for pid, p in products.items():
        d.products[pid] = {"name": p["name"], "variants": sorted(p["variants"])}
        for sku, v in p["variants"].items():
            d.variants[sku] = {"product_id": pid, "name": p["name"], "price": float(v["price"]),
                               "available": bool(v["available"]), "options": v.get("options", {})}
    return d


def directory() -> Directory:
    """The shop's directory for this deployment's salt (``DatasetMissing`` names the variable to set)."""
    from ...lib import datasets
    from ...lib.settings import Settings

    return _directory(str(datasets.dataset_dir("retail")), Settings.from_env().pii_salt)


# --- embedded systems ---------------------------------------------------------------------------------------------

inventory_stock = sa.Table(
    "inventory_stock", cmeta,
    sa.Column("sku", sa.String(32), primary_key=True),
    sa.Column("on_hand", sa.Integer, nullable=False),
    sa.Column("reserved", sa.Integer, nullable=False, server_default="0", doc="held for orders not shipped yet"),
    sa.Column("updated_at", TS, nullable=False),
    sa.CheckConstraint("on_hand >= 0 AND reserved >= 0 AND reserved <= on_hand", name="stock_never_negative"),
)
inventory_reservations = system_table(
    "inventory_reservations",
    sa.Column("order_id", sa.String(64), nullable=False),
    sa.Column("lines", sa.JSON, nullable=False, doc="[{sku, qty}]"),
    sa.Column("purpose", sa.String(16), nullable=False, server_default="order",
              doc="order, or the change (new items, an exchange's replacement) it was made for"),
    sa.Column("status", sa.String(16), nullable=False, doc="reserved | short | committed | released | restocked"),
    sa.Column("short", sa.JSON, doc="skus without enough stock"),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
)
payment_transactions = system_table(
    "payment_transactions",
    sa.Column("order_id", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(16), nullable=False, doc="authorize | capture | void | refund"),
    sa.Column("method_id", sa.String(64), nullable=False, index=True),
    sa.Column("amount", sa.Float, nullable=False),
    sa.Column("status", sa.String(16), nullable=False, doc="approved | declined | voided"),
    sa.Column("reason", sa.Text),
    sa.Column("ref_key", sa.String(512), doc="the authorisation (capture, void) or capture (refund) it acts on; "
                                             "for an authorisation of a change, the change"),
    sa.Column("created_at", TS, nullable=False),
)
fulfilments = system_table(
    "fulfilments",
    sa.Column("order_id", sa.String(64), nullable=False),
    sa.Column("lines", sa.JSON, nullable=False),
    sa.Column("tracking_id", sa.String(32), nullable=False),
    sa.Column("purpose", sa.String(16), nullable=False, server_default="order",
              doc="order, or the change (new items, an exchange's replacement) it was sent for"),
    sa.Column("status", sa.String(16), nullable=False, doc="requested | shipped | delivered | lost | cancelled"),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
)
payment_simulation = sa.Table(
    "payment_simulation", cmeta,
    sa.Column("method_id", sa.String(64), primary_key=True, doc="drills and the demo: how the provider treats it"),
    sa.Column("mode", sa.String(16), nullable=False, server_default="decline",
              doc="decline | late (answered later: pending) | timeout (no answer for `remaining` calls)"),
    sa.Column("remaining", sa.Integer, doc="timeout: calls left unanswered"),
    sa.Column("reason", sa.Text, nullable=False, server_default=""),
)
ORDER_TABLES = (inventory_stock, inventory_reservations, payment_transactions, fulfilments, payment_simulation)


def ensure_tables(conn) -> None:
    cmeta.create_all(conn, tables=list(ORDER_TABLES))


def _by_key(conn, table: sa.Table, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    """The records under ``keys`` (idempotency keys), one query per 900 keys."""
    out: dict[str, dict[str, Any]] = {}
    for chunk in chunked(list(dict.fromkeys(keys)), 900):
        out.update({r["idempotency_key"]: dict(r) for r in conn.execute(
            sa.select(table).where(table.c.idempotency_key.in_(chunk))).mappings()})
    return out


def _insert(conn, table: sa.Table, rows: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Insert new records in one statement; returns them by key, with their ids."""
    if not rows:
        return {}
    conn.execute(table.insert(), rows)
    return _by_key(conn, table, [r["idempotency_key"] for r in rows])


def _seed_units(sku: str) -> int:
    return 2 + int(hashlib.sha256(sku.encode()).hexdigest(), 16) % 19


def _stock(conn, skus: Sequence[str]) -> dict[str, int]:
    """Available (on hand less reserved) per sku; a sku the stock table has not seen yet starts from the catalogue."""
    have: dict[str, int] = {}
    for chunk in chunked(sorted(set(skus)), 900):
        have.update({sku: on_hand - reserved for sku, on_hand, reserved in conn.execute(sa.select(
            inventory_stock.c.sku, inventory_stock.c.on_hand, inventory_stock.c.reserved).where(
            inventory_stock.c.sku.in_(chunk)).with_for_update()).all()})
    missing = sorted(set(skus) - set(have))
    if missing:
        try:
            variants = directory().variants
        except FileNotFoundError:
            variants = {}
        now = utcnow()
        rows = []
        for sku in missing:
            v = variants.get(sku)
            have[sku] = _seed_units(sku) if v and v["available"] else 0
            rows.append({"sku": sku, "on_hand": have[sku], "reserved": 0, "updated_at": now})
        conn.execute(inventory_stock.insert(), rows)
    return have


def _apply_moves(conn, moves: dict[str, list[int]], now) -> None:
    """Stock moves per sku (``[on_hand delta, reserved delta]``) in one statement."""
    rows = [{"s": sku, "h": h, "r": r, "t": now} for sku, (h, r) in moves.items() if h or r]
    if rows:
        conn.execute(inventory_stock.update().where(inventory_stock.c.sku == sa.bindparam("s")).values(
            on_hand=inventory_stock.c.on_hand + sa.bindparam("h"), reserved=inventory_stock.c.reserved + sa.bindparam("r"),
            updated_at=sa.bindparam("t")), rows)


def _inventory(conn, effects) -> list[Delivery]:
    """Reserve (all lines or none), commit (on shipment), release (compensation), restock (a return received).
    One batch: the records and the stock read once, new reservations inserted together, stock moved per sku."""
    now = utcnow()
    t = inventory_reservations
    known = _by_key(conn, t, [e.idempotency_key for e in effects] +
                    [e.payload["effect_key"] for e in effects if e.action != "reserve" and e.payload.get("effect_key")])
    fresh = [e for e in effects if e.action == "reserve" and e.idempotency_key not in known]
    available = _stock(conn, [ln["sku"] for e in fresh for ln in e.payload["lines"]]) if fresh else {}
    moves: dict[str, list[int]] = {}

    def move(lines, h: int, r: int) -> None:
        for ln in lines:
            m = moves.setdefault(ln["sku"], [0, 0])
            m[0] += h * int(ln["qty"])
            m[1] += r * int(ln["qty"])

    rows, seen = [], set()
    for e in fresh:
        if e.idempotency_key in seen:
            continue
        seen.add(e.idempotency_key)
        need: dict[str, int] = {}
        for ln in e.payload["lines"]:
            need[ln["sku"]] = need.get(ln["sku"], 0) + int(ln["qty"])
        short = sorted(sku for sku, q in need.items() if available.get(sku, 0) < q)
        if not short:
            for sku, q in need.items():
                available[sku] -= q
            move(e.payload["lines"], 0, +1)
        rows.append({**base_row(e), "order_id": e.payload["order_id"], "lines": e.payload["lines"],
                     "purpose": e.payload.get("round") or "order", "status": "short" if short else "reserved", "short": short or None, "created_at": now,
                     "updated_at": now})
    known.update(_insert(conn, t, rows))
    out, status_updates = [], []
    for e in effects:
        if e.action == "reserve":
            rec = known[e.idempotency_key]
            out.append(Delivery(e.idempotency_key, True, f"inventory:reservation:{rec['id']}:{rec['status']}"))
            continue
        res = known.get(e.payload.get("effect_key"))
        if res is None:
            out.append(Delivery(e.idempotency_key, True, "inventory:none"))
            continue
        frm, to = {"commit": ("reserved", "committed"), "release": ("reserved", "released"),
                   "restock": ("committed", "restocked")}[e.action]
        if res["status"] == frm:
            if e.action == "commit":
                move(res["lines"], -1, -1)
            elif e.action == "release":
                move(res["lines"], 0, -1)
            else:  # what came back (a return may send part of the order)
                move(e.payload.get("lines") or res["lines"], +1, 0)
            res["status"] = to
            status_updates.append({"i": res["id"], "st": to, "t": now})
        # else already done (a redelivery), or nothing to do in this state: the record says which
        out.append(Delivery(e.idempotency_key, True, f"inventory:reservation:{res['id']}:{res['status']}"))
    _apply_moves(conn, moves, now)
    if status_updates:
        conn.execute(t.update().where(t.c.id == sa.bindparam("i")).values(status=sa.bindparam("st"),
                                                                           updated_at=sa.bindparam("t")), status_updates)
    return out


def gift_card_balance(conn, method_id: str, start: float) -> float:
    t = payment_transactions
    held = conn.execute(sa.select(t.c.kind, sa.func.coalesce(sa.func.sum(t.c.amount), 0.0)).where(
        t.c.method_id == method_id, t.c.status == "approved").group_by(t.c.kind)).all()
    h = dict(held)
    # an approved authorisation holds the money until voided (its status turns "voided") or captured
    return round(start - h.get("authorize", 0.0) + h.get("refund", 0.0), 2)


def _payments(conn, effects) -> list[Delivery]:
    """Authorise (a gift card's balance, the drills' decline list), capture (within the authorisation), void (an
    authorisation not captured), refund (never above what was captured). One batch, records read once."""
    now = utcnow()
    t = payment_transactions
    known = _by_key(conn, t, [e.idempotency_key for e in effects] +
                    [e.payload["effect_key"] for e in effects if e.payload.get("effect_key")])
    methods = sorted({e.payload.get("method_id") for e in effects if e.action == "authorize"} - {None})
    sim = {r["method_id"]: dict(r) for r in conn.execute(sa.select(payment_simulation).where(
        payment_simulation.c.method_id.in_(methods))).mappings()} if methods else {}
    balances: dict[str, float] = {}
    out, rows = [], []
    for e in effects:
        p = e.payload
        row = known.get(e.idempotency_key)
        if row is not None:
            out.append(Delivery(e.idempotency_key, True, f"payment_provider:{row['kind']}:{row['id']}:{row['status']}"))
            continue
        status, reason, ref = "approved", None, None
        amount, method, order_id = float(p.get("amount") or 0), p.get("method_id"), p.get("order_id")
        if e.action == "authorize":
            ref = p.get("round")  # a change's authorisation (new method, items, exchange) names its change
            mode = (sim.get(method) or {}).get("mode")
            if mode == "timeout" and (sim[method]["remaining"] or 0) > 0:  # the provider does not answer this call
                sim[method]["remaining"] -= 1
                conn.execute(payment_simulation.update().where(payment_simulation.c.method_id == method).values(
                    remaining=sim[method]["remaining"]))
                out.append(Delivery(e.idempotency_key, False, error="payment provider timed out (simulated)"))
                continue
            if mode == "decline":
                status, reason = "declined", sim[method]["reason"] or "declined by the issuer"
            elif mode == "late":
                status, reason = "pending", "the provider answers later"
            elif p.get("gift_card_balance") is not None:
                if method not in balances:
                    balances[method] = gift_card_balance(conn, method, float(p["gift_card_balance"]))
                if balances[method] + 1e-9 < amount:
                    status, reason = "declined", f"gift card balance {balances[method]:.2f} below {amount:.2f}"
                else:
                    balances[method] -= amount
        else:
            ref = p["effect_key"]
            target = known.get(ref)
            if e.action == "void" and target is None:  # nothing was authorised under that key: nothing to void
                out.append(Delivery(e.idempotency_key, True, "payment_provider:void:none"))
                continue
            if e.action == "void" and target["status"] in ("pending", "voided", "declined"):
                if target["status"] == "pending":  # a late authorisation is withdrawn before the provider answers
                    conn.execute(t.update().where(t.c.id == target["id"]).values(status="voided"))
                    target["status"] = "voided"
                out.append(Delivery(e.idempotency_key, True, f"payment_provider:void:{target['id']}:{target['status']}"))
                continue
            if target is None or target["status"] != "approved":
                out.append(Delivery(e.idempotency_key, False, error=f"{e.action}: no approved transaction {ref}"))
                continue
            order_id = order_id or target["order_id"]
            if e.action == "capture":
                if conn.execute(sa.select(t.c.id).where(t.c.ref_key == ref, t.c.kind == "capture",
                                                        t.c.status == "approved")).first() or any(
                        x["ref_key"] == ref and x["kind"] == "capture" for x in rows):
                    out.append(Delivery(e.idempotency_key, False, error="capture: this authorisation was captured "
                                                                        "already (under another key)"))
                    continue
                method, amount = target["method_id"], amount or target["amount"]
                if amount > target["amount"] + 1e-9:
                    out.append(Delivery(e.idempotency_key, False, error="capture above the authorised amount"))
                    continue
            elif e.action == "void":
                if conn.execute(sa.select(t.c.id).where(t.c.ref_key == ref, t.c.kind == "capture",
                                                        t.c.status == "approved")).first():
                    out.append(Delivery(e.idempotency_key, False, error="void: the authorisation was captured; refund it"))
                    continue
                method, amount = target["method_id"], target["amount"]
                conn.execute(t.update().where(t.c.id == target["id"]).values(status="voided"))
                target["status"] = "voided"
            else:  # refund: to the original method, or the gift card the customer chose
                refunded = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(t.c.amount), 0.0)).where(
                    t.c.ref_key == ref, t.c.kind == "refund", t.c.status == "approved")).scalar_one()
                refunded += sum(r["amount"] for r in rows if r["ref_key"] == ref and r["kind"] == "refund")
                amount = round(min(amount or target["amount"], target["amount"] - refunded), 2)
                method = p.get("method_id") or target["method_id"]
                if amount <= 0:
                    out.append(Delivery(e.idempotency_key, True, "payment_provider:refund:none:nothing_left"))
                    continue
        rows.append({**base_row(e), "order_id": order_id or "", "kind": e.action, "method_id": method,
                     "amount": round(amount, 2), "status": status, "reason": reason, "ref_key": ref, "created_at": now})
        out.append(None)  # filled once inserted
    made = _insert(conn, t, rows)
    it = iter(rows)
    for i, d in enumerate(out):
        if d is None:
            rec = made[next(it)["idempotency_key"]]
            out[i] = Delivery(rec["idempotency_key"], True, f"payment_provider:{rec['kind']}:{rec['id']}:{rec['status']}")
    return out


def tracking_id(key: str) -> str:
    return "1Z" + str(int(hashlib.sha256(key.encode()).hexdigest(), 16))[:14]


def _warehouse(conn, effects) -> list[Delivery]:
    """Ship (a fulfilment request with a tracking id) and cancel_fulfilment (only what has not left the building;
    the record says what the parcel is when it already left). One batch."""
    now = utcnow()
    known = _by_key(conn, fulfilments, [e.idempotency_key for e in effects] +
                    [e.payload["effect_key"] for e in effects if e.payload.get("effect_key")])
    rows = [{**base_row(e), "order_id": e.payload["order_id"], "lines": e.payload["lines"],
             "purpose": e.payload.get("round") or "order", "tracking_id": tracking_id(e.idempotency_key), "status": "requested", "created_at": now, "updated_at": now}
            for e in {e.idempotency_key: e for e in effects if e.action == "ship" and e.idempotency_key not in known}.values()]
    known.update(_insert(conn, fulfilments, rows))
    out = []
    for e in effects:
        if e.action == "ship":
            f = known[e.idempotency_key]
        else:
            f = known.get(e.payload.get("effect_key"))
            if f is None:
                out.append(Delivery(e.idempotency_key, True, "warehouse:none"))
                continue
            if f["status"] == "requested":  # conditional: a carrier taking the parcel meanwhile wins
                done = conn.execute(fulfilments.update().where(fulfilments.c.id == f["id"],
                                                               fulfilments.c.status == "requested").values(
                    status="cancelled", updated_at=now)).rowcount
                f["status"] = "cancelled" if done else conn.execute(
                    sa.select(fulfilments.c.status).where(fulfilments.c.id == f["id"])).scalar_one()
        out.append(Delivery(e.idempotency_key, True, f"warehouse:fulfilment:{f['id']}:{f['status']}"))
    return out


INVENTORY = System("inventory", inventory_reservations, row=lambda e, now: {},
                   handlers={a: _inventory for a in ("reserve", "commit", "release", "restock")},
                   # one standing reservation per order and purpose (a short one holds nothing, a released one was
                   # undone: neither counts)
                   same_record=("item_id", "purpose"),
                   counts_as_duplicate=lambda t: t.c.status.notin_(("short", "released")),
                   readers={"reservations": lambda conn, keys: _by_key(conn, inventory_reservations, keys)})
PAYMENTS = System("payment_provider", payment_transactions, row=lambda e, now: {},
                  handlers={a: _payments for a in ("authorize", "capture", "void", "refund")},
                  # per order: one standing authorisation per round (a change's carries it in ref_key), one capture
                  # per authorisation; refunds may be several (a loss, a return, an exchange)
                  same_record=("item_id", "kind", "ref_key"),
                  counts_as_duplicate=lambda t: sa.and_(t.c.kind != "refund", t.c.status == "approved"),
                  readers={"transactions": lambda conn, keys: _by_key(conn, payment_transactions, keys)})
WAREHOUSE = System("warehouse", fulfilments, row=lambda e, now: {},
                   handlers={"ship": _warehouse, "cancel_fulfilment": _warehouse},
                   # one parcel per order and purpose (the order, a change of items, an exchange's replacement); a
                   # cancelled one was stopped before it left
                   same_record=("item_id", "purpose"), counts_as_duplicate=lambda t: t.c.status != "cancelled",
                   readers={"fulfilments": lambda conn, keys: _by_key(conn, fulfilments, keys)})
SYSTEMS = (INVENTORY, PAYMENTS, WAREHOUSE)


# --- the outside world's side (the demo, drills and tests play it) ------------------------------------------------

def provider_answers(conn, order_ids: Sequence[str], approve: bool) -> int:
    """The payment provider decides its pending (late) authorisations of ``order_ids``; returns how many."""
    t = payment_transactions
    return conn.execute(t.update().where(t.c.order_id.in_(list(order_ids)), t.c.kind == "authorize",
                                         t.c.status == "pending").values(
        status="approved" if approve else "declined", reason=None if approve else "declined after review")).rowcount


def carrier_moves(conn, order_ids: Sequence[str], to: str) -> int:
    """Carriers move parcels (requested -> shipped, shipped -> delivered | lost); only from the state before."""
    before = {"shipped": "requested", "delivered": "shipped", "lost": "shipped"}[to]
    return conn.execute(fulfilments.update().where(fulfilments.c.order_id.in_(list(order_ids)),
                                                   fulfilments.c.status == before).values(
        status=to, updated_at=utcnow())).rowcount
