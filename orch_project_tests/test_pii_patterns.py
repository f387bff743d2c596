"""Pattern recognisers that miss nothing they should catch: every common grouping of a card number that passes
Luhn, international and North American phone formats (extensions, dots, an international prefix), IBANs with
and without spaces, SSNs, IPv4 and IPv6, e-mail addresses -- and the look-alikes they must leave alone."""

from __future__ import annotations

import pytest

from orch_project.lib.guardrails import pii

FOUND = [
    ("CREDIT_CARD", "card 4111 1111 1111 1111 please", "4111 1111 1111 1111"),
    ("CREDIT_CARD", "card 4111-1111-1111-1111.", "4111-1111-1111-1111"),
    ("CREDIT_CARD", "card 4111111111111111", "4111111111111111"),
    ("CREDIT_CARD", "card 4111.1111.1111.1111", "4111.1111.1111.1111"),
    ("CREDIT_CARD", "card 4111  1111  1111  1111", "4111  1111  1111  1111"),
    ("CREDIT_CARD", "amex 3782 822463 10005", "3782 822463 10005"),
    ("CREDIT_CARD", "diners 3056 930902 5904", "3056 930902 5904"),
    ("CREDIT_CARD", "maestro 6304000000000000018", "6304000000000000018"),
    ("CREDIT_CARD", "maestro 6304 0000 0000 0000 018", "6304 0000 0000 0000 018"),
    ("CREDIT_CARD", "4111 1111 1111 1111exp 12/27", "4111 1111 1111 1111"),
    ("CREDIT_CARD", "(5500 0000 0000 0004)", "5500 0000 0000 0004"),
    ("PHONE_NUMBER", "call +44 20 7946 0958 today", "+44 20 7946 0958"),
    ("PHONE_NUMBER", "0044 20 7946 0958", "0044 20 7946 0958"),
    ("PHONE_NUMBER", "+33 1 42 68 53 00", "+33 1 42 68 53 00"),
    ("PHONE_NUMBER", "+49 30 901820", "+49 30 901820"),
    ("PHONE_NUMBER", "+91 98765 43210", "+91 98765 43210"),
    ("PHONE_NUMBER", "+55 11 91234-5678", "+55 11 91234-5678"),
    ("PHONE_NUMBER", "(212) 555-0187", "(212) 555-0187"),
    ("PHONE_NUMBER", "office 751-954-9268", "751-954-9268"),
    ("PHONE_NUMBER", "833.719.3994x1887", "833.719.3994x1887"),
    ("PHONE_NUMBER", "+1-743-438-6774x62406", "+1-743-438-6774x62406"),
    ("PHONE_NUMBER", "office\\,001-748-088-2851x818-fax", "001-748-088-2851x818"),
    ("IBAN_CODE", "IBAN GB82 WEST 1234 5698 7654 32", "GB82 WEST 1234 5698 7654 32"),
    ("IBAN_CODE", "IBAN DE89370400440532013000", "DE89370400440532013000"),
    ("IBAN_CODE", "iban fr14 2004 1010 0505 0001 3m02 606", "fr14 2004 1010 0505 0001 3m02 606"),
    ("US_SSN", "ssn 123-45-6789", "123-45-6789"),
    ("IP_ADDRESS", "from 203.0.113.45", "203.0.113.45"),
    ("IP_ADDRESS", "from 2001:db8::1", "2001:db8::1"),
    ("EMAIL_ADDRESS", "mail a.b+c@ex-ample.co.uk", "a.b+c@ex-ample.co.uk"),
]

LEFT_ALONE = [
    "ticket 2024-11-05-0042 is still open",          # a date-based reference (passes Luhn by chance)
    "invoice total 12,345.67 EUR on 2026-11-20",     # amounts and dates
    "card 4111 1111 1111 1112",                      # fails Luhn
    "IBAN DE89 3704 0044 0532 0130 01 is it right?",  # an IBAN whose check digits fail is not a card
    "order number 751-954-9268",                     # a reference number after "order"
    "version 1.2.3.4.5 released",
]


@pytest.mark.parametrize("entity,text,value", FOUND, ids=[f"{e}-{i}" for i, (e, *_) in enumerate(FOUND)])
def test_pattern_recognisers_find_every_common_format(entity, text, value):
    spans = pii.detect(text)
    assert [(s.entity_type, text[s.start:s.end]) for s in spans] == [(entity, value)]
    assert value not in pii.mask(text).text


@pytest.mark.parametrize("text", LEFT_ALONE)
def test_look_alikes_are_left_alone(text):
    assert [t for t in pii.detect(text) if t.entity_type in ("CREDIT_CARD", "PHONE_NUMBER", "IBAN_CODE")] == []
