"""The order saga's stages. Each step causes its effect through the outbox under the order's idempotency key,
reads back what the system recorded (reserved or short, approved or declined, requested or shipped) and decides;
a step that fails (declined, out of stock, failed for good) undoes the steps done before it with their declared
compensations (``lib.saga.undo_effects``), last first.

validate -> fraud (a person reviews the grey zone) -> reserve -> authorize -> fulfil -> settle

``settle`` is the durable wait: an order waiting for its carrier, a customer's request or a deadline holds no
run. Each run (and the ops job, across every partition) applies the events that arrived since, in the order
they happened, and the deadlines that passed: shipped -> capture + commit the stock; delivered -> a review
request after the brief's days; lost -> refund; cancel -> the warehouse is asked to stop the parcel first, and
only when it could are the payment voided and the stock released (a parcel already gone refuses the cancel);
return -> instructions, then refund and restock when the parcel comes back.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from statistics import median
from typing import Any

import sqlalchemy as sa

from ...lib.connectors.embedded import Effect
from ...lib.outbox import dispatch, idempotency_key
from ...lib.pipeline import ItemUpdate, StageEnv, StageReport, commit_stage, dead_letter, load_stage_items
from ...lib.outbox import settle as take_out_of_delivery
from ...lib.saga import deliver_effects, failed_for_good, step_name, undo_effects
from ...lib.store import items, utcnow
from .logic import CANCEL_REASONS, FLOW, OrdersConfig, event_prefix

# every step's compensation (the spec's ``compensations``): undone last step first
COMPENSATIONS = {"reserve": ("inventory", "release"), "authorize": ("payment_provider", "void"),
                 "fulfil": ("warehouse", "cancel_fulfilment"), "capture": ("payment_provider", "refund"),
                 "commit_stock": ("inventory", "restock")}
EFFECTS = frozenset({("inventory", "reserve"), ("inventory", "commit"), ("inventory", "release"),
                     ("inventory", "restock"), ("payment_provider", "authorize"), ("payment_provider", "capture"),
                     ("payment_provider", "void"), ("payment_provider", "refund"), ("warehouse", "ship"),
                     ("warehouse", "cancel_fulfilment"), ("messaging", "send_message")})
NOTICES = {
    "confirmed": ("Your order {order} is confirmed", "We have your order {order} and are packing it."),
    "shipped": ("Your order {order} is on its way", "Your parcel has left our warehouse (tracking {tracking})."),
    "delivered": ("Your order {order} was delivered", "Your parcel was delivered. Enjoy!"),
    "review_request": ("How was your order {order}?", "Tell us what you think of what you bought: one click."),
    "cancelled": ("Your order {order} is cancelled", "{why} Any payment held is released."),
    "refused": ("We could not accept your order {order}", "{why}"),
    "declined": ("Your payment for order {order} did not go through", "{why} Nothing was charged; please order "
                 "again with another payment method."),
    "out_of_stock": ("Part of your order {order} is out of stock", "{why}"),
    "request_refused": ("About your request on order {order}", "We could not do it: {why}"),
    "payment_changed": ("Your order {order} is paid another way", "We charged the new payment method and released "
                        "the old one."),
    "items_changed": ("Your order {order} was changed", "We changed the items as you asked; the new total is held on "
                      "your payment method."),
    "address_changed": ("Your order {order} ships to the new address", "We changed the shipping address."),
    "return_instructions": ("Returning items of order {order}", "Print the label we attached and drop the parcel "
                            "at any carrier point; we refund when it arrives."),
    "refunded": ("Your refund for order {order}", "We refunded {amount:.2f} to your {method}."),
    "lost": ("Your parcel for order {order} was lost", "The carrier lost your parcel; we refunded {amount:.2f}."),
}


# --- helpers ------------------------------------------------------------------------------------------------------

def key(row: dict[str, Any], step: str) -> str:
    """The step's idempotency key; after a DLQ replay of an undone step, its new generation (lib.saga.step_name)."""
    return idempotency_key(FLOW, row["item_id"], step_name(row["data"], step))


def notice(row: dict[str, Any], kind: str, **fmt: Any) -> Effect:
    """A message to the customer (their vault token; a real sender resolves it) for one milestone, once."""
    subject, body = NOTICES[kind]
    values = {"order": row["data"]["order_id"], "why": "", "tracking": "", "amount": 0.0, "method": "payment method",
              **fmt}
    return Effect(key(row, f"notify_{kind}"), "messaging", "send_message", row["item_id"], row["trace_id"], {
        "kind": f"order_{kind}", "recipient": row["data"]["customer_token"], "subject": subject.format(**values),
        "body": body.format(**values)})


def mark(d: dict[str, Any], what: str, by: str, at: datetime | None = None, **extra: Any) -> None:
    """One line of the order's saga timeline (``orch orders show``)."""
    d.setdefault("timeline", []).append({"at": (at or utcnow()).isoformat(timespec="seconds"), "what": what,
                                         "by": by, **extra})


def done(d: dict[str, Any]) -> list[tuple[str, str]]:
    return [tuple(x) for x in (d.get("saga") or {}).get("done", [])]


def record_done(d: dict[str, Any], step: str, k: str) -> None:
    saga = d.setdefault("saga", {"done": [], "events": [], "undone": []})
    if [step, k] not in saga["done"]:
        saga["done"].append([step, k])


def done_key(d: dict[str, Any], step: str) -> str | None:
    return next((k for s, k in done(d) if s == step), None)


def current(d: dict[str, Any], step: str) -> str | None:
    """The key of the step's record that stands now (a modified order has a new reservation, authorisation or
    parcel; the first one otherwise)."""
    return (d.get("current") or {}).get(step) or done_key(d, step)


def undo(row: dict[str, Any], d: dict[str, Any], reason: str, skip: Sequence[str] = ()) -> list[Effect]:
    """The compensations of every step done in the order's current round (an exchange's replacement is a round
    of its own: what was captured and delivered before it stands), except ``skip``, recorded on the order."""
    steps = done(d)[int(d.get("round_start", 0)):]
    effects, kept = undo_effects(FLOW, row, [x for x in steps if x[0] not in skip], COMPENSATIONS, reason)
    saga = d.setdefault("saga", {"done": [], "events": [], "undone": []})
    saga["undone"] = sorted(set(saga.get("undone", [])) | {e.idempotency_key.rsplit(":", 1)[1] for e in effects})
    return effects


def _finish(env: StageEnv, stage: str, started: datetime, rows: Sequence[dict[str, Any]], updates: list[ItemUpdate],
            connectors: Any, cfg: OrdersConfig, *, effects: Sequence[Effect] = (), audit: Sequence[dict] = (),
            approval_rows: Sequence[dict] = (), md: dict[str, Any] | None = None) -> StageReport:
    """Commit the stage's decisions with the effects they cause (compensations, notices) in one transaction,
    then deliver those effects now (what cannot go out stays in the outbox for the ops job)."""
    report = commit_stage(env, stage, started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                          effects=effects, audit_rows=audit, approval_rows=approval_rows, metadata=md or {})
    if effects:
        sent = dispatch(env.db, connectors, env.flow, keys=[e.idempotency_key for e in effects],
                        policy=cfg.connector_policy)
        report.metadata["effects_delivered_after_commit"] = sent["delivered"]
    return report


def _end(r: dict[str, Any], d: dict[str, Any], outcome: str, why: str, now: datetime) -> ItemUpdate:
    d["outcome"] = outcome
    d["outcome_reason"] = why
    return ItemUpdate(r["item_id"], "resolved", d, "routed", columns={"resolved_at": now})


# --- validate, fraud --------------------------------------------------------------------------------------------

def validate_stage(env: StageEnv, cfg: OrdersConfig, connectors) -> StageReport:
    """Events are recorded (the order's settle step applies them). An order is checked against the shop's
    directory: the customer exists, the payment method is theirs, every item is a catalogue variant; prices and
    the amount come from the catalogue. What fails goes to the DLQ with every rule it broke."""
    from .store import directory

    started = utcnow()
    rows = load_stage_items(env, "validate")
    orders = [r for r in rows if r["data"]["kind"] == "order"]
    try:
        shop = directory() if orders else None
    except FileNotFoundError as exc:
        shop, missing = None, str(exc)
    updates, counts = [], Counter()
    for r in rows:
        d = dict(r["data"])
        if d["kind"] == "event":
            counts["events"] += 1
            updates.append(ItemUpdate(r["item_id"], "resolved", {**d, "outcome": "recorded"}, "routed",
                                      columns={"resolved_at": started}))
            continue
        if shop is None:
            updates.append(dead_letter(r, "store_directory", f"the shop's directory is missing: {missing}"))
            continue
        errors = []
        cust = shop.customers.get(d["customer_ref"])
        if cust is None:
            errors.append("customer: not in the shop's directory")
        elif d["method_id"] not in cust.methods:
            errors.append("payment_method_id: not one of the customer's payment methods")
        lines, amount = [], 0.0
        for ln in d["lines"]:
            v = shop.variants.get(ln["sku"])
            if v is None:
                errors.append(f"item {ln['sku']}: not in the catalogue")
                continue
            lines.append({**ln, "product_id": v["product_id"], "name": v["name"], "price": v["price"]})
            amount += v["price"] * ln["qty"]
        if len(d["lines"]) > cfg.settings.max_items:
            errors.append(f"items: more than {cfg.settings.max_items}")
        if errors:
            counts["invalid"] += 1
            updates.append(dead_letter(r, "validation", "; ".join(errors)))
            continue
        method = cust.methods[d["method_id"]]
        d.update(lines=lines, amount=round(amount, 2), method_source=method.get("source"),
                 gift_card_balance=method.get("balance") if method.get("source") == "gift_card" else None)
        mark(d, f"validated: {len(lines)} line(s), {d['amount']:.2f}", "system:validate", started)
        counts["valid"] += 1
        updates.append(ItemUpdate(r["item_id"], "valid", d))
    return _finish(env, "validate", started, rows, updates, connectors, cfg,
                   md={"orders_valid": counts["valid"], "orders_invalid": counts["invalid"],
                       "events_recorded": counts["events"]})


def fraud_rules(d: dict[str, Any], history: list[float], known_addresses: set[str], recent: int,
                cfg: OrdersConfig) -> tuple[float, list[str]]:
    """Rules that fired (with why) and the score: noisy-OR of the fired rules' weights."""
    f = cfg.settings.fraud
    fired: dict[str, str] = {}
    if recent + 1 >= f.velocity_orders:
        fired["velocity"] = f"{recent + 1} orders in {f.velocity_hours:g} h"
    base = max(median(history) if history else 0.0, f.history_floor)
    if d["amount"] > f.history_multiple * base:
        fired["amount_vs_history"] = f"{d['amount']:.2f} is {d['amount'] / base:.1f}x the customer's usual {base:.2f}"
    if d["address_ref"] not in known_addresses and d["amount"] >= f.new_address_amount:
        fired["new_address_high_amount"] = f"{d['amount']:.2f} to an address the customer never used"
    bal = d.get("gift_card_balance")
    if bal and d["amount"] >= f.gift_card_drain * float(bal):
        fired["gift_card_drain"] = f"uses {d['amount'] / float(bal):.0%} of the gift card's balance"
    p = 1.0
    for rule in fired:
        p *= 1 - f.weights.get(rule, 0.0)
    return round(1 - p, 4), [f"{k}: {v}" for k, v in fired.items()]


def _recent_orders(env: StageEnv, rows: Sequence[dict[str, Any]], hours: float) -> dict[str, int]:
    """Per order in ``rows``: the customer's other orders in the ``hours`` before it (any partition)."""
    refs = {r["data"]["customer_ref"] for r in rows}
    first = min(datetime.fromisoformat(r["data"]["created_at"]) for r in rows) - timedelta(hours=hours)
    q = sa.select(items.c.item_id, items.c.data).where(items.c.flow == env.flow, items.c.item_id.like("order-%"),
                                                        items.c.day >= first.date().isoformat())
    seen: dict[str, list[tuple[datetime, str]]] = {}
    with env.db.begin() as conn:
        for iid, data in conn.execute(q):
            if data.get("customer_ref") in refs:
                seen.setdefault(data["customer_ref"], []).append((datetime.fromisoformat(data["created_at"]), iid))
    out = {}
    for r in rows:
        t = datetime.fromisoformat(r["data"]["created_at"])
        out[r["item_id"]] = sum(1 for at, iid in seen.get(r["data"]["customer_ref"], [])
                                if iid != r["item_id"] and t - timedelta(hours=hours) <= at <= t)
    return out


def fraud_stage(env: StageEnv, cfg: OrdersConfig, connectors) -> StageReport:
    """Rules (velocity, amount against the customer's history, a high amount to a new address, gift-card drain)
    and their score: below ``review_at`` cleared, from ``refuse_at`` refused (the customer told why), between
    them a person decides (the approvals queue, with the rules that fired)."""
    from .store import directory

    started = utcnow()
    rows = load_stage_items(env, "fraud")
    if not rows:
        return _finish(env, "fraud", started, rows, [], connectors, cfg)
    f = cfg.settings.fraud
    shop = directory()
    recent = _recent_orders(env, rows, f.velocity_hours)
    pol, sla = cfg.brief.approval, cfg.brief.sla_hours
    updates, effects, audit, approvals = [], [], [], []
    for r in rows:
        d = dict(r["data"])
        cust = shop.customers[d["customer_ref"]]
        score, why = fraud_rules(d, cust.order_totals, cust.address_refs, recent[r["item_id"]], cfg)
        d["fraud"] = {"score": score, "rules": why}
        if score >= f.refuse_at:
            text = "Our checks could not accept this order (" + "; ".join(w.split(":")[0] for w in why) + ")."
            mark(d, f"refused by the fraud check (score {score:.2f})", "system:fraud", started, rules=why)
            effects.append(notice(r, "refused", why=text))
            updates.append(_end(r, d, "refused", "; ".join(why), started))
        elif score >= f.review_at:
            due = started + timedelta(hours=sla["high"])
            mark(d, f"waiting for a fraud review (score {score:.2f})", "system:fraud", started, rules=why)
            updates.append(ItemUpdate(r["item_id"], "awaiting_review", d, "routed", columns={"due_at": due}))
            approvals.append({"flow": env.flow, "item_id": r["item_id"], "reason": "fraud_review",
                              "required_role": pol.reviewer_role, "status": "pending", "due_at": due,
                              "created_at": started, "edited": False})
        else:
            mark(d, f"fraud check cleared (score {score:.2f})", "system:fraud", started)
            updates.append(ItemUpdate(r["item_id"], "cleared", d))
        audit.append({"actor": "system:fraud", "action": "fraud_scored", "flow": env.flow, "item_id": r["item_id"],
                      "trace_id": r["trace_id"], "reason": "; ".join(why) or "no rule fired",
                      "outputs": {"score": score, "decision": updates[-1].status}})
    md = {"cleared": sum(u.status == "cleared" for u in updates),
          "fraud_review": len(approvals), "refused": sum(u.status == "resolved" for u in updates)}
    return _finish(env, "fraud", started, rows, updates, connectors, cfg, effects=effects, audit=audit,
                   approval_rows=approvals, md=md)


# --- reserve, authorize, fulfil ---------------------------------------------------------------------------------

@dataclass
class Step:
    """One saga step for a batch: ``effect(row)`` plans it; ``decide(row, data, record)`` turns what the system
    recorded into (status, outcome, why, notice kind, extra data); None = the step went through."""

    name: str
    stage: str
    connector: str
    reader: str
    next_status: str
    effect: Callable[[dict[str, Any]], Effect]
    decide: Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], dict[str, Any] | None] = lambda r, d, rec: None
    on_done: Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], list[Effect]] = lambda r, d, rec: []
    label: str = ""
    retry: Callable[[dict[str, Any], dict[str, Any], dict[str, Any]], Effect | None] | None = None


def run_step(env: StageEnv, cfg: OrdersConfig, connectors, step: Step) -> StageReport:
    started = utcnow()
    rows = load_stage_items(env, step.stage)
    policy = cfg.connector_policy
    planned = {r["item_id"]: step.effect(r) for r in rows}
    states = deliver_effects(env, connectors, list(planned.values()), policy)
    keys = [e.idempotency_key for e in planned.values()]
    records, unread = _read(connectors, step.connector, step.reader, keys)
    # a retry of the step (e.g. the lines still in stock, after a short reservation) in the same run
    retries = {}
    if step.retry is not None:
        for r in rows:
            e = planned[r["item_id"]]
            if states.get(e.idempotency_key, {}).get("status") == "delivered":
                again = step.retry(r, r["data"], records.get(e.idempotency_key) or {})
                if again is not None:
                    retries[r["item_id"]] = again
        if retries:
            states.update(deliver_effects(env, connectors, list(retries.values()), policy))
            more, unread = _read(connectors, step.connector, step.reader, [e.idempotency_key for e in retries.values()])
            records.update(more)
    updates, effects, audit, dead_keys, restart, restart_effects = [], [], [], [], [], []
    counts = Counter()
    for r in rows:
        e = retries.get(r["item_id"]) or planned[r["item_id"]]
        st = states.get(e.idempotency_key, {})
        d = dict(r["data"])
        if st.get("status") != "delivered":
            if failed_for_good(st, policy):
                why = (f"{step.name} ({e.connector} {e.action}) failed {st.get('attempts')} times: "
                       f"{(st.get('last_error') or '')[:160]}")
                comp = undo(r, d, why)
                restart_effects += comp
                dead_keys.append(e.idempotency_key)
                d["compensation"] = {"failed": [step.name], "compensated": [
                    f"{c.idempotency_key.rsplit(':', 1)[1].removeprefix('compensate_').split('#')[0]}:{c.action}"
                    for c in comp], "compensation_keys": [c.idempotency_key for c in comp]}
                mark(d, f"{step.name} failed for good; undone: {', '.join(c.action for c in comp) or 'nothing'}",
                     f"system:{step.stage}", started)
                counts["failed_for_good"] += 1
                # the undone steps are no longer the order's; a DLQ replay starts the saga again at reserve
                d["saga"]["done"] = done(d)[: int(d.get("round_start", 0))]
                for k in ("current", "authorized_at", "waiting_since", "tracking_id"):
                    d.pop(k, None)
                restart.append(ItemUpdate(r["item_id"], "dead_lettered", d, "dead_lettered",
                                          dead_letter=("effect_failed", why + "; compensated; a replay starts again "
                                                                             "at the stock reservation")))
            else:
                counts["waiting"] += 1
                updates.append(ItemUpdate(r["item_id"], r["status"], d, "waiting"))
            continue
        if e.idempotency_key not in records:  # delivered, but the system does not answer reads now: wait
            counts["waiting_on_read"] += 1
            updates.append(ItemUpdate(r["item_id"], r["status"], d, "waiting"))
            continue
        rec = records[e.idempotency_key]
        verdict = step.decide(r, d, rec)
        if verdict is not None and verdict.get("wait"):  # the system answers later (a pending authorisation)
            if not d.get("waiting_since"):
                d["waiting_since"] = started.isoformat()
                mark(d, f"{step.name}: {verdict['wait']}", f"system:{step.stage}", started)
            counts["waiting_on_answer"] += 1
            updates.append(ItemUpdate(r["item_id"], r["status"], d, "waiting"))
            continue
        if verdict is not None:  # a business "no": undo what was done, tell the customer, end the order
            comp = undo(r, d, verdict["why"]) + verdict.get("also_undo", [])
            effects += comp + [notice(r, verdict["notice"], why=verdict["why"])]
            mark(d, f"{step.name}: {verdict['why']}; undone: {', '.join(c.action for c in comp) or 'nothing'}",
                 f"system:{step.stage}", started)
            counts[verdict["outcome"]] += 1
            updates.append(_end(r, d, verdict["outcome"], verdict["why"], started))
            audit.append({"actor": f"system:{step.stage}", "action": verdict["outcome"], "flow": env.flow,
                          "item_id": r["item_id"], "trace_id": r["trace_id"], "reason": verdict["why"],
                          "outputs": {"compensations": [c.action for c in comp]}})
            continue
        record_done(d, step.name, e.idempotency_key)
        mark(d, step.label or step.name, f"system:{step.stage}", started, ref=e.idempotency_key.rsplit(":", 1)[1])
        effects += step.on_done(r, d, rec)
        counts["done"] += 1
        updates.append(ItemUpdate(r["item_id"], step.next_status, d))
    if unread:
        counts["read_failed"] = 1
    if restart:  # dead letters of the saga's first step (reserve), so a replay goes back there; with their undo
        _finish(env, "reserve", started, [r for r in rows if r["item_id"] in {u.item_id for u in restart}], restart,
                connectors, cfg, effects=restart_effects)
    report = _finish(env, step.stage, started, rows, updates, connectors, cfg, effects=effects, audit=audit,
                     md={**counts, **({"read_error": unread} if unread else {})})
    if dead_keys:  # failed for good: never delivered later (its order is undone and dead-lettered)
        take_out_of_delivery(env.db, dead_keys, "dead")
    return report


def _read(connectors, system: str, reader: str, keys: Sequence[str]) -> tuple[dict[str, Any], str | None]:
    """What the system recorded under ``keys``, or nothing and why when it does not answer (items then wait)."""
    from ...lib.connectors.embedded import ConnectorUnavailable

    if not keys:
        return {}, None
    try:
        return connectors.read(system, reader, list(keys)), None
    except (ConnectorUnavailable, TimeoutError) as exc:
        return {}, f"{system} did not answer: {exc}"[:300]


def _reserve_effect(r: dict[str, Any], lines: list[dict[str, Any]] | None = None, step: str = "reserve") -> Effect:
    d = r["data"]
    return Effect(key(r, step), "inventory", "reserve", r["item_id"], r["trace_id"],
                  {"order_id": d["order_id"], "lines": [{"sku": ln["sku"], "qty": ln["qty"]}
                                                       for ln in (lines or d["lines"])]})


def reserve_stage(env: StageEnv, cfg: OrdersConfig, connectors) -> StageReport:
    """Stock reserved in the inventory for every line (all or nothing). Short: with the brief's ``split`` the
    lines in stock are reserved and the rest dropped (the customer told which), else the order is cancelled."""
    split = cfg.settings.out_of_stock == "split"

    def retry(r, d, rec):
        if rec.get("status") != "short" or not split:
            return None
        keep = [ln for ln in d["lines"] if ln["sku"] not in (rec.get("short") or [])]
        return _reserve_effect(r, keep, "reserve#split") if keep else None

    def decide(r, d, rec):
        if rec.get("status") == "short":
            return {"outcome": "out_of_stock", "notice": "out_of_stock",
                    "why": f"out of stock: {', '.join(d['lines'][i]['name'] for i, ln in enumerate(d['lines']) if ln['sku'] in (rec.get('short') or []))}; "
                           "the order is cancelled and nothing was charged"}
        if rec.get("idempotency_key", "").endswith("reserve#split"):
            kept = {ln["sku"] for ln in rec["lines"]}
            dropped = [ln for ln in d["lines"] if ln["sku"] not in kept]
            d["dropped_lines"] = dropped
            d["lines"] = [ln for ln in d["lines"] if ln["sku"] in kept]
            d["amount"] = round(sum(ln["price"] * ln["qty"] for ln in d["lines"]), 2)
        return None

    def on_done(r, d, rec):
        if d.get("dropped_lines"):
            why = (f"{', '.join(ln['name'] for ln in d['dropped_lines'])} out of stock: we ship the rest and charge "
                   f"{d['amount']:.2f}")
            return [notice(r, "out_of_stock", why=why)]
        return []

    return run_step(env, cfg, connectors, Step("reserve", "reserve", "inventory", "reservations", "reserved",
                                               effect=_reserve_effect, decide=decide, on_done=on_done, retry=retry,
                                               label="stock reserved"))


def authorize_stage(env: StageEnv, cfg: OrdersConfig, connectors) -> StageReport:
    """The amount authorised on the customer's payment method (captured only when the parcel ships); a decline
    releases the stock and tells the customer."""
    def effect(r):
        d = r["data"]
        return Effect(key(r, "authorize"), "payment_provider", "authorize", r["item_id"], r["trace_id"], {
            "order_id": d["order_id"], "method_id": d["method_id"], "amount": d["amount"],
            "gift_card_balance": d.get("gift_card_balance")})

    def decide(r, d, rec):
        if rec.get("status") == "declined":
            return {"outcome": "payment_declined", "notice": "declined",
                    "why": f"payment declined ({rec.get('reason') or 'by the provider'})"}
        if rec.get("status") in ("pending", "voided"):
            since = datetime.fromisoformat(d.get("waiting_since") or utcnow().isoformat())
            limit = timedelta(hours=cfg.settings.authorization_timeout_hours)
            if rec["status"] == "pending" and utcnow() - since <= limit:
                return {"wait": "the payment provider answers later; the order waits for its answer"}
            withdraw = Effect(key(r, "void_pending_authorization"), "payment_provider", "void", r["item_id"],
                              r["trace_id"], {"effect_key": rec["idempotency_key"], "reason": "no answer in time"})
            return {"outcome": "payment_timeout", "notice": "declined", "also_undo": [withdraw],
                    "why": f"the payment provider did not answer within {cfg.settings.authorization_timeout_hours:g} h"}
        d.pop("waiting_since", None)
        d["authorized_at"] = utcnow().isoformat()
        return None

    return run_step(env, cfg, connectors, Step("authorize", "authorize", "payment_provider", "transactions", "authorized",
                                               effect=effect, decide=decide, label="payment authorised"))


def fulfil_stage(env: StageEnv, cfg: OrdersConfig, connectors) -> StageReport:
    """A fulfilment request to the warehouse (pick, pack, ship; a tracking id); the customer is told the order
    is confirmed. From here the order waits for its carrier (settle)."""
    def effect(r):
        d = r["data"]
        return Effect(key(r, "fulfil"), "warehouse", "ship", r["item_id"], r["trace_id"], {
            "order_id": d["order_id"], "lines": [{"sku": ln["sku"], "qty": ln["qty"]} for ln in d["lines"]]})

    def on_done(r, d, rec):
        d["tracking_id"] = rec.get("tracking_id")
        return [notice(r, "confirmed")]

    return run_step(env, cfg, connectors, Step("fulfil", "fulfil", "warehouse", "fulfilments", "in_fulfilment",
                                               effect=effect, on_done=on_done, label="sent to the warehouse"))


# --- settle: the durable wait on carriers, customers and deadlines -----------------------------------------------

SETTLE_LOADS = ("in_fulfilment", "shipped", "delivered", "return_requested", "exchange_requested")
# events of one instant apply in the order they must happen
_RANK = {"shipped": 0, "delivered": 1, "lost": 2, "returned": 3}


def order_events(env: StageEnv, order_ids: Sequence[str]) -> dict[str, list[dict[str, Any]]]:
    """The recorded events of each order (any partition), in the order they happened."""
    out: dict[str, list[dict[str, Any]]] = {o: [] for o in order_ids}
    prefix = {event_prefix(o): o for o in order_ids}
    with env.db.begin() as conn:  # one read of the recorded events (item ids "evt-<order>-<event hash>")
        for iid, data in conn.execute(sa.select(items.c.item_id, items.c.data).where(
                items.c.flow == env.flow, items.c.item_id.like("evt-%"), items.c.status == "resolved")):
            oid = prefix.get(iid.rsplit("-", 1)[0] + "-")
            if oid is not None:
                out[oid].append({**data, "item_id": iid})
    for evs in out.values():
        evs.sort(key=lambda e: (e["occurred_at"], _RANK.get(e["type"], 5), e["event_id"]))
    return out


@dataclass
class Move:
    """What settle does next for one order: ``effects`` to deliver, then ``apply(data)`` -> the new status (or
    None: the order stays, e.g. a cancel waiting for the warehouse's answer)."""

    effects: list[Effect]
    apply: Callable[[dict[str, Any]], str | None]
    event: str | None = None  # the event it applies (marked applied once the move completes)


def _refund_method(d: dict[str, Any], ev: dict[str, Any], shop) -> tuple[str | None, str | None]:
    """The method a return's refund goes to: the original one or one of the customer's gift cards."""
    want = ev.get("method_id") or d["method_id"]
    if want == d["method_id"]:
        return want, None
    cust = shop.customers.get(d["customer_ref"])
    m = (cust.methods.get(want) if cust else None) or {}
    if m.get("source") != "gift_card":
        return None, "a refund goes to the original payment method or one of the customer's gift cards"
    return want, None


def next_move(r: dict[str, Any], evs: list[dict[str, Any]], facts: dict[str, Any], now: datetime,
              cfg: OrdersConfig, shop) -> Move | None:
    d = r["data"]
    fulfilment = facts.get("fulfilment")
    s = cfg.settings
    status = r["status"]
    applied = set((d.get("saga") or {}).get("events", []))
    pending = [e for e in evs if e["event_id"] not in applied]
    by = "system:settle"

    def refuse(ev, why):
        def apply(d):
            mark(d, f"{ev['type']} request refused: {why}", by, now, event=ev["event_id"])
            d.setdefault("refusals", []).append({"event": ev["event_id"], "type": ev["type"], "rule": why})
            return status
        return Move([_once(notice(r, "request_refused", why=why), ev)], apply, ev["event_id"])

    rnd = d.get("round", "")  # "" for the first parcel, "#<tag>" for an exchange's replacement
    due = d.get("due", d["amount"])  # what the parcel's shipment captures

    def ship_effects() -> list[Effect]:
        out = [Effect(key(r, "commit_stock" + rnd), "inventory", "commit", r["item_id"], r["trace_id"], {
                   "order_id": d["order_id"], "effect_key": current(d, "reserve")}),
               _tag(notice(r, "shipped", tracking=d.get("tracking_id") or ""), rnd)]
        if due > 0:
            out.insert(0, Effect(key(r, "capture" + rnd), "payment_provider", "capture", r["item_id"], r["trace_id"],
                                 {"order_id": d["order_id"], "effect_key": current(d, "authorize"), "amount": due}))
        return out

    def shipped(d, at):
        if due > 0:
            record_done(d, "capture" + rnd, key(r, "capture" + rnd))
        record_done(d, "commit_stock" + rnd, key(r, "commit_stock" + rnd))
        d["shipped_at"] = at
        mark(d, "shipped: " + (f"{due:.2f} captured" if due > 0 else "nothing more to capture") + ", stock committed",
             by, now)

    # a return's parcel can arrive (be recorded) before the request: it waits for it
    pending = [e for e in pending if not (e["type"] == "returned" and status == "delivered")]
    if d.get("change"):  # a change in progress goes first (it is a small saga of its own)
        pending = [e for e in pending if e["event_id"] == d["change"]["event"]] or pending
    if pending:
        ev = pending[0]
        t = ev["type"]
        if ev["source"] == "payment":  # the authorize step reads the provider's record; the event woke the flow
            def apply(d):
                mark(d, f"payment event {t} noted (the provider's record decides)", by, now, event=ev["event_id"])
                return status
            return Move([], apply, ev["event_id"])
        if t in ("modify_payment", "modify_items", "exchange"):
            return change_move(r, ev, facts, now, cfg, shop, refuse)
        if t == "shipped" or (t in ("delivered", "lost", "returned") and status == "in_fulfilment"):
            if status != "in_fulfilment":
                return Move([], lambda d: status, ev["event_id"])  # a repeat of what already happened
            def apply(d):
                shipped(d, ev["occurred_at"])
                if t != "shipped":
                    return "in_fulfilment_delivered"
                return "shipped"
            return Move(ship_effects(), apply, ev["event_id"] if t == "shipped" else None)
        if t == "delivered":
            if status != "shipped":
                return Move([], lambda d: status, ev["event_id"])
            def apply(d):
                d["delivered_at"] = ev["occurred_at"]
                mark(d, "delivered", by, now)
                return "delivered"
            return Move([_tag(notice(r, "delivered"), rnd)], apply, ev["event_id"])
        if t == "lost":
            if status != "shipped":
                return Move([], lambda d: status, ev["event_id"])
            refund = Effect(key(r, "refund_lost"), "payment_provider", "refund", r["item_id"], r["trace_id"], {
                "order_id": d["order_id"], "effect_key": key(r, "capture"), "amount": d["amount"]})
            def apply(d):
                mark(d, f"lost by the carrier: {d['amount']:.2f} refunded", by, now)
                d["refunded"] = round(d.get("refunded", 0.0) + d["amount"], 2)
                return "resolved:lost_refunded"
            return Move([refund, notice(r, "lost", amount=d["amount"])], apply, ev["event_id"])
        if t in ("cancel", "modify_address", "modify_payment", "modify_items") and rnd:
            return refuse(ev, "an exchange's replacement cannot be cancelled or changed; return it once it arrives")
        if t == "cancel":
            if ev.get("reason") not in CANCEL_REASONS:
                return refuse(ev, "a cancellation needs one of the reasons: " + ", ".join(CANCEL_REASONS))
            if status != "in_fulfilment":
                return refuse(ev, f"only a pending order can be cancelled; this one is {status.replace('_', ' ')}")
            if fulfilment is None or fulfilment["status"] == "requested":
                # ask the warehouse to stop the parcel first; its answer decides on the next pass
                stop = Effect(key(r, "cancel_fulfilment" + rnd), "warehouse", "cancel_fulfilment", r["item_id"],
                              r["trace_id"], {"effect_key": current(d, "fulfil"), "reason": "customer cancel"})
                return Move([stop], lambda d: status, None)
            if fulfilment["status"] == "cancelled":
                comp = undo(r, d, f"cancelled by the customer ({ev['reason']})", skip=("fulfil",))
                def apply(d):
                    mark(d, f"cancelled by the customer ({ev['reason']}): parcel stopped; "
                            f"{', '.join(c.action for c in comp)}", f"customer:{d['customer_ref'][:12]}", now)
                    return "resolved:cancelled"
                return Move(comp + [notice(r, "cancelled", why=f"You cancelled it ({ev['reason']}).")], apply,
                            ev["event_id"])
            return refuse(ev, f"the parcel has already left the warehouse ({fulfilment['status']}); only a pending "
                              "order can be cancelled -- return it once it arrives")
        if t == "modify_address":
            if status != "in_fulfilment" or (fulfilment and fulfilment["status"] != "requested"):
                return refuse(ev, "the address of an order can only change before it ships")
            def apply(d):
                d.update(address_token=ev["address_token"], address_ref=ev["address_ref"], ship_to=ev["ship_to"])
                mark(d, "shipping address changed by the customer", f"customer:{d['customer_ref'][:12]}", now)
                return status
            return Move([notice(r, "address_changed")], apply, ev["event_id"])
        if t == "return":
            if status != "delivered":
                return refuse(ev, f"only a delivered order can be returned; this one is {status.replace('_', ' ')}")
            if datetime.fromisoformat(ev["occurred_at"]) > datetime.fromisoformat(d["delivered_at"]) + timedelta(
                    days=s.return_window_days):
                return refuse(ev, f"returns are accepted within {s.return_window_days:g} days of delivery")
            skus = {ln["sku"] for ln in d["lines"]}
            if not set(ev["item_ids"]) <= skus:
                return refuse(ev, "a return names items of this order only")
            method, why = _refund_method(d, ev, shop)
            if why:
                return refuse(ev, why)
            def apply(d):
                d["return"] = {"event": ev["event_id"], "item_ids": ev["item_ids"], "method_id": method,
                               "requested_at": ev["occurred_at"]}
                mark(d, f"return requested: {len(ev['item_ids'])} item(s)", f"customer:{d['customer_ref'][:12]}", now)
                return "return_requested"
            return Move([notice(r, "return_instructions")], apply, ev["event_id"])
        if t == "returned" and status == "exchange_requested":
            x = d["exchange"]
            tg = x["tag"]
            effs = [Effect(key(r, f"restock_exchange{tg}"), "inventory", "restock", r["item_id"], r["trace_id"], {
                        "order_id": d["order_id"], "effect_key": current(d, "reserve"),
                        "lines": [{"sku": ln["sku"], "qty": ln["qty"]} for ln in x["returned"]]}),
                    Effect(key(r, f"fulfil{tg}"), "warehouse", "ship", r["item_id"], r["trace_id"], {
                        "order_id": d["order_id"], "round": tg, "lines": [{"sku": ln["sku"], "qty": ln["qty"]}
                                                             for ln in x["replacement"]]})]
            if x["diff"] < 0:
                effs.append(Effect(key(r, f"refund_exchange{tg}"), "payment_provider", "refund", r["item_id"],
                                   r["trace_id"], {"order_id": d["order_id"], "effect_key": key(r, "capture"),
                                                   "amount": -x["diff"]}))
            def apply(d):
                d["round_start"] = len(done(d))  # the replacement's steps are a round of their own
                record_done(d, f"reserve{tg}", x["keys"]["reserve"])
                record_done(d, f"fulfil{tg}", key(r, f"fulfil{tg}"))
                cur = {"reserve": x["keys"]["reserve"], "fulfil": key(r, f"fulfil{tg}")}
                if "authorize" in x["keys"]:
                    record_done(d, f"authorize{tg}", x["keys"]["authorize"])
                    cur["authorize"] = x["keys"]["authorize"]
                d["current"] = {**d.get("current", {}), **cur}
                if x["diff"] < 0:
                    d["refunded"] = round(d.get("refunded", 0.0) + -x["diff"], 2)
                d.update(round=tg, due=max(x["diff"], 0.0), lines=x["lines"], amount=x["amount"],
                         authorized_at=now.isoformat())
                for k in ("shipped_at", "delivered_at"):
                    d.pop(k, None)
                mark(d, "exchange: returned items received and restocked, the replacement sent to the warehouse", by, now)
                return "in_fulfilment"
            return Move(effs, apply, ev["event_id"])
        if t == "returned" and status == "shipped" and not rnd:  # back to the sender: undeliverable
            amount = d["amount"]
            effs = [Effect(key(r, "refund_undeliverable"), "payment_provider", "refund", r["item_id"], r["trace_id"],
                           {"order_id": d["order_id"], "effect_key": key(r, "capture"), "amount": amount}),
                    Effect(key(r, "restock_undeliverable"), "inventory", "restock", r["item_id"], r["trace_id"],
                           {"order_id": d["order_id"], "effect_key": current(d, "reserve")}),
                    notice(r, "refunded", amount=amount, method="original payment method")]

            def apply(d):
                d["refunded"] = round(d.get("refunded", 0.0) + amount, 2)
                mark(d, f"the parcel came back undelivered: {amount:.2f} refunded, items restocked", by, now)
                return "resolved:returned_to_sender"
            return Move(effs, apply, ev["event_id"])
        if t == "returned":
            if status != "return_requested":
                return Move([], lambda d: status, ev["event_id"])
            ret = d["return"]
            lines = [ln for ln in d["lines"] if ln["sku"] in ret["item_ids"]]
            amount = round(sum(ln["price"] * ln["qty"] for ln in lines), 2)
            effs = [Effect(key(r, "refund_return"), "payment_provider", "refund", r["item_id"], r["trace_id"], {
                        "order_id": d["order_id"], "effect_key": key(r, "capture"), "amount": amount,
                        "method_id": ret["method_id"]}),
                    Effect(key(r, "restock_return"), "inventory", "restock", r["item_id"], r["trace_id"], {
                        "order_id": d["order_id"], "effect_key": current(d, "reserve"),
                        "lines": [{"sku": ln["sku"], "qty": ln["qty"]} for ln in lines]}),
                    notice(r, "refunded", amount=amount, method=ret["method_id"].split("_")[0].replace("paypal", "PayPal"))]
            def apply(d):
                d["refunded"] = round(d.get("refunded", 0.0) + amount, 2)
                d["return"]["refunded_at"] = now.isoformat()
                mark(d, f"return received: {amount:.2f} refunded, {len(lines)} item(s) restocked", by, now)
                return "resolved:returned"
            return Move(effs, apply, ev["event_id"])
        return Move([], lambda d: status, ev["event_id"])  # nothing this order's state can use
    # deadlines
    if status == "in_fulfilment" and d.get("authorized_at") and now > datetime.fromisoformat(
            d["authorized_at"]) + timedelta(days=s.capture_deadline_days):
        if fulfilment is None or fulfilment["status"] == "requested":
            stop = Effect(key(r, "cancel_fulfilment" + rnd), "warehouse", "cancel_fulfilment", r["item_id"],
                          r["trace_id"], {"effect_key": current(d, "fulfil"), "reason": "capture deadline"})
            return Move([stop], lambda d: status, None)
        if fulfilment["status"] == "cancelled":
            why = f"not shipped within {s.capture_deadline_days:g} days: the authorisation is voided"
            comp = undo(r, d, why, skip=("fulfil",))
            def apply(d):
                mark(d, why + "; stock released", by, now)
                return "resolved:expired"
            return Move(comp + [notice(r, "cancelled", why="We could not ship it in time.")], apply, None)
    if status == "exchange_requested" and now > datetime.fromisoformat(d["delivered_at"]) + timedelta(
            days=s.return_window_days):
        x = d["exchange"]
        tg = x["tag"]
        held = [Effect(key(r, f"release{tg}"), "inventory", "release", r["item_id"], r["trace_id"],
                       {"order_id": d["order_id"], "effect_key": x["keys"]["reserve"]})]
        if "authorize" in x["keys"]:
            held.append(Effect(key(r, f"void{tg}"), "payment_provider", "void", r["item_id"], r["trace_id"],
                               {"order_id": d["order_id"], "effect_key": x["keys"]["authorize"]}))

        def expire(d):
            d.pop("exchange", None)
            mark(d, "exchange expired: the items did not come back within the return window; what it held is "
                    "released", by, now)
            return "delivered"
        return Move(held + [_tag(notice(r, "request_refused", why="the items did not come back in time, so the "
                                         "exchange lapsed"), tg)], expire, None)
    if status == "delivered" and d.get("delivered_at"):
        delivered_at = datetime.fromisoformat(d["delivered_at"])
        if now >= delivered_at + timedelta(days=s.review_after_days) and not d.get("review_requested"):
            def apply(d):
                d["review_requested"] = now.isoformat()
                mark(d, "review requested", by, now)
                return status
            return Move([notice(r, "review_request")], apply, None)
        if now >= delivered_at + timedelta(days=s.return_window_days):
            def apply(d):
                mark(d, "return window closed: the order is complete", by, now)
                return "resolved:fulfilled"
            return Move([], apply, None)
    return None


def _new_lines(d: dict[str, Any], ev: dict[str, Any], shop) -> tuple[list[dict[str, Any]], list[str], str | None]:
    """The order's lines with ``item_ids`` swapped for ``new_item_ids`` (other options of the same product, in
    stock at the store), the skus swapped, or why the swap breaks the policy."""
    old, new = ev.get("item_ids") or [], ev.get("new_item_ids") or []
    skus = [ln["sku"] for ln in d["lines"]]
    if not old or len(old) != len(new):
        return [], [], "name each item to change (item_ids) and what it becomes (new_item_ids), one for one"
    if not set(old) <= set(skus):
        return [], [], "only items of this order can be changed"
    swap = dict(zip(old, new))
    lines = []
    for ln in d["lines"]:
        if ln["sku"] not in swap:
            lines.append(ln)
            continue
        v = shop.variants.get(swap[ln["sku"]])
        if v is None or v["product_id"] != ln["product_id"]:
            return [], [], "an item can only become another option of the same product"
        if swap[ln["sku"]] == ln["sku"]:
            return [], [], "the new item must be a different option"
        if not v["available"]:
            return [], [], f"the option {swap[ln['sku']]} of {v['name']} is not available"
        lines.append({**ln, "sku": swap[ln["sku"]], "price": v["price"]})
    return lines, old, None


def change_move(r: dict[str, Any], ev: dict[str, Any], facts: dict[str, Any], now: datetime, cfg: OrdersConfig,
                shop, refuse: Callable[[dict, str], Move]) -> Move:
    """The store's policy for changing an order, as a small saga of its own. New records first (a reservation of
    the new items, an authorisation of the new amount or method), the old ones given up only once the new ones
    stand (and, for items, once the warehouse stopped the old parcel); a change that cannot finish undoes its
    new records and is refused with the rule.

    - modify_payment (pending order): one other method of the customer's; a gift card must cover the total;
    - modify_items (pending order, once): other options of the same products, available; the new total
      authorised;
    - exchange (delivered order, within the return window): other options of the same products; a higher
      price authorised now and captured when the replacement ships, a lower one refunded when the return
      arrives; the replacement ships when the returned items are received."""
    d = r["data"]
    status, t = r["status"], ev["type"]
    tag = "#" + ev["item_id"].rsplit("-", 1)[1][:8]
    by = f"customer:{d['customer_ref'][:12]}"
    ch = d.get("change")
    recs = facts.get("records") or {}
    cust = shop.customers.get(d["customer_ref"])

    def eff(step: str, connector: str, action: str, **payload) -> Effect:
        return Effect(key(r, step), connector, action, r["item_id"], r["trace_id"], {"order_id": d["order_id"], **payload})

    def give_up(why: str, keys: dict[str, str]) -> Move:
        undo_new = ([eff(f"release{tag}", "inventory", "release", effect_key=keys["reserve"])] if "reserve" in keys else [])
        undo_new += ([eff(f"void{tag}", "payment_provider", "void", effect_key=keys["authorize"])]
                     if "authorize" in keys else [])
        m = refuse(ev, why)
        inner = m.apply

        def apply(dd):
            dd.pop("change", None)
            return inner(dd)
        return Move(undo_new + m.effects, apply, ev["event_id"])

    def refuse_change(why: str) -> Move:  # also withdraws what a crashed earlier attempt may have created
        return give_up(why, {"reserve": key(r, f"reserve{tag}"), "authorize": key(r, f"authorize{tag}")})

    if ch is None:  # phase 0: check the rules, then create the new records
        if t in ("modify_payment", "modify_items"):
            if status != "in_fulfilment" or (facts.get("fulfilment") or {}).get("status", "requested") != "requested":
                return refuse_change("only a pending order (not shipped yet) can be modified")
            if t == "modify_items" and d.get("items_modified"):
                return refuse_change("an order's items can be modified once")
        elif status != "delivered":
            return refuse_change(f"only a delivered order can be exchanged; this one is {status.replace('_', ' ')}")
        elif datetime.fromisoformat(ev["occurred_at"]) > datetime.fromisoformat(d["delivered_at"]) + timedelta(
                days=cfg.settings.return_window_days):
            return refuse_change(f"exchanges are accepted within {cfg.settings.return_window_days:g} days of delivery")
        method = ev.get("method_id") or d["method_id"]
        m = (cust.methods.get(method) if cust else None)
        if m is None:
            return refuse_change("the payment method is not one of the customer's")
        gift = m.get("balance") if m.get("source") == "gift_card" else None
        if t == "modify_payment":
            if method == d["method_id"]:
                return refuse_change("the new payment method must differ from the original one")
            new = {"authorize": key(r, f"authorize{tag}")}
            effects = [eff(f"authorize{tag}", "payment_provider", "authorize", method_id=method, amount=d["amount"],
                           gift_card_balance=gift, round=tag)]
            plan = {"method_id": method}
        else:
            lines, old, why = _new_lines(d, ev, shop)
            if why:
                return refuse_change(why)
            amount = round(sum(ln["price"] * ln["qty"] for ln in lines), 2)
            diff = round(amount - d["amount"], 2)
            new = {"reserve": key(r, f"reserve{tag}")}
            changed = [ln for ln in lines if ln["sku"] not in {x["sku"] for x in d["lines"]}]
            effects = [eff(f"reserve{tag}", "inventory", "reserve", round=tag,
                           lines=[{"sku": ln["sku"], "qty": ln["qty"]} for ln in (lines if t == "modify_items" else changed)])]
            pay = amount if t == "modify_items" else diff
            if pay > 0:
                new["authorize"] = key(r, f"authorize{tag}")
                effects.append(eff(f"authorize{tag}", "payment_provider", "authorize", method_id=method, amount=pay,
                                   gift_card_balance=gift, round=tag))
            plan = {"lines": lines, "amount": amount, "diff": diff, "old_skus": old, "method_id": method,
                    "returned": [ln for ln in d["lines"] if ln["sku"] in old], "replacement": changed}

        def start(dd):
            dd["change"] = {"event": ev["event_id"], "type": t, "tag": tag, "keys": new, **plan}
            mark(dd, f"{t.replace('_', ' ')} requested: new records asked for", by, now, event=ev["event_id"])
            return status
        return Move(effects, start, None)

    keys = ch["keys"]
    states = {k: (recs.get(v) or {}).get("status") for k, v in keys.items()}
    if None in states.values():  # the systems have not recorded the new ones yet
        return Move([], lambda dd: status, None)
    if states.get("reserve") == "short":
        return give_up("the new items are out of stock", {k: v for k, v in keys.items() if k != "reserve"})
    if states.get("authorize") in ("declined", "pending"):
        return give_up("the payment provider did not approve the new payment"
                       + (f" ({recs[keys['authorize']].get('reason')})" if recs[keys['authorize']].get("reason") else ""),
                       keys)
    if t == "modify_payment":
        def apply(dd):
            record_done(dd, f"authorize{tag}", keys["authorize"])
            dd.setdefault("current", {})["authorize"] = keys["authorize"]
            dd["method_id"] = ch["method_id"]
            dd.pop("change", None)
            mark(dd, "payment method changed: the new one authorised, the old one voided", by, now,
                 event=ev["event_id"])
            return status
        return Move([eff(f"void_previous{tag}", "payment_provider", "void", effect_key=current(d, "authorize")),
                     _tag(notice(r, "payment_changed"), tag)], apply, ev["event_id"])
    if t == "modify_items":
        ful = facts.get("fulfilment") or {}
        if ful.get("status") == "requested" and not ch.get("stop_asked"):  # stop the old parcel first
            def ask(dd):
                dd["change"]["stop_asked"] = True
                return status
            return Move([eff(f"cancel_fulfilment{tag}", "warehouse", "cancel_fulfilment",
                             effect_key=current(d, "fulfil"), reason="items modified")], ask, None)
        if ful.get("status") == "requested":  # asked, not answered yet
            return Move([], lambda dd: status, None)
        if ful.get("status") != "cancelled":
            return give_up("the parcel has already left the warehouse", keys)

        def apply(dd):
            record_done(dd, f"reserve{tag}", keys["reserve"])
            record_done(dd, f"authorize{tag}", keys["authorize"])
            record_done(dd, f"fulfil{tag}", key(r, f"fulfil{tag}"))
            dd["current"] = {**dd.get("current", {}), "reserve": keys["reserve"], "authorize": keys["authorize"],
                             "fulfil": key(r, f"fulfil{tag}")}
            dd.update(lines=ch["lines"], amount=ch["amount"], items_modified=True, method_id=ch["method_id"])
            dd.pop("change", None)
            mark(dd, f"items modified: new total {ch['amount']:.2f} authorised, the old parcel, reservation and "
                     "authorisation given up", by, now, event=ev["event_id"])
            return status
        return Move([eff(f"release_previous{tag}", "inventory", "release", effect_key=current(d, "reserve")),
                     eff(f"void_previous{tag}", "payment_provider", "void", effect_key=current(d, "authorize")),
                     eff(f"fulfil{tag}", "warehouse", "ship", round=tag,
                         lines=[{"sku": ln["sku"], "qty": ln["qty"]} for ln in ch["lines"]]),
                     _tag(notice(r, "items_changed"), tag)], apply, ev["event_id"])

    # exchange accepted: the customer sends the items back; the replacement ships when they arrive
    def accept(dd):
        dd["exchange"] = {**{k: ch[k] for k in ("lines", "amount", "diff", "returned", "replacement", "method_id")},
                          "tag": tag,
                          "keys": keys, "event": ev["event_id"]}
        dd.pop("change", None)
        mark(dd, f"exchange requested: {len(ch['returned'])} item(s); price difference {ch['diff']:+.2f}", by, now,
             event=ev["event_id"])
        return "exchange_requested"
    return Move([_tag(notice(r, "return_instructions"), tag)], accept, ev["event_id"])


def _tag(e: Effect, rnd: str) -> Effect:
    """A notice of a later round (an exchange's replacement parcel) under its own key."""
    if rnd:
        e.idempotency_key += rnd.replace("#", "_")
        e.payload["kind"] = e.payload["kind"][:20] + rnd.replace("#", "_")[:10]
    return e


def _once(e: Effect, ev: dict[str, Any]) -> Effect:
    """A notice about one event (a customer may have several requests refused): keyed by the event too."""
    tag = ev["item_id"].rsplit("-", 1)[1][:8]
    e.idempotency_key += f"_{tag}"
    e.payload["kind"] = e.payload["kind"].replace("request_refused", "refused") + f"_{tag}"
    return e


def settle_stage(env: StageEnv, cfg: OrdersConfig, connectors, *, now: datetime | None = None,
                 max_passes: int = 8) -> StageReport:
    """See the module docstring: apply each order's arrived events and passed deadlines, one move at a time,
    each move's effects delivered before its state changes (a move whose effects cannot go out yet waits)."""
    from .store import directory

    started = utcnow()
    now = now or started
    rows = load_stage_items(env, "settle")
    policy = cfg.connector_policy
    if not rows:
        return _finish(env, "settle", started, rows, [], connectors, cfg)
    shop = directory()
    evs = order_events(env, [r["data"]["order_id"] for r in rows])
    live = {r["item_id"]: {**r, "data": dict(r["data"])} for r in rows}
    changed, counts = set(), Counter()
    for _ in range(max_passes):
        ship_keys = [current(r["data"], "fulfil") for r in live.values() if current(r["data"], "fulfil")]
        ful, unread = _read(connectors, "warehouse", "fulfilments", ship_keys)
        change_keys = {k for r in live.values() for k in ((r["data"].get("change") or {}).get("keys") or {}).values()}
        tx, unread_tx = _read(connectors, "payment_provider", "transactions", sorted(change_keys))
        res, unread_res = _read(connectors, "inventory", "reservations", sorted(change_keys))
        if unread or unread_tx or unread_res:  # without the systems' word nothing can be decided: wait
            counts["systems_unreachable"] += 1
            break
        moves = {}
        for iid, r in live.items():
            if r["status"] in ("resolved", "dead_lettered"):
                continue
            facts = {"fulfilment": ful.get(current(r["data"], "fulfil")), "records": {**tx, **res}}
            m = next_move(r, evs[r["data"]["order_id"]], facts, now, cfg, shop)
            if m is not None:
                moves[iid] = m
        if not moves:
            break
        states = deliver_effects(env, connectors, [e for m in moves.values() for e in m.effects], policy)
        progressed = False
        for iid, m in moves.items():
            r = live[iid]
            # a notice to the customer does not hold the order up: it stays in the outbox until it goes out
            st = [states.get(e.idempotency_key, {}) for e in m.effects if e.connector != "messaging"]
            if all(x.get("status") == "delivered" for x in st):
                d = r["data"]
                new = m.apply(d)
                if m.event:
                    d.setdefault("saga", {"done": [], "events": [], "undone": []}).setdefault("events", []).append(m.event)
                if new == "in_fulfilment_delivered":  # delivered before its shipped event: ship now, deliver next
                    new = "shipped"
                if new and new.startswith("resolved:"):
                    d["outcome"] = new.split(":", 1)[1]
                    new = "resolved"
                progressed = progressed or new != r["status"] or bool(m.event) or bool(m.effects)
                if new != r["status"] or m.event or m.effects:
                    changed.add(iid)
                    counts[new] += new != r["status"]
                r["status"] = new
            else:
                # after the goods moved nothing is undone automatically: a capture, refund or stop that keeps
                # failing is retried (fresh attempts each pass, behind the breaker) and counted until it goes
                counts["waiting_on_connector"] += 1
                counts["effects_failing_for_good"] += sum(1 for x in st if failed_for_good(x, policy))
        if not progressed:
            break
    updates, effects = [], []
    for iid in changed:
        r = live[iid]
        d = r["data"]
        if d.get("shipped_at") and not d.get("captured_in_run"):  # revenue per run (the KPI report)
            d["captured_in_run"] = env.run_id or "outside a run"
        if r["status"] == "resolved":
            updates.append(ItemUpdate(iid, "resolved", d, "ok", columns={"resolved_at": now}))
        else:
            updates.append(ItemUpdate(iid, r["status"], d, "waiting"))
    md = {"orders_open": len(rows), "moved": len(changed), **{f"now_{k}": v for k, v in counts.items() if k}}
    return _finish(env, "settle", started, rows, updates, connectors, cfg, effects=effects, md=md)


def advance_stage(env: StageEnv, cfg: OrdersConfig, connectors) -> StageReport:
    """The ops job's pass over every partition: effects still in the outbox go out again, orders that waited on
    a system (an outage, a late payment answer) take their step again, and every order waiting in settle takes
    the events that arrived and the deadlines that passed (the durable wait, without a held run)."""
    started = utcnow()
    sent = dispatch(env.db, connectors, env.flow, policy=cfg.connector_policy)
    everywhere = env.across_partitions()
    n_in, outcomes, md = 0, Counter(), {"redelivered": sent["delivered"], "still_failing": sent["failed"]}
    for name, fn in (("reserve", reserve_stage), ("authorize", authorize_stage), ("fulfil", fulfil_stage),
                     ("settle", settle_stage)):
        rep = fn(everywhere, cfg, connectors)
        n_in += rep.n_in
        outcomes.update(rep.outcomes)
        md[f"{name}_items"] = rep.n_in
        md.update({f"{name}_{k}": v for k, v in rep.metadata.items() if isinstance(v, (int, float)) and v})
    return StageReport("advance", n_in, outcomes, (utcnow() - started).total_seconds() * 1000.0, md)
