"""`orch documents ...`: the document workflow's own commands.

    orch documents extract PATH... [--jsonl]   read, extract and validate documents without Dagster
    orch documents review ID                   a waiting document: text, extracted fields, failed rules
"""

from __future__ import annotations

import json
import sys
from datetime import date
from pathlib import Path

import click


def _paths(paths: tuple[Path, ...]) -> list[Path]:
    out: list[Path] = []
    for p in paths:
        if p.is_dir():
            out += sorted(x for x in p.iterdir() if x.is_file() and not x.name.startswith("."))
        else:
            out.append(p)
    return out


def extract_one(path: Path, index, today: date) -> dict:
    """One document through the flow's own reading, masking, extraction and validation functions."""
    from ...lib import docread
    from . import logic
    from .extract import extract
    from .schema import FIELDS

    try:
        doc = logic.read_file(path)
    except docread.DocumentError as exc:
        return {"id": path.stem, "error": {"kind": exc.kind, "reason": exc.reason}, "needs_review": True}
    lines, _ = logic.masked_lines(doc.lines, [])
    out = extract([docread.Line.from_dict(d) for d in lines], default_currency=logic.CFG.settings.default_currency)
    fields, line_items = logic.fields_from_output(out, lines)
    item_id = f"doc-{doc.sha256[:20]}"
    data = {"fields": fields, "line_items": line_items, "lines": lines, "sha256": doc.sha256}
    checks = logic.validate_document(item_id, data, logic.CFG, today, index)
    index.add(path.stem, doc.sha256, fields)
    return {
        "id": path.stem,
        "fields": {**{f: fields[f]["value"] for f in FIELDS},
                   "line_items": [{k: li[k] for k in ("description", "quantity", "unit_price", "amount")}
                                  for li in line_items]},
        "confidence": {f: fields[f]["confidence"] for f in FIELDS},
        "provenance": {f: fields[f]["provenance"] for f in FIELDS if fields[f]["provenance"]},
        "validation": [{"rule": c.rule, "ok": c.ok, "reason": c.reason} for c in checks],
        "needs_review": any(not c.ok for c in checks),
        "format": doc.format,
    }


@click.group(name="documents", help="The document workflow: extraction and validation without Dagster, and the "
                                    "reviewer's view of a waiting document.")
def group() -> None:
    pass


@group.command(help="Read, extract and validate documents (files or folders: PDF, PNG/JPEG/TIFF, OCR line files, "
                    "text) with the flow's own functions, without Dagster or a database: one JSON object per "
                    "document on stdout (amounts as decimal strings, dates ISO, unknown fields null). Duplicates "
                    "are checked among the documents given. Exit code 1 if a file could not be read.")
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True, path_type=Path))
@click.option("--jsonl", is_flag=True, help="one compact JSON line per document (default: indented)")
def extract(paths: tuple[Path, ...], jsonl: bool) -> None:
    from . import validation as v

    files = _paths(paths)
    index = v.DuplicateIndex()
    today = date.today()
    unreadable = 0
    for n, path in enumerate(files, 1):
        rec = extract_one(path, index, today)
        unreadable += 1 if "error" in rec else 0
        if not jsonl:
            rec.pop("provenance", None)
        click.echo(json.dumps(rec, ensure_ascii=False, separators=(",", ":")) if jsonl
                   else json.dumps(rec, ensure_ascii=False, indent=2))
        if not jsonl and len(files) > 20 and n % 50 == 0:
            click.echo(f"{n}/{len(files)} documents", err=True)
    if unreadable:
        click.echo(f"{unreadable} of {len(files)} file(s) could not be read (see their error)", err=True)
        sys.exit(1)


@group.command(help="A document waiting for a person: its text (masked, numbered lines), the extracted fields with "
                    "confidence and where they were read, every rule with its reason, and how to correct it.")
@click.argument("item_id")
def review(item_id: str) -> None:
    import sqlalchemy as sa

    from ...cli import open_db
    from ...lib.store import approvals, items
    from . import logic
    from .schema import FIELDS

    db = open_db()
    with db.begin() as conn:
        row = conn.execute(sa.select(items.c.status, items.c.data).where(
            items.c.flow == logic.FLOW, items.c.item_id == item_id)).first()
        ap = conn.execute(sa.select(approvals.c.status, approvals.c.required_role, approvals.c.due_at).where(
            approvals.c.flow == logic.FLOW, approvals.c.item_id == item_id)).first()
    if row is None:
        raise click.ClickException(f"no document {item_id!r}; `orch review list --flow documents` shows the waiting ones")
    d = row.data
    failing = {f for c in d.get("validation") or [] if not c["ok"] for f in c.get("fields") or []}
    click.echo(click.style(f"{item_id}  {d.get('name')}  ({d.get('format')}, {d.get('pages')} page(s))  "
                           f"status {row.status}", bold=True))
    if ap is not None:
        click.echo(f"approval: {ap.status}, needs role {ap.required_role}, due {ap.due_at}"
                   + (f"; signed off by {', '.join(s['by'] for s in d['signoffs'])}" if d.get("signoffs") else ""))
    click.echo(click.style("\ndocument text", underline=True))
    for line in d.get("lines") or []:
        click.echo(f"  [{line['index']:>3}] p{line['page']}  {line['text']}")
    if d.get("fields"):
        click.echo(click.style("\nextracted fields", underline=True))
        for f in FIELDS:
            fv = d["fields"][f]
            where = ", ".join(f"p{p['page']} line {p['line']}" for p in fv.get("provenance") or []) or "-"
            mark = click.style(" <- check", fg="red") if f in failing else ""
            click.echo(f"  {f:<9} {str(fv['value']):<40} conf {fv['confidence']:.2f}  ({where}){mark}")
        for li in d.get("line_items") or []:
            click.echo(f"  line      {li['description']:<40} {li['quantity']} x {li['unit_price']} = {li['amount']}")
    if d.get("validation"):
        click.echo(click.style("\nvalidation", underline=True))
        for c in d["validation"]:
            state = click.style("ok  ", fg="green") if c["ok"] else click.style("FAIL", fg="red")
            click.echo(f"  {state} {c['rule']:<27} {c['reason']}")
    if ap is not None and ap.status == "pending":
        click.echo("\nto correct fields, write a YAML file with the right values, e.g.\n"
                   "  total: \"123.45\"\n  date: 2026-11-03\n"
                   f"then: orch approve {item_id} --as YOUR_ID --edit-file FILE --flow documents"
                   f"   (or: orch reject {item_id} --as YOUR_ID --reason ... --flow documents)")
