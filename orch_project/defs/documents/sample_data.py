"""Seeded sample documents for the document workflow: invoices and receipts of fictional vendors,
each laid out once and rendered as plain text, an OCR line file, a PDF with a text layer (fpdf2) and a
PNG (Pillow, read back through OCR), plus the cases a demanding AP team meets: a wrong total, a line
that does not add up, a second copy of a bill in another format, a re-submitted file, an old date, a bad
tax id, an amount that needs two approvers, and files that cannot be read at all.

    python -m orch_project.defs.documents.sample_data      # rewrite samples/ (deterministic, seed 7)

Tests render their own documents with the same functions (``render``, ``Invoice``).
"""

from __future__ import annotations

import io
import json
import random
from dataclasses import dataclass, field, replace
from datetime import date, timedelta
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path

SAMPLES_DIR = Path(__file__).parent / "samples"
FONT_CANDIDATES = ("/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf", "DejaVuSans.ttf")
CENT = Decimal("0.01")


@dataclass(frozen=True)
class Vendor:
    name: str
    address: tuple[str, ...]
    tax_label: str
    tax_id: str
    currency: str
    symbol: str
    tax_name: str
    tax_rate: Decimal
    number_prefix: str
    date_style: str  # dmy-slash | dmy-dot | mdy | iso | dmy-text
    catalogue: tuple[tuple[str, str], ...]
    print_currency: bool = True
    receipt: bool = False


VENDORS = (
    Vendor("Nordlicht Burobedarf GmbH", ("Hauptstrasse 12", "10115 Berlin, Germany"), "USt-IdNr", "DE136695976",
           "EUR", "EUR", "VAT 19%", Decimal("0.19"), "RE-2026-", "dmy-dot",
           (("Printer paper A4 (box)", "24.90"), ("Toner cartridge black", "89.00"), ("Desk organiser", "15.50"),
            ("Ring binders (10)", "32.00"), ("Whiteboard markers", "7.80"))),
    Vendor("Harbour Print Ltd", ("14 Quay Street", "Bristol BS1 4DJ, United Kingdom"), "VAT Reg No", "GB980780684",
           "GBP", "£", "VAT 20%", Decimal("0.20"), "HP-", "dmy-slash",
           (("Business cards (500)", "45.00"), ("Flyers A5 (1000)", "120.00"), ("Roll-up banner", "79.00"),
            ("Letterheads (500)", "60.00"))),
    Vendor("Summit Cloud Services LLC", ("1200 Pine Avenue, Suite 300", "Denver, CO 80202, USA"), "EIN",
           "84-1234567", "USD", "$", "Sales tax 8.25%", Decimal("0.0825"), "INV-", "mdy",
           (("Cloud hosting (monthly)", "450.00"), ("Support plan", "199.00"), ("Extra storage 1 TB", "35.00"),
            ("Backup service", "60.00"))),
    Vendor("Boulangerie du Marche SARL", ("8 Rue des Halles", "69001 Lyon, France"), "TVA", "FR40303265045",
           "EUR", "EUR", "TVA 20%", Decimal("0.20"), "F", "dmy-slash",
           (("Plateau petit-dejeuner", "42.00"), ("Viennoiseries (12)", "18.00"), ("Cafe (thermos)", "12.50"))),
    Vendor("Kedai Alat Tulis Seri Murni Sdn Bhd", ("No. 12, Jalan Ampang", "50450 Kuala Lumpur"), "SST ID",
           "W10-1808-31000123", "MYR", "RM", "SST 6%", Decimal("0.06"), "CS", "dmy-slash",
           (("A4 PAPER 80GSM", "14.90"), ("BALL PEN BLUE (12)", "9.60"), ("STAPLER HD", "23.50"),
            ("FILE FOLDER", "3.20")), print_currency=False, receipt=True),
)


@dataclass
class Invoice:
    vendor: Vendor
    number: str
    issued: date
    lines: list[tuple[str, int, Decimal]]  # description, quantity, unit price
    total_override: Decimal | None = None  # a printed total that does not add up
    line_amount_override: dict[int, Decimal] = field(default_factory=dict)
    tax_id_override: str | None = None
    note: str = ""

    def amount(self, i: int) -> Decimal:
        _, q, p = self.lines[i]
        return self.line_amount_override.get(i, (q * p).quantize(CENT, ROUND_HALF_UP))

    @property
    def subtotal(self) -> Decimal:
        return sum((self.amount(i) for i in range(len(self.lines))), Decimal(0))

    @property
    def tax(self) -> Decimal:
        return (self.subtotal * self.vendor.tax_rate).quantize(CENT, ROUND_HALF_UP)

    @property
    def total(self) -> Decimal:
        return self.total_override if self.total_override is not None else self.subtotal + self.tax

    def truth(self) -> dict:
        """What a correct extraction returns (the labels tests compare against)."""
        return {"vendor": self.vendor.name, "address": ", ".join(self.vendor.address),
                "tax_id": self.tax_id_override or self.vendor.tax_id, "number": self.number,
                "date": self.issued.isoformat(), "currency": self.vendor.currency, "subtotal": f"{self.subtotal}",
                "tax": f"{self.tax}", "total": f"{self.total}"}


def _fmt_date(d: date, style: str) -> str:
    return {"dmy-slash": d.strftime("%d/%m/%Y"), "dmy-dot": d.strftime("%d.%m.%Y"), "mdy": d.strftime("%m/%d/%Y"),
            "iso": d.isoformat(), "dmy-text": d.strftime("%d %b %Y")}[style]


def _money(v: Vendor, x: Decimal) -> str:
    return f"{x:,.2f}"


def layout(inv: Invoice) -> list[tuple[float, float, str]]:
    """The document as (x, y, text) runs in points on an A4 page (595 x 842), top-left origin."""
    v = inv.vendor
    out: list[tuple[float, float, str]] = []
    y = 50.0

    def put(x, text, dy=0.0):
        out.append((x, y + dy, text))

    put(40, v.name)
    for a in v.address:
        y += 16
        put(40, a)
    y += 16
    put(40, f"{v.tax_label}: {inv.tax_id_override or v.tax_id}")
    y += 28
    put(40, "RECEIPT" if v.receipt else "INVOICE")
    y += 20
    put(40, f"{'Receipt' if v.receipt else 'Invoice'} No: {inv.number}")
    put(330, f"Date: {_fmt_date(inv.issued, v.date_style)}")
    y += 28
    put(40, "Description")
    put(330, "Qty")
    put(390, "Unit price")
    put(480, "Amount")
    for i, (desc, q, p) in enumerate(inv.lines):
        y += 16
        put(40, desc)
        put(330, str(q))
        put(390, _money(v, p))
        put(480, _money(v, inv.amount(i)))
    y += 26
    put(330, "Subtotal")
    put(480, _money(v, inv.subtotal))
    y += 16
    put(330, v.tax_name)
    put(480, _money(v, inv.tax))
    y += 16
    cur = f" {v.currency}" if v.print_currency and v.symbol == v.currency else ""
    sym = "" if not v.print_currency or v.symbol == v.currency else v.symbol
    put(330, f"Total{cur}")
    put(480, f"{sym}{_money(v, inv.total)}")
    if inv.note:
        y += 30
        put(40, inv.note)
    y += 30
    put(40, "Thank you for your business.")
    return out


# --- renderers (one layout, four formats) -----------------------------------------------------------

def _width(text: str, size: float = 10.0) -> float:
    return len(text) * size * 0.5


def render_text(inv: Invoice) -> bytes:
    rows: dict[float, list[tuple[float, str]]] = {}
    for x, y, t in layout(inv):
        rows.setdefault(y, []).append((x, t))
    lines = []
    for y in sorted(rows):
        line = ""
        for x, t in sorted(rows[y]):
            col = int(x / 6)
            line = line.ljust(max(col, len(line) + 2 if line else 0)) + t
        lines.append(line.rstrip())
    return ("\n".join(lines) + "\n").encode("utf-8")


def render_ocr_lines(inv: Invoice) -> bytes:
    rows = []
    for x, y, t in layout(inv):
        x1, y1, x2, y2 = int(x), int(y - 9), int(x + _width(t)), int(y + 3)
        rows.append(f"{x1},{y1},{x2},{y1},{x2},{y2},{x1},{y2},{t}")
    return ("\n".join(rows) + "\n").encode("utf-8")


def _font_path() -> str | None:
    return next((p for p in FONT_CANDIDATES if Path(p).is_file()), None)


def _pdf():
    """An fpdf2 document whose bytes depend only on its content (fixed creation date and file id)."""
    from datetime import datetime, timezone

    from fpdf import FPDF

    pdf = FPDF(unit="pt", format="A4")
    pdf.set_creation_date(datetime(2026, 11, 30, tzinfo=timezone.utc))
    pdf.file_id = lambda: "<00000000000000000000000000000000><00000000000000000000000000000000>"
    return pdf


def render_pdf(inv: Invoice, *, password: str | None = None) -> bytes:
    pdf = _pdf()
    pdf.add_page()
    font = _font_path()
    if font:
        pdf.add_font("body", "", font)
        pdf.set_font("body", size=10)
    else:
        pdf.set_font("Helvetica", size=10)
    for x, y, t in layout(inv):
        pdf.text(x, y, t if font else t.encode("latin-1", "replace").decode("latin-1"))
    if password:
        pdf.set_encryption(owner_password=password, user_password=password)
    return bytes(pdf.output())


def render_png(inv: Invoice, scale: float = 2.0) -> bytes:
    from PIL import Image, ImageDraw, ImageFont

    img = Image.new("L", (int(595 * scale), int(560 * scale)), 255)
    draw = ImageDraw.Draw(img)
    font_file = _font_path()
    font = ImageFont.truetype(font_file, int(11 * scale)) if font_file else ImageFont.load_default(size=int(11 * scale))
    for x, y, t in layout(inv):
        draw.text((x * scale, (y - 10) * scale), t, fill=0, font=font)
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=True)
    return buf.getvalue()


RENDERERS = {"txt": render_text, "csv": render_ocr_lines, "pdf": render_pdf, "png": render_png}


def render(inv: Invoice, fmt: str) -> bytes:
    return RENDERERS[fmt](inv)


# --- the sample set -------------------------------------------------------------------------------

def invoices(seed: int = 7, n: int = 24, today: date = date(2026, 11, 30), first: int = 0) -> list[Invoice]:
    """``n`` invoices round the vendors; ``first`` offsets their numbers (sets that must not share any)."""
    rng = random.Random(seed)
    out = []
    for i in range(first, first + n):
        v = VENDORS[i % len(VENDORS)]
        picks = rng.sample(v.catalogue, k=rng.randint(1, min(4, len(v.catalogue))))
        lines = [(d, rng.randint(1, 6), Decimal(p)) for d, p in picks]
        issued = today - timedelta(days=rng.randint(1, 40))
        out.append(Invoice(v, f"{v.number_prefix}{1040 + i * 7:05d}" if v.receipt else f"{v.number_prefix}{1040 + i * 7}",
                           issued, lines))
    return out


def special_cases(base: list[Invoice], today: date = date(2026, 11, 30)) -> dict[str, Invoice]:
    """Named documents that must not go straight through (what each one shows)."""
    return {
        "wrong_total": replace(base[0], number=base[0].number + "-A", total_override=base[0].total + Decimal("10.00")),
        "line_mismatch": replace(base[1], number=base[1].number + "-B", line_amount_override={0: Decimal("999.00")}),
        "old_date": replace(base[2], number=base[2].number + "-C", issued=today - timedelta(days=500)),
        "bad_tax_id": replace(base[3], number=base[3].number + "-D", tax_id_override="FR00303265045",
                              issued=base[3].issued - timedelta(days=1)),
        "over_threshold": replace(base[5], number=base[5].number + "-E",
                                  lines=[("Annual licence, 40 seats", 40, Decimal("180.00"))]),
    }


FORMATS = ("txt", "csv", "pdf", "png")


def write_samples(out: Path = SAMPLES_DIR, seed: int = 7) -> dict:
    """Rewrite the committed sample set: inbox/ (documents), registered/ (files registered through the
    inbox table by the demo), malformed/ (files that must reach the dead-letter queue), truth.json."""
    import shutil

    for sub in ("inbox", "registered", "malformed"):
        shutil.rmtree(out / sub, ignore_errors=True)
        (out / sub).mkdir(parents=True)
    base = invoices(seed)
    truth = {}
    pngs = 0
    for i, inv in enumerate(base):
        fmt = FORMATS[i % len(FORMATS)]
        if fmt == "png":
            pngs += 1
            if pngs > 3:  # OCR is the slow path (about a second a page): three images are enough for the demo
                fmt = "pdf"
        name = f"{inv.vendor.number_prefix.strip('-').lower() or 'doc'}-{i:02d}.{fmt}"
        (out / "inbox" / name).write_bytes(render(inv, fmt))
        truth[name] = inv.truth()
    for label, inv in special_cases(base).items():
        name = f"{label}.txt"
        (out / "inbox" / name).write_bytes(render(inv, "txt"))
        truth[name] = {**inv.truth(), "case": label}
    # the same bill again, typed into another format: caught by vendor + number at validation
    # (named to sort after the original: files are dropped, and so arrive, in name order)
    (out / "inbox" / "second_copy_of_hp-01.txt").write_bytes(render(base[1], "txt"))
    truth["second_copy_of_hp-01.txt"] = {**base[1].truth(), "case": "duplicate_bill"}
    # the very same file under another name: the same hash, a duplicate at intake
    first = sorted((out / "inbox").glob("*.csv"))[0]
    (out / "inbox" / f"resent_{first.name}").write_bytes(first.read_bytes())
    for i, inv in enumerate(invoices(seed + 1, n=2, first=100)):
        (out / "registered" / f"registered-{i}.pdf").write_bytes(render(inv, "pdf"))
    bad = out / "malformed"
    (bad / "empty.pdf").write_bytes(b"")
    (bad / "locked.pdf").write_bytes(render_pdf(base[4], password="secret"))
    (bad / "torn.png").write_bytes(render_png(base[4])[:400])
    (bad / "contract.docx").write_bytes(b"PK\x03\x04" + bytes(range(256)) * 4)
    (bad / "binary.txt").write_bytes(b"\x00\x01\x02 not text")
    (bad / "blank.pdf").write_bytes(_blank_pdf())
    (out / "truth.json").write_text(json.dumps(truth, indent=1, sort_keys=True) + "\n", encoding="utf-8")
    return {"documents": len(list((out / "inbox").iterdir())), "malformed": len(list(bad.iterdir()))}


def _blank_pdf() -> bytes:
    pdf = _pdf()
    pdf.add_page()
    pdf.rect(40, 40, 200, 100)  # a drawing, no text layer
    return bytes(pdf.output())


# --- what `orch demo` does with them ----------------------------------------------------------------

def seed_demo(submit) -> dict:
    """Drop the inbox and malformed samples in the flow's inbox folder and register the two files of
    registered/ (and one path that does not exist) through the inbox table."""
    from ...lib.settings import Settings

    counts = submit([SAMPLES_DIR / "inbox", SAMPLES_DIR / "malformed"])
    reg = Settings.from_env().home / "demo" / "documents_registrations.jsonl"
    reg.parent.mkdir(parents=True, exist_ok=True)
    rows = [{"id": f"reg-{p.stem}", "path": str(p.resolve()), "submitter_email": f"{p.stem}@suppliers.example",
             "submitter_name": "Dana Whitfield", "received_at": "2026-11-30T09:00:00+00:00"}
            for p in sorted((SAMPLES_DIR / "registered").glob("*.pdf"))]
    rows.append({"id": "reg-missing", "path": str(SAMPLES_DIR / "registered" / "missing.pdf"),
                 "received_at": "2026-11-30T09:05:00+00:00"})
    reg.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    table = submit([reg])
    return {**{k: counts[k] + table[k] for k in counts}}


DEMO_REVIEWS = {
    # file name -> what the reviewers do (ids from roster.yaml)
    "wrong_total.txt": [("ap-nora", "approve", "total corrected from the line sum", "fix_total")],
    "over_threshold.txt": [("ap-nora", "approve", "licence renewal as ordered", None),
                           ("ap-victor", "approve", "second approval: budgeted", None)],
    "old_date.txt": [("ap-tomas", "reject", "paid last year (bank statement)", None)],
    "second_copy_of_hp-01.txt": [("ap-tomas", "reject", "duplicate of a bill already in the flow", None)],
}


def demo_reviews(db) -> str:
    """The AP team works the review queue: corrections, two-person approvals and rejections for the
    documents named in DEMO_REVIEWS; the rest stays waiting for a person. Only pending approvals are
    decided, so a second demo run decides nothing."""
    import sqlalchemy as sa

    from ...lib import approvals as hitl
    from ...lib.store import items
    from . import logic

    waiting = {r["item_id"]: r for r in hitl.pending(db, logic.FLOW)}
    with db.begin() as conn:
        names = dict(conn.execute(sa.select(items.c.item_id, items.c.data["name"].as_string()).where(
            items.c.flow == logic.FLOW, items.c.item_id.in_(list(waiting)))).all()) if waiting else {}
    by_name = {n: i for i, n in names.items()}
    done = 0
    for name, steps in DEMO_REVIEWS.items():
        item_id = by_name.get(name)
        if item_id is None:
            continue
        for who, decision, reason, edit in steps:
            text = None
            if edit == "fix_total":
                with db.begin() as conn:
                    data = conn.execute(sa.select(items.c.data).where(items.c.flow == logic.FLOW,
                                                                      items.c.item_id == item_id)).scalar_one()
                f = data["fields"]
                text = f"total: \"{Decimal(f['subtotal']['value']) + Decimal(f['tax']['value'] or 0)}\"\n"
            hitl.decide(db, item_id, decision, who, reason, text, logic.CFG.roster, flow=logic.FLOW)
            done += 1
    left = len(hitl.pending(db, logic.FLOW))
    return f"the AP team reviews: {done} decisions on {len(waiting)} waiting documents; {left} left for a person"


if __name__ == "__main__":
    print(write_samples())
