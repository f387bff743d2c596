"""Data-quality gates with Great Expectations (GX Core 1.x, an ephemeral context: nothing written
to disk). A stage's batch output becomes a pandas DataFrame; an expectation suite validates it;
the Dagster asset checks in the flow report each expectation's result and fail (ERROR, blocking)
when any expectation fails, so downstream assets of the run do not run.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any

_LOCK = threading.Lock()
_CONTEXT = None

# Raw PII patterns that must never appear in outbound text (masking leaves <ENTITY_TYPE> tags)
EMAIL_RX = r"[A-Za-z0-9._%+'-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}"
CARD_RX = r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])"
SSN_RX = r"\b\d{3}-\d{2}-\d{4}\b"
IBAN_RX = r"\b[A-Z]{2}\d{2}(?: ?[A-Z0-9]{4}){3,7}(?: ?[A-Z0-9]{1,4})?\b"


@dataclass
class QualityResult:
    success: bool
    rows: int
    expectations: list[dict[str, Any]]

    @property
    def failed(self) -> list[dict[str, Any]]:
        return [e for e in self.expectations if not e["success"]]

    def markdown(self) -> str:
        lines = ["| expectation | column | unexpected | result |", "|---|---|---|---|"]
        for e in self.expectations:
            lines.append(f"| {e['expectation']} | {e['column']} | {e['unexpected']} | "
                         f"{'pass' if e['success'] else '**FAIL**'} |")
        return "\n".join(lines)


def _context():
    global _CONTEXT
    import great_expectations as gx

    with _LOCK:
        if _CONTEXT is None:
            from great_expectations.data_context.types.base import ProgressBarsConfig

            _CONTEXT = gx.get_context(mode="ephemeral")
            _CONTEXT.variables.progress_bars = ProgressBarsConfig(globally=False)  # no bars in run logs
        return _CONTEXT


def validate(name: str, frame, expectations: list) -> QualityResult:
    """Validate ``frame`` against ``expectations`` (gx.expectations.* objects)."""
    import great_expectations as gx

    if frame is None or len(frame) == 0:
        return QualityResult(True, 0, [])
    ctx = _context()
    with _LOCK:  # the ephemeral context's registries are not thread-safe
        source = ctx.data_sources.add_or_update_pandas(f"orch_{name}")
        try:
            asset = source.get_asset(name)
        except LookupError:
            asset = source.add_dataframe_asset(name)
        try:
            batch_def = asset.get_batch_definition("whole")
        except KeyError:
            batch_def = asset.add_batch_definition_whole_dataframe("whole")
        batch = batch_def.get_batch(batch_parameters={"dataframe": frame})
        suite = gx.ExpectationSuite(name=f"{name}_suite", expectations=expectations)
        result = batch.validate(suite)
    out = []
    for r in result.results:
        cfg = r.expectation_config
        res = r.result or {}
        out.append({"expectation": cfg.type, "column": cfg.kwargs.get("column", ""),
                    "unexpected": int(res.get("unexpected_count", 0) or 0), "success": bool(r.success),
                    "examples": [str(x)[:60] for x in (res.get("partial_unexpected_list") or [])[:3]]})
    return QualityResult(bool(result.success), len(frame), out)


def outbound_expectations(column: str) -> list:
    """No raw e-mail address, card-like number, SSN or IBAN in the outbound text column."""
    import great_expectations.expectations as gxe

    return [gxe.ExpectColumnValuesToNotMatchRegex(column=column, regex=rx) for rx in (EMAIL_RX, CARD_RX, SSN_RX, IBAN_RX)]
