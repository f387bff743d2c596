"""The document workflow through Dagster on a test instance: every input format end to end, duplicates,
malformed files, review with corrections and two approvers, exactly-once posting and compensation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import datetime, timezone
from decimal import Decimal
from pathlib import Path

import pytest
import sqlalchemy as sa

from orch_project.lib.connectors.embedded import messages

from orch_project.defs.documents import logic, sample_data as sd
from orch_project.lib import approvals as hitl
from orch_project.lib.intake import submit_to_table
from orch_project.lib.pipeline import status_counts
from orch_project.lib.store import audit, dlq, items

from .conftest import flow_inbox, run_flow, run_ops

DAY = "2026-11-30"
FLOW = "documents"
ARRIVAL = datetime(2026, 11, 30, 10, 0, tzinfo=timezone.utc).timestamp()


def drop(settings, name: str, data: bytes, at: float = ARRIVAL) -> Path:
    """A document in the flow's inbox folder, arrived at ``at`` (its mtime: the partition day)."""
    folder = flow_inbox(settings, FLOW)
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_bytes(data)
    os.utime(p, (at, at))
    return p


def bills(settings) -> list[dict]:
    from orch_project.defs.resources import _embedded

    conn_db = _embedded(settings.connectors_url).db
    with conn_db.begin() as conn:
        if not sa.inspect(conn).has_table("ap_bills"):
            return []
        return [dict(r) for r in conn.execute(sa.select(logic.ap_bills).order_by(logic.ap_bills.c.id)).mappings()]


def item(db, name: str) -> dict:
    with db.begin() as conn:
        for iid, status, data in conn.execute(sa.select(items.c.item_id, items.c.status, items.c.data)
                                              .where(items.c.flow == FLOW)):
            if data.get("name") == name:
                return {"item_id": iid, "status": status, **data}
    raise AssertionError(f"no item for {name}")


def invoice(i: int = 0, **changes) -> sd.Invoice:
    from dataclasses import replace

    return replace(sd.invoices(seed=11, n=10)[i], **changes)


def test_every_format_end_to_end(orch_home, db, defs, instance):
    docs = {"a.txt": (invoice(0), "txt"), "b.csv": (invoice(1), "csv"), "c.pdf": (invoice(2), "pdf"),
            "d.png": (invoice(3), "png")}
    for name, (inv, fmt) in docs.items():
        drop(orch_home, name, sd.render(inv, fmt))
    result = run_flow(defs, instance, DAY, FLOW)
    assert result.success
    checks = {e.asset_check_key.name: e.passed for e in result.get_asset_check_evaluations()}
    assert checks == {"intake_documents_nothing_lost": True, "intake_documents_pii_masked": True,
                      "extraction_contract_holds": True, "every_rule_ran": True, "posted_bills_complete": True,
                      "post_no_duplicate_effects": True, "notify_no_duplicate_effects": True}
    st = status_counts(db, FLOW)
    assert {k: n for k, n in st["states"].items() if n} == {"resolved": 4}, st
    assert st["lost"] == 0
    posted = {b["item_id"]: b for b in bills(orch_home)}
    assert len(posted) == 4
    for name, (inv, fmt) in docs.items():
        it = item(db, name)
        truth = inv.truth()
        assert it["format"] == {"txt": "text", "csv": "ocr_lines", "pdf": "pdf", "png": "image"}[fmt]
        bill = posted[it["item_id"]]
        assert (bill["total"], bill["currency"], bill["doc_date"], bill["number"]) == (
            truth["total"], truth["currency"], truth["date"], truth["number"]), name
        assert bill["document_link"].endswith(name) and bill["document_sha256"] == it["sha256"]
        # every field read off the page says where: page, line, box
        for f in ("vendor", "number", "date", "total"):
            prov = it["fields"][f]["provenance"]
            assert prov and prov[0]["page"] == 1 and len(prov[0]["box"]) == 4, (name, f)
            line = it["lines"][prov[0]["line"]]
            assert line["index"] == prov[0]["line"]
        assert len(it["line_items"]) == len(inv.lines), name
    # the submitter (the AP inbox channel for folder drops) was told, once per document
    from orch_project.defs.resources import _embedded

    assert _embedded(orch_home.connectors_url).counts()["messages"] == 4


def test_rerun_and_resubmission_post_nothing_twice(orch_home, db, defs, instance):
    inv = invoice(4)
    drop(orch_home, "x.txt", sd.render(inv, "txt"))
    assert run_flow(defs, instance, DAY, FLOW).success
    assert len(bills(orch_home)) == 1
    # the partition again, and the very same file under another name
    drop(orch_home, "x_again.txt", sd.render(inv, "txt"))
    assert run_flow(defs, instance, DAY, FLOW).success
    assert run_flow(defs, instance, DAY, FLOW).success
    assert len(bills(orch_home)) == 1
    st = status_counts(db, FLOW)
    assert st["received"] == 2 and st["states"].get("duplicate") == 1 and st["lost"] == 0


def test_same_bill_in_another_format_is_caught_as_a_duplicate(orch_home, db, defs, instance):
    inv = invoice(5)
    drop(orch_home, "first.pdf", sd.render(inv, "pdf"), at=ARRIVAL)
    drop(orch_home, "second.txt", sd.render(inv, "txt"), at=ARRIVAL + 60)
    assert run_flow(defs, instance, DAY, FLOW).success
    first, second = item(db, "first.pdf"), item(db, "second.txt")
    assert first["status"] == "resolved"
    assert second["status"] == "awaiting_review" and second["failed_rules"] == ["duplicate"]
    reason = next(c["reason"] for c in second["validation"] if c["rule"] == "duplicate")
    assert first["item_id"] in reason and "vendor + number" in reason
    assert len(bills(orch_home)) == 1


def test_malformed_files_go_to_the_dlq_while_the_batch_goes_on(orch_home, db, defs, instance):
    for p in sorted((sd.SAMPLES_DIR / "malformed").iterdir()):
        drop(orch_home, p.name, p.read_bytes())
    drop(orch_home, "good.txt", sd.render(invoice(6), "txt"))
    # a registration through the inbox table naming a file that is not there
    submit_to_table(db, FLOW, [{"id": "r1", "path": str(orch_home.home / "nowhere.pdf"),
                                "received_at": "2026-11-30T10:00:00Z"}], "test")
    assert run_flow(defs, instance, DAY, FLOW).success
    with db.begin() as conn:
        dead = {r.source_key: (r.error_type, r.reason) for r in conn.execute(sa.select(dlq).where(dlq.c.flow == FLOW))}
    kinds = {k.split(":", 1)[1]: v[0] for k, v in dead.items()}
    assert kinds == {"empty.pdf": "empty", "locked.pdf": "encrypted", "torn.png": "unreadable",
                     "contract.docx": "unsupported", "binary.txt": "unsupported", "blank.pdf": "no_text", "1": "forbidden"}
    assert all(reason for _, reason in dead.values())
    assert "password-protected" in dead["file:locked.pdf"][1]
    assert item(db, "good.txt")["status"] == "resolved"
    assert status_counts(db, FLOW)["lost"] == 0


def test_oversized_file_is_refused_before_it_is_read(orch_home, monkeypatch):
    settings = logic.CFG.settings.model_copy(update={"max_file_mib": 0.001})
    big = orch_home.home / "big.txt"
    big.write_bytes(b"Total 1.00\n" * 200)
    from orch_project.lib.docread import DocumentError

    with pytest.raises(DocumentError) as exc:
        logic.read_file(big, settings)
    assert exc.value.kind == "too_large" and "limit" in exc.value.reason


def _resume(defs, instance, db):
    resumed = hitl.resume_decided(db, FLOW)
    for day in resumed.approved:
        r = defs.resolve_job_def(f"{FLOW}_approval_resume_job").execute_in_process(
            instance=instance, partition_key=day, raise_on_error=False)
        assert r.success
    return resumed


def test_review_with_corrections_posts_the_corrected_values_once(orch_home, db, defs, instance, tmp_path):
    inv = invoice(7)
    wrong = invoice(7, total_override=inv.total + Decimal("10.00"))
    drop(orch_home, "wrong.txt", sd.render(wrong, "txt"))
    assert run_flow(defs, instance, DAY, FLOW).success
    it = item(db, "wrong.txt")
    assert it["status"] == "awaiting_review" and it["failed_rules"] == ["total_matches_subtotal_tax"]
    pending = {r["item_id"]: r for r in hitl.pending(db, FLOW)}
    assert pending[it["item_id"]]["reasons"] == ["total_matches_subtotal_tax"]
    # the reviewer's view: text, fields, the failing rule
    out = subprocess.run([sys.executable, "-m", "orch_project.cli", "documents", "review", it["item_id"]],
                         capture_output=True, text=True, env=os.environ.copy(), timeout=120)
    assert out.returncode == 0, out.stderr
    assert "FAIL total_matches_subtotal_tax" in out.stdout and "total" in out.stdout and "<- check" in out.stdout
    # a correction file with a field that does not exist is refused, nothing changes
    bad = tmp_path / "bad.yaml"
    bad.write_text("totl: 1\n")
    with pytest.raises(hitl.ApprovalError, match="unknown field"):
        hitl.decide(db, it["item_id"], "approve", "ap-nora", "", bad.read_text(), logic.CFG.roster, flow=FLOW)
    fix = tmp_path / "fix.yaml"
    fix.write_text(f'total: "{inv.total}"\n')
    out = subprocess.run([sys.executable, "-m", "orch_project.cli", "approve", it["item_id"], "--as", "ap-nora",
                          "--edit-file", str(fix), "--flow", FLOW], capture_output=True, text=True,
                         env=os.environ.copy(), timeout=120)
    assert out.returncode == 0, out.stderr
    _resume(defs, instance, db)
    it = item(db, "wrong.txt")
    assert it["status"] == "resolved"
    assert it["corrections"] == {"total": {"extracted": f"{wrong.total}", "corrected": f"{inv.total}"}}
    assert all(c["ok"] for c in it["review_validation"])
    posted = bills(orch_home)
    assert [b["total"] for b in posted] == [f"{inv.total}"]
    # again: nothing twice
    assert run_flow(defs, instance, DAY, FLOW).success
    _resume(defs, instance, db)
    assert len(bills(orch_home)) == 1
    with db.begin() as conn:
        actions = [a for (a,) in conn.execute(sa.select(audit.c.action).where(audit.c.item_id == it["item_id"]))]
    assert "approval_approved" in actions and "approval_requested" in actions
    # the correction is kept as a labelled example, and counts in the override rate and field accuracy
    assert run_ops(defs, instance, FLOW).success
    examples = (orch_home.home / "datasets" / "documents_labelled.jsonl").read_text().splitlines()
    assert [json.loads(x)["fields"]["total"] for x in examples] == [f"{inv.total}"]
    k = json.loads((orch_home.reports_dir / FLOW / "kpis.json").read_text())
    assert k["override_rate"] == 1.0 and k["field_accuracy_reviewed"]["total"] == 0.0
    assert k["field_accuracy_reviewed"]["vendor"] == 1.0 and k["review_reasons"]["total_matches_subtotal_tax"] == 1


def test_above_the_amount_two_people_approve(orch_home, db, defs, instance):
    big = invoice(0, lines=[("Annual licence, 40 seats", 40, Decimal("180.00"))])
    drop(orch_home, "big.txt", sd.render(big, "txt"))
    assert run_flow(defs, instance, DAY, FLOW).success
    it = item(db, "big.txt")
    assert it["approval_reasons"] == ["amount_over_threshold"]
    out = hitl.decide(db, it["item_id"], "approve", "ap-nora", "as ordered", None, logic.CFG.roster, flow=FLOW)
    assert out["status"] == "pending" and out["needs_second_approval_by_role"] == "supervisor"
    assert not _resume(defs, instance, db)  # nothing moves on one signature
    with pytest.raises(hitl.NotAuthorised, match="role"):  # a clerk cannot give the second approval
        hitl.decide(db, it["item_id"], "approve", "ap-tomas", "", None, logic.CFG.roster, flow=FLOW)
    hitl.decide(db, it["item_id"], "approve", "ap-victor", "budgeted", None, logic.CFG.roster, flow=FLOW)
    _resume(defs, instance, db)
    it = item(db, "big.txt")
    assert it["status"] == "resolved" and [s["by"] for s in it["signoffs"]] == ["ap-nora", "ap-victor"]
    assert [b["total"] for b in bills(orch_home)] == [f"{big.total}"]


def test_the_same_person_cannot_sign_twice(orch_home, db, defs, instance):
    big = invoice(2, lines=[("Data centre rack", 2, Decimal("4200.00"))])
    drop(orch_home, "rack.txt", sd.render(big, "txt"))
    assert run_flow(defs, instance, DAY, FLOW).success
    iid = item(db, "rack.txt")["item_id"]
    hitl.decide(db, iid, "approve", "ap-victor", "", None, logic.CFG.roster, flow=FLOW)
    with pytest.raises(hitl.NotAuthorised, match="already signed"):
        hitl.decide(db, iid, "approve", "ap-victor", "", None, logic.CFG.roster, flow=FLOW)
    hitl.decide(db, iid, "approve", "ap-maya", "", None, logic.CFG.roster, flow=FLOW)
    _resume(defs, instance, db)
    assert item(db, "rack.txt")["status"] == "resolved"


def test_a_posting_that_fails_for_good_is_voided_and_dead_lettered(orch_home, db, defs, instance, monkeypatch):
    from orch_project.defs.resources import _embedded

    # the circuit breaker would hold deliveries back after 3 failures (connectors.yaml); this test wants
    # every run to try, so the effect reaches its max attempts
    policy = logic.CFG.connector_policy
    loose = policy.model_copy(update={"circuit_breaker": policy.circuit_breaker.model_copy(
        update={"failure_threshold": 100})})
    monkeypatch.setitem(logic.CFG.__dict__, "connector_policy", loose)
    conns = _embedded(orch_home.connectors_url)
    drop(orch_home, "n.txt", sd.render(invoice(8), "txt"))
    conns.set_fault("payments")  # the bill posts, its payment run never does
    assert run_flow(defs, instance, DAY, FLOW).success
    assert item(db, "n.txt")["status"] == "approved"  # waiting for its payment run
    assert [b["status"] for b in bills(orch_home)] == ["posted"]
    for _ in range(logic.CFG.connector_policy.max_attempts):
        assert run_ops(defs, instance, FLOW).success
    conns.clear_fault()
    it = item(db, "n.txt")
    assert it["status"] == "dead_lettered" and it["compensation"]["compensated"] == ["bill:void_bill"]
    assert [b["status"] for b in bills(orch_home)] == ["void"]
    with conns.db.begin() as conn:  # nobody was told "posted" (an SLA escalation alert may go to a supervisor)
        kinds = conn.execute(sa.select(messages.c.kind).where(messages.c.item_id == it["item_id"])).scalars().all()
    assert "notification" not in kinds
    with db.begin() as conn:
        reason = conn.execute(sa.select(dlq.c.reason).where(dlq.c.item_id == it["item_id"])).scalar_one()
    assert "payment" in reason and "void_bill" in reason


def test_the_submitter_is_told_only_after_the_bill_is_posted(orch_home, db, defs, instance):
    from orch_project.defs.resources import _embedded

    conns = _embedded(orch_home.connectors_url)
    drop(orch_home, "m.txt", sd.render(invoice(9), "txt"))
    conns.set_fault("accounting")
    assert run_flow(defs, instance, DAY, FLOW).success
    told = ("notification",)  # an SLA escalation alert to a supervisor may go out too: not counted here
    assert item(db, "m.txt")["status"] == "approved" and conns.counts(kinds=told)["messages"] == 0
    conns.clear_fault()
    assert run_ops(defs, instance, FLOW).success  # redelivery: bill, payment run, then the notification
    assert item(db, "m.txt")["status"] == "resolved" and conns.counts(kinds=told)["messages"] == 1
    assert [b["status"] for b in bills(orch_home)] == ["posted"]


def test_a_registration_may_only_name_files_under_the_allowed_folders(orch_home, db, defs, instance, tmp_path,
                                                                      monkeypatch):
    outside = tmp_path / "outside.txt"
    outside.write_bytes(sd.render(invoice(3), "txt"))
    allowed = tmp_path / "scans"
    allowed.mkdir()
    (allowed / "ok.txt").write_bytes(sd.render(invoice(4), "txt"))
    (allowed / "link.txt").symlink_to(outside)
    monkeypatch.setenv("ORCH_DOCUMENT_ROOTS", str(allowed))
    rows = [{"id": "a", "path": "/etc/passwd"}, {"id": "b", "path": str(outside)},
            {"id": "c", "path": str(allowed / "link.txt")}, {"id": "d", "path": str(allowed / "ok.txt"),
                                                             "submitter_email": "clerk@suppliers.example"}]
    for r in rows:
        r["received_at"] = "2026-11-30T10:00:00Z"
    submit_to_table(db, FLOW, rows, "test")
    assert run_flow(defs, instance, DAY, FLOW).success
    with db.begin() as conn:
        dead = dict(conn.execute(sa.select(dlq.c.source_key, dlq.c.error_type).where(dlq.c.flow == FLOW)).all())
    assert sorted(dead.values()) == ["forbidden"] * 3 and len(dead) == 3
    ok = item(db, "ok.txt")
    assert ok["status"] == "resolved" and ok["submitter_token"].startswith("tok_")
    with db.begin() as conn:
        texts = [json.dumps(d) for (d,) in conn.execute(sa.select(items.c.data).where(items.c.flow == FLOW))]
    assert not any("root:" in t for t in texts)


def test_a_clerk_cannot_correct_a_bill_below_the_second_approval(orch_home, db, defs, instance):
    big = invoice(0, lines=[("Annual licence, 40 seats", 40, Decimal("180.00"))])
    drop(orch_home, "big2.txt", sd.render(big, "txt"))
    assert run_flow(defs, instance, DAY, FLOW).success
    iid = item(db, "big2.txt")["item_id"]
    small = 'total: "4000.00"\nsubtotal: "3361.34"\ntax: "638.66"\nline_items: [{description: x, quantity: "1", unit_price: "3361.34", amount: "3361.34"}]\n'
    out = hitl.decide(db, iid, "approve", "ap-nora", "", small, logic.CFG.roster, flow=FLOW)
    assert out["status"] == "pending" and out["needs_second_approval_by_role"] == "supervisor"
    # the second approver changes the amount again: a third person must see it
    fix = f'total: "{big.total}"\nsubtotal: "{big.subtotal}"\ntax: "{big.tax}"\n' \
          f'line_items: [{{description: licence, quantity: "40", unit_price: "180.00", amount: "7200.00"}}]\n'
    out = hitl.decide(db, iid, "approve", "ap-victor", "", fix, logic.CFG.roster, flow=FLOW)
    assert out["status"] == "pending"
    hitl.decide(db, iid, "approve", "ap-maya", "", None, logic.CFG.roster, flow=FLOW)
    _resume(defs, instance, db)
    it = item(db, "big2.txt")
    assert it["status"] == "resolved" and [s["by"] for s in it["signoffs"]] == ["ap-victor", "ap-maya"]
    assert [b["total"] for b in bills(orch_home)] == [f"{big.total}"]


def test_a_correction_that_leaves_the_document_inconsistent_is_refused(orch_home, db, defs, instance):
    wrong = invoice(7, total_override=invoice(7).total + Decimal("10.00"))
    drop(orch_home, "w2.txt", sd.render(wrong, "txt"))
    assert run_flow(defs, instance, DAY, FLOW).success
    iid = item(db, "w2.txt")["item_id"]
    for bad, msg in [('total: "12,50"\n', "total_matches_subtotal_tax"), ("currency: null\n", "schema"),
                     ('number: 0123\ntotal: "1.0.0"\n', "not an amount")]:
        with pytest.raises(hitl.ApprovalError, match=msg):
            hitl.decide(db, iid, "approve", "ap-nora", "", bad, logic.CFG.roster, flow=FLOW)
    assert hitl.pending(db, FLOW)[0]["item_id"] == iid  # nothing decided
    assert logic.parse_corrections("number: 0123\nvendor: yes\n") == {"number": "0123", "vendor": "yes"}


def test_extract_cli_prints_one_json_object_per_document(tmp_path):
    folder = tmp_path / "docs"
    folder.mkdir()
    inv = invoice(1)
    (folder / "one.txt").write_bytes(sd.render(inv, "txt"))
    (folder / "two.csv").write_bytes(sd.render(inv, "csv"))  # the same bill: a duplicate
    (folder / "three.pdf").write_bytes(b"")
    out = subprocess.run([sys.executable, "-m", "orch_project.cli", "documents", "extract", str(folder), "--jsonl"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 1  # one file could not be read
    recs = {r["id"]: r for r in map(json.loads, out.stdout.splitlines())}
    assert set(recs) == {"one", "two", "three"}
    one = recs["one"]
    assert set(one["fields"]) == {"vendor", "address", "tax_id", "number", "date", "currency", "subtotal", "tax",
                                  "total", "line_items"}
    assert one["fields"]["total"] == inv.truth()["total"] and one["fields"]["date"] == inv.truth()["date"]
    assert one["needs_review"] is False and {c["rule"] for c in one["validation"]} == set(logic.v.RULES)
    two = recs["two"]
    assert two["needs_review"] is True
    assert [c["rule"] for c in two["validation"] if not c["ok"]] == ["duplicate"]
    assert recs["three"]["error"]["kind"] == "empty"


def test_openai_path_uses_structured_output_with_the_contract(orch_home, openai_env, db, instance, fake_openai):
    text = sd.render(invoice(0), "txt").decode() + "Questions? write to billing.person@example.com\n"
    drop(orch_home, "o.txt", text.encode())
    assert run_flow(openai_env, instance, DAY, FLOW).success
    reqs = [r["body"] for r in fake_openai.requests()
            if (r["body"].get("response_format") or {}).get("json_schema", {}).get("name") == "documents_extract"]
    assert len(reqs) == 1
    schema = reqs[0]["response_format"]["json_schema"]["schema"]
    assert {"vendor", "total", "line_items"} <= set(schema["properties"])
    sent = json.dumps(reqs[0]["messages"])
    assert "billing.person@example.com" not in sent and "<EMAIL_ADDRESS>" in sent
    assert "[0] " in sent  # numbered lines: the model answers with provenance
    it = item(db, "o.txt")
    assert it["fields"]["total"]["value"] == invoice(0).truth()["total"]
    assert it["fields"]["total"]["provenance"]


def test_jpeg_and_multi_page_tiff_are_read_through_ocr():
    import io

    from PIL import Image

    from orch_project.lib import docread

    inv = invoice(1)
    page = Image.open(io.BytesIO(sd.render(inv, "png"))).convert("RGB")
    jpg = io.BytesIO()
    page.save(jpg, format="JPEG", quality=90)
    doc = docread.read_document("scan.jpg", jpg.getvalue())
    assert doc.format == "image" and doc.pages == 1
    assert any(inv.number in line.text.replace(" ", "") for line in doc.lines)
    tif = io.BytesIO()
    page.save(tif, format="TIFF", save_all=True, append_images=[page.rotate(0)])
    doc = docread.read_document("scan.tiff", tif.getvalue())
    assert doc.pages == 2 and {line.page for line in doc.lines} == {1, 2}
    assert all(0.0 < line.confidence <= 1.0 for line in doc.lines)


def test_intake_sensor_requests_one_run_per_day_for_every_file(orch_home, defs, instance):
    import dagster as dg

    from orch_project.defs.resources import default_resources

    drop(orch_home, "a.txt", sd.render(invoice(0), "txt"))
    drop(orch_home, "b.docx", b"PK\x03\x04 not a document")  # unsupported, still seen: it must reach the DLQ
    drop(orch_home, "c.pdf", sd.render(invoice(2), "pdf"), at=ARRIVAL + 86400)
    sensor = defs.get_sensor_def(f"{FLOW}_intake_sensor")
    with dg.build_sensor_context(instance=instance, definitions=defs, resources=default_resources()) as ctx:
        result = sensor.evaluate_tick(ctx)
    by_day = {r.partition_key: r.tags["orch/new_sources"] for r in result.run_requests}
    assert by_day == {"2026-11-30": "2", "2026-12-01": "1"}
    with dg.build_sensor_context(instance=instance, definitions=defs, resources=default_resources(),
                                 cursor=result.cursor) as ctx:
        again = sensor.evaluate_tick(ctx)
    assert not again.run_requests
