"""The support loop materialised through Dagster on a test instance, end to end."""

from __future__ import annotations

import json

import sqlalchemy as sa

from orch_project.lib.pipeline import status_counts
from orch_project.lib.intake import submit_to_table
from orch_project.lib.store import approvals, audit, dlq, item_stages, items, outbox, vault

from .conftest import MALFORMED, run_flow, run_ops, sample_messages, support_inbox, write_file

DAY = "2026-11-20"


def _connectors(orch_home):
    from orch_project.defs.resources import _embedded

    return _embedded(orch_home.connectors_url)


def test_flow_materialises_a_day_end_to_end(orch_home, db, with_model, defs, instance):
    msgs = sample_messages(DAY)
    assert submit_to_table(db, "support", msgs, "test") == len(msgs) == 50

    result = run_flow(defs, instance, DAY)
    assert result.success
    # every stage materialised the partition, with metadata the UI shows
    mats = {e.asset_key.to_user_string(): e for e in result.get_asset_materialization_events()
            for e in [e.event_specific_data.materialization]}
    assert set(mats) == {"support_inbound", "support_triage", "support_assignment", "support_knowledge",
                         "support_drafts", "support_approval_gate", "support_actions", "support_surveys"}
    assert all(m.partition == DAY for m in mats.values())
    assert mats["support_inbound"].metadata["accepted"].value == 50
    # blocking checks ran and passed
    checks = {e.asset_check_key.name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"inbound_nothing_lost": True, "inbound_pii_masked": True, "triage_labels_valid": True,
                      "drafts_outbound_clean": True, "actions_no_duplicate_effects": True}

    st = status_counts(db, "support")
    assert st["received"] == 50 and st["lost"] == 0
    resolved, waiting = st["states"].get("resolved", 0), st["states"].get("awaiting_approval", 0)
    assert resolved + waiting == 50 and resolved > 0 and waiting > 0

    with db.begin() as conn:
        rows = conn.execute(sa.select(items.c.item_id, items.c.status, items.c.data, items.c.due_at)).all()
        pending = conn.execute(sa.select(sa.func.count()).select_from(approvals)
                               .where(approvals.c.status == "pending")).scalar_one()
        stages = dict(conn.execute(sa.select(item_stages.c.stage, sa.func.count()).group_by(item_stages.c.stage)).all())
        delivered = conn.execute(sa.select(sa.func.count()).select_from(outbox)
                                 .where(outbox.c.status == "delivered")).scalar_one()
        gate_audits = conn.execute(sa.select(sa.func.count()).select_from(audit).where(
            audit.c.action.in_(("auto_approved", "approval_requested")))).scalar_one()
    assert pending == waiting
    assert gate_audits == 50
    assert stages["intake"] == stages["triage"] == stages["draft"] == 50
    assert stages["actions"] == resolved and stages["survey"] == resolved
    assert delivered == 4 * resolved  # ticket, reply, CRM log and survey per resolved item
    for item_id, status, data, due in rows:
        assert data["intent"] and data["queue"] and data["assignee"] and data["article_id"], item_id
        assert data["article_id"] in data["draft"], "the draft cites its article"
        assert due is not None
        if status == "awaiting_approval":
            assert data["approval_reasons"]
    # the connectors hold exactly one ticket, reply, CRM entry and survey per resolved item
    counts = _connectors(orch_home).counts()
    assert counts["tickets"] == counts["crm_activities"] == resolved
    assert counts["messages"] == 2 * resolved


def test_rerun_and_second_submit_add_nothing(orch_home, db, with_model, defs, instance):
    msgs = sample_messages(DAY)
    submit_to_table(db, "support", msgs, "test")
    assert run_flow(defs, instance, DAY).success
    before = _connectors(orch_home).counts()
    # the same messages again (a resend), and a re-execution of the partition
    assert submit_to_table(db, "support", msgs, "test") == 0
    assert run_flow(defs, instance, DAY).success
    assert _connectors(orch_home).counts() == before
    dups = _connectors(orch_home).duplicates()
    assert {"tickets", "crm_activities", "messages"} <= set(dups) and not any(dups.values())
    assert status_counts(db, "support")["received"] == 50


def test_duplicate_message_ids_across_sources_are_counted_not_reprocessed(orch_home, db, with_model, defs, instance):
    msgs = sample_messages(DAY)[:5]
    submit_to_table(db, "support", msgs, "test")
    # the same first message also arrives as a file in the inbox folder
    write_file(support_inbox(orch_home), "resend.json", json.dumps(msgs[0]).encode())
    assert run_flow(defs, instance, DAY).success
    st = status_counts(db, "support")
    assert st["received"] == 6 and st["states"]["duplicate"] == 1 and st["lost"] == 0


def test_malformed_inbound_goes_to_dlq_while_the_batch_succeeds(orch_home, db, with_model, defs, instance):
    good = sample_messages(DAY)[:10]
    submit_to_table(db, "support", good, "test")
    inbox = support_inbox(orch_home)
    template = dict(good[0], id="bad-big")
    bad = {
        "empty.json": b"",
        "binary.eml": bytes(range(256)) * 4,
        "invalid_utf8.json": json.dumps(dict(template, id="bad-utf8", body="card MARK")).encode().replace(
            b"MARK", b"\xff\xfe\xfa"),
        "missing_fields.json": json.dumps({"id": "bad-missing", "channel": "email"}).encode(),
        "huge_body.json": json.dumps(dict(template, body="x" * (10 * 1024 * 1024))).encode(),
    }
    for name, data in bad.items():
        write_file(inbox, name, data)
    # a 10 MB body through the inbox table too (no file-size guard there: the contract catches it)
    submit_to_table(db, "support", [dict(template, id="bad-big-table", body="y" * (10 * 1024 * 1024))], "test")
    for p in MALFORMED.iterdir():  # the shipped malformed corpus as well
        write_file(inbox, f"shipped_{p.name}", p.read_bytes())
    import os
    import time

    # files without a parseable date belong to their arrival day: make that the test day
    day_ts = time.mktime(time.strptime(DAY + " 12", "%Y-%m-%d %H"))
    for p in inbox.iterdir():
        os.utime(p, (day_ts, day_ts))

    result = run_flow(defs, instance, DAY)
    assert result.success, "bad input must not fail the run"
    with db.begin() as conn:
        dead = {r.source_key: (r.error_type, r.reason) for r in conn.execute(sa.select(dlq))}
    reasons = {k.split(":", 1)[1]: v for k, v in dead.items()}
    assert reasons["empty.json"] == ("empty", "empty file (0 bytes)")
    assert reasons["binary.eml"][0] == "binary"
    assert reasons["invalid_utf8.json"][0] == "encoding" and "UTF-8" in reasons["invalid_utf8.json"][1]
    assert "received_at: Field required" in reasons["missing_fields.json"][1]
    assert reasons["huge_body.json"][0] == "too_large" and "MiB" in reasons["huge_body.json"][1]
    table_big = [v for k, v in dead.items() if k.startswith("table:")]
    assert table_big and "body: String should have at most 100000 characters" in table_big[0][1]
    shipped = [k for k in reasons if k.startswith("shipped_")]
    # bad_channel.json carries a valid received_at of another day: it waits for that day's partition
    assert len(shipped) == 6 and "shipped_bad_channel.json" not in shipped
    for _, reason in dead.values():
        assert "yyyy" not in reason and "xxxx" not in reason, "reasons never echo input"
    st = status_counts(db, "support")
    assert st["states"]["dead_lettered"] == len(dead) == 12
    assert st["states"].get("resolved", 0) + st["states"].get("awaiting_approval", 0) == 10
    assert st["received"] == 22 and st["lost"] == 0


def test_stored_text_is_masked_and_raw_values_live_only_in_the_vault(orch_home, db, with_model, defs, instance):
    msgs = sample_messages(DAY)
    submit_to_table(db, "support", msgs, "test")
    assert run_flow(defs, instance, DAY).success
    with db.begin() as conn:
        stored = json.dumps([dict(r._mapping) for r in conn.execute(sa.select(items.c.data))], default=str)
        stored += json.dumps([dict(r._mapping) for r in conn.execute(sa.select(outbox.c.payload))], default=str)
        vaulted = {r.value for r in conn.execute(sa.select(vault.c.value))}
    for m in msgs:
        assert m["sender"]["email"] not in stored
        assert m["sender"]["name"] not in stored
        assert m["sender"]["email"] in vaulted


def test_ops_job_folds_csat_escalates_and_writes_the_report(orch_home, db, with_model, defs, instance):
    msgs = sample_messages()
    submit_to_table(db, "support", msgs, "test")
    for day in ("2026-11-19", "2026-11-20"):
        assert run_flow(defs, instance, day).success
    conn_client = _connectors(orch_home)
    with db.begin() as conn:
        resolved = [r.item_id for r in conn.execute(sa.select(items.c.item_id).where(items.c.status == "resolved"))]
    from datetime import datetime, timezone

    answers = [{"item_id": i, "score": 1 + n % 5, "comment": None, "responded_at": datetime.now(timezone.utc)}
               for n, i in enumerate(resolved[:20])]
    assert conn_client.record_survey_responses(answers) == 20

    result = run_ops(defs, instance)
    assert result.success
    mats = {e.event_specific_data.materialization.asset_key.to_user_string():
            e.event_specific_data.materialization for e in result.get_asset_materialization_events()}
    assert mats["support_csat"].metadata["responses_folded"].value == 20
    # every open item past its first-response due time is escalated, and only those
    st = status_counts(db, "support")
    with db.begin() as conn:
        overdue = conn.execute(sa.select(sa.func.count()).select_from(items).where(
            items.c.status == "awaiting_approval", items.c.due_at < datetime.now(timezone.utc))).scalar_one()
        escalated_roles = set(conn.execute(sa.select(approvals.c.required_role).where(
            approvals.c.item_id.in_(sa.select(items.c.item_id).where(items.c.escalated_at.is_not(None))))).scalars())
    assert st["escalated"] == overdue > 0
    assert escalated_roles == {"supervisor"}
    report = mats["support_kpi_report"].metadata
    html_path = report["html_report"].value
    md = report["report"].value
    assert "| received | 100 |" in md and "Latency, retries and failures by stage" in md
    from pathlib import Path

    html = Path(html_path).read_text()
    for chart in ("states_by_day", "top_intents", "latency_by_stage", "csat"):
        assert f"charts/{chart}.png" in html
        png = Path(html_path).parent / "charts" / f"{chart}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kpis = json.loads((Path(html_path).parent / "kpis.json").read_text())
    assert kpis["csat_responses"] == 20 and abs(kpis["csat_mean"] - 3.0) < 1e-9
    assert kpis["received"] == 100 and kpis["dlq_open"] == 0
    assert mats["support_insights"].metadata["backlog_items"].value >= 5
    # escalation alerts went out once; a second ops run escalates nobody twice
    before = conn_client.counts()["messages"]
    assert run_ops(defs, instance).success
    assert conn_client.counts()["messages"] == before


def test_ops_job_reports_on_a_new_install_and_on_a_day_of_bad_input_only(orch_home, db, defs, instance):
    """The ops job (report, insights, escalation) must not need resolved items to exist."""
    first = run_ops(defs, instance)
    assert first.success
    md = {e.event_specific_data.materialization.asset_key.to_user_string(): e.event_specific_data.materialization
          for e in first.get_asset_materialization_events()}["support_kpi_report"].metadata
    assert md["received"].value == 0 and md["dlq_open"].value == 0

    from datetime import datetime, timezone

    write_file(support_inbox(orch_home), "broken.json", b"{not json")  # undated: belongs to its arrival day
    assert run_flow(defs, instance, datetime.now(timezone.utc).date().isoformat()).success
    second = run_ops(defs, instance)
    assert second.success
    md = {e.event_specific_data.materialization.asset_key.to_user_string(): e.event_specific_data.materialization
          for e in second.get_asset_materialization_events()}["support_kpi_report"].metadata
    assert md["received"].value == 1 and md["dead_lettered"].value == 1 and md["resolved"].value == 0
