"""The production Dagster instance (dagster.postgres.yaml) on a real PostgreSQL (127.0.0.1:5432): the
support flow runs for a day partition through the `dagster job execute` CLI with both the Dagster
storage and the app database in temporary PostgreSQL databases, and its run and events are read back from
Postgres' runs / event_logs tables. Also checks that dagster.postgres.yaml, docker-compose.yml and the
Dockerfile agree. The Postgres test is skipped with a message where no server runs; mandatory in CI
(ORCH_REQUIRE_SERVICES=1)."""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from .conftest import PG_HOST, PG_USER, postgres_url, register_promoted, sample_messages

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
DAY = "2026-11-20"
FLOW_STEPS = {"support_inbound", "support_triage", "support_assignment", "support_knowledge", "support_drafts",
              "support_approval_gate", "support_actions", "support_surveys"}


def _env_vars(node) -> set[str]:
    """Every ``{env: NAME}`` in a Dagster config tree."""
    if isinstance(node, dict):
        if set(node) == {"env"}:
            return {node["env"]}
        return set().union(*(_env_vars(v) for v in node.values())) if node else set()
    return set()


@pytest.fixture
def pg_instance_env(monkeypatch, orch_home, tmp_path, pg_database):
    """Two temporary databases (Dagster storage, app) and a DAGSTER_HOME with dagster.postgres.yaml."""
    dagster_db, app_db = pg_database("orch_dg"), pg_database("orch_app")
    home = tmp_path / "dagster_pg_home"
    home.mkdir()
    shutil.copyfile(REPO / "dagster.postgres.yaml", home / "dagster.yaml")
    env = {"DAGSTER_HOME": str(home), "DAGSTER_PG_HOST": PG_HOST, "DAGSTER_PG_PORT": "5432",
           "DAGSTER_PG_USER": PG_USER, "DAGSTER_PG_PASSWORD": os.environ.get("ORCH_TEST_PG_PASSWORD", "unused"),
           "DAGSTER_PG_DB": dagster_db,
           "ORCH_DATABASE_URL": postgres_url(app_db)}
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    return {"env": env, "dagster_db": dagster_db, "app_db": app_db}


def _dagster_job_execute(day: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(BIN / "dagster"), "job", "execute", "-m", "orch_project.definitions", "-a", "defs",
         "-j", "support_flow_job", "--tags", json.dumps({"dagster/partition": day})],
        cwd=REPO, capture_output=True, text=True, timeout=300, env={**os.environ, "PYTHONWARNINGS": "ignore"})


def test_support_flow_on_postgres_dagster_instance(pg_instance_env, trained_model):
    import psycopg2

    from orch_project.lib.pipeline import status_counts
    from orch_project.lib.intake import submit_to_table
    from orch_project.lib.store import Database

    env = pg_instance_env["env"]
    db = Database(env["ORCH_DATABASE_URL"])
    assert db.dialect == "postgresql"
    register_promoted(db, trained_model)
    msgs = sample_messages(DAY)
    assert submit_to_table(db, "support", msgs, "test") == len(msgs) > 0

    out = _dagster_job_execute(DAY)
    assert out.returncode == 0, f"dagster job execute failed\n{out.stdout[-2000:]}\n{out.stderr[-4000:]}"

    # the run, its steps and its materializations are in the Dagster storage on PostgreSQL
    conn = psycopg2.connect(host=PG_HOST, port=5432, user=PG_USER, dbname=pg_instance_env["dagster_db"])
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT run_id, status, pipeline_name, run_body FROM runs")
            runs = cur.fetchall()
            assert len(runs) == 1, runs
            run_id, status, job_name, body = runs[0]
            assert (status, job_name) == ("SUCCESS", "support_flow_job")
            cur.execute("SELECT key, value FROM run_tags WHERE run_id = %s", (run_id,))
            assert dict(cur.fetchall()).get("dagster/partition") == DAY
            cur.execute("SELECT dagster_event_type, step_key, asset_key, partition FROM event_logs "
                        "WHERE run_id = %s", (run_id,))
            events = cur.fetchall()
    finally:
        conn.close()
    from dagster import DagsterEventType as E

    types = [e[0] for e in events]
    assert E.RUN_START.value in types and E.RUN_SUCCESS.value in types  # stored as PIPELINE_START/_SUCCESS
    assert FLOW_STEPS <= {e[1] for e in events if e[0] == E.STEP_SUCCESS.value}  # + the asset checks' steps
    mats = {(e[2], e[3]) for e in events if e[0] == E.ASSET_MATERIALIZATION.value}
    assert {"/".join(json.loads(k)) for k, _ in mats} == FLOW_STEPS
    assert {p for _, p in mats} == {DAY}

    # the same instance through Dagster's API: DagsterInstance.get() reads DAGSTER_HOME -> PostgreSQL
    import dagster as dg

    with dg.DagsterInstance.get() as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.event_log_storage).__name__ == "PostgresEventLogStorage"
        assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.SUCCESS

    # the app database on PostgreSQL holds the items
    st = status_counts(db, "support")
    assert st["received"] == len(msgs) and st["lost"] == 0
    assert st["states"]["resolved"] + st["states"]["awaiting_approval"] == len(msgs)

    # a second run of the partition is a no-op for the app (stages are idempotent by status)
    again = _dagster_job_execute(DAY)
    assert again.returncode == 0, again.stderr[-3000:]
    assert status_counts(db, "support")["states"] == st["states"]


def test_postgres_config_matches_docker_compose():
    """dagster.postgres.yaml reads exactly the DAGSTER_PG_* variables docker-compose.yml sets, for every
    Dagster service, pointing at the compose `postgres` service and its user/database; the image puts
    dagster.postgres.yaml at $DAGSTER_HOME/dagster.yaml."""
    inst = yaml.safe_load((REPO / "dagster.postgres.yaml").read_text())
    compose = yaml.safe_load((REPO / "docker-compose.yml").read_text())
    pg_cfg = inst["storage"]["postgres"]["postgres_db"]
    wanted = {"hostname": "DAGSTER_PG_HOST", "port": "DAGSTER_PG_PORT", "username": "DAGSTER_PG_USER",
              "password": "DAGSTER_PG_PASSWORD", "db_name": "DAGSTER_PG_DB"}
    assert {k: v.get("env") for k, v in pg_cfg.items() if k != "scheme"} == wanted
    # the driver the project installs (SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3)
    assert pg_cfg.get("scheme") == "postgresql+psycopg2"
    used = _env_vars(inst)
    assert used == set(wanted.values())

    services = compose["services"]
    assert {"postgres", "user_code", "webserver", "daemon"} <= set(services)
    for name in ("user_code", "webserver", "daemon"):
        env = services[name]["environment"]
        missing = used - set(env)
        assert not missing, f"service {name} lacks {missing}"
        assert "ORCH_DATABASE_URL" in env, name
        assert env["DAGSTER_PG_HOST"] in services, f"{name}: DAGSTER_PG_HOST is not a compose service"
        deps = services[name].get("depends_on") or {}
        assert deps, f"{name} has no depends_on"
    env = services["daemon"]["environment"]
    pg = services["postgres"]["environment"]
    assert env["DAGSTER_PG_HOST"] == "postgres"
    assert env["DAGSTER_PG_USER"] == pg["POSTGRES_USER"]
    assert env["DAGSTER_PG_DB"] == pg["POSTGRES_DB"]
    assert env["DAGSTER_PG_PASSWORD"] == pg["POSTGRES_PASSWORD"]
    assert str(env["DAGSTER_PG_PORT"]) == "5432"
    m = re.match(r"postgresql\+psycopg2://([^:@]+)(?::[^@]*)?@([^:/]+):(\d+)/(\w+)$", env["ORCH_DATABASE_URL"])
    assert m, env["ORCH_DATABASE_URL"]
    user, host, port, app_db = m.groups()
    assert (user, host, port) == (pg["POSTGRES_USER"], "postgres", "5432")
    init_sql = (REPO / "deploy" / "postgres-init.sql").read_text()
    assert f"CREATE DATABASE {app_db}" in init_sql, "the app database is not created by deploy/postgres-init.sql"
    assert any("postgres-init.sql" in v for v in services["postgres"].get("volumes", []))
    docker = (REPO / "Dockerfile").read_text()
    assert re.search(r"COPY dagster\.postgres\.yaml \S+/dagster\.yaml", docker)
    home = re.search(r"DAGSTER_HOME=(\S+)", docker).group(1)
    assert f"COPY dagster.postgres.yaml {home}/dagster.yaml" in docker
