"""Seeded sample data of the order flow (``python -m orch_project.defs.orders.sample_data`` regenerates
``samples/`` from the store in ``$ORCH_DATA_DIR/retail``): new orders by the store's customers over four days
(ordinary ones, a grey-zone and a red fraud case, a gift card that cannot cover its order, items out of stock,
an unknown customer and someone else's payment method), customer requests (a cancel that comes in time, one
racing the shipment, a new address, other items, another payment method, a cancel without an allowed reason),
and broken records.

The demo's world (``demo_world``) plays the risk analyst (decides the fraud reviews), the warehouse and the
carriers (ships what was requested, delivers what shipped, loses one parcel, sends one delivery before its
shipment), a customer who returns an item and one who exchanges one. Every event it sends has a fixed id: a second run adds nothing.
"""

from __future__ import annotations

import json
import random
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

SAMPLES_DIR = Path(__file__).parent / "samples"
SEED = 14
START = datetime(2026, 12, 2, 8, 0, tzinfo=timezone.utc)
DAYS = 4


def _ts(t: datetime) -> str:
    return t.isoformat(timespec="seconds")


def _retail() -> tuple[dict, dict, dict]:
    from ...lib import datasets

    root = datasets.dataset_dir("retail")
    return (json.loads((root / "users.json").read_text()), json.loads((root / "products.json").read_text()),
            json.loads((root / "orders.json").read_text()))


def generate() -> dict[str, Any]:
    users, products, history = _retail()
    rng = random.Random(SEED)
    avail = [(pid, sku, v["price"]) for pid, p in sorted(products.items()) for sku, v in sorted(p["variants"].items())
             if v["available"]]
    unavailable = [sku for p in products.values() for sku, v in sorted(p["variants"].items()) if not v["available"]]
    uids = sorted(users)
    orders: list[dict[str, Any]] = []
    n = 0

    def order(uid: str, skus: list[str], method: str | None = None, address: dict | None = None, at: datetime | None = None):
        nonlocal n
        n += 1
        u = users[uid]
        o = {"kind": "order", "id": f"wh-{n:04d}", "order_id": f"#S{1000 + n}", "user_id": uid,
             "address": address or u["address"], "items": [{"item_id": s, "quantity": 1} for s in skus],
             "payment_method_id": method or sorted(u["payment_methods"])[0],
             "created_at": _ts(at or START + timedelta(minutes=rng.randint(0, DAYS * 24 * 60 - 1)))}
        orders.append(o)
        return o

    ordinary = [u for u in uids if not any(m["source"] == "gift_card" for m in users[u]["payment_methods"].values())]
    for uid in rng.sample(ordinary, 40):
        order(uid, [sku for _, sku, _ in rng.sample(avail, rng.choice((1, 1, 2)))])
    new_addr = {"address1": "17 Harbour Lane", "address2": "", "city": "Portland", "state": "OR", "zip": "97201",
                "country": "USA"}
    expensive = sorted(avail, key=lambda a: -a[2])
    grey = order(rng.choice(ordinary), [expensive[0][1], expensive[5][1]], address=new_addr)
    red_user = rng.choice(ordinary)
    t0 = START + timedelta(days=1, hours=3)
    order(red_user, [avail[3][1]], at=t0)
    order(red_user, [avail[9][1]], at=t0 + timedelta(hours=2))
    red = order(red_user, [expensive[1][1], expensive[2][1], expensive[8][1]], address=new_addr, at=t0 + timedelta(hours=4))
    gift_users = [u for u in uids if any(m["source"] == "gift_card" and m.get("balance", 0) < 40
                                         for m in users[u]["payment_methods"].values())]
    gu = gift_users[0]
    card = next(k for k, m in sorted(users[gu]["payment_methods"].items()) if m["source"] == "gift_card" and m["balance"] < 40)
    cheap_over = min((a for a in avail if a[2] > users[gu]["payment_methods"][card]["balance"] + 5), key=lambda a: a[2])
    declined = order(gu, [cheap_over[1]], method=card)
    split = order(rng.choice(ordinary), [avail[20][1], unavailable[0]])
    oos = order(rng.choice(ordinary), [unavailable[1]])
    unknown = order(uids[0], [avail[2][1]])
    unknown["user_id"] = "nobody_known_0000"
    other = order(uids[1], [avail[4][1]])
    other["payment_method_id"] = sorted(users[uids[2]]["payment_methods"])[0]
    plain = [o for o in orders[:40]]

    def other_option(sku: str) -> str | None:
        pid = next(p for p, prod in products.items() if sku in prod["variants"])
        return next((k for k, v in sorted(products[pid]["variants"].items()) if k != sku and v["available"]), None)

    swap = next(o for o in plain[8:] if other_option(o["items"][0]["item_id"]))
    two = next(o for o in plain[8:] if o is not swap and len(users[o["user_id"]]["payment_methods"]) >= 2)
    exch = next(o for o in plain[7:] if o is not swap and o is not two and other_option(o["items"][0]["item_id"]))
    scenario = {"hold": [plain[0]["order_id"], plain[2]["order_id"], swap["order_id"], two["order_id"]],
                "race": plain[1]["order_id"], "exchange": exch["order_id"],
                "lost": plain[3]["order_id"], "late_shipped_event": plain[4]["order_id"],
                "return": plain[5]["order_id"], "grey": grey["order_id"], "red": red["order_id"],
                "declined": declined["order_id"], "split": split["order_id"], "out_of_stock": oos["order_id"]}
    later = START + timedelta(days=DAYS, hours=1)
    requests = [
        {"kind": "request", "id": "rq-1", "event_id": "req-cancel-1", "order_id": plain[0]["order_id"], "type": "cancel",
         "reason": "ordered by mistake", "occurred_at": _ts(later)},
        {"kind": "request", "id": "rq-2", "event_id": "req-cancel-2", "order_id": plain[1]["order_id"], "type": "cancel",
         "reason": "no longer needed", "occurred_at": _ts(later)},
        {"kind": "request", "id": "rq-3", "event_id": "req-address-3", "order_id": plain[2]["order_id"],
         "type": "modify_address", "address": new_addr, "occurred_at": _ts(later)},
        {"kind": "request", "id": "rq-4", "event_id": "req-cancel-4", "order_id": plain[6]["order_id"], "type": "cancel",
         "reason": "found it cheaper", "occurred_at": _ts(later)},
        {"kind": "request", "id": "rq-5", "event_id": "req-items-5", "order_id": swap["order_id"], "type": "modify_items",
         "item_ids": [swap["items"][0]["item_id"]], "new_item_ids": [other_option(swap["items"][0]["item_id"])],
         "occurred_at": _ts(later)},
        {"kind": "request", "id": "rq-6", "event_id": "req-payment-6", "order_id": two["order_id"],
         "type": "modify_payment", "payment_method_id": sorted(users[two["user_id"]]["payment_methods"])[1],
         "occurred_at": _ts(later)},
    ]
    scenario["exchange_to"] = other_option(exch["items"][0]["item_id"])
    orders.sort(key=lambda o: o["created_at"])
    return {"orders": orders, "requests": requests, "scenario": scenario}


MALFORMED = [
    '{"kind": "order", "order_id": "#S9001", "user_id": "x", "items": [{"item_id": "1234567"}], "payment_method_id": "credit_card_1", "created_at": "2026-12-03T10:00:00Z"}',
    '{"kind": "order", "order_id": "#S9002", "user_id": "x", "address": {"address1": "1 Main St", "city": "Austin", "state": "TX", "zip": "73301", "country": "USA"}, "items": [{"item_id": "1234567", "quantity": -2}], "payment_method_id": "credit_card_1", "created_at": "2026-12-03T10:00:00Z"}',
    '{"kind": "order", "order_id": "#S9003", broken json',
    '{"kind": "refund_everything", "order_id": "#S9004"}',
    '{"kind": "carrier", "event_id": "car-x-1", "order_id": "#S1001", "type": "teleported", "occurred_at": "2026-12-05T10:00:00Z"}',
]


def write_samples() -> dict[str, int]:
    g = generate()
    (SAMPLES_DIR / "orders").mkdir(parents=True, exist_ok=True)
    (SAMPLES_DIR / "malformed").mkdir(parents=True, exist_ok=True)
    by_day: dict[str, list[str]] = {}
    for o in g["orders"]:
        by_day.setdefault(o["created_at"][:10], []).append(json.dumps(o))
    for day, lines in by_day.items():
        (SAMPLES_DIR / "orders" / f"orders-{day}.jsonl").write_text("\n".join(lines) + "\n")
    (SAMPLES_DIR / "orders" / "requests.jsonl").write_text("\n".join(json.dumps(r) for r in g["requests"]) + "\n")
    (SAMPLES_DIR / "malformed" / "broken.jsonl").write_text("\n".join(MALFORMED) + "\n")
    (SAMPLES_DIR / "scenario.json").write_text(json.dumps(g["scenario"], indent=1) + "\n")
    return {"orders": len(g["orders"]), "requests": len(g["requests"]), "malformed": len(MALFORMED)}


def seed_demo(submit) -> dict:
    """The new orders and requests (inbox folder) and the broken records; nothing when the store is missing."""
    from ...lib import datasets

    try:
        datasets.dataset_dir("retail")
    except datasets.DatasetMissing as exc:
        return {"skipped": str(exc)}
    return submit([SAMPLES_DIR / "orders", SAMPLES_DIR / "malformed"])


def _when(base: datetime, days: int, now: datetime) -> datetime:
    """``days`` after the order, but never in the future: the samples' later events happen in the last hours,
    in the same order."""
    return min(base + timedelta(days=days), now - timedelta(hours=12 - days))


def _event(kind: str, etype: str, order_id: str, at: datetime, eid: str, **extra: Any) -> dict[str, Any]:
    return {"kind": kind, "id": f"w-{eid}", "event_id": eid, "order_id": order_id, "type": etype,
            "occurred_at": _ts(at), **extra}


def demo_world(settings, db) -> str | None:
    """Between the flow run and the ops job. Only what has not happened yet happens."""
    import sqlalchemy as sa

    from ...lib.approvals import decide
    from ...lib.intake import submit_to_table
    from ...lib.store import approvals, items
    from ..resources import _embedded
    from .logic import CFG, FLOW
    from .store import ensure_tables, fulfilments

    scen = json.loads((SAMPLES_DIR / "scenario.json").read_text())
    with db.begin() as conn:
        pending = conn.execute(sa.select(approvals.c.item_id).where(
            approvals.c.flow == FLOW, approvals.c.status == "pending")).scalars().all()
        created = {d["order_id"]: datetime.fromisoformat(d["created_at"]) for d in conn.execute(
            sa.select(items.c.data).where(items.c.flow == FLOW, items.c.item_id.like("order-%"))).scalars()}
    decided = 0
    for iid in pending:  # the risk analyst: the grey-zone order is a regular customer's gift; approve
        decide(db, iid, "approve", "ra-tomas", "called the customer: a gift, approved", None, CFG.roster, flow=FLOW)
        decided += 1
    cdb = _embedded(settings.connectors_url).db
    events, now = [], datetime.now(timezone.utc)
    with cdb.begin() as conn:
        ensure_tables(conn)
        rows = [dict(r) for r in conn.execute(sa.select(fulfilments).where(
            fulfilments.c.item_id.like("order-%"))).mappings()]
        anything_left = any(r["status"] != "requested" for r in rows)
        for f in rows:
            oid, base = f["order_id"], created.get(f["order_id"], now - timedelta(days=5))
            if f["status"] == "requested":
                if oid in scen["hold"] and not anything_left:
                    continue  # the warehouse is slower with these: the customer's request comes first
                late = oid == scen["late_shipped_event"]  # its delivery is reported before its shipment
                conn.execute(fulfilments.update().where(fulfilments.c.id == f["id"]).values(
                    status="delivered" if late else "shipped", updated_at=now))
                if late:
                    events.append(_event("carrier", "delivered", oid, _when(base, 3, now),
                                         f"car-{f['tracking_id']}-delivered", tracking_id=f["tracking_id"]))
                    continue
                events.append(_event("carrier", "shipped", oid, _when(base, 1, now), f"car-{f['tracking_id']}-shipped",
                                     tracking_id=f["tracking_id"]))
            elif f["status"] == "shipped":
                lost = oid == scen["lost"]
                conn.execute(fulfilments.update().where(fulfilments.c.id == f["id"]).values(
                    status="lost" if lost else "delivered", updated_at=now))
                etype = "lost" if lost else "delivered"
                events.append(_event("carrier", etype, oid, _when(base, 3, now), f"car-{f['tracking_id']}-{etype}",
                                     tracking_id=f["tracking_id"]))
                if oid == scen.get("exchange") and f["purpose"] == "order":  # another option of the product; sent back
                    old = [ln["sku"] for ln in f["lines"]][:1]
                    events.append(_event("request", "exchange", oid, _when(base, 4, now),
                                         f"req-exchange-{f['tracking_id']}", item_ids=old,
                                         new_item_ids=[scen["exchange_to"]]))
                    events.append(_event("carrier", "returned", oid, _when(base, 7, now),
                                         f"car-{f['tracking_id']}-returned", tracking_id=f["tracking_id"]))
                if oid == scen["return"]:  # the customer sends one item back; the parcel arrives three days later
                    skus = [ln["sku"] for ln in f["lines"]][:1]
                    events.append(_event("request", "return", oid, _when(base, 5, now),
                                         f"req-return-{f['tracking_id']}", item_ids=skus))
                    events.append(_event("carrier", "returned", oid, _when(base, 8, now),
                                         f"car-{f['tracking_id']}-returned", tracking_id=f["tracking_id"]))
            elif f["status"] == "delivered" and oid == scen["late_shipped_event"]:
                events.append(_event("carrier", "shipped", oid, _when(base, 1, now),
                                     f"car-{f['tracking_id']}-shipped", tracking_id=f["tracking_id"]))
    # carriers redeliver: the race order's shipment reported again under another delivery id (one event)
    events += [{**e, "id": e["id"] + "-again"} for e in events if e["order_id"] == scen["race"] and e["type"] == "shipped"]
    added = submit_to_table(db, FLOW, events, submitted_by="demo:world") if events else 0
    if not decided and not added:
        return None
    return f"the world: {decided} fraud review(s) decided, {added} carrier/customer event(s) sent"


def demo_summary(settings) -> list[tuple[str, str]]:
    from ...lib.store import Database
    from ..resources import _embedded
    from .invariants import audit
    from .logic import CFG

    import sqlalchemy as sa
    from collections import Counter

    from ...lib.store import items

    db = Database(settings.database_url)
    rep = audit(db, _embedded(settings.connectors_url).db, CFG)
    with db.begin() as conn:
        rows = conn.execute(sa.select(items.c.status, items.c.data).where(
            items.c.flow == "orders", items.c.item_id.like("order-%"))).all()
    by = Counter(d.get("outcome") or st for st, d in rows)
    shown = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in sorted(by.items(), key=lambda kv: (-kv[1], kv[0])))
    return [("orders", f"{len(rows)}: {shown}" + (" (delivered ones stay open until their return window closes)"
                                                  if by.get("delivered") else "")),
            ("money", f"{rep['captured']:,.2f} captured, {rep['refunded']:,.2f} refunded"),
            ("invariant violations", str(len(rep["violations"])))]


if __name__ == "__main__":
    print(write_samples())
