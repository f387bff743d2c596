"""The document workflow's figures: extraction + validation throughput from OCR line files and from PDFs
(the flow's own functions, as each document goes through them: read the file, mask personal data,
extract, validate), and per-field exact-match accuracy on the labelled receipts of ``sroie-dev``
(normalised: case, spaces and punctuation for company and address, calendar date, numeric total; all
receipts, the held-out vendor fold and the rest; see benchmarks/documents_accuracy.py for the misses).

    .venv/bin/python benchmarks/documents.py [--pdfs 40] [--repeat 2]

OCR line files come from $ORCH_DATA_DIR/sroie-dev/box (default ../shared/data beside the checkout);
without it, generated OCR line files are used and the accuracy part is skipped (said so). PDFs are
generated invoices rendered with fpdf2 (seeded). One core; compare figures within one run. The last
line of the output is one JSON object with the figures.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from documents_accuracy import data_folder  # noqa: E402

from orch_project.defs.documents import sample_data as sd, validation as v  # noqa: E402
from orch_project.defs.documents.cli import extract_one  # noqa: E402
from orch_project.defs.documents.extract import EXTRACTOR_VERSION, sroie_accuracy  # noqa: E402


def one_document(path: Path, index: v.DuplicateIndex, today: date) -> bool:
    """The flow's path for one file (what `orch documents extract` runs); True when it needs a person."""
    return extract_one(path, index, today)["needs_review"]


def throughput(paths: list[Path], repeat: int) -> dict:
    today = date.today()
    for p in paths[:5]:  # warm-up: Presidio's engines, regex caches, pdfminer imports
        one_document(p, v.DuplicateIndex(), today)
    t0 = time.perf_counter()
    review = 0
    for _ in range(repeat):
        index = v.DuplicateIndex()
        review = sum(one_document(p, index, today) for p in paths)
    elapsed = time.perf_counter() - t0
    n = len(paths) * repeat
    return {"documents": len(paths), "passes": repeat, "docs_per_s": round(n / elapsed, 1),
            "ms_per_doc": round(1000 * elapsed / n, 2), "needing_review": review}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pdfs", type=int, default=40, help="generated PDF invoices to time")
    ap.add_argument("--repeat", type=int, default=2, help="passes over the files")
    args = ap.parse_args(argv)
    folder = data_folder()
    out: dict = {"extractor": EXTRACTOR_VERSION}
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        if (folder / "box").is_dir():
            ocr = sorted((folder / "box").glob("*.csv"))
            out["ocr_source"] = str(folder / "box")
        else:
            print(f"{folder} not found: timing generated OCR line files instead (set ORCH_DATA_DIR for the real "
                  "receipts and the accuracy figures)", file=sys.stderr)
            ocr = []
            for i, inv in enumerate(sd.invoices(seed=3, n=100)):
                p = tmp / f"ocr-{i:03d}.csv"
                p.write_bytes(sd.render(inv, "csv"))
                ocr.append(p)
            out["ocr_source"] = "generated"
        pdfs = []
        for i, inv in enumerate(sd.invoices(seed=5, n=args.pdfs)):
            p = tmp / f"inv-{i:03d}.pdf"
            p.write_bytes(sd.render(inv, "pdf"))
            pdfs.append(p)
        print(f"timing {len(ocr)} OCR line files and {len(pdfs)} PDFs, {args.repeat} passes each ...", file=sys.stderr)
        out["ocr_lines"] = throughput(ocr, args.repeat)
        out["pdf"] = throughput(pdfs, args.repeat)
    print(f"OCR line files: {out['ocr_lines']['docs_per_s']} documents/s ({out['ocr_lines']['ms_per_doc']} ms each; "
          f"read + mask + extract + validate)")
    print(f"PDF (text layer): {out['pdf']['docs_per_s']} documents/s ({out['pdf']['ms_per_doc']} ms each)")
    if (folder / "key").is_dir():
        acc = sroie_accuracy(folder)
        acc.pop("misses", None)
        out["accuracy"] = {k: acc[k] for k in ("all", "held_out", "dev")}
        out["accuracy_counts"] = acc["counts"]
        print(f"{'field':10s} {'all':>8s} {'held-out':>9s} {'dev':>8s}")
        for f in ("total", "date", "company", "address"):
            print(f"{f:10s} {acc['all'][f]:8.3f} {acc['held_out'][f]:9.3f} {acc['dev'][f]:8.3f}")
        print(f"{'receipts':10s} {acc['counts']['all']:8d} {acc['counts']['held_out']:9d} {acc['counts']['dev']:8d}")
    else:
        out["accuracy"] = None
        print("accuracy: skipped (no labelled receipts; set ORCH_DATA_DIR)")
    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
