"""`orch demo` in process (so coverage sees the demo and the flows' demo hooks): every flow runs on its
shipped samples with one summary per flow, nothing is unaccounted for, and a second demo adds nothing."""

from __future__ import annotations

import re

from click.testing import CliRunner


def _summary(out: str, title: str) -> dict[str, str]:
    block = out.split(title, 1)[1].split("\n\n", 1)[0]
    return {m.group(1).strip(): m.group(2).strip() for m in re.finditer(r"^  (\S[^\d/]*?)\s{2,}(.+)$", block, re.M)}


def test_demo_runs_every_flow_and_is_idempotent(orch_home, with_model):
    from orch_project.cli import main
    from orch_project.kit.registry import discover

    runner = CliRunner()
    first = runner.invoke(main, ["demo"], catch_exceptions=False)
    assert first.exit_code == 0, first.output[-3000:]
    for spec in discover().values():
        assert f"{spec.title} summary" in first.output
    s = _summary(first.output, "Support loop summary")
    # 307 shipped samples + the 17 complaints and outage reports the marketing program hands over
    assert s["items received"] == "324" and s["unaccounted"] == "0" and s["dead-lettered"] == "7"
    assert int(s["resolved"]) + int(s["awaiting approval"]) + int(s["dead-lettered"]) == 324
    assert s["connectors"].startswith(f"tickets {s['resolved']}, CRM entries {s['resolved']}")
    assert "customers answer their surveys" in first.output
    assert (orch_home.reports_dir / "support" / "kpi_report.html").is_file()
    d = _summary(first.output, "Document workflow summary")
    assert d["items received"] == "40" and d["unaccounted"] == "0" and d["dead-lettered"] == "7"
    assert d["duplicates ignored"] == "1" and d["still in progress"] == "0"
    assert int(d["awaiting approval"]) >= 1 and d["rejected by a person"] == "2"
    assert sum(int(d[k]) for k in ("resolved", "awaiting approval", "rejected by a person", "dead-lettered",
                                   "duplicates ignored")) == 40
    assert d["connectors"] == f"AP bills posted {d['resolved']}, voided 0, payment runs {d['resolved']}"
    assert "the AP team reviews" in first.output
    assert (orch_home.reports_dir / "documents" / "kpi_report.html").is_file()
    ld = _summary(first.output, "Lead handling summary")
    assert ld["unaccounted"] == "0" and ld["still in progress"] == "0" and ld["dead-lettered"] == "9"
    assert sum(int(ld[k]) for k in ("resolved", "awaiting approval", "rejected by a person", "dead-lettered",
                                    "duplicates ignored")) == int(ld["items received"])
    assert int(ld["resolved"]) >= 90 and ld["CRM"].endswith(f"{ld['resolved']} lead upserts")
    assert "the sales manager decides" in first.output
    assert (orch_home.reports_dir / "leads" / "kpi_report.html").is_file()

    m = _summary(first.output, "Marketing program summary")
    assert m["items received"] == "245" and m["unaccounted"] == "0" and m["dead-lettered"] == "4"
    assert m["hand-overs"].startswith("17 complaints to support")
    assert (orch_home.reports_dir / "marketing" / "kpi_report.html").is_file()

    o = _summary(first.output, "E-commerce orders summary")
    assert o["unaccounted"] == "0" and o["invariant violations"] == "0" and o["dead-lettered"] == "7"
    assert o["duplicates ignored"] == "1" and o["awaiting approval"] == "0"
    for outcome in ("1 cancelled", "1 lost refunded", "1 returned", "1 payment declined", "1 out of stock", "1 refused"):
        assert outcome in o["orders"], o["orders"]
    assert (orch_home.reports_dir / "orders" / "kpi_report.html").is_file()

    second = runner.invoke(main, ["demo"], catch_exceptions=False)
    assert second.exit_code == 0, second.output[-3000:]
    assert "nothing new" in second.output
    again = _summary(second.output, "Support loop summary")
    assert again == s  # no new item, ticket, CRM entry, message or survey answer
    assert _summary(second.output, "Document workflow summary") == d  # no new document or bill
    assert _summary(second.output, "Lead handling summary") == ld  # no new lead, contact or message
    assert _summary(second.output, "Marketing program summary") == m  # no new post, asset, hand-over or budget
    assert _summary(second.output, "E-commerce orders summary") == o  # no new order, event, charge or refund
    only = runner.invoke(main, ["demo", "--flow", "nope"])
    assert only.exit_code == 2 and "no flow 'nope'" in only.output
