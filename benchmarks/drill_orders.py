"""Failure drills of the order saga: the flow must never lose an order, charge or refund twice, or break an
invariant (``orch orders audit``), whatever the payment provider, the warehouse, the process or the carriers do.

    .venv/bin/python benchmarks/drill_orders.py [--drill payments|warehouse|sigkill|race|duplicates|all] [--orders N]

- ``payments``: the provider declines 20 % of the payment methods, times out on the first call of another 10 %
  and answers 10 % late (half approved, half declined after the first run, the rest never: their authorisation
  is withdrawn at the deadline);
- ``warehouse``: the warehouse is down while the flow run sends the fulfilments (the orders wait at
  ``authorized``), then comes back and the ops job sends them;
- ``sigkill``: every order is cancelled by its customer; the ops job that compensates (stop the parcel, void
  the payment, release the stock) is SIGKILLed between the voids and the releases (the inventory made slow so
  the kill lands there), then re-executed from failure;
- ``race``: every order is cancelled while a carrier picks up a random half of the parcels at the same moment;
  each order ends either cancelled (parcel stopped, payment voided, stock released) or shipped (cancel refused,
  payment captured), never both;
- ``duplicates``: every carrier event is delivered twice (another delivery id) and the two batches arrive out of
  order (deliveries before shipments).

Every drill ends with the carriers shipping and delivering what is still out, so captures are checked too.
Progress goes to stderr; each drill prints one JSON line ``{"drill", "items", "lost", "duplicate_effects",
"invariant_violations", ...}``; the last line on stdout is the JSON of all drills run. Exit 1 if any figure is
not 0.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import tempfile
import time
import warnings
from datetime import datetime, timedelta, timezone
from pathlib import Path

warnings.filterwarnings("ignore")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent))

import flow_process as fp  # noqa: E402
from orders import generate  # noqa: E402

QUIET = fp.QUIET
DAY = "2026-12-01"


class World:
    """A fresh work dir with the store's stock set high, the jobs, and the figures."""

    def __init__(self, work: Path, n: int, seed: int):
        import dagster as dg
        import sqlalchemy as sa

        fp.drill_env(work)
        from orch_project.defs.orders import store as st
        from orch_project.defs.orders.logic import CFG
        from orch_project.defs.resources import _embedded
        from orch_project.definitions import defs
        from orch_project.lib.settings import Settings
        from orch_project.lib.store import Database, migrate

        self.sa, self.st, self.cfg = sa, st, CFG
        self.s = Settings.from_env().ensure_dirs()
        migrate(self.s.database_url)
        self.db = Database(self.s.database_url)
        self.client = _embedded(self.s.connectors_url)
        self.cdb = self.client.db
        self.defs = defs
        self.instance = dg.DagsterInstance.get()
        self.rng = random.Random(seed)
        CFG.settings.fraud.velocity_orders = 10**9  # generated orders: a few hundred customers in one day
        self.orders = generate(n, seed=seed)
        now = datetime.now(timezone.utc)
        with self.cdb.begin() as conn:
            st.ensure_tables(conn)
            conn.execute(st.inventory_stock.insert(), [{"sku": k, "on_hand": 1_000_000, "reserved": 0, "updated_at": now}
                                                       for k in st.directory().variants])
        from orch_project.defs.orders.flow import SPEC

        folder = SPEC.inbox_dir(self.s.inbox_dir)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "drill.jsonl").write_text("\n".join(json.dumps(r) for r in self.orders) + "\n")

    def flow(self, day: str = DAY) -> bool:
        job = self.defs.resolve_job_def("orders_flow_job")
        return job.execute_in_process(instance=self.instance, partition_key=day, run_config=QUIET,
                                      raise_on_error=False).success

    def ops(self) -> bool:
        return self.defs.resolve_job_def("orders_ops_job").execute_in_process(
            instance=self.instance, run_config=QUIET, raise_on_error=False).success

    def events(self, evs: list[dict]) -> None:
        from orch_project.lib.intake import submit_to_table

        submit_to_table(self.db, "orders", evs, submitted_by="drill")

    def states(self) -> dict[str, tuple[str, dict]]:
        from orch_project.lib.store import items

        with self.db.begin() as conn:
            return {d["order_id"]: (s, d) for s, d in conn.execute(self.sa.select(items.c.status, items.c.data).where(
                items.c.flow == "orders", items.c.item_id.like("order-%")))}

    def carriers_finish(self) -> None:
        """Carriers take every parcel still requested and deliver it; the flow hears of it; deadlines pass."""
        st = self.st
        with self.cdb.begin() as conn:
            out = conn.execute(self.sa.select(st.fulfilments.c.order_id, st.fulfilments.c.tracking_id,
                                              st.fulfilments.c.status)).all()
            st.carrier_moves(conn, [o for o, _, s in out if s == "requested"], "shipped")
            st.carrier_moves(conn, [o for o, _, s in out], "delivered")
        now = datetime.now(timezone.utc)
        evs = []
        for oid, trk, status in out:
            if status in ("requested", "shipped"):
                evs += [{"kind": "carrier", "id": f"{trk}-s", "event_id": f"{trk}-shipped", "order_id": oid,
                         "type": "shipped", "occurred_at": (now - timedelta(hours=2)).isoformat()},
                        {"kind": "carrier", "id": f"{trk}-d", "event_id": f"{trk}-delivered", "order_id": oid,
                         "type": "delivered", "occurred_at": (now - timedelta(hours=1)).isoformat()}]
        self.events(evs)
        self.flow(now.date().isoformat())
        self.ops()

    def figures(self, name: str, **extra) -> dict:
        from orch_project.defs.orders.invariants import audit
        from orch_project.lib.pipeline import status_counts

        counts = status_counts(self.db, "orders")
        rep = audit(self.db, self.cdb, self.cfg)
        dups = self.client.duplicates()
        orders = self.states()
        outcome = {}
        for s, d in orders.values():
            k = d.get("outcome") or s
            outcome[k] = outcome.get(k, 0) + 1
        return {"drill": name, "items": len(self.orders), "orders_in_flow": len(orders), "lost": counts["lost"]
                + (len(self.orders) - len(orders)), "duplicate_effects": sum(dups.values()),
                "invariant_violations": len(rep["violations"]), "violations": rep["violations"][:5],
                "outcomes": outcome, "captured": rep["captured"], "refunded": rep["refunded"], **extra}


def drill_payments(w: World) -> dict:
    from orch_project.defs.orders.store import payment_simulation, provider_answers

    methods = sorted({o["payment_method_id"] for o in w.orders})
    w.rng.shuffle(methods)
    k = len(methods)
    decline, timeout, late = methods[: k // 5], methods[k // 5: k * 3 // 10], methods[k * 3 // 10: k * 4 // 10]
    with w.cdb.begin() as conn:
        conn.execute(payment_simulation.insert(), [{"method_id": m, "mode": "decline", "remaining": None,
                                                    "reason": "insufficient funds"} for m in decline]
                     + [{"method_id": m, "mode": "timeout", "remaining": 1, "reason": ""} for m in timeout]
                     + [{"method_id": m, "mode": "late", "remaining": None, "reason": ""} for m in late])
    fp.say(f"payments: {len(decline)} declining, {len(timeout)} timing out once, {len(late)} answering late")
    ok = w.flow()
    late_orders = sorted(o["order_id"] for o in w.orders if o["payment_method_id"] in set(late))
    with w.cdb.begin() as conn:
        provider_answers(conn, late_orders[: len(late_orders) // 3], approve=True)
        provider_answers(conn, late_orders[len(late_orders) // 3: 2 * len(late_orders) // 3], approve=False)
    ok = w.ops() and ok
    w.cfg.settings.authorization_timeout_hours = 1e-6  # the deadline passes for the rest
    ok = w.ops() and ok
    w.cfg.settings.authorization_timeout_hours = 24
    w.carriers_finish()
    return w.figures("payments", runs_ok=ok)


def drill_warehouse(w: World) -> dict:
    from orch_project.lib.connectors.policy import BreakerPolicy, ConnectorPolicy

    w.cfg.__dict__["connector_policy"] = ConnectorPolicy(
        circuit_breaker=BreakerPolicy(failure_threshold=3, cooldown_s=0.5, half_open_probes=1), max_attempts=6)
    w.client.set_fault("warehouse", mode="raise")
    ok = w.flow()
    waiting = sum(1 for s, _ in w.states().values() if s == "authorized")
    fp.say(f"warehouse down during the run: {waiting} orders wait at authorized")
    w.client.clear_fault("warehouse")
    time.sleep(0.6)  # the breaker's cool-down
    ok = w.ops() and ok
    sent = sum(1 for s, _ in w.states().values() if s == "in_fulfilment")
    w.carriers_finish()
    w.cfg.__dict__.pop("connector_policy", None)
    return w.figures("warehouse", runs_ok=ok, waiting_during_outage=waiting, sent_after_recovery=sent)


def _cancel_all(w: World) -> None:
    now = datetime.now(timezone.utc)
    w.events([{"kind": "request", "id": f"cx-{o['order_id']}", "event_id": f"cancel-{o['order_id']}",
               "order_id": o["order_id"], "type": "cancel", "reason": "no longer needed",
               "occurred_at": now.isoformat()} for o in w.orders])
    w.flow(now.date().isoformat())  # the requests recorded (the orders' settle runs in the ops job)


def drill_sigkill(w: World, work: Path) -> dict:
    from orch_project.defs.orders.store import payment_transactions

    ok = w.flow()
    _cancel_all(w)
    # the inventory answers its next call after 4 s: the voids are delivered, the releases hang
    w.client.set_fault("inventory", mode="hang", remaining=1, hang_s=4.0)
    proc = fp.start_child(["run", "--job", "orders_ops_job"], work / "child.log")
    sa = w.sa

    def voided() -> int:
        with w.cdb.begin() as conn:
            return conn.execute(sa.select(sa.func.count()).select_from(payment_transactions).where(
                payment_transactions.c.kind == "authorize", payment_transactions.c.status == "voided")).scalar_one()

    at = fp.wait_until(lambda: voided() > 0, timeout=120, interval=0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    resolved_at_kill = sum(1 for s, _ in w.states().values() if s == "resolved")
    fp.say(f"SIGKILL with {voided()} payments voided, {resolved_at_kill} orders resolved")
    run_id = fp.latest_run_id(w.instance)
    child = fp.start_child(["reexecute", "--job", "orders_ops_job", "--run-id", run_id], work / "child.log")
    res = fp.child_result(child) or {}
    ok = ok and bool(res.get("success"))
    w.client.clear_fault()
    w.ops()  # a later ops job (schedule) finds nothing left to do twice
    w.carriers_finish()
    return w.figures("sigkill", runs_ok=ok, killed_mid_compensation=bool(at) and resolved_at_kill < len(w.orders),
                     payments_voided=voided(), reexecution=res)


def drill_race(w: World) -> dict:
    import threading

    ok = w.flow()
    half = sorted(o["order_id"] for o in w.orders if w.rng.random() < 0.5)
    _cancel_all(w)

    took = []

    def carrier():  # picks parcels up one by one over about two seconds, while the ops job cancels
        for oid in half:
            with w.cdb.begin() as conn:
                if w.st.carrier_moves(conn, [oid], "shipped"):
                    took.append(oid)
            time.sleep(2.0 / max(len(half), 1))

    t = threading.Thread(target=carrier)
    t.start()
    ok = w.ops() and ok
    t.join()
    ok = w.ops() and ok
    w.carriers_finish()
    orders = w.states()
    both = sum(1 for s, d in orders.values() if d.get("outcome") == "cancelled" and d.get("shipped_at"))
    refused = sum(1 for _, d in orders.values() if d.get("refusals"))
    cancelled = sum(1 for _, d in orders.values() if d.get("outcome") == "cancelled")
    return w.figures("race", runs_ok=ok, carrier_tried=len(half), carrier_took=len(took), cancelled=cancelled,
                     cancel_refused=refused, cancelled_and_shipped=both)


def drill_duplicates(w: World) -> dict:
    ok = w.flow()
    from orch_project.defs.orders.store import fulfilments

    with w.cdb.begin() as conn:
        out = conn.execute(w.sa.select(fulfilments.c.order_id, fulfilments.c.tracking_id)).all()
        w.st.carrier_moves(conn, [o for o, _ in out], "shipped")
        w.st.carrier_moves(conn, [o for o, _ in out], "delivered")
    now = datetime.now(timezone.utc)
    shipped = [{"kind": "carrier", "event_id": f"{t}-shipped", "order_id": o, "type": "shipped",
                "occurred_at": (now - timedelta(hours=3)).isoformat()} for o, t in out]
    delivered = [{"kind": "carrier", "event_id": f"{t}-delivered", "order_id": o, "type": "delivered",
                  "occurred_at": (now - timedelta(hours=1)).isoformat()} for o, t in out]
    twice = [{**e, "id": f"{e['event_id']}-{n}"} for e in delivered + shipped for n in (1, 2)]
    w.rng.shuffle(twice)
    first, second = [e for e in twice if e["type"] == "delivered"], [e for e in twice if e["type"] == "shipped"]
    w.events(first)  # every delivery reported before its shipment
    ok = w.flow(now.date().isoformat()) and w.ops() and ok
    w.events(second)
    ok = w.flow(now.date().isoformat()) and w.ops() and ok
    from orch_project.lib.pipeline import status_counts

    dup_ignored = status_counts(w.db, "orders")["states"].get("duplicate", 0)
    delivered_n = sum(1 for s, _ in w.states().values() if s == "delivered")
    with w.cdb.begin() as conn:
        captures = conn.execute(w.sa.select(w.sa.func.count()).select_from(w.st.payment_transactions).where(
            w.st.payment_transactions.c.kind == "capture")).scalar_one()
    return w.figures("duplicates", runs_ok=ok, events_sent=len(twice), duplicates_ignored=dup_ignored,
                     delivered=delivered_n, captures=captures)


DRILLS = ("payments", "warehouse", "sigkill", "race", "duplicates")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--drill", default="all", help=f"one of {', '.join(DRILLS)}, a comma-separated list, or all")
    ap.add_argument("--orders", type=int, default=1000)
    ap.add_argument("--seed", type=int, default=5)
    args = ap.parse_args(argv)
    results = []
    chosen = DRILLS if args.drill == "all" else tuple(args.drill.split(","))
    if unknown := [d for d in chosen if d not in DRILLS]:
        ap.error(f"unknown drill(s) {unknown}; choose from {', '.join(DRILLS)} or all")
    for name in chosen:
        with tempfile.TemporaryDirectory() as tmp:
            work = Path(tmp)
            fp.say(f"== drill {name}: {args.orders} orders")
            t0 = time.perf_counter()
            w = World(work, args.orders, args.seed)
            fn = globals()[f"drill_{name}"]
            out = fn(w, work) if name == "sigkill" else fn(w)
            out["seconds"] = round(time.perf_counter() - t0, 1)
            w.instance.dispose()
            print(json.dumps(out), flush=True)
            results.append(out)
    bad = [r["drill"] for r in results if r["lost"] or r["duplicate_effects"] or r["invariant_violations"]
           or not r.get("runs_ok", True) or r.get("cancelled_and_shipped")]
    print(json.dumps({"drills": results, "failed": bad}))
    return 1 if bad else 0


if __name__ == "__main__":
    raise SystemExit(main())
