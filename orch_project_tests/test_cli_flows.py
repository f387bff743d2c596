"""The CLI over flows: `orch flows` lists every flow with its counts, `orch status --json` gives each flow's
counts and the total with received == sum of states per flow, and --flow scopes the commands."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from orch_project.defs.support.sample_data import SAMPLES_DIR

BIN = Path(sys.executable).parent


def _orch(*args, check=True):
    out = subprocess.run([str(BIN / "orch"), *args], capture_output=True, text=True, timeout=300,
                         env={**os.environ, "PYTHONWARNINGS": "ignore"})
    if check and out.returncode != 0:
        raise AssertionError(f"orch {args} exited {out.returncode}\n{out.stdout}\n{out.stderr[-2000:]}")
    return out


def test_flows_status_and_flow_option(orch_home, with_model, defs, instance):
    from .conftest import run_flow

    sub = json.loads(_orch("submit", "--flow", "support", str(SAMPLES_DIR / "inbox_table.jsonl")).stdout)
    assert sub["table_rows_added"] == 100
    day = "2026-11-20"
    assert run_flow(defs, instance, day).success
    flows = json.loads(_orch("flows", "--json").stdout)
    support = next(f for f in flows if f["flow"] == "support")
    assert support["stages"][:2] == ["intake", "triage"] and support["lost"] == 0
    assert support["received"] > 0 and support["inbox"].endswith(os.path.join("inbox", "support"))
    total = json.loads(_orch("status", "--json").stdout)
    assert set(total["flows"]) == {f["flow"] for f in flows}
    for name, st in total["flows"].items():
        assert st["received"] == sum(st["states"].values()), name  # received == sum of states, per flow
    assert total["received"] == sum(st["received"] for st in total["flows"].values())
    one = json.loads(_orch("status", "--json", "--flow", "support").stdout)
    assert one == total["flows"]["support"]
    unknown = _orch("status", "--flow", "nope", check=False)
    assert unknown.returncode == 2 and "no flow 'nope'" in unknown.stderr and "support" in unknown.stderr
    audit = _orch("audit", "no-such-item", "--flow", "support", check=False)
    assert audit.returncode == 1 and "in flow 'support'" in audit.stderr
