"""Raw-data retention: the only places raw personal data lives are the inbox (files and table rows
as submitted) and the vault (tokens a later step may resolve). Past the retention limit:

- processed inbox files are deleted, and processed inbox-table payloads are replaced by a tombstone
  (intake already does this as it ingests; this is the backstop) — the row stays, so a resubmission
  of the same message id is still recognised as a duplicate;
- vault tokens of items whose journey has ended (resolved, rejected, dead-lettered) are deleted;
  items still waiting (e.g. for an approval) keep theirs, because sending the reply needs them.

Unprocessed input is never purged. Every purge is audited with its counts.
"""

from __future__ import annotations

import json
import os
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from .flows import TERMINAL_STATUSES
from .intake import file_of
from .store import Database, chunked, inbox, intake, items, utcnow, vault

DEFAULT_RETENTION_DAYS = 30
_TOMBSTONE_PREFIX = '{"purged_at"'


def tombstone_inbox_rows(conn, source_keys: list[str], now: datetime, reason: str) -> int:
    """Replace the raw payload of the inbox-table rows behind ``source_keys`` (``table:<id>``) by a
    tombstone; rows already tombstoned are left alone. Returns how many rows changed."""
    ids = [int(k.split(":", 1)[1]) for k in source_keys if k.startswith("table:")]
    tombstone = json.dumps({"purged_at": now.isoformat(), "reason": reason})  # starts with _TOMBSTONE_PREFIX
    changed = 0
    for chunk in chunked(ids, 900):
        res = conn.execute(inbox.update().where(inbox.c.id.in_(chunk), ~inbox.c.payload.like(_TOMBSTONE_PREFIX + "%"))
                           .values(payload=tombstone))
        changed += res.rowcount
    return changed


def retention_days_from_env() -> int:
    raw = os.environ.get("ORCH_RAW_RETENTION_DAYS", "").strip()
    if not raw:
        return DEFAULT_RETENTION_DAYS
    try:
        days = int(raw)
    except ValueError:
        raise ValueError(f"ORCH_RAW_RETENTION_DAYS={raw!r} is not a whole number of days") from None
    if days < 0:
        raise ValueError("ORCH_RAW_RETENTION_DAYS must be 0 or more")
    return days


def purge(db: Database, flow: str, inbox_dir: Path | None, *, retention_days: int,
          now: datetime | None = None, actor: str = "system:retention") -> dict[str, Any]:
    now = now or utcnow()
    cutoff = now - timedelta(days=retention_days)
    with db.begin() as conn:
        processed = conn.execute(sa.select(intake.c.source_key).where(
            intake.c.flow == flow, intake.c.ingested_at < cutoff)).scalars().all()
    # a file of many records has one key per record (file:<name>#row=<n>): purge the file once
    file_names = sorted({file_of(k).split(":", 1)[1] for k in processed if k.startswith("file:")})
    with db.begin() as conn:
        rows_purged = tombstone_inbox_rows(conn, processed, now, f"raw retention {retention_days} days")
        ended = sa.select(items.c.item_id).where(items.c.flow == flow, items.c.status.in_(TERMINAL_STATUSES),
                                                 items.c.updated_at < cutoff)
        # tokens of this flow's items (rows from before tokens carried their flow have it backfilled)
        tokens = conn.execute(vault.delete().where(vault.c.flow == flow, vault.c.item_id.in_(ended)))
        vault_purged = tokens.rowcount
    files_purged = 0
    if inbox_dir is not None:
        for name in file_names:
            path = Path(inbox_dir) / name
            if path.is_file():
                path.unlink()
                files_purged += 1
    counts = {"retention_days": retention_days, "cutoff": cutoff.isoformat(), "inbox_rows_purged": rows_purged,
              "inbox_files_purged": files_purged, "vault_tokens_purged": vault_purged}
    with db.begin() as conn:
        db.audit(conn, [{"actor": actor, "action": "raw_data_purged", "flow": flow,
                         "reason": f"older than {retention_days} days", "outputs": counts}])
    return counts
