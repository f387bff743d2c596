"""The order flow's throughput and its invariants at volume, on the embedded default.

    .venv/bin/python benchmarks/orders.py [--orders 5000]

1. place: ``--orders`` new orders by the store's customers ($ORCH_DATA_DIR/retail; catalogue variants in stock,
   the customer's own address and payment method) in one JSON-lines file in the orders inbox of a fresh
   ORCH_HOME, then one ``orders_flow_job`` run of its partition in process on a Dagster test instance (intake,
   validate, fraud, reserve, authorize, fulfil, settle). Orders/s over the whole run.
2. settle: the warehouse ships every parcel and the carrier reports shipped and delivered (two events an
   order, into the inbox table), then one run of the events' partition and the ops job (advance: capture,
   commit the stock, delivery notices). Orders/s over both.

A warm-up run of 20 orders on another day loads everything a running code server has loaded (Great
Expectations, the shop's directory) before the clock starts. The generated orders come from a few hundred
customers in one day, so the benchmark lifts the brief's velocity rule (``velocity_orders``) out of the way: a
person would otherwise review most of them. The stock is set high first (every variant 1,000,000 units) so the figure measures the flow, not the store
running out. Lost (received != accounted), duplicate effects (a system record twice under one order) and
invariant violations (``orch orders audit``) are counted at the end. Progress goes to stderr; the last line on
stdout is one JSON object.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

QUIET = {"loggers": {"console": {"config": {"log_level": "ERROR"}}}}


def say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def generate(n: int, seed: int = 7, day: datetime = datetime(2026, 12, 1, tzinfo=timezone.utc),
             prefix: str = "B") -> list[dict]:
    from orch_project.lib import datasets

    root = datasets.dataset_dir("retail")
    users = json.loads((root / "users.json").read_text())
    products = json.loads((root / "products.json").read_text())
    avail = sorted(sku for p in products.values() for sku, v in p["variants"].items() if v["available"])
    uids = sorted(u for u in users if not any(m["source"] == "gift_card" for m in users[u]["payment_methods"].values()))
    rng = random.Random(seed)
    at = day
    out = []
    for i in range(n):
        uid = rng.choice(uids)
        u = users[uid]
        out.append({"kind": "order", "order_id": f"#{prefix}{i:07d}", "user_id": uid, "address": u["address"],
                    "items": [{"item_id": s, "quantity": 1} for s in rng.sample(avail, rng.choice((1, 1, 2)))],
                    "payment_method_id": sorted(u["payment_methods"])[0],
                    "created_at": (at + timedelta(seconds=i * 17 % 86000)).isoformat()})
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--orders", type=int, default=5000)
    args = ap.parse_args(argv)
    from flow_process import work_env

    with tempfile.TemporaryDirectory() as tmp:
        work_env(Path(tmp) / "orch", DAGSTER_HOME=str(Path(tmp) / "dagster"))
        (Path(tmp) / "dagster").mkdir()
        return run(args)


def run(args) -> int:
    import dagster as dg
    import sqlalchemy as sa

    from orch_project.defs.orders import store as st
    from orch_project.defs.orders.flow import SPEC
    from orch_project.defs.orders.invariants import audit
    from orch_project.defs.orders.logic import CFG
    from orch_project.defs.resources import _embedded, reset_process_caches
    from orch_project.definitions import defs
    from orch_project.lib.intake import submit_to_table
    from orch_project.lib.pipeline import status_counts
    from orch_project.lib.settings import Settings
    from orch_project.lib.store import Database

    reset_process_caches()
    s = Settings.from_env().ensure_dirs()
    db = Database(s.database_url)
    cdb = _embedded(s.connectors_url).db
    recs = generate(args.orders)
    warm = generate(20, seed=8, day=datetime(2026, 11, 20, tzinfo=timezone.utc), prefix="W")
    CFG.settings.fraud.velocity_orders = 10**9
    now = datetime.now(timezone.utc)
    with cdb.begin() as conn:
        st.ensure_tables(conn)
        conn.execute(st.inventory_stock.insert(), [{"sku": sku, "on_hand": 1_000_000, "reserved": 0, "updated_at": now}
                                                   for sku in st.directory().variants])
    folder = SPEC.inbox_dir(s.inbox_dir)
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "warm.jsonl").write_text("\n".join(json.dumps(r) for r in warm) + "\n")
    day = recs[0]["created_at"][:10]
    flow_job, ops_job = defs.resolve_job_def("orders_flow_job"), defs.resolve_job_def("orders_ops_job")
    with dg.instance_for_test() as inst:
        say("warm-up: 20 orders on 2026-11-20 ...")
        flow_job.execute_in_process(instance=inst, partition_key="2026-11-20", run_config=QUIET, raise_on_error=False)
        (folder / "bench.jsonl").write_text("\n".join(json.dumps(r) for r in recs) + "\n")
        say(f"placing {len(recs)} orders (one orders_flow_job run, partition {day}) ...")
        t0 = time.perf_counter()
        res = flow_job.execute_in_process(instance=inst, partition_key=day, run_config=QUIET, raise_on_error=False)
        place_s = time.perf_counter() - t0
        say(f"  {'ok' if res.success else 'FAILED'} in {place_s:.1f} s: {len(recs) / place_s:.0f} orders/s")
        with cdb.begin() as conn:
            rows = conn.execute(sa.select(st.fulfilments.c.id, st.fulfilments.c.order_id, st.fulfilments.c.tracking_id)
                                .where(st.fulfilments.c.order_id.like("#B%"))).all()
            conn.execute(st.fulfilments.update().values(status="delivered"))
        events = []
        for _, oid, trk in rows:
            for k, (etype, h) in enumerate((("shipped", 20), ("delivered", 70))):
                events.append({"kind": "carrier", "id": f"{trk}-{etype}", "event_id": f"{trk}-{etype}", "order_id": oid,
                               "type": etype, "occurred_at": (now - timedelta(hours=100 - h)).isoformat(),
                               "tracking_id": trk})
        submit_to_table(db, "orders", events, submitted_by="benchmark")
        say(f"settling: {len(events)} carrier events, one run of today's partition and the ops job ...")
        t0 = time.perf_counter()
        r2 = flow_job.execute_in_process(instance=inst, partition_key=now.date().isoformat(), run_config=QUIET,
                                         raise_on_error=False)
        r3 = ops_job.execute_in_process(instance=inst, run_config=QUIET, raise_on_error=False)
        settle_s = time.perf_counter() - t0
        say(f"  {'ok' if r2.success and r3.success else 'FAILED'} in {settle_s:.1f} s: "
            f"{len(rows) / settle_s:.0f} orders/s")
    counts = status_counts(db, "orders")
    rep = audit(db, cdb, CFG)
    with cdb.begin() as conn:
        dup = 0
        for t, cols in ((st.payment_transactions, ("item_id", "kind", "ref_key")), (st.fulfilments, ("item_id",))):
            q = sa.select(*[t.c[c] for c in cols], sa.func.count()).group_by(*[t.c[c] for c in cols]).having(
                sa.func.count() > 1)
            if t is st.payment_transactions:
                q = q.where(t.c.kind != "refund")
            dup += len(conn.execute(q).all())
    out = {"benchmark": "orders", "orders": len(recs), "shipped": len(rows), "events": len(events), "items": counts["received"],
           "place_s": round(place_s, 2), "place_orders_per_s": round(len(recs) / place_s, 1),
           "settle_s": round(settle_s, 2), "settle_orders_per_s": round(len(rows) / settle_s, 1),
           "states": counts["states"], "lost": counts["lost"], "duplicate_effects": dup,
           "invariant_violations": len(rep["violations"]), "captured": rep["captured"],
           "runs_ok": bool(res.success and r2.success and r3.success)}
    print(json.dumps(out))
    return 0 if out["runs_ok"] and not out["lost"] and not dup and not rep["violations"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
