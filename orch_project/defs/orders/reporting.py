"""The order flow's KPIs on top of the platform's (lib/kpis.py): revenue by day (captured less refunded) and per
run (what each run captured), the
saga's cycle time by step (p50/p95), payment decline, fraud review and refusal, out-of-stock and return rates,
refund time, and the compensations run."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

from ...lib import kpis
from ...lib.kpis import KpiReport, pct


def _q(xs: list[float], q: float) -> float | None:
    if not xs:
        return None
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def order_kpis(it) -> dict[str, Any]:
    live = list(it["data"]) if len(it) else []
    orders = [d for d in live if d.get("kind") == "order"]
    k: dict[str, Any] = {"orders": len(orders), "events": sum(d.get("kind") == "event" for d in live)}
    outcomes = Counter(d.get("outcome") for d in orders if d.get("outcome"))
    k["outcomes"] = dict(outcomes)
    scored = [d for d in orders if d.get("fraud")]
    reviewed = [d for d in scored if any("fraud review" in t["what"] for t in d.get("timeline", []))]
    k["fraud_review_rate"] = len(reviewed) / len(scored) if scored else None
    k["fraud_refusal_rate"] = outcomes["refused"] / len(scored) if scored else None
    authorised = [d for d in orders if any(s == "authorize" for s, _ in (d.get("saga") or {}).get("done", []))]
    tried = len(authorised) + outcomes["payment_declined"] + outcomes["payment_timeout"]
    k["payment_decline_rate"] = outcomes["payment_declined"] / tried if tried else None
    k["payment_failure_rate"] = (outcomes["payment_declined"] + outcomes["payment_timeout"]) / tried if tried else None
    reserved = [d for d in orders if any(s == "reserve" for s, _ in (d.get("saga") or {}).get("done", []))]
    k["out_of_stock_rate"] = ((outcomes["out_of_stock"] + sum(bool(d.get("dropped_lines")) for d in reserved))
                              / (len(reserved) + outcomes["out_of_stock"]) if reserved or outcomes["out_of_stock"] else None)
    delivered = [d for d in orders if d.get("delivered_at")]
    k["return_rate"] = sum(bool(d.get("return")) for d in delivered) / len(delivered) if delivered else None
    revenue: dict[str, float] = defaultdict(float)
    for d in orders:
        if d.get("shipped_at"):
            revenue[d["shipped_at"][:10]] += d["amount"]
        if d.get("refunded"):
            revenue[(d.get("timeline") or [{}])[-1].get("at", "")[:10]] -= d["refunded"]
    k["revenue_by_day"] = {day: round(v, 2) for day, v in sorted(revenue.items()) if day}
    by_run: dict[str, float] = defaultdict(float)
    for d in orders:
        if d.get("captured_in_run"):
            by_run[d["captured_in_run"]] += d.get("amount", 0.0)
    k["revenue_by_run"] = {run[:8]: round(v, 2) for run, v in sorted(by_run.items(), key=lambda kv: -kv[1])[:10]}
    k["revenue"] = round(sum(revenue.values()), 2)
    steps: dict[str, list[float]] = defaultdict(list)
    refund_h = []
    for d in orders:
        tl = d.get("timeline") or []
        for a, b in zip(tl, tl[1:]):
            step = b["what"].split(":")[0][:40]
            steps[step].append((datetime.fromisoformat(b["at"]) - datetime.fromisoformat(a["at"])).total_seconds())
        ret = d.get("return") or {}
        if ret.get("requested_at") and ret.get("refunded_at"):  # the customer's request to the money back
            refund_h.append((datetime.fromisoformat(ret["refunded_at"])
                             - datetime.fromisoformat(ret["requested_at"])).total_seconds() / 3600)
    k["cycle_time_s"] = {s: {"p50": round(_q(v, .5), 1), "p95": round(_q(v, .95), 1), "n": len(v)}
                         for s, v in sorted(steps.items(), key=lambda kv: -len(kv[1]))[:10]}
    k["refund_time_h_p50"] = _q(refund_h, .5)
    k["compensations_run"] = dict(Counter(u.split("#")[0] for d in orders for u in (d.get("saga") or {}).get("undone", [])))
    k["requests_refused"] = dict(Counter(x["type"] for d in orders for x in d.get("refusals", [])))
    return k


def _rows(k: dict[str, Any]) -> list[str]:
    return [f"| orders | {k['orders']} (events {k['events']}) |",
            f"| outcomes | {', '.join(f'{o} {n}' for o, n in sorted(k['outcomes'].items())) or 'none yet'} |",
            f"| revenue (captured less refunded) | {k['revenue']:,.2f} |",
            f"| revenue captured per run (top runs) | "
            f"{', '.join(f'{r} {v:,.2f}' for r, v in k['revenue_by_run'].items()) or 'none yet'} |",
            f"| payment decline rate / failure rate (declined or no answer) | {pct(k['payment_decline_rate'])} / "
            f"{pct(k['payment_failure_rate'])} |",
            f"| fraud review rate / refusal rate | {pct(k['fraud_review_rate'])} / {pct(k['fraud_refusal_rate'])} |",
            f"| out-of-stock rate | {pct(k['out_of_stock_rate'])} |",
            f"| return rate | {pct(k['return_rate'])} |",
            f"| refund time p50 | {kpis.num(k['refund_time_h_p50'], ' h')} |",
            f"| compensations run | {', '.join(f'{c} {n}' for c, n in sorted(k['compensations_run'].items())) or 'none'} |",
            f"| customer requests refused | {', '.join(f'{c} {n}' for c, n in sorted(k['requests_refused'].items())) or 'none'} |"]


def _sections(k: dict[str, Any]) -> list[str]:
    if not k["cycle_time_s"]:
        return []
    return ["", "#### Cycle time by saga step (seconds since the step before)", "", "| step | p50 | p95 | orders |",
            "|---|---|---|---|", *(f"| {s} | {v['p50']} | {v['p95']} | {v['n']} |" for s, v in k["cycle_time_s"].items())]


def _charts(k: dict[str, Any]):
    def extra(it, save) -> None:
        import matplotlib.pyplot as plt

        if k["revenue_by_day"]:
            fig, ax = plt.subplots(figsize=(7, 3.2))
            days = list(k["revenue_by_day"])
            ax.bar(days, [k["revenue_by_day"][d] for d in days], color="#2a7")
            ax.set_title("Revenue by day (captured less refunded)")
            ax.tick_params(axis="x", rotation=45)
            save(fig, "revenue_by_day.png")
        if k["outcomes"]:
            fig, ax = plt.subplots(figsize=(6.5, 3.2))
            names = sorted(k["outcomes"], key=lambda o: -k["outcomes"][o])
            ax.barh(names, [k["outcomes"][o] for o in names], color="#47a")
            ax.set_title("Orders by outcome")
            save(fig, "outcomes.png")
    return extra


def kpi_report(db, spec, reports_dir: Path, now: datetime | None = None) -> KpiReport:
    return kpis.flow_report(db, spec, reports_dir, now, lambda fr: order_kpis(fr[0]), _rows, _sections, _charts)
