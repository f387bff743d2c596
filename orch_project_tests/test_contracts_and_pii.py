"""Contracts, the design brief, JSON Schema export and PII masking."""

from __future__ import annotations

import json

import pytest
from pydantic import ValidationError

from orch_project.defs.support.logic import SupportConfig
from orch_project.lib.contracts import (AlertRule, DesignBrief, InboundMessage, LLMStepResponse,
                                        describe_validation_error, json_schemas)
from orch_project.lib.guardrails import pii
from orch_project.lib.settings import REPO_DIR

MISSION_BRIEF = {"flow_name": "support_inquiry_to_resolution", "inputs": ["email", "web_form", "chat"],
                 "slo": {"p95_latency_sec": 60, "success_rate": 0.98},
                 "kpis": ["time_to_first_reply", "reopen_rate", "csat"],
                 "guardrails": ["schema_validation", "pii_redaction", "rate_limits"],
                 "human_in_loop": ["priority_overrides", "final_approval_over_threshold"],
                 "alerts": ["error_rate>2%", "latency_p95>90s", "dlq_backlog>50"],
                 "budget": {"max_tokens_per_run": 20000, "daily_token_cap": 5000000}}


def test_mission_template_brief_validates_and_the_support_brief_is_read():
    b = DesignBrief.model_validate(MISSION_BRIEF)
    assert [(r.metric, r.op, r.threshold) for r in b.alert_rules] == [
        ("error_rate", ">", 0.02), ("latency_p95", ">", 90.0), ("dlq_backlog", ">", 50.0)]
    support = SupportConfig().brief
    assert support.slo.p95_latency_sec == 60 and support.budget.daily_token_cap == 5_000_000
    assert support.approval.priorities == ["high"] and support.sla_hours["high"] == 4
    with pytest.raises(ValidationError):
        DesignBrief.model_validate({**MISSION_BRIEF, "alerts": ["error rate is high"]})
    assert AlertRule.parse("dlq_backlog>50").breached(51) and not AlertRule.parse("dlq_backlog>50").breached(50)


def test_inbound_contract_and_reasons_without_values():
    ok = InboundMessage.model_validate({"id": "m1", "channel": "chat", "received_at": "2026-11-20T10:00:00Z",
                                        "sender": {"name": "Ann Lee", "email": "ann@example.com"}, "body": "hi"})
    assert ok.received_at.tzinfo is not None
    with pytest.raises(ValidationError) as exc:
        InboundMessage.model_validate({"id": "m2", "channel": "fax", "received_at": "2026-11-20T10:00:00Z",
                                       "sender": {"email": "secret-person@example.com"}, "body": ""})
    reason = describe_validation_error(exc.value)
    assert "channel" in reason and "body" in reason and "secret-person" not in reason
    with pytest.raises(ValidationError):
        LLMStepResponse(ok=True)  # ok without output breaks the step contract


def test_shipped_json_schemas_match_the_contracts():
    for name, schema in json_schemas().items():
        shipped = json.loads((REPO_DIR / "schemas" / f"{name}.schema.json").read_text())
        assert shipped == schema, f"schemas/{name}.schema.json is stale: run `orch schemas export schemas`"


@pytest.mark.parametrize("text,entity", [
    ("mail me at jane.doe@example.org please", "EMAIL_ADDRESS"),
    ("card 4111 1111 1111 1111 was charged", "CREDIT_CARD"),
    ("my iban is GB82 WEST 1234 5698 7654 32", "IBAN_CODE"),
    ("iban de89370400440532013000 lowercase", "IBAN_CODE"),
    ("ssn 123-45-6789", "US_SSN"),
    ("error from 203.0.113.45", "IP_ADDRESS"),
    ("call +44 20 7946 0958 today", "PHONE_NUMBER"),
    ("I live at 221B Baker Street, London", "LOCATION"),
    ("Best regards,\nMaria Keller", "PERSON"),
])
def test_masking_catches_each_entity_type(text, entity):
    m = pii.mask(text)
    assert m.counts[entity] == 1, (m.text, m.counts)
    assert f"<{entity}>" in m.text


def test_masking_leaves_ordinary_banking_text_alone():
    text = "I topped up 100 EUR on 12/10/2024 and my card ending 1234 was declined twice. Code 123456."
    assert pii.mask(text).text == text
    assert pii.mask("4111 1111 1111 1112").counts["CREDIT_CARD"] == 0, "Luhn-invalid numbers are not cards"


def test_known_sender_name_is_masked_everywhere_case_insensitively():
    m = pii.mask("hi, this is maria. Maria Keller here, KELLER with two Ls", ["Maria Keller"])
    assert "aria" not in m.text.lower().replace("<person>", "") and m.counts["PERSON"] == 3
