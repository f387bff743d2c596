"""Reading documents into text lines with their place on the page, for any flow that takes files.

Four formats, recognised by content first and by suffix second:

- PDF with a text layer (pdfplumber: words with positions, grouped into lines; points, top-left origin);
- images (PNG, JPEG, TIFF, every frame of a multi-page TIFF) through RapidOCR, an offline PP-OCR engine
  whose ONNX models ship inside its wheel (nothing is downloaded at run time); pixels, top-left origin;
- OCR line files (``.csv`` / ``.txt``) as OCR engines export them: one line per row,
  ``x1,y1,x2,y2,x3,y3,x4,y4,text`` (the box's four corners clockwise from top-left, then the text,
  which may contain commas);
- plain text (one line per line; the box is column and line number).

``read_document`` never guesses silently: an unreadable, encrypted, empty, oversized or unsupported file
raises ``DocumentError`` with a ``kind`` and a reason a person can act on.
"""

from __future__ import annotations

import hashlib
import io
import re
import threading
from dataclasses import asdict, dataclass, field
from typing import Any

MAX_DOCUMENT_BYTES = 10 * 1024 * 1024
MAX_PAGES = 20
MAX_IMAGE_PIXELS = 40_000_000

_OCR_ROW = re.compile(r"^\s*(-?\d+(?:\.\d+)?\s*,\s*){8}")


class DocumentError(ValueError):
    """A document that cannot be read: ``kind`` is one of unreadable, encrypted, empty, too_large,
    unsupported, no_text."""

    def __init__(self, kind: str, reason: str):
        super().__init__(reason)
        self.kind, self.reason = kind, reason


@dataclass(frozen=True)
class Line:
    """One text line: reading-order ``index`` across the document, 1-based ``page``, ``box`` as
    (x0, y0, x1, y1) from the page's top-left corner, and the OCR engine's ``confidence`` (1.0 for
    a text layer or a plain text file)."""

    text: str
    page: int
    box: tuple[float, float, float, float]
    index: int
    confidence: float = 1.0

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Line:
        return cls(d["text"], int(d["page"]), tuple(float(v) for v in d["box"]), int(d["index"]),
                   float(d.get("confidence", 1.0)))


@dataclass
class DocumentText:
    format: str  # pdf | image | ocr_lines | text
    lines: list[Line]
    pages: int
    sha256: str
    size_bytes: int
    page_sizes: list[tuple[float, float]] = field(default_factory=list)

    @property
    def text(self) -> str:
        return "\n".join(line.text for line in self.lines)


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def sniff(name: str, data: bytes) -> str:
    """The format of ``data``: by magic bytes, then (for text) by content, then by suffix."""
    head = data[:16]
    if head.startswith(b"%PDF-"):
        return "pdf"
    if head.startswith(b"\x89PNG\r\n\x1a\n") or head.startswith(b"\xff\xd8\xff") or head[:4] in (b"II*\x00", b"MM\x00*"):
        return "image"
    suffix = name.lower().rsplit(".", 1)[-1] if "." in name else ""
    if suffix in ("pdf", "png", "jpg", "jpeg", "tif", "tiff"):
        # the suffix promises a binary format the content is not
        raise DocumentError("unreadable", f"the file is named .{suffix} but its content is not a {suffix.upper()} "
                                          "file (damaged or mislabelled); export it again")
    if head.startswith(b"PK\x03\x04"):
        raise DocumentError("unsupported", f"a ZIP-based file (.{suffix or 'zip'}: Word, Excel or an archive); "
                                           "export the document as PDF and submit that")
    if b"\x00" in data[:4096]:
        raise DocumentError("unsupported", "binary content in a file that is not a PDF, PNG, JPEG or TIFF; "
                                           "supported: PDF with a text layer, PNG/JPEG/TIFF, OCR line files, text")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DocumentError("unreadable", f"text is not valid UTF-8 (byte {exc.start}); save it as UTF-8") from None
    rows = [r for r in text.splitlines() if r.strip()]
    if rows and sum(1 for r in rows if _OCR_ROW.match(r)) >= max(1, int(0.8 * len(rows))):
        return "ocr_lines"
    if suffix in ("txt", "csv", "text", ""):
        return "text"
    raise DocumentError("unsupported", f"unsupported file type .{suffix}")


def read_document(name: str, data: bytes, *, max_bytes: int = MAX_DOCUMENT_BYTES,
                  max_pages: int = MAX_PAGES) -> DocumentText:
    """Text lines with boxes from a document's bytes (``name`` gives the suffix); raises DocumentError."""
    if not data:
        raise DocumentError("empty", "empty file (0 bytes)")
    if len(data) > max_bytes:
        raise DocumentError("too_large", f"file is {len(data) / 1048576:.1f} MiB, above the "
                                         f"{max_bytes / 1048576:.0f} MiB limit; split or compress it")
    fmt = sniff(name, data)
    if fmt == "pdf":
        lines, sizes = _read_pdf(data, max_pages)
    elif fmt == "image":
        lines, sizes = _read_image(data, max_pages)
    else:
        text = data.decode("utf-8-sig")
        lines = parse_ocr_lines(text) if fmt == "ocr_lines" else _text_lines(text)
        sizes = []
    if not any(line.text.strip() for line in lines):
        hint = {"pdf": "the PDF has no text layer (a scan?): submit it as an image so it is read by OCR",
                "image": "OCR found no text in the image (blank, too small or too blurred)"}.get(fmt, "no text")
        raise DocumentError("no_text", hint)
    pages = max(line.page for line in lines)
    return DocumentText(fmt, lines, pages, sha256(data), len(data), sizes)


# --- text and OCR line files ------------------------------------------------------------------

def _text_lines(text: str) -> list[Line]:
    out = []
    for row, raw in enumerate(text.splitlines()):
        if raw.strip():
            lead = len(raw) - len(raw.lstrip())
            out.append(Line(" ".join(raw.split()), 1, (float(lead), float(row), float(len(raw.rstrip())),
                                                        float(row + 1)), len(out)))
    return out


def parse_ocr_lines(text: str) -> list[Line]:
    """OCR line rows ``x1,y1,...,x4,y4,text`` as Lines (box: the corners' bounding box), in reading
    order (top to bottom, then left to right). A row that does not have eight numbers is an error."""
    raw = []
    for n, row in enumerate(text.splitlines(), 1):
        if not row.strip():
            continue
        parts = row.split(",", 8)
        if len(parts) < 9:
            raise DocumentError("unreadable", f"OCR line file row {n}: expected x1,y1,...,x4,y4,text")
        try:
            xy = [float(p) for p in parts[:8]]
        except ValueError:
            raise DocumentError("unreadable", f"OCR line file row {n}: the first eight values must be numbers") from None
        xs, ys = xy[0::2], xy[1::2]
        raw.append((min(xs), min(ys), max(xs), max(ys), " ".join(parts[8].split())))
    return _ordered(raw, page=1)


def _ordered(raw: list[tuple[float, float, float, float, str]], page: int, start: int = 0,
             confidences: list[float] | None = None) -> list[Line]:
    """Lines sorted top to bottom (rows whose vertical centres are within half a line height are one
    row, read left to right)."""
    conf = confidences or [1.0] * len(raw)
    items = sorted(zip(raw, conf), key=lambda t: ((t[0][1] + t[0][3]) / 2, t[0][0]))
    rows: list[list[tuple]] = []
    for item in items:
        (x0, y0, x1, y1, _), _c = item
        centre, height = (y0 + y1) / 2, max(1.0, y1 - y0)
        if rows:
            (px0, py0, px1, py1, _), _pc = rows[-1][0]
            if abs(centre - (py0 + py1) / 2) <= 0.5 * min(height, max(1.0, py1 - py0)):
                rows[-1].append(item)
                continue
        rows.append([item])
    out: list[Line] = []
    for row in rows:
        for (x0, y0, x1, y1, text), c in sorted(row, key=lambda t: t[0][0]):
            if text:
                out.append(Line(text, page, (x0, y0, x1, y1), start + len(out), round(float(c), 4)))
    return out


# --- PDF --------------------------------------------------------------------------------------

def _read_pdf(data: bytes, max_pages: int) -> tuple[list[Line], list[tuple[float, float]]]:
    from pypdf import PdfReader
    from pypdf.errors import PyPdfError

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted:
            raise DocumentError("encrypted", "the PDF is password-protected; submit an unprotected copy")
        n_pages = len(reader.pages)
    except DocumentError:
        raise
    except (PyPdfError, ValueError, KeyError, TypeError, OSError) as exc:
        raise DocumentError("unreadable", f"damaged PDF ({type(exc).__name__}); export it again") from None
    if n_pages > max_pages:
        raise DocumentError("too_large", f"{n_pages} pages, above the {max_pages}-page limit; split the file")
    import pdfplumber

    lines: list[Line] = []
    sizes: list[tuple[float, float]] = []
    try:
        with pdfplumber.open(io.BytesIO(data)) as pdf:
            for number, page in enumerate(pdf.pages, 1):
                sizes.append((float(page.width), float(page.height)))
                raw = [(t["x0"], t["top"], t["x1"], t["bottom"], " ".join(t["text"].split()))
                       for t in page.extract_text_lines(return_chars=False)]
                lines += _ordered(raw, number, start=len(lines))
    except Exception as exc:  # pdfminer raises many kinds on damaged content streams
        raise DocumentError("unreadable", f"cannot read the PDF's text ({type(exc).__name__}); export it again") from None
    return lines, sizes


# --- images (OCR) -----------------------------------------------------------------------------

_ocr_lock = threading.Lock()
_ocr_engine: Any = None


def ocr_engine():
    """The RapidOCR engine, loaded once per process (about 0.3 s)."""
    global _ocr_engine
    if _ocr_engine is None:
        with _ocr_lock:
            if _ocr_engine is None:
                from rapidocr_onnxruntime import RapidOCR

                _ocr_engine = RapidOCR(intra_op_num_threads=2, inter_op_num_threads=1)
    return _ocr_engine


def _read_image(data: bytes, max_pages: int) -> tuple[list[Line], list[tuple[float, float]]]:
    import numpy as np
    from PIL import Image, ImageSequence, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(data))
        if img.width * img.height > MAX_IMAGE_PIXELS:
            raise DocumentError("too_large", f"image is {img.width}x{img.height} pixels, above the "
                                             f"{MAX_IMAGE_PIXELS // 1_000_000} megapixel limit; scan at 300 dpi")
        frames = []
        for _, frame in zip(range(max_pages + 1), ImageSequence.Iterator(img)):
            if frame.width * frame.height > MAX_IMAGE_PIXELS:  # every page, not only the first
                raise DocumentError("too_large", f"a page is {frame.width}x{frame.height} pixels, above the "
                                                 f"{MAX_IMAGE_PIXELS // 1_000_000} megapixel limit; scan at 300 dpi")
            frames.append(frame.convert("RGB"))
    except DocumentError:
        raise
    except (UnidentifiedImageError, OSError, ValueError, Image.DecompressionBombError) as exc:
        raise DocumentError("unreadable", f"damaged image ({type(exc).__name__}); scan or export it again") from None
    if len(frames) > max_pages:
        raise DocumentError("too_large", f"more than {max_pages} pages in the image; split the file")
    engine = ocr_engine()
    lines: list[Line] = []
    sizes: list[tuple[float, float]] = []
    for number, frame in enumerate(frames, 1):
        sizes.append((float(frame.width), float(frame.height)))
        pixels = np.asarray(frame)
        gray = np.asarray(frame.convert("L"))
        result, _ = engine(pixels[:, :, ::-1], return_word_box=True)  # BGR, as OpenCV reads
        raw, conf = [], []
        for box, text, score, *chars in result or []:
            xs, ys = [p[0] for p in box], [p[1] for p in box]
            raw.append((min(xs), min(ys), max(xs), max(ys), _with_spaces(text, chars[0] if chars else None, gray,
                                                                  (min(xs), min(ys), max(xs), max(ys)))))
            conf.append(float(score))
        lines += _ordered(raw, number, start=len(lines), confidences=conf)
    return lines, sizes


def _with_spaces(text: str, char_boxes: list | None, gray: Any, box: tuple[float, float, float, float]) -> str:
    """PP-OCR's recogniser drops the spaces between words: put them back where the line's pixels show
    a blank gap wider than a third of the line height, at the character boundary (from the
    recogniser's character boxes) nearest to the gap's centre."""
    if not char_boxes or len(char_boxes) != len(text) or len(text) < 2:
        return text
    import numpy as np

    x0, y0, x1, y1 = (int(round(v)) for v in box)
    crop = gray[max(0, y0):max(0, y1), max(0, x0):max(0, x1)]
    if crop.size == 0:
        return text
    ink = (crop < min(160, int(crop.mean()) - 30)).any(axis=0)
    cols = np.flatnonzero(ink)
    if cols.size == 0:
        return text
    gap_min = max(3, (y1 - y0) // 3)
    gaps = []
    run_start = None
    for x in range(int(cols[0]), int(cols[-1]) + 1):
        if not ink[x]:
            run_start = x if run_start is None else run_start
        elif run_start is not None:
            if x - run_start >= gap_min:
                gaps.append(x0 + (run_start + x) / 2)
            run_start = None
    if not gaps:
        return text
    centres = [sum(p[0] for p in b) / len(b) for b in char_boxes]
    breaks = set()
    for g in gaps:
        i = min(range(1, len(text)), key=lambda k: abs((centres[k - 1] + centres[k]) / 2 - g))
        if centres[i - 1] < g < centres[i]:
            breaks.add(i)
    return "".join((" " if i in breaks and text[i - 1] != " " and text[i] != " " else "") + ch
                   for i, ch in enumerate(text))
