"""Structured logs: ids, counts and timings only, and only into the current home's log file."""

from __future__ import annotations

import json

from orch_project.lib.telemetry import get_logger, log_event


def test_logger_writes_only_to_the_current_home(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    log_event(get_logger(a), "first", n=1)
    log_event(get_logger(b), "second", n=2)
    lines_a = (a / "orch.jsonl").read_text().splitlines()
    lines_b = (b / "orch.jsonl").read_text().splitlines()
    assert [json.loads(x)["event"] for x in lines_a] == ["first"]
    assert [(json.loads(x)["event"], json.loads(x)["n"]) for x in lines_b] == [("second", 2)]
