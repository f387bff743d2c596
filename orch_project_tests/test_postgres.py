"""The production path's app database: migrations and the support flow on a real PostgreSQL
(127.0.0.1:5432). Skipped with a message where no server runs; mandatory in CI
(ORCH_REQUIRE_SERVICES=1)."""

from __future__ import annotations

import os
import uuid

import pytest

from .conftest import register_promoted, require_services, run_flow, sample_messages

PG_HOST = os.environ.get("ORCH_TEST_PG_HOST", "127.0.0.1")
PG_USER = os.environ.get("ORCH_TEST_PG_USER", "postgres")


def _admin():
    import psycopg2

    conn = psycopg2.connect(host=PG_HOST, port=5432, user=PG_USER, dbname="postgres", connect_timeout=3)
    conn.autocommit = True
    return conn


@pytest.fixture
def pg_url(monkeypatch, orch_home):
    try:
        admin = _admin()
    except Exception as exc:
        if require_services():
            pytest.fail(f"PostgreSQL on {PG_HOST}:5432 is required in CI but unreachable: {exc}")
        pytest.skip(f"PostgreSQL on {PG_HOST}:5432 not reachable ({exc}); start it to run production-path tests")
    name = f"orch_test_{uuid.uuid4().hex[:10]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql+psycopg2://{PG_USER}@{PG_HOST}:5432/{name}"
    monkeypatch.setenv("ORCH_DATABASE_URL", url)
    yield url
    from orch_project.lib.store import dispose_engines

    dispose_engines()
    with admin.cursor() as cur:
        cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    admin.close()


def test_support_flow_on_postgres(pg_url, trained_model, defs, instance):
    import sqlalchemy as sa

    from orch_project.defs.support.logic import status_counts
    from orch_project.lib.intake import submit_to_table
    from orch_project.lib.store import Database

    db = Database(pg_url)
    assert db.dialect == "postgresql"
    tables = set(sa.inspect(db.engine).get_table_names())
    assert {"items", "outbox", "dlq", "audit", "approvals", "vault", "alembic_version"} <= tables
    register_promoted(db, trained_model)
    msgs = sample_messages("2026-11-20")
    assert submit_to_table(db, "support", msgs, "test") == 50
    assert submit_to_table(db, "support", msgs, "test") == 0  # ON CONFLICT DO NOTHING on PostgreSQL too
    assert run_flow(defs, instance, "2026-11-20").success
    assert run_flow(defs, instance, "2026-11-20").success  # re-execution is a no-op
    st = status_counts(db)
    assert st["received"] == 50 and st["lost"] == 0
    assert st["states"]["resolved"] + st["states"]["awaiting_approval"] == 50
