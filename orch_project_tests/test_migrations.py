"""Migration 0007 (flow-scoped keys) on SQLite and PostgreSQL: existing rows survive unchanged, vault
rows get their item's flow, two flows may then share an item id / intake source key / approval, and
the downgrade brings the single-column keys back."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from alembic import command

from orch_project.lib import store

BEFORE = "0006"
REVISION = "0007"
T0 = datetime(2026, 11, 20, 9, 30, 15, 123456, tzinfo=timezone.utc)
FLOW_A, FLOW_B = "flow_a", "flow_b"
TABLES = ("items", "intake", "approvals", "vault", "dlq", "outbox", "audit", "item_stages", "inbox")
# columns 0007 adds (not part of the "unchanged" comparison)
NEW_COLUMNS = {"vault": {"flow"}}


@pytest.fixture(params=["sqlite", "postgresql"])
def db_url(request, tmp_path):
    store.dispose_engines()
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path / 'app.sqlite'}"
    else:
        from .conftest import postgres_url

        url = postgres_url(request.getfixturevalue("pg_database")("orch_migr"))
    yield url
    store.dispose_engines()


def _alembic(url: str, fn, revision: str) -> None:
    """Run an Alembic command on one connection of the project's engine, as ``store.migrate`` does."""
    cfg = store.alembic_config(url)
    with store.make_engine(url).begin() as conn:
        cfg.attributes["connection"] = conn
        fn(cfg, revision)


def _current(url: str) -> str | None:
    from alembic.runtime.migration import MigrationContext

    with store.make_engine(url).connect() as conn:
        return MigrationContext.configure(conn).get_current_revision()


def _item(flow: str, item_id: str, i: int, **kw) -> dict:
    row = {"item_id": item_id, "flow": flow, "trace_id": f"trace{i:04d}", "day": "2026-11-20",
           "channel": "email" if i % 2 else None, "status": "resolved" if i % 2 else "open",
           "stage": "triage", "received_at": T0 + timedelta(minutes=i), "ingested_at": T0 + timedelta(minutes=i, seconds=1),
           "due_at": T0 + timedelta(hours=4) if i % 2 else None, "resolved_at": T0 + timedelta(hours=1) if i % 2 else None,
           "escalated_at": None, "escalation_level": i % 3,
           "data": {"intent": "refund", "scores": [0.25, 0.75], "nested": {"n": i, "ok": True, "none": None},
                    "text": "caf\u00e9 [EMAIL_1]"},
           "updated_at": T0 + timedelta(minutes=i, seconds=2)}
    row.update(kw)
    return row


def _intake(flow: str, key: str, item_id: str | None, i: int) -> dict:
    return {"source_key": key, "flow": flow, "item_id": item_id, "day": "2026-11-20",
            "outcome": "accepted" if item_id else "dead_lettered", "run_id": f"run{i}" if i % 2 else None,
            "ingested_at": T0 + timedelta(seconds=i)}


def _approval(flow: str, item_id: str, i: int) -> dict:
    return {"flow": flow, "item_id": item_id, "reason": "low_confidence", "required_role": "lead",
            "status": "approved" if i % 2 else "pending", "due_at": T0 + timedelta(hours=8),
            "created_at": T0 + timedelta(seconds=i), "decided_at": T0 + timedelta(hours=1) if i % 2 else None,
            "decided_by": "alice" if i % 2 else None, "decision_reason": "ok" if i % 2 else None, "edited": bool(i % 2)}


def _seed(conn) -> dict[str, str]:
    """Representative rows at revision 0006 (item ids globally unique, as they were); returns the
    vault token -> expected backfilled flow."""
    conn.execute(sa.insert(store.items), [_item(FLOW_A, "a-1", 1), _item(FLOW_A, "a-2", 2),
                                          _item(FLOW_B, "b-1", 3)])
    conn.execute(sa.insert(store.intake), [_intake(FLOW_A, "file:msg-1.json", "a-1", 1),
                                           _intake(FLOW_A, "table:42", "a-2", 2),
                                           _intake(FLOW_B, "file:msg-2.json", "b-1", 3),
                                           _intake(FLOW_B, "file:broken.eml", None, 4)])
    conn.execute(sa.insert(store.approvals), [_approval(FLOW_A, "a-1", 1), _approval(FLOW_B, "b-1", 2)])
    vault = [("tok-a1", "a-1", FLOW_A), ("tok-a2", "a-2", FLOW_A), ("tok-b1", "b-1", FLOW_B),
             ("tok-gone", "purged-item", None)]
    conn.execute(sa.insert(store.vault), [
        {"token": tok, "item_id": item, "entity_type": "EMAIL", "value": f"{tok}@example.com",
         "created_at": T0 + timedelta(seconds=n)} for n, (tok, item, _) in enumerate(vault)])
    conn.execute(sa.insert(store.dlq), [
        {"flow": FLOW_B, "item_id": None, "source_key": "file:broken.eml", "stage": "parse",
         "error_type": "ParseError", "reason": "bad MIME", "trace_id": "t9",
         "replay": {"source": "file:broken.eml", "attempt": 1}, "status": "open", "run_id": "run4",
         "created_at": T0}])
    conn.execute(sa.insert(store.outbox), [
        {"idempotency_key": f"{FLOW_A}:a-1:reply", "flow": FLOW_A, "item_id": "a-1", "trace_id": "trace0001",
         "connector": "email", "action": "reply", "payload": {"to": "[EMAIL_1]", "body": "hi"},
         "status": "delivered", "attempts": 1, "last_error": None, "external_ref": "ext-1",
         "created_at": T0, "delivered_at": T0 + timedelta(seconds=5)},
        {"idempotency_key": f"{FLOW_B}:b-1:ticket", "flow": FLOW_B, "item_id": "b-1", "trace_id": "trace0003",
         "connector": "tickets", "action": "create", "payload": {"priority": 2}, "status": "failed",
         "attempts": 3, "last_error": "timeout", "external_ref": None, "created_at": T0, "delivered_at": None}])
    conn.execute(sa.insert(store.audit), [
        {"at": T0, "actor": "system", "action": "ingest", "flow": FLOW_A, "item_id": "a-1", "trace_id": "trace0001",
         "reason": None, "inputs": {"source": "file:msg-1.json"}, "outputs": None},
        {"at": T0 + timedelta(seconds=1), "actor": "alice", "action": "approve", "flow": FLOW_B, "item_id": "b-1",
         "trace_id": "trace0003", "reason": "looks right", "inputs": None, "outputs": {"status": "approved"}}])
    conn.execute(sa.insert(store.item_stages), [
        {"item_id": "a-1", "flow": FLOW_A, "stage": "triage", "run_id": "run1", "started_at": T0,
         "finished_at": T0 + timedelta(milliseconds=250), "duration_ms": 250.5, "attempt": 1, "outcome": "ok"},
        {"item_id": "b-1", "flow": FLOW_B, "stage": "triage", "run_id": None, "started_at": T0,
         "finished_at": T0 + timedelta(seconds=2), "duration_ms": 2000.0, "attempt": 2, "outcome": "retried"}])
    conn.execute(sa.insert(store.inbox), [
        {"flow": FLOW_A, "external_id": "ext-1", "payload": json.dumps({"text": "hello"}), "submitted_at": T0,
         "submitted_by": "api"},
        {"flow": FLOW_B, "external_id": None, "payload": "{}", "submitted_at": T0, "submitted_by": None}])
    return {tok: flow for tok, _, flow in vault}


def _snapshot(conn) -> dict[str, list[dict]]:
    """Every row of every table as the driver returns it (``SELECT *``: raw storage on SQLite), sorted;
    columns added by 0007 left out."""
    out = {}
    for name in TABLES:
        rows = [{k: v for k, v in r.items() if k not in NEW_COLUMNS.get(name, ())}
                for r in conn.execute(sa.text(f"SELECT * FROM {name}")).mappings()]
        out[name] = sorted(rows, key=lambda r: json.dumps(r, default=str, sort_keys=True))
    return out


def _schema(conn) -> dict:
    """Columns, primary keys, unique constraints and indexes (not those backing a constraint) of the
    tables 0007 changes, and of audit; constraint names left out (SQLite reflects 0001's as None)."""
    insp = sa.inspect(conn)
    return {t: {"columns": [c["name"] for c in insp.get_columns(t)],
                "pk": sorted(insp.get_pk_constraint(t)["constrained_columns"]),
                "unique": sorted(sorted(u["column_names"]) for u in insp.get_unique_constraints(t)),
                "indexes": sorted((i["name"], tuple(i["column_names"]), bool(i["unique"]))
                                  for i in insp.get_indexes(t)
                                  if not i["name"].startswith("sqlite_autoindex") and "duplicates_constraint" not in i)}
            for t in ("items", "intake", "approvals", "vault", "audit")}


def _assert_audit_append_only(engine) -> None:
    for stmt in ("UPDATE audit SET actor = 'mallory'", "DELETE FROM audit"):
        with pytest.raises(sa.exc.DBAPIError, match="append-only"):
            with engine.begin() as conn:
                conn.execute(sa.text(stmt))


def _check_flow_scoped_keys(url: str) -> None:
    engine = store.make_engine(url)
    _alembic(url, command.upgrade, BEFORE)
    assert _current(url) == BEFORE
    with engine.begin() as conn:
        expected_flow = _seed(conn)
    with engine.connect() as conn:
        before, schema_before = _snapshot(conn), _schema(conn)
    assert all(before[t] for t in TABLES)

    _alembic(url, command.upgrade, "head")
    assert _current(url) == REVISION
    with engine.connect() as conn:
        after, schema = _snapshot(conn), _schema(conn)
        vault_flow = dict(conn.execute(sa.select(store.vault.c.token, store.vault.c.flow)).all())
        typed_items = {r["item_id"]: dict(r) for r in conn.execute(sa.select(store.items)).mappings()}
    for t in TABLES:
        assert after[t] == before[t], f"rows of {t} changed by the migration"
    assert vault_flow == expected_flow
    assert {k: {**v, **{c: store.as_utc(v[c]) for c in ("received_at", "ingested_at", "due_at", "resolved_at",
                                                         "escalated_at", "updated_at")}}
            for k, v in typed_items.items()} == {
        r["item_id"]: r for r in (_item(FLOW_A, "a-1", 1), _item(FLOW_A, "a-2", 2), _item(FLOW_B, "b-1", 3))}
    assert schema["items"]["pk"] == ["flow", "item_id"]
    assert schema["intake"]["pk"] == ["flow", "source_key"]
    assert schema["approvals"]["unique"] == [["flow", "item_id"]]
    assert schema["vault"]["columns"][-1] == "flow"
    assert ("ix_vault_flow_item", ("flow", "item_id"), False) in schema["vault"]["indexes"]
    for t in ("items", "intake", "approvals", "vault"):  # the indexes that were there are still there
        assert set(schema_before[t]["indexes"]) <= set(schema[t]["indexes"]), t
    assert schema["audit"] == schema_before["audit"]
    _assert_audit_append_only(engine)

    # two flows may now share an item id, a source key and an approval for the same item id
    db = store.Database(url)
    with db.begin() as conn:
        conn.execute(sa.insert(store.items), [_item(FLOW_B, "a-1", 7)])
        conn.execute(sa.insert(store.intake), [_intake(FLOW_B, "file:msg-1.json", "a-1", 7)])
        conn.execute(sa.insert(store.approvals), [_approval(FLOW_B, "a-1", 7)])
        # ON CONFLICT on the composite keys: a repeat is ignored, a third flow is inserted
        db.insert_ignore(conn, store.items, [_item(FLOW_B, "a-1", 8), _item("flow_c", "a-1", 8)], ["flow", "item_id"])
        db.insert_ignore(conn, store.intake, [_intake(FLOW_A, "file:msg-1.json", None, 8)], ["flow", "source_key"])
        db.insert_ignore(conn, store.approvals, [_approval(FLOW_A, "a-1", 8)], ["flow", "item_id"])
    with engine.connect() as conn:
        assert sorted(conn.execute(sa.select(store.items.c.flow, store.items.c.trace_id)
                                   .where(store.items.c.item_id == "a-1")).all()) == [
            (FLOW_A, "trace0001"), (FLOW_B, "trace0007"), ("flow_c", "trace0008")]
        assert conn.execute(sa.select(sa.func.count()).select_from(store.intake)
                            .where(store.intake.c.source_key == "file:msg-1.json")).scalar() == 2
        assert conn.execute(sa.select(sa.func.count()).select_from(store.approvals)
                            .where(store.approvals.c.item_id == "a-1")).scalar() == 2
    # ... but the same (flow, key) twice is still refused
    for table, row in ((store.items, _item(FLOW_A, "a-1", 9)), (store.intake, _intake(FLOW_A, "table:42", None, 9)),
                       (store.approvals, _approval(FLOW_B, "b-1", 9))):
        with pytest.raises(sa.exc.IntegrityError):
            with engine.begin() as conn:
                conn.execute(sa.insert(table), [row])

    # downgrade refuses while two flows share keys (and leaves 0007 in place) ...
    with pytest.raises(RuntimeError, match=r"share keys.*items\.item_id='a-1'.*intake\.source_key='file:msg-1\.json'"
                                           r".*approvals\.item_id='a-1'"):
        _alembic(url, command.downgrade, BEFORE)
    assert _current(url) == REVISION
    with engine.connect() as conn:
        assert _schema(conn) == schema
        assert not [t for t in sa.inspect(conn).get_table_names() if t.startswith("_alembic_tmp")]
    # ... and restores the 0006 schema and rows once they are unique again
    with engine.begin() as conn:
        conn.execute(sa.delete(store.items).where(store.items.c.item_id == "a-1", store.items.c.flow != FLOW_A))
        conn.execute(sa.delete(store.intake).where(store.intake.c.flow == FLOW_B,
                                                   store.intake.c.source_key == "file:msg-1.json"))
        conn.execute(sa.delete(store.approvals).where(store.approvals.c.flow == FLOW_B,
                                                      store.approvals.c.item_id == "a-1"))
    _alembic(url, command.downgrade, BEFORE)
    assert _current(url) == BEFORE
    with engine.connect() as conn:
        assert _snapshot(conn) == before
        assert _schema(conn) == schema_before
    _assert_audit_append_only(engine)
    with pytest.raises(sa.exc.IntegrityError):
        with engine.begin() as conn:
            conn.execute(sa.insert(store.items), [_item(FLOW_B, "a-2", 10)])

    # and up again
    _alembic(url, command.upgrade, "head")
    with engine.connect() as conn:
        assert _snapshot(conn) == before
        assert _schema(conn) == schema


def test_flow_scoped_keys(db_url):
    _check_flow_scoped_keys(db_url)
