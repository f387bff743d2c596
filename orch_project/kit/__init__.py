"""The flow kit: every Dagster object of a flow, built from its ``FlowSpec`` (``lib/flows.py``).

``build_flow(spec)`` returns the flow's ``dg.Definitions``: one asset per stage (``<flow>_<stage>``,
deps from the stage order, retry policy and pool from the stage kind, code versions from the
stage's prompts), the ops assets (the flow's own plus SLA escalation, DLQ backlog, KPI report and
raw-data retention), blocking checks (nothing lost at intake, no unmasked PII, the flow's Great
Expectations suites, no duplicate effects), the intake sensor and the run-status ops sensor, the
flow, ops, approval-resume, approval-decision, DLQ-replay and retention jobs, their schedules, and
the approval escalation and alert sensors. Every name carries the flow, so any number of flows
live in one code location.

A flow folder's ``flow.py`` ends with ``defs = build_flow(SPEC)``; Dagster's defs-folder loader
picks that up.
"""

from .build import build_flow, stage_asset_key
from .checks import GXCheck, items_frame

__all__ = ["build_flow", "stage_asset_key", "GXCheck", "items_frame"]
