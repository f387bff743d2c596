"""The model registry is keyed by task: `orch model` lists, promotes and rolls back the versions of any task
without touching another task's served model."""

from __future__ import annotations

import json

from click.testing import CliRunner


def test_orch_model_works_per_task(orch_home, db, tmp_path):
    from orch_project.cli import main
    from orch_project.lib.llm import registry

    for task, versions in (("lead_score", ("lead_score-a", "lead_score-b")), ("triage", ("tri-1",))):
        for v in versions:
            path = tmp_path / f"{v}.joblib"
            path.write_bytes(b"model")
            registry.register(db, task=task, version=v, path=path, train_data_hash="h", code_version="c",
                              metrics={"auc": 0.9})
    registry.promote(db, "tri-1", actor="test")
    runner = CliRunner()
    assert runner.invoke(main, ["model", "promote", "lead_score-a", "--as", "test"]).exit_code == 0
    assert runner.invoke(main, ["model", "promote", "lead_score-b", "--as", "test"]).exit_code == 0
    listed = json.loads(runner.invoke(main, ["model", "list", "--task", "lead_score", "--json"]).output)
    assert {r["version"]: r["status"] for r in listed} == {"lead_score-b": "promoted", "lead_score-a": "retired"}
    out = runner.invoke(main, ["model", "rollback", "--task", "lead_score", "--as", "test", "--reason", "worse"])
    assert out.exit_code == 0, out.output
    assert registry.promoted_model_path(db, "lead_score")[1] == "lead_score-a"
    assert registry.promoted_model_path(db, "triage")[1] == "tri-1"  # the other task's model still serves
    human = runner.invoke(main, ["model", "list", "--task", "lead_score"]).output
    assert "lead_score-a" in human and "promoted" in human
