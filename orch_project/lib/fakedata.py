"""Fake personal-data values for seeded sample generators: pure functions of a ``random.Random``.

Card numbers pass the Luhn check, IBANs their mod-97 check, SSN-shaped numbers avoid the never-issued
areas; IPv4 addresses are from the RFC 5737 documentation ranges, e-mail domains are reserved example
domains and the international phone numbers use fictional or drama ranges. Values are random, so they
only look real enough for PII detection and masking to have something to catch.

The same rng state always gives the same value (no global random state, no Faker here).
"""

from __future__ import annotations

import random
import re
import unicodedata

__all__ = ["EMAIL_DOMAINS", "ascii_fold", "fake_card_number", "fake_iban", "fake_ipv4", "fake_ssn",
           "iban_check_digits", "intl_phone", "luhn_check_digit", "luhn_valid", "slug"]

EMAIL_DOMAINS = ("example.com", "example.net", "example.org", "mail.example")

_FOLD_MAP = str.maketrans({
    "ß": "ss", "æ": "ae", "Æ": "AE", "ø": "o", "Ø": "O", "œ": "oe", "Œ": "OE",
    "ł": "l", "Ł": "L", "đ": "d", "Đ": "D", "ı": "i",
})


def ascii_fold(s: str) -> str:
    """``s`` in plain ASCII: accents dropped, a few letters (ß, æ, ø, ł ...) spelled out."""
    s = s.translate(_FOLD_MAP)
    return unicodedata.normalize("NFKD", s).encode("ascii", "ignore").decode("ascii")


def slug(part: str) -> str:
    """Lower-case ASCII letters and digits of ``part`` (for e-mail local parts)."""
    return re.sub(r"[^a-z0-9]+", "", ascii_fold(part).lower())


def luhn_check_digit(partial: str) -> str:
    total = 0
    for i, ch in enumerate(reversed(partial)):
        d = int(ch)
        if i % 2 == 0:  # these positions get doubled once the check digit is appended
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return str((10 - total % 10) % 10)


def luhn_valid(number: str) -> bool:
    digits = [int(c) for c in number if c.isdigit()]
    if len(digits) < 2:
        return False
    total = 0
    for i, d in enumerate(reversed(digits)):
        if i % 2 == 1:
            d *= 2
            if d > 9:
                d -= 9
        total += d
    return total % 10 == 0


def fake_card_number(rng: random.Random) -> str:
    """A Luhn-valid 16-digit Visa/Mastercard-shaped number, grouped in fours about two times in three."""
    prefix = rng.choice(("4", "4", "51", "52", "53", "54", "55"))
    body = prefix + "".join(str(rng.randrange(10)) for _ in range(15 - len(prefix)))
    number = body + luhn_check_digit(body)
    if rng.random() < 0.65:
        return " ".join(number[i:i + 4] for i in range(0, 16, 4))
    return number


def iban_check_digits(country: str, bban: str) -> str:
    rearranged = bban + country + "00"
    numeric = "".join(str(int(c, 36)) for c in rearranged)
    return f"{98 - int(numeric) % 97:02d}"


def fake_iban(rng: random.Random) -> str:
    """A checksum-valid German, British or Dutch IBAN, grouped in fours more often than not."""
    country = rng.choice(("DE", "GB", "NL"))
    digits = lambda k: "".join(str(rng.randrange(10)) for _ in range(k))  # noqa: E731
    if country == "DE":
        bban = digits(8) + digits(10)
    elif country == "GB":
        bban = rng.choice(("NWBK", "WEST", "BARC", "LOYD", "MIDL")) + digits(6) + digits(8)
    else:
        bban = rng.choice(("ABNA", "INGB", "RABO", "TRIO")) + digits(10)
    iban = country + iban_check_digits(country, bban) + bban
    if rng.random() < 0.6:
        return " ".join(iban[i:i + 4] for i in range(0, len(iban), 4))
    return iban


def fake_ssn(rng: random.Random) -> str:
    """``AAA-GG-SSSS`` with an area that is not 000, 666 or 900-999."""
    area = rng.randrange(1, 900)
    while area == 666:
        area = rng.randrange(1, 900)
    return f"{area:03d}-{rng.randrange(1, 100):02d}-{rng.randrange(1, 10000):04d}"


def fake_ipv4(rng: random.Random) -> str:
    net = rng.choice(("192.0.2", "198.51.100", "203.0.113"))  # RFC 5737 documentation ranges
    return f"{net}.{rng.randrange(1, 255)}"


def intl_phone(rng: random.Random) -> str:
    """A phone number in international format from fictional ranges (UK Ofcom drama numbers, US 555-01xx)
    or random Berlin, Paris and Madrid landline shapes."""
    d = lambda k: "".join(str(rng.randrange(10)) for _ in range(k))  # noqa: E731
    kind = rng.randrange(6)
    if kind == 0:
        return f"+44 20 7946 0{d(3)}"
    if kind == 1:
        return f"+44 7700 900{d(3)}"
    if kind == 2:
        return f"+1 (202) 555-01{d(2)}"
    if kind == 3:
        return f"+49 30 {d(4)} {d(4)}"
    if kind == 4:
        return f"+33 1 {d(2)} {d(2)} {d(2)} {d(2)}"
    return f"+34 91 {d(3)} {d(2)} {d(2)}"
