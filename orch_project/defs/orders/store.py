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
- payments: ``payment_transactions`` (authorize / capture / void / refund). A gift card is declined when its
  balance (the directory's, less what is held or captured on it, plus refunds) does not cover the amount; a
  card whose id is in the simulation's decline list is declined (drills).
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
from ...lib.store import utcnow

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
    sa.Column("ref_key", sa.String(512), doc="the authorisation (capture, void) or capture (refund) it acts on"),
    sa.Column("created_at", TS, nullable=False),
)
fulfilments = system_table(
    "fulfilments",
    sa.Column("order_id", sa.String(64), nullable=False),
    sa.Column("lines", sa.JSON, nullable=False),
    sa.Column("tracking_id", sa.String(32), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, doc="requested | shipped | delivered | lost | cancelled"),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
)
payment_simulation = sa.Table(
    "payment_simulation", cmeta,
    sa.Column("method_id", sa.String(64), primary_key=True, doc="drills: this method's authorisations are declined"),
    sa.Column("reason", sa.Text, nullable=False),
)
ORDER_TABLES = (inventory_stock, inventory_reservations, payment_transactions, fulfilments, payment_simulation)


def ensure_tables(conn) -> None:
    cmeta.create_all(conn, tables=list(ORDER_TABLES))


def _existing(conn, table: sa.Table, key: str) -> dict[str, Any] | None:
    row = conn.execute(sa.select(table).where(table.c.idempotency_key == key)).mappings().first()
    return dict(row) if row else None


def _seed_units(sku: str) -> int:
    return 2 + int(hashlib.sha256(sku.encode()).hexdigest(), 16) % 19


def _stock(conn, skus: Sequence[str]) -> dict[str, int]:
    """Available (on hand less reserved) per sku; a sku the stock table has not seen yet starts from the catalogue."""
    have = {sku: on_hand - reserved for sku, on_hand, reserved in conn.execute(sa.select(
        inventory_stock.c.sku, inventory_stock.c.on_hand, inventory_stock.c.reserved).where(
        inventory_stock.c.sku.in_(list(skus)))).all()}
    missing = [s for s in skus if s not in have]
    if missing:
        try:
            variants = directory().variants
        except FileNotFoundError:
            variants = {}
        now = utcnow()
        for s in missing:
            v = variants.get(s)
            have[s] = _seed_units(s) if v and v["available"] else 0
            conn.execute(inventory_stock.insert().values(sku=s, on_hand=have[s], updated_at=now))
    return have


def _move(conn, lines: Sequence[dict[str, Any]], now, on_hand: int = 0, reserved: int = 0) -> None:
    """Stock moves of a reservation's lines: ``on_hand`` and ``reserved`` are +1/-1/0 per unit."""
    for ln in lines:
        q = int(ln["qty"])
        conn.execute(inventory_stock.update().where(inventory_stock.c.sku == ln["sku"]).values(
            on_hand=inventory_stock.c.on_hand + on_hand * q, reserved=inventory_stock.c.reserved + reserved * q,
            updated_at=now))


def _inventory(conn, effects) -> list[Delivery]:
    now = utcnow()
    out = []
    for e in effects:
        p = e.payload
        if e.action == "reserve":
            row = _existing(conn, inventory_reservations, e.idempotency_key)
            if row is None:
                skus = [ln["sku"] for ln in p["lines"]]
                need: dict[str, int] = {}
                for ln in p["lines"]:
                    need[ln["sku"]] = need.get(ln["sku"], 0) + int(ln["qty"])
                available = _stock(conn, skus)
                short = sorted(s for s, q in need.items() if available.get(s, 0) < q)
                if not short:
                    _move(conn, p["lines"], now, reserved=+1)
                rid = conn.execute(inventory_reservations.insert().values(
                    **base_row(e), order_id=p["order_id"], lines=p["lines"], status="short" if short else "reserved",
                    short=short or None, created_at=now, updated_at=now)).inserted_primary_key[0]
                row = {"id": rid, "status": "short" if short else "reserved"}
            out.append(Delivery(e.idempotency_key, True, f"inventory:reservation:{row['id']}:{row['status']}"))
            continue
        res = _existing(conn, inventory_reservations, p["effect_key"])
        if res is None:
            out.append(Delivery(e.idempotency_key, True, "inventory:none"))
            continue
        want = {"commit": ("reserved", "committed"), "release": ("reserved", "released"),
                "restock": ("committed", "restocked")}[e.action]
        if res["status"] == want[0]:
            if e.action == "commit":
                _move(conn, res["lines"], now, on_hand=-1, reserved=-1)
            elif e.action == "release":
                _move(conn, res["lines"], now, reserved=-1)
            else:  # restock: what came back (a return may send part of the order)
                _move(conn, p.get("lines") or res["lines"], now, on_hand=+1)
            conn.execute(inventory_reservations.update().where(inventory_reservations.c.id == res["id"]).values(
                status=want[1], updated_at=now))
            out.append(Delivery(e.idempotency_key, True, f"inventory:reservation:{res['id']}:{want[1]}"))
        else:  # already done (a redelivery), or nothing to do in this state: say which
            out.append(Delivery(e.idempotency_key, True, f"inventory:reservation:{res['id']}:{res['status']}"))
    return out


def _read_reservations(conn, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    return {r["idempotency_key"]: dict(r) for r in conn.execute(sa.select(inventory_reservations).where(
        inventory_reservations.c.idempotency_key.in_(list(keys)))).mappings()}


def gift_card_balance(conn, method_id: str, start: float) -> float:
    t = payment_transactions
    held = conn.execute(sa.select(t.c.kind, sa.func.coalesce(sa.func.sum(t.c.amount), 0.0)).where(
        t.c.method_id == method_id, t.c.status == "approved").group_by(t.c.kind)).all()
    h = dict(held)
    # an approved authorisation holds the money until voided (its status turns "voided") or captured
    return round(start - h.get("authorize", 0.0) + h.get("refund", 0.0), 2)


def _payments(conn, effects) -> list[Delivery]:
    now = utcnow()
    out = []
    t = payment_transactions
    for e in effects:
        p = e.payload
        row = _existing(conn, t, e.idempotency_key)
        if row is not None:
            out.append(Delivery(e.idempotency_key, True, f"payment_provider:{row['kind']}:{row['id']}:{row['status']}"))
            continue
        status, reason, ref, amount, method = "approved", None, None, float(p.get("amount") or 0), p.get("method_id")
        if e.action == "authorize":
            declined = conn.execute(sa.select(payment_simulation.c.reason).where(
                payment_simulation.c.method_id == method)).scalar()
            if declined:
                status, reason = "declined", declined
            elif p.get("gift_card_balance") is not None:
                left = gift_card_balance(conn, method, float(p["gift_card_balance"]))
                if left + 1e-9 < amount:
                    status, reason = "declined", f"gift card balance {left:.2f} below {amount:.2f}"
        else:
            ref = p["effect_key"]
            target = _existing(conn, t, ref)
            if target is None or target["status"] != "approved":
                out.append(Delivery(e.idempotency_key, False, error=f"{e.action}: no approved transaction {ref}"))
                continue
            method, order_id = target["method_id"], target["order_id"]
            if e.action == "capture":
                amount = amount or target["amount"]
                if amount > target["amount"] + 1e-9:
                    out.append(Delivery(e.idempotency_key, False, error="capture above the authorised amount"))
                    continue
            elif e.action == "void":
                if conn.execute(sa.select(t.c.id).where(t.c.ref_key == ref, t.c.kind == "capture",
                                                        t.c.status == "approved")).first():
                    out.append(Delivery(e.idempotency_key, False, error="void: the authorisation was captured; refund it"))
                    continue
                amount = target["amount"]
                conn.execute(t.update().where(t.c.id == target["id"]).values(status="voided"))
            elif e.action == "refund":
                refunded = conn.execute(sa.select(sa.func.coalesce(sa.func.sum(t.c.amount), 0.0)).where(
                    t.c.ref_key == ref, t.c.kind == "refund", t.c.status == "approved")).scalar_one()
                amount = min(amount or target["amount"], round(target["amount"] - refunded, 2))
                if amount <= 0:
                    out.append(Delivery(e.idempotency_key, True, f"payment_provider:refund:none:nothing_left"))
                    continue
        rid = conn.execute(t.insert().values(
            **base_row(e), order_id=p.get("order_id") or (order_id if e.action != "authorize" else ""),
            kind=e.action, method_id=method, amount=round(amount, 2), status=status, reason=reason, ref_key=ref,
            created_at=now)).inserted_primary_key[0]
        out.append(Delivery(e.idempotency_key, True, f"payment_provider:{e.action}:{rid}:{status}"))
    return out


def _read_transactions(conn, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    return {r["idempotency_key"]: dict(r) for r in conn.execute(sa.select(payment_transactions).where(
        payment_transactions.c.idempotency_key.in_(list(keys)))).mappings()}


def tracking_id(key: str) -> str:
    return "1Z" + str(int(hashlib.sha256(key.encode()).hexdigest(), 16))[:14]


def _warehouse(conn, effects) -> list[Delivery]:
    now = utcnow()
    out = []
    for e in effects:
        p = e.payload
        if e.action == "ship":
            row = _existing(conn, fulfilments, e.idempotency_key)
            if row is None:
                rid = conn.execute(fulfilments.insert().values(
                    **base_row(e), order_id=p["order_id"], lines=p["lines"], tracking_id=tracking_id(e.idempotency_key),
                    status="requested", created_at=now, updated_at=now)).inserted_primary_key[0]
                row = {"id": rid, "status": "requested"}
            out.append(Delivery(e.idempotency_key, True, f"warehouse:fulfilment:{row['id']}:{row['status']}"))
            continue
        f = _existing(conn, fulfilments, p["effect_key"])
        if f is None:
            out.append(Delivery(e.idempotency_key, True, "warehouse:none"))
        elif f["status"] == "requested":  # cancel_fulfilment: only what has not left the building
            conn.execute(fulfilments.update().where(fulfilments.c.id == f["id"]).values(status="cancelled",
                                                                                         updated_at=now))
            out.append(Delivery(e.idempotency_key, True, f"warehouse:fulfilment:{f['id']}:cancelled"))
        else:
            out.append(Delivery(e.idempotency_key, True, f"warehouse:fulfilment:{f['id']}:{f['status']}"))
    return out


def _read_fulfilments(conn, keys: Sequence[str]) -> dict[str, dict[str, Any]]:
    return {r["idempotency_key"]: dict(r) for r in conn.execute(sa.select(fulfilments).where(
        fulfilments.c.idempotency_key.in_(list(keys)))).mappings()}


INVENTORY = System("inventory", inventory_reservations, row=lambda e, now: {},
                   handlers={a: _inventory for a in ("reserve", "commit", "release", "restock")},
                   same_record=("item_id",), counts_as_duplicate=lambda t: t.c.status != "short",
                   readers={"reservations": _read_reservations})
PAYMENTS = System("payment_provider", payment_transactions, row=lambda e, now: {},
                  handlers={a: _payments for a in ("authorize", "capture", "void", "refund")},
                  same_record=("item_id", "kind", "ref_key"), counts_as_duplicate=lambda t: t.c.kind != "refund",
                  readers={"transactions": _read_transactions})
WAREHOUSE = System("warehouse", fulfilments, row=lambda e, now: {},
                   handlers={"ship": _warehouse, "cancel_fulfilment": _warehouse},
                   same_record=("item_id", "order_id"), readers={"fulfilments": _read_fulfilments})
SYSTEMS = (INVENTORY, PAYMENTS, WAREHOUSE)
