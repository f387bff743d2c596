"""KPIs every flow gets, from the app database and the LLM call ledger (pandas + matplotlib, both
imported inside the functions so loading the code location stays fast): counts by state, flow success
rate, branch-specific failure rates, latency and retries by stage, DLQ size, human override rate,
tokens per run, cache hit rates, model-selection win rates, time to resolution, SLA met and the
brief's alerts. A flow adds its own KPIs, report sections and charts on top (``kpi_report``'s hooks).
"""

from __future__ import annotations

import html
import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from .store import Database, approvals, dlq, intake, item_stages, items, llm_calls, utcnow


def frames(db: Database, flow: str, data_keys: Sequence[str] = ()):
    """(items, stage timings, intake log, dead letters, LLM calls, approvals) of ``flow`` as frames;
    ``data_keys`` are lifted from the items' ``data`` into columns."""
    import pandas as pd

    with db.begin() as conn:
        it = pd.read_sql(sa.select(items.c.item_id, items.c.day, items.c.status, items.c.stage, items.c.received_at,
                                   items.c.ingested_at, items.c.resolved_at, items.c.due_at, items.c.escalated_at,
                                   items.c.data).where(items.c.flow == flow), conn)
        st = pd.read_sql(sa.select(item_stages.c.stage, item_stages.c.run_id, item_stages.c.duration_ms,
                                   item_stages.c.attempt, item_stages.c.outcome).where(item_stages.c.flow == flow), conn)
        ik = pd.read_sql(sa.select(intake.c.day, intake.c.outcome).where(intake.c.flow == flow), conn)
        dl = pd.read_sql(sa.select(dlq.c.stage, dlq.c.error_type, dlq.c.status).where(dlq.c.flow == flow), conn)
        lc = pd.read_sql(sa.select(llm_calls.c.run_id, llm_calls.c.item_id, llm_calls.c.task,
                                   llm_calls.c.provider, llm_calls.c.model, llm_calls.c.input_tokens,
                                   llm_calls.c.output_tokens, llm_calls.c.cached, llm_calls.c.cache_kind,
                                   llm_calls.c.ok, llm_calls.c.error, llm_calls.c.route_rank, llm_calls.c.repair,
                                   llm_calls.c.cost_usd)
                         .where(llm_calls.c.flow == flow), conn)
        ap = pd.read_sql(sa.select(approvals.c.item_id, approvals.c.status, approvals.c.edited, approvals.c.reason)
                         .where(approvals.c.flow == flow), conn)
    if not it.empty:
        for col in ("received_at", "ingested_at", "resolved_at", "due_at", "escalated_at"):
            it[col] = pd.to_datetime(it[col], utc=True)
        data = it["data"].apply(lambda d: d if isinstance(d, dict) else json.loads(d))
        for key in data_keys:
            it[key] = data.apply(lambda d, k=key: d.get(k))
        it["data"] = data
    return it, st, ik, dl, lc, ap


@dataclass
class KpiReport:
    kpis: dict[str, Any]
    markdown: str
    html_path: Path
    charts: list[Path]


def pct(x: float | None) -> str:
    return "n/a" if x is None else f"{x * 100:.1f}%"


def num(x: float | None, unit: str = "", digits: int = 1) -> str:
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


def base_kpis(spec, fr, now: datetime | None = None) -> dict[str, Any]:
    """The platform's KPIs of one flow from ``frames``; ``spec`` gives the stage chain and the brief."""
    now = now or utcnow()
    it, st, ik, dl, lc, ap = fr
    counts = it["status"].value_counts().to_dict() if not it.empty else {}
    intake_dead = int((ik["outcome"] == "dead_lettered").sum()) if not ik.empty else 0
    received = int(len(ik))
    resolved = int(counts.get("resolved", 0))
    dead = int(counts.get("dead_lettered", 0)) + intake_dead
    finished = resolved + dead  # a rejection (reviewer or approval timeout) is a decision, not a flow failure
    k: dict[str, Any] = {
        "received": received, "resolved": resolved,
        "awaiting_approval": int(sum(counts.get(s, 0) for s in spec.waiting_statuses)),
        "dead_lettered": dead, "duplicates": int((ik["outcome"] == "duplicate").sum()) if not ik.empty else 0,
        "in_progress": int(sum(counts.get(s, 0) for s in spec.in_progress_statuses)),
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
        gates = [s.name for s in spec.stages if s.branches]
        if gates and gates[0] in st["stage"].values:
            g = st[st["stage"] == gates[0]]
            k["approval_branch_share"] = float((g["outcome"] == "routed").mean())
    k["branch_failure_rates"] = branch
    order = [*spec.stage_names, *(o.name for o in spec.ops), "escalation"]
    k["latency_by_stage"] = {s: lat[s] for s in order if s in lat}
    k["retries_per_step"] = retries
    decided = ap[ap["status"].isin(["approved", "rejected"])] if not ap.empty else ap
    k["override_rate"] = float(decided["edited"].mean()) if len(decided) else None
    k["approvals_pending"] = int((ap["status"] == "pending").sum()) if not ap.empty else 0
    k.update(llm_kpis(lc))
    res = it[it["status"] == "resolved"] if not it.empty else it
    if len(res):
        ttr_h = (res["resolved_at"] - res["received_at"]).dt.total_seconds() / 3600.0
        proc_s = (res["resolved_at"] - res["ingested_at"]).dt.total_seconds()
        k["time_to_resolution_p50_h"] = float(ttr_h.quantile(0.5))
        k["time_to_resolution_p95_h"] = float(ttr_h.quantile(0.95))
        k["processing_latency_p50_s"] = float(proc_s.quantile(0.5))
        k["processing_latency_p95_s"] = float(proc_s.quantile(0.95))
        k["sla_met_rate"] = float((res["resolved_at"] <= res["due_at"]).mean()) if res["due_at"].notna().any() else None
    else:
        k.update(time_to_resolution_p50_h=None, time_to_resolution_p95_h=None, processing_latency_p50_s=None,
                 processing_latency_p95_s=None, sla_met_rate=None)
    k["escalated"] = int(it["escalated_at"].notna().sum()) if not it.empty else 0
    # alerts from the brief, evaluated on this data
    observed = {"error_rate": (dead / finished) if finished else None,
                "latency_p95": k.get("processing_latency_p95_s"), "dlq_backlog": float(k["dlq_open"])}
    k["alerts"] = [{"rule": r.raw, "observed": observed.get(r.metric), "breached": r.breached(observed.get(r.metric))}
                   for r in spec.config.brief.alert_rules]
    k["generated_at"] = now.isoformat()
    return k


def summary_lines(k: dict[str, Any]) -> list[str]:
    """The KPI table's platform rows (a flow inserts its own rows after them)."""
    return [
        f"| received | {k['received']} |", f"| resolved | {k['resolved']} |",
        f"| awaiting approval | {k['awaiting_approval']} |",
        f"| rejected (by a reviewer or on approval timeout) | {k['rejected']} |",
        f"| dead-lettered | {k['dead_lettered']} |",
        f"| in progress | {k['in_progress']} |", f"| flow success rate | {pct(k['success_rate'])} |",
        f"| DLQ open | {k['dlq_open']} |", f"| override rate | {pct(k['override_rate'])} |",
        f"| tokens per run (mean / max) | {num(k['tokens_per_run_mean'], '', 0)} / {num(k['tokens_per_run_max'], '', 0)} |",
        f"| LLM calls / cost | {k['llm_calls']} / ${k['cost_usd_total']:.4f} |",
        f"| cache hit rate (exact / semantic) | {pct(k['cache_hit_rate'])} ({pct(k['exact_cache_hit_rate'])} / "
        f"{pct(k['semantic_cache_hit_rate'])}) |",
        f"| deferred (budget / open circuit) | {k['deferred']} |",
    ]


def timing_lines(k: dict[str, Any]) -> list[str]:
    return [
        f"| time to resolution p50 / p95 | {num(k['time_to_resolution_p50_h'], ' h')} / {num(k['time_to_resolution_p95_h'], ' h')} |",
        f"| processing latency p50 / p95 | {num(k['processing_latency_p50_s'], ' s', 2)} / {num(k['processing_latency_p95_s'], ' s', 2)} |",
        f"| first-response SLA met | {pct(k['sla_met_rate'])} |", f"| escalated | {k['escalated']} |",
    ]


def stage_lines(k: dict[str, Any]) -> list[str]:
    lines = ["", "#### Latency, retries and failures by stage", "",
             "| stage | items | p50 ms | p95 ms | retries/item | failure rate |", "|---|---|---|---|---|---|"]
    for stage in ["intake", *[s for s in k["latency_by_stage"] if s != "intake"]]:
        lat = k["latency_by_stage"].get(stage, {})
        lines.append(f"| {stage} | {lat.get('items', '')} | {num(lat.get('p50_ms'))} | {num(lat.get('p95_ms'))} | "
                     f"{num(k['retries_per_step'].get(stage), '', 3)} | {pct(k['branch_failure_rates'].get(stage))} |")
    if k["model_selection"]:
        lines += ["", "#### Model selection (router's first choice, and fallbacks that answered)", "",
                  "| task | model | first choice | wins | win rate | fallback answers |", "|---|---|---|---|---|---|"]
        for m in k["model_selection"]:
            lines.append(f"| {m['task']} | {m['model']} | {m['first_choice']} | {m['wins']} | {pct(m['win_rate'])} | "
                         f"{m.get('fallback_answers', 0)} |")
    return lines


def alert_lines(k: dict[str, Any]) -> list[str]:
    lines = []
    if k["llm_errors"]:
        lines.append("")
        lines.append("LLM call errors: " + ", ".join(f"{e} {n}" for e, n in sorted(k["llm_errors"].items())))
    lines += ["", "#### Alerts from the brief", "", "| rule | observed | state |", "|---|---|---|"]
    for a in k["alerts"]:
        obs = "n/a" if a["observed"] is None else f"{a['observed']:.4g}"
        lines.append(f"| `{a['rule']}` | {obs} | {'BREACHED' if a['breached'] else 'ok'} |")
    return lines


def markdown(title: str, k: dict[str, Any], flow_rows: Sequence[str] = (), flow_sections: Sequence[str] = ()) -> str:
    return "\n".join([f"### {title} KPIs", "", "| KPI | value |", "|---|---|", *summary_lines(k), *flow_rows,
                      *timing_lines(k), *stage_lines(k), *flow_sections, *alert_lines(k)])


def charts(k: dict[str, Any], it, out_dir: Path,
           extra: Callable[[Any, Callable[[Any, str], None]], None] | None = None) -> list[Path]:
    """Items by day and state, latency by stage, and the flow's own charts (``extra(it, save)``)."""
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
    if extra is not None:
        extra(it, save)
    if k["latency_by_stage"]:
        import pandas as pd

        lat = pd.DataFrame(k["latency_by_stage"]).T[["p50_ms", "p95_ms"]]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        lat.plot.bar(ax=ax)
        ax.set_ylabel("ms per item (batch stage wall time)")
        ax.set_title("Latency by stage")
        save(fig, "latency_by_stage.png")
    return paths


def write_report(flow: str, title: str, k: dict[str, Any], md: str, chart_paths: list[Path], out: Path,
                 extra_html: Sequence[str] = ()) -> KpiReport:
    """The report on disk: HTML (tables + charts), markdown and the KPIs as JSON, under ``out``."""
    body = [f"<h1>{html.escape(title)} KPI report</h1><p>Generated {html.escape(k['generated_at'])}.</p>",
            _md_tables_to_html(md)]
    body += [f'<figure><img src="charts/{p.name}" alt="{p.stem}"><figcaption>{p.stem.replace("_", " ")}'
             f"</figcaption></figure>" for p in chart_paths]
    body += list(extra_html)
    page = (f"<!doctype html><html><head><meta charset='utf-8'><title>{html.escape(title)} KPI report</title><style>"
            "body{font-family:sans-serif;max-width:960px;margin:2em auto}table{border-collapse:collapse;margin:1em 0}"
            "td,th{border:1px solid #ccc;padding:4px 8px}figure{display:inline-block;margin:8px}</style></head><body>"
            + "\n".join(body) + "</body></html>")
    out.mkdir(parents=True, exist_ok=True)
    html_path = out / "kpi_report.html"
    html_path.write_text(page, encoding="utf-8")
    (out / "kpi_report.md").write_text(md + "\n", encoding="utf-8")
    (out / "kpis.json").write_text(json.dumps(k, indent=2, default=str), encoding="utf-8")
    return KpiReport(k, md, html_path, chart_paths)


def flow_report(db: Database, spec, reports_dir: Path, now: datetime | None, flow_kpis: Callable[[tuple], dict],
                rows: Callable[[dict], Sequence[str]], sections: Callable[[dict], Sequence[str]],
                extra_charts: Callable[[dict], Callable] | None = None) -> KpiReport:
    """A flow's report: the platform's KPIs plus ``flow_kpis(frames)``, the flow's own table rows and sections
    (``rows(k)``, ``sections(k)``) and charts (``extra_charts(k)`` gives ``charts``' ``extra`` hook)."""
    fr = frames(db, spec.name)
    k = base_kpis(spec, fr, now)
    k.update(flow_kpis(fr))
    out = Path(reports_dir) / spec.name
    md = markdown(spec.title, k, rows(k), sections(k))
    chart_paths = charts(k, fr[0], out / "charts", extra=extra_charts(k) if extra_charts else None)
    return write_report(spec.name, spec.title, k, md, chart_paths, out)


def kpi_report(db: Database, spec, reports_dir: Path, now: datetime | None = None) -> KpiReport:
    """The platform's report for a flow without its own (``FlowSpec.report``)."""
    fr = frames(db, spec.name)
    k = base_kpis(spec, fr, now)
    out = Path(reports_dir) / spec.name
    return write_report(spec.name, spec.title, k, markdown(spec.title, k), charts(k, fr[0], out / "charts"), out)


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

