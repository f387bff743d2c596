"""PII detection and masking for inbound text, before anything is stored or sent to a model.

Detection is pattern + checksum based (python-stdnum validates card numbers with Luhn and IBANs
with ISO 7064), plus the names the message itself tells us (the sender's name from the header or
form, and "my name is ..."-style self introductions and signature lines). Entity names follow
Presidio's (PERSON, EMAIL_ADDRESS, PHONE_NUMBER, CREDIT_CARD, IBAN_CODE, US_SSN, IP_ADDRESS,
LOCATION) so reports and checks read the same whichever detector runs.

Masking replaces every span with ``<ENTITY_TYPE>``. Values a later step legitimately needs (the
customer's address for the reply) go to the vault table as reversible tokens, never into item text.
"""

from __future__ import annotations

import hashlib
import ipaddress
import re
from collections import Counter
from dataclasses import dataclass, field

from stdnum import iban as _iban
from stdnum import luhn as _luhn

EMAIL = re.compile(r"[A-Za-z0-9._%+'-]+@[A-Za-z0-9-]+(?:\.[A-Za-z0-9-]+)*\.[A-Za-z]{2,}")
CARD = re.compile(r"(?<![\d-])(?:\d[ -]?){12,18}\d(?![\d-])")
IBAN = re.compile(r"\b[A-Za-z]{2}\d{2}(?: ?[A-Za-z0-9]{4}){2,7}(?: ?[A-Za-z0-9]{1,4})?\b")
SSN = re.compile(r"\b(?!000|666|9\d\d)\d{3}-(?!00)\d{2}-(?!0000)\d{4}\b")
IPV4 = re.compile(r"\b(?:\d{1,3}\.){3}\d{1,3}\b")
PHONE = re.compile(
    r"(?<![\w+])(?:\+\d{1,3}[\s.-]?)?(?:\(\d{1,5}\)[\s.-]?)?\d{2,5}(?:[\s.-]?\d{2,5}){1,4}(?![\w])"
)
STREET = re.compile(
    r"\b\d{1,5}[A-Za-z]?,? (?:[A-Z][\w'.-]+ ){0,4}"
    r"(?:Street|St\.?|Road|Rd\.?|Avenue|Ave\.?|Lane|Ln\.?|Drive|Dr\.?|Way|Court|Ct\.?|Place|Pl\.?|Square|Close|"
    r"Boulevard|Blvd\.?|Terrace|Gardens|Hill|Park|Row|Walk|Crescent)\b[^\n]{0,60}"
    r"|\b(?:[A-Z][\w'.-]+ ){0,3}(?:[Ss]tra(?:ss|ß)e|[Ww]eg|[Gg]asse|[Pp]latz|[Aa]llee)\.? ?\d{1,5}[a-z]?\b[^\n]{0,60}"
    r"|\b(?:Rue|Avenue|Boulevard|Via|Viale|Piazza|Calle|Avenida|Plaza|Paseo|Corso) [^\n\d]{2,40}\d{0,5}[^\n]{0,60}"
)
SELF_NAME = re.compile(
    r"(?i:\b(?:my name is|this is|i am|i'm|name:|regards,|thanks,|thank you,|cheers,|best,|sincerely,))"
    r"[ \t]*\n?[ \t]*((?:[A-Z][a-zA-Z'\u00C0-\u017F-]+)(?:[ \t]+[A-Z][a-zA-Z'\u00C0-\u017F-]+){0,3})"
)
_NAME_STOP = {
    "I", "Hi", "Hello", "Thanks", "Thank", "Regards", "Best", "The", "My", "This", "Please", "Support",
    "Team", "Card", "Bank", "Northwind", "Good", "Morning", "Dear", "Sent", "From", "Kind", "Many",
}


@dataclass(frozen=True)
class Span:
    entity_type: str
    start: int
    end: int
    score: float


@dataclass
class Masked:
    text: str
    counts: Counter = field(default_factory=Counter)


def _valid_card(s: str) -> bool:
    digits = re.sub(r"\D", "", s)
    return 13 <= len(digits) <= 19 and _luhn.is_valid(digits)


def _valid_ip(s: str) -> bool:
    try:
        ipaddress.ip_address(s)
        return True
    except ValueError:
        return False


def _valid_phone(s: str) -> bool:
    digits = re.sub(r"\D", "", s)
    # at least 7 digits, and not a date/amount-like short group
    return 7 <= len(digits) <= 15 and not re.fullmatch(r"\d{1,2}[./-]\d{1,2}[./-]\d{2,4}", s.strip())


def name_terms(names: list[str | None]) -> list[str]:
    """Whole names and their parts (>= 3 letters), longest first, for exact masking."""
    terms: set[str] = set()
    for n in names:
        if not n:
            continue
        n = " ".join(n.split())
        if len(n) >= 3:
            terms.add(n)
        for part in re.split(r"[\s,]+", n):
            part = part.strip(".")
            if len(part) >= 3 and part not in _NAME_STOP and part[0].isupper():
                terms.add(part)
    return sorted(terms, key=len, reverse=True)


def detect(text: str, known_names: list[str | None] = ()) -> list[Span]:
    """All PII spans in ``text``; overlapping detections keep the earliest, longest one."""
    found: list[Span] = []
    for m in EMAIL.finditer(text):
        found.append(Span("EMAIL_ADDRESS", m.start(), m.end(), 1.0))
    for m in IBAN.finditer(text):
        if _iban.is_valid(m.group().replace(" ", "").upper()):
            found.append(Span("IBAN_CODE", m.start(), m.end(), 1.0))
    for m in CARD.finditer(text):
        if _valid_card(m.group()):
            found.append(Span("CREDIT_CARD", m.start(), m.end(), 1.0))
    for m in SSN.finditer(text):
        found.append(Span("US_SSN", m.start(), m.end(), 0.85))
    for m in IPV4.finditer(text):
        if _valid_ip(m.group()):
            found.append(Span("IP_ADDRESS", m.start(), m.end(), 0.95))
    for m in STREET.finditer(text):
        found.append(Span("LOCATION", m.start(), m.end(), 0.7))
    for m in PHONE.finditer(text):
        if _valid_phone(m.group()):
            found.append(Span("PHONE_NUMBER", m.start(), m.end(), 0.75))
    terms = name_terms(list(known_names))
    if terms:
        pat = re.compile(r"\b(?:" + "|".join(re.escape(t) for t in terms) + r")\b", re.IGNORECASE)
        for m in pat.finditer(text):
            found.append(Span("PERSON", m.start(), m.end(), 0.95))
    for m in SELF_NAME.finditer(text):
        cand = m.group(1)
        if cand.split()[0] not in _NAME_STOP:
            found.append(Span("PERSON", m.start(1), m.end(1), 0.6))
    return _resolve_overlaps(found)


def _resolve_overlaps(spans: list[Span]) -> list[Span]:
    spans.sort(key=lambda s: (s.start, -(s.end - s.start), -s.score))
    out: list[Span] = []
    last_end = -1
    for s in spans:
        if s.start >= last_end:
            out.append(s)
            last_end = s.end
    return out


def mask(text: str | None, known_names: list[str | None] = ()) -> Masked:
    if not text:
        return Masked(text or "")
    spans = detect(text, known_names)
    if not spans:
        return Masked(text)
    parts: list[str] = []
    pos = 0
    counts: Counter = Counter()
    for s in spans:
        parts.append(text[pos : s.start])
        parts.append(f"<{s.entity_type}>")
        counts[s.entity_type] += 1
        pos = s.end
    parts.append(text[pos:])
    return Masked("".join(parts), counts)


def customer_ref(email: str, salt: str) -> str:
    """A stable, non-reversible customer reference (for CRM keys and dedup)."""
    return "cust_" + hashlib.sha256(f"{salt}:{email.strip().lower()}".encode()).hexdigest()[:20]


def vault_token(item_id: str, entity_type: str, salt: str) -> str:
    return "tok_" + hashlib.sha256(f"{salt}:{item_id}:{entity_type}".encode()).hexdigest()[:24]


UNMASKED_PATTERNS = {"EMAIL_ADDRESS": EMAIL, "US_SSN": SSN}


def find_unmasked(text: str) -> list[str]:
    """Entity types whose raw pattern still appears in text that should be masked (a guardrail check)."""
    hits = [name for name, pat in UNMASKED_PATTERNS.items() if pat.search(text)]
    if any(_valid_card(m.group()) for m in CARD.finditer(text)):
        hits.append("CREDIT_CARD")
    if any(_iban.is_valid(m.group().replace(" ", "").upper()) for m in IBAN.finditer(text)):
        hits.append("IBAN_CODE")
    return hits
