"""Model registry in the app database: every trained version with its training-data hash, code
version, metrics and dates; evaluation records per model and prompt version. The serving path
always uses the promoted version; every promotion, refusal and rollback is audited.

Statuses: candidate (trained, not yet through the gate) -> promoted | refused; a promoted version
becomes retired when another is promoted, rolled_back when a rollback replaces it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ..store import Database, evaluations, models, utcnow


@dataclass
class Candidate:
    """A trained model as a governed model's ``train`` hands it to the registry."""

    version: str
    path: Path
    metrics: dict[str, Any]
    train_data_hash: str
    code_version: str


class RegistryError(Exception):
    """A registry operation that cannot be done, with what to do instead."""


def register(db: Database, *, task: str, version: str, path: Path, train_data_hash: str, code_version: str,
             metrics: dict[str, Any], status: str = "candidate", actor: str = "system:training") -> str:
    """Record a trained version (idempotent per version: a retrain of the same data and code updates it)."""
    now = utcnow()
    with db.begin() as conn:
        exists = conn.execute(sa.select(models.c.status).where(models.c.version == version)).scalar()
        values = dict(task=task, path=str(path), train_data_hash=train_data_hash, code_version=code_version,
                      metrics=metrics)
        if exists is None:
            conn.execute(models.insert().values(version=version, created_at=now, status=status, **values))
        else:
            conn.execute(models.update().where(models.c.version == version).values(**values))
        db.audit(conn, [{"actor": actor, "action": "model_registered", "reason": f"{task} {version} ({status})",
                         "outputs": {"metrics": metrics}}])
    return status if exists is None else exists


def set_status(db: Database, version: str, status: str, *, actor: str, reason: str) -> None:
    with db.begin() as conn:
        row = conn.execute(sa.select(models.c.task).where(models.c.version == version)).first()
        if row is None:
            raise RegistryError(f"no model version {version!r}; see `orch model list`")
        conn.execute(models.update().where(models.c.version == version).values(status=status))
        db.audit(conn, [{"actor": actor, "action": f"model_{status}", "reason": f"{row.task} {version}: {reason}"}])


def promote(db: Database, version: str, *, actor: str, reason: str = "") -> dict[str, Any]:
    """Make ``version`` the one serving its task; the previous one becomes retired."""
    now = utcnow()
    with db.begin() as conn:
        row = conn.execute(sa.select(models).where(models.c.version == version)).mappings().first()
        if row is None:
            raise RegistryError(f"no model version {version!r}; see `orch model list`")
        if not Path(row["path"]).exists():
            raise RegistryError(f"model file {row['path']} of {version} is missing; retrain or restore it first")
        previous = conn.execute(sa.select(models.c.version).where(
            models.c.task == row["task"], models.c.status == "promoted")).scalar()
        if previous == version:
            return {"task": row["task"], "promoted": version, "previous": previous, "changed": False}
        conn.execute(models.update().where(models.c.task == row["task"], models.c.status == "promoted")
                     .values(status="retired"))
        conn.execute(models.update().where(models.c.version == version).values(status="promoted", promoted_at=now))
        db.audit(conn, [{"actor": actor, "action": "model_promoted", "reason": reason or "promoted",
                         "inputs": {"task": row["task"], "previous": previous},
                         "outputs": {"version": version, "metrics": row["metrics"]}}])
    return {"task": row["task"], "promoted": version, "previous": previous, "changed": True}


def rollback(db: Database, task: str = "triage", *, actor: str, reason: str = "") -> dict[str, Any]:
    """Put the previously promoted version back; the current one becomes rolled_back."""
    now = utcnow()
    with db.begin() as conn:
        current = conn.execute(sa.select(models.c.version).where(
            models.c.task == task, models.c.status == "promoted")).scalar()
        if current is None:
            raise RegistryError(f"no promoted {task} model to roll back")
        prev = conn.execute(sa.select(models.c.version, models.c.path).where(
            models.c.task == task, models.c.status == "retired", models.c.promoted_at.is_not(None))
            .order_by(models.c.promoted_at.desc())).first()
        if prev is None:
            raise RegistryError(f"{task} model {current} has no earlier promoted version to roll back to")
        if not Path(prev.path).exists():
            raise RegistryError(f"model file {prev.path} of {prev.version} is missing; cannot roll back to it")
        conn.execute(models.update().where(models.c.version == current).values(status="rolled_back"))
        conn.execute(models.update().where(models.c.version == prev.version).values(status="promoted",
                                                                                    promoted_at=now))
        db.audit(conn, [{"actor": actor, "action": "model_rolled_back", "reason": reason or "rollback",
                         "inputs": {"task": task, "from": current}, "outputs": {"version": prev.version}}])
    return {"task": task, "promoted": prev.version, "previous": current, "changed": True}


def list_versions(db: Database, task: str | None = None) -> list[dict[str, Any]]:
    q = sa.select(models).order_by(models.c.created_at.desc())
    if task:
        q = q.where(models.c.task == task)
    with db.begin() as conn:
        return [dict(r) for r in conn.execute(q).mappings()]


def get(db: Database, version: str) -> dict[str, Any] | None:
    with db.begin() as conn:
        row = conn.execute(sa.select(models).where(models.c.version == version)).mappings().first()
    return dict(row) if row else None


def promoted_model_path(db: Database, task: str) -> tuple[Path | None, str]:
    with db.begin() as conn:
        row = conn.execute(sa.select(models.c.path, models.c.version).where(
            models.c.task == task, models.c.status == "promoted").order_by(models.c.promoted_at.desc())).first()
    if row is None or not Path(row.path).exists():
        return None, "none"
    return Path(row.path), row.version


def record_evaluation(db: Database, *, task: str, model_version: str, prompt_version: str, dataset: str,
                      metrics: dict[str, Any]) -> None:
    with db.begin() as conn:
        conn.execute(evaluations.insert().values(task=task, model_version=model_version,
                                                 prompt_version=prompt_version, dataset=dataset, metrics=metrics,
                                                 created_at=utcnow()))


def evaluations_for(db: Database, model_version: str) -> list[dict[str, Any]]:
    with db.begin() as conn:
        return [dict(r) for r in conn.execute(sa.select(evaluations).where(
            evaluations.c.model_version == model_version).order_by(evaluations.c.id)).mappings()]
