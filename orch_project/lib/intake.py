"""Reading inbound messages from their sources: an inbox directory (.eml / .json) and the
inbox table. Parsing never raises: a source that cannot be read becomes a ``Parsed`` with an
error reason, so it can go to the dead-letter queue while the rest of the batch proceeds.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import date, datetime, timezone
from email import policy
from email.parser import BytesParser
from email.utils import parseaddr, parsedate_to_datetime
from pathlib import Path
from typing import Any

import sqlalchemy as sa

from .store import Database, as_utc, chunked, dlq, inbox, intake, item_stages, items, utcnow, vault

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
        # a record's own time: when it was received, or (a social post, an event) when it was created
        value = self.raw.get("received_at") or self.raw.get("created_at")
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
        # an arrival time outside the partitions (a file copied with an old or future mtime) is clamped
        return min(max(self.arrival_at.date(), first_day), today).isoformat()


def _file_time(stat: os.stat_result) -> datetime:
    return datetime.fromtimestamp(stat.st_mtime, tz=timezone.utc)


def list_inbox_files(inbox_dir: Path, suffixes: Sequence[str] = INBOX_SUFFIXES) -> list[tuple[int, str, Path]]:
    """(ctime_ns, name, path) for every candidate file, in arrival order. Writers drop files
    atomically (write a dotfile or .tmp, then rename), so those are skipped."""
    out = []
    if not inbox_dir.exists():
        return out
    with os.scandir(inbox_dir) as it:
        for entry in it:
            # dotfiles and .tmp are writes in progress; ~$ files are office programs' lock files
            if (not entry.is_file() or entry.name.startswith((".", "~$")) or entry.name.endswith(".tmp")
                    or not entry.name.endswith(tuple(suffixes))):
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


def parse_records_file(path: Path, what: str = "record") -> Parsed | list[Parsed]:
    """A feed of many records: ``.jsonl`` is one JSON object per line (source keys ``file:<name>#row=<n>``,
    the line number also in the record as ``_row``; a broken line becomes a dead letter with its number while
    the rest go on); any other suffix is one record (``parse_file``). ``what`` names a record in messages."""
    if path.suffix != ".jsonl":
        return parse_file(path)
    key = f"file:{path.name}"
    try:
        st = path.stat()
        arrival, raw = _file_time(st), path.read_bytes()
    except OSError as exc:
        return Parsed(key, datetime.now(timezone.utc), error=f"cannot read the file: {exc.strerror}",
                      error_type="unreadable")
    if len(raw) > MAX_FILE_BYTES:
        return Parsed(key, arrival, error=f"file is {len(raw) / 1048576:.1f} MiB, above the "
                                          f"{MAX_FILE_BYTES // 1048576} MiB intake limit; split it", error_type="too_large")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        return Parsed(key, arrival, error=f"the file is not UTF-8 (byte {exc.start}); export it as UTF-8 JSON lines",
                      error_type="encoding")
    out = []
    for n, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        k = f"{key}#row={n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as exc:
            out.append(Parsed(k, arrival, error=f"line {n}: not valid JSON ({exc.msg})", error_type="malformed"))
            continue
        if not isinstance(obj, dict):
            out.append(Parsed(k, arrival, error=f"line {n}: a {what} must be a JSON object", error_type="malformed"))
            continue
        out.append(Parsed(k, arrival, raw={**obj, "_row": n}))
    return out or Parsed(key, arrival, error=f"the file has no {what}s", error_type="empty")


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


def as_records(parsed: Parsed | list[Parsed]) -> list[Parsed]:
    """What a reader returned for one file, as its records (one, or one per row of a file of many)."""
    return parsed if isinstance(parsed, list) else [parsed]


def file_of(source_key: str) -> str:
    """The inbox source a key belongs to: ``file:import.csv#row=12`` (one record of a file of many)
    belongs to ``file:import.csv``."""
    return source_key.split("#", 1)[0]


def pending_sources(db: Database, flow: str, inbox_dir: Path | None, suffixes: Sequence[str] = INBOX_SUFFIXES,
                    parse: Callable[[Path], Parsed | list[Parsed]] | None = None,
                    want: Callable[[Path], bool] | None = None) -> Iterator[Parsed]:
    """Every source entry of ``flow`` not yet in its intake log, parsed, in arrival order. A file of
    many records (a CSV import) parses into one ``Parsed`` per record, keyed ``file:<name>#row=<n>``;
    its records are ingested together, so a file with any record in the log has been read."""
    parse = parse or parse_file
    with db.begin() as conn:
        seen = set(conn.execute(sa.select(intake.c.source_key).where(intake.c.flow == flow)).scalars())
        rows = conn.execute(
            sa.select(inbox.c.id, inbox.c.payload, inbox.c.submitted_at).where(inbox.c.flow == flow).order_by(inbox.c.id)
        ).all()
    if inbox_dir is not None:
        for _, name, path in list_inbox_files(inbox_dir, suffixes):
            if f"file:{name}" in seen or (want is not None and not want(path)):  # want: a cheap look first
                continue
            # records of one file may belong to different days: skipped per record
            yield from (p for p in as_records(parse(path)) if p.source_key not in seen)
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


def hand_over(db: Database, from_flow: str, to_flow: str, records: list[dict]) -> int:
    """Cross-flow events through the platform: ``records`` become sources of ``to_flow``'s intake (its rows of
    the inbox table), each under its ``id``, so a record handed over twice is one submission (the second is
    skipped); the receiving flow validates them against its own contract like any source. Returns how many
    were new. Flows never import each other: this is the only way one hands work to another."""
    import importlib

    from .flows import find

    if find(to_flow) is None:  # not loaded in this process yet: flows live in orch_project/defs/<name>/flow.py
        try:
            importlib.import_module(f"orch_project.defs.{to_flow}.flow")
        except ModuleNotFoundError:
            pass
    if find(to_flow) is None:
        raise KeyError(f"no flow {to_flow!r} is registered to hand {from_flow} records to")
    if missing := [n for n, r in enumerate(records, 1) if not r.get("id")]:
        raise ValueError(f"hand-over records need an id (records {missing[:5]})")
    return submit_to_table(db, to_flow, records, submitted_by=f"flow:{from_flow}")


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


# --- the intake stage every flow shares ------------------------------------------------------

class Rejected(ValueError):
    """Raised by a flow's ``to_item`` for a record it cannot take, with the dead letter's error type
    (e.g. ``encrypted``, ``unsupported``) and a reason that says what to do."""

    def __init__(self, error_type: str, reason: str):
        super().__init__(reason)
        self.error_type, self.reason = error_type, reason


@dataclass
class Accepted:
    """A validated source record as the flow's ``to_item`` hook makes it: the item's id, when it was
    received, its channel and its masked ``data``; ``pii`` counts what masking replaced."""

    item_id: str
    data: dict[str, Any]
    received_at: datetime | None = None
    channel: str | None = None
    pii: Counter = field(default_factory=Counter)
    injection: list[str] = field(default_factory=list)


class IntakeContext:
    """What a flow's ``to_item`` hook may use: the salt for customer references and the vault, where
    a raw value is kept (only there) behind a token scoped to the flow and the item."""

    def __init__(self, flow: str, salt: str, now: datetime):
        self.flow, self.salt, self.now = flow, salt, now
        self.vault_rows: list[dict[str, Any]] = []

    def vault(self, item_id: str, entity_type: str, value: str) -> str:
        from .guardrails.pii import vault_token

        token = vault_token(f"{self.flow}/{item_id}", entity_type, self.salt)
        self.vault_rows.append({"token": token, "flow": self.flow, "item_id": item_id, "entity_type": entity_type,
                                "value": value, "created_at": self.now})
        return token


def vault_values(db: Database, flow: str, item_ids: Sequence[str]) -> dict[str, dict[str, str]]:
    """The raw values a flow's items keep in the vault, ``{item_id: {entity_type: value}}``: for the few
    steps that must compare or hand over the real value (matching a person against a CRM); callers keep
    them in memory only and never store, log or send them to a model."""
    out: dict[str, dict[str, str]] = {}
    with db.begin() as conn:
        for chunk in chunked(list(dict.fromkeys(item_ids)), 900):
            for item_id, entity, value in conn.execute(sa.select(vault.c.item_id, vault.c.entity_type, vault.c.value)
                                                       .where(vault.c.flow == flow, vault.c.item_id.in_(chunk))):
                out.setdefault(item_id, {})[entity] = value
    return out


def vault_lookup(db: Database, tokens: Sequence[str]) -> dict[str, str]:
    """``{token: raw value}`` for vault tokens (e.g. the ones a flow wrote into a connector's records);
    the same rules as ``vault_values``."""
    out: dict[str, str] = {}
    with db.begin() as conn:
        for chunk in chunked(list(dict.fromkeys(tokens)), 900):
            out.update(conn.execute(sa.select(vault.c.token, vault.c.value).where(vault.c.token.in_(chunk))).all())
    return out


def existing_item_ids(db: Database, flow: str, ids: Sequence[str]) -> set[str]:
    out: set[str] = set()
    with db.begin() as conn:
        for chunk in chunked(list(ids), 900):
            out.update(conn.execute(sa.select(items.c.item_id).where(items.c.flow == flow,
                                                                     items.c.item_id.in_(chunk))).scalars())
    return out


def run_intake(env, spec, inbox_dir: Path | None, salt: str, today: date | None = None):
    """The intake stage of any flow: read the flow's new sources (its inbox folder and its rows of the
    inbox table) for the partition days, turn each into an item with the flow's ``to_item`` hook
    (validation and PII masking), and record every source once in the intake log as accepted,
    duplicate or dead-lettered (with a reason that names fields, never values). One transaction."""
    from .contracts import describe_validation_error
    from .pipeline import StageReport
    from .retention import tombstone_inbox_rows
    from .telemetry import log_event, new_trace_id

    flow = env.flow
    started = utcnow()
    today = today or started.date()
    days = set(env.days)
    accepted: list[dict[str, Any]] = []
    intake_rows: list[dict[str, Any]] = []
    dead: list[dict[str, Any]] = []
    pii_total: Counter = Counter()
    seen_ids: set[str] = set()
    peek = spec.intake.peek
    want = (lambda path: peek(path).partition_day(spec.first_day, today) in days) if peek is not None else None
    batch = [(p, d) for p in pending_sources(env.db, flow, inbox_dir, spec.intake.suffixes, spec.intake.parse_file,
                                             want)
             if (d := p.partition_day(spec.first_day, today)) in days]
    now = utcnow()
    ctx = IntakeContext(flow, salt, now)
    parsed: list[tuple[Parsed, str, Accepted | None, str | None, str | None, list[dict[str, Any]]]] = []
    for p, day in batch:
        got: Accepted | None = None
        error_type, reason = p.error_type, p.error
        mark = len(ctx.vault_rows)
        if reason is None:
            try:
                got = spec.intake.to_item(p.raw, ctx)
            except Rejected as exc:
                error_type, reason = exc.error_type, exc.reason
            except Exception as exc:  # pydantic ValidationError, or a type error deep in the payload
                error_type, reason = "validation", describe_validation_error(exc)
        parsed.append((p, day, got, error_type, reason, ctx.vault_rows[mark:]))
        del ctx.vault_rows[mark:]
    # duplicates by the id the flow gives its item (which need not be a field of the raw record)
    existing = existing_item_ids(env.db, flow, [g.item_id for _, _, g, *_ in parsed if g is not None])
    vault_rows: list[dict[str, Any]] = []
    for p, day, got, error_type, reason, tokens in parsed:
        base = {"source_key": p.source_key, "flow": flow, "day": day, "run_id": env.run_id, "ingested_at": now}
        if got is None:
            intake_rows.append({**base, "item_id": None, "outcome": "dead_lettered"})
            dead.append({"flow": flow, "item_id": None, "source_key": p.source_key, "stage": "intake",
                         "error_type": error_type or "invalid", "reason": reason, "trace_id": new_trace_id(),
                         "replay": {"source_key": p.source_key}, "status": "open", "run_id": env.run_id,
                         "created_at": now})
            continue
        if got.item_id in existing or got.item_id in seen_ids:
            intake_rows.append({**base, "item_id": got.item_id, "outcome": "duplicate"})
            continue
        seen_ids.add(got.item_id)
        vault_rows.extend(tokens)
        pii_total += got.pii
        data = {"source_key": p.source_key, **got.data, "pii": dict(got.pii)}
        if got.injection:
            data["injection"] = got.injection
        accepted.append({
            "item_id": got.item_id, "flow": flow, "trace_id": new_trace_id(), "day": day, "channel": got.channel,
            "status": "received", "stage": "intake", "received_at": got.received_at, "ingested_at": now,
            "updated_at": now, "escalation_level": 0, "data": data})
        intake_rows.append({**base, "item_id": got.item_id, "outcome": "accepted"})
    finished = utcnow()
    ms = (finished - started).total_seconds() * 1000.0
    timings = [{"item_id": a["item_id"], "flow": flow, "stage": "intake", "run_id": env.run_id,
                "started_at": started, "finished_at": finished, "duration_ms": ms, "attempt": env.attempt,
                "outcome": "ok"} for a in accepted]
    with env.db.begin() as conn:
        # The intake log is the idempotency guard: a source key is ingested exactly once per flow.
        env.db.insert_ignore(conn, intake, intake_rows, ["flow", "source_key"])
        if accepted:
            env.db.insert_ignore(conn, items, accepted, ["flow", "item_id"])
            conn.execute(item_stages.insert(), timings)
        env.db.insert_ignore(conn, vault, vault_rows, ["token"])
        if dead:
            conn.execute(dlq.insert(), dead)
        # data minimisation: once a table row is in the intake log its raw payload is no longer needed
        # (the masked item, the vault tokens or the dead letter's reason carry what later steps use)
        tombstone_inbox_rows(conn, [r["source_key"] for r in intake_rows], finished, "ingested; raw payload dropped")
    outcomes = Counter({"ok": len(accepted), "dead_lettered": len(dead),
                        "duplicate": sum(1 for r in intake_rows if r["outcome"] == "duplicate")})
    md: dict[str, Any] = {"received": len(intake_rows), "accepted": len(accepted), "dead_lettered": len(dead),
                          "duplicates": outcomes["duplicate"], "pii_entities_masked": sum(pii_total.values())}
    md.update({f"pii_{k.lower()}": v for k, v in sorted(pii_total.items())})
    if dead:
        md["dead_letter_reasons"] = Counter(d["error_type"] for d in dead).most_common()
    log_event(env.logger, "stage_done", flow=flow, stage="intake", run_id=env.run_id, days=env.days,
              items=len(intake_rows), outcomes=dict(outcomes), ms=round(ms, 1))
    return StageReport("intake", len(intake_rows), outcomes, ms, md)
