"""The leads flow's KPIs on top of the platform's (lib/kpis.py): speed to lead p50/p95 (arrival to first
touch), conversion by score decile (the calibration of the served model on the flow's own outcomes), lift of
the top decile, duplicate rate (leads merged into a contact the CRM or an earlier lead had), reply and
unsubscribe rates of the leads we wrote to, nurture completion, and rep load against capacity."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from ...lib import kpis
from ...lib.kpis import KpiReport, num, pct


def lead_kpis(it, cfg) -> dict[str, Any]:
    import numpy as np

    k: dict[str, Any] = {}
    live = it[it["status"] != "dead_lettered"] if len(it) else it
    data = list(live["data"]) if len(live) else []
    k["leads_accepted"] = len(data)
    merged = sum(1 for d in data if (d.get("match") or {}).get("decision") == "merge")
    k["duplicate_rate"] = merged / len(data) if data else None
    k["match_decisions"] = dict(Counter((d.get("match") or {}).get("decision") for d in data if d.get("match")))
    k["tiers"] = dict(Counter(d.get("tier") for d in data if d.get("tier")))
    # speed to lead: arrival -> the first touch delivered (hot leads we wrote to or called)
    touched = live[live["data"].apply(lambda d: d.get("tier") == "hot" and bool(d.get("channel")))
                   & (live["status"] == "resolved")] if len(live) else live
    if len(touched):
        minutes = (touched["resolved_at"] - touched["received_at"]).dt.total_seconds() / 60.0
        k["speed_to_lead_p50_min"] = float(minutes.quantile(0.5))
        k["speed_to_lead_p95_min"] = float(minutes.quantile(0.95))
    else:
        k["speed_to_lead_p50_min"] = k["speed_to_lead_p95_min"] = None
    k["first_touches"] = int(len(touched))
    # outcomes known (won or lost in the CRM): conversion by score decile
    # outcomes are the person's: a contact with two leads counts once (its first lead's score)
    per_contact: dict[str, tuple[float, bool]] = {}
    for d in data:
        if d.get("outcome") and "score" in d:
            per_contact.setdefault((d.get("match") or {}).get("contact_id"),
                                   (float(d["score"]), d["outcome"] == "converted"))
    decided = list(per_contact.values())
    k["outcomes_known"] = len(decided)
    deciles = []
    if len(decided) >= 10:
        arr = np.array(sorted(decided, key=lambda t: t[0]))
        for chunk in np.array_split(arr, 10):
            deciles.append({"mean_score": float(chunk[:, 0].mean()), "conversion": float(chunk[:, 1].mean()),
                            "n": int(len(chunk))})
        overall = float(arr[:, 1].mean())
        k["lift_top_decile"] = (deciles[-1]["conversion"] / overall) if overall > 0 else None
    else:
        k["lift_top_decile"] = None
    k["conversion_by_decile"] = deciles
    k["conversion_rate"] = (sum(c for _, c in decided) / len(decided)) if decided else None
    messaged = [d for d in data if d.get("channel") == "email" and (d.get("tier") == "hot" or
                                                                    (d.get("nurture") or {}).get("step", 0) > 0)]
    k["leads_written_to"] = len(messaged)
    k["reply_rate"] = (sum(1 for d in messaged if d.get("replied_at")) / len(messaged)) if messaged else None
    k["unsubscribe_rate"] = (sum(1 for d in messaged if (d.get("consent") or {}).get("unsubscribed")) / len(messaged)
                             if messaged else None)
    nurtures = [d["nurture"] for d in data if d.get("nurture")]
    states = Counter(n["state"] for n in nurtures)
    k["nurture_states"] = dict(states)
    ended = states.get("completed", 0) + states.get("stopped", 0)
    k["nurture_completion"] = states.get("completed", 0) / ended if ended else None
    k["nurture_stop_reasons"] = dict(Counter(n.get("stopped_reason") for n in nurtures if n["state"] == "stopped"))
    loads = Counter(d.get("owner") for d in data if d.get("owner") and d.get("tier") == "hot")
    k["rep_load"] = {p["id"]: {"hot_leads": loads.get(p["id"], 0), "capacity": int(p.get("capacity") or 0),
                               "team": p["team"]} for p in cfg.reps}
    return k


def _rows(k: dict[str, Any]) -> list[str]:
    return [
        f"| leads accepted | {k['leads_accepted']} |",
        f"| speed to lead p50 / p95 (arrival to first touch) | {num(k['speed_to_lead_p50_min'], ' min', 1)} / "
        f"{num(k['speed_to_lead_p95_min'], ' min', 1)} |",
        f"| duplicate rate (merged into a known contact) | {pct(k['duplicate_rate'])} |",
        f"| hot / warm / cold | {k['tiers'].get('hot', 0)} / {k['tiers'].get('warm', 0)} / {k['tiers'].get('cold', 0)} |",
        f"| outcomes known (won or lost) / conversion | {k['outcomes_known']} / {pct(k['conversion_rate'])} |",
        f"| lift of the top score decile | {num(k['lift_top_decile'], 'x', 2)} |",
        f"| reply rate / unsubscribe rate (of {k['leads_written_to']} written to) | {pct(k['reply_rate'])} / "
        f"{pct(k['unsubscribe_rate'])} |",
        f"| nurture completion (completed of ended) | {pct(k['nurture_completion'])} |",
    ]


def _sections(k: dict[str, Any]) -> list[str]:
    lines = ["", "#### Conversion by score decile", "", "| decile | mean score | conversion | leads |", "|---|---|---|---|"]
    lines += [f"| {i} | {d['mean_score']:.2f} | {pct(d['conversion'])} | {d['n']} |"
              for i, d in enumerate(k["conversion_by_decile"], 1)] or ["| - | not enough outcomes yet | | |"]
    lines += ["", "#### Nurture", "", "| state | leads |", "|---|---|"]
    lines += [f"| {s} | {n} |" for s, n in sorted(k["nurture_states"].items())]
    lines += [f"| stopped: {r} | {n} |" for r, n in sorted(k["nurture_stop_reasons"].items(), key=lambda t: str(t[0]))]
    lines += ["", "#### Rep load (hot leads in the window / capacity)", "", "| rep | team | load |", "|---|---|---|"]
    lines += [f"| {rep} | {v['team']} | {v['hot_leads']} / {v['capacity']} |" for rep, v in k["rep_load"].items()]
    return lines


def _charts(k: dict[str, Any]):
    def extra(it, save) -> None:
        import matplotlib.pyplot as plt

        dec = k["conversion_by_decile"]
        if dec:
            fig, ax = plt.subplots(figsize=(5.5, 4))
            ax.plot([0, 1], [0, 1], color="#999", linestyle="--", label="perfect calibration")
            ax.plot([d["mean_score"] for d in dec], [d["conversion"] for d in dec], marker="o", color="#4C72B0",
                    label="score deciles")
            ax.set_xlabel("mean predicted conversion (score)")
            ax.set_ylabel("observed conversion")
            ax.set_title("Calibration: conversion by score decile")
            ax.legend(loc="upper left")
            save(fig, "calibration_by_decile.png")
        load = k["rep_load"]
        if load:
            fig, ax = plt.subplots(figsize=(7, 3.2))
            names = list(load)
            ax.bar(names, [v["capacity"] for v in load.values()], color="#DDDDDD", label="capacity")
            ax.bar(names, [v["hot_leads"] for v in load.values()], color="#55A868", label="hot leads")
            ax.set_title("Rep load in the window")
            ax.legend()
            save(fig, "rep_load.png")
    return extra


def kpi_report(db, spec, reports_dir: Path, now: datetime | None = None) -> KpiReport:
    return kpis.flow_report(db, spec, reports_dir, now, lambda fr: lead_kpis(fr[0], spec.config), _rows, _sections, _charts)
