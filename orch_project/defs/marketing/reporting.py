"""The marketing program's KPIs on top of the platform's (lib/kpis.py): mentions and sentiment by day and topic,
share of voice against the competitors the brief names, what the filters removed, complaint hand-offs to
support, assets approved vs rejected, publish success, spend and conversions by channel (from the channels'
reporting) and the budget allocation over time."""

from __future__ import annotations

from collections import Counter, defaultdict
from datetime import datetime
from pathlib import Path
from typing import Any

from ...lib import kpis
from ...lib.kpis import KpiReport, pct


def _channels_state() -> tuple[list[dict[str, Any]], dict[str, dict[str, float]], str | None]:
    """(metrics, budgets, None), or empty ones and why when the channels do not answer: the report is still
    written, and says so."""
    from ...lib.connectors.embedded import ConnectorUnavailable
    from ...lib.settings import Settings
    from ..resources import _embedded

    client = _embedded(Settings.from_env().connectors_url)
    try:
        return client.read("marketing_channels", "metrics"), client.read("marketing_channels", "budgets"), None
    except ConnectorUnavailable as exc:
        return [], {}, f"the channels did not answer ({exc})"


def marketing_kpis(it, cfg) -> dict[str, Any]:
    from ...lib import allocation

    s = cfg.settings
    k: dict[str, Any] = {}
    live = list(it["data"]) if len(it) else []
    statuses = list(it["status"]) if len(it) else []
    posts = [d for d in live if d.get("kind") == "post"]
    kept = [d for d in posts if not d.get("filtered") and d.get("sentiment")]
    days = list(it["day"]) if len(it) else []
    by_day: dict[str, Counter] = defaultdict(Counter)
    for d, day in zip(live, days):
        if d.get("kind") == "post" and not d.get("filtered") and d.get("sentiment"):
            by_day[str(day)][d["sentiment"]["label"]] += 1
    k["mentions_by_day"] = {day: dict(c) for day, c in sorted(by_day.items())}
    k["posts_received"] = len(posts)
    k["posts_kept"] = len(kept)
    k["filtered"] = dict(Counter(d["filtered"]["kind"] for d in posts if d.get("filtered")))
    by_topic: dict[str, Counter] = defaultdict(Counter)
    for d in kept:
        if d.get("topic"):
            by_topic[d["topic"]["id"]][d["sentiment"]["label"]] += 1
    k["sentiment_by_topic"] = {t: dict(c) for t, c in sorted(by_topic.items(), key=lambda kv: -sum(kv[1].values()))}
    named = Counter(b for d in kept for b in d.get("brands") or [])
    total = sum(named.values())
    k["share_of_voice"] = {b: named[b] / total for b in [s.brand, *s.competitors]} if total else {}
    k["complaint_handoffs"] = sum(1 for d in posts if d.get("handed_to"))
    k["urgent_by_kind"] = dict(Counter(d["urgency"]["kind"] for d in posts if d.get("urgency")))
    assets = [(d, st) for d, st in zip(live, statuses) if d.get("kind") == "asset_request"]
    k["assets"] = dict(Counter(st for _, st in assets))
    k["assets_approved"] = sum(1 for d, st in assets if st in ("approved", "scheduled", "resolved"))
    k["assets_rejected"] = sum(1 for _, st in assets if st == "rejected")
    published = [d for d, st in assets if st == "resolved"]
    tried = [d for d, st in assets if st in ("resolved", "dead_lettered")]
    k["assets_published"] = len(published)
    k["publish_success"] = len(published) / len(tried) if tried else None
    k["assets_scheduled"] = sorted((d["channel"], d["slot"][:16]) for d, st in assets if st == "scheduled")
    metrics, budgets, k["channels_unavailable"] = _channels_state()
    k["by_channel"] = allocation.performance_table(metrics, ("channel",)) if metrics else []
    k["spend_by_day"] = {}
    for r in metrics:
        k["spend_by_day"].setdefault(r["date"], Counter())[r["channel"]] += float(r["spend"])
    k["allocation_over_time"] = dict(sorted(budgets.items()))
    allocs = [(d, st) for d, st in zip(live, statuses) if d.get("kind") == "allocation"]
    k["allocations"] = [{"period": d["period"], "status": st, "max_shift": d.get("max_shift"),
                         "allocation": d["allocation"]} for d, st in allocs]
    return k


def _rows(k: dict[str, Any]) -> list[str]:
    sov = ", ".join(f"{b} {pct(v)}" for b, v in k["share_of_voice"].items()) or "-"
    bc = {r["channel"]: r for r in k["by_channel"]}
    return [
        f"| posts received / kept after filters | {k['posts_received']} / {k['posts_kept']} |",
        f"| filtered (language, spam, bot) | {k['filtered'].get('language', 0)} / {k['filtered'].get('spam', 0)} / "
        f"{k['filtered'].get('bot', 0)} |",
        f"| share of voice | {sov} |",
        f"| complaints and outage reports handed to support | {k['complaint_handoffs']} |",
        f"| assets approved / rejected / published | {k['assets_approved']} / {k['assets_rejected']} / "
        f"{k['assets_published']} |",
        f"| publish success | {pct(k['publish_success'])} |",
        f"| spend / conversions (all channels) | {sum(r['spend'] for r in bc.values()):,.0f} / "
        f"{sum(r['conversions'] for r in bc.values()):,.0f} |",
    ]


def _iv(x) -> str:
    return "-" if not x or x[0] is None or x[1] is None else f"{x[0]:.3g}-{x[1]:.3g}"


def _sections(k: dict[str, Any]) -> list[str]:
    lines = ["", "#### Sentiment by topic", "", "| topic | negative | neutral | positive |", "|---|---|---|---|"]
    lines += [f"| {t} | {c.get('negative', 0)} | {c.get('neutral', 0)} | {c.get('positive', 0)} |"
              for t, c in list(k["sentiment_by_topic"].items())[:12]]
    lines += ["", "#### Channels (90 % intervals)", "",
              "| channel | spend | conversions | CTR | CVR | CPA | ROAS |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['channel']} | {r['spend']:,.0f} | {r['conversions']:.0f} | {pct(r['ctr'])} ({_iv(r['ctr_interval'])}) | "
              f"{pct(r['cvr'])} ({_iv(r['cvr_interval'])}) | {r['cpa'] or 0:,.2f} ({_iv(r['cpa_interval'])}) | "
              f"{r['roas'] or 0:.2f} ({_iv(r['roas_interval'])}) |" for r in k["by_channel"]] or [
        f"| - | {k['channels_unavailable'] or 'no reporting yet'} | | | | | |"]
    lines += ["", "#### Budget allocations", "", "| period | status | largest shift | allocation |", "|---|---|---|---|"]
    lines += [f"| {a['period']} | {a['status']} | {pct(a['max_shift'])} | "
              + ", ".join(f"{c} {v:,.0f}" for c, v in sorted(a["allocation"].items())) + " |" for a in k["allocations"]]
    if k["assets_scheduled"]:
        lines += ["", "#### Content calendar (scheduled)", "", "| channel | slot (UTC) |", "|---|---|"]
        lines += [f"| {c} | {t} |" for c, t in k["assets_scheduled"]]
    return lines


def _charts(k: dict[str, Any]):
    def extra(it, save) -> None:
        import matplotlib.pyplot as plt

        colors = {"negative": "#C44E52", "neutral": "#999999", "positive": "#55A868"}
        by_day = k["mentions_by_day"]
        if by_day:
            fig, ax = plt.subplots(figsize=(8, 3.4))
            days = list(by_day)
            bottom = [0] * len(days)
            for lab in ("negative", "neutral", "positive"):
                vals = [by_day[d].get(lab, 0) for d in days]
                ax.bar(days, vals, bottom=bottom, color=colors[lab], label=lab)
                bottom = [b + v for b, v in zip(bottom, vals)]
            ax.set_title("Mentions by day and sentiment")
            ax.tick_params(axis="x", rotation=60, labelsize=7)
            ax.legend(fontsize=8)
            save(fig, "mentions_by_day.png")
        topics = list(k["sentiment_by_topic"].items())[:10]
        if topics:
            fig, ax = plt.subplots(figsize=(7, 3.6))
            names = [t for t, _ in topics]
            left = [0] * len(names)
            for lab in ("negative", "neutral", "positive"):
                vals = [c.get(lab, 0) for _, c in topics]
                ax.barh(names, vals, left=left, color=colors[lab], label=lab)
                left = [a + b for a, b in zip(left, vals)]
            ax.invert_yaxis()
            ax.set_title("Sentiment by topic")
            ax.legend(fontsize=8)
            save(fig, "sentiment_by_topic.png")
        if k["by_channel"]:
            fig, axes = plt.subplots(1, 2, figsize=(9, 3.4))
            ch = [r["channel"] for r in k["by_channel"]]
            axes[0].bar(ch, [r["spend"] for r in k["by_channel"]], color="#4C72B0")
            axes[0].set_title("Spend by channel")
            cpa = [r["cpa"] or 0 for r in k["by_channel"]]
            err = [[max(0.0, c - (r["cpa_interval"][0] or c)) for c, r in zip(cpa, k["by_channel"])],
                   [max(0.0, (r["cpa_interval"][1] or c) - c) for c, r in zip(cpa, k["by_channel"])]]
            axes[1].bar(ch, cpa, yerr=err, capsize=4, color="#DD8452")
            axes[1].set_title("Cost per conversion (90 % interval)")
            save(fig, "channels.png")
        alloc = k["allocation_over_time"]
        if alloc:
            fig, ax = plt.subplots(figsize=(6.5, 3.4))
            periods = list(alloc)
            chans = sorted({c for a in alloc.values() for c in a})
            bottom = [0.0] * len(periods)
            for c in chans:
                vals = [alloc[p].get(c, 0.0) for p in periods]
                ax.bar(periods, vals, bottom=bottom, label=c)
                bottom = [b + v for b, v in zip(bottom, vals)]
            ax.set_title("Budget allocation by week")
            ax.legend(fontsize=8)
            save(fig, "allocation_over_time.png")
    return extra


def kpi_report(db, spec, reports_dir: Path, now: datetime | None = None) -> KpiReport:
    return kpis.flow_report(db, spec, reports_dir, now, lambda fr: marketing_kpis(fr[0], spec.config), _rows,
                            _sections, _charts)
