"""Embedded connectors: external systems as tables in their own SQLite database
(``ORCH_CONNECTORS_URL``), so a user can open them and see exactly what the flows did.

A system is a ``System``: its table, how an effect becomes a row, and handlers for actions that
change existing records (e.g. a compensation that voids a ticket). The platform brings ticketing,
CRM and messaging; a flow registers the systems it needs besides (its spec's ``systems``), and
every system is reached through the same ``deliver(connector, effects)``.

They stand in for external systems and behave like good ones: every write carries an
idempotency key and a repeated key returns the original record instead of a duplicate.
Text they receive is masked; recipients are vault tokens, resolved only by a real sender.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import sqlalchemy as sa

from ..store import Database, chunked, make_engine, utcnow

cmeta = sa.MetaData()
TS = sa.DateTime(timezone=True)

def system_table(name: str, *columns: sa.Column) -> sa.Table:
    """A system's table on ``cmeta`` with the columns every record has (id, idempotency key, item id,
    trace id) first, then ``columns``; ``base_row(effect)`` fills the common ones."""
    return sa.Table(
        name, cmeta,
        sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
        sa.Column("idempotency_key", sa.String(512), nullable=False, unique=True),
        sa.Column("item_id", sa.String(255), nullable=False),
        sa.Column("trace_id", sa.String(32)),
        *columns,
    )


tickets = system_table(
    "tickets",
    sa.Column("queue", sa.String(32)),
    sa.Column("priority", sa.String(16)),
    sa.Column("assignee", sa.String(64)),
    sa.Column("intent", sa.String(64)),
    sa.Column("subject", sa.Text),
    sa.Column("status", sa.String(32), nullable=False),
    sa.Column("created_at", TS, nullable=False),
)
crm_activities = sa.Table(
    "crm_activities", cmeta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("idempotency_key", sa.String(512), nullable=False, unique=True),
    sa.Column("customer_ref", sa.String(64), nullable=False),
    sa.Column("item_id", sa.String(255), nullable=False),
    sa.Column("trace_id", sa.String(32)),
    sa.Column("kind", sa.String(32), nullable=False),
    sa.Column("summary", sa.Text, nullable=False),
    sa.Column("created_at", TS, nullable=False),
)
messages = sa.Table(
    "messages", cmeta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("idempotency_key", sa.String(512), nullable=False, unique=True),
    sa.Column("item_id", sa.String(255)),
    sa.Column("trace_id", sa.String(32)),
    sa.Column("kind", sa.String(32), nullable=False, doc="reply | survey | alert"),
    sa.Column("recipient", sa.String(128), nullable=False, doc="vault token or channel name"),
    sa.Column("subject", sa.Text),
    sa.Column("body", sa.Text, nullable=False),
    sa.Column("sent_at", TS, nullable=False),
)
survey_responses = sa.Table(
    "survey_responses", cmeta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("item_id", sa.String(255), nullable=False, unique=True),
    sa.Column("score", sa.Integer, nullable=False),
    sa.Column("comment", sa.Text),
    sa.Column("responded_at", TS, nullable=False),
    sa.Column("recorded_at", TS, nullable=False),
)

# Drill/test only: simulated outages per connector, in the connectors database so that every process
# (webserver, daemon, run workers, a test) sees the same fault. Never written by the flows themselves.
faults = sa.Table(
    "faults", cmeta,
    sa.Column("connector", sa.String(32), primary_key=True),
    sa.Column("mode", sa.String(16), nullable=False, doc="raise | hang"),
    sa.Column("remaining", sa.Integer, doc="calls left to fail; NULL = until cleared"),
    sa.Column("hang_s", sa.Float, nullable=False, server_default="0"),
    sa.Column("created_at", TS, nullable=False),
)

@dataclass
class Effect:
    """One side effect as the outbox hands it to a connector."""

    idempotency_key: str
    connector: str
    action: str
    item_id: str
    trace_id: str
    payload: dict[str, Any] = field(default_factory=dict)


class ConnectorUnavailable(ConnectionError):
    """The external system did not answer (outage, refused connection)."""


@dataclass
class Delivery:
    idempotency_key: str
    ok: bool
    external_ref: str | None = None
    error: str | None = None


@dataclass(frozen=True)
class System:
    """One embedded external system. ``row(effect, now)`` makes the table row of a new record;
    ``handlers[action](conn, effects)`` serve actions on existing records and return Deliveries;
    ``same_record`` names the columns that identify one record per item (with the flow, from the
    idempotency key): two rows alike in them are a duplicate, unless ``counts_as_duplicate`` says no."""

    name: str
    table: sa.Table
    row: Callable[[Effect, Any], dict[str, Any]]
    handlers: Mapping[str, Callable[[Any, Sequence[Effect]], list[Delivery]]] = field(default_factory=dict)
    same_record: tuple[str, ...] = ("item_id",)
    counts_as_duplicate: Callable[[sa.Table], Any] | None = None


def base_row(e: Effect) -> dict[str, Any]:
    """The columns every record of a ``system_table`` has, from the effect that creates it."""
    return {"idempotency_key": e.idempotency_key, "item_id": e.item_id, "trace_id": e.trace_id}


def _ticket_row(e: Effect, now) -> dict[str, Any]:
    p = e.payload
    return {**base_row(e), "queue": p.get("queue"), "priority": p.get("priority"), "assignee": p.get("assignee"),
            "intent": p.get("intent"), "subject": p.get("subject"), "status": p.get("status", "open"),
            "created_at": now}


def void_by_effect_key(table: sa.Table, system: str, status: str,
                       legacy_keys: tuple[str, ...] = ()) -> Callable[[Any, Sequence[Effect]], list[Delivery]]:
    """A compensation handler: the record created under ``payload.effect_key`` (or, for outbox rows written
    before that name, one of ``legacy_keys``) gets ``status``. Idempotent: voiding a voided record changes
    nothing and returns the same reference; nothing created means nothing to void."""
    def handler(conn, effects: Sequence[Effect]) -> list[Delivery]:
        out = []
        for e in effects:
            key = e.payload.get("effect_key") or next((e.payload[k] for k in legacy_keys if e.payload.get(k)), None)
            rid = conn.execute(sa.select(table.c.id).where(table.c.idempotency_key == key)).scalar()
            if rid is None:
                out.append(Delivery(e.idempotency_key, True, f"{system}:none:void"))
                continue
            conn.execute(table.update().where(table.c.id == rid).values(status=status))
            out.append(Delivery(e.idempotency_key, True, f"{system}:{rid}:void"))
        return out

    return handler


# ticket_key: outbox rows before the kit
_void_tickets = void_by_effect_key(tickets, "ticketing", "voided", legacy_keys=("ticket_key",))


_SYSTEMS: dict[str, System] = {}


def register_system(system: System) -> None:
    """Make a system reachable through ``deliver`` (its table is created on the next connection)."""
    if system.table.metadata is not cmeta:
        raise ValueError(f"system {system.name!r}: define its table on lib.connectors.embedded.cmeta")
    known = _SYSTEMS.get(system.name)
    if known is not None and known is not system:
        raise ValueError(f"a system {system.name!r} is already registered; give the flow's system its own name")
    _SYSTEMS[system.name] = system


def unregister_system(name: str) -> None:
    """Forget a system a flow registered (tests that define throwaway flows)."""
    _SYSTEMS.pop(name, None)


register_system(System("ticketing", tickets, _ticket_row, handlers={"void_ticket": _void_tickets},
                       counts_as_duplicate=lambda t: t.c.status != "voided"))
register_system(System("crm", crm_activities, lambda e, now: {
    **base_row(e), "customer_ref": e.payload["customer_ref"], "kind": e.action, "summary": e.payload.get("summary", ""),
    "created_at": now}, same_record=("item_id", "kind")))
register_system(System("messaging", messages, lambda e, now: {
    **base_row(e), "kind": e.payload.get("kind", e.action), "recipient": e.payload["recipient"],
    "subject": e.payload.get("subject"), "body": e.payload.get("body", ""), "sent_at": now},
    same_record=("item_id", "kind")))


class EmbeddedConnectors:
    """Every registered system over one database; ``deliver`` routes by connector (system) name."""

    def __init__(self, url: str):
        self.url = url
        self.db = Database(url, auto_migrate=False)
        cmeta.create_all(make_engine(url))

    def _system(self, connector: str) -> System:
        system = _SYSTEMS.get(connector)
        if system is None:
            raise ValueError(f"unknown connector {connector!r}; systems: {', '.join(sorted(_SYSTEMS))}")
        return system

    # -- drill / test only: simulate an outage of one connector -------------------------
    def set_fault(self, connector: str, *, mode: str = "raise", remaining: int | None = None,
                  hang_s: float = 0.0) -> None:
        """Make ``connector`` fail (``raise``) or stall (``hang`` for ``hang_s`` seconds, then fail) on its
        next ``remaining`` deliveries (None: until ``clear_fault``). For tests and drills only."""
        if connector not in _SYSTEMS or mode not in ("raise", "hang"):
            raise ValueError(f"unknown connector {connector!r} or fault mode {mode!r}")
        with self.db.begin() as conn:
            conn.execute(faults.delete().where(faults.c.connector == connector))
            conn.execute(faults.insert().values(connector=connector, mode=mode, remaining=remaining,
                                                hang_s=hang_s, created_at=utcnow()))

    def clear_fault(self, connector: str | None = None) -> None:
        with self.db.begin() as conn:
            conn.execute(faults.delete() if connector is None else faults.delete().where(faults.c.connector == connector))

    def _check_fault(self, connector: str) -> None:
        with self.db.begin() as conn:
            row = conn.execute(sa.select(faults).where(faults.c.connector == connector)).mappings().first()
            if row is None:
                return
            if row["remaining"] is not None:
                if row["remaining"] <= 1:
                    conn.execute(faults.delete().where(faults.c.connector == connector))
                else:
                    conn.execute(faults.update().where(faults.c.connector == connector)
                                 .values(remaining=faults.c.remaining - 1))
        if row["mode"] == "hang":
            import time

            time.sleep(row["hang_s"])
        raise ConnectorUnavailable(f"{connector} unavailable (simulated {row['mode']})")

    def deliver(self, connector: str, effects: Sequence[Effect]) -> list[Delivery]:
        system = self._system(connector)
        cmeta.create_all(self.db.engine, tables=[system.table])  # a system registered after start-up
        self._check_fault(connector)
        out: list[Delivery] = []
        special = [e for e in effects if e.action in system.handlers]
        if special:
            with self.db.begin() as conn:
                for action in dict.fromkeys(e.action for e in special):
                    out += system.handlers[action](conn, [e for e in special if e.action == action])
            effects = [e for e in effects if e.action not in system.handlers]
            if not effects:
                return out
        table = system.table
        now = utcnow()
        rows = [system.row(e, now) for e in effects]
        keys = [e.idempotency_key for e in effects]
        refs: dict[str, int] = {}
        with self.db.begin() as conn:
            self.db.insert_ignore(conn, table, rows, ["idempotency_key"])
            for chunk in chunked(keys, 900):
                q = sa.select(table.c.idempotency_key, table.c.id).where(table.c.idempotency_key.in_(chunk))
                refs.update(dict(conn.execute(q).all()))
        return out + [
            Delivery(k, k in refs, f"{connector}:{refs[k]}" if k in refs else None,
                     None if k in refs else "not recorded")
            for k in keys
        ]

    # -- survey answers come back through the messaging system ---------------------------
    def record_survey_responses(self, responses: Sequence[dict[str, Any]]) -> int:
        now = utcnow()
        rows = [{**r, "recorded_at": now} for r in responses]
        with self.db.begin() as conn:
            before = conn.execute(sa.select(sa.func.count()).select_from(survey_responses)).scalar_one()
            self.db.insert_ignore(conn, survey_responses, rows, ["item_id"])
            after = conn.execute(sa.select(sa.func.count()).select_from(survey_responses)).scalar_one()
        return after - before

    def survey_responses_for(self, item_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
        out: dict[str, dict[str, Any]] = {}
        with self.db.begin() as conn:
            for chunk in chunked(list(item_ids), 900):
                q = sa.select(survey_responses).where(survey_responses.c.item_id.in_(chunk))
                for r in conn.execute(q).mappings():
                    out[r["item_id"]] = dict(r)
        return out

    def counts(self) -> dict[str, int]:
        with self.db.begin() as conn:
            return {
                name: conn.execute(sa.select(sa.func.count()).select_from(t)).scalar_one()
                for name, t in (("tickets", tickets), ("crm_activities", crm_activities),
                                ("messages", messages), ("survey_responses", survey_responses))
            }

    def duplicates(self, flow: str | None = None) -> dict[str, int]:
        """Records per system that repeat one item's record (by the system's ``same_record``): must
        always be zero. An item is a flow's item: the flow is the first part of the idempotency key
        (``flow:item:step``), so two flows' items with the same id are two items; ``flow`` counts only
        that flow's records."""
        from collections import Counter

        out = {}
        with self.db.begin() as conn:
            for system in _SYSTEMS.values():
                t = system.table
                if not sa.inspect(conn).has_table(t.name):
                    out[t.name] = 0
                    continue
                where = system.counts_as_duplicate(t) if system.counts_as_duplicate else sa.true()
                cols = [t.c.idempotency_key, *(t.c[c] for c in system.same_record)]
                if flow is not None:
                    where = sa.and_(where, t.c.idempotency_key.like(f"{flow}:%"))
                seen = Counter((key.split(":", 1)[0], *rest) for key, *rest in conn.execute(sa.select(*cols).where(where)))
                out[t.name] = sum(1 for n in seen.values() if n > 1)
        return out
