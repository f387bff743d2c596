"""Model registry in the app database: every trained version with its data hash, code version
and metrics; the serving path always uses the promoted one."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import sqlalchemy as sa

from ..store import Database, models, utcnow


def register(db: Database, *, task: str, version: str, path: Path, train_data_hash: str, code_version: str,
             metrics: dict[str, Any], promote: bool) -> str:
    now = utcnow()
    status = "promoted" if promote else "refused"
    with db.begin() as conn:
        exists = conn.execute(sa.select(models.c.status).where(models.c.version == version)).scalar()
        if promote:
            conn.execute(models.update().where(models.c.task == task, models.c.status == "promoted",
                                               models.c.version != version).values(status="retired"))
        values = dict(task=task, path=str(path), train_data_hash=train_data_hash, code_version=code_version,
                      metrics=metrics, status=status, promoted_at=now if promote else None)
        if exists is None:
            conn.execute(models.insert().values(version=version, created_at=now, **values))
        else:
            conn.execute(models.update().where(models.c.version == version).values(**values))
        db.audit(conn, [{"actor": "system:training", "action": f"model_{status}", "reason": f"{task} {version}",
                         "outputs": {"metrics": metrics}}])
    return status


def promoted_model_path(db: Database, task: str) -> tuple[Path | None, str]:
    with db.begin() as conn:
        row = conn.execute(sa.select(models.c.path, models.c.version).where(
            models.c.task == task, models.c.status == "promoted").order_by(models.c.promoted_at.desc())).first()
    if row is None or not Path(row.path).exists():
        return None, "none"
    return Path(row.path), row.version
