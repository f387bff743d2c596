"""Chaos drill (b), small: the support flow's run worker is SIGKILLed mid-batch (while the actions stage
delivers its outbox effects), the killed run is re-executed from failure (ReexecutionOptions.from_failure on
a persistent Dagster instance), and nothing is lost or sent twice. benchmarks/drill_sigkill.py runs it at
2,000 items."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_sigkill_mid_batch_then_reexecute_from_failure(trained_model, tmp_path):
    model = tmp_path / "model.json"
    model.write_text(json.dumps({k: trained_model[k] for k in ("path", "version", "metrics")}, default=str))
    out = subprocess.run([sys.executable, str(REPO / "benchmarks" / "drill_sigkill.py"), "--items", "200",
                          "--kill-at", "mid", "--model-json", str(model), "--no-rerun"],
                         cwd=REPO, capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    lines = out.stdout.strip().splitlines()
    assert lines, f"drill printed nothing (exit {out.returncode})\n{out.stderr[-3000:]}"
    res = json.loads(lines[-1])
    assert res["drill"] == "sigkill" and res["items"] == 200
    # the kill really happened mid-run: a flow step was running, items were past triage and not finished
    assert res["killed_at_stage"] in {"support_triage", "support_assignment", "support_knowledge", "support_drafts",
                                      "support_approval_gate", "support_actions", "support_surveys"}, res
    assert res["killed_run"]["status_after_kill"] == "STARTED"
    assert res["after_kill"]["lost"] == 0
    # re-executed from failure: the succeeded steps were skipped, the run completed
    assert res["reexecution"]["status"] == "SUCCESS", out.stderr[-3000:]
    assert "support_inbound" not in res["reexecution"]["steps"]
    assert res["killed_run"]["status_after_reexecution"] == "FAILURE"
    assert res["lost"] == 0 and res["duplicate_effects"] == 0, res
    assert res["resolved"] + res["dead_lettered"] == 200 and res["approved"] == 0
    assert out.returncode == 0 and res["meets_target"]
