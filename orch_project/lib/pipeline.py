"""Flow-agnostic stage mechanics: load a partition's items at a status, apply a stage's
decisions in ONE transaction (item state, stage timings, dead letters, outbox effects,
approvals, audit), and report counts. Because each stage commits atomically and selects work by
status, a run that dies half-way is re-executed from failure without losing or repeating work.
"""

from __future__ import annotations

import logging
from collections import Counter, defaultdict
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import sqlalchemy as sa

from .connectors.embedded import Effect
from .flows import DEFERRED, RESUMED_STAGE, TERMINAL_STATUSES, FlowSpec, Stage
from .outbox import enqueue
from .store import Database, approvals, as_utc, chunked, dlq, item_stages, items, utcnow
from .telemetry import log_event

__all__ = ["TERMINAL_STATUSES", "DEFER_ERRORS", "StageEnv", "ItemUpdate", "StageReport", "StageSpecError",
           "load_items", "load_stage_items", "commit_stage", "dead_letter", "model_step_failed", "without_deferred"]

ITEM_COLUMNS = (items.c.item_id, items.c.trace_id, items.c.day, items.c.channel, items.c.status, items.c.stage,
                items.c.received_at, items.c.ingested_at, items.c.due_at, items.c.data)


@dataclass
class StageEnv:
    """Where a stage runs: which flow and partition days, in which run and attempt."""

    db: Database
    flow: str
    days: list[str]
    run_id: str | None = None
    attempt: int = 1
    logger: logging.Logger = field(default_factory=lambda: logging.getLogger("orch"))
    spec: FlowSpec | None = None  # default: the registered flow; commit_stage holds each stage to it

    def __post_init__(self) -> None:
        if self.spec is None:
            from .flows import find

            self.spec = find(self.flow)

    def across_partitions(self) -> "StageEnv":
        """The same run's view of every partition (what a stage reads beyond its own days, e.g. earlier items)."""
        return StageEnv(self.db, self.flow, [], run_id=self.run_id, attempt=self.attempt, logger=self.logger,
                        spec=self.spec)

    def stage(self, name: str) -> Stage | None:
        if self.spec is None:
            return None
        try:
            return self.spec.stage(name)
        except KeyError:
            return None


class StageSpecError(RuntimeError):
    """A stage decided something its spec does not allow (code and flow spec disagree)."""


@dataclass
class ItemUpdate:
    item_id: str
    status: str
    data: dict[str, Any]
    outcome: str = "ok"  # ok | routed | dead_lettered | waiting | deferred (stage left unchanged)
    columns: dict[str, Any] = field(default_factory=dict)  # due_at, resolved_at, escalated_at, ...
    dead_letter: tuple[str, str] | None = None  # (error_type, reason)


@dataclass
class StageReport:
    stage: str
    n_in: int
    outcomes: Counter
    duration_ms: float
    metadata: dict[str, Any] = field(default_factory=dict)

    @property
    def dead_lettered(self) -> int:
        return self.outcomes.get("dead_lettered", 0)

    def as_metadata(self) -> dict[str, Any]:
        md = {"items_in": self.n_in, "stage_ms": round(self.duration_ms, 1),
              "items_per_s": round(self.n_in / (self.duration_ms / 1000.0), 1) if self.duration_ms > 0 else 0.0}
        for k in ("ok", "routed", "dead_lettered", "waiting", "deferred"):
            md[f"items_{k}"] = int(self.outcomes.get(k, 0))
        md.update(self.metadata)
        return md


# Gateway errors that say "not now" rather than "bad item": the item waits for the next run.
DEFER_ERRORS = frozenset({"quota_exceeded", "circuit_open"})


def dead_letter(row: dict[str, Any], error: str, reason: str) -> ItemUpdate:
    """The update that dead-letters ``row`` with an error type and a reason."""
    return ItemUpdate(row["item_id"], "dead_lettered", row["data"], "dead_lettered", dead_letter=(error, reason))


def model_step_failed(row: dict[str, Any], stage: str, resp, label: str | None = None) -> ItemUpdate:
    """A failed model step: deferred to the next run when the provider said "not now" (budget, open
    circuit), dead-lettered with the gateway's reason (``"<label> failed: ..."``, label default: the stage)
    otherwise."""
    error = resp.error or "provider_error"
    if error in DEFER_ERRORS:
        note = {"stage": stage, "error": error, "reason": resp.reason, "at": utcnow().isoformat()}
        return ItemUpdate(row["item_id"], "deferred", {**row["data"], "deferred": note}, "deferred")
    return dead_letter(row, error, f"{label or stage} failed: {resp.reason}")


def without_deferred(data: dict[str, Any]) -> dict[str, Any]:
    """An item's data without the note a deferral left (the step has now answered)."""
    return {k: v for k, v in data.items() if k != "deferred"}


def load_items(env: StageEnv, status: str | Sequence[str], *, stage: str | None = None,
               deferred_after: str | Sequence[str] | None = None) -> list[dict[str, Any]]:
    """Items of the partition days at ``status``; with ``deferred_after``, also the items a stage
    deferred (status ``deferred``) whose last completed stage is that one (or one of those)."""
    statuses = [status] if isinstance(status, str) else list(status)
    cond = items.c.status.in_(statuses)
    if stage is not None:
        cond = sa.and_(cond, items.c.stage == stage)
    if deferred_after is not None:
        after = [deferred_after] if isinstance(deferred_after, str) else list(deferred_after)
        cond = sa.or_(cond, sa.and_(items.c.status == "deferred", items.c.stage.in_(after)))
    q = sa.select(*ITEM_COLUMNS).where(items.c.flow == env.flow, cond)  # item ids are unique per flow
    if env.days:
        q = q.where(items.c.day.in_(env.days))
    with env.db.begin() as conn:
        rows = [dict(r) for r in conn.execute(q.order_by(items.c.received_at, items.c.item_id)).mappings()]
    for r in rows:
        for col in ("received_at", "ingested_at", "due_at"):
            r[col] = as_utc(r[col])
    return rows


def load_stage_items(env: StageEnv, name: str, *, after: str | None = None) -> list[dict[str, Any]]:
    """The items stage ``name`` of the flow's spec works on: at its ``loads`` status(es), only those
    after ``after`` (default: the stage's own ``after``), plus -- for a model stage -- the items it
    deferred earlier (a deferred item stays after the stage it last completed: the one before, the
    stage's ``after``, or a person's decision when the stage before is an approval gate)."""
    spec = env.spec
    if spec is None:
        raise StageSpecError(f"stage {name!r} needs the flow spec on its StageEnv")
    st = spec.stage(name)
    deferred = None
    if st.kind == "model":
        chain = spec.stage_names
        previous = chain[chain.index(name) - 1]
        deferred = [previous, *([st.after] if st.after else []), *([after] if after else [])]
        if previous != "intake" and spec.stage(previous).branches:
            deferred.append(RESUMED_STAGE)
    return load_items(env, st.load_statuses, stage=after or st.after, deferred_after=deferred)


def commit_stage(
    env: StageEnv,
    stage: str,
    started_at: datetime,
    updates: Sequence[ItemUpdate],
    *,
    trace_ids: dict[str, str],
    effects: Sequence[Effect] = (),
    approval_rows: Sequence[dict[str, Any]] = (),
    audit_rows: Sequence[dict[str, Any]] = (),
    metadata: dict[str, Any] | None = None,
    n_in: int | None = None,
    set_stage: bool = True,
) -> StageReport:
    finished = utcnow()
    duration_ms = (finished - started_at).total_seconds() * 1000.0
    outcomes = Counter(u.outcome for u in updates)
    spec_stage = env.stage(stage)
    if spec_stage is not None:
        bad = sorted({u.status for u in updates} - spec_stage.allowed_statuses)
        if bad:
            raise StageSpecError(f"flow {env.flow!r} stage {stage!r} set status {bad} outside its spec "
                                 f"{sorted(spec_stage.allowed_statuses)}; fix the stage or the flow spec")
    db = env.db
    with db.begin() as conn:
        groups: dict[tuple[str, ...], list[dict[str, Any]]] = defaultdict(list)
        for u in updates:
            moves = set_stage and u.outcome != DEFERRED  # a deferred item stays after its last completed stage
            groups[(moves, *sorted(u.columns))].append(
                {"k_item": u.item_id, "status": u.status, "data": u.data, **u.columns})
        for (moves, *cols), rows in groups.items():
            values = {"status": sa.bindparam("status"), "data": sa.bindparam("data", type_=items.c.data.type),
                      "updated_at": finished}
            if moves:
                values["stage"] = stage
            values.update({c: sa.bindparam(c) for c in cols})
            stmt = items.update().where(items.c.flow == env.flow,
                                        items.c.item_id == sa.bindparam("k_item")).values(**values)
            for chunk in chunked(rows, 5000):
                conn.execute(stmt, list(chunk))
        timing = [{"item_id": u.item_id, "flow": env.flow, "stage": stage, "run_id": env.run_id,
                   "started_at": started_at, "finished_at": finished, "duration_ms": duration_ms,
                   "attempt": env.attempt, "outcome": u.outcome} for u in updates]
        if timing:
            conn.execute(item_stages.insert(), timing)
        dead = [{"flow": env.flow, "item_id": u.item_id, "source_key": u.data.get("source_key"), "stage": stage,
                 "error_type": u.dead_letter[0], "reason": u.dead_letter[1], "trace_id": trace_ids.get(u.item_id),
                 "replay": {"item_id": u.item_id, "stage": stage, "source_key": u.data.get("source_key")},
                 "status": "open", "run_id": env.run_id, "created_at": finished}
                for u in updates if u.dead_letter]
        if dead:
            conn.execute(dlq.insert(), dead)
        if effects:
            enqueue(db, conn, env.flow, effects)
        if approval_rows:
            db.insert_ignore(conn, approvals, list(approval_rows), ["flow", "item_id"])
        if audit_rows:
            db.audit(conn, audit_rows)
    report = StageReport(stage, len(updates) if n_in is None else n_in, outcomes, duration_ms, metadata or {})
    log_event(env.logger, "stage_done", flow=env.flow, stage=stage, run_id=env.run_id, days=env.days,
              items=report.n_in, outcomes=dict(outcomes), ms=round(duration_ms, 1))
    return report


def status_counts(db: Database, flow: str) -> dict[str, Any]:
    """Every source entry of ``flow`` received, and where each one is now. received == sum(states)."""
    from .flows import find
    from .store import intake

    spec = find(flow)
    with db.begin() as conn:
        received = conn.execute(sa.select(sa.func.count()).select_from(intake).where(intake.c.flow == flow)
                                ).scalar_one()
        by_status = dict(conn.execute(sa.select(items.c.status, sa.func.count()).where(items.c.flow == flow)
                                      .group_by(items.c.status)).all())
        by_outcome = dict(conn.execute(sa.select(intake.c.outcome, sa.func.count()).where(
            intake.c.flow == flow, intake.c.outcome != "accepted").group_by(intake.c.outcome)).all())
        escalated = conn.execute(sa.select(sa.func.count()).select_from(items).where(
            items.c.flow == flow, items.c.escalated_at.is_not(None))).scalar_one()
        dlq_open = conn.execute(sa.select(sa.func.count()).select_from(dlq).where(
            dlq.c.flow == flow, dlq.c.status == "open")).scalar_one()
    states: dict[str, int] = {k: int(v) for k, v in by_status.items()}
    states["dead_lettered"] = states.get("dead_lettered", 0) + int(by_outcome.get("dead_lettered", 0))
    states["duplicate"] = int(by_outcome.get("duplicate", 0))
    total = sum(states.values())
    in_progress = spec.in_progress_statuses if spec is not None else ()
    return {"flow": flow, "received": int(received), "states": dict(sorted(states.items())),
            "accounted": total, "lost": int(received) - total, "escalated": int(escalated), "dlq_open": int(dlq_open),
            "in_progress": sum(states.get(s, 0) for s in in_progress),
            "terminal": sum(states.get(s, 0) for s in TERMINAL_STATUSES)}


def audit_for(db: Database, flow: str, item_id: str) -> list[dict[str, Any]]:
    """The audit trail of one item of ``flow``, oldest first."""
    from .store import audit

    with db.begin() as conn:
        return [dict(r) for r in conn.execute(sa.select(audit).where(audit.c.flow == flow, audit.c.item_id == item_id)
                                              .order_by(audit.c.id)).mappings()]
