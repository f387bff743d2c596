"""The production path's app database: migrations and the support flow on a real PostgreSQL
(127.0.0.1:5432). Skipped with a message where no server runs; mandatory in CI
(ORCH_REQUIRE_SERVICES=1)."""

from __future__ import annotations

import pytest

from .conftest import postgres_url, register_promoted, run_flow, sample_messages


@pytest.fixture
def pg_url(monkeypatch, orch_home, pg_database):
    url = postgres_url(pg_database("orch_test"))
    monkeypatch.setenv("ORCH_DATABASE_URL", url)
    return url


def test_support_flow_on_postgres(pg_url, trained_model, defs, instance):
    import sqlalchemy as sa

    from orch_project.lib.pipeline import status_counts
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
    st = status_counts(db, "support")
    assert st["received"] == 50 and st["lost"] == 0
    assert st["states"]["resolved"] + st["states"]["awaiting_approval"] == 50
