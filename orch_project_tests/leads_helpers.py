"""Shared helpers of the leads flow's tests: leads dropped in the inbox, forms, the connectors' tables."""

from __future__ import annotations

import csv
import io
import json
import os
from datetime import datetime, timezone

import sqlalchemy as sa

from orch_project.lib.connectors.embedded import crm_contacts, messages
from orch_project.lib.store import items

from .conftest import flow_inbox

FLOW = "leads"
DAY = "2026-11-30"
ARRIVAL = datetime(2026, 11, 30, 10, 0, tzinfo=timezone.utc).timestamp()
HOT = {"Lead Origin": "Lead Add Form", "Lead Source": "Reference", "Total Time Spent on Website": "1500",
       "Last Activity": "SMS Sent", "Current Occupation": "Working Professional", "TotalVisits": "5"}
WARM = {"Lead Origin": "Landing Page Submission", "Lead Source": "Google", "TotalVisits": "3",
        "Total Time Spent on Website": "700", "Last Activity": "Email Opened", "Current Occupation": "Unemployed"}
COLD = {"Lead Origin": "API", "Lead Source": "Olark Chat", "Total Time Spent on Website": "0",
        "Last Activity": "Email Bounced", "Current Occupation": "", "TotalVisits": "0", "Do Not Email": "No",
        "A free copy of the interview guide": "Yes"}


def drop(settings, name: str, data: bytes | str, at: float = ARRIVAL):
    folder = flow_inbox(settings, FLOW)
    folder.mkdir(parents=True, exist_ok=True)
    p = folder / name
    p.write_bytes(data.encode() if isinstance(data, str) else data)
    os.utime(p, (at, at))
    return p


FIRST = ["Ada", "Bruno", "Carla", "Dmitri", "Elif", "Farah", "Goran", "Hana", "Ivo", "Juno"]
LAST = ["Quist", "Marlowe", "Okonjo", "Varga", "Tanaka", "Delacroix", "Nyberg", "Castell", "Ruiz", "Abara"]


def form(i: int, *, email: str | None = None, attrs=None, **extra) -> str:
    first, last = FIRST[i % 10], LAST[(3 * i + 1) % 10]
    rec = {"id": f"wf-{i}", "first_name": first, "last_name": last, "email": email or f"{first.lower()}{i}@quistlabs.com",
           "phone": f"+44 7700 900{i:03d}", "company": "Quist Labs", "title": "Head of Learning", "country": "GB",
           "attributes": dict(attrs or HOT), **extra}
    return json.dumps(rec)


def leads(db) -> dict[str, dict]:
    with db.begin() as conn:
        return {iid: {"status": st, **d} for iid, st, d in conn.execute(
            sa.select(items.c.item_id, items.c.status, items.c.data).where(items.c.flow == FLOW))}


def by_external(db, ext: str) -> tuple[str, dict]:
    for iid, d in leads(db).items():
        if d.get("external_id") == ext:
            return iid, d
    raise AssertionError(f"no lead {ext}")


def conn_db(settings):
    from orch_project.defs.resources import _embedded

    return _embedded(settings.connectors_url)


def lead_messages(settings) -> list[dict]:
    with conn_db(settings).db.begin() as conn:
        return [dict(r) for r in conn.execute(sa.select(messages).where(
            messages.c.idempotency_key.like("leads:%"), messages.c.kind != "escalation")).mappings()]


def contacts_table(settings) -> list[dict]:
    with conn_db(settings).db.begin() as conn:
        return [dict(r) for r in conn.execute(sa.select(crm_contacts)).mappings()]


def csv_import(rows: list[dict]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(rows[0]))
    w.writeheader()
    w.writerows(rows)
    return buf.getvalue()

