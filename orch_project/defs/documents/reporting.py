"""The documents flow's KPIs on top of the platform's (lib/kpis.py): straight-through rate, review rate
and reasons by rule, field accuracy on reviewed documents (extracted vs corrected), time to post p50/p95
and duplicates caught (a re-submitted file at intake, a second copy of a bill at validation)."""

from __future__ import annotations

from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

from ...lib import kpis
from ...lib.kpis import KpiReport, num, pct
from .schema import FIELDS
from .validation import RULES


def document_kpis(it, ap) -> dict[str, Any]:
    k: dict[str, Any] = {}
    # every accepted document counts: straight through = posted without a person, over all of them (those
    # dead-lettered or still on their way included)
    reviewed_mask = it["data"].apply(lambda d: bool(d.get("approval_reasons"))) if len(it) else it
    reviewed = it[reviewed_mask] if len(it) else it
    straight = int(((it["status"].isin(["posted", "resolved"])) & ~reviewed_mask).sum()) if len(it) else 0
    k["documents_accepted"] = int(len(it))
    k["straight_through_rate"] = float(straight / len(it)) if len(it) else None
    k["review_rate"] = float(len(reviewed) / len(it)) if len(it) else None
    reasons = Counter(r for d in reviewed["data"] for r in d.get("approval_reasons") or []) if len(reviewed) else Counter()
    k["review_reasons"] = {r: int(reasons.get(r, 0)) for r in (*RULES, "amount_over_threshold")}
    # field accuracy on documents a person approved (with or without corrections): a field is right when
    # the reviewer kept the extracted value
    approved_ids = set(ap.loc[ap["status"] == "approved", "item_id"]) if len(ap) and "item_id" in ap else set()
    decided = reviewed[reviewed["item_id"].isin(approved_ids)] if len(reviewed) else reviewed
    per_field = {}
    for f in FIELDS:
        n = len(decided)
        wrong = sum(1 for d in decided["data"] if f in (d.get("corrections") or {})) if n else 0
        per_field[f] = float(1 - wrong / n) if n else None
    k["field_accuracy_reviewed"] = per_field
    k["reviewed_documents"] = int(len(decided))
    k["corrected_documents"] = int(sum(1 for d in decided["data"] if d.get("corrections"))) if len(decided) else 0
    posted = it[it["status"].isin(["posted", "resolved"])] if len(it) else it
    if len(posted):
        hours = (posted["resolved_at"] - posted["received_at"]).dt.total_seconds() / 3600.0
        k["time_to_post_p50_h"], k["time_to_post_p95_h"] = float(hours.quantile(0.5)), float(hours.quantile(0.95))
        proc = (posted["resolved_at"] - posted["ingested_at"]).dt.total_seconds()
        k["processing_to_post_p50_s"], k["processing_to_post_p95_s"] = float(proc.quantile(0.5)), float(proc.quantile(0.95))
    else:
        k.update(time_to_post_p50_h=None, time_to_post_p95_h=None, processing_to_post_p50_s=None,
                 processing_to_post_p95_s=None)
    k["duplicates_caught_validation"] = int(reasons.get("duplicate", 0))
    formats = Counter(d.get("format") for d in it["data"]) if len(it) else Counter()
    k["documents_by_format"] = dict(formats)
    return k


def _rows(k: dict[str, Any]) -> list[str]:
    return [
        f"| straight-through rate | {pct(k['straight_through_rate'])} |",
        f"| review rate | {pct(k['review_rate'])} |",
        f"| duplicates caught (re-submitted file / same bill) | {k['duplicates']} / {k['duplicates_caught_validation']} |",
        f"| time to post p50 / p95 | {num(k['time_to_post_p50_h'], ' h', 2)} / {num(k['time_to_post_p95_h'], ' h', 2)} |",
        f"| processing to post p50 / p95 (from intake) | {num(k['processing_to_post_p50_s'], ' s', 2)} / "
        f"{num(k['processing_to_post_p95_s'], ' s', 2)} |",
        f"| reviewed documents (corrected) | {k['reviewed_documents']} ({k['corrected_documents']}) |",
    ]


def _sections(k: dict[str, Any]) -> list[str]:
    lines = ["", "#### Review reasons by rule", "", "| rule | documents |", "|---|---|"]
    lines += [f"| {r} | {n} |" for r, n in k["review_reasons"].items()]
    lines += ["", "#### Field accuracy on reviewed documents (extracted value kept by the reviewer)", "",
              "| field | accuracy |", "|---|---|"]
    lines += [f"| {f} | {pct(a)} |" for f, a in k["field_accuracy_reviewed"].items()]
    lines += ["", "#### Documents by format", "", "| format | documents |", "|---|---|"]
    lines += [f"| {f} | {n} |" for f, n in sorted(k["documents_by_format"].items(), key=lambda t: str(t[0]))]
    return lines


def _charts(k: dict[str, Any]):
    def extra(it, save) -> None:
        import matplotlib.pyplot as plt

        reasons = {r: n for r, n in k["review_reasons"].items() if n}
        if reasons:
            fig, ax = plt.subplots(figsize=(7, 3.5))
            ax.barh(list(reasons), list(reasons.values()), color="#C44E52")
            ax.set_title("Why documents went to review")
            ax.invert_yaxis()
            save(fig, "review_reasons.png")
        acc = {f: a for f, a in k["field_accuracy_reviewed"].items() if a is not None}
        if acc:
            fig, ax = plt.subplots(figsize=(7, 3.5))
            ax.bar(list(acc), [a * 100 for a in acc.values()], color="#4C72B0")
            ax.set_ylim(0, 100)
            ax.set_ylabel("% kept by the reviewer")
            ax.set_title("Field accuracy on reviewed documents")
            save(fig, "field_accuracy.png")
    return extra


def kpi_report(db, spec, reports_dir: Path, now: datetime | None = None) -> KpiReport:
    return kpis.flow_report(db, spec, reports_dir, now, lambda fr: document_kpis(fr[0], fr[5]), _rows, _sections, _charts)
