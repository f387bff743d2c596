"""PII detection and masking for inbound text, before anything is stored or sent to a model.

Detection runs Microsoft Presidio's ``AnalyzerEngine`` fully offline: a no-op NLP engine (no spaCy
model is loaded or downloaded) and only pattern/checksum recognisers (``pii_recognizers.py``):

- EMAIL_ADDRESS, CREDIT_CARD (Luhn), IBAN_CODE (ISO 7064 via python-stdnum), US_SSN, IP_ADDRESS:
  Presidio's predefined recognisers, adjusted to work without the network;
- PHONE_NUMBER: Presidio's python-phonenumbers recogniser, run on phone-shaped candidates only;
- PERSON: the names the message itself tells us (the sender's name from the header or form, passed
  per call as ``known_names``), "my name is ..."-style self introductions, form fields and
  signature lines;
- LOCATION: street addresses in English, German, French, Spanish and Italian forms.

There is no statistical NER, so other people's names in free text ("my husband Kwame sent ...")
are not found; ``benchmarks/pii_recall.py`` measures what is.

Masking replaces every span with ``<ENTITY_TYPE>`` through presidio-anonymizer's ``AnonymizerEngine``.
Values a later step legitimately needs (the customer's address for the reply) go to the vault table
as reversible tokens, never into item text.

Presidio (and spaCy under it) is imported on the first detection, not on import, and the engines
are built once per process.
"""

from __future__ import annotations

import hashlib
import logging
import re
import threading
from collections import Counter
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

ENTITIES = ("PERSON", "EMAIL_ADDRESS", "PHONE_NUMBER", "CREDIT_CARD", "IBAN_CODE", "US_SSN", "IP_ADDRESS",
            "LOCATION")
SCORE_THRESHOLD = 0.3

# Quick pre-filters for find_unmasked (a match still has to pass the recognisers' validation).
EMAIL = re.compile(r"[\w.!#$%&'*+/=?^`{|}~-]+@\w+(?:-+\w+)*(?:\.\w+(?:-+\w+)*)+")
SSN = re.compile(r"\b\d{3}([- .])\d{2}\1\d{4}\b")
UNMASKED_PATTERNS = {"EMAIL_ADDRESS": EMAIL, "US_SSN": SSN}
_UNMASKED_TYPES = ("EMAIL_ADDRESS", "US_SSN", "CREDIT_CARD", "IBAN_CODE")

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


# --- engines (built once per process) ----------------------------------------------------------

_lock = threading.Lock()
_engines: tuple[Any, Any, Any] | None = None


def engines() -> tuple[Any, Any]:
    """(AnalyzerEngine, AnonymizerEngine), built on first use."""
    return _built()[:2]


def _built() -> tuple[Any, Any, Any]:
    global _engines
    if _engines is None:
        with _lock:
            if _engines is None:
                _engines = _build_engines()
    return _engines


def _analyze(text: str, **kwargs) -> list:
    analyzer, _, no_artifacts = _built()
    return analyzer.analyze(text=text, language="en", nlp_artifacts=no_artifacts, **kwargs)


def _build_engines() -> tuple[Any, Any, Any]:
    for name in ("presidio-analyzer", "presidio-anonymizer"):  # they log INFO lines on every call
        if logging.getLogger(name).level == logging.NOTSET:
            logging.getLogger(name).setLevel(logging.WARNING)

    from presidio_analyzer import AnalyzerEngine, RecognizerRegistry
    from presidio_analyzer.nlp_engine import NoOpNlpEngine
    from presidio_anonymizer import AnonymizerEngine

    from . import pii_recognizers as r

    nlp = NoOpNlpEngine(models=[{"lang_code": "en", "model_name": "blank"}])
    registry = RecognizerRegistry(supported_languages=["en"], recognizers=[
        r.OfflineEmailRecognizer(), r.LuhnCardRecognizer(), r.StdnumIbanRecognizer(), r.SsnRecognizer(),
        r.GatedIpRecognizer(), r.FastPhoneRecognizer(), r.SelfIntroductionRecognizer(), r.StreetAddressRecognizer(),
    ])
    analyzer = AnalyzerEngine(registry=registry, nlp_engine=nlp, supported_languages=["en"],
                              default_score_threshold=SCORE_THRESHOLD,
                              context_aware_enhancer=r.NoContextEnhancer())
    # The no-op engine's artifacts are empty and the same for every text (no tokens, lemmas or
    # entities): build them once instead of a new empty spaCy Doc per call.
    no_artifacts = nlp.process_text("", "en")
    analyzer.analyze(text=_WARM_UP, language="en", nlp_artifacts=no_artifacts)  # compiles every pattern
    return analyzer, AnonymizerEngine(), no_artifacts


_WARM_UP = ("Name: Ann Lee\nann@example.com, +44 20 7946 0958, 4111 1111 1111 1111, GB82 WEST 1234 5698 7654 32, "
            "123-45-6789, 203.0.113.45, 221B Baker Street, London.\nRegards,\nAnn Lee")


@lru_cache(maxsize=256)
def _known_names_recognizer(terms: tuple[str, ...]):
    _built()  # the engine (and its logging set-up) first
    from .pii_recognizers import KnownNameRecognizer

    return KnownNameRecognizer(terms)


# --- public API ----------------------------------------------------------------------------------


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


def detect(text: str, known_names: list[str | None] = (), entities: tuple[str, ...] | None = None) -> list[Span]:
    """All PII spans in ``text`` (only of ``entities`` when given); overlapping detections keep the
    earliest, longest one."""
    if not text:
        return []
    terms = tuple(name_terms(list(known_names)))
    ad_hoc = [_known_names_recognizer(terms)] if terms else None
    results = _analyze(text, ad_hoc_recognizers=ad_hoc, entities=list(entities) if entities else None)
    return _resolve_overlaps([Span(r.entity_type, r.start, r.end, r.score) for r in results])


def _resolve_overlaps(spans: list[Span]) -> list[Span]:
    spans.sort(key=lambda s: (s.start, -(s.end - s.start), -s.score))
    out: list[Span] = []
    last_end = -1
    for s in spans:
        if s.start >= last_end:
            out.append(s)
            last_end = s.end
    return out


def mask(text: str | None, known_names: list[str | None] = (), entities: tuple[str, ...] | None = None) -> Masked:
    """``text`` with every detected span replaced by ``<ENTITY_TYPE>``, and counts per type. A flow
    whose text carries business data it needs (a vendor's address and phone on an invoice) passes the
    ``entities`` it masks."""
    if not text:
        return Masked(text or "")
    spans = detect(text, known_names, entities)
    if not spans:
        return Masked(text)
    from presidio_anonymizer.entities import OperatorConfig, RecognizerResult

    result = _built()[1].anonymize(
        text=text,
        analyzer_results=[RecognizerResult(s.entity_type, s.start, s.end, s.score) for s in spans],
        operators={"DEFAULT": OperatorConfig("replace")},  # no new_value: "<ENTITY_TYPE>"
        merge_entities_with_spaces=False,  # one placeholder per detected span
    )
    return Masked(result.text, Counter(item.entity_type for item in result.items))


def customer_ref(email: str, salt: str) -> str:
    """A stable, non-reversible customer reference (for CRM keys and dedup)."""
    return "cust_" + hashlib.sha256(f"{salt}:{email.strip().lower()}".encode()).hexdigest()[:20]


def vault_token(item_id: str, entity_type: str, salt: str) -> str:
    return "tok_" + hashlib.sha256(f"{salt}:{item_id}:{entity_type}".encode()).hexdigest()[:24]


_DIGIT = re.compile(r"\d")


def find_unmasked(text: str) -> list[str]:
    """Entity types (e-mail, SSN, card, IBAN) still present in text that should be masked: a
    guardrail check, using the same recognisers as ``mask``. Text with no "@" and fewer than nine
    digits cannot hold any of them and returns at once, without building the engine."""
    if not text or ("@" not in text and len(_DIGIT.findall(text)) < 9):
        return []
    found = {r.entity_type for r in _analyze(text, entities=list(_UNMASKED_TYPES))}
    return [t for t in _UNMASKED_TYPES if t in found]
