"""Insights to the backlog and the KPI report of the support loop (pandas + matplotlib, both
imported inside the functions so loading the code location stays fast)."""

from __future__ import annotations

import html
import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ...lib.store import Database, approvals, backlog, dlq, intake, item_stages, items, llm_calls, utcnow
from .logic import FLOW, FLOW_STAGES, IN_PROGRESS_STATUSES, SupportConfig


def _frames(db: Database):
    import pandas as pd

    with db.begin() as conn:
        it = pd.read_sql(sa.select(items.c.item_id, items.c.day, items.c.status, items.c.stage, items.c.received_at,
                                   items.c.ingested_at, items.c.resolved_at, items.c.due_at, items.c.escalated_at,
                                   items.c.data).where(items.c.flow == FLOW), conn)
        st = pd.read_sql(sa.select(item_stages.c.stage, item_stages.c.run_id, item_stages.c.duration_ms,
                                   item_stages.c.attempt, item_stages.c.outcome).where(item_stages.c.flow == FLOW), conn)
        ik = pd.read_sql(sa.select(intake.c.day, intake.c.outcome).where(intake.c.flow == FLOW), conn)
        dl = pd.read_sql(sa.select(dlq.c.stage, dlq.c.error_type, dlq.c.status).where(dlq.c.flow == FLOW), conn)
        lc = pd.read_sql(sa.select(llm_calls.c.run_id, llm_calls.c.item_id, llm_calls.c.task,
                                   llm_calls.c.provider, llm_calls.c.model, llm_calls.c.input_tokens,
                                   llm_calls.c.output_tokens, llm_calls.c.cached, llm_calls.c.cache_kind,
                                   llm_calls.c.ok, llm_calls.c.error, llm_calls.c.route_rank, llm_calls.c.repair,
                                   llm_calls.c.cost_usd)
                         .where(llm_calls.c.flow == FLOW), conn)
        ap = pd.read_sql(sa.select(approvals.c.item_id, approvals.c.status, approvals.c.edited, approvals.c.reason)
                         .where(approvals.c.flow == FLOW), conn)
    if not it.empty:
        for col in ("received_at", "ingested_at", "resolved_at", "due_at", "escalated_at"):
            it[col] = pd.to_datetime(it[col], utc=True)
        data = it["data"].apply(lambda d: d if isinstance(d, dict) else json.loads(d))
        for key in ("intent", "priority", "queue", "csat", "confidence", "survey_sent_at", "customer_ref"):
            it[key] = data.apply(lambda d, k=key: d.get(k))
        it["arm"] = data.apply(lambda d: (d.get("experiment") or {}).get("arm"))
        it["experiment"] = data.apply(lambda d: (d.get("experiment") or {}).get("name"))
    return it, st, ik, dl, lc, ap


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

@dataclass
class KpiReport:
    kpis: dict[str, Any]
    markdown: str
    html_path: Path
    charts: list[Path]


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.1f}%"


def _num(x: float | None, unit: str = "", digits: int = 1) -> str:
    return "n/a" if x is None else f"{x:.{digits}f}{unit}"


def llm_kpis(lc) -> dict[str, Any]:
    """Tokens, cost, cache hit rates and the router's model-selection record from the call ledger."""
    if lc.empty:
        return {"tokens_per_run_mean": None, "tokens_per_run_max": None, "tokens_total": 0, "cost_usd_total": 0.0,
                "cost_per_run_mean": None, "cache_hit_rate": None, "exact_cache_hit_rate": None,
                "semantic_cache_hit_rate": None, "llm_calls": 0, "llm_errors": {}, "model_selection": []}
    run = lc["run_id"].fillna("none")
    per_run = (lc["input_tokens"] + lc["output_tokens"]).groupby(run).sum()
    cost_run = lc["cost_usd"].groupby(run).sum()
    cached = lc["cached"].astype(bool)
    # one request = one (run, item, task); a cache row answers it, otherwise one or more calls do
    requests = max(1, len(lc[["run_id", "item_id", "task"]].drop_duplicates()))
    calls = lc[~cached]
    first = calls[(calls["route_rank"] == 0) & ~calls["repair"].astype(bool) & (calls["error"] != "circuit_open")]
    selection = []
    for (task, provider, model), g in first.groupby(["task", "provider", "model"]):
        wins = int(g["ok"].astype(bool).sum())
        selection.append({"task": task, "model": f"{provider}:{model}", "first_choice": int(len(g)), "wins": wins,
                          "win_rate": wins / len(g)})
    for (task, provider, model), g in calls[(calls["route_rank"] > 0) & calls["ok"].astype(bool)].groupby(
            ["task", "provider", "model"]):
        selection.append({"task": task, "model": f"{provider}:{model}", "first_choice": 0, "wins": 0,
                          "win_rate": None, "fallback_answers": int(len(g))})
    return {
        "tokens_per_run_mean": float(per_run.mean()), "tokens_per_run_max": float(per_run.max()),
        "tokens_total": int(per_run.sum()), "cost_usd_total": float(lc["cost_usd"].sum()),
        "cost_per_run_mean": float(cost_run.mean()),
        "cache_hit_rate": float(cached.sum() / requests),
        "exact_cache_hit_rate": float((lc["cache_kind"] == "exact").sum() / requests),
        "semantic_cache_hit_rate": float((lc["cache_kind"] == "semantic").sum() / requests),
        "llm_calls": int(len(calls)),
        "llm_errors": {str(e): int(n) for e, n in calls["error"].dropna().value_counts().items()},
        "model_selection": selection,
    }


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


def compute_kpis(db: Database, cfg: SupportConfig, now: datetime | None = None) -> tuple[dict[str, Any], Any]:
    now = now or utcnow()
    it, st, ik, dl, lc, ap = _frames(db)
    counts = it["status"].value_counts().to_dict() if not it.empty else {}
    intake_dead = int((ik["outcome"] == "dead_lettered").sum()) if not ik.empty else 0
    received = int(len(ik))
    resolved = int(counts.get("resolved", 0))
    dead = int(counts.get("dead_lettered", 0)) + intake_dead
    finished = resolved + dead  # a rejection (reviewer or approval timeout) is a decision, not a flow failure
    k: dict[str, Any] = {
        "received": received, "resolved": resolved, "awaiting_approval": int(counts.get("awaiting_approval", 0)),
        "dead_lettered": dead, "duplicates": int((ik["outcome"] == "duplicate").sum()) if not ik.empty else 0,
        "in_progress": int(sum(counts.get(s, 0) for s in IN_PROGRESS_STATUSES)),
        "deferred": int(counts.get("deferred", 0)), "rejected": int(counts.get("rejected", 0)),
        "success_rate": (resolved / finished) if finished else None,
        "dlq_open": int((dl["status"] == "open").sum()) if not dl.empty else 0,
    }
    # branch-specific failure rates: dead letters per stage over items that entered the stage
    # intake rejects never become items, so intake's rate comes from the intake log
    branch: dict[str, float | None] = {"intake": (intake_dead / received) if received else None}
    lat: dict[str, dict[str, float]] = {}
    retries: dict[str, float] = {}
    if not st.empty:
        for stage, g in st.groupby("stage"):
            if stage != "intake":
                branch[stage] = float((g["outcome"] == "dead_lettered").mean())
            d = g["duration_ms"]
            lat[stage] = {"p50_ms": float(d.quantile(0.5)), "p95_ms": float(d.quantile(0.95)),
                          "mean_ms": float(d.mean()), "items": int(len(g))}
            retries[stage] = float((g["attempt"] - 1).clip(lower=0).mean())
        if "approval_gate" in st["stage"].values:
            g = st[st["stage"] == "approval_gate"]
            k["approval_branch_share"] = float((g["outcome"] == "routed").mean())
    k["branch_failure_rates"] = branch
    k["latency_by_stage"] = {s: lat[s] for s in [*FLOW_STAGES, "csat", "escalation"] if s in lat}
    k["retries_per_step"] = retries
    decided = ap[ap["status"].isin(["approved", "rejected"])] if not ap.empty else ap
    k["override_rate"] = float(decided["edited"].mean()) if len(decided) else None
    k["approvals_pending"] = int((ap["status"] == "pending").sum()) if not ap.empty else 0
    k.update(llm_kpis(lc))
    k["experiments"] = experiment_kpis(it, ap)
    res = it[it["status"] == "resolved"] if not it.empty else it
    if len(res):
        ttr_h = (res["resolved_at"] - res["received_at"]).dt.total_seconds() / 3600.0
        proc_s = (res["resolved_at"] - res["ingested_at"]).dt.total_seconds()
        k["time_to_resolution_p50_h"] = float(ttr_h.quantile(0.5))
        k["time_to_resolution_p95_h"] = float(ttr_h.quantile(0.95))
        k["processing_latency_p50_s"] = float(proc_s.quantile(0.5))
        k["processing_latency_p95_s"] = float(proc_s.quantile(0.95))
        k["sla_met_rate"] = float((res["resolved_at"] <= res["due_at"]).mean())
        surveyed = res["survey_sent_at"].notna().sum()
        rated = res["csat"].dropna()
        k["csat_mean"] = float(rated.mean()) if len(rated) else None
        k["csat_response_rate"] = float(len(rated) / surveyed) if surveyed else None
        k["csat_responses"] = int(len(rated))
    else:
        k.update(time_to_resolution_p50_h=None, time_to_resolution_p95_h=None, processing_latency_p50_s=None,
                 processing_latency_p95_s=None, sla_met_rate=None, csat_mean=None, csat_response_rate=None,
                 csat_responses=0)
    k["escalated"] = int(it["escalated_at"].notna().sum()) if not it.empty else 0
    # alerts from the brief, evaluated on this data
    observed = {"error_rate": (dead / finished) if finished else None,
                "latency_p95": k.get("processing_latency_p95_s"), "dlq_backlog": float(k["dlq_open"])}
    k["alerts"] = [{"rule": r.raw, "observed": observed.get(r.metric), "breached": r.breached(observed.get(r.metric))}
                   for r in cfg.brief.alert_rules]
    k["generated_at"] = now.isoformat()
    return k, it


def _markdown(k: dict[str, Any]) -> str:
    lines = [
        "### Support loop KPIs", "",
        "| KPI | value |", "|---|---|",
        f"| received | {k['received']} |", f"| resolved | {k['resolved']} |",
        f"| awaiting approval | {k['awaiting_approval']} |", f"| rejected (by a reviewer or on approval timeout) | {k['rejected']} |",
        f"| dead-lettered | {k['dead_lettered']} |",
        f"| in progress | {k['in_progress']} |", f"| flow success rate | {_pct(k['success_rate'])} |",
        f"| DLQ open | {k['dlq_open']} |", f"| override rate | {_pct(k['override_rate'])} |",
        f"| tokens per run (mean / max) | {_num(k['tokens_per_run_mean'], '', 0)} / {_num(k['tokens_per_run_max'], '', 0)} |",
        f"| LLM calls / cost | {k['llm_calls']} / ${k['cost_usd_total']:.4f} |",
        f"| cache hit rate (exact / semantic) | {_pct(k['cache_hit_rate'])} ({_pct(k['exact_cache_hit_rate'])} / "
        f"{_pct(k['semantic_cache_hit_rate'])}) |",
        f"| deferred (budget / open circuit) | {k['deferred']} |",
        f"| CSAT mean (responses) | {_num(k['csat_mean'], '/5', 2)} ({k['csat_responses']}) |",
        f"| CSAT response rate | {_pct(k['csat_response_rate'])} |",
        f"| time to resolution p50 / p95 | {_num(k['time_to_resolution_p50_h'], ' h')} / {_num(k['time_to_resolution_p95_h'], ' h')} |",
        f"| processing latency p50 / p95 | {_num(k['processing_latency_p50_s'], ' s', 2)} / {_num(k['processing_latency_p95_s'], ' s', 2)} |",
        f"| first-response SLA met | {_pct(k['sla_met_rate'])} |", f"| escalated | {k['escalated']} |",
        "", "#### Latency, retries and failures by stage", "",
        "| stage | items | p50 ms | p95 ms | retries/item | failure rate |", "|---|---|---|---|---|---|",
    ]
    for stage in ["intake", *[s for s in k["latency_by_stage"] if s != "intake"]]:
        lat = k["latency_by_stage"].get(stage, {})
        lines.append(f"| {stage} | {lat.get('items', '')} | {_num(lat.get('p50_ms'))} | {_num(lat.get('p95_ms'))} | "
                     f"{_num(k['retries_per_step'].get(stage), '', 3)} | {_pct(k['branch_failure_rates'].get(stage))} |")
    if k["model_selection"]:
        lines += ["", "#### Model selection (router's first choice, and fallbacks that answered)", "",
                  "| task | model | first choice | wins | win rate | fallback answers |", "|---|---|---|---|---|---|"]
        for m in k["model_selection"]:
            lines.append(f"| {m['task']} | {m['model']} | {m['first_choice']} | {m['wins']} | {_pct(m['win_rate'])} | "
                         f"{m.get('fallback_answers', 0)} |")
    if k["experiments"]:
        lines += ["", "#### A/B experiments (win = resolved, sent without edit, not re-opened, CSAT >= 4 if answered)",
                  "", "| experiment | arm | items | resolved | no-edit rate | CSAT mean | re-open rate | win rate |",
                  "|---|---|---|---|---|---|---|---|"]
        for e in k["experiments"]:
            lines.append(f"| {e['experiment']} | {e['arm']} | {e['items']} | {e['resolved']} | "
                         f"{_pct(e['approved_without_edit_rate'])} | {_num(e['csat_mean'], '', 2)} | "
                         f"{_pct(e['reopen_rate'])} | {_pct(e['win_rate'])} |")
    if k["llm_errors"]:
        lines.append("")
        lines.append("LLM call errors: " + ", ".join(f"{e} {n}" for e, n in sorted(k["llm_errors"].items())))
    lines += ["", "#### Alerts from the brief", "", "| rule | observed | state |", "|---|---|---|"]
    for a in k["alerts"]:
        obs = "n/a" if a["observed"] is None else f"{a['observed']:.4g}"
        lines.append(f"| `{a['rule']}` | {obs} | {'BREACHED' if a['breached'] else 'ok'} |")
    return "\n".join(lines)


def _charts(k: dict[str, Any], it, out_dir: Path) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []

    def save(fig, name):
        p = out_dir / name
        fig.tight_layout()
        fig.savefig(p, dpi=90)
        plt.close(fig)
        paths.append(p)

    if not it.empty:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        it.groupby(["day", "status"]).size().unstack(fill_value=0).plot.bar(stacked=True, ax=ax)
        ax.set_title("Items by day and state")
        ax.set_xlabel("")
        save(fig, "states_by_day.png")
    if not it.empty and it["intent"].notna().any():  # none yet when every item failed before triage
        fig, ax = plt.subplots(figsize=(7, 3.5))
        it["intent"].dropna().value_counts().head(12).sort_values().plot.barh(ax=ax, color="#4C72B0")
        ax.set_title("Top intents")
        save(fig, "top_intents.png")
    if k["latency_by_stage"]:
        import pandas as pd

        lat = pd.DataFrame(k["latency_by_stage"]).T[["p50_ms", "p95_ms"]]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        lat.plot.bar(ax=ax)
        ax.set_ylabel("ms per item (batch stage wall time)")
        ax.set_title("Latency by stage")
        save(fig, "latency_by_stage.png")
    if not it.empty and it["csat"].notna().any():
        fig, ax = plt.subplots(figsize=(5, 3))
        it["csat"].dropna().astype(int).value_counts().reindex(range(1, 6), fill_value=0).plot.bar(ax=ax,
                                                                                                    color="#55A868")
        ax.set_title("CSAT answers")
        save(fig, "csat.png")
    return paths


def kpi_report(db: Database, cfg: SupportConfig, reports_dir: Path, now: datetime | None = None) -> KpiReport:
    k, it = compute_kpis(db, cfg, now)
    out = Path(reports_dir) / "support"
    charts = _charts(k, it, out / "charts")
    md = _markdown(k)
    with db.begin() as conn:
        backlog_rows = conn.execute(sa.select(backlog.c.kind, backlog.c.title).where(backlog.c.flow == FLOW)
                                    .order_by(backlog.c.kind, backlog.c.score.desc())).all()
    body = [f"<h1>Support loop KPI report</h1><p>Generated {html.escape(k['generated_at'])}.</p>",
            _md_tables_to_html(md)]
    body += [f'<figure><img src="charts/{p.name}" alt="{p.stem}"><figcaption>{p.stem.replace("_", " ")}'
             f"</figcaption></figure>" for p in charts]
    if backlog_rows:
        body.append("<h2>Insights in the backlog</h2><ul>" +
                    "".join(f"<li><b>{html.escape(kind)}</b>: {html.escape(title)}</li>" for kind, title in backlog_rows)
                    + "</ul>")
    page = ("<!doctype html><html><head><meta charset='utf-8'><title>Support KPI report</title><style>"
            "body{font-family:sans-serif;max-width:960px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #ccc;padding:4px 8px}figure{display:inline-block;margin:8px}</style></head><body>"
            + "\n".join(body) + "</body></html>")
    out.mkdir(parents=True, exist_ok=True)
    html_path = out / "kpi_report.html"
    html_path.write_text(page, encoding="utf-8")
    (out / "kpi_report.md").write_text(md + "\n", encoding="utf-8")
    (out / "kpis.json").write_text(json.dumps(k, indent=2, default=str), encoding="utf-8")
    return KpiReport(k, md, html_path, charts)


def _md_tables_to_html(md: str) -> str:
    """The markdown above is headings and pipe tables only; render exactly that subset."""
    out, in_table = [], False
    for line in md.splitlines():
        if line.startswith("|"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            if set("".join(cells)) <= set("-"):
                continue
            if not in_table:
                out.append("<table>")
                in_table = True
            out.append("<tr>" + "".join(f"<td>{html.escape(c.strip('`'))}</td>" for c in cells) + "</tr>")
            continue
        if in_table:
            out.append("</table>")
            in_table = False
        if line.startswith("#"):
            level = min(len(line) - len(line.lstrip("#")) - 1, 4) + 1
            out.append(f"<h{level}>{html.escape(line.lstrip('# '))}</h{level}>")
    if in_table:
        out.append("</table>")
    return "\n".join(out)

