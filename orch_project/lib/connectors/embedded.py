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
    table: sa.Table | None  # None: a system that is only read (a reference directory); deliveries are refused
    row: Callable[[Effect, Any], dict[str, Any]]
    handlers: Mapping[str, Callable[[Any, Sequence[Effect]], list[Delivery]]] = field(default_factory=dict)
    same_record: tuple[str, ...] = ("item_id",)
    counts_as_duplicate: Callable[[sa.Table], Any] | None = None
    # ``readers[name](conn, *args)``: reads a flow may make of the system (a lookup, a listing), reached
    # through ``EmbeddedConnectors.read`` behind the same simulated faults as deliveries
    readers: Mapping[str, Callable[..., Any]] = field(default_factory=dict)


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
    if system.table is not None and system.table.metadata is not cmeta:
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


# --- CRM contacts: one row per person the CRM knows, changed only through recorded, idempotent changes --

crm_contacts = sa.Table(
    "crm_contacts", cmeta,
    sa.Column("contact_id", sa.String(64), primary_key=True),
    sa.Column("name", sa.Text, doc="vault token (written by a flow) or the CRM's own value (imported records)"),
    sa.Column("email", sa.Text, doc="vault token or the CRM's own value"),
    sa.Column("phone", sa.Text, doc="vault token or the CRM's own value"),
    sa.Column("company", sa.Text),
    sa.Column("title", sa.Text),
    sa.Column("country", sa.String(2)),
    sa.Column("owner", sa.String(128), doc="the rep who owns the contact"),
    sa.Column("stage", sa.String(32), doc="Lead | Qualified | Nurture | Contacted | Engaged | Proposal | Won | Lost | Archived"),
    sa.Column("score", sa.Float),
    sa.Column("do_not_email", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("do_not_call", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("unsubscribed", sa.Boolean, nullable=False, server_default=sa.false()),
    sa.Column("source", sa.String(64)),
    sa.Column("notes", sa.Text),
    sa.Column("created_at", TS, nullable=False),
    sa.Column("updated_at", TS, nullable=False),
)
crm_contact_changes = system_table(
    "crm_contact_changes",
    sa.Column("contact_id", sa.String(64), nullable=False),
    sa.Column("action", sa.String(32), nullable=False, doc="upsert_contact | set_stage | revert_change"),
    sa.Column("before", sa.JSON, doc="the contact before the change (null: it was created)"),
    sa.Column("after", sa.JSON),
    sa.Column("created_at", TS, nullable=False),
)
CONTACT_FIELDS = ("name", "email", "phone", "company", "title", "country", "owner", "stage", "score",
                  "do_not_email", "do_not_call", "unsubscribed", "source", "notes")
CONSENT_FIELDS = ("do_not_email", "do_not_call", "unsubscribed")
IDENTITY_FIELDS = ("name", "email", "phone")
# the pipeline's order: a contact only moves forward (a reply never takes a won deal back to Engaged, a cold
# lead never archives a known contact); Won and Lost, a rep's outcome, are set whatever came before
STAGE_RANK = {"Archived": 0, "Lead": 1, "Nurture": 2, "Qualified": 3, "Contacted": 4, "Engaged": 5, "Proposal": 6,
              "Won": 7, "Lost": 7}
OUTCOMES = ("Won", "Lost")


def stage_moves(current: str | None, new: str | None) -> bool:
    """Whether a contact at ``current`` may move to ``new``."""
    if not new or new == current:
        return False
    if current is None or new in OUTCOMES:
        return True
    return STAGE_RANK.get(new, 0) > STAGE_RANK.get(current, 0)


def _contact_json(row: Mapping[str, Any] | None) -> dict[str, Any] | None:
    return None if row is None else {k: row[k] for k in CONTACT_FIELDS}


def _change(conn, e: Effect, contact_id: str, action: str, before, after) -> Delivery:
    conn.execute(crm_contact_changes.insert().values(**base_row(e), contact_id=contact_id, action=action,
                                                     before=before, after=after, created_at=utcnow()))
    rid = conn.execute(sa.select(crm_contact_changes.c.id).where(
        crm_contact_changes.c.idempotency_key == e.idempotency_key)).scalar_one()
    return Delivery(e.idempotency_key, True, f"crm_contacts:{contact_id}:{rid}")


def _seen(conn, e: Effect) -> Delivery | None:
    """The change an idempotency key already made, if any (a redelivery returns it unchanged)."""
    row = conn.execute(sa.select(crm_contact_changes.c.id, crm_contact_changes.c.contact_id).where(
        crm_contact_changes.c.idempotency_key == e.idempotency_key)).first()
    return None if row is None else Delivery(e.idempotency_key, True, f"crm_contacts:{row.contact_id}:{row.id}")


def _upsert_contacts(conn, effects: Sequence[Effect]) -> list[Delivery]:
    """Create the contact or update the fields the payload names. Consent only ever tightens here: a
    do-not-email, do-not-call or unsubscribe already on the contact is never cleared by an upsert."""
    out = []
    for e in effects:
        if (done := _seen(conn, e)) is not None:
            out.append(done)
            continue
        p = e.payload
        cid = str(p["contact_id"])
        row = conn.execute(sa.select(crm_contacts).where(crm_contacts.c.contact_id == cid)).mappings().first()
        now = utcnow()
        values = {k: p[k] for k in CONTACT_FIELDS if k in p and p[k] is not None}
        for k, v in (p.get("identity") or {}).items():  # the person's identity fills gaps, never overwrites
            if k in IDENTITY_FIELDS and v is not None and (row is None or row[k] is None):
                values[k] = v
        for k in CONSENT_FIELDS:
            values[k] = bool(values.get(k)) or bool(row[k] if row is not None else False)
        if row is not None and "stage" in values and not stage_moves(row["stage"], values["stage"]):
            values.pop("stage")
        if row is None:
            conn.execute(crm_contacts.insert().values(contact_id=cid, created_at=now, updated_at=now, **values))
        else:
            conn.execute(crm_contacts.update().where(crm_contacts.c.contact_id == cid).values(updated_at=now, **values))
        after = conn.execute(sa.select(crm_contacts).where(crm_contacts.c.contact_id == cid)).mappings().first()
        out.append(_change(conn, e, cid, "upsert_contact", _contact_json(row), _contact_json(after)))
    return out


def _set_stage(conn, effects: Sequence[Effect]) -> list[Delivery]:
    """Move a contact's deal stage (and consent flags the payload sets); refused for an unknown contact."""
    out = []
    for e in effects:
        if (done := _seen(conn, e)) is not None:
            out.append(done)
            continue
        cid = str(e.payload["contact_id"])
        row = conn.execute(sa.select(crm_contacts).where(crm_contacts.c.contact_id == cid)).mappings().first()
        if row is None:
            out.append(Delivery(e.idempotency_key, False, error=f"no CRM contact {cid}"))
            continue
        values: dict[str, Any] = {"updated_at": utcnow()}
        if stage_moves(row["stage"], e.payload.get("stage")):
            values["stage"] = e.payload["stage"]
        values.update({k: True for k in CONSENT_FIELDS if e.payload.get(k)})
        conn.execute(crm_contacts.update().where(crm_contacts.c.contact_id == cid).values(**values))
        after = conn.execute(sa.select(crm_contacts).where(crm_contacts.c.contact_id == cid)).mappings().first()
        out.append(_change(conn, e, cid, "set_stage", _contact_json(row), _contact_json(after)))
    return out


def _revert_changes(conn, effects: Sequence[Effect]) -> list[Delivery]:
    """Compensation: the change made under ``payload.effect_key`` is undone (a created contact is
    removed, an updated one gets its earlier fields back). Idempotent; nothing changed, nothing to undo."""
    out = []
    for e in effects:
        if (done := _seen(conn, e)) is not None:
            out.append(done)
            continue
        ch = conn.execute(sa.select(crm_contact_changes).where(
            crm_contact_changes.c.idempotency_key == e.payload.get("effect_key"))).mappings().first()
        if ch is None:
            out.append(Delivery(e.idempotency_key, True, "crm_contacts:none:revert"))
            continue
        cid = ch["contact_id"]
        now_row = conn.execute(sa.select(crm_contacts).where(crm_contacts.c.contact_id == cid)).mappings().first()
        others = conn.execute(sa.select(sa.func.count()).select_from(crm_contact_changes).where(
            crm_contact_changes.c.contact_id == cid, crm_contact_changes.c.id > ch["id"],
            crm_contact_changes.c.action != "revert_change")).scalar_one()
        if ch["before"] is None and others:
            # other records were written to the contact since it was created: it stays (theirs), as it is now
            out.append(_change(conn, e, cid, "revert_change", _contact_json(now_row), _contact_json(now_row)))
            continue
        if ch["before"] is None:
            conn.execute(crm_contacts.delete().where(crm_contacts.c.contact_id == cid))
        else:
            restored = dict(ch["before"])
            for k in CONSENT_FIELDS:  # consent given since is kept: an undo never re-opens a channel
                restored[k] = bool(restored.get(k)) or bool(now_row[k] if now_row is not None else False)
            conn.execute(crm_contacts.update().where(crm_contacts.c.contact_id == cid).values(
                updated_at=utcnow(), **restored))
        out.append(_change(conn, e, cid, "revert_change", _contact_json(now_row), ch["before"]))
    return out


def _list_contacts(conn, since: Any = None) -> list[dict[str, Any]]:
    q = sa.select(crm_contacts).order_by(crm_contacts.c.contact_id)
    if since is not None:
        q = q.where(crm_contacts.c.updated_at > since)
    return [dict(r) for r in conn.execute(q).mappings()]


def _get_contacts(conn, contact_ids: Sequence[str]) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for chunk in chunked(list(contact_ids), 900):
        out.update({r["contact_id"]: dict(r) for r in conn.execute(
            sa.select(crm_contacts).where(crm_contacts.c.contact_id.in_(chunk))).mappings()})
    return out


def import_contacts(db: Database, rows: Sequence[Mapping[str, Any]]) -> int:
    """Load contacts the CRM already has (an import from the company's existing CRM); a contact id that is
    already there is kept as it is. Returns the number added."""
    now = utcnow()
    full = [{**{k: None for k in CONTACT_FIELDS}, "do_not_email": False, "do_not_call": False,
             "unsubscribed": False, "created_at": now, "updated_at": now, **dict(r)} for r in rows]
    with db.begin() as conn:
        before = conn.execute(sa.select(sa.func.count()).select_from(crm_contacts)).scalar_one()
        db.insert_ignore(conn, crm_contacts, full, ["contact_id"])
        return conn.execute(sa.select(sa.func.count()).select_from(crm_contacts)).scalar_one() - before


register_system(System(
    "crm_contacts", crm_contact_changes, lambda e, now: {},
    handlers={"upsert_contact": _upsert_contacts, "set_stage": _set_stage, "revert_change": _revert_changes},
    same_record=("item_id", "action"),
    counts_as_duplicate=lambda t: t.c.action == "upsert_contact",
    readers={"contacts": _list_contacts, "get": _get_contacts}))


# --- what comes back through messaging: replies, bounces, unsubscribes ------------------------------

inbound_events = sa.Table(
    "inbound_events", cmeta,
    sa.Column("id", sa.Integer, primary_key=True, autoincrement=True),
    sa.Column("external_id", sa.String(255), nullable=False, unique=True),
    sa.Column("kind", sa.String(32), nullable=False, doc="reply | bounce | unsubscribe"),
    sa.Column("recipient", sa.String(128), nullable=False, doc="the vault token or channel a message went to"),
    sa.Column("in_reply_to", sa.String(512), doc="idempotency key of the message answered"),
    sa.Column("body", sa.Text, doc="masked text of a reply"),
    sa.Column("received_at", TS, nullable=False),
)


class EmbeddedConnectors:
    """Every registered system over one database; ``deliver`` routes by connector (system) name."""

    def __init__(self, url: str):
        self.url = url
        self.db = Database(url, auto_migrate=False)
        cmeta.create_all(make_engine(url))
        self._tables_created = len(cmeta.tables)

    def _ensure_tables(self) -> None:
        """The tables of systems registered after start-up, created once (not on every read or delivery)."""
        if len(cmeta.tables) != self._tables_created:
            cmeta.create_all(self.db.engine)
            self._tables_created = len(cmeta.tables)

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

    def read(self, connector: str, reader: str, *args: Any) -> Any:
        """A read from a system (``System.readers``): fails like a delivery while the system is down."""
        system = self._system(connector)
        if reader not in system.readers:
            raise ValueError(f"system {connector!r} has no reader {reader!r}; readers: {', '.join(system.readers)}")
        self._ensure_tables()
        self._check_fault(connector)
        with self.db.begin() as conn:
            return system.readers[reader](conn, *args)

    # -- replies, bounces and unsubscribes arrive through the messaging system ---------------
    def record_inbound(self, events: Sequence[dict[str, Any]]) -> int:
        """Inbound messaging events (``external_id`` makes a re-delivered event a no-op); returns the number added."""
        with self.db.begin() as conn:
            before = conn.execute(sa.select(sa.func.count()).select_from(inbound_events)).scalar_one()
            self.db.insert_ignore(conn, inbound_events, list(events), ["external_id"])
            return conn.execute(sa.select(sa.func.count()).select_from(inbound_events)).scalar_one() - before

    def inbound_since(self, after_id: int, recipients: Sequence[str] | None = None) -> list[dict[str, Any]]:
        """Inbound events after ``after_id`` (optionally only to ``recipients``), oldest first."""
        self._check_fault("messaging")
        q = sa.select(inbound_events).where(inbound_events.c.id > after_id).order_by(inbound_events.c.id)
        with self.db.begin() as conn:
            if recipients is None:
                return [dict(r) for r in conn.execute(q).mappings()]
            out = []
            for chunk in chunked(list(recipients), 900):
                out += [dict(r) for r in conn.execute(q.where(inbound_events.c.recipient.in_(chunk))).mappings()]
        return sorted(out, key=lambda r: r["id"])

    def deliver(self, connector: str, effects: Sequence[Effect]) -> list[Delivery]:
        system = self._system(connector)
        if system.table is None:
            raise ValueError(f"system {connector!r} is read-only; nothing can be delivered to it")
        self._ensure_tables()
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

    def counts(self, flow: str | None = None, kinds: Sequence[str] | None = None) -> dict[str, int]:
        """Records of the platform's systems; ``flow``: only the ones that flow's effects wrote (the flow
        is the first part of the idempotency key); ``kinds``: only messages of those kinds (e.g. without
        the platform's SLA alerts)."""
        out = {}
        with self.db.begin() as conn:
            for name, t in (("tickets", tickets), ("crm_activities", crm_activities), ("messages", messages),
                            ("survey_responses", survey_responses)):
                q = sa.select(sa.func.count()).select_from(t)
                if flow is not None and "idempotency_key" in t.c:
                    q = q.where(t.c.idempotency_key.like(f"{flow}:%"))
                if kinds is not None and t is messages:
                    q = q.where(messages.c.kind.in_(list(kinds)))
                out[name] = conn.execute(q).scalar_one()
        return out

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
                if t is None:
                    continue
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
