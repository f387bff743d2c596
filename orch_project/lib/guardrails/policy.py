"""Rule-based policy checks on outbound drafts, configured per flow (``policy.yaml`` in the flow's
folder). A draft that breaks a rule is not sent: the item goes to human review with the violations.

Rules: length bounds; a required phrase (disclaimer / signature); no promise of a refund, credit or
compensation above a threshold; no other customer's data (another item's vault token or customer
reference, or any raw PII pattern); no instruction-following markers copied from the inbound text.
"""

from __future__ import annotations

import re
from pathlib import Path

import yaml
from pydantic import BaseModel, ConfigDict, Field

from .pii import find_unmasked

MONEY = re.compile(r"(?:(?P<cur1>[£$€])\s?(?P<amt1>\d[\d,]*(?:\.\d+)?)|(?P<amt2>\d[\d,]*(?:\.\d+)?)\s?(?P<cur2>EUR|GBP|USD|euros?|pounds?|dollars?)\b)",
                   re.IGNORECASE)
PROMISE = re.compile(r"\b(refund|reimburs\w*|credit(?:ed)?|compensat\w*|pay (?:you )?back|goodwill)\b", re.IGNORECASE)
TOKEN = re.compile(r"\b(?:tok_[0-9a-f]{24}|cust_[0-9a-f]{20})\b")


class DraftPolicy(BaseModel):
    model_config = ConfigDict(extra="forbid")

    min_chars: int = Field(40, ge=0)
    max_chars: int = Field(2500, gt=0)
    required_phrases: list[str] = Field(default_factory=list, description="each must appear (case-insensitive)")
    max_refund_promise: float = Field(100.0, ge=0, description="largest amount a draft may promise back")
    promise_window_chars: int = Field(80, gt=0, description="an amount this close to a refund word is a promise")

    @classmethod
    def load(cls, path: Path) -> "DraftPolicy":
        if not Path(path).exists():
            return cls()
        return cls.model_validate((yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}).get("drafts", {}))

    def check(self, draft: str, *, own_refs: set[str] = frozenset()) -> list[str]:
        """Violations of this policy by ``draft`` (empty: fine). ``own_refs`` are this item's own
        tokens/customer reference, which the draft may carry."""
        text = draft or ""
        out = []
        if len(text) < self.min_chars:
            out.append(f"too short: {len(text)} < {self.min_chars} characters")
        if len(text) > self.max_chars:
            out.append(f"too long: {len(text)} > {self.max_chars} characters")
        low = text.lower()
        for phrase in self.required_phrases:
            if phrase.lower() not in low:
                out.append(f"missing required phrase {phrase!r}")
        for m in MONEY.finditer(text):
            amount = float((m.group("amt1") or m.group("amt2")).replace(",", ""))
            window = text[max(0, m.start() - self.promise_window_chars): m.end() + self.promise_window_chars]
            if amount > self.max_refund_promise and PROMISE.search(window):
                out.append(f"promises {m.group().strip()} back, over the {self.max_refund_promise:g} limit")
        foreign = sorted(set(TOKEN.findall(text)) - set(own_refs))
        if foreign:
            out.append(f"carries another customer's reference ({len(foreign)})")
        leaked = find_unmasked(text)
        if leaked:
            out.append(f"contains raw personal data: {', '.join(leaked)}")
        return out
