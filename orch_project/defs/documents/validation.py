"""Validation of an extracted document, each rule a named check with the reason a reviewer reads.

Rules (``RULES``, in the order a reviewer sees them):

- ``schema``: the brief's required fields are there and parse (ISO date, decimal amounts, an ISO 4217
  currency, line items with numbers);
- ``line_arithmetic``: every line's amount = quantity x unit price;
- ``subtotal_matches_lines``: the line amounts add up to the subtotal;
- ``total_matches_subtotal_tax``: subtotal + tax = total;
- ``date_plausible``: not after the document arrived, not older than the brief allows;
- ``currency_consistent``: the currency agrees with the codes and symbols printed and with the country
  of the vendor's tax id;
- ``tax_id_checksum``: the tax / registration id passes its checksum (python-stdnum) where its format names
  a scheme with one: EU VAT and GB VAT numbers (country prefix), US EINs;
- ``duplicate``: not the same file, nor the same vendor + number, nor the same vendor + date + total as
  a document already in the flow;
- ``confidence``: every field at or above the brief's per-field threshold.

All arithmetic is within the brief's tolerance (cash rounding included). A rule that has nothing to
check (no line items, no tax id) passes and says so. Pure functions: the flow's validate stage and
``orch documents extract`` call the same ``validate``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from datetime import date, timedelta
from decimal import Decimal, InvalidOperation
from typing import Any

RULES = ("schema", "line_arithmetic", "subtotal_matches_lines", "total_matches_subtotal_tax", "date_plausible",
         "currency_consistent", "tax_id_checksum", "duplicate", "confidence")

# ISO 4217 active codes (2024 list)
ISO_4217 = frozenset("""
AED AFN ALL AMD ANG AOA ARS AUD AWG AZN BAM BBD BDT BGN BHD BIF BMD BND BOB BRL BSD BTN BWP BYN BZD CAD CDF
CHF CLP CNY COP CRC CUP CVE CZK DJF DKK DOP DZD EGP ERN ETB EUR FJD FKP GBP GEL GHS GIP GMD GNF GTQ GYD HKD
HNL HTG HUF IDR ILS INR IQD IRR ISK JMD JOD JPY KES KGS KHR KMF KPW KRW KWD KYD KZT LAK LBP LKR LRD LSL LYD
MAD MDL MGA MKD MMK MNT MOP MRU MUR MVR MWK MXN MYR MZN NAD NGN NIO NOK NPR NZD OMR PAB PEN PGK PHP PKR PLN
PYG QAR RON RSD RUB RWF SAR SBD SCR SDG SEK SGD SHP SLE SOS SRD SSP STN SVC SYP SZL THB TJS TMT TND TOP TRY
TTD TWD TZS UAH UGX USD UYU UZS VES VND VUV WST XAF XCD XOF XPF YER ZAR ZMW ZWL
""".split())
# printed symbols -> the currencies they can mean
SYMBOLS = {"€": {"EUR"}, "£": {"GBP"}, "¥": {"JPY", "CNY"}, "₹": {"INR"}, "RM": {"MYR"}, "S$": {"SGD"},
           "US$": {"USD"}, "CA$": {"CAD"}, "AU$": {"AUD"},
           "A$": {"AUD"}, "C$": {"CAD"}, "HK$": {"HKD"}, "NZ$": {"NZD"},
           "$": {"USD", "SGD", "AUD", "CAD", "HKD", "NZD", "MXN"}}
# the currency of a tax id's country (EU VAT prefixes of euro countries, and others)
COUNTRY_CURRENCY = {**{c: "EUR" for c in "AT BE CY DE EE ES FI FR GR EL HR IE IT LT LU LV MT NL PT SI SK".split()},
                    "GB": "GBP", "US": "USD", "AU": "AUD", "CH": "CHF", "SE": "SEK", "DK": "DKK", "PL": "PLN",
                    "CZ": "CZK", "HU": "HUF", "RO": "RON", "BG": "BGN", "NO": "NOK", "MY": "MYR", "SG": "SGD"}
_CODE_WORD = re.compile(r"(?<![A-Z])([A-Z]{3})(?![A-Z])")
# "Sdn Bhd" (a Malaysian company suffix) is not Bahraini dinars
_COMPANY_SUFFIX = re.compile(r"\bSDN\.?\s*BHD\b\.?")
# ISO codes that are also ordinary words or abbreviations on a receipt
_WORDS_NOT_CODES = frozenset({"ALL", "TOP", "CUP", "MOP", "BOB", "GEL", "PEN", "TRY", "SOS", "MAD", "CVE", "ERN",
                              "LAK", "BAM", "PAB", "AMD", "SAR", "STN", "TMT", "MNT", "NIO", "KES", "BIF"})


@dataclass
class Check:
    rule: str
    ok: bool
    reason: str
    fields: tuple[str, ...] = ()

    def as_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["fields"] = list(self.fields)
        return d


@dataclass
class Rules:
    """The brief's thresholds the rules read (``DocumentSettings`` carries them in the flow)."""

    required_fields: Sequence[str] = ("vendor", "date", "total", "currency")
    min_confidence: Mapping[str, float] = field(default_factory=dict)
    amount_tolerance: Decimal = Decimal("0.05")
    max_age_days: int = 365
    future_tolerance_days: int = 1


_THOUSANDS_COMMA = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")  # 1,234.56
_THOUSANDS_DOT = re.compile(r"^-?\d{1,3}(\.\d{3})+(,\d+)?$")  # 1.234,56
_DECIMAL_COMMA = re.compile(r"^-?\d+,\d{1,2}$")  # 12,50


def amount(value: Any) -> Decimal | None:
    """A decimal from an amount as printed or typed: "1234.56", "1,234.56", "1.234,56", "12,50"; anything
    else (a comma that is neither a thousands separator nor a decimal comma) is not an amount."""
    if value is None or value == "":
        return None
    text = str(value).strip().replace(" ", "")
    if _THOUSANDS_COMMA.match(text):
        text = text.replace(",", "")
    elif _THOUSANDS_DOT.match(text):
        text = text.replace(".", "").replace(",", ".")
    elif _DECIMAL_COMMA.match(text):
        text = text.replace(",", ".")
    elif "," in text:
        return None
    try:
        d = Decimal(text)
    except InvalidOperation:
        return None
    return d if d.is_finite() else None


def iso_date(value: Any) -> date | None:
    try:
        return date.fromisoformat(str(value)) if value else None
    except ValueError:
        return None


def norm_text(value: Any) -> str:
    """Case, spaces and punctuation removed: how vendors and numbers are compared."""
    return re.sub(r"[^0-9A-Z]", "", str(value or "").upper())


# --- duplicates ---------------------------------------------------------------------------------

@dataclass
class DuplicateIndex:
    """Keys of the documents already in the flow: file hash, vendor + number, vendor + date + total."""

    by_key: dict[tuple, str] = field(default_factory=dict)
    numbers: dict[str, str] = field(default_factory=dict)  # item id -> its normalised document number

    @staticmethod
    def keys(sha256: str | None, fields: Mapping[str, Any]) -> list[tuple]:
        v = {k: (fields.get(k) or {}).get("value") for k in ("vendor", "number", "date", "total")}
        vendor = norm_text(v["vendor"])
        out: list[tuple] = []
        if sha256:
            out.append(("file", sha256))
        if vendor and norm_text(v["number"]):
            out.append(("vendor+number", vendor, norm_text(v["number"])))
        total = amount(v["total"])
        if vendor and v["date"] and total is not None:
            out.append(("vendor+date+total", vendor, str(v["date"]), str(total.normalize())))
        return out

    @staticmethod
    def _number(fields: Mapping[str, Any]) -> str:
        return norm_text((fields.get("number") or {}).get("value"))

    def add(self, item_id: str, sha256: str | None, fields: Mapping[str, Any]) -> None:
        self.numbers.setdefault(item_id, self._number(fields))
        for k in self.keys(sha256, fields):
            self.by_key.setdefault(k, item_id)

    def find(self, item_id: str, sha256: str | None, fields: Mapping[str, Any]) -> list[tuple[str, str]]:
        """(kind, other item id) for every key this document shares with another one. Same vendor, date and
        total is a duplicate only when one of the two has no number (two numbered bills may be alike)."""
        mine = self._number(fields)
        out = []
        for k in self.keys(sha256, fields):
            other = self.by_key.get(k)
            if other is None or other == item_id:
                continue
            if k[0] == "vendor+date+total" and mine and self.numbers.get(other):
                continue
            out.append((k[0], other))
        return out


# --- the rules ----------------------------------------------------------------------------------

def _value(fields: Mapping[str, Any], name: str) -> Any:
    return (fields.get(name) or {}).get("value")


def check_schema(fields, line_items, rules: Rules) -> Check:
    missing = [f for f in rules.required_fields if _value(fields, f) in (None, "") and
               not (fields.get(f) or {}).get("unparsed")]
    bad = [f"{f} (read as {fv['unparsed']!r}, not a valid {f})" for f, fv in fields.items()
           if isinstance(fv, Mapping) and fv.get("unparsed")]
    if _value(fields, "date") and iso_date(_value(fields, "date")) is None:
        bad.append("date (not an ISO date)")
    for f in ("subtotal", "tax", "total"):
        if _value(fields, f) not in (None, "") and amount(_value(fields, f)) is None:
            bad.append(f"{f} (not a number)")
    cur = _value(fields, "currency")
    if cur and str(cur).upper() not in ISO_4217:
        bad.append("currency (not an ISO 4217 code)")
    for i, li in enumerate(line_items, 1):
        if not str(li.get("description") or "").strip():
            bad.append(f"line {i} description (empty)")
        for f in ("quantity", "unit_price", "amount"):
            if li.get(f) not in (None, "") and amount(li.get(f)) is None:
                bad.append(f"line {i} {f} (not a number)")
    if missing or bad:
        parts = ([f"missing {', '.join(missing)}"] if missing else []) + ([f"invalid {'; '.join(bad)}"] if bad else [])
        return Check("schema", False, "; ".join(parts), tuple(missing) + tuple(b.split(" ")[0] for b in bad))
    return Check("schema", True, "required fields present and well-formed")


def check_line_arithmetic(line_items, rules: Rules) -> Check:
    wrong, checked = [], 0
    for i, li in enumerate(line_items, 1):
        q, p, a = amount(li.get("quantity")), amount(li.get("unit_price")), amount(li.get("amount"))
        if q is None or p is None or a is None:
            continue
        checked += 1
        if abs(q * p - a) > rules.amount_tolerance:
            wrong.append(f"line {i}: {q} x {p} = {(q * p).quantize(Decimal('0.01'))}, printed {a}")
    if wrong:
        return Check("line_arithmetic", False, "; ".join(wrong), ("line_items",))
    return Check("line_arithmetic", True, f"{checked} line(s) with quantity x unit price = amount"
                 if checked else "no line with quantity, unit price and amount to check")


def check_subtotal(fields, line_items, rules: Rules) -> Check:
    sub = amount(_value(fields, "subtotal"))
    amounts = [amount(li.get("amount")) for li in line_items]
    if sub is None or not amounts or any(a is None for a in amounts):
        return Check("subtotal_matches_lines", True, "nothing to check (no subtotal or no line amounts)")
    total = sum(amounts, Decimal(0))
    if abs(total - sub) > rules.amount_tolerance:
        return Check("subtotal_matches_lines", False,
                     f"the {len(amounts)} line amounts add up to {total}, the subtotal says {sub}",
                     ("subtotal", "line_items"))
    return Check("subtotal_matches_lines", True, f"{len(amounts)} line amounts add up to the subtotal {sub}")


def check_total(fields, rules: Rules) -> Check:
    sub, tax, total = (amount(_value(fields, f)) for f in ("subtotal", "tax", "total"))
    if total is None or sub is None:
        return Check("total_matches_subtotal_tax", True, "nothing to check (no subtotal or no total)")
    expected = sub + (tax or Decimal(0))
    if abs(expected - total) > rules.amount_tolerance:
        return Check("total_matches_subtotal_tax", False,
                     f"subtotal {sub} + tax {tax or 0} = {expected}, the total says {total}",
                     ("subtotal", "tax", "total"))
    return Check("total_matches_subtotal_tax", True, f"subtotal {sub} + tax {tax or 0} = total {total}")


def check_date(fields, rules: Rules, received: date) -> Check:
    d = iso_date(_value(fields, "date"))
    if d is None:
        return Check("date_plausible", False, "no document date to check", ("date",))
    if d > received + timedelta(days=rules.future_tolerance_days):
        return Check("date_plausible", False, f"dated {d}, after the document arrived ({received})", ("date",))
    age = (received - d).days
    if age > rules.max_age_days:
        return Check("date_plausible", False, f"dated {d}, {age} days before it arrived (the brief allows "
                                              f"{rules.max_age_days})", ("date",))
    return Check("date_plausible", True, f"dated {d}, {max(age, 0)} days before arrival")


def printed_currencies(text: str) -> tuple[set[str], set[str]]:
    """(ISO codes the text prints as words, currencies its symbols can mean: a bare $ is several)."""
    upper = _COMPANY_SUFFIX.sub(" ", text.upper())
    codes = {c for c in _CODE_WORD.findall(upper) if c in ISO_4217} - _WORDS_NOT_CODES
    symbols: set[str] = set()
    rest = text
    for sym in sorted(SYMBOLS, key=len, reverse=True):
        if sym == "RM":
            if re.search(r"(?<![A-Z])RM(?![A-Z])", upper):
                symbols |= SYMBOLS[sym]
        elif sym in rest:
            symbols |= SYMBOLS[sym]
            rest = rest.replace(sym, " ")
    return codes, symbols


def tax_id_country(tax_id: str | None) -> str | None:
    t = norm_text(tax_id)
    if len(t) > 4 and t[:2].isalpha() and t[2:].replace("X", "").isalnum() and any(ch.isdigit() for ch in t[2:]):
        return t[:2]
    return None


def check_currency(fields, text: str) -> Check:
    cur = str(_value(fields, "currency") or "").upper()
    if not cur:
        return Check("currency_consistent", False, "no currency", ("currency",))
    codes, symbols = printed_currencies(text)
    printed = codes | symbols
    if printed and cur not in printed:
        shown = ", ".join(sorted(codes)) or "symbols for " + ", ".join(sorted(symbols))
        return Check("currency_consistent", False, f"{cur}, but the document prints {shown}", ("currency",))
    country = tax_id_country(_value(fields, "tax_id"))
    home = COUNTRY_CURRENCY.get(country or "")
    if home and cur != home and cur not in codes:
        return Check("currency_consistent", False, f"{cur}, but the vendor's tax id is from {country} ({home}) and "
                                                   "no other currency code is printed", ("currency", "tax_id"))
    basis = ("what the document prints" if printed else f"the vendor's country ({country})" if home
             else "nothing printed (inferred)")
    return Check("currency_consistent", True, f"{cur} agrees with {basis}")


def check_tax_id(fields) -> Check:
    raw = _value(fields, "tax_id")
    if not raw:
        return Check("tax_id_checksum", True, "no tax id printed: nothing to check")
    from stdnum import exceptions
    from stdnum.eu import vat as eu_vat

    t = norm_text(raw)
    country = tax_id_country(raw)
    if country == "GB":
        from stdnum.gb import vat as module
        name = "GB VAT"
    elif country and country.lower() in eu_vat.MEMBER_STATES:
        module, name = eu_vat, "EU VAT"
    elif re.fullmatch(r"\d{2}-?\d{7}", str(raw).strip()):
        from stdnum.us import ein as module
        name = "US EIN"
    else:
        return Check("tax_id_checksum", True, "no checksum is defined for this id's format: not checked")
    try:
        module.validate(raw)
    except exceptions.ValidationError as exc:
        return Check("tax_id_checksum", False, f"{t} is not a valid {name} number ({exc.message})", ("tax_id",))
    return Check("tax_id_checksum", True, f"valid {name} number")


def check_duplicate(item_id: str, sha256: str | None, fields, index: DuplicateIndex) -> Check:
    hits = index.find(item_id, sha256, fields)
    if hits:
        kind, other = hits[0]
        return Check("duplicate", False, f"same {kind.replace('+', ' + ')} as document {other}",
                     ("vendor", "number") if kind == "vendor+number" else ("vendor", "date", "total"))
    return Check("duplicate", True, "no other document with the same file, vendor + number or vendor + date + total")


def check_confidence(fields, rules: Rules) -> Check:
    low = [(f, float((fields.get(f) or {}).get("confidence") or 0.0), t) for f, t in rules.min_confidence.items()
           if _value(fields, f) not in (None, "") and float((fields.get(f) or {}).get("confidence") or 0.0) < t]
    if low:
        return Check("confidence", False, "; ".join(f"{f} read with confidence {c:.2f} < {t:.2f}" for f, c, t in low),
                     tuple(f for f, _, _ in low))
    return Check("confidence", True, "every field at or above its confidence threshold")


def validate(item_id: str, fields: Mapping[str, Any], line_items: Sequence[Mapping[str, Any]], *, text: str,
             sha256: str | None, received: date, rules: Rules, duplicates: DuplicateIndex) -> list[Check]:
    """Every rule on one extracted document, in ``RULES`` order."""
    return [
        check_schema(fields, line_items, rules),
        check_line_arithmetic(line_items, rules),
        check_subtotal(fields, line_items, rules),
        check_total(fields, rules),
        check_date(fields, rules, received),
        check_currency(fields, text),
        check_tax_id(fields),
        check_duplicate(item_id, sha256, fields, duplicates),
        check_confidence(fields, rules),
    ]
