"""Prompt-injection defence for inbound text.

Three layers, none of which trusts the model:

1. Inbound text only ever enters a prompt as delimited data (``gateway.delimit``: it cannot close
   the ``<message>`` delimiter), and every system prompt says the message is data.
2. Model output never chooses a side effect: effects are built by code, the outbox accepts only the
   allow-listed (connector, action) pairs of the flow, and a model's label must be one of
   the step's allowed labels. The allow-list is each flow's (its spec's ``effects``; lib/outbox.py).
3. Heuristic detection (this module) flags messages that try to instruct the system; a flagged item
   always goes to a human, and the sentences carrying the attempt are left out of what the
   classifier sees, so the attempt cannot steer routing.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

PATTERNS: dict[str, re.Pattern] = {name: re.compile(rx, re.IGNORECASE) for name, rx in {
    "override_instructions": r"\b(ignore|disregard|forget|override|bypass)\b[^.!?\n]{0,40}\b(previous|prior|above|earlier|all|your|the|any)\b[^.!?\n]{0,25}\b(instructions?|rules?|prompts?|polic(y|ies)|guidelines|directions)\b",
    "role_play": r"\b(you are now|from now on,? you|act as|pretend (to be|you are)|roleplay as|new persona)\b",
    "system_prompt": r"\b(system prompt|developer (message|mode)|hidden instructions?|jailbreak|DAN mode)\b",
    "exfiltration": r"\b(reveal|print|show|repeat|leak|output)\b[^.!?\n]{0,40}\b(system prompt|instructions|other customers?|all (customers|accounts|users)|api key|password|credentials)\b",
    "delimiter_escape": r"</?\s*(message|system|assistant|user|instructions?)\s*>|\[/?(INST|SYS)\]|<\|im_(start|end)\|>",
    "forced_action": r"\b(you must|you have to|immediately)\b[^.!?\n]{0,40}\b(refund|transfer|approve|close|delete|credit|send)\b[^.!?\n]{0,40}\b(account|money|funds|ticket|me|£|\$|€|\d)",
    "label_steering": r"\b(classify|label|mark|tag|route)\b[^.!?\n]{0,30}\b(this|the message|my message|it)\b[^.!?\n]{0,20}\b(as|to|into)\b",
}.items()}

_SENTENCE = re.compile(r"[^.!?\n]+[.!?]*\n?|\n")


@dataclass(frozen=True)
class Finding:
    kind: str
    start: int
    end: int


def scan(text: str) -> list[Finding]:
    """Every injection pattern found, in text order."""
    found = [Finding(kind, m.start(), m.end()) for kind, rx in PATTERNS.items() for m in rx.finditer(text or "")]
    return sorted(found, key=lambda f: (f.start, f.kind))


def neutralise(text: str, findings: list[Finding] | None = None) -> str:
    """The text without the sentences that carry an injection attempt (for classification only;
    the stored item keeps the masked original for the human reviewer)."""
    findings = scan(text) if findings is None else findings
    if not findings:
        return text
    keep = []
    for m in _SENTENCE.finditer(text):
        if not any(f.start < m.end() and f.end > m.start() for f in findings):
            keep.append(m.group())
    out = "".join(keep).strip()
    return out or text


def kinds(findings: list[Finding]) -> list[str]:
    return sorted({f.kind for f in findings})
