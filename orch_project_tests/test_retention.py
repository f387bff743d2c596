"""Raw-data retention: processed inbox input and finished items' vault tokens are purged past the
limit; unprocessed input and tokens still needed are kept; nothing is re-ingested."""

from __future__ import annotations

import json
from datetime import timedelta

import sqlalchemy as sa

from orch_project.lib.intake import drop_file, submit_to_table
from orch_project.lib.retention import purge
from orch_project.lib.store import audit, inbox, items, utcnow, vault

from .conftest import QUIET, run_flow, sample_messages, support_inbox

DAY = "2026-11-20"


def test_purge_removes_raw_data_past_the_limit_and_keeps_what_is_still_needed(orch_home, db, with_model, defs,
                                                                             instance):
    msgs = sample_messages(DAY)[:6]
    submit_to_table(db, "support", msgs, "test")
    file_msg = {**sample_messages(DAY)[6], "id": "file-msg-1"}
    drop_file(support_inbox(orch_home), "file-msg-1.json", json.dumps(file_msg).encode())
    assert run_flow(defs, instance, DAY).success
    with db.begin() as conn:
        statuses = dict(conn.execute(sa.select(items.c.item_id, items.c.status)).all())
        before_tokens = dict(conn.execute(sa.select(vault.c.item_id, sa.func.count()).group_by(vault.c.item_id)).all())
    waiting = {i for i, s in statuses.items() if s == "awaiting_approval"}
    finished = {i for i, s in statuses.items() if s in ("resolved", "dead_lettered")}
    assert finished and len(statuses) == 7

    with db.begin() as conn:  # intake already dropped the processed table rows' raw payloads
        assert all(json.loads(p)["reason"] == "ingested; raw payload dropped"
                   for (p,) in conn.execute(sa.select(inbox.c.payload)))
    restored = _restore_raw_payload(db, msgs[0])  # as a crash between ingest and tombstone would leave it

    # inside the limit nothing happens
    inside = purge(db, "support", support_inbox(orch_home), retention_days=30)
    assert (inside["inbox_rows_purged"], inside["inbox_files_purged"], inside["vault_tokens_purged"]) == (0, 0, 0)
    assert (support_inbox(orch_home) / "file-msg-1.json").exists()

    later = utcnow() + timedelta(days=31)
    counts = purge(db, "support", support_inbox(orch_home), retention_days=30, now=later)
    assert counts["inbox_rows_purged"] == 1 and counts["inbox_files_purged"] == 1
    with db.begin() as conn:
        assert set(json.loads(conn.execute(sa.select(inbox.c.payload).where(inbox.c.id == restored)).scalar_one())) \
            == {"purged_at", "reason"}
    assert counts["vault_tokens_purged"] == sum(before_tokens[i] for i in finished)
    with db.begin() as conn:
        payloads = [json.loads(p) for (p,) in conn.execute(sa.select(inbox.c.payload))]
        left = {i for (i,) in conn.execute(sa.select(vault.c.item_id))}
        trail = conn.execute(sa.select(audit.c.outputs).where(audit.c.action == "raw_data_purged")).scalars().all()
    assert all(set(p) == {"purged_at", "reason"} for p in payloads)
    raw = {m["sender"]["email"] for m in msgs} | {m["body"] for m in msgs}
    assert not [v for v in raw if v in json.dumps(payloads)]
    assert left == waiting  # the reply to a waiting item still needs its tokens
    assert not (support_inbox(orch_home) / "file-msg-1.json").exists()
    assert trail[-1]["inbox_files_purged"] == 1

    # a purge is idempotent, and purged input is never ingested again
    assert purge(db, "support", support_inbox(orch_home), retention_days=30, now=later)["inbox_rows_purged"] == 0
    assert submit_to_table(db, "support", msgs, "test") == 0
    assert run_flow(defs, instance, DAY).success
    with db.begin() as conn:
        assert conn.execute(sa.select(sa.func.count()).select_from(items)).scalar_one() == 7


def _restore_raw_payload(db, msg) -> int:
    """Put a message's raw payload back into its (tombstoned) inbox row; returns the row id."""
    with db.begin() as conn:
        row_id = conn.execute(sa.select(inbox.c.id).order_by(inbox.c.id)).scalars().first()
        conn.execute(inbox.update().where(inbox.c.id == row_id).values(payload=json.dumps(msg)))
    return row_id


def test_retention_job_runs_from_dagster(orch_home, db, with_model, defs, instance):
    msgs = sample_messages(DAY)[:4]
    submit_to_table(db, "support", msgs, "test")
    assert run_flow(defs, instance, DAY).success
    _restore_raw_payload(db, msgs[0])
    with db.begin() as conn:
        ended = conn.execute(sa.select(sa.func.count()).select_from(vault).join(items, items.c.item_id == vault.c.item_id)
                             .where(items.c.status.in_(("resolved", "dead_lettered", "rejected")))).scalar_one()
    assert ended > 0
    res = defs.resolve_job_def("support_retention_purge_job").execute_in_process(
        instance=instance, run_config={**QUIET, "ops": {"support_raw_retention": {"config": {"retention_days": 0}}}})
    assert res.success
    mat = res.get_asset_materialization_events()[0].event_specific_data.materialization
    assert mat.metadata["retention_days"].value == 0
    assert mat.metadata["inbox_rows_purged"].value == 1
    assert mat.metadata["vault_tokens_purged"].value == ended
