"""The app database: per-item state, stage timings, intake log, outbox, dead-letter queue,
approvals, audit log, PII vault, LLM call ledger and cache, circuit breakers, token budgets,
backlog, model registry.

SQLAlchemy 2 Core on any URL (SQLite file by default, PostgreSQL in production); the schema
is owned by Alembic migrations in ``orch_project/lib/migrations`` and applied by ``Database.migrate``.
Item text columns hold masked text only; raw values live in ``vault`` alone.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from sqlalchemy.engine import Connection, Engine

metadata = sa.MetaData()

TS = sa.DateTime(timezone=True)

items = sa.Table(
    "items",
    metadata,
    sa.Column("item_id", sa.String(255), primary_key=True),
    sa.Column("flow", sa.String(64), primary_key=True),
    sa.Column("trace_id", sa.String(32), nullable=False),
    sa.Column("day", sa.String(10), nullable=False, doc="partition key (YYYY-MM-DD)"),
    sa.Column("channel", sa.String(32)),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("stage", sa.String(64), nullable=False, doc="last stage that completed"),
    sa.Column("received_at", TS),
    sa.Column("ingested_at", TS, nullable=False),
    sa.Column("due_at", TS),
    sa.Column("resolved_at", TS),
    sa.Column("escalated_at", TS),
    sa.Column("escalation_level", sa.Integer, nullable=False, server_default="0"),
    sa.Column("data", sa.JSON, nullable=False, doc="masked stage outputs"),
    sa.Column("updated_at", TS, nullable=False),
    sa.PrimaryKeyConstraint("flow", "item_id", name="items_pkey"),
    sa.Index("ix_items_flow_day_status", "flow", "day", "status"),
    sa.Index("ix_items_status", "status"),
)

item_stages = sa.Table(
    "item_stages",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("item_id", sa.String(255), nullable=False),
    sa.Column("flow", sa.String(64), nullable=False),
    sa.Column("stage", sa.String(64), nullable=False),
    sa.Column("run_id", sa.String(64)),
    sa.Column("started_at", TS, nullable=False),
    sa.Column("finished_at", TS, nullable=False),
    sa.Column("duration_ms", sa.Float, nullable=False),
    sa.Column("attempt", sa.Integer, nullable=False, server_default="1"),
    sa.Column("outcome", sa.String(32), nullable=False),
    sa.Index("ix_item_stages_item", "item_id"),
    sa.Index("ix_item_stages_flow_stage", "flow", "stage"),
)

intake = sa.Table(
    "intake",
    metadata,
    sa.Column("source_key", sa.String(512), primary_key=True),
    sa.Column("flow", sa.String(64), primary_key=True),
    sa.Column("item_id", sa.String(255)),
    sa.Column("day", sa.String(10), nullable=False),
    sa.Column("outcome", sa.String(32), nullable=False, doc="accepted | duplicate | dead_lettered"),
    sa.Column("run_id", sa.String(64)),
    sa.Column("ingested_at", TS, nullable=False),
    sa.PrimaryKeyConstraint("flow", "source_key", name="intake_pkey"),
    sa.Index("ix_intake_flow_outcome", "flow", "outcome"),
)

inbox = sa.Table(
    "inbox",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("flow", sa.String(64), nullable=False),
    sa.Column("external_id", sa.String(255), doc="the submitter's id, for dedup at submit time"),
    sa.Column("payload", sa.Text, nullable=False, doc="raw inbound JSON; purged after the retention limit"),
    sa.Column("submitted_at", TS, nullable=False),
    sa.Column("submitted_by", sa.String(128)),
    sa.UniqueConstraint("flow", "external_id", name="uq_inbox_flow_external_id"),
)

outbox = sa.Table(
    "outbox",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("idempotency_key", sa.String(512), nullable=False, unique=True),
    sa.Column("flow", sa.String(64), nullable=False),
    sa.Column("item_id", sa.String(255), nullable=False),
    sa.Column("trace_id", sa.String(32), nullable=False),
    sa.Column("connector", sa.String(32), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("payload", sa.JSON, nullable=False),
    sa.Column("status", sa.String(16), nullable=False, doc="pending | delivered | failed | dead (failed for good) | cancelled"),
    sa.Column("attempts", sa.Integer, nullable=False, server_default="0"),
    sa.Column("last_error", sa.Text),
    sa.Column("external_ref", sa.String(255)),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("delivered_at", TS),
    sa.Index("ix_outbox_status", "status"),
    sa.Index("ix_outbox_item", "item_id"),
)

dlq = sa.Table(
    "dlq",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("flow", sa.String(64), nullable=False),
    sa.Column("item_id", sa.String(255)),
    sa.Column("source_key", sa.String(512)),
    sa.Column("stage", sa.String(64), nullable=False),
    sa.Column("error_type", sa.String(64), nullable=False),
    sa.Column("reason", sa.Text, nullable=False),
    sa.Column("trace_id", sa.String(32)),
    sa.Column("replay", sa.JSON, nullable=False, doc="what replay needs: a source reference, never raw text"),
    sa.Column("status", sa.String(16), nullable=False, doc="open | replayed | discarded"),
    sa.Column("run_id", sa.String(64)),
    sa.Column("created_at", TS, nullable=False),
    sa.Index("ix_dlq_status", "status"),
)

approvals = sa.Table(
    "approvals",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("flow", sa.String(64), nullable=False),
    sa.Column("item_id", sa.String(255), nullable=False),
    sa.Column("reason", sa.String(64), nullable=False),
    sa.Column("required_role", sa.String(32), nullable=False),
    sa.Column("status", sa.String(16), nullable=False, doc="pending | approved | rejected"),
    sa.Column("due_at", TS),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("decided_at", TS),
    sa.Column("decided_by", sa.String(128)),
    sa.Column("decision_reason", sa.Text),
    sa.Column("edited", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.UniqueConstraint("flow", "item_id", name="uq_approvals_flow_item"),
    sa.Index("ix_approvals_status", "status"),
)

audit = sa.Table(
    "audit",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("at", TS, nullable=False),
    sa.Column("actor", sa.String(128), nullable=False),
    sa.Column("action", sa.String(64), nullable=False),
    sa.Column("flow", sa.String(64)),
    sa.Column("item_id", sa.String(255)),
    sa.Column("trace_id", sa.String(32)),
    sa.Column("reason", sa.Text),
    sa.Column("inputs", sa.JSON),
    sa.Column("outputs", sa.JSON),
    sa.Index("ix_audit_item", "item_id"),
    sa.Index("ix_audit_flow_at", "flow", "at"),
)

vault = sa.Table(
    "vault",
    metadata,
    sa.Column("token", sa.String(64), primary_key=True),
    sa.Column("item_id", sa.String(255), nullable=False),
    sa.Column("entity_type", sa.String(32), nullable=False),
    sa.Column("value", sa.Text, nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("flow", sa.String(64), doc="NULL only for rows older than migration 0007 whose item was gone"),
    sa.Index("ix_vault_item", "item_id"),
    sa.Index("ix_vault_flow_item", "flow", "item_id"),
)

llm_calls = sa.Table(
    "llm_calls",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("run_id", sa.String(64)),
    sa.Column("flow", sa.String(64), nullable=False),
    sa.Column("item_id", sa.String(255)),
    sa.Column("task", sa.String(64), nullable=False),
    sa.Column("provider", sa.String(32), nullable=False),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("prompt_version", sa.String(64)),
    sa.Column("input_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("output_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("latency_ms", sa.Float, nullable=False, server_default="0"),
    sa.Column("cached", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("ok", sa.Boolean, nullable=False),
    sa.Column("error", sa.String(64)),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("cache_kind", sa.String(16), doc="exact | semantic when answered from the cache"),
    sa.Column("route_rank", sa.Integer, nullable=False, server_default="0",
              doc="0 = the router's first choice for the item, 1 = first fallback, ..."),
    sa.Column("route_reason", sa.String(255), doc="why this candidate was called (or skipped)"),
    sa.Column("repair", sa.Boolean, nullable=False, server_default=sa.false(),
              doc="a repair attempt with the validation error fed back"),
    sa.Column("reserved_tokens", sa.Integer, nullable=False, server_default="0"),
    sa.Column("cost_usd", sa.Float, nullable=False, server_default="0"),
    sa.Column("day", sa.String(10), doc="UTC day the call was charged to"),
    sa.Index("ix_llm_calls_run", "run_id"),
    sa.Index("ix_llm_calls_model_created", "provider", "model", "created_at"),
)

llm_cache = sa.Table(
    "llm_cache",
    metadata,
    sa.Column("key", sa.String(64), primary_key=True),
    sa.Column("task", sa.String(64), nullable=False),
    sa.Column("model", sa.String(128), nullable=False),
    sa.Column("prompt_version", sa.String(64)),
    sa.Column("output", sa.JSON, nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("input_text", sa.Text, doc="masked input, kept only for tasks with the semantic cache on"),
    sa.Index("ix_llm_cache_task_model", "task", "model", "prompt_version"),
)

circuit_breakers = sa.Table(
    "circuit_breakers",
    metadata,
    sa.Column("key", sa.String(200), primary_key=True, doc="provider:model"),
    sa.Column("state", sa.String(16), nullable=False, doc="closed | open | half_open"),
    sa.Column("failures", sa.Integer, nullable=False, server_default="0", doc="consecutive failures"),
    sa.Column("probes", sa.Integer, nullable=False, server_default="0", doc="calls let through while half-open"),
    sa.Column("opened_at", TS),
    sa.Column("last_error", sa.String(255)),
    sa.Column("updated_at", TS, nullable=False),
)

token_budgets = sa.Table(
    "token_budgets",
    metadata,
    sa.Column("scope", sa.String(128), primary_key=True, doc="run:<run_id> or day:<flow>:<YYYY-MM-DD>"),
    sa.Column("cap", sa.Integer, nullable=False),
    sa.Column("used", sa.Integer, nullable=False, server_default="0", doc="tokens reported by providers"),
    sa.Column("reserved", sa.Integer, nullable=False, server_default="0", doc="estimates of calls in flight"),
    sa.Column("refused", sa.Integer, nullable=False, server_default="0", doc="reservations refused"),
    sa.Column("cost_usd", sa.Float, nullable=False, server_default="0"),
    sa.Column("updated_at", TS, nullable=False),
)

backlog = sa.Table(
    "backlog",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("flow", sa.String(64), nullable=False),
    sa.Column("kind", sa.String(32), nullable=False, doc="top_intent | rising_intent | worst_csat"),
    sa.Column("key", sa.String(128), nullable=False),
    sa.Column("title", sa.Text, nullable=False),
    sa.Column("score", sa.Float, nullable=False),
    sa.Column("detail", sa.JSON, nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
    sa.UniqueConstraint("flow", "kind", "key", name="uq_backlog_flow_kind_key"),
)

models = sa.Table(
    "models",
    metadata,
    sa.Column("version", sa.String(64), primary_key=True),
    sa.Column("task", sa.String(64), nullable=False),
    sa.Column("path", sa.Text, nullable=False),
    sa.Column("train_data_hash", sa.String(64), nullable=False),
    sa.Column("code_version", sa.String(64), nullable=False),
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("status", sa.String(16), nullable=False,
              doc="candidate | promoted | retired | refused | rolled_back"),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("promoted_at", TS),
)

evaluations = sa.Table(
    "evaluations",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("task", sa.String(64), nullable=False),
    sa.Column("model_version", sa.String(64), nullable=False),
    sa.Column("prompt_version", sa.String(64), nullable=False),
    sa.Column("dataset", sa.String(128), nullable=False, doc="validation | test | golden | ..."),
    sa.Column("metrics", sa.JSON, nullable=False),
    sa.Column("created_at", TS, nullable=False),
    sa.Index("ix_evaluations_model", "model_version"),
)

alerts = sa.Table(
    "alerts",
    metadata,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("flow", sa.String(64), nullable=False),
    sa.Column("dedup_key", sa.String(255), nullable=False, doc="flow:rule:window start (or run id): raised once"),
    sa.Column("rule", sa.String(128), nullable=False, doc="the brief's rule text, or run_failure"),
    sa.Column("metric", sa.String(64), nullable=False),
    sa.Column("observed", sa.Float),
    sa.Column("threshold", sa.Float),
    sa.Column("source", sa.String(128), nullable=False, doc="the sensor that raised it"),
    sa.Column("window_start", TS, nullable=False),
    sa.Column("message", sa.Text, nullable=False),
    sa.Column("channels", sa.JSON, nullable=False, doc="{channel: delivered | error text}"),
    sa.Column("created_at", TS, nullable=False),
    sa.UniqueConstraint("dedup_key", name="uq_alerts_dedup_key"),
    sa.Index("ix_alerts_flow_created", "flow", "created_at"),
)


def utcnow() -> datetime:
    return datetime.now(timezone.utc)


def as_utc(value: datetime | None) -> datetime | None:
    """SQLite hands back naive datetimes; everything in this project is UTC."""
    if value is None:
        return None
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)


def _sqlite_pragmas(dbapi_conn, _record) -> None:
    cur = dbapi_conn.cursor()
    cur.execute("PRAGMA journal_mode=WAL")
    cur.execute("PRAGMA synchronous=NORMAL")
    cur.execute("PRAGMA busy_timeout=30000")
    cur.execute("PRAGMA foreign_keys=ON")
    cur.close()


_ENGINES: dict[str, Engine] = {}
_WRITE_LOCKS: dict[str, threading.Lock] = {}
_MIGRATED: set[str] = set()
_LOCK = threading.Lock()

MIGRATIONS_DIR = Path(__file__).with_name("migrations")


def make_engine(url: str) -> Engine:
    """One engine per URL per process (connection pools are per engine)."""
    with _LOCK:
        eng = _ENGINES.get(url)
        if eng is None:
            if url.startswith("sqlite"):
                path = url.split("///", 1)[-1]
                if path and path != ":memory:":
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
                eng = sa.create_engine(url, connect_args={"timeout": 30})
                sa.event.listen(eng, "connect", _sqlite_pragmas)
            else:
                eng = sa.create_engine(url, pool_pre_ping=True, pool_size=5, max_overflow=5)
            _ENGINES[url] = eng
        return eng


def dispose_engines() -> None:
    with _LOCK:
        for eng in _ENGINES.values():
            eng.dispose()
        _ENGINES.clear()
        _MIGRATED.clear()


def alembic_config(url: str):
    from alembic.config import Config

    cfg = Config()
    cfg.set_main_option("script_location", str(MIGRATIONS_DIR))
    cfg.set_main_option("sqlalchemy.url", url.replace("%", "%%"))
    return cfg


def migrate(url: str) -> None:
    """Bring the schema to the newest migration (idempotent; cheap when already current)."""
    if url in _MIGRATED:
        return
    engine = make_engine(url)
    from alembic import command
    from alembic.runtime.migration import MigrationContext
    from alembic.script import ScriptDirectory

    cfg = alembic_config(url)
    head = ScriptDirectory.from_config(cfg).get_current_head()
    with engine.connect() as conn:
        current = MigrationContext.configure(conn).get_current_revision()
    if current != head:
        with engine.begin() as conn:
            cfg.attributes["connection"] = conn
            command.upgrade(cfg, "head")
    _MIGRATED.add(url)


class Database:
    """Thin helpers over one engine; every method is a short transaction."""

    def __init__(self, url: str, *, auto_migrate: bool = True):
        self.url = url
        self.engine = make_engine(url)
        if auto_migrate:
            migrate(url)

    @property
    def dialect(self) -> str:
        return self.engine.dialect.name

    @contextmanager
    def begin(self) -> Iterator[Connection]:
        with self.engine.begin() as conn:
            yield conn

    @contextmanager
    def write(self) -> Iterator[Connection]:
        """A short read-modify-write transaction that many threads of this process may run at once.
        SQLite allows one writer: threads queue on a process lock instead of SQLite's sleeping busy
        handler (and a read that upgrades to a write cannot hit SQLITE_BUSY). PostgreSQL's row
        locks need no help."""
        if self.dialect != "sqlite":
            with self.engine.begin() as conn:
                yield conn
            return
        with _WRITE_LOCKS.setdefault(self.url, threading.Lock()):
            with self.engine.begin() as conn:
                yield conn

    # -- generic helpers -------------------------------------------------------------
    def insert_ignore(self, conn: Connection, table: sa.Table, rows: Sequence[dict], index: list[str]) -> None:
        """INSERT ... ON CONFLICT DO NOTHING on SQLite and PostgreSQL."""
        if not rows:
            return
        if self.dialect == "postgresql":
            from sqlalchemy.dialects.postgresql import insert as pg_insert

            stmt = pg_insert(table).on_conflict_do_nothing(index_elements=index)
        else:
            from sqlalchemy.dialects.sqlite import insert as sqlite_insert

            stmt = sqlite_insert(table).on_conflict_do_nothing(index_elements=index)
        for chunk in chunked(rows, 2000):
            conn.execute(stmt, list(chunk))

    def audit(self, conn: Connection, rows: Iterable[dict]) -> None:
        now = utcnow()
        rows = [{"at": now, "inputs": None, "outputs": None, "reason": None, **r} for r in rows]
        if rows:
            conn.execute(audit.insert(), rows)

    def kv_counts(self, conn: Connection, stmt) -> dict[str, int]:
        return {str(k): int(v) for k, v in conn.execute(stmt).all()}


def chunked(seq: Sequence[Any], size: int) -> Iterator[Sequence[Any]]:
    for i in range(0, len(seq), size):
        yield seq[i : i + size]


def dumps(obj: Any) -> str:
    return json.dumps(obj, default=str, separators=(",", ":"), sort_keys=True)
