"""People's entry points as subprocesses: the orch CLI, and a backfill with the dagster CLI."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import sqlalchemy as sa

from orch_project.defs.support.sample_data import SAMPLES_DIR

from .conftest import MALFORMED

BIN = Path(sys.executable).parent


def _run(args, env, check=True):
    out = subprocess.run(args, capture_output=True, text=True, env=env, timeout=300)
    if check and out.returncode != 0:
        raise AssertionError(f"{args} exited {out.returncode}\nstdout:\n{out.stdout}\nstderr:\n{out.stderr[-3000:]}")
    return out


def _env(orch_home):
    return {**os.environ, "PYTHONWARNINGS": "ignore"}


def test_cli_submit_status_and_dlq(orch_home, with_model, tmp_path):
    env = _env(orch_home)
    orch = str(BIN / "orch")
    out = json.loads(_run([orch, "submit", "--flow", "support", str(SAMPLES_DIR / "inbox_table.jsonl"),
                          str(MALFORMED / "empty.json")],
                          env).stdout)
    assert out == {"files_added": 1, "files_already_there": 0, "table_rows_added": 100,
                   "table_rows_already_there": 0}
    again = json.loads(_run([orch, "submit", "--flow", "support", str(SAMPLES_DIR / "inbox_table.jsonl")], env).stdout)
    assert again["table_rows_added"] == 0 and again["table_rows_already_there"] == 100
    bad = _run([orch, "submit", "--flow", "support", str(SAMPLES_DIR / "README.md")], env, check=False)
    assert bad.returncode != 0 and "expected .eml, .json, .jsonl" in bad.stderr

    st = json.loads(_run([orch, "status", "--json"], env).stdout)
    assert st["received"] == 0 and st["lost"] == 0  # submitted, not yet ingested

    # ingest one day through Dagster, then ask again
    from orch_project.definitions import defs
    import dagster as dg

    with dg.instance_for_test() as inst:
        for day in ("2026-11-20", _today()):
            r = defs.resolve_job_def("support_flow_job").execute_in_process(instance=inst, partition_key=day,
                                                                            raise_on_error=False)
            assert r.success
    st = json.loads(_run([orch, "status", "--json", "--flow", "support"], env).stdout)
    assert st["received"] == 51 and st["lost"] == 0
    assert sum(st["states"].values()) == st["received"]
    assert st["states"]["dead_lettered"] == 1

    dl = json.loads(_run([orch, "dlq", "list", "--json"], env).stdout)
    assert [(d["source_key"], d["error_type"], d["reason"]) for d in dl] == [
        ("file:empty.json", "empty", "empty file (0 bytes)")]
    assert dl[0]["trace_id"]

    item = _first_item(orch_home)
    trail = json.loads(_run([orch, "audit", item], env).stdout)
    assert trail and trail[0]["action"] in ("auto_approved", "approval_requested")
    missing = _run([orch, "audit", "no-such-item"], env, check=False)
    assert missing.returncode != 0 and "no item 'no-such-item' in any flow" in missing.stderr


def _today() -> str:
    from datetime import datetime, timezone

    return datetime.now(timezone.utc).date().isoformat()


def _first_item(orch_home) -> str:
    from orch_project.lib.store import Database, items

    with Database(orch_home.database_url).begin() as conn:
        return conn.execute(sa.select(items.c.item_id).limit(1)).scalar_one()


def test_backfill_over_sample_days_with_the_dagster_cli(orch_home, db, with_model):
    from orch_project.lib.intake import submit_to_table
    from .conftest import sample_messages

    submit_to_table(db, "support", sample_messages(), "test")
    env = _env(orch_home)
    out = _run([str(BIN / "dagster"), "asset", "materialize", "-m", "orch_project.definitions",
                "--select", "group:support", "--partition-range", "2026-11-19...2026-11-20"], env)
    assert "RUN_SUCCESS" in out.stderr + out.stdout
    from orch_project.lib.pipeline import status_counts

    st = status_counts(db, "support")
    assert st["received"] == 100 and st["lost"] == 0 and st["in_progress"] == 0
    assert st["states"]["resolved"] + st["states"]["awaiting_approval"] == 100
