"""The embedded extractor: receipts and invoices as text lines with boxes -> ``ExtractionOutput``.

Offline and deterministic (no model, no network): it reads the *layout* of the page the way a person
skims a receipt, with keyword rules that hold across vendors rather than anything memorised.

1. **Lines and rows.** Every line gets an upper-cased text and a *compact* form without spaces, so the
   keywords still match when OCR drops the spaces ("TOTALRM128.50", "INVOICENO:INV-1042"). Two lines
   are on the same *row* when their vertical ranges overlap; a value for a keyword is read after the
   keyword on its own line, else from the nearest line to its right on the same row, else from the
   next line below.
2. **Amounts** are money tokens with two decimals ("1,234.56", "1.234,56", "RM3.90", "$8.20",
   "-0.01"); percentages, dates and quantities are not amounts. Each line is classed by its keyword:
   total (TOTAL, GRAND TOTAL, NETT, AMOUNT DUE, TOTAL INCL GST, ROUNDED TOTAL...), subtotal (SUBTOTAL,
   TOTAL EXCL...), tax (GST/VAT/TAX/SST amounts, not tax ids), tender (CASH, CHANGE, CARD...),
   rounding, other. The total is the best-scored total candidate: keyword strength, plus cross-checks
   (cash - change, subtotal + tax (+ service charge), the largest amount on the page, the value printed
   more than once), minus summary tables (a GST SUMMARY's TOTAL row); a rounded total after a
   rounding line wins over the unrounded one. Without a keyword, cash - change or the largest amount
   in the lower part of the page is a guess (confidence below 0.6). The final choice is made by a
   small learned ranker (``TOTAL_RANKER``: logistic-regression weights, fitted offline by
   ``benchmarks/documents_ranker_fit.py``; no model library at run time): every positive amount on
   the page is a candidate with layout features (keyword class of its row and the row above, position,
   largest amount, cash - change, subtotal + tax, sum of the line items, repeats, summary table...)
   and the rules' pick as one more feature; the total's confidence is the ranker's probability less
   half the best other value's. Under grouped cross-validation by vendor it chooses as well as the
   rules and its confidence is better calibrated; ``TOTAL_CHOICE = "rules"`` switches back.
3. **Dates** in many formats (DD/MM/YYYY, DD-MM-YY, DD.MM.YYYY, YYYY-MM-DD, "12 Mar 2018",
   "MAR 12, 2018", "12MAR2018", "02/JAN/2017"); day first unless the second number cannot be a month
   or the document is from the US; impossible dates are refused. Dates next to a DATE keyword win.
4. **Vendor, address.** The address block starts at the first line near the top with address cues
   (a postcode, street words such as JALAN / LOT / TAMAN / STREET / STRASSE, a state, city or country,
   a leading house number) and runs until a TEL / FAX / GST / e-mail / web / document line. The vendor
   is chosen among the name-like lines above it: a legal-form suffix (SDN BHD, BHD, S/B, LTD, GMBH,
   INC, LLC...) beats a business word (ENTERPRISE, TRADING, RESTAURANT...), which beats a plain line;
   a name split over lines is joined, registration numbers ("(JM0517726)", "822737-X") and owner
   prefixes ("OWNED BY:") are dropped. The address's lines are joined with ", " (unless a line
   already ends in a comma): "Hauptstrasse 12" / "10115 Berlin" -> "Hauptstrasse 12, 10115 Berlin".
5. **Tax id, number, currency.** A tax-id keyword (GST ID/NO/REG, SST, VAT REG NO, USt-IdNr, TIN,
   ABN, EIN...) followed by an id, checked with python-stdnum where the country has a checksum; a
   document-number keyword (INVOICE NO, INVOICE #, RECEIPT #, DOC NO, BILL NO, INV#...) followed by a
   token with a digit; an ISO currency code, else a symbol (RM, S$, EUR sign, pound sign, yen sign;
   "$" by the country), else the country of the address or tax id, else ``default_currency``.
6. **Line items**: rows between the item table's header and the first subtotal / total line. The
   numeric columns are the boxes that hold only numbers (OCR runs) or the trailing number tokens of
   a one-line row, as many as the header names (quantity, unit price, amount); digits inside a
   description ("Flyers A5 (1000)", "Extra storage 1 TB") stay in it. A row reads as quantity x unit
   price = amount (confidence high when the product checks), as the header's three columns in order
   (low confidence when they do not add up, so validation can say which line is wrong), as a leading
   quantity ("2 TOWEL ROD 6.00 12.00"), or as description + amount (best effort, lower confidence).
   A row that checks is an item even when its description holds a keyword ("Business cards",
   "Backup service", "Total care kit"), and is then no tender / service / total line.

Confidences say how the value was found: a keyword-anchored value that a cross-check confirms is
around 0.9 or more; a keyword-anchored value alone around 0.7-0.8; a guess below 0.6; unknown is None
with confidence 0.

``normalise`` is the comparison used to score extraction against labels, and ``sroie_accuracy`` runs
the extractor over the labelled receipts of the ``sroie-dev`` data folder (used by the accuracy
benchmark and the tests).
"""

from __future__ import annotations

import hashlib
import json
import math
import re
from dataclasses import dataclass, field
from datetime import date
from decimal import Decimal, InvalidOperation
from pathlib import Path
from typing import Iterable

from ...lib.docread import Line
from .schema import ExtractionOutput, FieldValue, LineItem

EXTRACTOR_VERSION = "layout-v2"  # v2: line items by columns, address lines joined with ", "

__all__ = ["EXTRACTOR_VERSION", "extract", "find_amounts", "find_dates", "normalise", "parse_amount",
           "sroie_accuracy", "sroie_split"]

CENT = Decimal("0.01")

# --- amounts ----------------------------------------------------------------------------------

_CUR_SYMBOL = r"(?:RM|MYR|USD|EUR|GBP|SGD|AUD|CAD|CHF|JPY|S\$|US\$|A\$|C\$|\$|€|£|¥)"
_AMOUNT = re.compile(
    r"(?<![\d.,/:])(?P<neg>-\s?)?(?:(?P<cur>" + _CUR_SYMBOL + r")\s?)?"
    r"(?P<int>\d{1,3}(?:,\d{3})+|\d{1,3}(?:\.\d{3})+|\d{1,3}(?:'\d{3})+|\d+)"
    r"(?P<sep>[.,])(?P<dec>\d{2})(?!\d)(?!\s?%)(?![.,]\d)")


@dataclass(frozen=True)
class Amount:
    value: Decimal
    start: int
    end: int
    currency: str | None  # the symbol or code printed with it


def parse_amount(text: str) -> Decimal | None:
    """The money value of ``text`` ("1,234.56", "1.234,56", "RM 3.90", "-0.01", "$8.20"), or None."""
    found = find_amounts(text)
    return found[0].value if len(found) == 1 else None


def find_amounts(text: str) -> list[Amount]:
    """Every money token in ``text`` (two decimals; thousands separators ``,`` ``.`` or ``'``)."""
    out = []
    for m in _AMOUNT.finditer(text):
        whole, sep = m.group("int"), m.group("sep")
        thousands = next((c for c in ",.'" if c in whole), None)
        if thousands is not None and thousands == sep:
            continue  # "1.234.56" is not a number
        try:
            value = Decimal(re.sub(r"[,.']", "", whole) + "." + m.group("dec"))
        except InvalidOperation:
            continue
        if m.group("neg"):
            value = -value
        out.append(Amount(value, m.start(), m.end(), m.group("cur")))
    return out


def _fmt(value: Decimal | None) -> str | None:
    return None if value is None else str(value.quantize(CENT))


# --- dates ------------------------------------------------------------------------------------

_MONTHS = {"JAN": 1, "FEB": 2, "MAR": 3, "APR": 4, "MAY": 5, "JUN": 6, "JUL": 7, "AUG": 8, "SEP": 9,
           "OCT": 10, "NOV": 11, "DEC": 12, "MRZ": 3, "MÄR": 3, "MAI": 5, "OKT": 10, "DEZ": 12}
_MONTH = (r"(?P<mon>JAN(?:UARY)?|FEB(?:RUARY)?|MAR(?:CH)?|APR(?:IL)?|MAY|JUN(?:E)?|JUL(?:Y)?|AUG(?:UST)?"
          r"|SEP(?:T(?:EMBER)?)?|OCT(?:OBER)?|NOV(?:EMBER)?|DEC(?:EMBER)?|MÄR(?:Z)?|MRZ|MAI|OKT(?:OBER)?"
          r"|DEZ(?:EMBER)?)(?![A-Z])")
_DATE_END = r"(?:(?![\d/\-]|[.,]\d)|(?=\d{1,2}:\d{2}))"  # a time glued on (a dropped space) ends it too
_DATE_NUMERIC = re.compile(r"(?<![\d/.\-])(?P<a>\d{1,2})(?P<s>[/\-.])(?P<b>\d{1,2})(?P=s)(?P<y>(?:19|20)\d{2}|\d{2})"
                           + _DATE_END)
_DATE_ISO = re.compile(r"(?<![\d/.\-])(?P<y>(?:19|20)\d{2})(?P<s>[/\-.])(?P<b>\d{1,2})(?P=s)(?P<a>\d{1,2})"
                       + _DATE_END)
_DATE_DMY_NAME = re.compile(r"(?<!\d)(?P<a>\d{1,2})(?:ST|ND|RD|TH)?[\s\-/.,]*" + _MONTH +
                            r"[\s\-/.,']*(?P<y>(?:19|20)\d{2}|\d{2})" + _DATE_END)
_DATE_MDY_NAME = re.compile(r"(?<![A-Z])" + _MONTH + r"[\s.\-/]*(?P<a>\d{1,2})(?:ST|ND|RD|TH)?[\s,.\-/]+"
                            r"(?P<y>(?:19|20)\d{2})" + _DATE_END)
_MIN_YEAR, _MAX_YEAR = 1990, 2099


@dataclass(frozen=True)
class FoundDate:
    value: date
    start: int
    end: int
    quality: float  # 1.0: four-digit year or month name and no ambiguity; lower when guessed


def _year(text: str) -> int:
    y = int(text)
    return y + (2000 if y < 70 else 1900) if len(text) == 2 else y


def _make_date(y: int, m: int, d: int) -> date | None:
    if not _MIN_YEAR <= y <= _MAX_YEAR:
        return None
    try:
        return date(y, m, d)
    except ValueError:
        return None


def find_dates(text: str, *, month_first: bool = False) -> list[FoundDate]:
    """Every plausible calendar date in ``text`` (upper-cased inside). Numeric dates are read day
    first (``month_first`` for US documents) unless only the other order is a real date."""
    up = text.upper()
    out: list[FoundDate] = []
    taken: list[tuple[int, int]] = []

    def add(d: date | None, m: re.Match, quality: float) -> None:
        if m.start() > 0 and up[m.start() - 1].isalpha() and not m.group(0)[:1].isalpha():
            quality -= 0.3  # glued to a word ("XE11-22-30"): more likely a code than a date
        if d is not None and not any(s < m.end() and m.start() < e for s, e in taken):
            out.append(FoundDate(d, m.start(), m.end(), quality))
            taken.append((m.start(), m.end()))

    for m in _DATE_ISO.finditer(up):
        add(_make_date(int(m.group("y")), int(m.group("b")), int(m.group("a"))), m, 1.0)
    for rx in (_DATE_DMY_NAME, _DATE_MDY_NAME):
        for m in rx.finditer(up):
            mon = _MONTHS[m.group("mon")[:3]]
            add(_make_date(_year(m.group("y")), mon, int(m.group("a"))), m, 1.0)
    for m in _DATE_NUMERIC.finditer(up):
        a, b, y = int(m.group("a")), int(m.group("b")), _year(m.group("y"))
        first, second = (b, a) if month_first else (a, b)  # (day, month)
        d = _make_date(y, second, first)
        quality = 1.0 if len(m.group("y")) == 4 else 0.85
        if d is None:  # only the other order is a date
            d = _make_date(y, first, second)
        elif a <= 12 and b <= 12 and a != b:
            quality -= 0.1  # both orders are dates: the convention decided
        add(d, m, quality)
    return sorted(out, key=lambda f: f.start)


# --- normalisation for scoring ----------------------------------------------------------------

def normalise(field_name: str, value: str | None):
    """The comparable form of a field value, for scoring extraction against labels.

    company / vendor / address (and any other text field): upper case, letters and digits only;
    date: a ``datetime.date`` (a label as printed, read day first, or an ISO date);
    total / subtotal / tax / amounts: a ``Decimal`` (currency symbols and thousands separators
    ignored). None when the value is missing or cannot be read."""
    if value is None:
        return None
    value = str(value).strip()
    if field_name == "date":
        try:
            return date.fromisoformat(value)
        except ValueError:
            pass
        found = find_dates(value)
        return found[0].value if found else None
    if field_name in ("total", "subtotal", "tax", "amount", "unit_price"):
        found = find_amounts(value)
        if found:
            return found[-1].value
        digits = re.sub(r"[^\d.\-]", "", value)
        try:
            return Decimal(digits) if digits else None
        except InvalidOperation:
            return None
    text = re.sub(r"[^A-Z0-9]", "", value.upper())
    return text or None


# --- keywords ---------------------------------------------------------------------------------
# Matched against the compact line (upper case, no spaces), so they survive dropped spaces.

_KW_SUBTOTAL = re.compile(r"SUBTOTAL|SUB-TOTAL|SUBTTL|SUB TOTAL|TOTALEXCL|EXCLUDINGGST|EXCL\.?(?:GST|VAT|TAX)"
                          r"|TOTALBEFORE|AMOUNTBEFORE|BEFORETAX|NETAMOUNT|NETTO|ZWISCHENSUMME|TOTALSALES\(EXC")
_KW_TAX_TOTAL = re.compile(r"TOTAL(?:GST|TAX|VAT|SST)(?!INCL|INC\b)|(?:GST|TAX|VAT|SST)TOTAL|TOTALSALESTAX")
_KW_TOTAL = re.compile(r"TOTAL|TTL|AMOUNTDUE|AMTDUE|BALANCEDUE|TOTALDUE|PAYABLE|NETT|JUMLAH|GESAMT|SUMME"
                       r"|ZUZAHLEN|ENDBETRAG|MONTANT")
_KW_TOTAL_NOT = re.compile(r"TOTAL\d+(?:\.\d+)?%|TOTALQ|TOTALITEM|ITEMS?TOTAL|TALQUANTITY|TOTALQTY|TOTALDISC"
                           r"|TOTALSAV|TOTALPOINT"
                           r"|TOTALNO|TOTALWEIGHT|TOTALUNIT|TOTALPCS|TOTALPIECE|QTYTOTAL|TOTALSAVING|PAYABLE\(6|"
                           r"GSTPAYABLE|TAXPAYABLE|VATPAYABLE|TOTALGROSS")
_KW_TOTAL_STRONGEST = re.compile(r"GRAND|NETT|NETTOTAL|AMOUNTDUE|AMTDUE|BALANCEDUE|TOTALDUE|PAYABLE|ROUNDED|ROUND"
                                 r"|RND|AFTER|ZUZAHLEN|ENDBETRAG")
_KW_TOTAL_STRONG = re.compile(r"INCL|INC\.|INCLUSIVE|TOTALAMOUNT|TOTALAMT|JUMLAH|GESAMT"
                              r"|TOTAL\(?(?:RM|MYR|EUR|USD|GBP|\$)")
_KW_PAID_INCL = re.compile(r"^(?:AMOUNT|AMT)(?:PAID)?(?:INCL|INC\.)")  # "AMT PAID INCL GST", "AMOUNT INCL. GST"
_KW_PAID = re.compile(r"TOTALPAID|AMOUNTPAID|AMTPAID|PAIDAMOUNT|TENDER|ACCEPTED|RECEIVED")
_KW_TAX = re.compile(r"(?<![A-Z])(?:GST|VAT|TAX|SST|MWST|UST|SALES\s?TAX|SERVICE\s?TAX|HST|PST|IVA|TVA|BTW)"
                     r"(?![A-Z]{3})")
_KW_TAX_NOT = re.compile(r"GSTID|GSTNO|GSTREG|GSTREF|GSTNUM|TAXINV|INVOICE|INCL|INCLUSIVE|SUMMARY|TAXCODE|EXCL"
                         r"|REGNO|REG\.|VATNO|VATREG|TAXID|USTID|UST-ID|TAXNO|CODE|RELIEF|ACT\b|GSTACT"
                         r"|INCLUDED|TAX\(RM\)|GST\(RM\)|TAX\(\$\)|TAXAMT|AMT\(RM\)")
_KW_TENDER = re.compile(r"CASH(?!IER)|TENDER|PAID|PAYMENT|VISA|MASTER|CARD|CREDIT|DEBIT|AMEX|CHANGE|BALANCE|REFUND"
                        r"|KEMBALI|TUNAI|BAYAR|VOUCHER|EFTPOS|E-WALLET|EWALLET|GRABPAY")
_KW_CHANGE = re.compile(r"CHANGE|KEMBALI|BALANCE(?!DUE)")
_KW_ROUNDING = re.compile(r"(?<![A-Z])(?:ROUND|RND|ADJ)")
_KW_SERVICE = re.compile(r"(?<![A-Z])(?:SERV|SVC|SRV|SERVICE|TIPS?(?![A-Z]))")
_KW_SUMMARY = re.compile(r"SUMMARY|TAXCODE|GSTANALYSIS|TAXANALYSIS")
_KW_DATE = re.compile(r"DATE|DATUM|TARIKH|DTE|BIZDATE|CLOSED|ISSUED")
_KW_DATE_WEAK = re.compile(r"DUE|EXPIR|VALID|BIRTH|DELIVERY|PRINTED|PERIOD")

_ITEM_HEADER_WORDS = re.compile(r"\b(QTY|QUANTITY|DESCRIPTION|DESC|ITEM|ITEMS|PRICE|U/P|S/PRICE|UNIT|AMOUNT|AMT"
                                r"|TOTAL|MENGE|PREIS|BETRAG|BEZEICHNUNG|ARTIKEL)\b")


# --- the document model -----------------------------------------------------------------------

@dataclass
class _Ln:
    """One line with what the rules need: upper text, compact text (no spaces) with a map back to
    the upper text, its box, and its amounts."""

    line: Line
    pos: int  # position in reading order (0-based, list index)
    up: str
    compact: str
    cmap: list[int]
    amounts: list[Amount]
    kind: str = "other"  # total | subtotal | tax | tender | rounding | service | other
    strength: float = 0.0  # for totals: 3 (GRAND TOTAL, NETT, AMOUNT DUE...), 2.5 (TOTAL INCL...), 2 (TOTAL)

    @property
    def x0(self) -> float:
        return self.line.box[0]

    @property
    def x1(self) -> float:
        return self.line.box[2]

    @property
    def y0(self) -> float:
        return self.line.box[1]

    @property
    def y1(self) -> float:
        return self.line.box[3]

    @property
    def height(self) -> float:
        return max(1e-6, self.y1 - self.y0)

    def orig_index(self, compact_end: int) -> int:
        """The position in ``up`` just after the compact text's first ``compact_end`` characters."""
        if compact_end <= 0:
            return 0
        return self.cmap[min(compact_end, len(self.cmap)) - 1] + 1


def _prepare(lines: list[Line]) -> list[_Ln]:
    out = []
    for pos, line in enumerate(lines):
        up = line.text.upper()
        cmap = [i for i, ch in enumerate(up) if not ch.isspace()]
        compact = "".join(up[i] for i in cmap)
        out.append(_Ln(line, pos, up, compact, cmap, find_amounts(up)))
    return out


def _same_row(a: _Ln, b: _Ln) -> bool:
    if a.line.page != b.line.page:
        return False
    overlap = min(a.y1, b.y1) - max(a.y0, b.y0)
    return overlap >= 0.45 * min(a.height, b.height)


@dataclass
class _Doc:
    lines: list[_Ln]
    rows: list[list[int]] = field(default_factory=list)  # positions, left to right
    row_of: list[int] = field(default_factory=list)
    announced: dict[int, "_Cand | None"] = field(default_factory=dict)  # keyword line -> its value (_amount_fields)

    @classmethod
    def build(cls, lines: list[Line]) -> "_Doc":
        doc = cls(_prepare(lines))
        for ln in doc.lines:  # reading order is top to bottom: a row is a run of overlapping lines
            if doc.rows and _same_row(doc.lines[doc.rows[-1][0]], ln):
                doc.rows[-1].append(ln.pos)
            else:
                doc.rows.append([ln.pos])
            doc.row_of.append(len(doc.rows) - 1)
        for row in doc.rows:
            row.sort(key=lambda p: doc.lines[p].x0)
        return doc

    def right_of(self, ln: _Ln) -> list[_Ln]:
        """Lines on the same row to the right of ``ln``, nearest first (also neighbours in reading
        order that overlap it vertically, for skewed scans)."""
        out = [self.lines[p] for p in self.rows[self.row_of[ln.pos]] if self.lines[p].x0 >= ln.x1 - 2
               and p != ln.pos]
        for p in range(max(0, ln.pos - 3), min(len(self.lines), ln.pos + 4)):
            other = self.lines[p]
            if p != ln.pos and other not in out and other.x0 >= ln.x1 - 2 and _same_row(ln, other):
                out.append(other)
        return sorted(out, key=lambda o: o.x0)

    def below(self, ln: _Ln, limit: int = 3) -> list[_Ln]:
        """The next few lines below ``ln`` (not on its row), in reading order."""
        out = []
        for p in range(ln.pos + 1, len(self.lines)):
            other = self.lines[p]
            if self.row_of[p] == self.row_of[ln.pos] or _same_row(ln, other):
                continue
            out.append(other)
            if len(out) >= limit:
                break
        return out

    @property
    def text(self) -> str:
        return "\n".join(ln.up for ln in self.lines)


# --- classification of amount lines -----------------------------------------------------------

def _classify(ln: _Ln) -> None:
    c, up = ln.compact, ln.up
    if _KW_PAID_INCL.search(c):
        ln.kind, ln.strength = "total", 2.5
    elif _KW_SUBTOTAL.search(c):
        ln.kind = "subtotal"
    elif _KW_TAX_TOTAL.search(c):
        ln.kind = "tax"
    elif _KW_PAID.search(c):
        ln.kind = "tender"
    elif _KW_TOTAL.search(c) and not _KW_TOTAL_NOT.search(c):
        ln.kind = "total"
        ln.strength = 3.0 if _KW_TOTAL_STRONGEST.search(c) else 2.5 if _KW_TOTAL_STRONG.search(c) else 2.0
    elif _KW_TENDER.search(c):
        ln.kind = "tender"
    elif _KW_ROUNDING.search(up) and not _KW_TAX.search(up):
        ln.kind = "rounding"
    elif _KW_TAX.search(up) and not _KW_TAX_NOT.search(c):
        ln.kind = "tax"
    elif _KW_SERVICE.search(up):
        ln.kind = "service"
    elif _KW_TOTAL.search(c) and "GROSS" in c:
        ln.kind, ln.strength = "total", 1.5


_KW_ANY = re.compile("|".join(rx.pattern for rx in (_KW_SUBTOTAL, _KW_TOTAL, _KW_TAX, _KW_TENDER,
                                                   _KW_ROUNDING)))


def _keyword_end(ln: _Ln) -> int:
    """Where the line's amount keyword ends, in ``ln.up`` coordinates (0 when none)."""
    ends = [m.end() for m in _KW_ANY.finditer(ln.compact)]
    return ln.orig_index(ends[-1]) if ends else 0


@dataclass
class _Cand:
    value: Decimal
    lines: list[int]
    kind: str
    strength: float
    pos: int
    in_table: bool = False  # the value sits in a row with several amounts (a summary table)
    score: float = 0.0


def _value_for(doc: _Doc, ln: _Ln) -> _Cand | None:
    """The amount a keyword line announces: after the keyword on the line, else on the same row to
    its right, else on the next line below when that line is only an amount."""
    end = _keyword_end(ln)
    after = [a for a in ln.amounts if a.start >= end - 1]
    idx = [ln.line.index]
    row_amounts = len(ln.amounts)
    value = None
    if after:
        value = after[0].value if len(after) == 1 or ln.kind != "tax" else after[-1].value
    else:
        for other in doc.right_of(ln):
            if other.kind != "other" and other.kind != ln.kind and _KW_ANY.search(other.compact):
                break  # another keyword first: its value is not ours
            if other.amounts:
                value = other.amounts[0].value if ln.kind != "tax" else other.amounts[-1].value
                idx.append(other.line.index)
                row_amounts += sum(len(o.amounts) for o in doc.right_of(ln))
                break
    if value is None:
        for other in doc.below(ln, limit=1):
            if other.amounts and re.fullmatch(r"[\s\w$€£¥:.,\-()]*", other.up) and other.kind == "other" \
                    and len(re.sub(r"[^A-Z]", "", other.up.replace("RM", ""))) <= 2:
                value = other.amounts[0].value
                idx.append(other.line.index)
                row_amounts = len(other.amounts)
    if value is None:
        return None
    return _Cand(value, idx, ln.kind, ln.strength, ln.pos, in_table=row_amounts >= 2 and ln.kind == "total")


# --- totals, subtotal, tax --------------------------------------------------------------------

def _amount_fields(doc: _Doc) -> dict[str, FieldValue]:
    """Total, subtotal and tax from the keyword lines, scored with the cross-checks."""
    n = max(1, len(doc.lines))
    summary_from = next((ln.pos for ln in doc.lines if _KW_SUMMARY.search(ln.compact)), n)
    doc.announced = {ln.pos: _value_for(doc, ln) for ln in doc.lines if ln.kind != "other"}
    cands = [c for c in doc.announced.values() if c is not None]
    by_kind: dict[str, list[_Cand]] = {}
    for c in cands:
        if c.kind == "rounding" and abs(c.value) >= Decimal("0.10"):
            c.kind, c.strength = "total", 3.0  # "ROUNDING RM 182.00": the rounded total, not an adjustment
        by_kind.setdefault(c.kind, []).append(c)

    tender = [c for c in by_kind.get("tender", []) if not _KW_CHANGE.search(doc.lines[c.pos].compact)]
    change = [c for c in by_kind.get("tender", []) if _KW_CHANGE.search(doc.lines[c.pos].compact)]
    paid_minus_change = {t.value - ch.value for t in tender for ch in change if t.value > ch.value}
    paid = {t.value for t in tender if t.value > 0}
    non_tender = [a.value for ln in doc.lines if ln.kind != "tender" for a in ln.amounts]
    largest = max(non_tender, default=None)
    counts: dict[Decimal, int] = {}
    for ln in doc.lines:
        for a in ln.amounts:
            counts[a.value] = counts.get(a.value, 0) + 1
    subtotals = [c for c in by_kind.get("subtotal", []) if c.pos < summary_from]
    taxes = [c for c in by_kind.get("tax", []) if c.value >= 0]
    services = [c.value for c in by_kind.get("service", [])]
    adjustments = [c for c in by_kind.get("rounding", []) if c.value != 0]
    sums = {s.value + t.value + sv for s in subtotals for t in taxes for sv in [Decimal(0), *services]}
    sums |= {s.value + sv for s in subtotals for sv in services}

    totals = [c for c in by_kind.get("total", []) if c.value > 0]
    checks: dict[int, int] = {}
    for c in totals:
        score, k = c.strength, 0
        if c.value in paid_minus_change:
            score, k = score + 1.0, k + 1
        elif c.value in paid:
            score, k = score + 0.3, k + 1
        if c.value in sums:
            score, k = score + 0.8, k + 1
        if largest is not None and c.value == largest:
            score, k = score + 0.5, k + 1
        # the total after a rounding adjustment (an earlier total + the adjustment) is the amount due
        if any(r.pos < c.pos and any(t.pos < r.pos and t.value + r.value == c.value for t in totals)
               for r in adjustments):
            score, k = score + 1.5, k + 1
        if any(c.pos < r.pos and any(r.pos < t.pos and c.value + r.value == t.value for t in totals)
               for r in adjustments):
            score -= 0.5  # superseded by the rounded total below it
        score += 0.15 * min(counts.get(c.value, 1) - 1, 3)
        if c.pos > summary_from:
            score -= 1.5
        if c.in_table:
            score -= 0.5
        c.score = score + 0.2 * c.pos / n  # lower on the page: nearer the amount due
        checks[id(c)] = k

    out: dict[str, FieldValue] = {}
    total_value = None
    if totals:
        best = max(totals, key=lambda c: (c.score, c.pos))
        rivals = {c.value for c in totals if c.value != best.value and c.score > best.score - 0.6}
        conf = 0.66 + 0.08 * min(checks[id(best)], 3) + 0.04 * (best.strength - 2.0)
        if rivals:
            conf -= 0.15
        if best.pos > summary_from:
            conf -= 0.2
        out["total"] = FieldValue(value=_fmt(best.value), confidence=round(max(0.3, min(conf, 0.98)), 3),
                                  lines=best.lines)
        total_value = best.value
    else:
        # no total keyword: the value most guesses agree on (cash - change, what was paid,
        # subtotal + tax), else the largest amount in the lower two thirds of the page
        guesses: list[tuple[Decimal, list[int]]] = []
        guesses += [(v, [c.lines[0] for c in tender + change]) for v in sorted(paid_minus_change, reverse=True)]
        guesses += [(s.value + t.value, s.lines + t.lines) for s in subtotals for t in taxes]
        guesses += [(s.value, s.lines) for s in subtotals]
        guesses += [(t.value, t.lines) for t in tender if t.value > 0]
        low = [(a.value, [ln.line.index]) for ln in doc.lines[n // 3:] if ln.kind not in ("tender", "tax")
               for a in ln.amounts if a.value > 0]
        if low:
            guesses.append(max(low, key=lambda g: g[0]))
        if guesses:
            votes: dict[Decimal, int] = {}
            for v, _ in guesses:
                votes[v] = votes.get(v, 0) + 1
            value, idx = max(guesses, key=lambda g: votes[g[0]])
            conf = 0.55 if votes[value] >= 2 else 0.35
            out["total"] = FieldValue(value=_fmt(value), confidence=conf, lines=idx)
            total_value = value

    # subtotal and tax: the pair that adds up to the total wins, else the first of each
    pair = None
    if total_value is not None:
        extra = sum(services, Decimal(0))
        pair = next(((s, t) for s in subtotals for t in taxes
                     if s.value + t.value == total_value or s.value + t.value + extra == total_value), None)
    if pair:
        out["subtotal"] = FieldValue(value=_fmt(pair[0].value), confidence=0.9, lines=pair[0].lines)
        out["tax"] = FieldValue(value=_fmt(pair[1].value), confidence=0.9, lines=pair[1].lines)
        if "total" in out and out["total"].confidence >= 0.6:
            out["total"].confidence = round(max(out["total"].confidence, 0.9), 3)
    else:
        if subtotals:
            s = subtotals[0]
            out["subtotal"] = FieldValue(value=_fmt(s.value), confidence=0.6, lines=s.lines)
        before = [t for t in taxes if t.pos < summary_from] or taxes
        if before:
            t = before[0]
            out["tax"] = FieldValue(value=_fmt(t.value), confidence=0.55 if t.pos < summary_from else 0.4,
                                    lines=t.lines)
    return out


# --- the learned total ranker -------------------------------------------------------------------
# Every positive amount on the page is a total candidate with the features below; a logistic
# regression over them (weights in ``TOTAL_RANKER``, fitted offline by benchmarks/documents_ranker_fit.py)
# scores each candidate, the best one is the total, and its probability (with the margin over the
# best other value) is the confidence. The rules' own choice is one of the features ("rule_pick";
# "rule_guess" when the page has no total keyword): under grouped 5-fold CV by vendor the ranker on
# the layout features alone chose worse than the rules (0.89 vs 0.98 pooled), with the rules' pick
# as a feature it ties with them in every fold (0.98) and its confidence is better calibrated
# (Brier 0.042 vs 0.063). Refit with ``.venv/bin/python benchmarks/documents_ranker_fit.py --write``
# (labelled receipts of sroie-dev; label: the candidate equals the labelled total; L2, C = 1).

_RK_GRAND = re.compile(r"GRAND")
_RK_NETT = re.compile(r"NETT|NETTOTAL|NETAMOUNTDUE")
_RK_ROUND = re.compile(r"ROUND|RND|ADJ")
_RK_INCL = re.compile(r"INCL|INC\.|INCLUSIVE|INCGST|INCSST|INCTAX")
_RK_DUE = re.compile(r"AMOUNTDUE|AMTDUE|BALANCEDUE|TOTALDUE|PAYABLE|ZUZAHLEN|ENDBETRAG")
_RK_QTY = re.compile(r"QTY|QUANTITY|ITEM|PCS|PIECE|UNIT|COUNT|NO\.?OF|WEIGHT|POINT")
_RK_DISCOUNT = re.compile(r"DISC|SAVING|VOUCHER|REBATE|LESS|COUPON|PROMO")

TOTAL_FEATURES = (
    "kw_total", "kw_strength", "kw_grand", "kw_nett", "kw_round", "kw_incl", "kw_due", "kw_subtotal",
    "kw_tax", "kw_tender", "kw_change", "kw_qty", "kw_discount", "kw_none", "above_total", "above_tender",
    "kw_same_line", "kw_same_row", "kw_below", "rel_pos", "last_total_kw", "is_max", "is_max_below",
    "rel_value", "eq_cash_minus_change", "eq_paid", "eq_sub_tax", "eq_sub_tax_rounded", "eq_items_sum",
    "repeats", "round_005", "currency_on_row", "in_summary", "in_table", "after_adjustment", "superseded",
    "rule_pick", "rule_guess",
)


@dataclass
class _TotalCand:
    value: Decimal
    lines: list[int]
    pos: int
    f: dict[str, float]


def _total_candidates(doc: _Doc, rule_total: Decimal | None, items: list[LineItem]) -> list[_TotalCand]:
    """Every positive amount on the page as a total candidate, with the ranker's features (after
    ``_classify`` and ``_line_items``; ``rule_total`` is the rules' choice)."""
    lines = doc.lines
    n = max(1, len(lines))
    summary_from = next((ln.pos for ln in lines if _KW_SUMMARY.search(ln.compact)), n)
    # the keyword line announcing each amount (the amount's line index, value) -> (keyword line, how)
    anchor: dict[tuple[int, Decimal], tuple[_Ln, int]] = {}
    by_index = {ln.line.index: ln for ln in lines}
    kw_cands: list[tuple[_Ln, _Cand]] = []
    for ln in lines:
        if ln.kind == "other":
            continue
        c = doc.announced[ln.pos] if ln.pos in doc.announced else _value_for(doc, ln)
        if c is None:
            continue
        kw_cands.append((ln, c))
        last = by_index[c.lines[-1]]
        where = 0 if len(c.lines) == 1 else 1 if doc.row_of[last.pos] == doc.row_of[ln.pos] or _same_row(ln, last) else 2
        key = (c.lines[-1], c.value)
        if key not in anchor or where < anchor[key][1]:
            anchor[key] = (ln, where)

    def is_change(ln: _Ln) -> bool:
        return bool(_KW_CHANGE.search(ln.compact))

    tender = [c.value for ln, c in kw_cands if ln.kind == "tender" and not is_change(ln) and c.value > 0]
    change = [c.value for ln, c in kw_cands if ln.kind == "tender" and is_change(ln) and c.value >= 0]
    cash_minus_change = {t - ch for t in tender for ch in change if t > ch}
    subtotals = [c.value for ln, c in kw_cands if ln.kind == "subtotal" and ln.pos < summary_from]
    taxes = [c.value for ln, c in kw_cands if ln.kind == "tax" and c.value >= 0]
    services = [c.value for ln, c in kw_cands if ln.kind == "service"]
    adjustments = [(ln.pos, c.value) for ln, c in kw_cands if ln.kind == "rounding" and c.value != 0
                   and abs(c.value) < Decimal("0.10")]
    totals_kw = [(ln.pos, c.value) for ln, c in kw_cands if ln.kind == "total" and c.value > 0]
    sums = {s + t + sv for s in subtotals for t in taxes for sv in [Decimal(0), *services]}
    sums |= {s + sv for s in subtotals for sv in services}
    items_sum = sum((Decimal(i.amount) for i in items if i.amount), Decimal(0)) if items else None
    first_summary_kw = next((ln.pos for ln in lines if ln.kind in ("subtotal", "total")), n)
    counts: dict[Decimal, int] = {}
    for ln in lines:
        for a in ln.amounts:
            counts[a.value] = counts.get(a.value, 0) + 1
    non_tender = [a.value for ln in lines if ln.kind != "tender" for a in ln.amounts if a.value > 0]
    largest = max(non_tender, default=None)
    largest_below = max((a.value for ln in lines[first_summary_kw:] if ln.kind != "tender"
                         for a in ln.amounts if a.value > 0), default=None)
    last_total_pos = max((p for p, _ in totals_kw), default=None)
    rule_keyword = bool(totals_kw) or any(ln.kind == "rounding" and abs(c.value) >= Decimal("0.10") for ln, c in kw_cands)

    out: list[_TotalCand] = []
    for ln in lines:
        row = doc.rows[doc.row_of[ln.pos]]
        row_amounts = sum(len(lines[p].amounts) for p in row)
        row_text = " ".join(lines[p].up for p in row)
        prev_row = doc.rows[doc.row_of[ln.pos] - 1] if doc.row_of[ln.pos] > 0 else []
        above = [lines[p] for p in prev_row]
        if not any(a.value > 0 for a in ln.amounts):
            continue
        row_compact = row_text.replace(" ", "")
        qty_row = float(bool(_RK_QTY.search(row_compact)))
        discount_row = float(bool(_RK_DISCOUNT.search(row_compact)))
        currency_row = bool(re.search(r"(?<![A-Z])RM|MYR|[$€£¥]|EUR|USD|GBP|SGD", row_text))
        above_total = float(any(o.kind == "total" for o in above))
        above_tender = float(any(o.kind == "tender" for o in above))
        for a in ln.amounts:
            v = a.value
            if v <= 0:
                continue
            kw, where = anchor.get((ln.line.index, v), (None, -1))
            f = dict.fromkeys(TOTAL_FEATURES, 0.0)
            if kw is None:
                f["kw_none"] = 1.0
            else:
                c = kw.compact
                f["kw_total"] = float(kw.kind == "total")
                f["kw_strength"] = kw.strength / 3.0 if kw.kind == "total" else 0.0
                f["kw_grand"] = float(bool(_RK_GRAND.search(c)))
                f["kw_nett"] = float(bool(_RK_NETT.search(c)))
                f["kw_round"] = float(bool(_RK_ROUND.search(c)))
                f["kw_incl"] = float(bool(_RK_INCL.search(c)))
                f["kw_due"] = float(bool(_RK_DUE.search(c)))
                f["kw_subtotal"] = float(kw.kind == "subtotal")
                f["kw_tax"] = float(kw.kind == "tax")
                f["kw_tender"] = float(kw.kind == "tender" and not is_change(kw))
                f["kw_change"] = float(kw.kind == "tender" and is_change(kw))
                f["kw_same_line"] = float(where == 0)
                f["kw_same_row"] = float(where == 1)
                f["kw_below"] = float(where == 2)
                f["last_total_kw"] = float(kw.kind == "total" and kw.pos == last_total_pos)
            f["kw_qty"], f["kw_discount"] = qty_row, discount_row
            f["above_total"], f["above_tender"] = above_total, above_tender
            f["rel_pos"] = ln.pos / n
            f["is_max"] = float(v == largest)
            f["is_max_below"] = float(v == largest_below)
            f["rel_value"] = float(v / largest) if largest else 0.0
            f["eq_cash_minus_change"] = float(v in cash_minus_change)
            f["eq_paid"] = float(v in tender)
            f["eq_sub_tax"] = float(v in sums)
            f["eq_sub_tax_rounded"] = float(v not in sums and any(abs(v - s) <= Decimal("0.02") for s in sums))
            f["eq_items_sum"] = float(items_sum is not None and v == items_sum)
            f["repeats"] = min(counts.get(v, 1) - 1, 3) / 3.0
            f["round_005"] = float((v * 20) == (v * 20).to_integral_value())
            f["currency_on_row"] = float(a.currency is not None or currency_row)
            f["in_summary"] = float(ln.pos > summary_from)
            f["in_table"] = float(row_amounts >= 2)
            f["after_adjustment"] = float(any(
                r < ln.pos and any(p < r and t + adj == v for p, t in totals_kw) for r, adj in adjustments))
            f["superseded"] = float(any(
                ln.pos < r and any(r < p and v + adj == t for p, t in totals_kw) for r, adj in adjustments))
            picked = rule_total is not None and v == rule_total
            f["rule_pick"] = float(picked and rule_keyword)  # the rules' keyword-anchored total
            f["rule_guess"] = float(picked and not rule_keyword)  # their guess on a page without a total keyword
            idx = [ln.line.index] if kw is None or kw is ln else [kw.line.index, ln.line.index]
            out.append(_TotalCand(v, idx, ln.pos, f))
    return out


TOTAL_CHOICE = "ranker"  # "ranker": the learned ranker picks the total (the rules' pick is a feature); "rules": the rules do
TOTAL_RANKER: dict = {  # fitted by `.venv/bin/python benchmarks/documents_ranker_fit.py --write --variant rules_feature --C 1.0`
    "intercept": -5.9369,
    "weights": {
        "kw_total": 1.0395, "kw_strength": 0.3855, "kw_grand": 0.1767, "kw_nett": 0.2999,
        "kw_round": -1.0973, "kw_incl": -0.0213, "kw_due": 0.57, "kw_subtotal": -0.1492,
        "kw_tax": -0.5524, "kw_tender": -0.5273, "kw_change": -0.2226, "kw_qty": -0.2899,
        "kw_discount": -0.0257, "kw_none": -0.1028, "above_total": -0.4835, "above_tender": -0.0616,
        "kw_same_line": -0.1698, "kw_same_row": 0.2209, "kw_below": 0.023, "rel_pos": 0.1288,
        "last_total_kw": -0.2865, "is_max": 0.3043, "is_max_below": 0.4868, "rel_value": 1.1533,
        "eq_cash_minus_change": 1.5238, "eq_paid": 1.2851, "eq_sub_tax": 1.2603, "eq_sub_tax_rounded": -0.6685,
        "eq_items_sum": 0.2642, "repeats": 1.3541, "round_005": 0.1847, "currency_on_row": 0.4195,
        "in_summary": -0.4565, "in_table": -0.863, "after_adjustment": -0.27, "superseded": -0.1613,
        "rule_pick": 5.2661, "rule_guess": 1.4944,
    },
}


def _sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-x)) if x > -60 else 0.0


def _rank_totals(cands: list[_TotalCand], model: dict) -> list[tuple[float, _TotalCand]]:
    """The candidates with the ranker's probability, best first (ties: lower on the page)."""
    w, b = model["weights"], model["intercept"]
    scored = [(_sigmoid(b + sum(w.get(k, 0.0) * x for k, x in c.f.items() if x)), c) for c in cands]
    return sorted(scored, key=lambda s: (s[0], s[1].pos), reverse=True)


def _ranked_total(cands: list[_TotalCand], model: dict) -> FieldValue | None:
    """The ranker's total: the best candidate, its confidence from its probability and from the
    best probability of another value (a close rival lowers it)."""
    ranked = _rank_totals(cands, model)
    if not ranked:
        return None
    p1, best = ranked[0]
    p2 = next((p for p, c in ranked if c.value != best.value), 0.0)
    conf = p1 * (1.0 - 0.5 * p2)  # a calibrated probability, less half the best rival's
    return FieldValue(value=_fmt(best.value), confidence=round(max(0.05, min(conf, 0.98)), 3), lines=best.lines)


# --- dates ------------------------------------------------------------------------------------

def _date_field(doc: _Doc, month_first: bool) -> FieldValue:
    best = None
    n = max(1, len(doc.lines))
    for ln in doc.lines:
        found = find_dates(ln.up, month_first=month_first)
        if not found:
            continue
        kw = _KW_DATE.search(ln.compact)
        weak = _KW_DATE_WEAK.search(ln.compact)
        near = kw is not None and ln.orig_index(kw.end()) <= found[0].start + 1
        if not near:  # a DATE keyword to the left on the same row, or on the line just above
            left = [o for p in doc.rows[doc.row_of[ln.pos]] for o in [doc.lines[p]] if o.x1 <= ln.x0 + 2]
            above = doc.lines[ln.pos - 1] if ln.pos else None
            near = any(_KW_DATE.search(o.compact) for o in left) or (
                above is not None and _KW_DATE.search(above.compact) is not None and not find_dates(above.up)
                and len(above.compact) <= 12)
        for f in found:
            score = f.quality + (1.5 if near else 0.0) - (0.8 if weak else 0.0) - 0.3 * ln.pos / n
            if best is None or score > best[0]:
                lines = [ln.line.index]
                best = (score, f, lines, near)
    if best is None:
        return FieldValue()
    score, f, lines, near = best
    conf = (0.9 if near else 0.7) * (0.8 + 0.2 * f.quality)
    return FieldValue(value=f.value.isoformat(), confidence=round(conf, 3), lines=lines)


# --- vendor and address -----------------------------------------------------------------------

_LEGAL = re.compile(r"(?<![A-Z])(SDN\.?\s*BHD|BHD|BERHAD|S/B|SDN|PLT|LLP|LTD|LIMITED|GMBH|AG|INC|LLC|CORP"
                    r"|CORPORATION|PTE|PTY|PLC|SARL|SAS|S\.A|B\.V|BV|KG|OHG|UG|E\.K|SRL|SPA|S\.P\.A|AB|OY|A/S"
                    r"|N\.V|CO\.,?\s*LTD|& CO)(?![A-Z0-9])"
                    r"|(?:SDN\.?\s*BHD|BERHAD|GMBH)(?![A-Z])")  # also glued to the name (a dropped space)
_BUSINESS = re.compile(r"(?<![A-Z])(ENTERPRISES?|TRADING|TRADERS?|RESTAURANTS?|RESTORAN|KEDAI|PERNIAGAAN"
                       r"|SYARIKAT|STATIONERY|HARDWARE|BAKER(?:Y|IES)|FLORIST|MART|PHARMACY|CAFE|COFFEE"
                       r"|BOOKSTORES?|BOOKS?|SUPERMARKET|MINI ?MARKET|STORES?|SHOP|CENTRE|CENTER|ELECTRICAL"
                       r"|MACHINERY|SUPPL(?:Y|IES)|SERVICES?|INDUSTRIES|HOLDINGS?|GROUP|COMPANY|MARKETING|PETRO"
                       r"|HOTEL|BISTRO|KITCHEN|FOOD|BEVERAGES?|REALT(?:Y|IES)|PIZZA|BAKERY|OFFICE SUPPLIES"
                       r"|CONSULTING|SOLUTIONS|SYSTEMS|TECHNOLOG(?:Y|IES)|INTERNATIONAL)(?![A-Z])"
                       r"|(?:ENTERPRISE|TRADING|RESTAURANT|RESTORAN|STATIONERY|HARDWARE|PHARMACY|SUPERMARKET)")
_OWNER_PREFIX = re.compile(r"^(DIMILIKI\s*(OLEH)?|OWNED\s*BY|OPERATED\s*BY|A\s*MEMBER\s*OF|LICENSEE\s*OF)\s*[:\-]?\s*")
_REG_PAREN = re.compile(r"\s*[(\[][^()\[\]]*\d[^()\[\]]*[)\]]?\s*$|\s*[(\[][^()\[\]]*\d{3,}[^()\[\]]*[)\]]")
_REG_TOKEN = re.compile(r"\s+(?:CO\.?\s*(?:REG|NO)\.?\s*:?\s*)?[A-Z]{0,4}\d{4,}[\s\-]?[A-Z]?\s*$")
_NOISE_LINE = re.compile(r"^(TAX\s*INVOICE|INVOICE|RECEIPT|OFFICIAL RECEIPT|CASH\s*(SALES?|RECEIPT|BILL)|"
                         r"SIMPLIFIED|WELCOME|THANK|BILL|GUEST CHECK|COPY|DUPLICATE|ORIGINAL|SALES? RECEIPT|"
                         r"RECHNUNG|QUITTUNG|KASSENBON|FACTURE|TEL|FAX|PHONE|H/P|EMAIL|WWW|HTTP|GST|SST|VAT|"
                         r"TIN|ABN|CO\.?\s*REG|CO\.?\s*NO|COMPANY\s*(REG|NO)|ROC|REG\.?\s*NO|USt|UID|TAX\s*ID|"
                         r"INVOICE\s*NO|DATE|TIME|TABLE|CASHIER|ORDER|PCL|WARNING)(?![A-Z])", re.I)

_ADDR_STREET = re.compile(r"(?<![A-Z])(JALAN|JLN|LORONG|LRG|TAMAN|TMN|LOT|BATU|KAWASAN|PERINDUSTRIAN|SEKSYEN"
                          r"|KAMPUNG|WISMA|MENARA|PERSIARAN|LEBUH|LEBUHRAYA|LINGKARAN|STREET|ST\.|ROAD|RD\.?"
                          r"|AVENUE|AVE|LANE|DRIVE|BOULEVARD|BLVD|HIGHWAY|SUITE|P\.?O\.?\s?BOX|STRASSE|STRAßE"
                          r"|STR\.|WEG|PLATZ|ALLEE|GASSE|RUE|VIA|CALLE)(?![A-Z])"
                          r"|[A-Z](?:STRASSE|STRAßE|STR\.|WEG|PLATZ|ALLEE|GASSE)(?![A-Z])"
                          r"|JALAN|TAMAN|LORONG|KAWASAN|PERINDUSTRIAN|SEKSYEN|PERSIARAN|LEBUHRAYA")
_ADDR_PLACE = re.compile(r"(?<![A-Z])(LEVEL|FLOOR|FLR|BLOK|BLK|BLOCK|BANDAR|BDR|SECTION|KG|PLAZA|MALL|SQUARE|UNIT"
                         r"|BUILDING|BLDG|DESA|TINGKAT|ARAS|GROUND|BASEMENT|KOMPLEKS|COMPLEX|CENTRE|PARK"
                         r"|INDUSTRIAL|HOUSE|WAY|\d+(?:ST|ND|RD|TH))(?![A-Z])")
_ADDR_REGION = re.compile(r"(?<![A-Z])(MALAYSIA|SELANGOR|JOHOR|KUALA LUMPUR|KL|W\.?P\.?|WILAYAH|PENANG"
                          r"|PULAU PINANG|PERAK|KEDAH|KELANTAN|TERENGGANU|PAHANG|MELAKA|MALACCA|NEGERI SEMBILAN"
                          r"|SABAH|SARAWAK|PERLIS|LABUAN|PUTRAJAYA|DARUL EHSAN|DARUL TAKZIM|D\.E|PETALING JAYA|PJ"
                          r"|SHAH ALAM|KLANG|CHERAS|PUCHONG|SUBANG|AMPANG|KAJANG|JOHOR BAHRU|SKUDAI|IPOH|SEREMBAN"
                          r"|KOTA KINABALU|KUCHING|GEORGETOWN|RAWANG|KEPONG|SETAPAK|SERDANG|BANGI|SEMENYIH|SEPANG"
                          r"|CYBERJAYA|DAMANSARA|BANTING|DENGKIL|SINGAPORE|GERMANY|DEUTSCHLAND|BERLIN|MÜNCHEN"
                          r"|MUNICH|HAMBURG|FRANKFURT|KÖLN|AUSTRIA|ÖSTERREICH|SWITZERLAND|SCHWEIZ|FRANCE|PARIS"
                          r"|UNITED KINGDOM|UK|ENGLAND|LONDON|SCOTLAND|WALES|USA|U\.S\.A|UNITED STATES|AUSTRALIA"
                          r"|NETHERLANDS|SPAIN|ITALY|IRELAND|CANADA|INDIA|INDONESIA|THAILAND)(?![A-Z])"
                          r"|MALAYSIA|SELANGOR|JOHOR|KUALA ?LUMPUR|DARUL ?EHSAN|DARUL ?TAKZIM")
_POSTCODE = re.compile(r"(?<![\d\-/.])\d{5}(?:-\d{4})?(?![\d\-/])|(?<![A-Z])[A-Z]{1,2}\d[A-Z\d]?\s\d[A-Z]{2}(?![A-Z])"
                       r"|(?<![\d])\d{4}(?=\s+[A-Z][A-Za-zÄÖÜäöü]+)")
_HOUSE_NO = re.compile(r"^(?:NO\.?\s*[:,]?\s*|LOT\s*)?\d+[A-Z]?(?:[-/&.]\s?\d*[A-Z]?)*\s*[,.]?\s|^NO[.,:]\s*\w"
                       r"|^NO\s+\d|^(?:LEVEL|LVL|FLOOR|UNIT|SUITE|BLOCK|BLK|BLOK|LOT|NO)\.?\s*:?\s*[A-Z]?\d")
_ADDR_STOP = re.compile(r"(?<![A-Z])(TEL(?![A-Z])|TELNO|TELEPHONE|TELP|PHONE|FAX|H/P|HP(?![A-Z])|MOBILE|WHATSAPP"
                        r"|E-?MAIL|GST|SST|VAT|TAX|REG(?:ISTRATION)?\.?\s*NO|CO\.?\s*(?:REG|NO)|COMPANY\s*(?:REG|NO)"
                        r"|ROC(?![A-Z])|WWW|HTTP|INVOICE|RECEIPT|BILL|DATE|TIME|ORDER|TABLE|CASHIER|OPERATED BY"
                        r"|OWNED BY|DIMILIKI|LICENSEE|USt|UID|ABN|TIN(?![A-Z])|EIN(?![A-Z])|STEUER|IBAN|BIC"
                        r"|CUSTOMER|BILL TO|SHIP TO|ATTN)|\S@\S+\.\w|\+?\d[\d\s\-()]{8,}$", re.I)


def _address_score(text: str) -> float:
    """Address cues in a line: a postcode or a street word (2), a house number (1), a place word
    (LEVEL, MALL, BANDAR... 1), a state, city or country (1)."""
    s = 0.0
    if _POSTCODE.search(text):
        s += 2.0
    if _ADDR_STREET.search(text):
        s += 2.0
    if _HOUSE_NO.search(text):
        s += 1.0
    if _ADDR_PLACE.search(text):
        s += 1.0
    if _ADDR_REGION.search(text):
        s += 1.0
    return s


def _address_start(text: str) -> bool:
    """Enough cues for an address's first line: two, one of them a postcode, street or house number."""
    return _address_score(text) >= 2.0 and bool(_POSTCODE.search(text) or _ADDR_STREET.search(text)
                                                  or _HOUSE_NO.search(text))


def _clean_name(text: str) -> str:
    t = _OWNER_PREFIX.sub("", text.strip())
    for _ in range(3):
        new = _REG_TOKEN.sub("", _REG_PAREN.sub("", t)).strip(" -:;,")
        if new == t:
            break
        t = new
    return t


def _name_like(ln: _Ln) -> bool:
    t = ln.up.strip()
    letters = sum(ch.isalpha() for ch in t)
    if letters < 3 or letters < 0.4 * len(t.replace(" ", "")):
        return False
    if _NOISE_LINE.match(_OWNER_PREFIX.sub("", t)) or find_dates(t) or ln.amounts:
        return False
    if "@" in t or re.search(r"WWW\.|HTTP|\.COM", t):
        return False
    return True


def _vendor_address(doc: _Doc) -> tuple[FieldValue, FieldValue]:
    lines = doc.lines
    top = lines[: min(len(lines), 16)]
    if not top:
        return FieldValue(), FieldValue()
    # where the address block starts: the first line near the top with enough address cues
    start = None
    for ln in top:
        if ln.pos == 0 and len(top) > 1:
            continue  # the first line is the name
        if _ADDR_STOP.search(ln.up) and not _ADDR_STOP.search(ln.up).start() > 8:
            continue
        if _LEGAL.search(ln.up) and not _POSTCODE.search(ln.up):
            continue
        if _address_start(ln.up):
            start = ln.pos
            nxt = lines[ln.pos + 1] if ln.pos + 1 < len(lines) else None
            if not re.search(r"\d", ln.up) and nxt is not None and _HOUSE_NO.search(nxt.up) \
                    and _address_start(nxt.up):
                start = nxt.pos  # "SHOP NAME TAMAN X" above "30, JLN ..." : the address starts at the number
            break
    head = [ln for ln in lines[: start if start is not None else min(len(lines), 6)] if _name_like(ln)]

    vendor = FieldValue()
    chosen: list[_Ln] = []
    if head:
        def score(ln: _Ln) -> float:
            s = 0.5
            name = _clean_name(ln.up)
            if _LEGAL.search(name):
                s = 3.0
            elif _BUSINESS.search(name):
                s = 1.5
            if start is not None and ln is head[-1]:
                s += 0.4  # the line just above the address
            return s - 0.1 * ln.pos

        best = max(head, key=score)
        chosen = _join_name(lines, best)
        name = " ".join(_clean_name(ln.line.text) for ln in chosen).strip()
        base = score(best) + 0.1 * best.pos
        conf = 0.9 if base >= 3.0 else 0.7 if base >= 1.5 else 0.5
        if name:
            vendor = FieldValue(value=name, confidence=conf, lines=[ln.line.index for ln in chosen])

    address = FieldValue()
    if start is not None:
        first = start
        # lines between the vendor and the start that end like an address line (", ") belong to it
        after_vendor = (chosen[-1].pos + 1) if chosen else 0
        while first - 1 >= after_vendor and not _ADDR_STOP.search(lines[first - 1].up) and (
                lines[first - 1].up.rstrip().endswith(",") or re.fullmatch(r"NO[.:]?\s*[\d\s&,\-/A-Z]{1,12}",
                                                                        lines[first - 1].up.strip())
                and re.search(r"\d", lines[first - 1].up)):
            first -= 1  # "NO.19 & 21" above "JALAN ..."
        seen_postcode = False
        parts: list[tuple[int, str]] = []
        for ln in lines[first: first + 7]:
            stop = _ADDR_STOP.search(ln.up)
            if stop and ln.pos > start:
                if stop.start() > 0 and _address_score(ln.line.text[: stop.start()]) >= 1.0:
                    parts.append((ln.line.index, ln.line.text[: stop.start()].rstrip(" ,;")))
                break
            if stop and ln.pos == start and stop.start() > 0:
                parts.append((ln.line.index, ln.line.text[: stop.start()].rstrip(" ,;")))
                break
            if ln.amounts or (find_dates(ln.up) and ln.pos > start) or re.fullmatch(r"[\W\d\s]*", ln.up) \
                    and ln.pos > start and not _POSTCODE.search(ln.up):
                break
            if ln.pos > start and re.fullmatch(r"[(\[].*[)\]]", ln.up.strip()) and _address_score(ln.up) < 1.0:
                break
            if seen_postcode and _address_score(ln.up) < 1.0 and not re.search(r"\d", ln.up):
                break  # after the postcode line only address-like lines continue it
            seen_postcode = seen_postcode or bool(_POSTCODE.search(ln.up))
            parts.append((ln.line.index, ln.line.text.strip()))
        if parts:
            text = parts[0][1]
            for _, t in parts[1:]:  # one line after another, as printed: "Hauptstrasse 12, 10115 Berlin"
                text += (" " if text.endswith((",", ".", ";", "-", "/", "&")) else ", ") + t
            score = sum(_address_score(t.upper()) for _, t in parts)
            conf = 0.85 if score >= 4 else 0.65 if score >= 2.5 else 0.5
            address = FieldValue(value=text, confidence=conf, lines=[i for i, _ in parts])
    return vendor, address


_CONTINUES_UP = re.compile(r"^([&(),.]|AND\b|(SDN|BHD|CO\b|CO\.|ENTERPRISE|TRADING|S/B|LTD|GMBH|INC|LLC|\(M\)))")


def _join_name(lines: list[_Ln], best: _Ln) -> list[_Ln]:
    """The vendor's lines: ``best`` plus the lines above (and below) it that belong to the same name
    (a name split over two or three lines: "POPULAR BOOK" / "CO. (M) SDN BHD")."""
    chosen = [best]

    def unbalanced(text: str) -> int:
        return text.count("(") - text.count(")")

    # up: the line starts with a suffix or a continuation, or is mostly the suffix itself
    while chosen[0].pos > 0 and len(chosen) < 3:
        cur = _clean_name(chosen[0].up)
        prev = lines[chosen[0].pos - 1]
        rest = _LEGAL.sub("", re.sub(r"\([A-Z]{1,3}\)|CO\.", "", cur)).strip(" .&,")
        joined_text = " ".join(ln.up for ln in chosen)
        needs = (_CONTINUES_UP.match(cur) is not None or unbalanced(joined_text) < 0
                 or _LEGAL.search(cur) is not None and all(_BUSINESS.fullmatch(w) for w in rest.split()))
        if not needs or not _name_like(prev) or _address_score(prev.up) >= 2.0:
            break
        chosen.insert(0, prev)
    # down: an open parenthesis or a trailing "&" continues on the next line
    while chosen[-1].pos + 1 < len(lines) and len(chosen) < 3:
        joined_text = " ".join(_clean_name(ln.up) for ln in chosen)
        nxt = lines[chosen[-1].pos + 1]
        if not (unbalanced(joined_text) > 0 or joined_text.rstrip().endswith(("&", " AND"))
                or (_LEGAL.search(nxt.up) and not _LEGAL.search(joined_text) and len(nxt.up.split()) <= 3)):
            break
        if not _name_like(nxt) or _address_score(nxt.up) >= 2.0:
            break
        chosen.append(nxt)
    return chosen


# --- tax id, document number ------------------------------------------------------------------

_TAXID_KW = re.compile(r"(?<![A-Z])(?:GST|SST|VAT|TIN|ABN|EIN|UST|MWST|UID|TAX|STEUER(?:NR|NUMMER)?|BTW|TVA|IVA"
                       r"|NIF|CIF|GSTIN|TRN|NPWP)(?:[\s.\-]*(?:(?:ID|[L1|]D(?=NR))(?:NR)?|IDENTIFICATION|NO|NR|NUMBER"
                       r"|NUM|REG(?:ISTRATION)?|REF|#|IDNR))*(?:[\s.\-]*(?:NO|NR|NUMBER|#))?[\s.:#\-]*", re.I)
_TAXID_VAL = re.compile(r"(?:[A-Z]{2}[\s\-]?)?\d[\d\-]*(?:\s\d[\d\-]*)*[A-Z]?(?![\w])|[A-Z]\d{2}-\d{4}-\d{8}")


def _taxid_field(doc: _Doc, country: str | None) -> FieldValue:
    best = None
    for ln in doc.lines:
        for m in _TAXID_KW.finditer(ln.up):
            kw = m.group(0).upper()
            if kw.strip().startswith("TAX") and not re.search(r"ID|NO|NR|NUMBER|REG|#", kw):
                continue
            if not re.search(r"ID|NO|NR|NUMBER|REG|#|:|\d", kw + ln.up[m.end(): m.end() + 1]) \
                    and kw.strip().split()[0] in ("TAX", "GST", "VAT"):
                continue
            tail = ln.up[m.end():]
            v = _TAXID_VAL.match(tail)
            idx = [ln.line.index]
            if v is None and not tail.strip():
                nxt = (doc.right_of(ln) or doc.below(ln, limit=1))
                if nxt:
                    v = _TAXID_VAL.match(nxt[0].up.strip(" :#"))
                    idx.append(nxt[0].line.index)
            if v is None:
                continue
            raw = re.sub(r"[\s]", "", v.group(0)).strip("-")
            if sum(ch.isdigit() for ch in raw) < 6:
                continue
            valid = _taxid_valid(raw, country)
            conf = 0.95 if valid else 0.8
            if best is None or conf > best.confidence:
                best = FieldValue(value=raw, confidence=conf, lines=idx)
        if best is not None and best.confidence >= 0.95:
            break
    return best or FieldValue()


def _taxid_valid(raw: str, country: str | None) -> bool:
    """A checksum (python-stdnum) where one exists; Malaysian GST ids are 12 digits."""
    try:
        from stdnum.eu import vat as eu_vat

        if re.match(r"^[A-Z]{2}", raw) and eu_vat.is_valid(raw):
            return True
        if raw.startswith("GB") or country == "GB":
            from stdnum.gb import vat as gb_vat

            return gb_vat.is_valid(raw)
        if country == "US" or re.fullmatch(r"\d{2}-\d{7}", raw):
            from stdnum.us import ein

            return ein.is_valid(raw)
        if country == "AU":
            from stdnum.au import abn

            return abn.is_valid(raw)
    except Exception:  # noqa: BLE001 - stdnum missing or a format it does not know
        return False
    return country == "MY" and re.fullmatch(r"\d{12}", raw) is not None


_NUMBER_KW = re.compile(
    r"(?<![A-Z])(?P<kw>(?:TAX\s*)?INVOICE|INV|RECEIPT|RCPT|RECEIPT|DOC(?:UMENT)?|BILL|SLIP|CHK|CHECK|ORDER"
    r"|TRANS(?:ACTION)?|TRX|REF(?:ERENCE)?|CB|CASH\s*SALES?|CASH\s*INV|RECHNUNG(?:S)?|BELEG|BON|FACTURE|TICKET)"
    r"\s*(?P<q>NO\.?|NUMBER|NUM|NR\.?|NUMMER|#|ID)?\s*[:#.]*\s*", re.I)
_NUMBER_VAL = re.compile(r"[A-Z0-9][A-Z0-9\-/_.]*(?:-\s\d+)?", re.I)
_NUMBER_RANK = {"INVOICE": 0, "INV": 0, "TAXINVOICE": 0, "RECHNUNG": 0, "RECHNUNGS": 0, "FACTURE": 0,
                "CASHINV": 0, "RECEIPT": 1, "RCPT": 1, "BELEG": 1, "BON": 1, "DOC": 2, "DOCUMENT": 2, "BILL": 2,
                "CASHSALES": 2, "CASHSALE": 2, "SLIP": 3, "TICKET": 3, "CHK": 3, "CHECK": 3, "CB": 3,
                "ORDER": 4, "TRANS": 4, "TRANSACTION": 4, "TRX": 4, "REF": 4, "REFERENCE": 4}


def _number_field(doc: _Doc) -> FieldValue:
    best = None
    for ln in doc.lines:
        for m in _NUMBER_KW.finditer(ln.up):
            kw = re.sub(r"\s", "", m.group("kw").upper())
            qualified = m.group("q") is not None or ":" in m.group(0) or "#" in m.group(0)
            if not qualified and kw not in ("SLIP", "CHK", "RECEIPT"):
                continue
            tail = ln.line.text[m.end():]
            v = _NUMBER_VAL.match(tail.strip()) if tail.strip() else None
            idx = [ln.line.index]
            if v is None and not tail.strip():
                for other in doc.right_of(ln)[:1] + doc.below(ln, limit=1):
                    cand = _NUMBER_VAL.match(other.line.text.strip(" :#"))
                    if cand and any(ch.isdigit() for ch in cand.group(0)):
                        v = cand
                        idx.append(other.line.index)
                        break
            if v is None:
                continue
            token = re.sub(r"\s", "", v.group(0)).rstrip(".-/")
            if not any(ch.isdigit() for ch in token) or find_dates(token) or len(token) > 40:
                continue
            rank = _NUMBER_RANK.get(kw.replace("TAX", "") or kw, 4)
            conf = 0.85 if rank <= 2 and qualified else 0.65 if rank <= 3 else 0.5
            if best is None or (rank, -conf) < best[0]:
                best = ((rank, -conf), FieldValue(value=token, confidence=conf, lines=idx))
    return best[1] if best else FieldValue()


# --- country and currency ---------------------------------------------------------------------

_ISO_CODES = ("MYR", "USD", "EUR", "GBP", "SGD", "AUD", "CAD", "JPY", "CNY", "CHF", "INR", "IDR", "THB", "HKD",
              "NZD", "PHP", "VND", "KRW", "SEK", "NOK", "DKK", "PLN", "CZK", "HUF", "AED", "SAR", "ZAR", "BRL",
              "MXN", "TWD", "BND")
_ISO_RX = re.compile(r"(?<![A-Z])(" + "|".join(_ISO_CODES) + r")(?![A-Z])")
_COUNTRY_CURRENCY = {"MY": "MYR", "US": "USD", "GB": "GBP", "DE": "EUR", "AT": "EUR", "FR": "EUR", "NL": "EUR",
                     "ES": "EUR", "IT": "EUR", "IE": "EUR", "CH": "CHF", "SG": "SGD", "AU": "AUD", "CA": "CAD",
                     "IN": "INR", "ID": "IDR", "TH": "THB"}
_COUNTRY_WORDS = [
    ("MY", re.compile(r"MALAYSIA|SELANGOR|JOHOR|KUALA LUMPUR|PULAU PINANG|PENANG|DARUL EHSAN|DARUL TAKZIM|SABAH"
                      r"|SARAWAK|NEGERI SEMBILAN|KELANTAN|TERENGGANU|PAHANG|MELAKA|PUTRAJAYA|SDN\.? ?BHD")),
    ("SG", re.compile(r"SINGAPORE|PTE\.? LTD")),
    ("DE", re.compile(r"GERMANY|DEUTSCHLAND|GMBH|UST-?ID|USTIDNR|STEUERNR|MWST|\bDE\d{9}\b")),
    ("AT", re.compile(r"AUSTRIA|ÖSTERREICH|\bATU\d{8}\b")),
    ("CH", re.compile(r"SWITZERLAND|SCHWEIZ|SUISSE")),
    ("FR", re.compile(r"\bFRANCE\b|\bTVA\b")),
    ("NL", re.compile(r"NETHERLANDS|NEDERLAND|\bBTW\b")),
    ("GB", re.compile(r"UNITED KINGDOM|\bU\.?K\.?\b|ENGLAND|SCOTLAND|WALES|LONDON"
                      r"|\bVAT REG(?:ISTRATION)?\.? ?NO\.?:? ?GB"
                      r"|\bGB ?\d{3} ?\d{4} ?\d{2}\b")),
    ("US", re.compile(r"\bUSA\b|U\.S\.A|UNITED STATES|\b(?:AL|AK|AZ|AR|CA|CO|CT|DE|FL|GA|HI|ID|IL|IN|IA|KS|KY|LA|ME|MD"
                      r"|MA|MI|MN|MS|MO|MT|NE|NV|NH|NJ|NM|NY|NC|ND|OH|OK|OR|PA|RI|SC|SD|TN|TX|UT|VT|VA|WA|WV|WI|WY)"
                      r",? \d{5}(?:-\d{4})?\b|SALES TAX|\bEIN\b")),
    ("AU", re.compile(r"AUSTRALIA|\bABN\b")),
    ("CA", re.compile(r"CANADA|\bHST\b")),
    ("IN", re.compile(r"\bINDIA\b|GSTIN")),
]


def _country(doc: _Doc, head_text: str) -> str | None:
    """The vendor's country from words near the top (address, tax id), else anywhere."""
    for text in (head_text, doc.text):
        scores: dict[str, int] = {}
        for code, rx in _COUNTRY_WORDS:
            hits = len(rx.findall(text))
            if hits:
                scores[code] = hits
        if "MY" not in scores and re.search(r"(?<![A-Z])(JALAN|JLN|TAMAN|TMN|LORONG)(?![A-Z])", text) \
                and _POSTCODE.search(text):
            scores["MY"] = 1
        if scores:
            return max(scores, key=lambda c: scores[c])
    return None


def _currency_field(doc: _Doc, country: str | None, default_currency: str | None) -> FieldValue:
    codes: dict[str, list[int]] = {}
    for ln in doc.lines:
        for m in _ISO_RX.finditer(ln.up):
            codes.setdefault(m.group(1), []).append(ln.line.index)
    if codes:
        code = max(codes, key=lambda c: len(codes[c]))
        return FieldValue(value=code, confidence=0.95, lines=codes[code][:3])
    symbols: dict[str, list[int]] = {}
    for ln in doc.lines:
        t = ln.line.text.upper()
        found = []
        if re.search(r"(?<![A-Z])RM(?![A-Z])|(?<![A-Z])RM\d|\(RM\)", t):
            found.append("MYR")
        if "S$" in t:
            found.append("SGD")
        if "€" in t:
            found.append("EUR")
        if "£" in t:
            found.append("GBP")
        if "¥" in t:
            found.append("JPY")
        if "₹" in t:
            found.append("INR")
        if re.search(r"(?<![SAC])\$", t) and "US$" not in t:
            found.append("$")
        if "US$" in t:
            found.append("USD")
        for f in found:
            symbols.setdefault(f, []).append(ln.line.index)
    specific = {k: v for k, v in symbols.items() if k != "$"}
    if specific:
        code = max(specific, key=lambda c: len(specific[c]))
        return FieldValue(value=code, confidence=0.9, lines=specific[code][:3])
    by_country = _COUNTRY_CURRENCY.get(country or "")
    if "$" in symbols:
        if by_country:  # "$" on a Malaysian receipt is ringgit, on a US one dollars
            return FieldValue(value=by_country, confidence=0.8, lines=symbols["$"][:3])
        return FieldValue(value="USD", confidence=0.6, lines=symbols["$"][:3])
    if by_country:
        return FieldValue(value=by_country, confidence=0.7, lines=[])
    if default_currency:
        return FieldValue(value=default_currency.upper(), confidence=0.4, lines=[])
    return FieldValue()


# --- line items -------------------------------------------------------------------------------

_NUM_TOKEN = re.compile(r"^-?(?:\d{1,3}(?:,\d{3})+|\d{1,3}(?:\.\d{3})+|\d+)(?:[.,]\d{1,3})?$")
_TAX_CODE = re.compile(r"^(?:[A-Z]|SR|ZR|ZRL|\*[A-Z]{0,2}|[A-Z]\*)$")
_BETWEEN = re.compile(r"^(?:X|@|RM|\$|€|£|EUR|USD|GBP|MYR|SGD)$")


def _number(token: str) -> Decimal | None:
    token = token.lstrip("$€£@").replace("RM", "")
    if not _NUM_TOKEN.match(token):
        return None
    found = find_amounts(token)
    if found:
        return found[0].value
    try:
        return Decimal(token.replace(",", "."))
    except InvalidOperation:
        return None


def _row_item(text: str, limit: int = 3) -> tuple[str, list[tuple[Decimal, str]]]:
    """A row's leading description and its trailing numbers (at most three: quantity, unit price,
    amount), skipping a tax code after the last one ("15.00 S") and "X" / "@" between them."""
    tokens = text.split()
    nums: list[tuple[Decimal, str]] = []
    i = len(tokens)
    while i > 0 and len(nums) < limit:
        tok = tokens[i - 1]
        val = _number(tok)
        if val is not None:
            nums.insert(0, (val, tok))
        elif not (not nums and _TAX_CODE.match(tok.upper()) or nums and _BETWEEN.match(tok.upper())):
            break
        i -= 1
    return " ".join(tokens[:i]).strip(" :-"), nums


_HDR_QTY = re.compile(r"(?<![A-Z])(QTY|QUANTITY|QTE|QTÉ|QUANTITÉ|MENGE|ANZAHL|KUANTITI|PCS|NOS)(?![A-Z])")
_HDR_PRICE = re.compile(r"(?<![A-Z])(PRICE|U/P|S/PRICE|UNIT|RATE|PREIS|EINZELPREIS|PRIX|HARGA)(?![A-Z])")
_HDR_AMOUNT = re.compile(r"(?<![A-Z])(AMOUNT|AMT|TOTAL|BETRAG|GESAMT|MONTANT|JUMLAH|RM|EUR|USD|GBP|MYR)(?![A-Z])"
                         r"|[$€£]")


def _header_columns(text: str) -> tuple[int, bool]:
    """How many numeric columns (quantity, unit price, amount) an item table's header names (0 when
    none), and whether one of them is the quantity."""
    return sum(1 for rx in (_HDR_QTY, _HDR_PRICE, _HDR_AMOUNT) if rx.search(text)), bool(_HDR_QTY.search(text))


def _checks(nums: list[tuple[Decimal, str]]) -> bool:
    """The last three numbers read as quantity x unit price = amount."""
    if len(nums) < 3:
        return False
    q, u, a = (v for v, _ in nums[-3:])
    return a != 0 and abs(q * u - a) <= CENT * max(1, q)


def _row_numbers(row: list[_Ln], want: int, has_qty: bool) -> tuple[str, list[tuple[Decimal, str]]]:
    """A table row's description and its trailing numbers (quantity, unit price, amount; the header
    names ``want`` numeric columns). When the row is several boxes (OCR runs), the boxes holding only
    numbers are the numeric columns and the boxes before them the description, so digits inside a
    description ("Flyers A5 (1000)", "Gel pens 12") stay in it; when the row is one line of text, up
    to three trailing number tokens are the columns. Fewer when qty x price = amount does not hold and
    the header names fewer columns."""
    text = " ".join(ln.line.text for ln in row)
    head = None
    if len(row) > 1:
        k, tail = len(row), []
        while k > 1:
            box = row[k - 1].line.text
            desc, nums = _row_item(box)
            if desc or (not nums and not _TAX_CODE.match(box.strip().upper())):
                break
            tail = nums + tail
            k -= 1
        if tail:
            head = " ".join(ln.line.text for ln in row[:k]).strip(" :-")
            if len(tail) < want:  # a number glued to the description box ("Business cards (500) 4")
                desc, more = _row_item(head, want - len(tail))
                if more and (want < 3 or _checks(more + tail)):
                    return desc, more + tail
            desc, nums = head, tail[-3:]
    if head is None:
        desc, nums = _row_item(text)
    if want < len(nums) and not _checks(nums) and (want == 1 or has_qty and not re.search(r"[.,]", nums[-2][1])):
        return (head, nums[-want:]) if head is not None else _row_item(text, want)
    return desc, nums


def _line_items(doc: _Doc) -> list[LineItem]:
    """Rows of the item table (after its header, before the first subtotal / total line) as line
    items. A row whose numbers read as quantity x unit price = amount is an item even when a word in
    its description looks like a keyword ("Business cards", "Backup service")."""
    lines = doc.lines
    header = None
    for ln in lines:
        row_text = " ".join(lines[p].up for p in doc.rows[doc.row_of[ln.pos]])
        if len(set(_ITEM_HEADER_WORDS.findall(row_text))) >= 2:
            header = ln
            break
    want, has_qty, start_row = 3, True, 0
    if header is not None:  # the header's words, also from a second header row ("S/PRICE AMOUNT" / "ITEM QTY")
        r = doc.row_of[header.pos]
        text = " ".join(lines[p].up for p in doc.rows[r])
        start_row = r + 1
        if r + 1 < len(doc.rows):
            nxt = " ".join(lines[p].up for p in doc.rows[r + 1])
            if _ITEM_HEADER_WORDS.search(nxt) and not re.search(r"\d", nxt):
                text, start_row = text + " " + nxt, r + 2
        want, has_qty = _header_columns(text)
        want = want or 3
    items: list[LineItem] = []
    pending: tuple[str, list[int]] | None = None  # a description row waiting for its numbers
    for r in range(start_row, len(doc.rows)):
        row = [lines[p] for p in doc.rows[r]]
        keyword_row = any(ln.kind != "other" for ln in row)
        desc, nums = _row_numbers(row, want, has_qty)
        if any(ln.kind in ("subtotal", "total") for ln in row):
            # the table ends at the first subtotal / total line, unless the row is an item whose name
            # holds the word ("Total care kit 2 10.00 20.00"): its numbers check and it has other words
            rest = re.sub(r"(?<![A-Z])(SUB|GRAND|NETT?|TOTAL|AMOUNT|DUE|RM|EUR|USD|GBP)(?![A-Z])", "", desc.upper())
            if not (_checks(nums) and sum(ch.isalpha() for ch in rest) >= 3):
                break
        idx = [ln.line.index for ln in row]
        letters = sum(ch.isalpha() for ch in desc)
        values = [v for v, _ in nums]
        checks = _checks(nums)
        # the header's three columns (quantity, unit price, amount) filled, quantity a whole number: an
        # item row by its shape, even when its amount does not add up (validation reports that)
        shaped = header is not None and want == 3 and has_qty and len(values) == 3 \
            and re.fullmatch(r"\d{1,4}", nums[0][1]) is not None and values[0] > 0 and values[2] != 0
        if keyword_row and not checks and not (shaped and all(ln.kind in ("other", "tender", "service")
                                                              for ln in row)):
            pending = None
            continue
        if not nums:
            if letters >= 3:
                pending = (desc, idx)
            continue
        if letters < 3 and pending:
            desc, idx = pending[0], pending[1] + idx
        elif letters < 3:
            continue
        pending = None
        qty = unit = amount = None
        conf = 0.4
        decimals = [("." in t or "," in t) for _, t in nums]
        if header is None and not checks:
            continue  # without a table header only rows whose numbers check are items
        if len(values) >= 3:
            q, u, a = values[-3:]
            if checks:
                qty, unit, amount, conf = q, u, a, 0.85 if header is not None else 0.75
            elif shaped:
                qty, unit, amount, conf = q, u, a, 0.45
            elif abs(values[-2] - a) <= CENT:
                unit, amount, conf = values[-2], a, 0.5
            else:
                amount = a
        elif len(values) == 2:
            q, a = values
            if not decimals[0] and 0 < q < 1000:
                qty, amount, conf = q, a, 0.55
                unit = (a / q).quantize(CENT)
            elif (lead := re.match(r"(\d{1,3})\s*[X*]?\s+(?=\S)", desc.upper())) and int(lead.group(1)) > 0 \
                    and abs(int(lead.group(1)) * q - a) <= CENT:  # quantity first: "2 TOWEL ROD 6.00 12.00"
                qty, unit, amount, conf = Decimal(lead.group(1)), q, a, 0.7
                desc = desc[lead.end():]
            elif q == a:
                unit, amount, conf = q, a, 0.5
            else:
                unit, amount, conf = q, a, 0.4
        elif decimals[-1]:
            amount = values[-1]
        if amount is None:
            continue
        if checks or shaped:
            for ln in row:  # an item row, not a tender / service / tax line
                ln.kind, ln.strength = "other", 0.0
        items.append(LineItem(description=desc, quantity=None if qty is None else _qty(qty),
                              unit_price=_fmt(unit), amount=_fmt(amount), confidence=conf, lines=idx))
    return items


def _qty(q: Decimal) -> str:
    return str(q.quantize(Decimal(1))) if q == q.to_integral_value() else str(q.normalize())


# --- the extractor ----------------------------------------------------------------------------

def extract(lines: list[Line], *, default_currency: str | None = None) -> ExtractionOutput:
    """Header fields and line items of a receipt or invoice from its text lines (with boxes).

    Pure and deterministic; ``default_currency`` is used when the document shows no currency and
    its country is unknown."""
    lines = [ln for ln in lines if ln.text and ln.text.strip()]
    if not lines:
        return ExtractionOutput()
    doc = _Doc.build(lines)
    vendor, address = _vendor_address(doc)
    head_text = "\n".join(ln.up for ln in doc.lines[:16])
    country = _country(doc, head_text)
    line_items, amounts, cands = _amounts_and_candidates(doc)
    if TOTAL_CHOICE == "ranker":
        ranked = _ranked_total(cands, TOTAL_RANKER)
        if ranked is not None:
            amounts["total"] = ranked
    out = ExtractionOutput(
        vendor=vendor,
        address=address,
        tax_id=_taxid_field(doc, country),
        number=_number_field(doc),
        date=_date_field(doc, month_first=country == "US"),
        currency=_currency_field(doc, country, default_currency),
        subtotal=amounts.get("subtotal", FieldValue()),
        tax=amounts.get("tax", FieldValue()),
        total=amounts.get("total", FieldValue()),
        line_items=line_items,
    )
    return out


def _amounts_and_candidates(doc: _Doc) -> tuple[list[LineItem], dict[str, FieldValue], list[_TotalCand]]:
    """Line items, the rules' amount fields and the ranker's total candidates of a built document."""
    for ln in doc.lines:
        _classify(ln)
    line_items = _line_items(doc)  # first: item rows are no amount keyword lines ("Backup service")
    amounts = _amount_fields(doc)
    rule = amounts.get("total")
    rule_total = parse_amount(rule.value) if rule is not None and rule.value else None
    return line_items, amounts, _total_candidates(doc, rule_total, line_items)


def total_candidates(lines: list[Line]) -> tuple[FieldValue, list[_TotalCand]]:
    """The rules' total and every total candidate with its ranker features (for fitting the ranker
    offline: benchmarks/documents_ranker_fit.py)."""
    lines = [ln for ln in lines if ln.text and ln.text.strip()]
    if not lines:
        return FieldValue(), []
    _, amounts, cands = _amounts_and_candidates(_Doc.build(lines))
    return amounts.get("total", FieldValue()), cands


# --- evaluation on the labelled receipts --------------------------------------------------------

SROIE_FIELDS = {"company": "vendor", "date": "date", "address": "address", "total": "total"}


def sroie_split(company_label: str, buckets: int = 5) -> int:
    """The fold (0..buckets-1) of a receipt, by its vendor (first four letters/digits of the
    normalised company label), so that one vendor's receipts never sit on both sides of a split.
    Fold 4 is the held-out part the rules were not tuned on."""
    key = (normalise("company", company_label) or "")[:4]
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) % buckets


HELD_OUT_FOLD = 4


def _load_sroie(data_dir: Path) -> Iterable[tuple[str, list[Line], dict]]:
    from ...lib.docread import parse_ocr_lines

    for box in sorted((data_dir / "box").glob("*.csv")):
        key = data_dir / "key" / (box.stem + ".json")
        if not key.is_file():
            continue
        labels = json.loads(key.read_text(encoding="utf-8"))
        yield box.stem, parse_ocr_lines(box.read_text(encoding="utf-8", errors="replace")), labels


def sroie_accuracy(data_dir: str | Path, *, show_misses: bool = False) -> dict:
    """Per-field exact match (after ``normalise``) of ``extract`` over the labelled receipts in
    ``data_dir`` (``box/NNN.csv`` + ``key/NNN.json``): on all receipts, on the held-out fold and on
    the others, plus the misses when ``show_misses``."""
    data_dir = Path(data_dir)
    hits = {part: {f: 0 for f in SROIE_FIELDS} for part in ("all", "held_out", "dev")}
    counts = {"all": 0, "held_out": 0, "dev": 0}
    misses = []
    for name, lines, labels in _load_sroie(data_dir):
        result = extract(lines)
        part = "held_out" if sroie_split(labels.get("company", "")) == HELD_OUT_FOLD else "dev"
        for p in ("all", part):
            counts[p] += 1
        for label_field, out_field in SROIE_FIELDS.items():
            got = getattr(result, out_field).value
            ok = normalise(label_field, labels.get(label_field)) == normalise(label_field, got) \
                and normalise(label_field, got) is not None
            if ok:
                hits["all"][label_field] += 1
                hits[part][label_field] += 1
            elif show_misses:
                misses.append({"file": name, "part": part, "field": label_field, "expected": labels.get(label_field),
                               "got": got})
    out = {p: {f: round(hits[p][f] / counts[p], 4) if counts[p] else None for f in SROIE_FIELDS}
           for p in hits}
    out["counts"] = counts
    if show_misses:
        out["misses"] = misses
    return out
