"""Contracts between stages and with the outside world (pydantic v2, JSON Schema export).

- InboundMessage: what arrives on any channel (email / chat / web_form).
- Ticket: what the ticketing connector receives.
- LLMStepRequest / LLMStepResponse: the LLM step contract from the mission template.
- DesignBrief: the per-flow design brief from the mission template (brief.yaml).
"""

from __future__ import annotations

import re
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

MAX_BODY_CHARS = 100_000
MAX_SUBJECT_CHARS = 998  # RFC 5322 line limit
EMAIL_RE = re.compile(r"^[A-Za-z0-9._%+'-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}$")

# social: a public post another flow hands over (e.g. a complaint the marketing program heard); the sender is
# the author's handle on the platform
Channel = Literal["email", "chat", "web_form", "social"]
Priority = Literal["low", "medium", "high"]


class Attachment(BaseModel):
    """Attachment metadata only: contents are never carried through the flow."""

    model_config = ConfigDict(extra="forbid")
    filename: str = Field(min_length=1, max_length=255)
    content_type: str = Field(min_length=3, max_length=255)
    size_bytes: int = Field(ge=0)


class Sender(BaseModel):
    """Who wrote: an e-mail address, or (a social post) the author's handle on a platform."""

    model_config = ConfigDict(extra="forbid")
    name: str | None = Field(default=None, max_length=200)
    email: str | None = Field(default=None, max_length=320)
    handle: str | None = Field(default=None, min_length=2, max_length=120,
                               description="platform:@handle of a social post's author")

    @field_validator("email")
    @classmethod
    def _email_shape(cls, v: str | None) -> str | None:
        if v is None:
            return v
        v = v.strip()
        if not EMAIL_RE.match(v):
            raise ValueError("not a valid e-mail address")
        return v

    @model_validator(mode="after")
    def _reachable(self) -> "Sender":
        if not self.email and not self.handle:
            raise ValueError("a sender needs an e-mail address (or, for a social post, a handle)")
        return self

    @property
    def address(self) -> str:
        """What a reply goes to: the e-mail address, else the handle."""
        return self.email or str(self.handle)


def aware_utc(v: datetime) -> datetime:
    """A contract's timestamp in UTC (a naive one is taken as UTC)."""
    return (v if v.tzinfo else v.replace(tzinfo=timezone.utc)).astimezone(timezone.utc)


def refuse_nul(v: str, field: str) -> str:
    """A contract's text field, refused when it holds NUL bytes (binary content sent as text)."""
    if "\x00" in v:
        raise ValueError(f"{field} contains NUL bytes (binary content)")
    return v


class InboundMessage(BaseModel):
    """One inbound customer message, whatever the channel."""

    model_config = ConfigDict(extra="ignore", str_strip_whitespace=True)
    id: str = Field(min_length=1, max_length=255, description="Stable id from the source (e.g. Message-ID).")
    channel: Channel
    received_at: datetime
    sender: Sender
    subject: str | None = Field(default=None, max_length=MAX_SUBJECT_CHARS)
    body: str = Field(min_length=1, max_length=MAX_BODY_CHARS)
    attachments: list[Attachment] = Field(default_factory=list, max_length=50)

    @field_validator("received_at")
    @classmethod
    def _aware_utc(cls, v: datetime) -> datetime:
        return aware_utc(v)

    @field_validator("body")
    @classmethod
    def _no_control_chars(cls, v: str) -> str:
        return refuse_nul(v, "body")


class Ticket(BaseModel):
    """A ticket as handed to the ticketing connector (masked text only)."""

    model_config = ConfigDict(extra="forbid")
    item_id: str
    trace_id: str
    queue: str
    priority: Priority
    assignee: str | None
    intent: str
    subject: str
    status: Literal["open", "pending_approval", "solved", "escalated"] = "open"
    due_at: datetime | None = None


# --- LLM step contract (mission template) -------------------------------------------

LLMError = Literal[
    "timeout", "quota_exceeded", "schema_mismatch", "rate_limited", "provider_error", "circuit_open"
]


class LLMInputs(BaseModel):
    text: str
    context: dict[str, Any] = Field(default_factory=dict)


class LLMStepRequest(BaseModel):
    id: str
    inputs: LLMInputs


class LLMOutput(BaseModel):
    """The base of every model task's output contract: tasks declare their own fields (a draft's
    text, an extraction's fields); extra fields a provider adds (e.g. ``model_version``) are kept."""

    model_config = ConfigDict(extra="allow")


class LabelledOutput(LLMOutput):
    """The mission template's output: a label (one of the step's allowed labels) and a confidence."""

    label: str
    confidence: float = Field(ge=0.0, le=1.0)


class LLMStepResponse(BaseModel):
    ok: bool
    reason: str = ""
    output: LLMOutput | None = None  # the step's own contract (a subclass), validated by the gateway
    error: LLMError | None = None

    @model_validator(mode="after")
    def _consistent(self) -> "LLMStepResponse":
        if self.ok and self.output is None:
            raise ValueError("ok response without output")
        if not self.ok and self.error is None:
            raise ValueError("failed response without an error class")
        return self


class LLMStepContract(BaseModel):
    """The step contract document itself, as written in the mission template."""

    request: dict[str, Any] = {"id": "string", "inputs": {"text": "string", "context": "object"}}
    response: dict[str, Any] = {
        "ok": "boolean",
        "reason": "string",
        "output": {"label": "string", "confidence": "number"},
    }
    errors: list[str] = ["timeout", "quota_exceeded", "schema_mismatch"]


# --- Design brief (mission template) ----------------------------------------------

_ALERT_RE = re.compile(r"^(?P<metric>[a-z_0-9]+)\s*(?P<op>>=|<=|>|<)\s*(?P<value>[0-9.]+)(?P<unit>%|s)?$")


class SLO(BaseModel):
    model_config = ConfigDict(extra="forbid")
    p95_latency_sec: float = Field(gt=0)
    success_rate: float = Field(gt=0, le=1)


class Budget(BaseModel):
    model_config = ConfigDict(extra="forbid")
    max_tokens_per_run: int = Field(gt=0)
    daily_token_cap: int = Field(gt=0)


class AlertRule(BaseModel):
    metric: str
    op: Literal[">", ">=", "<", "<="]
    threshold: float
    raw: str

    @classmethod
    def parse(cls, text: str) -> "AlertRule":
        m = _ALERT_RE.match(text.replace(" ", ""))
        if not m:
            raise ValueError(f"alert {text!r} is not of the form metric>value[%|s]")
        value = float(m["value"])
        if m["unit"] == "%":
            value /= 100.0
        return cls(metric=m["metric"], op=m["op"], threshold=value, raw=text)

    def breached(self, observed: float | None) -> bool:
        if observed is None:
            return False
        return {
            ">": observed > self.threshold,
            ">=": observed >= self.threshold,
            "<": observed < self.threshold,
            "<=": observed <= self.threshold,
        }[self.op]


class ApprovalPolicy(BaseModel):
    """Extension to the template: when the human-in-the-loop gate holds an item."""

    model_config = ConfigDict(extra="forbid")
    min_confidence: float = Field(default=0.5, ge=0, le=1)
    priorities: list[Priority] = Field(default_factory=lambda: ["high"])
    reviewer_role: str = "lead"
    escalation_role: str = "supervisor"
    # What happens when an approval passes its due date: ``escalate`` moves it one level up (to
    # escalation_role, with a new due date); once the top role's due date passes too, ``reject``
    # auto-rejects it (terminal, audited) while ``escalate`` leaves it waiting for the top role.
    on_timeout: Literal["escalate", "reject"] = "escalate"


class DesignBrief(BaseModel):
    """The per-flow design brief. The first eight fields are the mission template verbatim."""

    model_config = ConfigDict(extra="forbid")
    flow_name: str
    inputs: list[str]
    slo: SLO
    kpis: list[str]
    guardrails: list[str]
    human_in_loop: list[str]
    alerts: list[str]
    budget: Budget
    # Extensions the platform reads (optional, so the bare template validates too).
    sla_hours: dict[Priority, float] = Field(
        default_factory=lambda: {"high": 4.0, "medium": 24.0, "low": 72.0},
        description="First-response SLA per priority, measured from received_at.",
    )
    approval: ApprovalPolicy = Field(default_factory=ApprovalPolicy)
    settings: dict[str, Any] = Field(
        default_factory=dict,
        description="The flow's own knobs (thresholds, limits), validated by the flow's configuration.")

    @field_validator("alerts")
    @classmethod
    def _alerts_parse(cls, v: list[str]) -> list[str]:
        for a in v:
            AlertRule.parse(a)
        return v

    @property
    def alert_rules(self) -> list[AlertRule]:
        return [AlertRule.parse(a) for a in self.alerts]

    @classmethod
    def load(cls, path: Path) -> "DesignBrief":
        import yaml

        return cls.model_validate(yaml.safe_load(Path(path).read_text()))


SCHEMA_MODELS: dict[str, type[BaseModel]] = {
    "inbound_message": InboundMessage,
    "ticket": Ticket,
    "llm_step_request": LLMStepRequest,
    "llm_step_response": LLMStepResponse,
    "design_brief": DesignBrief,
}


def json_schemas() -> dict[str, dict[str, Any]]:
    return {name: model.model_json_schema() for name, model in SCHEMA_MODELS.items()}


def describe_validation_error(exc: Exception) -> str:
    """A reason for the dead-letter queue that names fields but never echoes input values (PII)."""
    from pydantic import ValidationError

    if isinstance(exc, ValidationError):
        parts = []
        for err in exc.errors(include_input=False, include_url=False):
            loc = ".".join(str(p) for p in err["loc"]) or "(message)"
            parts.append(f"{loc}: {err['msg']}")
        return "invalid message: " + "; ".join(parts)
    return f"invalid message: {exc}"
