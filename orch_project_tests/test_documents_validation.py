"""Every validation rule of the document workflow fails on a crafted document, with the reason a reviewer
reads, and passes on a good one; the reading layer refuses what it cannot read with a reason."""

from __future__ import annotations

from datetime import date
from decimal import Decimal

import pytest

from orch_project.defs.documents import logic, sample_data as sd, validation as v
from orch_project.lib import docread

RECEIVED = date(2026, 11, 30)
RULES = v.Rules(required_fields=("vendor", "date", "total", "currency"), min_confidence={"total": 0.6, "vendor": 0.5},
                amount_tolerance=Decimal("0.05"), max_age_days=365, future_tolerance_days=1)


def fields(**values) -> dict:
    base = {"vendor": "Harbour Print Ltd", "address": "14 Quay Street, Bristol", "tax_id": "GB980780684",
            "number": "HP-1", "date": "2026-11-20", "currency": "GBP", "subtotal": "100.00", "tax": "20.00",
            "total": "120.00"}
    base.update(values)
    return {k: {"value": val, "confidence": 0.9} for k, val in base.items()}


LINES = [{"description": "Business cards", "quantity": "2", "unit_price": "50.00", "amount": "100.00"}]
TEXT = "Harbour Print Ltd\nVAT Reg No: GB980780684\nTotal £120.00"


def run(f=None, line_items=LINES, text=TEXT, index=None, item_id="doc-1", sha="a" * 64) -> dict[str, v.Check]:
    checks = v.validate(item_id, f or fields(), line_items, text=text, sha256=sha, received=RECEIVED, rules=RULES,
                        duplicates=index or v.DuplicateIndex())
    assert [c.rule for c in checks] == list(v.RULES)
    return {c.rule: c for c in checks}


def failing(checks: dict[str, v.Check]) -> dict[str, str]:
    return {r: c.reason for r, c in checks.items() if not c.ok}


def test_a_good_document_passes_every_rule():
    assert failing(run()) == {}


@pytest.mark.parametrize("f,lines,text,rule,reason", [
    (fields(total=None), LINES, TEXT, "schema", "missing total"),
    (fields(date="20/11/2026"), LINES, TEXT, "schema", "date (not an ISO date)"),
    (fields(currency="XYZ"), LINES, TEXT, "schema", "currency (not an ISO 4217 code)"),
    (fields(), [{**LINES[0], "amount": "90.00"}], TEXT, "line_arithmetic", "line 1: 2 x 50.00 = 100.00, printed 90.00"),
    (fields(subtotal="110.00", total="130.00"), LINES, TEXT.replace("120", "130"), "subtotal_matches_lines",
     "the 1 line amounts add up to 100.00, the subtotal says 110.00"),
    (fields(total="125.00"), LINES, TEXT, "total_matches_subtotal_tax", "subtotal 100.00 + tax 20.00 = 120.00, the total says 125.00"),
    (fields(date="2026-12-05"), LINES, TEXT, "date_plausible", "after the document arrived"),
    (fields(date="2025-01-01"), LINES, TEXT, "date_plausible", "the brief allows 365"),
    (fields(currency="EUR"), LINES, TEXT, "currency_consistent", "EUR, but the document prints symbols for GBP"),
    (fields(currency="USD"), LINES, "Harbour Print Ltd\nVAT Reg No: GB980780684\nTotal 120.00", "currency_consistent",
     "the vendor's tax id is from GB (GBP)"),
    (fields(tax_id="GB980780685"), LINES, TEXT, "tax_id_checksum", "not a valid GB VAT number"),
    (fields(tax_id="DE136695977", currency="EUR"), LINES, "Total EUR 120.00", "tax_id_checksum", "not a valid EU VAT number"),
])
def test_each_rule_fails_with_its_reason(f, lines, text, rule, reason):
    bad = failing(run(f, lines, text))
    assert rule in bad, bad
    assert reason in bad[rule]


def test_confidence_below_the_brief_threshold_fails():
    f = fields()
    f["total"]["confidence"] = 0.41
    assert failing(run(f)) == {"confidence": "total read with confidence 0.41 < 0.60"}


def test_duplicates_by_file_by_number_and_by_date_and_total():
    index = v.DuplicateIndex()
    index.add("doc-first", "b" * 64, fields())
    same_number = failing(run(index=index))
    assert same_number == {"duplicate": "same vendor + number as document doc-first"}
    # two numbered bills alike in vendor, date and total are two bills; without a number, a copy
    assert failing(run(fields(number="HP-2"), index=index)) == {}
    no_number = failing(run(fields(number=None), index=index))
    assert no_number == {"duplicate": "same vendor + date + total as document doc-first"}
    same_file = failing(run(fields(number="HP-3", date="2026-11-21"), index=index, sha="b" * 64))
    assert same_file == {"duplicate": "same file as document doc-first"}
    assert failing(run(fields(number="HP-4", date="2026-11-22"), index=index)) == {}
    # a document is never its own duplicate
    assert failing(run(index=index, item_id="doc-first")) == {}


def test_nothing_to_check_passes_and_says_so():
    checks = run(fields(subtotal=None, tax=None, tax_id=None), line_items=[])
    assert checks["line_arithmetic"].ok and "no line" in checks["line_arithmetic"].reason
    assert checks["subtotal_matches_lines"].ok and "nothing to check" in checks["subtotal_matches_lines"].reason
    assert checks["tax_id_checksum"].ok and "nothing to check" in checks["tax_id_checksum"].reason


def test_sdn_bhd_is_not_a_currency():
    codes, symbols = v.printed_currencies("KEDAI ALAT TULIS SDN BHD\nTOTAL RM 3.39")
    assert codes == set() and symbols == {"MYR"}


@pytest.mark.parametrize("text,value", [("1,234.56", "1234.56"), ("1.234,56", "1234.56"), ("12,50", "12.50"),
                                        ("99.00", "99.00"), ("12,5,0", None), ("1.0.0", None), ("abc", None)])
def test_amounts_as_printed_or_typed(text, value):
    got = v.amount(text)
    assert (str(got) if got is not None else None) == value


def test_us_and_canadian_dollar_symbols():
    assert v.printed_currencies("Total US$ 120.00") == (set(), {"USD"})
    assert v.printed_currencies("Total CA$ 120.00")[1] == {"CAD"}


def test_corrections_are_parsed_strictly():
    assert logic.parse_corrections('total: "12.5"\ndate: 2026-11-03\ncurrency: eur\n') == {
        "total": "12.50", "date": "2026-11-03", "currency": "EUR"}
    for bad, msg in [("totl: 1", "unknown field"), ("total: abc", "not an amount"), ("date: 03/11/2026", "ISO date"),
                     ("currency: EURO", "ISO 4217"), ("- a list", "mapping"), ("line_items: [1]", "line_items")]:
        with pytest.raises(ValueError, match=msg):
            logic.parse_corrections(bad)


@pytest.mark.parametrize("name,data,kind", [
    ("e.pdf", b"", "empty"),
    ("x.pdf", b"not a pdf at all", "unreadable"),
    ("x.png", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40, "unreadable"),
    ("x.docx", b"PK\x03\x04" + b"\x00" * 40, "unsupported"),
    ("x.bin", b"\x00\x01\x02", "unsupported"),
    ("x.txt", b"\xff\xfe\xfa bad utf8", "unreadable"),
    ("x.csv", b"1,2,3,4,5,6,7,8,ok\n1,2,x,4,5,6,7,8,bad\n", "unreadable"),
])
def test_unreadable_files_raise_a_document_error_with_a_kind(name, data, kind):
    with pytest.raises(docread.DocumentError) as exc:
        docread.read_document(name, data)
    assert exc.value.kind == kind and exc.value.reason


def test_encrypted_and_textless_pdfs_and_the_page_limit():
    inv = sd.invoices(n=1)[0]
    with pytest.raises(docread.DocumentError) as exc:
        docread.read_document("l.pdf", sd.render_pdf(inv, password="pw"))
    assert exc.value.kind == "encrypted"
    with pytest.raises(docread.DocumentError) as exc:
        docread.read_document("b.pdf", sd._blank_pdf())
    assert exc.value.kind == "no_text" and "image" in exc.value.reason
    with pytest.raises(docread.DocumentError) as exc:
        docread.read_document("a.pdf", sd.render_pdf(inv), max_pages=0)
    assert exc.value.kind == "too_large"


def test_ocr_line_files_are_recognised_by_content_and_read_in_order():
    text = "10,40,90,40,90,52,10,52,TOTAL\n100,41,160,41,160,53,100,53,1,234.50\n10,10,200,10,200,22,10,22,ACME, INC\n"
    doc = docread.read_document("scan.txt", text.encode())
    assert doc.format == "ocr_lines"
    assert [line.text for line in doc.lines] == ["ACME, INC", "TOTAL", "1,234.50"]
    assert doc.lines[1].box == (10.0, 40.0, 90.0, 52.0) and doc.lines[2].index == 2
    assert docread.read_document("notes.txt", b"Total 5.00\n").format == "text"


def test_the_second_approval_threshold_is_per_currency():
    def data(total, currency):
        return {"fields": {"total": {"value": total}, "currency": {"value": currency}}}

    assert logic.second_role(data("6000.00", "EUR")) == "supervisor"
    assert logic.second_role(data("4000.00", "EUR")) is None
    assert logic.second_role(data("600000", "JPY")) is None  # about 3,700 EUR
    assert logic.second_role(data("800000", "JPY")) == "supervisor"
    assert logic.second_role(data("2000.00", "KWD")) == "supervisor"
