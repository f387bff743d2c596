"""The order flow through Dagster on the store in $ORCH_DATA_DIR/retail: each saga step and its compensation,
fraud refusal and review, durable waits moved on by events, the cancel/ship race, policy refusals, bad and
duplicate events, a connector failed for good, and re-execution without a second charge or refund."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from orch_project.lib.store import dlq, items, outbox

from .conftest import flow_inbox, require_dataset, run_flow, run_ops

FLOW = "orders"
DAY = "2026-12-03"
AT = datetime(2026, 12, 3, 9, 0, tzinfo=timezone.utc)


@pytest.fixture(scope="module")
def shop():
    folder = require_dataset("retail")
    users = json.loads((folder / "users.json").read_text())
    products = json.loads((folder / "products.json").read_text())
    avail = sorted((v["price"], sku) for p in products.values() for sku, v in p["variants"].items() if v["available"])
    plain = [u for u in sorted(users) if not any(m["source"] == "gift_card" for m in users[u]["payment_methods"].values())]
    return {"users": users, "avail": avail, "plain": plain,
            "gone": sorted(sku for p in products.values() for sku, v in p["variants"].items() if not v["available"])}


def order(shop, n: int, uid: str | None = None, skus: list[str] | None = None, **over) -> dict:
    uid = uid or shop["plain"][n]
    u = shop["users"][uid]
    return {"kind": "order", "order_id": f"#T{n:04d}", "user_id": uid, "address": u["address"],
            "items": [{"item_id": s, "quantity": 1} for s in (skus or [shop["avail"][10 + n][1]])],
            "payment_method_id": sorted(u["payment_methods"])[0],
            "created_at": (AT + timedelta(minutes=n)).isoformat(), **over}


def event(kind: str, etype: str, oid: str, eid: str, at: datetime = AT + timedelta(days=1), **extra) -> dict:
    return {"kind": kind, "event_id": eid, "order_id": oid, "type": etype, "occurred_at": at.isoformat(), **extra}


def drop(settings, name: str, records: list[dict]) -> None:
    folder = flow_inbox(settings, FLOW)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_text("\n".join(json.dumps(r) for r in records) + "\n")


def orders(db) -> dict[str, tuple[str, dict]]:
    with db.begin() as conn:
        return {d["order_id"]: (st, d) for st, d in conn.execute(sa.select(items.c.status, items.c.data).where(
            items.c.flow == FLOW, items.c.item_id.like("order-%")))}


def systems(orch_home):
    from orch_project.defs.orders.store import fulfilments, inventory_reservations, payment_transactions
    from orch_project.defs.resources import _embedded

    cdb = _embedded(orch_home.connectors_url).db
    with cdb.begin() as conn:
        tx = [dict(r) for r in conn.execute(sa.select(payment_transactions)).mappings()]
        ful = [dict(r) for r in conn.execute(sa.select(fulfilments)).mappings()]
        res = [dict(r) for r in conn.execute(sa.select(inventory_reservations)).mappings()]
    return cdb, tx, ful, res


def ship(orch_home, order_ids: list[str], status: str = "shipped") -> None:
    from orch_project.defs.orders.store import fulfilments

    cdb = systems(orch_home)[0]
    with cdb.begin() as conn:
        conn.execute(fulfilments.update().where(fulfilments.c.order_id.in_(order_ids),
                                                fulfilments.c.status == "requested").values(status=status))


def audit(db, orch_home) -> dict:
    from orch_project.defs.orders.invariants import audit as run
    from orch_project.defs.orders.logic import CFG

    return run(db, systems(orch_home)[0], CFG)


def test_saga_steps_events_and_compensations(orch_home, db, defs, instance, shop):
    s = orch_home
    gift_uid, card = next((u, k) for u in sorted(shop["users"]) for k, m in sorted(shop["users"][u]["payment_methods"].items())
                          if m["source"] == "gift_card" and m["balance"] < 30)
    over = min(p for p in shop["avail"] if p[0] > shop["users"][gift_uid]["payment_methods"][card]["balance"] + 5)
    recs = [order(shop, i) for i in range(6)]
    recs.append(order(shop, 6, uid=gift_uid, skus=[over[1]], payment_method_id=card))      # declined
    recs.append(order(shop, 7, skus=[shop["gone"][0]]))                                     # out of stock
    recs.append(order(shop, 8, skus=[shop["avail"][30][1], shop["gone"][1]]))               # split
    recs.append({**order(shop, 9), "user_id": "nobody_at_all_1"})                           # unknown customer
    drop(s, "orders.jsonl", recs)
    assert run_flow(defs, instance, DAY, FLOW).success
    st = orders(db)
    assert {o: st[f"#T{o:04d}"][0] for o in range(6)} == {o: "in_fulfilment" for o in range(6)}
    assert st["#T0006"][1]["outcome"] == "payment_declined" and st["#T0007"][1]["outcome"] == "out_of_stock"
    assert st["#T0008"][0] == "in_fulfilment" and len(st["#T0008"][1]["lines"]) == 1
    assert [x["sku"] for x in st["#T0008"][1]["dropped_lines"]] == [shop["gone"][1]]
    with db.begin() as conn:
        reasons = conn.execute(sa.select(dlq.c.reason).where(dlq.c.flow == FLOW)).scalars().all()
    assert any("customer: not in the shop's directory" in r for r in reasons)
    _, tx, ful, res = systems(s)
    declined = [t for t in tx if t["status"] == "declined"]
    assert len(declined) == 1 and "gift card balance" in declined[0]["reason"]
    # the declined order's reservation was released (its compensation), the short one holds nothing
    assert {r["order_id"]: r["status"] for r in res}["#T0006"] == "released"
    assert {r["order_id"]: r["status"] for r in res}["#T0007"] == "short"

    # the world: the warehouse ships 0-3; carriers report, one delivery before its shipment; customers ask
    ship(s, ["#T0000", "#T0001", "#T0002", "#T0003"])
    later = AT + timedelta(days=1)
    evs = [event("carrier", "shipped", "#T0000", "ev-e0s"), event("carrier", "shipped", "#T0000", "ev-e0s"),  # duplicate
           event("carrier", "delivered", "#T0001", "ev-e1d", later + timedelta(days=2)),               # before shipped
           event("carrier", "shipped", "#T0002", "ev-e2s"), event("carrier", "lost", "#T0002", "ev-e2l", later + timedelta(days=1)),
           event("request", "cancel", "#T0003", "ev-c3", reason="no longer needed"),                  # too late: shipped
           event("request", "cancel", "#T0004", "ev-c4", reason="ordered by mistake"),                # in time
           event("request", "cancel", "#T0005", "ev-c5", reason="changed my mind"),                   # not a policy reason
           event("request", "return", "#T0005", "ev-r5", item_ids=[recs[5]["items"][0]["item_id"]]),  # not delivered
           event("carrier", "teleported", "#T0005", "ev-bad1")]                                       # bad event
    drop(s, "events.jsonl", evs)
    assert run_flow(defs, instance, "2026-12-08", FLOW).success  # the events' partition (arrival day)
    assert run_ops(defs, instance, FLOW).success                  # advance: every partition's waiting orders
    st = orders(db)
    assert st["#T0000"][0] == "shipped" and st["#T0001"][0] == "delivered"
    assert st["#T0002"][1]["outcome"] == "lost_refunded"
    assert st["#T0003"][0] == "in_fulfilment" and "left the warehouse" in st["#T0003"][1]["refusals"][0]["rule"]
    assert st["#T0004"][1]["outcome"] == "cancelled"
    rules = " | ".join(x["rule"] for x in st["#T0005"][1]["refusals"])
    assert "needs one of the reasons" in rules and "only a delivered order can be returned" in rules
    _, tx, ful, res = systems(s)
    kinds = {(t["order_id"], t["kind"]): t["status"] for t in tx}
    assert kinds[("#T0000", "capture")] == "approved" and kinds[("#T0001", "capture")] == "approved"
    assert kinds[("#T0002", "refund")] == "approved"
    assert kinds[("#T0004", "authorize")] == "voided" and ("#T0004", "capture") not in kinds
    assert {f["order_id"]: f["status"] for f in ful}["#T0004"] == "cancelled"
    assert {r["order_id"]: r["status"] for r in res}["#T0004"] == "released"
    with db.begin() as conn:
        n_items = conn.execute(sa.select(sa.func.count()).select_from(items).where(items.c.flow == FLOW,
                                                                                   items.c.item_id.like("evt-%"))).scalar()
        bad = conn.execute(sa.select(dlq.c.reason).where(dlq.c.flow == FLOW, dlq.c.reason.like("%type is one of%"))).all()
    assert n_items == len(evs) - 2 and len(bad) == 1  # the duplicate is one event; the bad one is dead-lettered
    rep = audit(db, s)
    assert rep["violations"] == [] and rep["orders"] == 10

    # re-running the partitions and the ops job charges, refunds and ships nothing twice
    before = (len(tx), len(ful), len(res))
    with db.begin() as conn:
        n_effects = conn.execute(sa.select(sa.func.count()).select_from(outbox).where(outbox.c.flow == FLOW)).scalar()
    assert run_flow(defs, instance, DAY, FLOW).success and run_ops(defs, instance, FLOW).success
    _, tx, ful, res = systems(s)
    assert (len(tx), len(ful), len(res)) == before
    with db.begin() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(outbox).where(outbox.c.flow == FLOW)).scalar() == n_effects


def test_fraud_refuses_red_and_waits_for_a_person_on_grey(orch_home, db, defs, instance, shop):
    uid = shop["plain"][20]
    big = [p[1] for p in shop["avail"][-3:]]
    away = {"address1": "9 Nowhere Road", "address2": "", "city": "Reno", "state": "NV", "zip": "89501", "country": "USA"}
    recs = [order(shop, 20, uid=uid), order(shop, 21, uid=uid),
            order(shop, 22, uid=uid, skus=big, address=away),                 # velocity + new address, high: red
            order(shop, 23, skus=big[:1], address=away)]                      # new address, high amount: grey
    drop(orch_home, "fraud.jsonl", recs)
    assert run_flow(defs, instance, DAY, FLOW).success
    st = orders(db)
    assert st["#T0022"][1]["outcome"] == "refused" and any("velocity" in r for r in st["#T0022"][1]["fraud"]["rules"])
    assert st["#T0023"][0] == "awaiting_review"
    _, tx, _, res = systems(orch_home)
    assert not [t for t in tx if t["order_id"] in ("#T0022", "#T0023")]  # nothing held before a decision


def test_payment_outage_failed_for_good_compensates_the_reservation(orch_home, db, defs, instance, shop, monkeypatch):
    from orch_project.defs.orders.logic import CFG
    from orch_project.defs.resources import _embedded
    from orch_project.lib.connectors.policy import BreakerPolicy, ConnectorPolicy

    # two attempts and a breaker that stays closed: the step fails for good on the second run
    monkeypatch.setitem(CFG.__dict__, "connector_policy", ConnectorPolicy(
        circuit_breaker=BreakerPolicy(failure_threshold=100, cooldown_s=1.0, half_open_probes=1), max_attempts=2))
    client = _embedded(orch_home.connectors_url)
    client.set_fault("payment_provider", mode="raise")
    drop(orch_home, "o.jsonl", [order(shop, 30)])
    for _ in range(3):  # each run tries again
        run_flow(defs, instance, DAY, FLOW)
        if orders(db)["#T0030"][0] == "dead_lettered":
            break
    client.clear_fault("payment_provider")
    st, d = orders(db)["#T0030"]
    assert st == "dead_lettered" and "compensate_reserve" in d["saga"]["undone"]
    _, tx, _, res = systems(orch_home)
    assert {r["order_id"]: r["status"] for r in res}["#T0030"] == "released" and not tx
    # the provider is back: the failed authorisation is out of delivery, nothing is charged behind the DLQ's back
    assert run_ops(defs, instance, FLOW).success
    assert not systems(orch_home)[1] and orders(db)["#T0030"][0] == "dead_lettered"
    # a replay starts the saga again at the reservation (a new one: the first was released) and goes through
    from orch_project.lib import dlq as dlq_lib

    with db.begin() as conn:
        row = conn.execute(sa.select(dlq.c.id, dlq.c.stage).where(dlq.c.item_id == "order-T0030")).one()
    assert row.stage == "reserve"
    dlq_lib.replay(db, row.id, actor="test")
    assert run_flow(defs, instance, DAY, FLOW).success
    assert orders(db)["#T0030"][0] == "in_fulfilment"
    _, tx, _, res = systems(orch_home)
    assert sorted(r["status"] for r in res if r["order_id"] == "#T0030") == ["released", "reserved"]
    assert [t["status"] for t in tx if t["order_id"] == "#T0030"] == ["approved"]
    assert audit(db, orch_home)["violations"] == []



def test_late_payment_answers_and_timeouts_wait_without_a_held_run(orch_home, db, defs, instance, shop, monkeypatch):
    from orch_project.defs.orders.logic import CFG
    from orch_project.defs.orders.store import ensure_tables, payment_simulation, provider_answers

    cdb = systems(orch_home)[0]
    recs = [order(shop, 40 + i) for i in range(4)]
    with cdb.begin() as conn:
        ensure_tables(conn)
        conn.execute(payment_simulation.insert(), [
            {"method_id": recs[0]["payment_method_id"], "mode": "late", "remaining": None, "reason": ""},
            {"method_id": recs[1]["payment_method_id"], "mode": "late", "remaining": None, "reason": ""},
            {"method_id": recs[2]["payment_method_id"], "mode": "late", "remaining": None, "reason": ""},
            {"method_id": recs[3]["payment_method_id"], "mode": "timeout", "remaining": 1, "reason": ""}])
    drop(orch_home, "late.jsonl", recs)
    assert run_flow(defs, instance, DAY, FLOW).success
    st = orders(db)
    assert [st[f"#T{40 + i:04d}"][0] for i in range(4)] == ["reserved"] * 4
    with cdb.begin() as conn:  # the provider decides two of the late ones; the third never answers
        provider_answers(conn, ["#T0040"], approve=True)
        provider_answers(conn, ["#T0041"], approve=False)
    assert run_ops(defs, instance, FLOW).success  # the ops job moves waiting orders on, every partition
    st = orders(db)
    assert st["#T0040"][0] == "in_fulfilment" and st["#T0041"][1]["outcome"] == "payment_declined"
    assert st["#T0043"][0] == "in_fulfilment"  # the timed-out call was answered on its retry
    assert st["#T0042"][0] == "reserved"
    monkeypatch.setattr(CFG.settings, "authorization_timeout_hours", 1e-6)  # the deadline passes
    assert run_ops(defs, instance, FLOW).success
    st, d = orders(db)["#T0042"]
    assert st == "resolved" and d["outcome"] == "payment_timeout"
    _, tx, _, res = systems(orch_home)
    assert {t["order_id"]: t["status"] for t in tx if t["kind"] == "authorize"}["#T0042"] == "voided"
    assert {r["order_id"]: r["status"] for r in res}["#T0042"] == "released"
    assert audit(db, orch_home)["violations"] == []


def test_drills_sigkill_mid_compensation_race_and_duplicate_events(tmp_path):
    """benchmarks/drill_orders.py as a user runs it: a SIGKILL between the voids and the releases re-executed from
    failure, cancels racing a carrier, every event twice and out of order -- nothing lost, charged or refunded
    twice, no invariant broken."""
    import subprocess
    import sys
    from pathlib import Path

    require_dataset("retail")
    repo = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, str(repo / "benchmarks" / "drill_orders.py"), "--drill",
                          "sigkill,race,duplicates", "--orders", "40"], capture_output=True, text=True, timeout=600,
                         cwd=repo)
    assert out.returncode == 0, out.stderr[-3000:]
    res = {r["drill"]: r for r in json.loads(out.stdout.strip().splitlines()[-1])["drills"]}
    for r in res.values():
        assert (r["lost"], r["duplicate_effects"], r["invariant_violations"]) == (0, 0, 0), r
    assert res["sigkill"]["killed_mid_compensation"] and res["sigkill"]["outcomes"] == {"cancelled": 40}
    assert res["sigkill"]["reexecution"]["success"]
    assert res["race"]["cancelled"] + res["race"]["carrier_took"] == 40 and res["race"]["cancelled_and_shipped"] == 0
    assert res["duplicates"]["duplicates_ignored"] == 80 and res["duplicates"]["captures"] == 40


def test_requests_modify_payment_items_and_exchange_through_the_cli(orch_home, db, defs, instance, shop):
    """`orch orders request` queues requests; each is applied once by the store's policy: a new payment method
    (old authorisation voided), other options of the same product (new reservation and amount, the old parcel
    stopped and a new one sent), an exchange after delivery (replacement ships when the return arrives)."""
    from click.testing import CliRunner

    from orch_project.cli import main
    from orch_project.defs.orders.store import directory

    users, products = shop["users"], directory()
    multi = [u for u in shop["plain"] if len(shop["users"][u]["payment_methods"]) >= 2][:1]
    sku_a = shop["avail"][40][1]
    pid = products.variants[sku_a]["product_id"]
    other = next(sku for sku in products.products[pid]["variants"] if sku != sku_a and products.variants[sku]["available"])
    recs = [order(shop, 50, uid=multi[0]), order(shop, 51, skus=[sku_a]), order(shop, 52, skus=[sku_a])]
    drop(orch_home, "mods.jsonl", recs)
    assert run_flow(defs, instance, DAY, FLOW).success
    new_method = sorted(users[multi[0]]["payment_methods"])[1]
    reqs = [{"request_id": "p1", "order_id": "#T0050", "action": "modify_payment", "payment_method_id": new_method},
            {"request_id": "i1", "order_id": "#T0051", "action": "modify_items", "item_ids": [sku_a],
             "new_item_ids": [other]},
            {"request_id": "i2", "order_id": "#T0051", "action": "modify_items", "item_ids": [other],
             "new_item_ids": [sku_a]},                                              # a second change is refused
            {"request_id": "x0", "order_id": "#T0052", "action": "teleport"}]         # refused by the command
    f = orch_home.home / "requests.jsonl"
    f.write_text("\n".join(json.dumps(r) for r in reqs) + "\n")
    out = CliRunner().invoke(main, ["orders", "request", str(f)])
    assert out.exit_code == 0 and "3 request(s) queued" in out.output and "teleport" in out.output
    assert run_flow(defs, instance, datetime.now(timezone.utc).date().isoformat(), FLOW).success
    assert run_ops(defs, instance, FLOW).success
    st = orders(db)
    d50, d51 = st["#T0050"][1], st["#T0051"][1]
    assert d50["method_id"] == new_method and st["#T0050"][0] == "in_fulfilment"
    assert d51["lines"][0]["sku"] == other and d51["items_modified"]
    assert any("modified once" in x["rule"] for x in d51["refusals"])
    _, tx, ful, res = systems(orch_home)
    auths = [(t["method_id"], t["status"]) for t in tx if t["order_id"] == "#T0050" and t["kind"] == "authorize"]
    assert sorted(s for _, s in auths) == ["approved", "voided"] and (new_method, "approved") in auths
    assert sorted(f["status"] for f in ful if f["order_id"] == "#T0051") == ["cancelled", "requested"]
    assert sorted(r["status"] for r in res if r["order_id"] == "#T0051") == ["released", "reserved"]

    # #T0052 is delivered, then exchanged for the other option; the replacement ships when the return arrives
    ship(orch_home, ["#T0050", "#T0051", "#T0052"])
    day = datetime.now(timezone.utc)
    drop(orch_home, "carrier.jsonl", [event("carrier", "delivered", o, f"ev-d{o[-2:]}", day - timedelta(days=1))
                                      for o in ("#T0050", "#T0051", "#T0052")])
    assert run_flow(defs, instance, day.date().isoformat(), FLOW).success and run_ops(defs, instance, FLOW).success
    f.write_text(json.dumps({"request_id": "e1", "order_id": "#T0052", "action": "exchange", "item_ids": [sku_a],
                             "new_item_ids": [other]}) + "\n")
    assert CliRunner().invoke(main, ["orders", "request", str(f)]).exit_code == 0
    assert run_flow(defs, instance, day.date().isoformat(), FLOW).success and run_ops(defs, instance, FLOW).success
    assert orders(db)["#T0052"][0] == "exchange_requested"
    drop(orch_home, "back.jsonl", [event("carrier", "returned", "#T0052", "ev-back52", day)])
    assert run_flow(defs, instance, day.date().isoformat(), FLOW).success and run_ops(defs, instance, FLOW).success
    st52, d52 = orders(db)["#T0052"]
    assert st52 == "in_fulfilment" and d52["lines"][0]["sku"] == other
    _, tx, ful, _ = systems(orch_home)
    assert len([f for f in ful if f["order_id"] == "#T0052"]) == 2  # the original parcel and the replacement
    price_a, price_b = products.variants[sku_a]["price"], products.variants[other]["price"]
    refunds = sum(t["amount"] for t in tx if t["order_id"] == "#T0052" and t["kind"] == "refund")
    assert refunds == pytest.approx(max(price_a - price_b, 0.0))
    assert audit(db, orch_home)["violations"] == []
    # the replacement is a round of its own: it cannot be cancelled, and nothing of the first round is undone
    f.write_text(json.dumps({"request_id": "c52", "order_id": "#T0052", "action": "cancel",
                             "reason": "no longer needed"}) + "\n")
    assert CliRunner().invoke(main, ["orders", "request", str(f)]).exit_code == 0
    assert run_flow(defs, instance, day.date().isoformat(), FLOW).success and run_ops(defs, instance, FLOW).success
    st52, d52 = orders(db)["#T0052"]
    assert st52 == "in_fulfilment" and "replacement cannot be cancelled" in d52["refusals"][-1]["rule"]
    assert d52["round_start"] > 0 and not d52["saga"]["undone"]


RULES = [  # (status, event fields, rule the refusal names)
    ("in_fulfilment", {"type": "cancel", "reason": "too slow"}, "needs one of the reasons"),
    ("shipped", {"type": "cancel", "reason": "no longer needed"}, "only a pending order can be cancelled"),
    ("shipped", {"type": "modify_address"}, "only change before it ships"),
    ("in_fulfilment", {"type": "modify_payment", "method_id": "METHOD"}, "must differ from the original"),
    ("in_fulfilment", {"type": "modify_payment", "method_id": "credit_card_0000001"}, "not one of the customer's"),
    ("shipped", {"type": "modify_items", "item_ids": ["SKU"], "new_item_ids": ["OTHER"]}, "only a pending order"),
    ("in_fulfilment", {"type": "modify_items", "item_ids": ["SKU"], "new_item_ids": ["SKU"]}, "a different option"),
    ("in_fulfilment", {"type": "modify_items", "item_ids": ["SKU"], "new_item_ids": ["ELSEWHERE"]},
     "another option of the same product"),
    ("in_fulfilment", {"type": "modify_items", "item_ids": ["NOT_MINE"], "new_item_ids": ["OTHER"]},
     "only items of this order"),
    ("in_fulfilment", {"type": "return", "item_ids": ["SKU"]}, "only a delivered order can be returned"),
    ("delivered", {"type": "return", "item_ids": ["NOT_MINE"]}, "items of this order only"),
    ("delivered", {"type": "return", "item_ids": ["SKU"], "method_id": "CARD2"}, "original payment method or one"),
    ("delivered_long_ago", {"type": "return", "item_ids": ["SKU"]}, "within 30 days of delivery"),
    ("in_fulfilment", {"type": "exchange", "item_ids": ["SKU"], "new_item_ids": ["OTHER"]},
     "only a delivered order can be exchanged"),
    ("delivered_long_ago", {"type": "exchange", "item_ids": ["SKU"], "new_item_ids": ["OTHER"]}, "within 30 days"),
]


@pytest.mark.parametrize("status,fields,rule", RULES, ids=[f"{r[1]['type']}-{i}" for i, r in enumerate(RULES)])
def test_each_policy_rule_refuses_with_its_reason(shop, status, fields, rule):
    """Every rule of the store's policy, one request each: the settle step refuses it with the rule's words,
    sends the customer one notice and changes nothing else."""
    from orch_project.defs.orders import saga
    from orch_project.defs.orders.logic import CFG
    from orch_project.defs.orders.store import directory

    shop_dir = directory()
    uid = next(u for u in shop["plain"] if len(shop["users"][u]["payment_methods"]) >= 2
               and any(m["source"] == "credit_card" for m in shop["users"][u]["payment_methods"].values()))
    from orch_project.lib.guardrails.pii import customer_ref
    from orch_project.lib.settings import Settings

    ref = customer_ref(uid, Settings.from_env().pii_salt)
    methods = sorted(shop["users"][uid]["payment_methods"])
    card2 = next(m for m in methods[1:] if shop["users"][uid]["payment_methods"][m]["source"] != "gift_card")
    sku = shop["avail"][40][1]
    pid = shop_dir.variants[sku]["product_id"]
    other = next(s for s in shop_dir.products[pid]["variants"] if s != sku and shop_dir.variants[s]["available"])
    elsewhere = next(s for s, v in shop_dir.variants.items() if v["product_id"] != pid and v["available"])
    sub = {"SKU": sku, "OTHER": other, "ELSEWHERE": elsewhere, "NOT_MINE": elsewhere, "METHOD": methods[0],
           "CARD2": card2}
    now = datetime.now(timezone.utc)
    delivered = now - timedelta(days=40 if status == "delivered_long_ago" else 1)
    data = {"order_id": "#R1", "customer_ref": ref, "customer_token": "tok_x", "method_id": methods[0],
            "amount": 10.0, "lines": [{"sku": sku, "qty": 1, "product_id": pid, "name": "x", "price": 10.0}],
            "delivered_at": delivered.isoformat(), "saga": {"done": [["fulfil", "orders:order-R1:fulfil"]],
                                                             "events": [], "undone": []}}
    ev = {"kind": "event", "source": "request", "event_id": "ev-r1", "item_id": "evt-R1-abcdef012345",
          "order_id": "#R1", "occurred_at": now.isoformat(),
          **{k: ([sub.get(x, x) for x in v] if isinstance(v, list) else sub.get(v, v)) for k, v in fields.items()}}
    row = {"item_id": "order-R1", "trace_id": "t", "status": status.replace("_long_ago", ""), "data": data}
    facts = {"fulfilment": {"status": "shipped" if status == "shipped" else "requested"}, "records": {}}
    move = saga.next_move(row, [ev], facts, now, CFG, shop_dir)
    assert move is not None and move.event == "ev-r1"
    actions = [e.action for e in move.effects]  # the customer's notice; a change also withdraws what it might
    assert actions[-1] == "send_message" and set(actions[:-1]) <= {"release", "void"}  # have created, nothing else
    d = dict(data)
    assert move.apply(d) == row["status"]
    assert rule in d["refusals"][0]["rule"], d["refusals"]


def test_orders_on_postgresql_app_and_connector_databases(orch_home, defs, instance, shop, monkeypatch, pg_database):
    """The production path: the app database and the store's systems on PostgreSQL; placing, a cancel in time,
    a cancel after the parcel left, a duplicate event and a re-run, with the invariants holding."""
    from .conftest import postgres_url
    from orch_project.defs.orders.invariants import audit as run_audit
    from orch_project.defs.orders.logic import CFG
    from orch_project.defs.orders.store import carrier_moves, fulfilments, payment_transactions
    from orch_project.defs.resources import _embedded, reset_process_caches
    from orch_project.lib.store import Database

    app, conns = postgres_url(pg_database("orch_orders")), postgres_url(pg_database("orch_conn"))
    monkeypatch.setenv("ORCH_DATABASE_URL", app)
    monkeypatch.setenv("ORCH_CONNECTORS_URL", conns)
    reset_process_caches()
    db, cdb = Database(app), _embedded(conns).db
    assert db.dialect == "postgresql"
    drop(orch_home, "pg.jsonl", [order(shop, 60 + i) for i in range(4)])
    assert run_flow(defs, instance, DAY, FLOW).success
    with cdb.begin() as conn:
        carrier_moves(conn, ["#T0061"], "shipped")
    evs = [event("request", "cancel", "#T0060", "ev-pg60", reason="no longer needed"),
           event("request", "cancel", "#T0061", "ev-pg61", reason="no longer needed"),
           event("carrier", "shipped", "#T0061", "ev-pg61s"), event("carrier", "shipped", "#T0061", "ev-pg61s")]
    drop(orch_home, "pg-events.jsonl", evs)
    today = datetime.now(timezone.utc).date().isoformat()
    for _ in range(2):  # the second time changes nothing
        assert run_flow(defs, instance, today, FLOW).success and run_ops(defs, instance, FLOW).success
    st = orders(db)
    assert st["#T0060"][1]["outcome"] == "cancelled" and st["#T0061"][0] == "shipped"
    with cdb.begin() as conn:
        tx = conn.execute(sa.select(payment_transactions.c.order_id, payment_transactions.c.kind,
                                    payment_transactions.c.status)).all()
        ful = dict(conn.execute(sa.select(fulfilments.c.order_id, fulfilments.c.status)).all())
    assert ("#T0060", "authorize", "voided") in tx and ("#T0061", "capture", "approved") in tx
    assert sum(1 for o, k, _ in tx if k == "capture") == 1
    assert ful["#T0060"] == "cancelled" and ful["#T0061"] == "shipped"
    assert run_audit(db, cdb, CFG)["violations"] == []


def test_a_parcel_back_to_the_sender_is_refunded_and_restocked(orch_home, db, defs, instance, shop):
    drop(orch_home, "rts.jsonl", [order(shop, 70)])
    assert run_flow(defs, instance, DAY, FLOW).success
    ship(orch_home, ["#T0070"])
    drop(orch_home, "rts-events.jsonl", [event("carrier", "shipped", "#T0070", "ev-rts-s"),
                                         event("carrier", "returned", "#T0070", "ev-rts-r", AT + timedelta(days=4))])
    assert run_flow(defs, instance, datetime.now(timezone.utc).date().isoformat(), FLOW).success
    assert run_ops(defs, instance, FLOW).success
    st, d = orders(db)["#T0070"]
    assert st == "resolved" and d["outcome"] == "returned_to_sender"
    _, tx, _, res = systems(orch_home)
    kinds = sorted(t["kind"] for t in tx if t["order_id"] == "#T0070")
    assert kinds == ["authorize", "capture", "refund"] and {r["order_id"]: r["status"] for r in res}["#T0070"] == "restocked"
    assert audit(db, orch_home)["violations"] == []
