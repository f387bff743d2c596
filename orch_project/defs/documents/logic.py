"""The document workflow (accounts payable) as plain functions, one per stage. The flow spec (flow.py)
orders them and the kit builds their Dagster assets; ``orch documents extract`` and
benchmarks/documents.py call the same reading, extraction and validation functions without Dagster.

intake (read the file: PDF text layer, OCR of images, OCR line files, text; mask personal data; the file
hash is the item id, so a re-submitted file is a duplicate) -> extract (model task ``documents_extract``
through the gateway: the embedded layout extractor, or an OpenAI-compatible model with structured output)
-> validate (named rules, validation.py) -> review gate (a failed rule, a low confidence or an amount
above the brief's threshold waits for a person; above the threshold a second person signs off) ->
post (AP bill to the accounting connector and a notification to the submitter, through the outbox,
exactly once; a bill that cannot be completed is voided) ; ops: redelivery, labelled examples from
reviewers' corrections, KPI report (reporting.py).
"""

from __future__ import annotations

import json
import time
from collections import Counter
from collections.abc import Sequence
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal
from functools import cached_property
from pathlib import Path
from typing import Any

import sqlalchemy as sa
from pydantic import BaseModel, ConfigDict, Field, field_validator

from ...lib import docread
from ...lib.connectors.embedded import Effect, System, base_row, system_table, void_by_effect_key
from ...lib.contracts import EMAIL_RE, LLMStepRequest
from ...lib.flows import FlowConfig
from ...lib.guardrails import pii
from ...lib.intake import Accepted, IntakeContext, Parsed, Rejected
from ...lib.llm.gateway import ProviderResult, estimate_tokens
from ...lib.outbox import dispatch
from ...lib.pipeline import (ItemUpdate, StageEnv, StageReport, commit_stage, dead_letter, load_stage_items,
                             model_step_failed, without_deferred)
from ...lib.saga import run_effects_stage, step_key
from ...lib.store import Database, items, utcnow
from . import validation as v
from .schema import AMOUNT_FIELDS, FIELDS, ExtractionOutput

FLOW = "documents"
FOLDER = Path(__file__).parent
FIRST_DAY = date(2026, 1, 1)
TASK = "documents_extract"
STEP_LOGIC_VERSION = {"extract": "extract-v1", "validate": "validate-v1"}


class DocumentSettings(BaseModel):
    """The flow's own knobs (brief.yaml ``settings``)."""

    model_config = ConfigDict(extra="forbid")
    default_currency: str | None = None
    max_age_days: int = Field(365, ge=1)
    future_tolerance_days: int = Field(1, ge=0)
    amount_tolerance: Decimal = Decimal("0.05")
    second_approval_over: Decimal = Decimal("5000.00")  # in any currency without its own threshold below
    second_approval_over_by_currency: dict[str, Decimal] = Field(default_factory=dict)
    second_approval_role: str = "supervisor"
    required_fields: list[str] = Field(default_factory=lambda: ["vendor", "date", "total", "currency"])
    min_confidence: dict[str, float] = Field(default_factory=dict)
    mask_entities: list[str] = Field(default_factory=lambda: ["EMAIL_ADDRESS", "CREDIT_CARD", "IBAN_CODE",
                                                              "US_SSN", "IP_ADDRESS"])
    max_file_mib: float = Field(10, gt=0)
    max_pages: int = Field(20, ge=1)
    # folders a registration in the inbox table may name (relative: to the flow's folder); the inbox root
    # (ORCH_INBOX_DIR) and the roots in ORCH_DOCUMENT_ROOTS (os.pathsep-separated) are allowed too
    registration_roots: list[str] = Field(default_factory=list)

    @field_validator("second_approval_role")
    @classmethod
    def _role(cls, role: str) -> str:
        from ...lib.approvals import ROLE_ORDER

        if role not in ROLE_ORDER:
            raise ValueError(f"second_approval_role {role!r} is not a role ({', '.join(ROLE_ORDER)})")
        return role

    @field_validator("required_fields")
    @classmethod
    def _known(cls, fields: list[str]) -> list[str]:
        if bad := [f for f in fields if f not in FIELDS]:
            raise ValueError(f"unknown fields {bad}; fields are {', '.join(FIELDS)}")
        return fields


class DocumentsConfig(FlowConfig):
    settings_model = DocumentSettings

    @cached_property
    def rules(self) -> v.Rules:
        s = self.settings
        return v.Rules(required_fields=tuple(s.required_fields), min_confidence=dict(s.min_confidence),
                       amount_tolerance=s.amount_tolerance, max_age_days=s.max_age_days,
                       future_tolerance_days=s.future_tolerance_days)


CFG = DocumentsConfig(FOLDER)


# --- intake: read the document, mask personal data --------------------------------------------

def read_file(path: Path, settings: DocumentSettings | None = None) -> docread.DocumentText:
    """A document file read into lines (size checked before the file is read); raises DocumentError."""
    settings = settings or CFG.settings
    limit = int(settings.max_file_mib * 1024 * 1024)
    try:
        size = path.stat().st_size
        if size > limit:
            raise docread.DocumentError("too_large", f"file is {size / 1048576:.1f} MiB, above the "
                                                     f"{settings.max_file_mib:g} MiB limit; split or compress it")
        with path.open("rb") as fh:  # bounded: a special file may report size 0 and never end
            data = fh.read(limit + 1)
    except OSError as exc:
        raise docread.DocumentError("unreadable", f"cannot read the file: {exc.strerror}") from None
    return docread.read_document(path.name, data, max_bytes=limit, max_pages=settings.max_pages)


def parse_file(path: Path) -> Parsed:
    """The intake's reader for the flow's inbox folder: a document file becomes a raw record with its
    lines, or a Parsed error the dead-letter queue gets with the reader's reason."""
    key = f"file:{path.name}"
    try:
        arrival = datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc)
    except OSError as exc:
        return Parsed(key, utcnow(), error=f"cannot stat file: {exc.strerror}", error_type="unreadable")
    try:
        doc = read_file(path)
    except docread.DocumentError as exc:
        return Parsed(key, arrival, error=f"{path.name}: {exc.reason}", error_type=exc.kind)
    return Parsed(key, arrival, raw={"name": path.name, "received_at": arrival.isoformat(), "document": doc,
                                     "source": f"inbox://{FLOW}/{path.name}"})


def peek_file(path: Path) -> Parsed:
    """What the intake sensor needs of a document: its source key and its day (the file's arrival), without
    reading it (OCR of an image takes about a second)."""
    try:
        arrival = datetime.fromtimestamp(path.stat().st_mtime, tz=timezone.utc)
    except OSError:
        arrival = utcnow()
    return Parsed(f"file:{path.name}", arrival, raw={"received_at": arrival.isoformat()})


class DocumentRegistration(BaseModel):
    """A row of the flow's inbox table: a document registered by its path (e.g. by a mail gateway that
    saved the attachment), with who sent it."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)
    path: str = Field(min_length=1, max_length=4096)
    id: str | None = Field(None, max_length=255)
    received_at: datetime | None = None
    submitter_email: str | None = Field(None, max_length=320)
    submitter_name: str | None = Field(None, max_length=200)

    @field_validator("submitter_email")
    @classmethod
    def _email(cls, value: str | None) -> str | None:
        if value and not EMAIL_RE.match(value):
            raise ValueError("not a valid e-mail address")
        return value or None


def registration_roots(settings: DocumentSettings) -> list[Path]:
    import os

    from ...lib.settings import Settings

    roots = [Settings.from_env().inbox_dir]
    roots += [FOLDER / r if not Path(r).is_absolute() else Path(r) for r in settings.registration_roots]
    roots += [Path(r) for r in os.environ.get("ORCH_DOCUMENT_ROOTS", "").split(os.pathsep) if r.strip()]
    return [r.expanduser().resolve() for r in roots]


def allowed_path(raw: str, settings: DocumentSettings) -> Path:
    """The registered file, if it lies (after resolving links) under a folder registrations may name;
    otherwise one refusal that says where files may be, not whether this one exists."""
    roots = registration_roots(settings)
    try:
        path = Path(raw).expanduser().resolve(strict=True)
    except (OSError, RuntimeError):
        path = None
    if path is None or not any(path.is_relative_to(r) for r in roots) or not path.is_file():
        raise Rejected("forbidden", "the registered path is not a readable file under a folder registrations may "
                                    "name (the inbox root, the brief's registration_roots, ORCH_DOCUMENT_ROOTS); "
                                    "copy the document there or add its folder, then register it again")
    return path


def to_item(raw: dict[str, Any], ctx: IntakeContext) -> Accepted:
    """One document as an item: its id from the file hash (a re-submitted file is a duplicate), its
    lines with boxes, personal data masked per the brief (the submitter's name and address go to the
    vault only)."""
    settings = CFG.settings
    submitter_email = submitter_name = None
    doc = raw.get("document")
    if doc is None:  # a registration from the inbox table: read the file it names
        reg = DocumentRegistration.model_validate(raw)
        path = allowed_path(reg.path, settings)
        try:
            doc = read_file(path, settings)
        except docread.DocumentError as exc:
            raise Rejected(exc.kind, f"{path.name}: {exc.reason}") from None
        submitter_email, submitter_name = reg.submitter_email, reg.submitter_name
        received = reg.received_at or ctx.now
        if received.tzinfo is None:
            received = received.replace(tzinfo=timezone.utc)
        raw = {"name": path.name, "received_at": min(received, ctx.now).isoformat(),  # never in the future
               "source": f"file://{path}"}
    item_id = f"doc-{doc.sha256[:20]}"
    lines, counts = masked_lines(doc.lines, [submitter_name] if submitter_name else [], settings)
    received = raw.get("received_at")
    received_at = datetime.fromisoformat(received) if isinstance(received, str) else received
    shown_name = pii.mask(raw["name"], [submitter_name] if submitter_name else [], tuple(settings.mask_entities)).text
    data = {"name": shown_name, "format": doc.format, "pages": doc.pages, "sha256": doc.sha256,
            "received_on": (received_at or ctx.now).date().isoformat(),
            "size_bytes": doc.size_bytes, "document_link": raw.get("source"), "lines": lines,
            "submitter_token": ctx.vault(item_id, "EMAIL_ADDRESS", submitter_email) if submitter_email else None}
    return Accepted(item_id=item_id, data=data, received_at=received_at, channel=doc.format, pii=counts)


def masked_lines(lines: Sequence[docread.Line], names: Sequence[str], settings: DocumentSettings | None = None
                 ) -> tuple[list[dict[str, Any]], Counter]:
    """The document's lines as the flow keeps them, with the brief's personal-data entities masked. The
    text is analysed in one pass (one Presidio call per document) and split back into its lines."""
    entities = tuple((settings or CFG.settings).mask_entities)
    joined = "\n".join(line.text for line in lines)
    m = pii.mask(joined, list(names), entities)
    texts = m.text.split("\n")
    counts = m.counts
    if len(texts) != len(lines):  # a span across a line break: mask line by line instead
        counts, texts = Counter(), []
        for line in lines:
            one = pii.mask(line.text, list(names), entities)
            counts += one.counts
            texts.append(one.text)
    return [{**line.as_dict(), "text": t} for line, t in zip(lines, texts)], counts


def document_text(lines: Sequence[dict[str, Any]]) -> str:
    return "\n".join(str(line["text"]) for line in lines)


def numbered_text(lines: Sequence[dict[str, Any]]) -> str:
    """The document as the model sees it: ``[n] text`` per line in reading order (n = line index, the
    provenance a model answers with)."""
    return "\n".join(f"[{line['index']}] {line['text']}" for line in lines)


# --- extract: the model task --------------------------------------------------------------------

class LayoutExtractTask:
    """The embedded provider's handler for ``documents_extract``: the layout extractor (extract.py) over
    the document's lines, deterministic and offline."""

    def __init__(self):
        from .extract import EXTRACTOR_VERSION

        self.model = f"documents-{EXTRACTOR_VERSION}"

    def run(self, requests: Sequence[LLMStepRequest], prompt_vars) -> list[ProviderResult]:
        from .extract import extract

        out = []
        for r in requests:
            t0 = time.perf_counter()
            try:
                lines = [docread.Line.from_dict(d) for d in r.inputs.context.get("lines") or []]
                # the brief's default currency comes with the request (extract_stage puts it in the context)
                result = extract(lines, default_currency=r.inputs.context.get("default_currency") or None)
            except Exception as exc:  # one document the extractor cannot handle must not stop the batch
                out.append(ProviderResult(None, error="provider_error",
                                          reason=f"the layout extractor failed on this document ({type(exc).__name__})"))
                continue
            payload = {**result.model_dump(mode="json"), "model_version": self.model}
            out.append(ProviderResult(payload, estimate_tokens(r.inputs.text), estimate_tokens(json.dumps(payload)),
                                      (time.perf_counter() - t0) * 1000.0))
        return out


def extract_local_task(db) -> LayoutExtractTask:
    return LayoutExtractTask()


def provenance(line_ids: Sequence[int], lines_by_index: dict[int, dict[str, Any]]) -> list[dict[str, Any]]:
    return [{"page": lines_by_index[i]["page"], "line": i, "box": [round(float(b), 1) for b in lines_by_index[i]["box"]]}
            for i in line_ids if i in lines_by_index]


def fields_from_output(out: ExtractionOutput, lines: Sequence[dict[str, Any]]) -> tuple[dict, list]:
    """The extraction as the item keeps it: every field with value, confidence and provenance (page,
    line, box); amounts normalised to two decimals, the currency upper-case."""
    by_index = {int(line["index"]): line for line in lines}
    fields: dict[str, Any] = {}
    for name in FIELDS:
        fv = getattr(out, name)
        value = fv.value.strip() if isinstance(fv.value, str) else fv.value
        if name in AMOUNT_FIELDS and value is not None:
            d = v.amount(value)
            value = f"{d.quantize(Decimal('0.01'))}" if d is not None else value
        if name == "currency" and value:
            value = value.upper()
        raw_value = None
        if value and ((name == "date" and v.iso_date(value) is None) or
                      (name == "currency" and value not in v.ISO_4217) or
                      (name in AMOUNT_FIELDS and v.amount(value) is None)):
            raw_value, value = value, None  # a model's answer outside the contract: kept, not used
        fields[name] = {"value": value or None, "confidence": round(float(fv.confidence), 4) if value else 0.0,
                        "provenance": provenance(fv.lines, by_index)}
        if raw_value is not None:
            fields[name]["unparsed"] = str(raw_value)[:200]
    line_items = [{"description": li.description, "quantity": li.quantity, "unit_price": li.unit_price,
                   "amount": li.amount, "confidence": round(float(li.confidence), 4),
                   "provenance": provenance(li.lines, by_index)} for li in out.line_items]
    return fields, line_items


def extract_stage(env: StageEnv, cfg: DocumentsConfig, gateway) -> StageReport:
    """Fields of each document through the gateway (model task ``documents_extract``): the masked lines
    go out numbered, each field comes back with a confidence and the lines it was read from."""
    started = utcnow()
    rows = load_stage_items(env, "extract")
    reqs = [LLMStepRequest(id=r["item_id"], inputs={
        "text": numbered_text(r["data"]["lines"]),
        "context": {"lines": r["data"]["lines"], "format": r["data"]["format"],
                    "default_currency": cfg.settings.default_currency or ""}}) for r in rows]
    responses, stats = gateway.run(TASK, reqs, ExtractionOutput) if reqs else ([], None)
    updates = []
    for row, resp in zip(rows, responses):
        if not resp.ok:
            updates.append(model_step_failed(row, "extract", resp, label="extraction"))
            continue
        fields, line_items = fields_from_output(resp.output, row["data"]["lines"])
        data = without_deferred(row["data"])
        data.update({"fields": fields, "line_items": line_items,
                     "extractor": (resp.output.model_extra or {}).get("model_version")})
        updates.append(ItemUpdate(row["item_id"], "extracted", data))
    md = stats.as_metadata("extract") if stats else {}
    found = Counter(f for u in updates if u.outcome == "ok" for f, fv in u.data["fields"].items() if fv["value"])
    md["fields_found"] = {f: found.get(f, 0) for f in FIELDS}
    return commit_stage(env, "extract", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                        metadata=md)


# --- validate -----------------------------------------------------------------------------------

def duplicate_index(db: Database, flow: str = FLOW, exclude: Sequence[str] = (),
                    statuses: Sequence[str] | None = None) -> v.DuplicateIndex:
    """The duplicate keys of every document of the flow that is extracted and still counts (not
    dead-lettered or rejected; or only those at ``statuses``), except ``exclude``."""
    skip = set(exclude)
    index = v.DuplicateIndex()
    which = (items.c.status.in_(tuple(statuses)) if statuses is not None
             else items.c.status.notin_(("dead_lettered", "rejected", "received", "deferred")))
    q = (sa.select(items.c.item_id, items.c.data).where(items.c.flow == flow, which)
         .order_by(items.c.received_at, items.c.item_id))
    with db.begin() as conn:
        for item_id, data in conn.execute(q):
            if item_id not in skip and data.get("fields"):
                index.add(item_id, data.get("sha256"), data["fields"])
    return index


def validate_document(item_id: str, data: dict[str, Any], cfg: DocumentsConfig, received: date,
                      index: v.DuplicateIndex) -> list[v.Check]:
    return v.validate(item_id, data["fields"], data.get("line_items") or [], text=document_text(data["lines"]),
                      sha256=data.get("sha256"), received=received, rules=cfg.rules, duplicates=index)


def validate_stage(env: StageEnv, cfg: DocumentsConfig) -> StageReport:
    """Every rule on every extracted document (validation.py); the failures and their reasons are what a
    reviewer sees. Documents of the same batch are checked against each other in arrival order."""
    started = utcnow()
    rows = sorted(load_stage_items(env, "validate"), key=lambda r: (r["received_at"] or r["ingested_at"], r["item_id"]))
    index = duplicate_index(env.db, env.flow, exclude=[r["item_id"] for r in rows])
    updates = []
    for r in rows:
        received = (r["received_at"] or r["ingested_at"]).date()
        checks = validate_document(r["item_id"], r["data"], cfg, received, index)
        index.add(r["item_id"], r["data"].get("sha256"), r["data"]["fields"])
        failed = [c for c in checks if not c.ok]
        updates.append(ItemUpdate(r["item_id"], "validated", {
            **r["data"], "validation": [c.as_dict() for c in checks], "needs_review": bool(failed),
            "failed_rules": [c.rule for c in failed]}))
    fails = Counter(rule for u in updates for rule in u.data["failed_rules"])
    md = {"passed_all_rules": sum(1 for u in updates if not u.data["needs_review"]),
          "failed_by_rule": {rule: fails.get(rule, 0) for rule in v.RULES},
          "duplicates_caught": fails.get("duplicate", 0)}
    return commit_stage(env, "validate", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                        metadata=md)


# --- review gate ----------------------------------------------------------------------------------

def total_amount(data: dict[str, Any]) -> Decimal | None:
    return v.amount(((data.get("fields") or {}).get("total") or {}).get("value"))


def second_role(data: dict[str, Any]) -> str | None:
    """Four eyes: a document above the brief's amount needs a second approver with this role."""
    total = total_amount(data)
    s = CFG.settings
    currency = str(((data.get("fields") or {}).get("currency") or {}).get("value") or "").upper()
    limit = s.second_approval_over_by_currency.get(currency, s.second_approval_over)
    return s.second_approval_role if total is not None and total > limit else None


def review_reasons(data: dict[str, Any]) -> list[str]:
    reasons = list(data.get("failed_rules") or [])
    if second_role(data):
        reasons.append("amount_over_threshold")
    return reasons


def review_gate_stage(env: StageEnv, cfg: DocumentsConfig) -> StageReport:
    """A document that failed a rule, was read with low confidence or is above the brief's amount waits
    for a person in the approvals queue with the failing fields and reasons; the rest is approved by
    policy. Either way the decision is audited."""
    started = utcnow()
    rows = load_stage_items(env, "review_gate")
    now = utcnow()
    pol = cfg.brief.approval
    updates, approval_rows, audit_rows = [], [], []
    for r in rows:
        reasons = review_reasons(r["data"])
        total = total_amount(r["data"])
        if reasons:
            high = "amount_over_threshold" in reasons
            due = (r["received_at"] or r["ingested_at"]) + timedelta(hours=cfg.brief.sla_hours["high" if high else "medium"])
            updates.append(ItemUpdate(r["item_id"], "awaiting_review", {**r["data"], "approval_reasons": reasons},
                                      "routed", columns={"due_at": due}))
            approval_rows.append({"flow": env.flow, "item_id": r["item_id"], "reason": reasons[0],
                                  "required_role": pol.reviewer_role, "status": "pending", "due_at": due,
                                  "created_at": now, "edited": False})
            action = "approval_requested"
        else:
            due = (r["received_at"] or r["ingested_at"]) + timedelta(hours=cfg.brief.sla_hours["low"])
            updates.append(ItemUpdate(r["item_id"], "approved", r["data"], columns={"due_at": due}))
            action = "auto_approved"
        audit_rows.append({"actor": "system:review_gate", "action": action, "flow": env.flow, "item_id": r["item_id"],
                           "trace_id": r["trace_id"], "reason": ",".join(reasons) or "every rule passed",
                           "inputs": {"failed_rules": r["data"].get("failed_rules"),
                                      "total": str(total) if total is not None else None}})
    md = {"awaiting_review": len(approval_rows), "straight_through": len(rows) - len(approval_rows),
          "review_reasons": dict(Counter(x for u in updates for x in u.data.get("approval_reasons", [])))}
    return commit_stage(env, "review_gate", started, updates, trace_ids={r["item_id"]: r["trace_id"] for r in rows},
                        approval_rows=approval_rows, audit_rows=audit_rows, metadata=md)


def parse_corrections(text: str) -> dict[str, Any]:
    """A reviewer's correction file: a YAML (or JSON) mapping of field -> corrected value, and
    optionally ``line_items`` -> the corrected list. Unknown fields are refused."""
    import yaml

    try:  # BaseLoader: every value stays the string the reviewer typed (no 0123 -> 83, yes -> True)
        obj = yaml.load(text, Loader=yaml.BaseLoader)
    except yaml.YAMLError as exc:
        raise ValueError(f"the correction file is not YAML/JSON ({type(exc).__name__}); write `field: value` lines")
    if not isinstance(obj, dict) or not obj:
        raise ValueError("the correction file must be a mapping of field: corrected value, e.g. `total: \"12.50\"`")
    if unknown := sorted(set(obj) - set(FIELDS) - {"line_items"}):
        raise ValueError(f"unknown field(s) {unknown}; fields are {', '.join(FIELDS)}, line_items")
    out: dict[str, Any] = {}
    for f, val in obj.items():
        if f == "line_items":
            if not isinstance(val, list) or not all(isinstance(x, dict) and x.get("description") for x in val):
                raise ValueError("line_items must be a list of {description, quantity, unit_price, amount}")
            items_out = []
            for n, x in enumerate(val, 1):
                row = {k: (str(x.get(k)).strip() if x.get(k) is not None else None)
                       for k in ("description", "quantity", "unit_price", "amount")}
                for k in ("quantity", "unit_price", "amount"):
                    if row[k] is not None and v.amount(row[k]) is None:
                        raise ValueError(f"line_items {n} {k}: {row[k]!r} is not a number")
                items_out.append(row)
            out[f] = items_out
            continue
        val = None if val is None or str(val).strip().lower() in ("", "null", "~") else str(val).strip()
        if f in AMOUNT_FIELDS and val is not None:
            d = v.amount(val)
            if d is None:
                raise ValueError(f"{f}: {val!r} is not an amount")
            val = f"{d.quantize(Decimal('0.01'))}"
        if f == "date" and val is not None:
            if v.iso_date(val) is None:
                raise ValueError(f"date: {val!r} is not an ISO date (YYYY-MM-DD)")
        if f == "currency" and val is not None:
            val = val.upper()
            if val not in v.ISO_4217:
                raise ValueError(f"currency: {val!r} is not an ISO 4217 code")
        out[f] = val
    return out


# rules a correction must leave passing: the document's own consistency (a reviewer may still approve an
# old date, an id without a valid checksum or a low confidence: that is the judgement asked of them)
MUST_HOLD_AFTER_CORRECTION = ("schema", "line_arithmetic", "subtotal_matches_lines", "total_matches_subtotal_tax",
                              "currency_consistent")


def apply_corrections(data: dict[str, Any], text: str, reviewer: str, at: str) -> tuple[dict[str, Any], Any]:
    """A reviewer's field corrections (``orch approve ID --edit-file F``): the corrected fields replace
    the extracted ones (confidence 1, source ``reviewer``; personal data in them masked), the extracted
    values are kept beside them as the labelled example, and the rules run again on the corrected
    document: a correction that leaves the document inconsistent (schema, arithmetic, currency) is refused."""
    corrections = parse_corrections(text)
    entities = tuple(CFG.settings.mask_entities)

    def mask(value):
        return pii.mask(value, (), entities).text if value else value

    fields = {k: dict(fv) for k, fv in data["fields"].items()}
    earlier = dict(data.get("corrections") or {})
    changes: dict[str, Any] = {}
    for f, val in corrections.items():
        if f == "line_items":
            val = [{**li, "description": mask(li["description"])} for li in val]
            corrections[f] = val
            changes[f] = {"extracted": (earlier.get(f) or {}).get("extracted", data.get("line_items")), "corrected": val}
            continue
        masked = mask(val)
        if masked != fields[f].get("value") or f in earlier:
            # the extracted value stays the model's, whatever a first correction said
            changes[f] = {"extracted": (earlier[f]["extracted"] if f in earlier else fields[f].get("value")),
                          "corrected": masked}
        fields[f] = {**{k: x for k, x in fields[f].items() if k != "unparsed"}, "value": masked, "confidence": 1.0,
                     "source": "reviewer"}
    new = {**data, "fields": fields, "corrections": {**earlier, **changes}, "corrected_by": reviewer, "corrected_at": at}
    if "line_items" in corrections:
        new["line_items"] = [{**li, "confidence": 1.0, "provenance": []} for li in corrections["line_items"]]
    received = v.iso_date(data.get("received_on")) or date.fromisoformat(at[:10])
    checks = v.validate(f"{data.get('sha256')}", new["fields"], new.get("line_items") or [],
                        text=document_text(data["lines"]), sha256=None, received=received, rules=CFG.rules,
                        duplicates=v.DuplicateIndex())
    broken = [c for c in checks if not c.ok and c.rule in MUST_HOLD_AFTER_CORRECTION]
    if broken:
        raise ValueError("after the correction the document still fails " +
                         "; ".join(f"{c.rule}: {c.reason}" for c in broken) + " (correct the other fields too)")
    new["review_validation"] = [c.as_dict() for c in checks if c.rule != "duplicate"]
    return new, {f: c["extracted"] for f, c in changes.items()}


# --- post: AP bill and notification, exactly once ---------------------------------------------

ap_bills = system_table(
    "ap_bills",
    sa.Column("vendor", sa.Text),
    sa.Column("vendor_tax_id", sa.String(64)),
    sa.Column("number", sa.String(128)),
    sa.Column("doc_date", sa.String(10)),
    sa.Column("currency", sa.String(3)),
    sa.Column("subtotal", sa.String(32)),
    sa.Column("tax", sa.String(32)),
    sa.Column("total", sa.String(32)),
    sa.Column("lines", sa.JSON),
    sa.Column("document_link", sa.Text),
    sa.Column("document_sha256", sa.String(64)),
    sa.Column("status", sa.String(16), nullable=False, doc="posted | void"),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)


def _bill_row(e: Effect, now) -> dict[str, Any]:
    p = e.payload
    return {**base_row(e), "vendor": p.get("vendor"), "vendor_tax_id": p.get("tax_id"), "number": p.get("number"),
            "doc_date": p.get("date"), "currency": p.get("currency"), "subtotal": p.get("subtotal"),
            "tax": p.get("tax"), "total": p.get("total"), "lines": p.get("lines") or [],
            "document_link": p.get("document_link"), "document_sha256": p.get("sha256"), "status": "posted",
            "created_at": now}


# compensation: the bill posted under the failed posting's key is voided
ACCOUNTING = System("accounting", ap_bills, _bill_row,
                    handlers={"void_bill": void_by_effect_key(ap_bills, "accounting", "void")},
                    counts_as_duplicate=lambda t: t.c.status != "void")

payment_runs = system_table(
    "payment_runs",
    sa.Column("vendor", sa.Text),
    sa.Column("currency", sa.String(3)),
    sa.Column("amount", sa.String(32)),
    sa.Column("due_on", sa.String(10)),
    sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
)
# the bank's payment scheduling: the second half of posting a bill (a bill that cannot be scheduled is voided)
PAYMENTS = System("payments", payment_runs, lambda e, now: {
    **base_row(e), "vendor": e.payload.get("vendor"), "currency": e.payload.get("currency"), "amount": e.payload.get("amount"),
    "due_on": e.payload.get("due_on"), "created_at": now})
POST_STEPS = ("bill", "payment")
COMPENSATIONS = {"bill": ("accounting", "void_bill")}
EFFECTS = frozenset({("accounting", "post_bill"), ("accounting", "void_bill"), ("payments", "schedule_payment"),
                     ("messaging", "send_notification")})
PAYMENT_TERMS_DAYS = 30


def _post_effects(row: dict[str, Any]) -> dict[str, Effect]:
    d, iid, tr = row["data"], row["item_id"], row["trace_id"]
    f = {k: (d["fields"].get(k) or {}).get("value") for k in FIELDS}
    keys = {s: step_key(FLOW, row, s) for s in POST_STEPS}
    due = v.iso_date(f["date"]) or v.iso_date(d.get("received_on")) or utcnow().date()
    return {
        "bill": Effect(keys["bill"], "accounting", "post_bill", iid, tr, {
            **{k: f[k] for k in ("vendor", "tax_id", "number", "date", "currency", "subtotal", "tax", "total")},
            "lines": d.get("line_items") or [], "document_link": d.get("document_link"), "sha256": d.get("sha256")}),
        "payment": Effect(keys["payment"], "payments", "schedule_payment", iid, tr, {
            "vendor": f["vendor"], "currency": f["currency"], "amount": f["total"],
            "due_on": (due + timedelta(days=PAYMENT_TERMS_DAYS)).isoformat()}),
    }


def _notify_effect(row: dict[str, Any]) -> dict[str, Effect]:
    d = row["data"]
    f = {k: (d["fields"].get(k) or {}).get("value") for k in FIELDS}
    summary = " ".join(str(x) for x in (f["vendor"], f["number"], f["date"], f["currency"], f["total"]) if x)
    return {"notify": Effect(step_key(FLOW, row, "notify"), "messaging", "send_notification", row["item_id"],
                             row["trace_id"], {
                                 "kind": "notification",
                                 "recipient": d.get("submitter_token") or f"channel:{FLOW}:ap-inbox",
                                 "subject": f"Posted: document {row['item_id']}",
                                 "body": f"Your document {row['item_id']} was posted to accounts payable as a bill "
                                         f"({summary}); payment is scheduled."})}


def _posted_elsewhere(env: StageEnv, rows: list[dict[str, Any]]) -> dict[str, str]:
    """Documents about to post whose vendor + number (or file) is already posted by another document: the
    last guard against paying a bill twice (a reviewer's correction may have made a document a copy)."""
    if not rows:  # the redelivery's waiting rows were checked before they were planned
        return {}
    index = duplicate_index(env.db, env.flow, statuses=("posted", "resolved"))
    out = {}
    for r in rows:
        hits = [(k, o) for k, o in index.find(r["item_id"], r["data"].get("sha256"), r["data"]["fields"])
                if k != "vendor+date+total"]
        if hits:
            out[r["item_id"]] = f"same {hits[0][0].replace('+', ' + ')} as posted document {hits[0][1]}"
    return out


def post_stage(env: StageEnv, cfg: DocumentsConfig, connectors, *, waiting_only: bool = False) -> StageReport:
    """The AP bill and its payment run through the outbox (the kit's saga): both delivered -> ``posted``;
    undelivered -> the document waits (redelivered by the ops job); a step failed for good -> the bill is
    voided and the document dead-lettered, replayable. A document whose bill is already posted (same vendor
    + number, or the same file) is dead-lettered instead of posted twice."""
    started = utcnow()
    rows = load_stage_items(env, "post", after="post" if waiting_only else None)
    twice = _posted_elsewhere(env, [r for r in rows if r["stage"] != "post"])  # not yet planned
    report = run_effects_stage(env, "post", [r for r in rows if r["item_id"] not in twice], connectors,
                               plan=_post_effects, compensations=COMPENSATIONS, policy=cfg.connector_policy,
                               done_status="posted", done_reason="bill posted and payment scheduled")
    if twice:
        dead = commit_stage(env, "post", started, [
            dead_letter(r, "duplicate_bill", f"not posted: {twice[r['item_id']]}") for r in rows if r["item_id"] in twice],
            trace_ids={r["item_id"]: r["trace_id"] for r in rows})
        report.outcomes.update(dead.outcomes)
        report.metadata["duplicates_refused"] = len(twice)
    return report


def notify_stage(env: StageEnv, cfg: DocumentsConfig, connectors, *, waiting_only: bool = False) -> StageReport:
    """The submitter (or the AP inbox channel) is told once the bill is posted, exactly once."""
    rows = load_stage_items(env, "notify", after="notify" if waiting_only else None)
    return run_effects_stage(env, "notify", rows, connectors, plan=_notify_effect, compensations={},
                             policy=cfg.connector_policy, done_status="resolved", done_reason="submitter notified",
                             done_columns=lambda now: {})  # resolved_at stays the time the bill was posted


def redelivery_stage(env: StageEnv, cfg: DocumentsConfig, connectors) -> StageReport:
    """The ops job's self-healing step: deliver every effect still in the outbox, then resolve or
    compensate the documents that were waiting for them."""
    started = utcnow()
    sent = dispatch(env.db, connectors, env.flow, policy=cfg.connector_policy)
    post = post_stage(env, cfg, connectors, waiting_only=True)
    notify = notify_stage(env, cfg, connectors)  # the posted ones (new or waiting) are told
    md = {"redelivered": sent["delivered"], "still_failing": sent["failed"],
          "waiting_open_circuit": sent.get("skipped", 0), "posted": post.metadata["resolved"],
          "compensated": post.metadata["compensated"] + notify.metadata["compensated"],
          "notified": notify.metadata["resolved"]}
    return StageReport("redelivery", post.n_in + notify.n_in, post.outcomes + notify.outcomes,
                       (utcnow() - started).total_seconds() * 1000.0, md)


def labelled_examples_stage(env: StageEnv, cfg: DocumentsConfig) -> StageReport:
    """Reviewers' corrections kept as labelled examples for the next extractor version: every reviewed,
    posted document's masked lines with its final fields, written to
    ``$ORCH_HOME/datasets/documents_labelled.jsonl`` (rewritten each time, sorted by item id)."""
    from ...lib.settings import Settings

    started = utcnow()
    q = sa.select(items.c.item_id, items.c.data).where(items.c.flow == env.flow, items.c.status == "resolved")
    with env.db.begin() as conn:
        rows = [(i, d) for i, d in conn.execute(q.order_by(items.c.item_id)) if d.get("corrected_by")]
    out = Settings.from_env().home / "datasets" / "documents_labelled.jsonl"
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as fh:
        for item_id, d in rows:
            fh.write(json.dumps({"id": item_id, "lines": d["lines"],
                                 "fields": {k: fv.get("value") for k, fv in d["fields"].items()},
                                 "line_items": d.get("line_items") or [],
                                 "corrected": sorted(d.get("corrections") or {})}, ensure_ascii=False) + "\n")
    tmp.replace(out)
    md = {"labelled_examples": len(rows), "path": str(out),
          "fields_corrected": dict(Counter(f for _, d in rows for f in (d.get("corrections") or {})))}
    return StageReport("labelled_examples", len(rows), Counter(ok=len(rows)),
                       (utcnow() - started).total_seconds() * 1000.0, md)


from . import flow as _flow  # noqa: E402,F401  (registers the flow spec for code that imports only this module)
