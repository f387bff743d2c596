"""Reading inbound messages from their sources: an inbox directory (.eml / .json) and the
inbox table. Parsing never raises: a source that cannot be read becomes a ``Parsed`` with an
error reason, so it can go to the dead-letter queue while the rest of the batch proceeds.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date, datetime, timezone
from email import policy
from email.parser import BytesParser
from email.utils import parseaddr, parsedate_to_datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from .store import Database, as_utc, inbox, intake

MAX_FILE_BYTES = 5 * 1024 * 1024
INBOX_SUFFIXES = (".eml", ".json")


@dataclass
class Parsed:
    source_key: str
    arrival_at: datetime
    raw: dict[str, Any] | None = None
    error: str | None = None
    error_type: str | None = None

    @property
    def received_at(self) -> datetime | None:
        if not self.raw:
            return None
        value = self.raw.get("received_at")
        if isinstance(value, datetime):
            return as_utc(value)
        if isinstance(value, str):
            try:
                return as_utc(datetime.fromisoformat(value.replace("Z", "+00:00")))
            except ValueError:
                return None
        return None

    def partition_day(self, first_day: date, today: date) -> str:
        """The day partition a source belongs to: its received_at day when that is a valid
        partition, otherwise the day it arrived (future-dated or pre-history messages)."""
        rec = self.received_at
        if rec is not None and first_day <= rec.date() <= today:
            return rec.date().isoformat()
        return self.arrival_at.date().isoformat()


def _file_time(stat: os.stat_result) -> datetime:
    return datetime.fromtimestamp(stat.st_mtime, tz=timezone.utc)


def list_inbox_files(inbox_dir: Path) -> list[tuple[int, str, Path]]:
    """(ctime_ns, name, path) for every candidate file, in arrival order. Writers drop files
    atomically (write a dotfile or .tmp, then rename), so those are skipped."""
    out = []
    if not inbox_dir.exists():
        return out
    with os.scandir(inbox_dir) as it:
        for entry in it:
            if not entry.is_file() or entry.name.startswith(".") or not entry.name.endswith(INBOX_SUFFIXES):
                continue
            st = entry.stat()
            out.append((max(st.st_ctime_ns, st.st_mtime_ns), entry.name, Path(entry.path)))
    out.sort()
    return out


def parse_file(path: Path) -> Parsed:
    key = f"file:{path.name}"
    try:
        st = path.stat()
    except OSError as exc:
        return Parsed(key, datetime.now(timezone.utc), error=f"cannot stat file: {exc.strerror}", error_type="unreadable")
    arrival = _file_time(st)
    if st.st_size == 0:
        return Parsed(key, arrival, error="empty file (0 bytes)", error_type="empty")
    if st.st_size > MAX_FILE_BYTES:
        return Parsed(
            key, arrival,
            error=f"file is {st.st_size / 1048576:.1f} MiB, above the {MAX_FILE_BYTES // 1048576} MiB intake limit",
            error_type="too_large",
        )
    data = path.read_bytes()
    if path.suffix == ".json":
        return _parse_json_bytes(key, arrival, data)
    return _parse_eml_bytes(key, arrival, data)


def _parse_json_bytes(key: str, arrival: datetime, data: bytes) -> Parsed:
    if b"\x00" in data:
        return Parsed(key, arrival, error="binary content (NUL bytes) in a .json message", error_type="binary")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Parsed(key, arrival, error=f"not valid UTF-8 (byte {exc.start})", error_type="encoding")
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as exc:
        return Parsed(key, arrival, error=f"not valid JSON: {exc.msg} at line {exc.lineno}", error_type="malformed")
    if not isinstance(obj, dict):
        return Parsed(key, arrival, error="JSON message must be an object", error_type="malformed")
    return Parsed(key, arrival, raw=obj)


def _parse_eml_bytes(key: str, arrival: datetime, data: bytes) -> Parsed:
    if b"\x00" in data:
        return Parsed(key, arrival, error="binary content (NUL bytes) in an .eml message", error_type="binary")
    try:
        msg = BytesParser(policy=policy.default).parsebytes(data)
    except Exception as exc:  # the email package raises a zoo of errors on garbage
        return Parsed(key, arrival, error=f"unparseable e-mail: {type(exc).__name__}", error_type="malformed")
    defects = [type(d).__name__ for d in msg.defects]
    name, addr = parseaddr(str(msg.get("From", "")))
    date_hdr = msg.get("Date")
    received = None
    if date_hdr:
        try:
            received = parsedate_to_datetime(str(date_hdr)).astimezone(timezone.utc).isoformat()
        except (TypeError, ValueError):
            received = None
    body_part = msg.get_body(preferencelist=("plain", "html")) if msg.is_multipart() else msg
    body = ""
    if body_part is not None:
        try:
            body = body_part.get_content()
        except (LookupError, UnicodeDecodeError, AssertionError, KeyError) as exc:
            return Parsed(key, arrival, error=f"unreadable e-mail body: {type(exc).__name__}", error_type="encoding")
        if not isinstance(body, str):
            body = ""
    attachments = []
    for part in msg.iter_attachments() if msg.is_multipart() else []:
        payload = part.get_payload(decode=True) or b""
        attachments.append({
            "filename": part.get_filename() or "attachment",
            "content_type": part.get_content_type(),
            "size_bytes": len(payload),
        })
    msg_id = str(msg.get("Message-ID", "")).strip().strip("<>")
    raw = {
        "id": msg_id or None,
        "channel": "email",
        "received_at": received,
        "sender": {"name": name or None, "email": addr or ""},
        "subject": str(msg.get("Subject", "")) or None,
        "body": body,
        "attachments": attachments,
    }
    if not msg.keys():
        return Parsed(key, arrival, error="no e-mail headers found", error_type="malformed")
    if defects and not addr:
        return Parsed(key, arrival, raw=raw, error=f"malformed e-mail headers ({', '.join(defects)})", error_type="malformed")
    return Parsed(key, arrival, raw=raw)


def parse_inbox_row(row_id: int, payload: str, submitted_at: datetime) -> Parsed:
    return _parse_json_bytes(f"table:{row_id}", as_utc(submitted_at), payload.encode("utf-8", "surrogatepass"))


def pending_sources(db: Database, flow: str, inbox_dir: Path | None) -> Iterator[Parsed]:
    """Every source entry not yet in the intake log, parsed, in arrival order."""
    with db.begin() as conn:
        seen = set(conn.execute(sa.select(intake.c.source_key).where(intake.c.flow == flow)).scalars())
        rows = conn.execute(
            sa.select(inbox.c.id, inbox.c.payload, inbox.c.submitted_at).where(inbox.c.flow == flow).order_by(inbox.c.id)
        ).all()
    if inbox_dir is not None:
        for _, name, path in list_inbox_files(inbox_dir):
            if f"file:{name}" not in seen:
                yield parse_file(path)
    for row_id, payload, submitted_at in rows:
        if f"table:{row_id}" not in seen:
            yield parse_inbox_row(row_id, payload, submitted_at)


def submit_to_table(db: Database, flow: str, messages: list[dict], submitted_by: str) -> int:
    """Put messages in the inbox table; a message whose id is already there is skipped."""
    from .store import utcnow

    now = utcnow()
    rows = [
        {"flow": flow, "external_id": str(m.get("id")) if m.get("id") else None,
         "payload": json.dumps(m, ensure_ascii=False), "submitted_at": now, "submitted_by": submitted_by}
        for m in messages
    ]
    with db.begin() as conn:
        before = conn.execute(sa.select(sa.func.count()).select_from(inbox).where(inbox.c.flow == flow)).scalar_one()
        db.insert_ignore(conn, inbox, rows, ["flow", "external_id"])
        after = conn.execute(sa.select(sa.func.count()).select_from(inbox).where(inbox.c.flow == flow)).scalar_one()
    return after - before


def drop_file(inbox_dir: Path, name: str, data: bytes) -> bool:
    """Atomically place a file in the inbox (write a dotfile, then rename). False if it exists."""
    inbox_dir.mkdir(parents=True, exist_ok=True)
    target = inbox_dir / name
    if target.exists():
        return False
    tmp = inbox_dir / f".{name}.tmp"
    tmp.write_bytes(data)
    os.replace(tmp, target)
    return True
