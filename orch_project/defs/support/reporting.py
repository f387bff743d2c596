"""Insights to the backlog and the support loop's own KPIs (CSAT, intents, A/B arms) on top of the
platform's (lib/kpis.py). pandas and matplotlib are imported inside the functions so loading the
code location stays fast."""

from __future__ import annotations

import html
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ...lib import kpis
from ...lib.kpis import KpiReport, num, pct
from ...lib.store import Database, backlog, utcnow

FLOW = "support"
DATA_KEYS = ("intent", "priority", "queue", "csat", "confidence", "survey_sent_at", "customer_ref")


def _frames(db: Database):
    fr = kpis.frames(db, FLOW, DATA_KEYS)
    it = fr[0]
    if not it.empty:
        it["arm"] = it["data"].apply(lambda d: (d.get("experiment") or {}).get("arm"))
        it["experiment"] = it["data"].apply(lambda d: (d.get("experiment") or {}).get("name"))
    return fr


# --- insights --------------------------------------------------------------------------

def insights(db: Database, now: datetime | None = None, *, window_days: int = 7) -> dict[str, Any]:
    """Top intents, rising intents and worst-CSAT intents, upserted into the backlog table."""
    now = now or utcnow()
    it, *_ = _frames(db)
    found: list[dict[str, Any]] = []
    if not it.empty and it["intent"].notna().any():
        tri = it[it["intent"].notna()]
        days = sorted(tri["day"].unique())
        recent = tri[tri["day"].isin(days[-window_days:])]
        for intent, n in recent["intent"].value_counts().head(5).items():
            found.append({"kind": "top_intent", "key": intent, "score": float(n),
                          "title": f"Top intent: {intent} ({n} messages in the last {min(window_days, len(days))} days)",
                          "detail": {"count": int(n)}})
        if len(days) >= 2:
            per_day = tri.groupby(["day", "intent"]).size().unstack(fill_value=0).reindex(days, fill_value=0)
            last, before = per_day.iloc[-1], per_day.iloc[:-1].mean()
            ratio = (last + 1) / (before + 1)
            rising = ratio[(last >= 3) & (ratio >= 1.5)].sort_values(ascending=False).head(5)
            for intent, r in rising.items():
                found.append({"kind": "rising_intent", "key": intent, "score": round(float(r), 3),
                              "title": f"Rising: {intent} x{r:.1f} on {days[-1]} vs the earlier daily mean",
                              "detail": {"last_day": days[-1], "last": int(last[intent]),
                                         "earlier_mean": round(float(before[intent]), 2)}})
        rated = tri[tri["csat"].notna()]
        if not rated.empty:
            g = rated.groupby("intent")["csat"].agg(["mean", "count"])
            worst = g[g["count"] >= 3].sort_values("mean").head(5)
            for intent, row in worst.iterrows():
                found.append({"kind": "worst_csat", "key": intent, "score": round(float(row["mean"]), 3),
                              "title": f"Low CSAT: {intent} averages {row['mean']:.2f}/5 over {int(row['count'])} answers",
                              "detail": {"mean": round(float(row["mean"]), 3), "responses": int(row["count"])}})
    with db.begin() as conn:
        for f in found:
            existing = conn.execute(sa.select(backlog.c.id).where(
                backlog.c.flow == FLOW, backlog.c.kind == f["kind"], backlog.c.key == f["key"])).scalar()
            if existing is None:
                conn.execute(backlog.insert().values(flow=FLOW, created_at=now, updated_at=now, **f))
            else:
                conn.execute(backlog.update().where(backlog.c.id == existing).values(updated_at=now, **f))
    return {"items": found}


# --- KPI report --------------------------------------------------------------------------

REOPEN_WINDOW_DAYS = 7


def experiment_kpis(it, ap) -> list[dict[str, Any]]:
    """Outcomes per A/B arm. An item *wins* when it was resolved, its draft went out without a
    reviewer's edit, the customer did not come back within REOPEN_WINDOW_DAYS (a re-open: another
    message from the same customer reference after resolution) and its CSAT, if answered, is >= 4."""
    import pandas as pd

    if it.empty or "arm" not in it or it["arm"].isna().all():
        return []
    edited = set(ap.loc[ap["edited"].astype(bool), "item_id"]) if not ap.empty else set()
    by_customer = it.dropna(subset=["customer_ref"]).groupby("customer_ref")["received_at"].apply(sorted).to_dict()

    def reopened(row) -> bool:
        if pd.isna(row["resolved_at"]):
            return False
        later = by_customer.get(row["customer_ref"], [])
        end = row["resolved_at"] + pd.Timedelta(days=REOPEN_WINDOW_DAYS)
        return any(row["resolved_at"] < t <= end for t in later)

    out = []
    for (name, arm), g in it.dropna(subset=["arm"]).groupby(["experiment", "arm"]):
        res = g[g["status"] == "resolved"]
        reo = res.apply(reopened, axis=1) if len(res) else pd.Series(False, index=res.index, dtype=bool)
        no_edit = ~res["item_id"].isin(edited)
        csat_ok = res["csat"].isna() | (res["csat"].astype(float) >= 4)
        wins = int((no_edit & ~reo & csat_ok).sum()) if len(res) else 0
        rated = res["csat"].dropna()
        out.append({"experiment": name, "arm": arm, "items": int(len(g)), "resolved": int(len(res)),
                    "approved_without_edit_rate": float(no_edit.mean()) if len(res) else None,
                    "csat_mean": float(rated.astype(float).mean()) if len(rated) else None,
                    "reopen_rate": float(reo.mean()) if len(res) else None,
                    "wins": wins, "win_rate": wins / len(res) if len(res) else None})
    return out


def _spec():
    from .flow import SPEC

    return SPEC


def compute_kpis(db: Database, cfg: Any = None, now: datetime | None = None) -> tuple[dict[str, Any], Any]:
    """The platform's KPIs of the support flow plus CSAT and the A/B arms' outcomes. The thresholds come
    from the flow spec's config; ``cfg`` is accepted for callers that pass the flow config and not read."""
    fr = _frames(db)
    it, _st, _ik, _dl, _lc, ap = fr
    k = kpis.base_kpis(_spec(), fr, now)
    k["experiments"] = experiment_kpis(it, ap)
    res = it[it["status"] == "resolved"] if not it.empty else it
    if len(res):
        surveyed = res["survey_sent_at"].notna().sum()
        rated = res["csat"].dropna()
        k["csat_mean"] = float(rated.mean()) if len(rated) else None
        k["csat_response_rate"] = float(len(rated) / surveyed) if surveyed else None
        k["csat_responses"] = int(len(rated))
    else:
        k.update(csat_mean=None, csat_response_rate=None, csat_responses=0)
    return k, it


def _rows(k: dict[str, Any]) -> list[str]:
    return [f"| CSAT mean (responses) | {num(k['csat_mean'], '/5', 2)} ({k['csat_responses']}) |",
            f"| CSAT response rate | {pct(k['csat_response_rate'])} |"]


def _sections(k: dict[str, Any]) -> list[str]:
    if not k["experiments"]:
        return []
    lines = ["", "#### A/B experiments (win = resolved, sent without edit, not re-opened, CSAT >= 4 if answered)",
             "", "| experiment | arm | items | resolved | no-edit rate | CSAT mean | re-open rate | win rate |",
             "|---|---|---|---|---|---|---|---|"]
    for e in k["experiments"]:
        lines.append(f"| {e['experiment']} | {e['arm']} | {e['items']} | {e['resolved']} | "
                     f"{pct(e['approved_without_edit_rate'])} | {num(e['csat_mean'], '', 2)} | "
                     f"{pct(e['reopen_rate'])} | {pct(e['win_rate'])} |")
    return lines


def _charts(it, save) -> None:
    import matplotlib.pyplot as plt

    if not it.empty and it["intent"].notna().any():  # none yet when every item failed before triage
        fig, ax = plt.subplots(figsize=(7, 3.5))
        it["intent"].dropna().value_counts().head(12).sort_values().plot.barh(ax=ax, color="#4C72B0")
        ax.set_title("Top intents")
        save(fig, "top_intents.png")
    if not it.empty and it["csat"].notna().any():
        fig, ax = plt.subplots(figsize=(5, 3))
        it["csat"].dropna().astype(int).value_counts().reindex(range(1, 6), fill_value=0).plot.bar(ax=ax,
                                                                                                    color="#55A868")
        ax.set_title("CSAT answers")
        save(fig, "csat.png")


def kpi_report(db: Database, spec: Any, reports_dir: Path, now: datetime | None = None) -> KpiReport:
    k, it = compute_kpis(db, spec.config, now)
    out = Path(reports_dir) / FLOW
    md = kpis.markdown("Support loop", k, _rows(k), _sections(k))
    charts = kpis.charts(k, it, out / "charts", extra=_charts)
    with db.begin() as conn:
        backlog_rows = conn.execute(sa.select(backlog.c.kind, backlog.c.title).where(backlog.c.flow == FLOW)
                                    .order_by(backlog.c.kind, backlog.c.score.desc())).all()
    extra = []
    if backlog_rows:
        extra.append("<h2>Insights in the backlog</h2><ul>" +
                     "".join(f"<li><b>{html.escape(kind)}</b>: {html.escape(title)}</li>" for kind, title in backlog_rows)
                     + "</ul>")
    return kpis.write_report(FLOW, "Support loop", k, md, charts, out, extra)
